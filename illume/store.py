"""The feedback store: every sampled candidate and every judgment of a run, in a real database.

It is the single source of truth of an ILLUME run: a resumed run re-reads what was sampled
(`candidate_sets`), which items still wait for a critic (`unjudged_items`) and every judgment
(`judged_items`, from which `illume.feedback.verdicts` decides what was accepted); reward-model pairs, DPO
pairs and exports read it too.

Assumptions, up front:
- One SQLAlchemy URL; a plain path means a SQLite file (the run directory's `feedback.db`). Any other URL
  (PostgreSQL for teams) works through the same code; only the SQLite connection settings below are special.
- Every public write method is ONE transaction: after kill -9 at any point the store holds either all of
  a call's rows or none of them. Writes are idempotent (re-adding items skips existing ones, a second
  judgment by the same annotator or with a used `client_token` is refused), so a resumed run just repeats
  the call it was killed in.
- Several annotators may judge one item, each once (unique (item, annotator)); many processes and threads
  may write at once. On SQLite, writes start with `BEGIN IMMEDIATE` (one writer at a time, waiting up to
  the busy timeout instead of failing with "database is locked"), and WAL lets readers run beside them;
  threads of one process queue for that lock on a lock of their own first (`_process_write_lock`).
  On PostgreSQL (READ COMMITTED) writers run at once: the unique constraints decide which of two equal
  judgments is stored (the other is answered as a repeat), a new round or annotator is inserted in a
  savepoint, the annotation queue locks an item's row (SELECT ... FOR UPDATE) before counting its free
  slots, and openers take turns creating tables (`_lock_schema`). Timestamps come back in UTC on both.
- A `FeedbackStore` may be shared across threads (each call opens its own session).
- On PostgreSQL a write that loses a race (serialization failure, deadlock) is run again, up to
  `MAX_ATTEMPTS` times with a jittered back-off (`retry_on_conflict`), instead of failing its caller.
- Opening checks before anything is written: the database is reachable, its driver installed, it is a
  feedback store (or empty), and no newer illume wrote it (`illume_meta.schema_version` against
  `SCHEMA_VERSION`); each failure is one `StoreError` line. Readers (`create=False`: status, exports, the
  annotation page) never make a store where there is none.
- One writer per run: `writer_lock` (a PostgreSQL advisory lock held by the command that writes the run's
  rounds) beside the run folder's own lock (`illume.run_folder`).

Tables: `illume_meta` (facts about the store: its schema version), `rounds` (one per round: when sampled/trained, val metrics), `items` (one per (round, example,
split): the question, the prompt and answer the candidates continue), `candidates` (distinct rationales of
an item, in the order drawn), `annotators` (every name that judged, with its kind: person, simulated, reward
or judge; `illume.data.records.ANNOTATOR_KINDS`), `judgments` (one per annotator per item: the current
version), `judgment_revisions` (the earlier versions of revised judgments), `decisions` (one per candidate
shown in a judgment: accepted or not, and where the page showed it), `leases` (items the annotation page
handed to a person and holds for them until their judgment or a timeout) and `accounts` (people with their
own link to the page, `illume annotators add`: name, role, a hash of the token, when revoked).

An annotator's kind is data: the first judgment by a name registers (name, kind) in the same transaction and
a later write under that name with another kind is refused. Whether a judgment counts as people's is read
from the kind, never from the name.

Public reads for every consumer (trainers, reward model, exports, status): `judged_items` (items with their
candidates and judgments), `num_judgments`, `annotator_kinds`, `judgment_history`, `judgments_table`. The
annotation page's hand-out protocol (leases, submissions, revisions, progress) is
`illume.feedback.queue.AnnotationQueue`, over this store's tables.

Older databases open: columns added after the first release (`judgments.updated_at`,
`decisions.position_shown`, `items.question`) are added when the store is opened (ALTER TABLE ... ADD
COLUMN, nullable), new tables are created, and the names of a database written before `annotators` existed
are registered once, with the kind the old code implied from the name (`_register_older_annotators`).
`items.num_judgments` (each item's judgment count, kept by a trigger on `judgments`) is added and counted,
and indexes declared since are created (`_add_judgment_counts`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import random
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from numbers import Integral
from pathlib import Path
from typing import Any, TypeVar

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
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import StaticPool

from illume.data.records import ANNOTATOR_KINDS, POLICY_MODEL, Candidate, CandidateSet
from illume.run_folder import RunInUse

T = TypeVar("T")
SPLITS = ("train", "val", "test")
SQLITE_BUSY_TIMEOUT_MS = 60_000
"""How long a SQLite writer waits for another one before "database is locked"."""

# Integer on SQLite (its INTEGER PRIMARY KEY is the 64-bit rowid and autoincrements), BIGINT elsewhere.
_Id = BigInteger().with_variant(Integer, "sqlite")
# Written to the table and constraint names so that later migrations (Alembic) can address them.
_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
_MAX_IN = 500  # look items up with IN (...) below this many ids, else read the whole round
_JUDGED_CHUNK = 2_000  # items per range read by `judged_items`


def _now() -> datetime:
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
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)
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
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)
    question: Mapped[str | None] = mapped_column(Text)
    """The example's question as asked (what the annotation page shows); None in stores written before it
    was kept, or when the caller did not pass it."""
    priority: Mapped[float | None] = mapped_column(Float)
    """Hand-out rank on the annotation page (`annotate.order`): lower first; None: after the ranked items, in
    the order added (`set_priorities`)."""
    num_judgments: Mapped[int] = mapped_column(Integer, nullable=False, server_default=sql_text("0"))
    """How many `judgments` rows the item has: kept by the database itself (a trigger on `judgments`, see
    `_JUDGMENT_COUNT_TRIGGERS`), whoever writes, so that the annotation page finds open items and counts a
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
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)
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
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)


class AnnotatorRow(Base):
    """Who judges and what it is (`illume.data.records.ANNOTATOR_KINDS`); registered by its first judgment."""

    __tablename__ = "annotators"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    """As in `judgments.annotator`."""
    kind: Mapped[str] = mapped_column(String(16))
    """person, simulated, reward or judge; never changes."""
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)


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
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    """When the link was revoked; the token stops working at once."""


class MetaRow(Base):
    """Facts about the store itself: `schema_version` (the `SCHEMA_VERSION` of the newest illume that opened
    it), so that an older illume refuses a store a newer one changed instead of misreading it."""

    __tablename__ = "illume_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


SCHEMA_VERSION = 1
"""The store layout this code reads and writes; bump it when a change would make older code misread a store."""
CORE_TABLES = frozenset({"rounds", "items", "candidates", "judgments", "decisions"})
"""The tables every feedback store has had since the first release (one written before `illume_meta` existed
is recognised by them)."""


_ADDED_COLUMNS = {"judgments": ("updated_at", "correction"), "decisions": ("position_shown",),
                  "items": ("question", "priority"), "candidates": ("model",), "judgment_revisions": ("correction",)}
"""Columns added after the first release: `FeedbackStore` adds them to an older database."""


JudgmentInput = tuple[str, Sequence[int | str], bool, float | None]
"""(example_id, accepted candidate ids or texts, none_fit, seconds) for `FeedbackStore.add_judgments`."""


# -------------------------------------------------------------------- what `judged_items` reads


@dataclass(frozen=True)
class CandidateInfo:
    """One candidate of a judged item."""

    id: int
    text: str
    temperature: float
    seed: int
    sample_idx: int
    logprob: float
    position: int
    """Order drawn among the item's distinct candidates (0..)."""
    model: str = POLICY_MODEL
    """Which model wrote it (`Candidate.model`)."""


@dataclass(frozen=True)
class JudgmentInfo:
    """One annotator's (current) judgment of an item."""

    id: int
    annotator: str
    annotator_kind: str
    """The annotator's kind (`illume.data.records.ANNOTATOR_KINDS`), as registered in the store."""
    none_fit: bool
    seconds: float | None
    created_at: datetime
    client_token: str | None
    decisions: dict[int, bool] = field(hash=False, compare=False)
    """Candidate id -> accepted, for every candidate shown."""
    updated_at: datetime | None = None
    """When the annotator last revised the judgment; None if never (or not recorded)."""
    positions_shown: dict[int, int | None] = field(default_factory=dict, hash=False, compare=False)
    """Candidate id -> its place in the (shuffled) list the annotator saw, when recorded."""
    correction: str | None = None
    """The rationale the annotator wrote because none fit (then `none_fit` is True), if any."""


@dataclass
class JudgedItem:
    """One example in one round and split, with its candidates and every (current) judgment of it.

    What was accepted overall (several annotators, several rounds) is decided by `illume.feedback.verdicts`,
    not here: this is only what the store holds.
    """

    round_idx: int
    split: str
    example_id: str
    prompt: str
    answer: str
    predicted_answer: str
    seed: int
    image_ref: str | None
    candidates: list[CandidateInfo]
    """In drawn order."""
    judgments: list[JudgmentInfo]
    """In the order stored (judgment id)."""
    question: str | None = None
    """The question as asked; None for items stored without it (older stores)."""
    item_id: int | None = None
    """The item's row id in the store (`judgment_history`, the admin page); None for items built elsewhere."""

    def accepting(self, candidate_id: int) -> list[JudgmentInfo]:
        """The judgments that accepted the candidate."""
        return [j for j in self.judgments if j.decisions.get(candidate_id) is True]

    def rejecting(self, candidate_id: int) -> list[JudgmentInfo]:
        """The judgments that were shown the candidate and did not accept it."""
        return [j for j in self.judgments if j.decisions.get(candidate_id) is False]


RETRIED_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock"}
"""PostgreSQL errors that mean "this transaction lost a race, run it again" (its docs, chapter 13.4)."""
MAX_ATTEMPTS = 5


def retry_on_conflict(method: Callable[..., T]) -> Callable[..., T]:
    """Run a write method (ONE transaction, rolled back on failure) again when the database aborted it for a
    serialization failure or a deadlock, up to `MAX_ATTEMPTS` times with a jittered back-off, instead of
    failing the request; any other error, and the last attempt's, propagates."""

    @functools.wraps(method)
    def retried(*args: Any, **kwargs: Any) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return method(*args, **kwargs)
            except DBAPIError as error:
                if attempt == MAX_ATTEMPTS or _sqlstate(error) not in RETRIED_SQLSTATES:
                    raise
                # Jitter keeps the two losers of a deadlock from meeting again at the same moment.
                time.sleep(random.uniform(0, 0.01 * 2 ** attempt))
        raise AssertionError("unreachable")

    return retried


def _sqlstate(error: DBAPIError) -> str | None:
    """The SQLSTATE code of a driver error (psycopg 3: `sqlstate`, psycopg2: `pgcode`), None off PostgreSQL."""
    return getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)


class StoreError(RuntimeError):
    """A feedback store that cannot be opened or used: the message says which, why, and what to do."""


class FeedbackStore:
    """Candidates and judgments of an ILLUME run over SQLAlchemy (SQLite file by default).

    Args:
        url_or_path: A SQLAlchemy URL (`sqlite:///runs/x/feedback.db`, `postgresql+psycopg://...`) or a
            path to a SQLite file (its folder is created). Tables are created when missing.
        create: Make a new store where there is none (the loop). False: only open an existing store (status,
            export, the annotation page), so that a wrong path fails instead of leaving an empty database.

    Raises:
        StoreError: Nothing reachable at the URL, its driver is not installed, the file or database is not a
            feedback store (or, with create=False, there is none), or a newer illume wrote it.
    """

    def __init__(self, url_or_path: str | Path, *, create: bool = True) -> None:
        url = _to_url(url_or_path, create)
        self._engine = _make_engine(url)
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        # Same pool; the option makes `_sqlite_begin` take the write lock at BEGIN (ignored off SQLite).
        write_engine = self._engine.execution_options(illume_begin="IMMEDIATE")
        self._write = _WriteSessions(sessionmaker(write_engine, expire_on_commit=False), _process_write_lock(
            self._engine.url))
        # Under the write lock: concurrent openers don't race. Whatever fails here (nothing reachable, not a
        # store, a newer store) fails as one `StoreError` before this opener wrote anything.
        with _opening(self.url), write_engine.begin() as connection:
            _lock_schema(connection)
            _check_is_store(connection, self.url, create)
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)
            _add_judgment_counts(connection)
            _register_older_annotators(connection)
            _record_schema_version(connection)

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine: for tools that fill or time the store at scale (scripts/store_history.py,
        scripts/bench_store.py), not for reading or writing feedback (the methods here do that)."""
        return self._engine

    @property
    def read_sessions(self) -> sessionmaker[Session]:
        """`with store.read_sessions() as session:` a session for the feedback package's own queries
        (illume.feedback.queue, illume.feedback.figures), as the store's reads use."""
        return self._read

    @property
    def write_sessions(self) -> _WriteSessions:
        """`with store.write_sessions.begin() as session:` one write transaction under the store's write lock
        (SQLite: taken at BEGIN), as the store's writes use; for the annotation queue's leases and judgments."""
        return self._write

    def close(self) -> None:
        """Close the pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()

    @contextlib.contextmanager
    def writer_lock(self, holder: str) -> Iterator[None]:
        """Hold the store's one-writer lock for the block: a second command that writes the run's rounds to this
        store refuses (`illume.run_folder` locks the run folder; this covers a store that several folders or
        machines share).

        On PostgreSQL, a session-level advisory lock on a connection of its own, named `holder`
        (application_name), so a refused command can say who holds it; the server releases it when that
        connection ends, also when the process is killed. On SQLite nothing: the database is a file of its run
        folder, whose lock covers it.

        Raises:
            RunInUse: Another session holds it; the message names that session's `holder`.
        """
        if self._engine.dialect.name != "postgresql":
            yield
            return
        with _opening(self.url):
            connection = self._engine.connect()
        connection.detach()  # its own session, closed at the end (never back to the pool with the lock held)
        try:
            with _opening(self.url):
                connection.execute(select(func.set_config("application_name", holder[:63], False)))
                held = connection.scalar(select(func.pg_try_advisory_lock(_WRITER_LOCK)))
                other = None if held else connection.scalar(sql_text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
                    {"high": _WRITER_LOCK >> 32, "low": _WRITER_LOCK & 0xFFFFFFFF})
                connection.commit()
            if not held:
                raise RunInUse(f"the feedback store {self.url} is in use by {other or 'another session'}: wait "
                               "for it to finish or stop it (one command writes to a run at a time)")
            yield
        finally:
            connection.close()  # ends the session, and with it the lock

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- rounds

    def rounds(self) -> list[int]:
        """Indices of the rounds in the store, ascending."""
        with self._read() as session:
            return list(session.scalars(select(RoundRow.round_idx).order_by(RoundRow.round_idx)))

    @retry_on_conflict
    def mark_sampled(self, round_idx: int) -> None:
        """Record that every candidate of the round is stored (the first call's time is kept)."""
        with self._write.begin() as session:
            row = _get_or_add_round(session, round_idx)
            row.sampled_at = row.sampled_at or _now()

    def is_sampled(self, round_idx: int) -> bool:
        """Whether `mark_sampled(round_idx)` was called."""
        with self._read() as session:
            row = session.get(RoundRow, round_idx)
            return row is not None and row.sampled_at is not None

    @retry_on_conflict
    def mark_trained(self, round_idx: int) -> None:
        """Record that the round's fine-tuning finished (the first call's time is kept)."""
        with self._write.begin() as session:
            row = _get_or_add_round(session, round_idx)
            row.trained_at = row.trained_at or _now()

    @retry_on_conflict
    def set_round_metrics(self, round_idx: int, metrics: Mapping[str, Any]) -> None:
        """Store (replace) the round's val metrics / summary; values must be JSON-serialisable."""
        with self._write.begin() as session:
            _get_or_add_round(session, round_idx).metrics = dict(metrics)

    def round_status(self, round_idx: int) -> dict[str, Any]:
        """What the store knows about a round.

        Returns:
            `round_idx`, `created_at`, `sampled_at`, `trained_at` (None until marked), `metrics`,
            `num_items` (per split) and `num_judgments`.

        Raises:
            KeyError: The round is not in the store.
        """
        with self._read() as session:
            row = session.get(RoundRow, round_idx)
            if row is None:
                raise KeyError(f"round {round_idx} is not in the feedback store {self.url}")
            num_items = dict(session.execute(
                select(ItemRow.split, func.count()).where(ItemRow.round_idx == round_idx)
                .group_by(ItemRow.split)
            ).all())
            num_judgments = session.scalar(
                select(func.count()).select_from(JudgmentRow).join(ItemRow)
                .where(ItemRow.round_idx == round_idx)
            )
        return {
            "round_idx": row.round_idx, "created_at": row.created_at, "sampled_at": row.sampled_at,
            "trained_at": row.trained_at, "metrics": row.metrics, "num_items": num_items,
            "num_judgments": num_judgments,
        }

    # ---------------------------------------------------------------- candidates

    @retry_on_conflict
    def add_candidate_sets(
        self,
        round_idx: int,
        split: str,
        candidate_sets: Iterable[CandidateSet],
        image_refs: Mapping[str, str] | None = None,
        questions: Mapping[str, str] | None = None,
    ) -> int:
        """Store the items and candidates of a round in one transaction.

        Items already stored for (round, example, split) are skipped, whatever their content, so
        re-running after a crash never duplicates. A text repeated within one set is stored once.

        Args:
            round_idx: The round the candidates were sampled in.
            split: "train", "val" or "test".
            candidate_sets: The sampler's output.
            image_refs: Optional example id -> image path (or URL) for the annotation page.
            questions: Optional example id -> the question as asked (the annotation page shows it, and
                readers get it as `question`); an example missing here is stored without one.

        Returns:
            How many items were added.
        """
        _check_split(split)
        image_refs = image_refs or {}
        questions = questions or {}
        with self._write.begin() as session:
            _get_or_add_round(session, round_idx)
            seen = set(session.scalars(
                select(ItemRow.example_id).where(ItemRow.round_idx == round_idx, ItemRow.split == split)
            ))
            new_sets = []
            for candidate_set in candidate_sets:
                if candidate_set.example_id not in seen:
                    seen.add(candidate_set.example_id)
                    new_sets.append(candidate_set)
            if not new_sets:
                return 0
            item_ids = session.scalars(insert(ItemRow).returning(ItemRow.id, sort_by_parameter_order=True), [
                {"round_idx": round_idx, "example_id": s.example_id, "split": split, "prompt": s.prompt,
                 "answer": s.answer, "predicted_answer": s.predicted_answer, "seed": s.seed,
                 "image_ref": image_refs.get(s.example_id), "question": questions.get(s.example_id)}
                for s in new_sets
            ]).all()
            candidate_rows = []
            for item_id, candidate_set in zip(item_ids, new_sets):
                texts: set[str] = set()
                for candidate in candidate_set.candidates:
                    if candidate.text in texts:
                        continue
                    candidate_rows.append({
                        "item_id": item_id, "text": candidate.text, "temperature": candidate.temperature,
                        "seed": candidate.seed, "sample_idx": candidate.sample_idx,
                        "logprob": candidate.logprob, "position": len(texts), "model": candidate.model,
                    })
                    texts.add(candidate.text)
            if candidate_rows:
                session.execute(insert(CandidateRow), candidate_rows)
        return len(new_sets)

    def candidate_sets(self, round_idx: int, split: str = "train") -> list[CandidateSet]:
        """The round's candidate sets as stored, in the order they were added, candidates in drawn order."""
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        with self._read() as session:
            # Plain rows rather than ORM objects: a resumed run reads tens of thousands of items.
            items = session.execute(
                select(ItemRow.id, ItemRow.example_id, ItemRow.answer, ItemRow.predicted_answer,
                       ItemRow.prompt, ItemRow.seed).where(*in_round).order_by(ItemRow.id)
            ).all()
            candidates: dict[int, list[Candidate]] = {}
            for c in session.execute(
                select(CandidateRow.item_id, CandidateRow.text, CandidateRow.temperature, CandidateRow.seed,
                       CandidateRow.sample_idx, CandidateRow.logprob, CandidateRow.model)
                .join(ItemRow).where(*in_round).order_by(CandidateRow.item_id, CandidateRow.position)
            ):
                candidates.setdefault(c.item_id, []).append(Candidate(
                    text=c.text, temperature=c.temperature, seed=c.seed, sample_idx=c.sample_idx,
                    logprob=c.logprob, model=c.model or POLICY_MODEL,
                ))
        return [
            CandidateSet(example_id=example_id, answer=answer, predicted_answer=predicted_answer,
                         prompt=prompt, seed=seed, candidates=candidates.get(item_id, []))
            for item_id, example_id, answer, predicted_answer, prompt, seed in items
        ]

    def candidate_ids(self, round_idx: int, split: str = "train") -> dict[str, list[int]]:
        """Example id -> its candidates' ids, parallel to `candidate_sets(round_idx, split)[i].candidates`."""
        with self._read() as session:
            rows = session.execute(
                select(ItemRow.example_id, CandidateRow.id)
                .join(CandidateRow, CandidateRow.item_id == ItemRow.id)
                .where(ItemRow.round_idx == round_idx, ItemRow.split == split)
                .order_by(ItemRow.id, CandidateRow.position)
            )
            ids: dict[str, list[int]] = {}
            for example_id, candidate_id in rows:
                ids.setdefault(example_id, []).append(candidate_id)
            return ids

    # ---------------------------------------------------------------- accounts

    @retry_on_conflict
    def add_account(self, name: str, role: str = "annotator") -> str:
        """Create a person's account (or give a revoked one a new link) and return their new token.

        The token is shown once; only its hash is stored (`token_hash`).

        Raises:
            ValueError: An empty name, an unknown role, a name already active, or a name that has judged as
                something other than a person (a simulated critic, the reward model, ...).
        """
        name = name.strip() if isinstance(name, str) else name
        if not name or len(name) > 255 or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise ValueError(f"an account name must be 1-255 printable characters, got {name!r}")
        if role not in ACCOUNT_ROLES:
            raise ValueError(f"role must be one of {', '.join(ACCOUNT_ROLES)}, got {role!r}")
        token = secrets.token_urlsafe(32)
        with self._write.begin() as session:
            kind = session.scalar(select(AnnotatorRow.kind).where(AnnotatorRow.name == name))
            if kind is not None and kind != "person":
                raise ValueError(f"{name!r} has judged as {kind!r} in this store; choose another name")
            row = session.get(AccountRow, name)
            if row is not None and row.revoked_at is None:
                raise ValueError(f"{name!r} already has an active account: revoke it first for a new link")
            if row is None:
                session.add(AccountRow(name=name, role=role, token_hash=token_hash(token)))
            else:
                row.role, row.token_hash, row.revoked_at, row.created_at = role, token_hash(token), None, _now()
        return token

    @retry_on_conflict
    def revoke_account(self, name: str) -> bool:
        """Revoke a person's link at once; False if there is no active account by that name."""
        with self._write.begin() as session:
            row = session.get(AccountRow, name)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = _now()
            return True

    def accounts(self) -> list[Account]:
        """Every account, revoked ones too, by name."""
        with self._read() as session:
            return [Account(r.name, r.role, r.created_at, r.revoked_at)
                    for r in session.scalars(select(AccountRow).order_by(AccountRow.name))]

    def has_accounts(self) -> bool:
        """Whether any account was ever created (a revoked one counts: revoking everyone locks the page)."""
        with self._read() as session:
            return session.scalar(select(AccountRow.name).limit(1)) is not None

    def account_for_token(self, token: str) -> Account | None:
        """The active account whose token this is; None for an unknown or revoked token."""
        if not token:
            return None
        with self._read() as session:
            row = session.scalar(select(AccountRow).where(AccountRow.token_hash == token_hash(token)))
            if row is None or row.revoked_at is not None:
                return None
            return Account(row.name, row.role, row.created_at, row.revoked_at)

    # ---------------------------------------------------------------- judgments

    @retry_on_conflict
    def set_priorities(self, round_idx: int, priorities: Mapping[str, float | None], split: str = "train") -> None:
        """Set the hand-out rank (`items.priority`, lower first) of the round's items named by example id, in one
        transaction; items not named keep theirs. The annotation page hands items out in this order."""
        with self._write.begin() as session:
            ids = dict(session.execute(select(ItemRow.example_id, ItemRow.id).where(
                ItemRow.round_idx == round_idx, ItemRow.split == split)).all())
            rows = [{"id": ids[example_id], "priority": priority} for example_id, priority in priorities.items()
                    if example_id in ids]
            if rows:
                session.execute(update(ItemRow), rows)

    def unjudged_items(self, round_idx: int, annotator: str, split: str = "train") -> list[str]:
        """Example ids of the round's items that `annotator` has not judged yet, in the order added."""
        judged = select(JudgmentRow.id).where(
            JudgmentRow.item_id == ItemRow.id, JudgmentRow.annotator == annotator
        )
        with self._read() as session:
            return list(session.scalars(
                select(ItemRow.example_id)
                .where(ItemRow.round_idx == round_idx, ItemRow.split == split, ~judged.exists())
                .order_by(ItemRow.id)
            ))

    @retry_on_conflict
    def add_judgment(
        self,
        round_idx: int,
        example_id: str,
        annotator: str,
        accepted: Sequence[int | str],
        none_fit: bool = False,
        seconds: float | None = None,
        split: str = "train",
        client_token: str | None = None,
        *,
        kind: str = "person",
        correction: str | None = None,
    ) -> bool:
        """Store one annotator's judgment of one item, with a decision for every candidate of the item.

        Args:
            round_idx: The item's round.
            example_id: The item's example.
            annotator: Who judged ("simulated:rouge_l>=0.7", a person's name, "reward", ...).
            accepted: The accepted candidates, by id (`candidate_ids`) or by text; the others are rejected.
            none_fit: The annotator's explicit "none of them fits" (then `accepted` must be empty).
            seconds: Time spent on the item, when known.
            split: The item's split.
            client_token: A client's id for this submission; a second submission with it is refused.
            kind: What the annotator is (`ANNOTATOR_KINDS`); the annotator's first judgment registers it.
            correction: A rationale the annotator wrote because none fit (requires `none_fit`).

        Returns:
            True if stored; False (nothing written) if `annotator` already judged the item or
            `client_token` was used before.

        Raises:
            ValueError: Unknown item, a candidate that is not the item's, `none_fit` with accepts, an
                unknown `kind`, or a `kind` other than the one the annotator is registered with.
        """
        row = (example_id, accepted, none_fit, seconds)
        try:
            with self._write.begin() as session:
                stored = _insert_judgments(session, round_idx, split, annotator, [row], [client_token], kind,
                                           [correction])
                return stored == 1
        except IntegrityError:
            # Another writer stored the same (item, annotator) or token between our check and our
            # insert (possible off SQLite, where writes are not serialised at BEGIN).
            if self._is_duplicate(round_idx, split, example_id, annotator, client_token):
                return False
            raise

    @retry_on_conflict
    def add_judgments(
        self, round_idx: int, judgments: Iterable[JudgmentInput], annotator: str, split: str = "train",
        *, kind: str = "person",
    ) -> int:
        """Store many judgments by one annotator in one transaction (the simulated and reward critics).

        Items the annotator already judged are skipped (so a resumed critic can resend everything);
        an example repeated in `judgments` is stored once, the first time. If any row is invalid
        nothing is written.

        Args:
            round_idx: The items' round.
            judgments: (example_id, accepted candidate ids or texts, none_fit, seconds) rows.
            annotator: Who judged.
            split: The items' split.
            kind: What the annotator is (`ANNOTATOR_KINDS`): "simulated" for the simulated critic,
                "reward" for the reward model, ...

        Returns:
            How many judgments were stored.

        Raises:
            ValueError: As in `add_judgment`, for any row.
        """
        rows = list(judgments)
        with self._write.begin() as session:
            return _insert_judgments(session, round_idx, split, annotator, rows, [None] * len(rows), kind)

    def _is_duplicate(
        self, round_idx: int, split: str, example_id: str, annotator: str, client_token: str | None
    ) -> bool:
        with self._read() as session:
            by_annotator = session.scalar(
                select(func.count()).select_from(JudgmentRow).join(ItemRow).where(
                    ItemRow.round_idx == round_idx, ItemRow.split == split, ItemRow.example_id == example_id,
                    JudgmentRow.annotator == annotator,
                )
            )
            by_token = client_token is not None and session.scalar(
                select(func.count()).select_from(JudgmentRow).where(JudgmentRow.client_token == client_token)
            )
            return bool(by_annotator or by_token)

    # ---------------------------------------------------------------- reading feedback

    def round_counts(self, round_idx: int, split: str = "train") -> dict[str, int]:
        """How much of a round is judged, counted by the database (what was accepted is decided by
        illume.feedback.verdicts, not here).

        Returns:
            `items`, `judged_items` (>= 1 judgment) and `judgments` (current ones, every annotator).
        """
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        judged = select(JudgmentRow.id, JudgmentRow.item_id).join(ItemRow).where(*in_round).subquery()
        with self._read() as session:
            return {
                "items": session.scalar(select(func.count()).select_from(ItemRow).where(*in_round)),
                "judged_items": session.scalar(select(func.count(judged.c.item_id.distinct()))),
                "judgments": session.scalar(select(func.count()).select_from(judged)),
            }

    def num_judgments(
        self,
        upto_round: int | None = None,
        kinds: Collection[str] | None = None,
        round_idx: int | None = None,
    ) -> int:
        """How many (current) judgments are stored, all splits, counted by the database.

        Args:
            upto_round: Only rounds <= upto_round.
            kinds: Only judgments by annotators of these kinds (`ANNOTATOR_KINDS`; a single kind may be
                given as a string); None: every annotator.
            round_idx: Only this round.

        Raises:
            ValueError: A kind that is not one of `ANNOTATOR_KINDS`.
        """
        stmt = select(func.count()).select_from(JudgmentRow)
        if upto_round is not None or round_idx is not None:
            stmt = stmt.join(ItemRow, ItemRow.id == JudgmentRow.item_id)
            if upto_round is not None:
                stmt = stmt.where(ItemRow.round_idx <= upto_round)
            if round_idx is not None:
                stmt = stmt.where(ItemRow.round_idx == round_idx)
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            for kind in kinds:
                _check_kind(kind)
            stmt = (stmt.join(AnnotatorRow, AnnotatorRow.name == JudgmentRow.annotator)
                    .where(AnnotatorRow.kind.in_(kinds)))
        with self._read() as session:
            return session.scalar(stmt)

    def judgments_version(self) -> tuple:
        """Changes whenever a judgment is added, revised or removed (count, latest id, latest revision, leases
        aside): readers that summarise every judgment (the admin page) recompute only when it moves."""
        with self._read() as session:
            return tuple(session.execute(select(
                func.count(JudgmentRow.id), func.max(JudgmentRow.id), func.max(JudgmentRow.updated_at))).one())

    def annotator_kinds(self) -> dict[str, str]:
        """Every annotator that has judged -> its kind (`ANNOTATOR_KINDS`), by name."""
        with self._read() as session:
            return dict(session.execute(
                select(AnnotatorRow.name, AnnotatorRow.kind).order_by(AnnotatorRow.name)).all())

    def judgment_history(self, item_id: int, annotator: str) -> list[dict[str, Any]]:
        """Every version of `annotator`'s judgment of an item, oldest first, ending with the current one.

        A judgment that was never revised has one version; `AnnotationQueue.replace_judgment` adds one per
        revision. Readers of feedback (`judged_items`, ...) see only the current version.

        Returns:
            Dicts with `accepted` (candidate ids, ascending), `none_fit`, `correction` (the text written, or
            None), `seconds` (time spent up to that version), `judged_at` (when the version was written) and
            `revised_at` (when it was replaced; None for the current version); [] if the annotator has not
            judged the item.
        """
        if not _is_row_id(item_id):
            return []
        with self._read() as session:
            current = session.execute(
                select(JudgmentRow.id, JudgmentRow.none_fit, JudgmentRow.seconds, JudgmentRow.created_at,
                       JudgmentRow.updated_at, JudgmentRow.correction)
                .where(JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator)
            ).first()
            if current is None:
                return []
            revisions = session.execute(
                select(JudgmentRevisionRow.accepted, JudgmentRevisionRow.none_fit,
                       JudgmentRevisionRow.seconds, JudgmentRevisionRow.judged_at,
                       JudgmentRevisionRow.revised_at, JudgmentRevisionRow.correction)
                .where(JudgmentRevisionRow.judgment_id == current.id).order_by(JudgmentRevisionRow.id)
            ).all()
            accepted = list(session.scalars(
                select(DecisionRow.candidate_id)
                .where(DecisionRow.judgment_id == current.id, DecisionRow.accepted.is_(True))
                .order_by(DecisionRow.candidate_id)
            ))
        history = [
            {"accepted": sorted(r.accepted), "none_fit": bool(r.none_fit), "seconds": r.seconds,
             "judged_at": r.judged_at, "revised_at": r.revised_at, "correction": r.correction}
            for r in revisions
        ]
        history.append({"accepted": accepted, "none_fit": bool(current.none_fit), "seconds": current.seconds,
                        "judged_at": current.updated_at or current.created_at, "revised_at": None,
                        "correction": current.correction})
        return history

    def judged_items(
        self,
        split: str | None = "train",
        round_idx: int | None = None,
        upto_round: int | None = None,
        from_round: int | None = None,
    ) -> list[JudgedItem]:
        """Every judged item (>= 1 judgment; unjudged items are left out) with its candidates and judgments.

        The one read of feedback for trainers, the reward model, exports and reports; what was accepted is
        decided from it by `illume.feedback.verdicts`.

        Args:
            split: Only this split's items; None: all splits.
            round_idx: Only this round.
            upto_round: Only rounds <= upto_round.
            from_round: Only rounds >= from_round.

        Returns:
            Items in (round, item id) order; each item's candidates in drawn order and its (current)
            judgments in the order stored, each with its annotator's kind.
        """
        where = []
        if split is not None:
            where.append(ItemRow.split == split)
        if round_idx is not None:
            where.append(ItemRow.round_idx == round_idx)
        if upto_round is not None:
            where.append(ItemRow.round_idx <= upto_round)
        if from_round is not None:
            where.append(ItemRow.round_idx >= from_round)
        judged = select(JudgmentRow.id).where(JudgmentRow.item_id == ItemRow.id).exists()
        with self._read() as session, _gc_paused():  # millions of small objects: see _gc_paused
            items = session.execute(
                select(ItemRow.id, ItemRow.round_idx, ItemRow.split, ItemRow.example_id, ItemRow.prompt,
                       ItemRow.answer, ItemRow.predicted_answer, ItemRow.seed, ItemRow.image_ref,
                       ItemRow.question)
                .where(judged, *where).order_by(ItemRow.round_idx, ItemRow.id)
            ).all()
            # The items' candidates, judgments and decisions, read by ranges of item ids (each range found
            # through the item_id indexes): only the rows of the items asked for are read, never a whole table,
            # and no query returns more than _JUDGED_CHUNK items' rows.
            wanted = sorted(row.id for row in items)
            candidates: dict[int, list[CandidateInfo]] = {}
            decisions: dict[int, dict[int, bool]] = {}
            positions: dict[int, dict[int, int | None]] = {}
            judgments: dict[int, list[JudgmentInfo]] = {}
            keep = set(wanted)
            for first in range(0, len(wanted), _JUDGED_CHUNK):
                low, high = wanted[first], wanted[min(first + _JUDGED_CHUNK, len(wanted)) - 1]
                for (item_id, candidate_id, text, temperature, seed, sample_idx, logprob, position,
                     model) in session.execute(
                    select(CandidateRow.item_id, CandidateRow.id, CandidateRow.text, CandidateRow.temperature,
                           CandidateRow.seed, CandidateRow.sample_idx, CandidateRow.logprob,
                           CandidateRow.position, CandidateRow.model)
                    .where(CandidateRow.item_id.between(low, high))
                    .order_by(CandidateRow.item_id, CandidateRow.position)
                ):
                    if item_id in keep:
                        candidates.setdefault(item_id, []).append(CandidateInfo(
                            id=candidate_id, text=text, temperature=temperature, seed=seed,
                            sample_idx=sample_idx, logprob=logprob, position=position,
                            model=model or POLICY_MODEL,
                        ))
                for judgment_id, candidate_id, accepted, position in session.execute(
                    select(DecisionRow.judgment_id, DecisionRow.candidate_id, DecisionRow.accepted,
                           DecisionRow.position_shown)
                    .join(JudgmentRow, JudgmentRow.id == DecisionRow.judgment_id)
                    .where(JudgmentRow.item_id.between(low, high))
                    .order_by(DecisionRow.judgment_id, DecisionRow.candidate_id)
                ):
                    decisions.setdefault(judgment_id, {})[candidate_id] = bool(accepted)
                    positions.setdefault(judgment_id, {})[candidate_id] = position
                for row in session.execute(
                    select(JudgmentRow.item_id, JudgmentRow.id, JudgmentRow.annotator, AnnotatorRow.kind,
                           JudgmentRow.none_fit, JudgmentRow.seconds, JudgmentRow.created_at,
                           JudgmentRow.client_token, JudgmentRow.updated_at, JudgmentRow.correction)
                    .outerjoin(AnnotatorRow, AnnotatorRow.name == JudgmentRow.annotator)
                    .where(JudgmentRow.item_id.between(low, high)).order_by(JudgmentRow.id)
                ):
                    if row.item_id in keep:
                        judgments.setdefault(row.item_id, []).append(JudgmentInfo(
                            id=row.id, annotator=row.annotator, annotator_kind=row.kind,
                            none_fit=bool(row.none_fit), seconds=row.seconds, created_at=row.created_at,
                            client_token=row.client_token, decisions=decisions.pop(row.id, {}),
                            updated_at=row.updated_at, positions_shown=positions.pop(row.id, {}),
                            correction=row.correction,
                        ))
                decisions.clear()  # of judgments of items in the range that were not asked for
                positions.clear()
        return [
            JudgedItem(round_idx=r.round_idx, split=r.split, example_id=r.example_id, prompt=r.prompt,
                       answer=r.answer, predicted_answer=r.predicted_answer, seed=r.seed,
                       image_ref=r.image_ref, candidates=candidates.get(r.id, []),
                       judgments=judgments.get(r.id, []), question=r.question, item_id=r.id)
            for r in items
        ]

    def judgments_table(self, upto_round: int | None = None) -> list[dict[str, Any]]:
        """Flat rows for exports and debugging: one per (judgment, candidate shown).

        A judgment of an item without candidates gives one row with `candidate_id`, `text` and
        `accepted` None. Keys: round_idx, split, example_id, annotator, annotator_kind, candidate_id, text,
        accepted, none_fit, correction, seconds, created_at (UTC), client_token.
        """
        stmt = (
            select(ItemRow.round_idx, ItemRow.split, ItemRow.example_id, JudgmentRow.annotator,
                   AnnotatorRow.kind.label("annotator_kind"),
                   CandidateRow.id.label("candidate_id"), CandidateRow.text, DecisionRow.accepted,
                   JudgmentRow.none_fit, JudgmentRow.correction, JudgmentRow.seconds, JudgmentRow.created_at,
                   JudgmentRow.client_token)
            .select_from(JudgmentRow).join(ItemRow, ItemRow.id == JudgmentRow.item_id)
            .outerjoin(AnnotatorRow, AnnotatorRow.name == JudgmentRow.annotator)
            .outerjoin(DecisionRow, DecisionRow.judgment_id == JudgmentRow.id)
            .outerjoin(CandidateRow, CandidateRow.id == DecisionRow.candidate_id)
            .order_by(JudgmentRow.id, CandidateRow.position)
        )
        if upto_round is not None:
            stmt = stmt.where(ItemRow.round_idx <= upto_round)
        with self._read() as session:
            return [dict(row) for row in session.execute(stmt).mappings()]


# -------------------------------------------------------------------- helpers


def _insert_judgments(
    session: Session,
    round_idx: int,
    split: str,
    annotator: str,
    rows: list[JudgmentInput],
    client_tokens: list[str | None],
    kind: str,
    corrections: list[str | None] | None = None,
) -> int:
    """Validate every row, then insert the new judgments and their decisions; returns how many."""
    corrections = corrections or [None] * len(rows)
    if not annotator:
        raise ValueError("annotator must be a non-empty name")
    registered = _check_annotator_kind(session, annotator, kind)
    example_ids = {row[0] for row in rows}
    in_round = [ItemRow.round_idx == round_idx, ItemRow.split == split]
    if len(example_ids) <= _MAX_IN:
        in_round.append(ItemRow.example_id.in_(example_ids))
    item_ids = dict(session.execute(select(ItemRow.example_id, ItemRow.id).where(*in_round)).all())
    candidates: dict[int, list[tuple[int, str]]] = {}
    for item_id, candidate_id, text in session.execute(
        select(CandidateRow.item_id, CandidateRow.id, CandidateRow.text).join(ItemRow).where(*in_round)
        .order_by(CandidateRow.item_id, CandidateRow.position)
    ):
        candidates.setdefault(item_id, []).append((candidate_id, text))

    validated = []  # (item_id, accepted candidate ids, row, token)
    for row, token, correction in zip(rows, client_tokens, corrections):
        example_id, accepted, none_fit, _ = row
        where = f"example {example_id!r} (round {round_idx}, {split})"
        check_correction(correction, none_fit, where)
        if example_id not in item_ids:
            raise ValueError(f"{where} is not in the feedback store")
        if isinstance(accepted, str):
            raise ValueError(f"{where}: accepted must be a list of candidate ids or texts, not {accepted!r}")
        if none_fit and accepted:
            raise ValueError(f"{where}: none_fit=True but {len(accepted)} candidate(s) accepted")
        item_id = item_ids[example_id]
        ids = {candidate_id for candidate_id, _ in candidates.get(item_id, [])}
        by_text = {text: candidate_id for candidate_id, text in candidates.get(item_id, [])}
        accepted_ids = set()
        for candidate in accepted:
            if isinstance(candidate, str) and candidate in by_text:
                accepted_ids.add(by_text[candidate])
            elif isinstance(candidate, Integral) and not isinstance(candidate, bool) and candidate in ids:
                accepted_ids.add(int(candidate))  # numpy integers too
            else:
                raise ValueError(
                    f"{where}: accepted candidate {candidate!r} is not one of this item's candidates"
                )
        validated.append((item_id, accepted_ids, row, token, correction))

    done = set(session.scalars(
        select(JudgmentRow.item_id).join(ItemRow).where(JudgmentRow.annotator == annotator, *in_round)
    ))
    tokens = {token for token in client_tokens if token is not None}
    used_tokens = set(session.scalars(
        select(JudgmentRow.client_token).where(JudgmentRow.client_token.in_(tokens))
    )) if tokens else set()
    new = []
    for item_id, accepted_ids, row, token, correction in validated:
        if item_id in done or (token is not None and token in used_tokens):
            continue
        done.add(item_id)
        if token is not None:
            used_tokens.add(token)
        new.append((item_id, accepted_ids, row, token, correction))
    if not new:
        return 0
    if not registered:
        _register_annotator(session, annotator, kind)

    judgment_rows = [
        {"item_id": item_id, "annotator": annotator, "none_fit": bool(row[2]), "seconds": row[3],
         "client_token": token, "correction": correction}
        for item_id, _, row, token, correction in new
    ]
    judgment_ids = session.scalars(
        insert(JudgmentRow).returning(JudgmentRow.id, sort_by_parameter_order=True), judgment_rows
    ).all()
    decisions = [
        {"judgment_id": judgment_id, "candidate_id": candidate_id, "accepted": candidate_id in accepted_ids}
        for judgment_id, (item_id, accepted_ids, _, _, _) in zip(judgment_ids, new)
        for candidate_id, _ in candidates.get(item_id, [])
    ]
    if decisions:
        session.execute(insert(DecisionRow), decisions)
    return len(new)


_MAX_ROW_ID = 2**63 - 1
MAX_CORRECTION_CHARS = 2000
"""The longest rationale a person may write (a few sentences; the page's text box has the same limit)."""


def check_correction(correction: str | None, none_fit: bool, where: str) -> None:
    """ValueError unless `correction` is None or a non-empty text of a "none fits" judgment."""
    if correction is None:
        return
    if not isinstance(correction, str) or not correction.strip():
        raise ValueError(f"{where}: a correction must be a non-empty text")
    if len(correction) > MAX_CORRECTION_CHARS:
        raise ValueError(f"{where}: a correction may have at most {MAX_CORRECTION_CHARS} characters")
    if not none_fit:
        raise ValueError(f"{where}: a correction comes with none_fit=True (it replaces the candidates)")


def token_hash(token: str) -> str:
    """What the store keeps of an account's token: sha256, hex.

    The tokens are 32 random bytes (`secrets.token_urlsafe(32)`), so a slow password hash would add nothing
    against guessing, and a fast one lets the server check the token on every request (revocation is
    immediate). Lookups go by the hash, so no comparison leaks a token's prefix.
    """
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    """A person with their own link (`FeedbackStore.add_account`)."""

    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _is_row_id(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and 0 < value <= _MAX_ROW_ID


def _check_kind(kind: str) -> None:
    if kind not in ANNOTATOR_KINDS:
        raise ValueError(f"annotator kind must be one of {ANNOTATOR_KINDS}, got {kind!r}")


def _check_annotator_kind(session: Session, annotator: str, kind: str) -> bool:
    """Refuse an unknown kind, or one other than the annotator's registered kind; True if registered."""
    _check_kind(kind)
    stored = session.scalar(select(AnnotatorRow.kind).where(AnnotatorRow.name == annotator))
    if stored is not None and stored != kind:
        raise ValueError(f"annotator {annotator!r} is registered as kind {stored!r}, not {kind!r}: an "
                         "annotator's kind never changes (judge under another name)")
    return stored is not None


def _register_annotator(session: Session, annotator: str, kind: str) -> None:
    """Register (annotator, kind) in the caller's transaction, before its first judgment is inserted."""
    try:
        with session.begin_nested():  # a savepoint: a concurrent first write (off SQLite) may win the race
            session.execute(insert(AnnotatorRow).values(name=annotator, kind=kind, created_at=_now()))
    except IntegrityError:
        if not _check_annotator_kind(session, annotator, kind):
            raise


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
        now = _now()
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
_WRITER_LOCK = 0x696C6C756D77  # "illumw": the advisory lock key of `FeedbackStore.writer_lock`


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


def _get_or_add_round(session: Session, round_idx: int) -> RoundRow:
    row = session.get(RoundRow, round_idx)
    if row is None:
        try:
            with session.begin_nested():  # a savepoint: off SQLite a concurrent writer may add the round first
                session.execute(insert(RoundRow).values(round_idx=round_idx, created_at=_now()))
        except IntegrityError:
            pass
        row = session.get(RoundRow, round_idx)
    return row


@contextlib.contextmanager
def _opening(url: str) -> Iterator[None]:
    """Turn what goes wrong while a store is opened into one `StoreError` line naming the store."""
    try:
        yield
    except StoreError:
        raise
    except DBAPIError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
        if error.connection_invalidated or isinstance(error, OperationalError):
            raise StoreError(f"cannot open the feedback store {url}: {reason}") from error
        raise StoreError(f"{url} is not a feedback store ({reason})") from error


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _to_url(url_or_path: str | Path, create: bool = True) -> URL:
    if isinstance(url_or_path, Path) or "://" not in url_or_path:
        path = Path(url_or_path).expanduser().resolve()
        if not create and not path.is_file():
            raise StoreError(f"no feedback store at {path}: start the run first (`illume run ...`)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return URL.create("sqlite", database=str(path))
    try:
        url = make_url(url_or_path)
    except ArgumentError as error:
        raise StoreError(f"store_url {url_or_path!r} is not a database URL ({error}); e.g. "
                         "postgresql+psycopg://USER@HOST/DB or a path to a SQLite file") from error
    if not create and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") and not (
            Path(url.database).expanduser().is_file()):
        raise StoreError(f"no feedback store at {url.database}: start the run first (`illume run ...`)")
    return url


_DRIVER_EXTRAS = {"postgresql": "postgres"}
"""The illume extra that installs each database's driver (pyproject.toml's optional dependencies)."""


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (ImportError, NoSuchModuleError) as error:  # the driver (DBAPI) is imported here
            extra = _DRIVER_EXTRAS.get(url.get_backend_name())
            remedy = f"pip install 'illume[{extra}]'" if extra else "install its driver"
            shown = url.render_as_string(hide_password=True)
            raise StoreError(f"store_url {shown} needs a database driver that is not installed ({error}): "
                             f"{remedy}") from error
    if url.database in (None, "", ":memory:"):
        # One shared connection, or every connection would see its own empty in-memory database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a bulk read builds its objects (restored after).

    A VQA-X-sized read creates millions of small objects, none of them in cycles, and every young-generation
    collection they trigger walks them again: ~30 % of `judged_items`' time at 22,500 items. Nothing is
    leaked: reference counting still frees everything, and the collector runs again afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _WriteSessions:
    """The store's write transactions: `with store.write_sessions.begin() as session:` (one transaction, committed at
    the end), on SQLite behind this process's lock for the database file (`_process_write_lock`)."""

    def __init__(self, maker: sessionmaker[Session], lock: threading.RLock | None) -> None:
        self._maker = maker
        self._lock = lock

    @contextlib.contextmanager
    def begin(self) -> Iterator[Session]:
        with self._lock or contextlib.nullcontext(), self._maker.begin() as session:
            yield session


_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _process_write_lock(url: URL) -> threading.RLock | None:
    """One lock per SQLite database in this process, taken around each write transaction; None off SQLite.

    SQLite lets one writer in at a time, and a writer that finds the write lock taken does not queue: it
    sleeps and retries (1, 2, 5, ... up to 100 ms apart) until the busy timeout. With the annotation server's
    threads all writing (a lease per `next`, a judgment per submission), that polling made calls wait tens to
    hundreds of ms for a lock that was free again after a few. Threads of one process queue here instead
    and go in as soon as the previous writer committed; other processes (the loop, a CLI command) still meet
    at SQLite's own lock. Re-entrant, so that a nested write fails as before (busy timeout), not hangs.
    """
    if url.get_backend_name() != "sqlite":
        return None
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(str(url.database or ":memory:"), threading.RLock())


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # sqlite3's own transaction handling starts transactions lazily (not for SELECT); we emit BEGIN
    # ourselves in _sqlite_begin (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")  # first: the next pragma may wait
    cursor.execute("PRAGMA journal_mode = WAL")  # readers don't block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # A write transaction that starts DEFERRED reads first and must then upgrade to the write lock; in
    # WAL mode that upgrade fails at once with "database is locked" (no waiting) if another connection
    # wrote meanwhile. IMMEDIATE takes the lock at BEGIN, waiting up to the busy timeout.
    mode = connection.get_execution_options().get("illume_begin", "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")
