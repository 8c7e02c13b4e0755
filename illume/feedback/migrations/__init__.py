"""The store's schema over time: opening checks, and Alembic migrations that bring an older store to this code's layout.

Assumptions, up front:
- Opening checks run before anything is written: the database is a feedback store (or empty), and no newer illume
  wrote it (a revision in `alembic_version` this code does not know, or `illume_meta.schema_version` above
  `SCHEMA_VERSION`); each failure is one `StoreError` line. Readers (`create=False`: status, exports, the
  annotation page) never make a store where there is none.
- Schema changes are Alembic revisions (versions/ beside this file, run by env.py); `alembic_version` is the
  store's version table. A new store is made from the declarations (`illume.feedback.schema`, with its triggers)
  and stamped with the newest revision; a store with an older revision is upgraded; a store written before the
  migrations existed (illume up to 68697c1: no `alembic_version`) runs every revision from the first, each of
  which looks at what the store has, so that stores of every earlier release open: missing tables are created
  (r0001), columns added since the first release are added (r0002), `items.num_judgments` with its triggers and
  the later indexes are added and counted (r0003), and the annotators of a store from before kinds were stored
  are registered with the kind their names implied (r0004).
- Migrations run programmatically when a store is opened (no alembic.ini), in the opener's one transaction, which
  holds the write lock (SQLite: BEGIN IMMEDIATE) or, on PostgreSQL, the schema lock (`_lock_schema`): openers
  take turns, and no judgment is missed in between. A store at the newest revision costs one SELECT.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import column, func, insert, inspect, select, table, update
from sqlalchemy.engine import Connection

from illume.feedback.engine import StoreError
from illume.feedback.schema import CORE_TABLES, JUDGMENT_COUNT_TRIGGERS, SCHEMA_VERSION, Base, MetaRow

VERSION_TABLE = "alembic_version"
"""Alembic's version table: the store's revision."""
_VERSION_NUM = table(VERSION_TABLE, column("version_num")).c.version_num


def upgrade(connection: Connection, url: str, create: bool) -> None:
    """Check that the database is a feedback store this code may open and bring it to this code's layout, in the
    caller's (opening) transaction.

    Raises:
        StoreError: Not a feedback store (or, with create=False, none), or a newer illume wrote it.
    """
    dialect = connection.dialect.name
    if dialect not in JUDGMENT_COUNT_TRIGGERS:
        raise NotImplementedError(f"the feedback store keeps its judgment counts on SQLite and PostgreSQL, not {dialect}")
    _lock_schema(connection)
    tables = set(inspect(connection).get_table_names())
    _check_is_store(connection, tables, url, create)
    script = _script()
    head = script.get_current_head()
    if VERSION_TABLE in tables:
        revision = connection.scalar(select(_VERSION_NUM))
        if revision != head:
            if revision is not None and revision not in {known.revision for known in script.walk_revisions()}:
                raise StoreError(f"{url} was written by a newer illume (store revision {revision}, unknown to this "
                                 f"illume, which reads up to {head}): upgrade illume to open it")
            command.upgrade(_config(connection), "head")
    elif CORE_TABLES <= tables:  # written before the migrations: every revision, from the first
        command.upgrade(_config(connection), "head")
    else:  # empty: this code's layout, at the newest revision
        Base.metadata.create_all(connection)
        command.stamp(_config(connection), "head")
    _record_schema_version(connection)


def _config(connection: Connection | None) -> Config:
    """Alembic's configuration, built here (no alembic.ini): these migrations, run on `connection` (env.py)."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    """The revisions (read once per process)."""
    return ScriptDirectory.from_config(_config(None))


_SCHEMA_LOCK = 0x696C6C756D65  # "illume": the advisory lock key of `_lock_schema`


def _lock_schema(connection: Connection) -> None:
    """Make concurrent openers of one PostgreSQL database take turns creating and migrating its tables.

    On SQLite the opening transaction already holds the write lock (BEGIN IMMEDIATE). PostgreSQL does not
    serialise writers, and two `CREATE TABLE`s of one name race ("duplicate key ... pg_type"): a
    transaction-scoped advisory lock does it, released at commit.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))


def _check_is_store(connection: Connection, tables: set[str], url: str, create: bool) -> None:
    """Refuse a database that is not a feedback store, or one a newer illume wrote, before anything is written.

    A database with the store's tables is one (a store from before `illume_meta` included); an empty one
    becomes one (with `create`); a SQLite file holding other tables, or a database holding tables of the
    store's names (or only a version table of Alembic) but not its core, is something else and is left alone.
    """
    if MetaRow.__tablename__ in tables:
        version = connection.scalar(select(MetaRow.value).where(MetaRow.key == "schema_version"))
        if version is not None and int(version) > SCHEMA_VERSION:
            raise StoreError(f"{url} was written by a newer illume (store schema {version}; this illume reads up "
                             f"to {SCHEMA_VERSION}): upgrade illume to open it")
        return
    if CORE_TABLES <= tables:
        return
    ours = tables & {*Base.metadata.tables, VERSION_TABLE}
    if ours or (tables and connection.dialect.name == "sqlite"):
        found = ", ".join(sorted(tables)[:8]) + (", ..." if len(tables) > 8 else "")
        raise StoreError(f"{url} is not a feedback store: it holds other tables ({found})")
    if not create:
        raise StoreError(f"{url} holds no feedback store: start the run first (`illume run ...`)")


def _record_schema_version(connection: Connection) -> None:
    """Write (or raise to this code's) `schema_version`, once the tables have this code's layout."""
    version = connection.scalar(select(MetaRow.value).where(MetaRow.key == "schema_version"))
    if version is None:
        connection.execute(insert(MetaRow).values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif int(version) < SCHEMA_VERSION:
        connection.execute(update(MetaRow).where(MetaRow.key == "schema_version").values(value=str(SCHEMA_VERSION)))