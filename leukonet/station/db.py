"""The station's tables (SQLAlchemy 2 ORM) and the database they live in.

SQLite by default (one file, WAL journal so readers never block the writer and a killed server leaves the last
committed state; foreign keys on); any SQLAlchemy URL works, PostgreSQL included. The schema is versioned with
Alembic (``migrations/``): ``open_database`` creates or upgrades, never drops or rewrites what is there.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (JSON, Boolean, DateTime, Engine, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from leukonet.errors import DataError

MIGRATIONS = Path(__file__).parent / "migrations"
NOT_A_LEUKOCYTE = "not_a_leukocyte"  # the review label of an input that is no leukocyte (key X on the page)


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime | None) -> str | None:
    """UTC, ISO 8601, as written (SQLite returns the time without its zone)."""
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()


class Base(DeclarativeBase):
    pass


class Case(Base):
    """One slide or sample. Signed off: read-only from then on."""

    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    note: Mapped[str] = mapped_column(Text, default="")
    signed_off_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    signed_off_by: Mapped[str | None] = mapped_column(String(100))
    uploads: Mapped[list[Upload]] = relationship(back_populates="case", order_by="Upload.id")
    cells: Mapped[list[Cell]] = relationship(back_populates="case", order_by="Cell.id")


class Image(Base):
    """A file in the image store, named by the SHA-256 of its bytes: stored once however often it is used."""

    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    suffix: Mapped[str] = mapped_column(String(8))
    nbytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Upload(Base):
    """A file uploaded to a case: its image (None when it was refused, with the reason in ``error``). The same
    image twice in a case is one upload."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("case_id", "image_sha", name="uq_upload_case_image"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    image_sha: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"))
    name: Mapped[str] = mapped_column(String(200))  # shown only; never a path
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    case: Mapped[Case] = relationship(back_populates="uploads")
    cells: Mapped[list[Cell]] = relationship(back_populates="upload", order_by="Cell.id")


class Cell(Base):
    """One classified cell: the model's answer (kept as it was) and the person's review."""

    __tablename__ = "cells"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    upload_id: Mapped[int] = mapped_column(ForeignKey("uploads.id"), index=True)
    index: Mapped[int | None] = mapped_column(Integer)  # the cell's number within a field; None: a single-cell image
    x: Mapped[float | None] = mapped_column(Float)
    y: Mapped[float | None] = mapped_column(Float)
    image_sha: Mapped[str] = mapped_column(ForeignKey("images.sha256"))  # the cell: its upload, or a PNG crop
    heatmap_sha: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"))  # Grad-CAM overlay (JPEG)
    predicted: Mapped[str | None] = mapped_column(String(50))  # None: flagged not a leukocyte
    top_class: Mapped[str] = mapped_column(String(50))
    probabilities: Mapped[dict] = mapped_column(JSON)
    confidence: Mapped[float] = mapped_column(Float)
    needs_review: Mapped[bool] = mapped_column(Boolean)
    not_a_leukocyte: Mapped[bool] = mapped_column(Boolean)
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood_reason: Mapped[str | None] = mapped_column(String(100))
    notes: Mapped[list] = mapped_column(JSON, default=list)
    checkpoint: Mapped[str] = mapped_column(Text)  # the checkpoint file's path when it classified the cell
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    review_label: Mapped[str | None] = mapped_column(String(50))  # a class, or NOT_A_LEUKOCYTE
    reviewer: Mapped[str | None] = mapped_column(String(100))
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    case: Mapped[Case] = relationship(back_populates="cells")
    upload: Mapped[Upload] = relationship(back_populates="cells")


class Review(Base):
    """Every review as it happened, with the state it replaced, so that U (undo) restores exactly that."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"), index=True)
    label: Mapped[str] = mapped_column(String(50))
    reviewer: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    previous_label: Mapped[str | None] = mapped_column(String(50))
    previous_reviewer: Mapped[str | None] = mapped_column(String(100))
    previous_reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # a crash leaves the last commit; readers do not block the writer
    cur.execute("PRAGMA synchronous=FULL")  # a committed case survives a power cut too
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def engine_for(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise DataError(f"db_url={url!r} is not a database URL ({err})") from None
    engine = create_engine(parsed, pool_pre_ping=True)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _alembic(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine  # env.py runs on this engine: no second URL, no logging setup
    return cfg


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    return ScriptDirectory.from_config(_alembic(None)).get_current_head()


def open_database(url: str, create: bool = True) -> sessionmaker:
    """Sessions on the database at ``url``, created (``create``) or upgraded to this code's schema; a database
    from newer code, or (``create=False``) a SQLite file that is not there, is refused."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not path.exists() and not create:
            raise DataError(f"db_url={url}: no database at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = engine_for(str(url))
    current, known = revision(engine), head()
    if current is not None and current != known:
        script = ScriptDirectory.from_config(_alembic(engine))
        if current not in {r.revision for r in script.walk_revisions()}:
            raise DataError(f"db_url={url}: schema revision {current} is newer than this leukonet knows "
                            f"({known}); update leukonet")
    if current != known:
        if not create:
            raise DataError(f"db_url={url}: schema revision {current} is not {known}; start the server once to "
                            f"upgrade it")
        command.upgrade(_alembic(engine), "head")
    return sessionmaker(engine, expire_on_commit=False)
