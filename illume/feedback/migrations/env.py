"""Alembic's entry point for the store's migrations: run by `illume.feedback.migrations.upgrade` (through
`alembic.command`) on the opener's connection, inside its transaction, never from a command line.

`config.attributes["connection"]` is that connection; the target metadata is the store's declarations, whose
naming convention the revisions' constraints and indexes follow.
"""

from alembic import context

from illume.feedback.schema import Base


def run_migrations() -> None:
    """Run the revisions Alembic chose on the opener's connection; its transaction is the caller's (Alembic
    begins none of its own on a connection already in one)."""
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


# Alembic sets `context.config` while it runs this file; imported as a module (tests/test_imports.py imports every
# module) there is nothing to run.
if hasattr(context, "config"):
    run_migrations()
