"""The feedback store's tables: the ORM rows every other module of the package reads and writes.

Tables: `illume_meta` (facts about the store: its schema version), `rounds` (one per round: when sampled/trained,
val metrics), `items` (one per (round, example, split): the question, the prompt and answer the candidates
continue), `candidates` (distinct rationales of an item, in the order drawn), `annotators` (every name that judged,
with its kind: person, simulated, reward or judge; `illume.data.records.ANNOTATOR_KINDS`), `judgments` (one per
annotator per item: the current version), `judgment_revisions` (the earlier versions of revised judgments),
`decisions` (one per candidate shown in a judgment: accepted or not, and where the page showed it), `leases` (items
the annotation page handed to a person and holds for them until their judgment or a timeout) and `accounts`
(people with their own link to the page, `illume annotators add`: name, role, a hash of the token, when revoked).

Assumptions, up front:
- The same rows on SQLite and PostgreSQL: ids are SQLite's 64-bit rowid or a BIGINT, timestamps come back as
  timezone-aware UTC on both (`_UTCDateTime`).
- Constraint and index names follow `_NAMING`, so that migrations (`illume.feedback.migrations`) can address them.
- An annotator's kind is data: the first judgment by a name registers (name, kind) in the same transaction and a
  later write under that name with another kind is refused (`illume.feedback.writes`). Whether a judgment counts
  as people's is read from the kind, never from the name.
- Changing a table here needs a migration (illume/feedback/migrations/versions/) that brings older stores to it:
  a new store is made from these declarations and stamped with the newest migration.
"""

from __future__ import annotations

from datetime import datetime, timezone
from numbers import Integral
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.schema import DDL

from illume.data.records import ANNOTATOR_KINDS

# Integer on SQLite (its INTEGER PRIMARY KEY is the 64-bit rowid and autoincrements), BIGINT elsewhere.
_Id = BigInteger().with_variant(Integer, "sqlite")
# Written to the table and constraint names so that later migrations (Alembic) can address them.
_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
_MAX_ROW_ID = 2**63 - 1


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the offset; it is put back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        # PostgreSQL returns timestamptz in the session's time zone (the server's, e.g. local time): UTC
        # like every other backend, so that what readers print and export does not depend on the server.
        return value.astimezone(timezone.utc) if value is not None else None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class RoundRow(Base):
    """One ILLUME round."""

    __tablename__ = "rounds"

    round_idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utc_now)
    sampled_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    trained_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ItemRow(Base):
    """One example in one round and split: what its candidates continue."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("round_idx", "example_id", "split"),
        # The annotation page's hand-out: a round's items with fewer judgments than wanted, in hand-out order,
        # found without reading the round's complete items (illume.feedback.queue).
        Index("ix_items_handout", "round_idx", "split", "num_judgments", "priority", "id"),
        Index("ix_items_round", "round_idx", "split", "id"),  # a round's first and last item id
    )

    id: Mapped[int] = mapped_column(_Id, primary_key=True)
    round_idx: Mapped[int] = mapped_column(ForeignKey("rounds.round_idx"))
    example_id: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    predicted_answer: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    image_ref: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utc_now)
    question: Mapped[str | None] = mapped_column(Text)
    """The example's question as asked (what the annotation page shows); None in stores written before it
    was kept, or when the caller did not pass it."""
    priority: Mapped[float | None] = mapped_column(Float)
    """Hand-out rank on the annotation page (`annotate.order`): lower first; None: after the ranked items, in
    the order added (`set_priorities`)."""
    num_judgments: Mapped[int] = mapped_column(Integer, nullable=False, server_default=sql_text("0"))
    """How many `judgments` rows the item has: kept by the database itself (a trigger on `judgments`, see
    `JUDGMENT_COUNT_TRIGGERS`), whoever writes, so that the annotation page finds open items and counts a
    round's progress without counting judgments per request."""

    candidates: Mapped[list[CandidateRow]] = relationship(order_by="CandidateRow.position")


class CandidateRow(Base):
    """One distinct rationale of an item."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("item_id", "text"),)

    id: Mapped[int] = mapped_column(_Id, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    text: Mapped[str] = mapped_column(Text)
    temperature: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    sample_idx: Mapped[int] = mapped_column(Integer)
    logprob: Mapped[float] = mapped_column(Float)
    position: Mapped[int] = mapped_column(Integer)
    """Order drawn among the item's distinct candidates (0..)."""
    model: Mapped[str | None] = mapped_column(String(255))
    """Which model wrote it (`Candidate.model`); NULL in a store from before pools: the policy."""


class JudgmentRow(Base):
    """One annotator's verdict on one item."""

    __tablename__ = "judgments"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator"),
        Index("ix_judgments_annotator", "annotator", "item_id"),  # one person's judgments (the page's progress)
    )

    id: Mapped[int] = mapped_column(_Id, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator: Mapped[str] = mapped_column(String(255))
    """Who judged: a person's name, "simulated:rouge_l>=0.7", "reward", ..."""
    none_fit: Mapped[bool] = mapped_column(Boolean)
    seconds: Mapped[float | None] = mapped_column(Float)
    """Time spent on the item, when known."""
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utc_now)
    client_token: Mapped[str | None] = mapped_column(String(255), unique=True)
    """Set by a client (the annotation page) so that a resubmitted form is stored once."""
    updated_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    """When the annotator last revised the judgment (`replace_judgment`); None if never."""
    correction: Mapped[str | None] = mapped_column(Text)
    """A rationale the annotator wrote because none of the candidates fit (`annotate.corrections`); with it
    the judgment is a "none fits" whose text counts as accepted (`illume.feedback.verdicts`, rule 8)."""


class DecisionRow(Base):
    """Accepted or not, for one candidate shown in one judgment."""

    __tablename__ = "decisions"

    judgment_id: Mapped[int] = mapped_column(ForeignKey("judgments.id"), primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id"), primary_key=True, index=True)
    accepted: Mapped[bool] = mapped_column(Boolean)
    position_shown: Mapped[int | None] = mapped_column(Integer)
    """Place (0..) of the candidate in the shuffled list the annotator saw; None when not recorded."""


class LeaseRow(Base):
    """An item the annotation page handed to an annotator, held for them until `expires_at`.

    While a lease is live it takes one of the item's `annotations_per_item` slots; the annotator's judgment
    deletes it, and an expired one gives the slot back to the pool (a browser that went away).
    """

    __tablename__ = "leases"
    __table_args__ = (Index("ix_leases_annotator", "annotator", "expires_at"),)  # a person's own leases

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    annotator: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(_UTCDateTime(), index=True)
    shown_order: Mapped[list[int] | None] = mapped_column(JSON)
    """Candidate ids in the order the page shows them (shuffled once per lease)."""
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utc_now)


class AnnotatorRow(Base):
    """Who judges and what it is (`illume.data.records.ANNOTATOR_KINDS`); registered by its first judgment."""

    __tablename__ = "annotators"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    """As in `judgments.annotator`."""
    kind: Mapped[str] = mapped_column(String(16))
    """person, simulated, reward or judge; never changes."""
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utc_now)


class JudgmentRevisionRow(Base):
    """An earlier version of a judgment, copied here when the annotator revised it (`replace_judgment`).

    The `judgments` row always holds the current version; readers see only that one.
    """

    __tablename__ = "judgment_revisions"

    id: Mapped[int] = mapped_column(_Id, primary_key=True)
    judgment_id: Mapped[int] = mapped_column(ForeignKey("judgments.id"), index=True)
    none_fit: Mapped[bool] = mapped_column(Boolean)
    accepted: Mapped[list[int]] = mapped_column(JSON)
    """Ids of the candidates this version accepted, ascending."""
    seconds: Mapped[float | None] = mapped_column(Float)
    """Time spent on the item up to this version."""
    judged_at: Mapped[datetime] = mapped_column(_UTCDateTime())
    """When this version was written (the judgment's `updated_at`, or its `created_at` for the first)."""
    revised_at: Mapped[datetime] = mapped_column(_UTCDateTime())
    """When it was replaced by the next version."""
    correction: Mapped[str | None] = mapped_column(Text)
    """The rationale this version wrote, if any."""


ACCOUNT_ROLES = ("annotator", "admin")
"""annotator: judges on the page, sees only their own work; admin: also the admin page (progress, agreement)."""


class AccountRow(Base):
    """A person who may use the annotation page with their own link (`illume annotators add`).

    Only a hash of the link's token is stored. Once a store has any account (even a revoked one), the page
    takes the annotator from the token and nothing else gets in (`illume.annotate.server`).
    """

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    """The annotator name their judgments are stored under (`judgments.annotator`)."""
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the token, hex (see `token_hash`)."""
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    """When the link was revoked; the token stops working at once."""


class MetaRow(Base):
    """Facts about the store itself: `schema_version` (the `SCHEMA_VERSION` of the newest illume that opened
    it), so that an older illume refuses a store a newer one changed instead of misreading it."""

    __tablename__ = "illume_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


JUDGMENT_COUNT_TRIGGERS = {
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
    # PostgreSQL: a trigger function and its trigger.
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
"""Keep `items.num_judgments` equal to the item's number of `judgments` rows, in the writer's transaction: created
with the `judgments` table (`Base.metadata.create_all`); stores from before them get them from a migration."""
for _dialect, _statements in JUDGMENT_COUNT_TRIGGERS.items():
    for _statement in _statements:
        event.listen(JudgmentRow.__table__, "after_create", DDL(_statement).execute_if(dialect=_dialect))


SCHEMA_VERSION = 1
"""The store layout this code reads and writes (`illume_meta.schema_version`, which illume before the migrations
of `illume.feedback.migrations` compared): bump it when a change would make such an illume misread a store. The
layout itself is the newest migration (`alembic_version`)."""
CORE_TABLES = frozenset({"rounds", "items", "candidates", "judgments", "decisions"})
"""The tables every feedback store has had since the first release (one written before `illume_meta` existed
is recognised by them)."""


def is_row_id(value: object) -> bool:
    """Whether `value` can be a row id (a positive 64-bit integer): what the page's ids are checked with."""
    return isinstance(value, Integral) and not isinstance(value, bool) and 0 < value <= _MAX_ROW_ID


def check_kind(kind: str) -> None:
    """ValueError unless `kind` is one of `ANNOTATOR_KINDS`."""
    if kind not in ANNOTATOR_KINDS:
        raise ValueError(f"annotator kind must be one of {ANNOTATOR_KINDS}, got {kind!r}")


