"""The first schema: cases, images (by content hash), uploads, cells, reviews.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("signed_off_at", TZ),
        sa.Column("signed_off_by", sa.String(100)),
    )
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("suffix", sa.String(8), nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("image_sha", sa.String(64), sa.ForeignKey("images.sha256")),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("case_id", "image_sha", name="uq_upload_case_image"),
    )
    op.create_table(
        "cells",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("upload_id", sa.Integer, sa.ForeignKey("uploads.id"), nullable=False, index=True),
        sa.Column("index", sa.Integer),
        sa.Column("x", sa.Float),
        sa.Column("y", sa.Float),
        sa.Column("image_sha", sa.String(64), sa.ForeignKey("images.sha256"), nullable=False),
        sa.Column("heatmap_sha", sa.String(64), sa.ForeignKey("images.sha256")),
        sa.Column("predicted", sa.String(50)),
        sa.Column("top_class", sa.String(50), nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("needs_review", sa.Boolean, nullable=False),
        sa.Column("not_a_leukocyte", sa.Boolean, nullable=False),
        sa.Column("ood_score", sa.Float),
        sa.Column("ood_reason", sa.String(100)),
        sa.Column("notes", sa.JSON, nullable=False),
        sa.Column("checkpoint", sa.Text, nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("review_label", sa.String(50)),
        sa.Column("reviewer", sa.String(100)),
        sa.Column("reviewed_at", TZ),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("cell_id", sa.Integer, sa.ForeignKey("cells.id"), nullable=False, index=True),
        sa.Column("label", sa.String(50), nullable=False),
        sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("previous_label", sa.String(50)),
        sa.Column("previous_reviewer", sa.String(100)),
        sa.Column("previous_reviewed_at", TZ),
        sa.Column("undone_at", TZ),
    )


def downgrade() -> None:
    for table in ("reviews", "cells", "uploads", "images", "cases"):
        op.drop_table(table)
