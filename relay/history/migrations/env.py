"""alembic's environment for the history: always run by HistoryStore.upgrade(), on the
connection it passes (never from an alembic.ini)."""

from __future__ import annotations

from alembic import context

from relay.history.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
