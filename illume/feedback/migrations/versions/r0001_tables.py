"""The tables a store written before these migrations may lack, as illume 68697c1 declared them.

A store of the first release has `rounds`, `items`, `candidates`, `judgments` and `decisions`; later releases
added `annotators`, `judgment_revisions`, `leases`, `accounts` and `illume_meta`. Each missing one is created
(its indexes come with r0003); present ones are left as they are. New stores never run this: they are made from
the declarations and stamped with the newest revision.

Revision ID: r0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "r0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    if "annotators" not in present:
        op.create_table(
            "annotators",
            sa.Column("name", sa.String(255), primary_key=True),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("created_at", _When, nullable=False),
        )
    if "judgment_revisions" not in present:
        op.create_table(
            "judgment_revisions",
            sa.Column("id", _Id, primary_key=True),
            sa.Column("judgment_id", _Id, sa.ForeignKey("judgments.id"), nullable=False),
            sa.Column("none_fit", sa.Boolean, nullable=False),
            sa.Column("accepted", sa.JSON, nullable=False),
            sa.Column("seconds", sa.Float),
            sa.Column("judged_at", _When, nullable=False),
            sa.Column("revised_at", _When, nullable=False),
            sa.Column("correction", sa.Text),
        )
    if "leases" not in present:
        op.create_table(
            "leases",
            sa.Column("item_id", _Id, sa.ForeignKey("items.id"), primary_key=True),
            sa.Column("annotator", sa.String(255), primary_key=True),
            sa.Column("expires_at", _When, nullable=False),
            sa.Column("shown_order", sa.JSON),
            sa.Column("created_at", _When, nullable=False),
        )
    if "accounts" not in present:
        op.create_table(
            "accounts",
            sa.Column("name", sa.String(255), primary_key=True),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("created_at", _When, nullable=False),
            sa.Column("revoked_at", _When),
        )
    if "illume_meta" not in present:
        op.create_table(
            "illume_meta",
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text, nullable=False),
        )


def downgrade() -> None:
    raise NotImplementedError("the feedback store is never downgraded")
