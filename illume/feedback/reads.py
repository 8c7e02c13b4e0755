"""The store's reads: what a resumed run, the trainers, the reward model, exports and reports read back.

Assumptions, up front:
- Every read is one session of the store's read sessions (`FeedbackStore.read_sessions`); on SQLite, WAL lets
  it run beside a writer.
- `judged_items` is the one read of feedback (items with their candidates and current judgments, each with its
  annotator's kind); what was accepted is decided from it by `illume.feedback.verdicts`, never here.
- Reads that may return a whole study (`judged_items`, `candidate_sets`) read plain rows, `judged_items` in ranges
  of item ids (never a whole table at once), with the cyclic garbage collector paused while it builds objects.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from illume.data.records import POLICY_MODEL, Candidate, CandidateSet
from illume.feedback.schema import (
    AnnotatorRow,
    CandidateRow,
    DecisionRow,
    ItemRow,
    JudgmentRevisionRow,
    JudgmentRow,
    RoundRow,
    check_kind,
    is_row_id,
)

_JUDGED_CHUNK = 2_000  # items per range read by `judged_items`


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
class Judgment:
    """One annotator's (current) judgment of an item, as read back (stored, it is a `JudgmentRow`; in flight, a
    `illume.feedback.writes.NewJudgment`)."""

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
    judgments: list[Judgment]
    """In the order stored (judgment id)."""
    question: str | None = None
    """The question as asked; None for items stored without it (older stores)."""
    item_id: int | None = None
    """The item's row id in the store (`judgment_history`, the admin page); None for items built elsewhere."""

    def accepting(self, candidate_id: int) -> list[Judgment]:
        """The judgments that accepted the candidate."""
        return [j for j in self.judgments if j.decisions.get(candidate_id) is True]

    def rejecting(self, candidate_id: int) -> list[Judgment]:
        """The judgments that were shown the candidate and did not accept it."""
        return [j for j in self.judgments if j.decisions.get(candidate_id) is False]


def rounds(sessions: sessionmaker[Session]) -> list[int]:
    """`FeedbackStore.rounds` over `sessions`."""
    with sessions() as session:
        return list(session.scalars(select(RoundRow.round_idx).order_by(RoundRow.round_idx)))


def is_sampled(sessions: sessionmaker[Session], round_idx: int) -> bool:
    """`FeedbackStore.is_sampled` over `sessions`."""
    with sessions() as session:
        row = session.get(RoundRow, round_idx)
        return row is not None and row.sampled_at is not None


def round_status(sessions: sessionmaker[Session], round_idx: int) -> dict[str, Any] | None:
    """`FeedbackStore.round_status` over `sessions`; None if the round is not in the store."""
    with sessions() as session:
        row = session.get(RoundRow, round_idx)
        if row is None:
            return None
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


def candidate_sets(
    sessions: sessionmaker[Session], round_idx: int, split: str = "train"
) -> list[CandidateSet]:
    """`FeedbackStore.candidate_sets` over `sessions`."""
    in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
    with sessions() as session:
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


def candidate_ids(
    sessions: sessionmaker[Session], round_idx: int, split: str = "train"
) -> dict[str, list[int]]:
    """`FeedbackStore.candidate_ids` over `sessions`."""
    with sessions() as session:
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


def unjudged_items(
    sessions: sessionmaker[Session], round_idx: int, annotator: str, split: str = "train"
) -> list[str]:
    """`FeedbackStore.unjudged_items` over `sessions`."""
    judged = select(JudgmentRow.id).where(
        JudgmentRow.item_id == ItemRow.id, JudgmentRow.annotator == annotator
    )
    with sessions() as session:
        return list(session.scalars(
            select(ItemRow.example_id)
            .where(ItemRow.round_idx == round_idx, ItemRow.split == split, ~judged.exists())
            .order_by(ItemRow.id)
        ))


def round_counts(sessions: sessionmaker[Session], round_idx: int, split: str = "train") -> dict[str, int]:
    """`FeedbackStore.round_counts` over `sessions`."""
    in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
    judged = select(JudgmentRow.id, JudgmentRow.item_id).join(ItemRow).where(*in_round).subquery()
    with sessions() as session:
        return {
            "items": session.scalar(select(func.count()).select_from(ItemRow).where(*in_round)),
            "judged_items": session.scalar(select(func.count(judged.c.item_id.distinct()))),
            "judgments": session.scalar(select(func.count()).select_from(judged)),
        }


def num_judgments(
    sessions: sessionmaker[Session], upto_round: int | None = None,
    kinds: Collection[str] | None = None,
    round_idx: int | None = None,
) -> int:
    """`FeedbackStore.num_judgments` over `sessions`."""
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
            check_kind(kind)
        stmt = (stmt.join(AnnotatorRow, AnnotatorRow.name == JudgmentRow.annotator)
                .where(AnnotatorRow.kind.in_(kinds)))
    with sessions() as session:
        return session.scalar(stmt)


def judgments_version(sessions: sessionmaker[Session]) -> tuple:
    """`FeedbackStore.judgments_version` over `sessions`."""
    with sessions() as session:
        return tuple(session.execute(select(
            func.count(JudgmentRow.id), func.max(JudgmentRow.id), func.max(JudgmentRow.updated_at))).one())


def annotator_kinds(sessions: sessionmaker[Session]) -> dict[str, str]:
    """`FeedbackStore.annotator_kinds` over `sessions`."""
    with sessions() as session:
        return dict(session.execute(
            select(AnnotatorRow.name, AnnotatorRow.kind).order_by(AnnotatorRow.name)).all())


def judgment_history(sessions: sessionmaker[Session], item_id: int, annotator: str) -> list[dict[str, Any]]:
    """`FeedbackStore.judgment_history` over `sessions`."""
    if not is_row_id(item_id):
        return []
    with sessions() as session:
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
    sessions: sessionmaker[Session], split: str | None = "train",
    round_idx: int | None = None,
    upto_round: int | None = None,
    from_round: int | None = None,
) -> list[JudgedItem]:
    """`FeedbackStore.judged_items` over `sessions`."""
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
    with sessions() as session, _gc_paused():  # millions of small objects: see _gc_paused
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
        judgments: dict[int, list[Judgment]] = {}
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
                    judgments.setdefault(row.item_id, []).append(Judgment(
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


def judgments_table(sessions: sessionmaker[Session], upto_round: int | None = None) -> list[dict[str, Any]]:
    """`FeedbackStore.judgments_table` over `sessions`."""
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
    with sessions() as session:
        return [dict(row) for row in session.execute(stmt).mappings()]


def is_duplicate(
    sessions: sessionmaker[Session], round_idx: int, split: str, example_id: str, annotator: str,
    client_token: str | None,
) -> bool:
    """Whether `annotator` judged the item, or `client_token` was used: a write that lost to an equal one."""
    with sessions() as session:
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
