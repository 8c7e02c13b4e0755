"""Bringing a database to the store's layout when it is opened: new tables, older stores upgraded, newer ones refused.

Assumptions, up front:
- Opening checks run before anything is written: the database is a feedback store (or empty), and no newer illume
  wrote it (`illume_meta.schema_version` against `SCHEMA_VERSION`); each failure is one `StoreError` line.
  Readers (`create=False`: status, exports, the annotation page) never make a store where there is none.
- Everything here runs in the opener's one transaction, which holds the write lock (SQLite: BEGIN IMMEDIATE) or,
  on PostgreSQL, the schema lock (`_lock_schema`): openers take turns, and no judgment is missed in between.
- Older databases open: columns added after the first release (`judgments.updated_at`,
  `decisions.position_shown`, `items.question`, ...) are added (ALTER TABLE ... ADD COLUMN, nullable), new tables
  are created, and the names of a database written before `annotators` existed are registered once, with the
  kind the old code implied from the name (`_register_older_annotators`). `items.num_judgments` (each item's
  judgment count, kept by a trigger on `judgments`) is added and counted, and indexes declared since are created
  (`_add_judgment_counts`).
"""

from __future__ import annotations

from sqlalchemy import func, insert, inspect, select, update
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection

from illume.feedback.engine import StoreError
from illume.feedback.schema import (
    CORE_TABLES,
    SCHEMA_VERSION,
    AnnotatorRow,
    Base,
    JudgmentRow,
    MetaRow,
    utc_now,
)

_ADDED_COLUMNS = {"judgments": ("updated_at", "correction"), "decisions": ("position_shown",),
                  "items": ("question", "priority"), "candidates": ("model",), "judgment_revisions": ("correction",)}
"""Columns added after the first release: `upgrade` adds them to an older database."""


def upgrade(connection: Connection, url: str, create: bool) -> None:
    """Check that the database is a feedback store this code may open and bring it to this code's layout, in the
    caller's (opening) transaction.

    Raises:
        StoreError: Not a feedback store (or, with create=False, none), or a newer illume wrote it.
    """
    _lock_schema(connection)
    _check_is_store(connection, url, create)
    Base.metadata.create_all(connection)
    _add_missing_columns(connection)
    _add_judgment_counts(connection)
    _register_older_annotators(connection)
    _record_schema_version(connection)


def _register_older_annotators(connection: Connection) -> None:
    """Register the names of a database written before the `annotators` table existed (at open).

    Each name found in `judgments` but not in `annotators` gets the kind the old code implied from the
    name: "reward..." -> reward, "simulated..." -> simulated, anything else -> person. This is the only
    place a name says anything about a kind; every later write registers its kind explicitly.
    """
    unregistered = (
        select(JudgmentRow.annotator).distinct()
        .where(~select(AnnotatorRow.name).where(AnnotatorRow.name == JudgmentRow.annotator).exists())
    )
    names = list(connection.scalars(unregistered))
    if names:
        now = utc_now()
        connection.execute(insert(AnnotatorRow), [
            {"name": name, "kind": _implied_kind(name), "created_at": now} for name in sorted(names)
        ])


def _implied_kind(name: str) -> str:
    """The kind an annotator name implied before kinds were stored (`_register_older_annotators` only)."""
    if name.startswith("reward"):
        return "reward"
    if name.startswith("simulated"):
        return "simulated"
    return "person"


_SCHEMA_LOCK = 0x696C6C756D65  # "illume": the advisory lock key of `_lock_schema`


def _lock_schema(connection: Connection) -> None:
    """Make concurrent openers of one PostgreSQL database take turns creating and migrating its tables.

    On SQLite the opening transaction already holds the write lock (BEGIN IMMEDIATE). PostgreSQL does not
    serialise writers, and two `CREATE TABLE`s of one name race ("duplicate key ... pg_type"): a
    transaction-scoped advisory lock does it, released at commit.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))


def _add_missing_columns(connection: Connection) -> None:
    """Add the nullable columns of `_ADDED_COLUMNS` that an older database lacks."""
    inspector = inspect(connection)
    for table_name, column_names in _ADDED_COLUMNS.items():
        present = {column["name"] for column in inspector.get_columns(table_name)}
        for name in column_names:
            if name not in present:
                column = Base.metadata.tables[table_name].c[name]
                column_type = column.type.compile(dialect=connection.dialect)
                connection.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {name} {column_type}")


_JUDGMENT_COUNT_TRIGGERS = {
    # SQLite: one trigger per event. (UPDATE OF item_id: no writer moves a judgment, but then the counts stay
    # right too.)
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS judgments_count_insert AFTER INSERT ON judgments BEGIN "
        "UPDATE items SET num_judgments = num_judgments + 1 WHERE id = NEW.item_id; END",
        "CREATE TRIGGER IF NOT EXISTS judgments_count_delete AFTER DELETE ON judgments BEGIN "
        "UPDATE items SET num_judgments = num_judgments - 1 WHERE id = OLD.item_id; END",
        "CREATE TRIGGER IF NOT EXISTS judgments_count_move AFTER UPDATE OF item_id ON judgments BEGIN "
        "UPDATE items SET num_judgments = num_judgments - 1 WHERE id = OLD.item_id; "
        "UPDATE items SET num_judgments = num_judgments + 1 WHERE id = NEW.item_id; END",
    ],
    # PostgreSQL: a trigger function; the trigger is created when missing (`_add_judgment_counts`).
    "postgresql": [
        "CREATE OR REPLACE FUNCTION illume_count_judgments() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF TG_OP IN ('UPDATE', 'DELETE') THEN "
        "UPDATE items SET num_judgments = num_judgments - 1 WHERE id = OLD.item_id; END IF; "
        "IF TG_OP IN ('UPDATE', 'INSERT') THEN "
        "UPDATE items SET num_judgments = num_judgments + 1 WHERE id = NEW.item_id; END IF; "
        "RETURN NULL; END $$",
        "CREATE TRIGGER judgments_count AFTER INSERT OR DELETE OR UPDATE OF item_id ON judgments "
        "FOR EACH ROW EXECUTE FUNCTION illume_count_judgments()",
    ],
}
"""Keep `items.num_judgments` equal to the item's number of `judgments` rows, in the writer's transaction."""


def _add_judgment_counts(connection: Connection) -> None:
    """Bring `items.num_judgments`, its triggers and every index the tables declare to an older database.

    A store from before the column gets it (0) and then its counts, in the opening transaction (which holds
    the write lock, or on PostgreSQL the schema lock), so no judgment is missed in between. Indexes declared
    after a table was first created are created here (`create_all` only creates missing tables).
    """
    dialect = connection.dialect.name
    if "num_judgments" not in {column["name"] for column in inspect(connection).get_columns("items")}:
        connection.exec_driver_sql("ALTER TABLE items ADD COLUMN num_judgments INTEGER DEFAULT 0 NOT NULL")
        connection.exec_driver_sql(
            "UPDATE items SET num_judgments = (SELECT count(*) FROM judgments WHERE judgments.item_id = items.id)")
    statements = _JUDGMENT_COUNT_TRIGGERS.get(dialect)
    if statements is None:
        raise NotImplementedError(f"the feedback store keeps its judgment counts on SQLite and PostgreSQL, not {dialect}")
    if dialect == "postgresql":
        present = connection.scalar(sql_text(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'judgments_count' AND tgrelid = 'judgments'::regclass"))
        statements = [] if present else statements
    for statement in statements:
        connection.exec_driver_sql(statement)
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            index.create(connection, checkfirst=True)





def _check_is_store(connection: Connection, url: str, create: bool) -> None:
    """Refuse a database that is not a feedback store, or one a newer illume wrote, before anything is written.

    A database with the store's tables is one (a store from before `illume_meta` included); an empty one
    becomes one (with `create`); a SQLite file holding other tables, or a database holding tables of the
    store's names but not its core, is something else and is left alone.
    """
    tables = set(inspect(connection).get_table_names())
    if MetaRow.__tablename__ in tables:
        version = connection.scalar(select(MetaRow.value).where(MetaRow.key == "schema_version"))
        if version is not None and int(version) > SCHEMA_VERSION:
            raise StoreError(f"{url} was written by a newer illume (store schema {version}; this illume reads up "
                             f"to {SCHEMA_VERSION}): upgrade illume to open it")
        return
    if CORE_TABLES <= tables:
        return
    ours = tables & set(Base.metadata.tables)
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