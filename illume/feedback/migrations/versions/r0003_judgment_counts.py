"""`items.num_judgments`, the triggers that keep it, and the indexes declared after a table was first created.

A store from before the column gets it (0) and then its counts, in the opening transaction (which holds the write
lock, or on PostgreSQL the schema lock), so no judgment is missed in between; triggers and indexes are created
where missing. The triggers' SQL is a copy of `illume.feedback.schema.JUDGMENT_COUNT_TRIGGERS` as it was at this
revision, on purpose: a migration must do what it did when it was written, whatever the schema becomes later.

Revision ID: r0003
Revises: r0002
"""

import sqlalchemy as sa
from alembic import op

revision = "r0003"
down_revision = "r0002"
branch_labels = None
depends_on = None

TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS judgments_count_insert AFTER INSERT ON judgments BEGIN "
        "UPDATE items SET num_judgments = num_judgments + 1 WHERE id = NEW.item_id; END",
        "CREATE TRIGGER IF NOT EXISTS judgments_count_delete AFTER DELETE ON judgments BEGIN "
        "UPDATE items SET num_judgments = num_judgments - 1 WHERE id = OLD.item_id; END",
        "CREATE TRIGGER IF NOT EXISTS judgments_count_move AFTER UPDATE OF item_id ON judgments BEGIN "
        "UPDATE items SET num_judgments = num_judgments - 1 WHERE id = OLD.item_id; "
        "UPDATE items SET num_judgments = num_judgments + 1 WHERE id = NEW.item_id; END",
    ],
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
"""As `illume.feedback.schema.JUDGMENT_COUNT_TRIGGERS` was at this revision."""

INDEXES = {
    "ix_items_handout": ("items", ["round_idx", "split", "num_judgments", "priority", "id"]),
    "ix_items_round": ("items", ["round_idx", "split", "id"]),
    "ix_judgments_annotator": ("judgments", ["annotator", "item_id"]),
    "ix_decisions_candidate_id": ("decisions", ["candidate_id"]),
    "ix_leases_annotator": ("leases", ["annotator", "expires_at"]),
    "ix_leases_expires_at": ("leases", ["expires_at"]),
    "ix_judgment_revisions_judgment_id": ("judgment_revisions", ["judgment_id"]),
}
"""Every index the tables declared at this revision: name -> (table, columns)."""


def upgrade() -> None:
    connection = op.get_bind()
    inspector = sa.inspect(connection)
    if "num_judgments" not in {column["name"] for column in inspector.get_columns("items")}:
        op.execute("ALTER TABLE items ADD COLUMN num_judgments INTEGER DEFAULT 0 NOT NULL")
        op.execute(
            "UPDATE items SET num_judgments = (SELECT count(*) FROM judgments WHERE judgments.item_id = items.id)")
    statements = TRIGGERS[connection.dialect.name]
    if connection.dialect.name == "postgresql" and connection.scalar(sa.text(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'judgments_count' AND tgrelid = 'judgments'::regclass")):
        statements = []
    for statement in statements:
        op.execute(statement)
    for name, (table_name, columns) in INDEXES.items():
        if name not in {index["name"] for index in inspector.get_indexes(table_name)}:
            op.create_index(name, table_name, columns)


def downgrade() -> None:
    raise NotImplementedError("the feedback store is never downgraded")
