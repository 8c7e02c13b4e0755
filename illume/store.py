"""The feedback store: every sampled candidate and every judgment of a run, in a real database.

It is the single source of truth of an ILLUME run: a resumed run re-reads what was sampled
(`candidate_sets`), which items still wait for a critic (`unjudged_items`) and what was accepted
(`accepted_rationales`); reward-model pairs, DPO pairs and exports read it too.

Assumptions, up front:
- One SQLAlchemy URL; a plain path means a SQLite file (the run directory's `feedback.db`). Any other URL
  (PostgreSQL for teams) works through the same code; only the SQLite connection settings below are special.
- Every public write method is ONE transaction: after kill -9 at any point the store holds either all of
  a call's rows or none of them. Writes are idempotent (re-adding items skips existing ones, a second
  judgment by the same annotator or with a used `client_token` is refused), so a resumed run just repeats
  the call it was killed in.
- Several annotators may judge one item, each once (unique (item, annotator)); many processes and threads
  may write at once. On SQLite, writes start with `BEGIN IMMEDIATE` (one writer at a time, waiting up to
  the busy timeout instead of failing with "database is locked"), and WAL lets readers run beside them.
- A `FeedbackStore` may be shared across threads (each call opens its own session).

Tables: `rounds` (one per round: when sampled/trained, val metrics), `items` (one per (round, example,
split): the prompt and answer the candidates continue), `candidates` (distinct rationales of an item, in
the order drawn), `judgments` (one per annotator per item), `decisions` (one per candidate shown in a
judgment: accepted or not, and where the page showed it) and `leases` (items the annotation page handed
to a person and holds for them until their judgment or a timeout).

Columns added after the first release (`judgments.updated_at`, `decisions.position_shown`) are added to an
older database when it is opened (ALTER TABLE ... ADD COLUMN, nullable), so old run directories still open.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import StaticPool

from illume.data.records import Candidate, CandidateSet

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
        return value


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
    __table_args__ = (UniqueConstraint("round_idx", "example_id", "split"),)

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


class JudgmentRow(Base):
    """One annotator's verdict on one item."""

    __tablename__ = "judgments"
    __table_args__ = (UniqueConstraint("item_id", "annotator"),)

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

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    annotator: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(_UTCDateTime(), index=True)
    shown_order: Mapped[list[int] | None] = mapped_column(JSON)
    """Candidate ids in the order the page shows them (shuffled once per lease)."""
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=_now)


_ADDED_COLUMNS = {"judgments": ("updated_at",), "decisions": ("position_shown",)}
"""Columns added after the first release: `FeedbackStore` adds them to an older database."""


class AcceptedRationale(NamedTuple):
    """A rationale accepted for an example, and the round it was sampled in."""

    example_id: str
    text: str
    round_idx: int


JudgmentInput = tuple[str, Sequence[int | str], bool, float | None]
"""(example_id, accepted candidate ids or texts, none_fit, seconds) for `FeedbackStore.add_judgments`."""


class Lease(NamedTuple):
    """An item held for one annotator (`FeedbackStore.lease_item`)."""

    item_id: int
    annotator: str
    expires_at: datetime
    shown_order: list[int]
    """The item's candidate ids in the order to show them."""


class JudgmentConflict(Exception):
    """A valid judgment that cannot be stored: the item has all its judgments, or a client token was used
    for another item or annotator. The message says which."""


class FeedbackStore:
    """Candidates and judgments of an ILLUME run over SQLAlchemy (SQLite file by default).

    Args:
        url_or_path: A SQLAlchemy URL (`sqlite:///runs/x/feedback.db`, `postgresql+psycopg://...`) or a
            path to a SQLite file (its folder is created). Tables are created when missing.
    """

    def __init__(self, url_or_path: str | Path) -> None:
        self._engine = _make_engine(_to_url(url_or_path))
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        # Same pool; the option makes `_sqlite_begin` take the write lock at BEGIN (ignored off SQLite).
        write_engine = self._engine.execution_options(illume_begin="IMMEDIATE")
        self._write = sessionmaker(write_engine, expire_on_commit=False)
        with write_engine.begin() as connection:  # under the write lock: concurrent openers don't race
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close the pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- rounds

    def rounds(self) -> list[int]:
        """Indices of the rounds in the store, ascending."""
        with self._read() as session:
            return list(session.scalars(select(RoundRow.round_idx).order_by(RoundRow.round_idx)))

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

    def mark_trained(self, round_idx: int) -> None:
        """Record that the round's fine-tuning finished (the first call's time is kept)."""
        with self._write.begin() as session:
            row = _get_or_add_round(session, round_idx)
            row.trained_at = row.trained_at or _now()

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

    def add_candidate_sets(
        self,
        round_idx: int,
        split: str,
        candidate_sets: Iterable[CandidateSet],
        image_refs: Mapping[str, str] | None = None,
    ) -> int:
        """Store the items and candidates of a round in one transaction.

        Items already stored for (round, example, split) are skipped, whatever their content, so
        re-running after a crash never duplicates. A text repeated within one set is stored once.

        Args:
            round_idx: The round the candidates were sampled in.
            split: "train", "val" or "test".
            candidate_sets: The sampler's output.
            image_refs: Optional example id -> image path (or URL) for the annotation page.

        Returns:
            How many items were added.
        """
        _check_split(split)
        image_refs = image_refs or {}
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
                 "image_ref": image_refs.get(s.example_id)}
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
                        "logprob": candidate.logprob, "position": len(texts),
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
                       CandidateRow.sample_idx, CandidateRow.logprob)
                .join(ItemRow).where(*in_round).order_by(CandidateRow.item_id, CandidateRow.position)
            ):
                candidates.setdefault(c.item_id, []).append(Candidate(
                    text=c.text, temperature=c.temperature, seed=c.seed, sample_idx=c.sample_idx,
                    logprob=c.logprob,
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

    # ---------------------------------------------------------------- judgments

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

        Returns:
            True if stored; False (nothing written) if `annotator` already judged the item or
            `client_token` was used before.

        Raises:
            ValueError: Unknown item, a candidate that is not the item's, or `none_fit` with accepts.
        """
        row = (example_id, accepted, none_fit, seconds)
        try:
            with self._write.begin() as session:
                return _insert_judgments(session, round_idx, split, annotator, [row], [client_token]) == 1
        except IntegrityError:
            # Another writer stored the same (item, annotator) or token between our check and our
            # insert (possible off SQLite, where writes are not serialised at BEGIN).
            if self._is_duplicate(round_idx, split, example_id, annotator, client_token):
                return False
            raise

    def add_judgments(
        self, round_idx: int, judgments: Iterable[JudgmentInput], annotator: str, split: str = "train"
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

        Returns:
            How many judgments were stored.

        Raises:
            ValueError: As in `add_judgment`, for any row.
        """
        rows = list(judgments)
        with self._write.begin() as session:
            return _insert_judgments(session, round_idx, split, annotator, rows, [None] * len(rows))

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

    # ---------------------------------------------------------------- the annotation page

    def item(self, item_id: int) -> dict[str, Any] | None:
        """One item as the annotation page shows it, or None if no item has this id.

        Returns:
            `item_id`, `round_idx`, `split`, `example_id`, `prompt`, `answer`, `image_ref` and `candidates`
            ((candidate id, text) pairs in drawn order).
        """
        if not _is_row_id(item_id):
            return None
        with self._read() as session:
            row = session.execute(
                select(ItemRow.round_idx, ItemRow.split, ItemRow.example_id, ItemRow.prompt, ItemRow.answer,
                       ItemRow.image_ref).where(ItemRow.id == item_id)
            ).first()
            if row is None:
                return None
            candidates = session.execute(
                select(CandidateRow.id, CandidateRow.text).where(CandidateRow.item_id == item_id)
                .order_by(CandidateRow.position)
            ).all()
        return {"item_id": item_id, **row._asdict(), "candidates": [tuple(c) for c in candidates]}

    def open_round(self, annotations_per_item: int, split: str = "train") -> int | None:
        """The round people should judge now: the latest one with an item that has fewer than
        `annotations_per_item` judgments; else the latest round with items (all judged); None if no items."""
        with self._read() as session:
            rounds = list(session.scalars(
                select(ItemRow.round_idx).where(ItemRow.split == split).distinct()
                .order_by(ItemRow.round_idx.desc())
            ))
            for round_idx in rounds:
                if session.scalar(select(ItemRow.id).where(
                    ItemRow.round_idx == round_idx, ItemRow.split == split,
                    _num_judgments() < annotations_per_item,
                ).limit(1)) is not None:
                    return round_idx
        return rounds[0] if rounds else None

    def lease_item(
        self,
        round_idx: int,
        annotator: str,
        annotations_per_item: int,
        lease_seconds: float,
        split: str = "train",
        now: datetime | None = None,
        rng: random.Random | None = None,
    ) -> Lease | None:
        """Hand `annotator` the next item of the round that still needs judgments, and hold it for them.

        One transaction: the annotator's own live lease (a reloaded page) comes back renewed with the same
        order; otherwise the first item (in the order added) that this annotator has not judged and whose
        judgments plus live leases are fewer than `annotations_per_item` is leased to them until
        now + `lease_seconds`, its candidates shuffled. Expired leases of the round are dropped (their slots
        went back to the pool when they expired).

        Args:
            round_idx: The round to hand out.
            annotator: Who asks.
            annotations_per_item: Judgments wanted per item, each by a different annotator.
            lease_seconds: How long the item is held for the annotator.
            split: The items' split.
            now: The current time (tests); default: the clock.
            rng: Shuffles the candidates; default: the system's random source.

        Returns:
            The lease, or None when no item is free for this annotator now.
        """
        _check_annotator(annotator)
        now = now or _now()
        expires_at = now + timedelta(seconds=lease_seconds)
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        judged_by_me = select(JudgmentRow.id).where(
            JudgmentRow.item_id == ItemRow.id, JudgmentRow.annotator == annotator
        ).exists()
        with self._write.begin() as session:
            own = session.scalars(
                select(LeaseRow).join(ItemRow, ItemRow.id == LeaseRow.item_id)
                .where(*in_round, LeaseRow.annotator == annotator, LeaseRow.expires_at > now, ~judged_by_me,
                       _num_judgments() < annotations_per_item)
                .order_by(LeaseRow.created_at, LeaseRow.item_id).limit(1)
            ).first()
            if own is not None:
                own.expires_at = expires_at
                return Lease(own.item_id, annotator, expires_at, list(own.shown_order or []))
            session.execute(delete(LeaseRow).where(
                LeaseRow.expires_at <= now, LeaseRow.item_id.in_(select(ItemRow.id).where(*in_round))
            ))
            live_leases = (
                select(func.count()).select_from(LeaseRow)
                .where(LeaseRow.item_id == ItemRow.id, LeaseRow.expires_at > now).scalar_subquery()
            )
            free = session.scalars(
                select(ItemRow.id).where(*in_round, ~judged_by_me,
                                         _num_judgments() + live_leases < annotations_per_item)
                .order_by(ItemRow.id).limit(_LEASE_TRIES)
            ).all()
            for item_id in free:
                # On SQLite this transaction holds the write lock since BEGIN, so the first is free. Other
                # databases don't serialise writers: lock the item's row, then count again.
                session.execute(select(ItemRow.id).where(ItemRow.id == item_id).with_for_update())
                if _slots_taken(session, item_id, annotator, now) >= annotations_per_item:
                    continue
                order = _candidate_ids(session, item_id)
                (rng or _SYSTEM_RANDOM).shuffle(order)
                session.execute(delete(LeaseRow).where(LeaseRow.item_id == item_id,
                                                       LeaseRow.annotator == annotator))
                session.add(LeaseRow(item_id=item_id, annotator=annotator, expires_at=expires_at,
                                     shown_order=order, created_at=now))
                return Lease(item_id, annotator, expires_at, order)
        return None

    def renew_lease(
        self,
        item_id: int,
        annotator: str,
        annotations_per_item: int,
        lease_seconds: float,
        now: datetime | None = None,
    ) -> Lease | None:
        """Extend `annotator`'s hold on an item their page still shows (a heartbeat).

        A lease that expired is taken again if the item still has a free slot for them.

        Returns:
            The renewed lease, or None: unknown item, already judged by them, or its slots are taken.
        """
        _check_annotator(annotator)
        now = now or _now()
        if not _is_row_id(item_id):
            return None
        with self._write.begin() as session:
            session.execute(select(ItemRow.id).where(ItemRow.id == item_id).with_for_update())
            row = session.get(LeaseRow, (item_id, annotator))
            if row is None or row.expires_at <= now:
                exists = session.scalar(select(ItemRow.id).where(ItemRow.id == item_id))
                judged = session.scalar(select(JudgmentRow.id).where(
                    JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator))
                if exists is None or judged is not None or (
                        _slots_taken(session, item_id, annotator, now) >= annotations_per_item):
                    return None
                if row is None:
                    order = _candidate_ids(session, item_id)
                    _SYSTEM_RANDOM.shuffle(order)
                    row = LeaseRow(item_id=item_id, annotator=annotator, shown_order=order, created_at=now)
                    session.add(row)
            row.expires_at = now + timedelta(seconds=lease_seconds)
            return Lease(item_id, annotator, row.expires_at, list(row.shown_order or []))

    def submit_judgment(
        self,
        item_id: int,
        annotator: str,
        accepted: Sequence[int],
        none_fit: bool = False,
        seconds: float | None = None,
        client_token: str | None = None,
        shown_order: Sequence[int] | None = None,
        annotations_per_item: int | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Store a judgment from the annotation page in one transaction, and release the annotator's lease.

        Like `add_judgment`, but the item and the accepted candidates are given by id, the order the page
        showed the candidates is recorded (`decisions.position_shown`; default: the lease's order), and
        with `annotations_per_item` the item never gets more judgments than that: a judgment is taken while
        the annotator's lease is live, or without one while a slot is free.

        Args:
            item_id: The item (`lease_item`'s `item_id`).
            annotator: Who judged.
            accepted: Ids of the accepted candidates; the item's other candidates are rejected.
            none_fit: The explicit "none of them fits" (then `accepted` must be empty).
            seconds: Time spent on the item.
            client_token: The page's id for this submission: a repeat is not stored twice.
            shown_order: The item's candidate ids in the order shown (a permutation of them).
            annotations_per_item: The most judgments the item may get (None: no limit).
            now: The current time (tests); default: the clock.

        Returns:
            True if stored; False (nothing written) for a repeat: the same `client_token` from the same
            annotator on the same item, or an item this annotator already judged.

        Raises:
            KeyError: No item has this id.
            ValueError: Empty annotator, a candidate not of this item, `none_fit` with accepts, or a
                `shown_order` that is not a permutation of the item's candidates.
            JudgmentConflict: The item already has `annotations_per_item` judgments (or live leases of
                others), or `client_token` was used for another item or annotator.
        """
        _check_annotator(annotator)
        now = now or _now()
        try:
            with self._write.begin() as session:
                candidate_ids = _check_item_decision(session, item_id, accepted, none_fit, shown_order)
                if client_token is not None:
                    used = session.execute(select(JudgmentRow.item_id, JudgmentRow.annotator)
                                           .where(JudgmentRow.client_token == client_token)).first()
                    if used is not None:
                        if tuple(used) == (item_id, annotator):
                            return False
                        raise JudgmentConflict(
                            f"client_token {client_token!r} was used for another submission")
                if session.scalar(select(JudgmentRow.id).where(
                        JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator)) is not None:
                    return False
                lease = session.get(LeaseRow, (item_id, annotator))
                if annotations_per_item is not None:
                    session.execute(select(ItemRow.id).where(ItemRow.id == item_id).with_for_update())
                    num_judgments = session.scalar(
                        select(func.count()).select_from(JudgmentRow).where(JudgmentRow.item_id == item_id))
                    holds_slot = lease is not None and lease.expires_at > now
                    if num_judgments >= annotations_per_item or (not holds_slot and _slots_taken(
                            session, item_id, annotator, now) >= annotations_per_item):
                        raise JudgmentConflict(
                            f"item {item_id} already has its {annotations_per_item} judgment(s) or is held "
                            "by other annotators (your hold on it expired)")
                if shown_order is None and lease is not None and lease.shown_order:
                    shown_order = lease.shown_order
                judgment_id = session.scalar(insert(JudgmentRow).returning(JudgmentRow.id).values(
                    item_id=item_id, annotator=annotator, none_fit=bool(none_fit), seconds=seconds,
                    client_token=client_token, created_at=now,
                ))
                _insert_decisions(session, judgment_id, candidate_ids, set(accepted), shown_order)
                if lease is not None:
                    session.delete(lease)
                return True
        except IntegrityError:
            # Another writer stored the same (item, annotator) or token between our check and our insert
            # (possible off SQLite, where writes are not serialised at BEGIN).
            with self._read() as session:
                if session.scalar(select(JudgmentRow.id).where(
                        JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator)) is not None:
                    return False
            raise

    def replace_judgment(
        self,
        item_id: int,
        annotator: str,
        accepted: Sequence[int],
        none_fit: bool = False,
        seconds: float | None = None,
        client_token: str | None = None,
        shown_order: Sequence[int] | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Replace `annotator`'s own judgment of an item (they went back to change it), in one transaction.

        The judgment keeps its id and `created_at`; its decisions are replaced by exactly the new ones,
        `updated_at` is set, and `seconds` (the time spent revising) is added to the time already recorded.
        The shown order is the new one if given, else the one recorded before.

        Returns:
            True if replaced; False (nothing written) for a repeated request (`client_token` equal to the
            judgment's current token).

        Raises:
            KeyError: No item has this id, or `annotator` has not judged it.
            ValueError, JudgmentConflict: As in `submit_judgment`.
        """
        _check_annotator(annotator)
        now = now or _now()
        with self._write.begin() as session:
            candidate_ids = _check_item_decision(session, item_id, accepted, none_fit, shown_order)
            row = session.scalars(select(JudgmentRow).where(
                JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator)).first()
            if row is None:
                raise KeyError(f"{annotator!r} has not judged item {item_id}; nothing to replace")
            if client_token is not None:
                if row.client_token == client_token:
                    return False
                if session.scalar(select(JudgmentRow.id).where(JudgmentRow.client_token == client_token)):
                    raise JudgmentConflict(f"client_token {client_token!r} was used for another submission")
                row.client_token = client_token
            if shown_order is None:
                shown = dict(session.execute(
                    select(DecisionRow.candidate_id, DecisionRow.position_shown)
                    .where(DecisionRow.judgment_id == row.id, DecisionRow.position_shown.is_not(None))
                ).all())
                if set(shown) == set(candidate_ids):
                    shown_order = sorted(shown, key=shown.__getitem__)
            row.none_fit = bool(none_fit)
            if seconds is not None:
                row.seconds = (row.seconds or 0.0) + seconds
            row.updated_at = now
            session.execute(delete(DecisionRow).where(DecisionRow.judgment_id == row.id))
            _insert_decisions(session, row.id, candidate_ids, set(accepted), shown_order)
            return True

    def judgments_by(self, round_idx: int, annotator: str, split: str = "train") -> list[dict[str, Any]]:
        """`annotator`'s judgments of the round's items, newest first (the page's "go back").

        Returns:
            Dicts with `judgment_id`, `item_id`, `accepted` (candidate ids), `none_fit`, `seconds`,
            `created_at`, `updated_at` and `shown_order` (candidate ids in the order shown; None if not
            recorded).
        """
        mine = (ItemRow.round_idx == round_idx, ItemRow.split == split, JudgmentRow.annotator == annotator)
        with self._read() as session:
            judgments = session.execute(
                select(JudgmentRow.id, JudgmentRow.item_id, JudgmentRow.none_fit, JudgmentRow.seconds,
                       JudgmentRow.created_at, JudgmentRow.updated_at)
                .join(ItemRow, ItemRow.id == JudgmentRow.item_id)
                .where(*mine)
                .order_by(JudgmentRow.id.desc())
            ).all()
            decisions: dict[int, list[tuple[int, bool, int | None]]] = {}
            for judgment_id, candidate_id, accepted, position in session.execute(
                select(DecisionRow.judgment_id, DecisionRow.candidate_id, DecisionRow.accepted,
                       DecisionRow.position_shown)
                .join(JudgmentRow, JudgmentRow.id == DecisionRow.judgment_id)
                .join(ItemRow, ItemRow.id == JudgmentRow.item_id)
                .where(*mine)
                .order_by(DecisionRow.candidate_id)
            ):
                decisions.setdefault(judgment_id, []).append((candidate_id, accepted, position))
        rows = []
        for judgment_id, item_id, none_fit, seconds, created_at, updated_at in judgments:
            mine = decisions.get(judgment_id, [])
            shown = None
            if mine and all(position is not None for _, _, position in mine):
                shown = [candidate_id for candidate_id, _, _ in sorted(mine, key=lambda d: d[2])]
            rows.append({
                "judgment_id": judgment_id, "item_id": item_id,
                "accepted": [candidate_id for candidate_id, accepted, _ in mine if accepted],
                "none_fit": none_fit, "seconds": seconds, "created_at": created_at, "updated_at": updated_at,
                "shown_order": shown,
            })
        return rows

    def annotation_progress(
        self, round_idx: int, annotations_per_item: int, annotator: str | None = None, split: str = "train"
    ) -> dict[str, int]:
        """How far people are with a round.

        Returns:
            `items`; `complete_items` (with >= `annotations_per_item` judgments: the round is judged when
            this equals `items`); `judgments` (all); `counted_judgments` (at most `annotations_per_item` per
            item) out of `needed_judgments` (items x annotations_per_item); `mine` (by `annotator`).
        """
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        with self._read() as session:
            counts = list(session.scalars(
                select(func.count(JudgmentRow.id)).select_from(ItemRow)
                .outerjoin(JudgmentRow, JudgmentRow.item_id == ItemRow.id)
                .where(*in_round).group_by(ItemRow.id)
            ))
            mine = 0 if annotator is None else session.scalar(
                select(func.count()).select_from(JudgmentRow).join(ItemRow, ItemRow.id == JudgmentRow.item_id)
                .where(*in_round, JudgmentRow.annotator == annotator)
            )
        return {
            "items": len(counts),
            "complete_items": sum(count >= annotations_per_item for count in counts),
            "judgments": sum(counts),
            "counted_judgments": sum(min(count, annotations_per_item) for count in counts),
            "needed_judgments": len(counts) * annotations_per_item,
            "mine": mine,
        }

    # ---------------------------------------------------------------- reading feedback

    def accepted_rationales(
        self, upto_round: int, split: str = "train", min_accepts: int = 1
    ) -> list[AcceptedRationale]:
        """Every rationale accepted so far: the SFT targets of the next fine-tuning.

        Args:
            upto_round: Last round to include (rounds <= upto_round).
            split: The items' split.
            min_accepts: How many judgments must accept a candidate (1: any annotator).

        Returns:
            (example_id, text, round_idx) rows, one per distinct (example_id, text), in first-occurrence
            order (round, item added, candidate drawn).
        """
        votes = (
            select(DecisionRow.candidate_id).where(DecisionRow.accepted.is_(True))
            .group_by(DecisionRow.candidate_id).having(func.count() >= min_accepts).subquery()
        )
        with self._read() as session:
            rows = session.execute(
                select(ItemRow.example_id, CandidateRow.text, ItemRow.round_idx)
                .join(CandidateRow, CandidateRow.item_id == ItemRow.id)
                .join(votes, votes.c.candidate_id == CandidateRow.id)
                .where(ItemRow.round_idx <= upto_round, ItemRow.split == split)
                .order_by(ItemRow.round_idx, ItemRow.id, CandidateRow.position)
            ).all()
        seen: set[tuple[str, str]] = set()
        accepted = []
        for example_id, text, round_idx in rows:
            if (example_id, text) not in seen:
                seen.add((example_id, text))
                accepted.append(AcceptedRationale(example_id, text, round_idx))
        return accepted

    def judgment_counts(self, round_idx: int, split: str = "train") -> dict[str, int]:
        """Counts for a round's report.

        Returns:
            `items`, `judged_items` (>= 1 judgment), `judgments`, `accepted_candidates` (accepted by
            >= 1 judgment) and `items_with_accepted` (>= 1 accepted candidate).
        """
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        accepted = (
            select(CandidateRow.id, CandidateRow.item_id)
            .join(DecisionRow, DecisionRow.candidate_id == CandidateRow.id)
            .join(ItemRow, ItemRow.id == CandidateRow.item_id)
            .where(DecisionRow.accepted.is_(True), *in_round)
            .distinct().subquery()
        )
        judged = select(JudgmentRow.id, JudgmentRow.item_id).join(ItemRow).where(*in_round).subquery()
        with self._read() as session:
            return {
                "items": session.scalar(select(func.count()).select_from(ItemRow).where(*in_round)),
                "judged_items": session.scalar(select(func.count(judged.c.item_id.distinct()))),
                "judgments": session.scalar(select(func.count()).select_from(judged)),
                "accepted_candidates": session.scalar(select(func.count()).select_from(accepted)),
                "items_with_accepted": session.scalar(select(func.count(accepted.c.item_id.distinct()))),
            }

    def num_judgments(self, upto_round: int | None = None) -> int:
        """How many judgments (all splits, all annotators) are stored, in rounds <= upto_round if given."""
        stmt = select(func.count()).select_from(JudgmentRow)
        if upto_round is not None:
            stmt = stmt.join(ItemRow).where(ItemRow.round_idx <= upto_round)
        with self._read() as session:
            return session.scalar(stmt)

    def judgments_table(self, upto_round: int | None = None) -> list[dict[str, Any]]:
        """Flat rows for exports and debugging: one per (judgment, candidate shown).

        A judgment of an item without candidates gives one row with `candidate_id`, `text` and
        `accepted` None. Keys: round_idx, split, example_id, annotator, candidate_id, text, accepted,
        none_fit, seconds, created_at (UTC), client_token.
        """
        stmt = (
            select(ItemRow.round_idx, ItemRow.split, ItemRow.example_id, JudgmentRow.annotator,
                   CandidateRow.id.label("candidate_id"), CandidateRow.text, DecisionRow.accepted,
                   JudgmentRow.none_fit, JudgmentRow.seconds, JudgmentRow.created_at,
                   JudgmentRow.client_token)
            .select_from(JudgmentRow).join(ItemRow, ItemRow.id == JudgmentRow.item_id)
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
) -> int:
    """Validate every row, then insert the new judgments and their decisions; returns how many."""
    if not annotator:
        raise ValueError("annotator must be a non-empty name")
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
    for row, token in zip(rows, client_tokens):
        example_id, accepted, none_fit, _ = row
        where = f"example {example_id!r} (round {round_idx}, {split})"
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
        validated.append((item_id, accepted_ids, row, token))

    done = set(session.scalars(
        select(JudgmentRow.item_id).join(ItemRow).where(JudgmentRow.annotator == annotator, *in_round)
    ))
    tokens = {token for token in client_tokens if token is not None}
    used_tokens = set(session.scalars(
        select(JudgmentRow.client_token).where(JudgmentRow.client_token.in_(tokens))
    )) if tokens else set()
    new = []
    for item_id, accepted_ids, row, token in validated:
        if item_id in done or (token is not None and token in used_tokens):
            continue
        done.add(item_id)
        if token is not None:
            used_tokens.add(token)
        new.append((item_id, accepted_ids, row, token))
    if not new:
        return 0

    judgment_rows = [
        {"item_id": item_id, "annotator": annotator, "none_fit": bool(row[2]), "seconds": row[3],
         "client_token": token}
        for item_id, _, row, token in new
    ]
    judgment_ids = session.scalars(
        insert(JudgmentRow).returning(JudgmentRow.id, sort_by_parameter_order=True), judgment_rows
    ).all()
    decisions = [
        {"judgment_id": judgment_id, "candidate_id": candidate_id, "accepted": candidate_id in accepted_ids}
        for judgment_id, (item_id, accepted_ids, _, _) in zip(judgment_ids, new)
        for candidate_id, _ in candidates.get(item_id, [])
    ]
    if decisions:
        session.execute(insert(DecisionRow), decisions)
    return len(new)


_LEASE_TRIES = 20  # items tried per `lease_item` when another writer took the first free ones
_SYSTEM_RANDOM = random.SystemRandom()
_MAX_ROW_ID = 2**63 - 1


def _is_row_id(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and 0 < value <= _MAX_ROW_ID


def _check_annotator(annotator: str) -> None:
    if not isinstance(annotator, str) or not annotator.strip():
        raise ValueError("annotator must be a non-empty name")


def _num_judgments() -> Any:
    """Judgments of the enclosing query's item (a correlated scalar subquery)."""
    return (select(func.count()).select_from(JudgmentRow)
            .where(JudgmentRow.item_id == ItemRow.id).scalar_subquery())


def _slots_taken(session: Session, item_id: int, annotator: str, now: datetime) -> int:
    """Judgments of the item plus live leases of annotators other than `annotator`."""
    num_judgments = session.scalar(
        select(func.count()).select_from(JudgmentRow).where(JudgmentRow.item_id == item_id))
    num_leases = session.scalar(select(func.count()).select_from(LeaseRow).where(
        LeaseRow.item_id == item_id, LeaseRow.annotator != annotator, LeaseRow.expires_at > now))
    return num_judgments + num_leases


def _candidate_ids(session: Session, item_id: int) -> list[int]:
    return list(session.scalars(
        select(CandidateRow.id).where(CandidateRow.item_id == item_id).order_by(CandidateRow.position)))


def _check_item_decision(
    session: Session, item_id: int, accepted: Sequence[int], none_fit: bool, shown_order: Sequence[int] | None
) -> list[int]:
    """Validate a page's decision on an item; returns the item's candidate ids (drawn order)."""
    if not _is_row_id(item_id) or session.scalar(select(ItemRow.id).where(ItemRow.id == item_id)) is None:
        raise KeyError(f"item {item_id!r} is not in the feedback store")
    if isinstance(accepted, (str, bytes)):
        raise ValueError(f"item {item_id}: accepted must be a list of candidate ids, not {accepted!r}")
    if none_fit and accepted:
        raise ValueError(f"item {item_id}: none_fit=True but {len(accepted)} candidate(s) accepted")
    candidate_ids = _candidate_ids(session, item_id)
    for candidate_id in accepted:
        if not _is_row_id(candidate_id) or candidate_id not in candidate_ids:
            raise ValueError(f"item {item_id}: accepted candidate {candidate_id!r} is not one of this item's "
                             "candidates")
    if shown_order is not None and (len(shown_order) != len(candidate_ids)
                                    or sorted(shown_order) != sorted(candidate_ids)):
        raise ValueError(f"item {item_id}: shown_order must list each of the item's candidates once")
    return candidate_ids


def _insert_decisions(
    session: Session, judgment_id: int, candidate_ids: list[int], accepted: set[int],
    shown_order: Sequence[int] | None,
) -> None:
    position = {candidate_id: i for i, candidate_id in enumerate(shown_order)} if shown_order else {}
    rows = [{"judgment_id": judgment_id, "candidate_id": candidate_id, "accepted": candidate_id in accepted,
             "position_shown": position.get(candidate_id)} for candidate_id in candidate_ids]
    if rows:
        session.execute(insert(DecisionRow), rows)


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


def _get_or_add_round(session: Session, round_idx: int) -> RoundRow:
    row = session.get(RoundRow, round_idx)
    if row is None:
        row = RoundRow(round_idx=round_idx)
        session.add(row)
    return row


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _to_url(url_or_path: str | Path) -> URL:
    if isinstance(url_or_path, Path) or "://" not in url_or_path:
        path = Path(url_or_path).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return URL.create("sqlite", database=str(path))
    return make_url(url_or_path)


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database in (None, "", ":memory:"):
        # One shared connection, or every connection would see its own empty in-memory database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


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
