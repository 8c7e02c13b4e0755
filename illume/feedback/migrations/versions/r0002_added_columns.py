"""The nullable columns added after the first release, added to a store that lacks them (ALTER TABLE ... ADD COLUMN).

Revision ID: r0002
Revises: r0001
"""

import sqlalchemy as sa
from alembic import op

revision = "r0002"
down_revision = "r0001"
branch_labels = None
depends_on = None

ADDED_COLUMNS = {
    "judgments": {"updated_at": sa.DateTime(timezone=True), "correction": sa.Text()},
    "decisions": {"position_shown": sa.Integer()},
    "items": {"question": sa.Text(), "priority": sa.Float()},
    "candidates": {"model": sa.String(255)},
    "judgment_revisions": {"correction": sa.Text()},
}
"""Table -> its columns added since the first release, with their types."""


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table_name, columns in ADDED_COLUMNS.items():
        present = {column["name"] for column in inspector.get_columns(table_name)}
        for name, column_type in columns.items():
            if name not in present:
                op.add_column(table_name, sa.Column(name, column_type))


def downgrade() -> None:
    raise NotImplementedError("the feedback store is never downgraded")
