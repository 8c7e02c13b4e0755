"""Register the annotators of a store written before the `annotators` table existed.

Each name found in `judgments` but not in `annotators` gets the kind the old code implied from the name:
"reward..." -> reward, "simulated..." -> simulated, anything else -> person. This is the only place a name says
anything about a kind; every later write registers its kind explicitly.

Revision ID: r0004
Revises: r0003
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "r0004"
down_revision = "r0003"
branch_labels = None
depends_on = None

_judgments = sa.table("judgments", sa.column("annotator"))
_annotators = sa.table("annotators", sa.column("name"), sa.column("kind"),
                       sa.column("created_at", sa.DateTime(timezone=True)))


def upgrade() -> None:
    unregistered = (
        sa.select(_judgments.c.annotator).distinct()
        .where(~sa.select(_annotators.c.name).where(_annotators.c.name == _judgments.c.annotator).exists())
    )
    names = list(op.get_bind().scalars(unregistered))
    if names:
        now = datetime.now(timezone.utc)
        op.bulk_insert(_annotators, [
            {"name": name, "kind": _implied_kind(name), "created_at": now} for name in sorted(names)
        ])


def _implied_kind(name: str) -> str:
    """The kind an annotator name implied before kinds were stored."""
    if name.startswith("reward"):
        return "reward"
    if name.startswith("simulated"):
        return "simulated"
    return "person"


def downgrade() -> None:
    raise NotImplementedError("the feedback store is never downgraded")
