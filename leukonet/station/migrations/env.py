"""Alembic's entry: runs the revisions on the engine ``leukonet.station.db.open_database`` passes in."""

from alembic import context

from leukonet.station.db import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
