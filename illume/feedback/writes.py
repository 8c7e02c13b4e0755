"""The store's writes: rounds, items and candidates, priorities, and judgments (the one judgment-write path).

Assumptions, up front:
- Every public write of the store is ONE transaction (a `WriteSessions.begin()` block): after kill -9 at any point
  the store holds either all of a call's rows or none of them. Writes are idempotent (re-adding items skips
  existing ones, a second judgment by the same annotator or with a used `client_token` is refused), so a resumed
  run just repeats the call it was killed in.
- Several annotators may judge one item, each once (unique (item, annotator)). Off SQLite, writers run at once:
  the unique constraints decide which of two equal judgments is stored (the other is answered as a repeat), and a
  new round or annotator is inserted in a savepoint.
- An annotator's kind is data: the first judgment by a name registers (name, kind) in the same transaction
  (`register_annotator`) and a later write under that name with another kind is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from numbers import Integral
from typing import Any, NamedTuple

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from illume.data.records import SPLITS, CandidateSet
from illume.feedback.engine import WriteSessions
from illume.feedback.schema import (
    AnnotatorRow,
    CandidateRow,
    DecisionRow,
    ItemRow,
    JudgmentRevisionRow,
    JudgmentRow,
    RoundRow,
    check_kind,
    utc_now,
)

_MAX_IN = 500  # look items up with IN (...) below this many ids, else read the whole round


class NewJudgment(NamedTuple):
    """One annotator's judgment of one item, in flight, by example id: what a critic decides (`illume.critics`,
    `reward.critic`, `reward.judge`) and `FeedbackStore.add_judgment(s)` stores (a plain (example_id, accepted,
    none_fit, seconds) tuple is one too). Checked and resolved to ids, it is written as a `ResolvedJudgment`."""

    example_id: str
    accepted: Sequence[int | str]
    """The accepted candidates, by id (`FeedbackStore.candidate_ids`) or by text; the others are rejected."""
    none_fit: bool = False
    """The explicit "none of them fits" (then nothing is accepted)."""
    seconds: float | None = None
    """Time spent on the item, when known."""


@dataclass(frozen=True)
class ResolvedJudgment:
    """One annotator's judgment of one item as it is written (`write_judgments`, `revise_judgment`), validated:
    by item and candidate ids (a `NewJudgment` resolved by `insert_judgments`, or the annotation page's)."""

    item_id: int
    candidate_ids: Sequence[int]
    """Every candidate of the item, in drawn order: each gets a decision."""
    accepted: Collection[int]
    """Ids of the accepted candidates (of `candidate_ids`); the others are rejected."""
    none_fit: bool = False
    """The explicit "none of them fits" (then nothing is accepted)."""
    seconds: float | None = None
    """Time spent on the item, when known."""
    client_token: str | None = None
    """A client's id for the submission (the annotation page): a used one is refused."""
    correction: str | None = None
    """The rationale written because none fit (`check_correction`)."""
    shown_order: Sequence[int] | None = None
    """`candidate_ids` in the order the annotator saw them (`decisions.position_shown`); None: not recorded."""


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


def mark_sampled(sessions: WriteSessions, round_idx: int) -> None:
    """`FeedbackStore.mark_sampled` over `sessions`."""
    with sessions.begin() as session:
        row = _get_or_add_round(session, round_idx)
        row.sampled_at = row.sampled_at or utc_now()


def mark_trained(sessions: WriteSessions, round_idx: int) -> None:
    """`FeedbackStore.mark_trained` over `sessions`."""
    with sessions.begin() as session:
        row = _get_or_add_round(session, round_idx)
        row.trained_at = row.trained_at or utc_now()


def set_round_metrics(sessions: WriteSessions, round_idx: int, metrics: Mapping[str, Any]) -> None:
    """`FeedbackStore.set_round_metrics` over `sessions`."""
    with sessions.begin() as session:
        _get_or_add_round(session, round_idx).metrics = dict(metrics)


def add_candidate_sets(
    sessions: WriteSessions, round_idx: int,
    split: str,
    candidate_sets: Iterable[CandidateSet],
    image_refs: Mapping[str, str] | None = None,
    questions: Mapping[str, str] | None = None,
) -> int:
    """`FeedbackStore.add_candidate_sets` over `sessions`."""
    _check_split(split)
    image_refs = image_refs or {}
    questions = questions or {}
    with sessions.begin() as session:
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


def set_priorities(
    sessions: WriteSessions, round_idx: int, priorities: Mapping[str, float | None], split: str = "train"
) -> None:
    """`FeedbackStore.set_priorities` over `sessions`."""
    with sessions.begin() as session:
        ids = dict(session.execute(select(ItemRow.example_id, ItemRow.id).where(
            ItemRow.round_idx == round_idx, ItemRow.split == split)).all())
        rows = [{"id": ids[example_id], "priority": priority} for example_id, priority in priorities.items()
                if example_id in ids]
        if rows:
            session.execute(update(ItemRow), rows)


def insert_judgments(
    session: Session,
    round_idx: int,
    split: str,
    annotator: str,
    judgments: Sequence[NewJudgment],
    client_tokens: list[str | None],
    kind: str,
    corrections: list[str | None] | None = None,
) -> int:
    """The critics' judgments by example id (`FeedbackStore.add_judgment(s)`): validate every one, skip the items
    the annotator already judged and the used client tokens, and write the rest (`write_judgments`); returns how
    many were written."""
    judgments = [NewJudgment(*judgment) for judgment in judgments]  # a plain tuple is a NewJudgment too
    corrections = corrections or [None] * len(judgments)
    if not annotator:
        raise ValueError("annotator must be a non-empty name")
    check_annotator_kind(session, annotator, kind)
    example_ids = {judgment.example_id for judgment in judgments}
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

    validated = []  # (item_id, accepted candidate ids, judgment, token, correction)
    for judgment, token, correction in zip(judgments, client_tokens, corrections):
        example_id, accepted, none_fit, _ = judgment
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
        validated.append((item_id, accepted_ids, judgment, token, correction))

    done = set(session.scalars(
        select(JudgmentRow.item_id).join(ItemRow).where(JudgmentRow.annotator == annotator, *in_round)
    ))
    tokens = {token for token in client_tokens if token is not None}
    used_tokens = set(session.scalars(
        select(JudgmentRow.client_token).where(JudgmentRow.client_token.in_(tokens))
    )) if tokens else set()
    new = []
    for item_id, accepted_ids, judgment, token, correction in validated:
        if item_id in done or (token is not None and token in used_tokens):
            continue
        done.add(item_id)
        if token is not None:
            used_tokens.add(token)
        new.append((item_id, accepted_ids, judgment, token, correction))
    if not new:
        return 0
    write_judgments(session, annotator, kind, [
        ResolvedJudgment(item_id=item_id,
                         candidate_ids=[candidate_id for candidate_id, _ in candidates.get(item_id, [])],
                         accepted=accepted_ids, none_fit=bool(judgment.none_fit), seconds=judgment.seconds,
                         client_token=token, correction=correction)
        for item_id, accepted_ids, judgment, token, correction in new
    ])
    return len(new)


def write_judgments(
    session: Session, annotator: str, kind: str, judgments: Sequence[ResolvedJudgment], created_at: datetime | None = None
) -> list[int]:
    """Insert judgments by one annotator, each with a decision for every candidate of its item, in the caller's
    transaction; the annotator's first judgment registers its kind. Returns the new judgments' ids, in order.

    The one place a judgment is inserted: the critics' batches (`insert_judgments`, by example id) and the
    annotation page (`illume.feedback.queue.AnnotationQueue.submit_judgment`, by item id, with leases and
    conflicts) validate first and end here. The caller has checked that the annotator did not judge these items
    and that the client tokens are unused; the unique constraints refuse what a concurrent writer stored meanwhile
    (IntegrityError, rolled back with the caller's transaction).

    Args:
        created_at: When the judgments were made (the page's clock, for tests); None: the clock at insert.

    Raises:
        ValueError: An unknown `kind`, or one other than the annotator's registered kind.
    """
    if not judgments:
        return []
    if not check_annotator_kind(session, annotator, kind):
        register_annotator(session, annotator, kind)
    when = {} if created_at is None else {"created_at": created_at}
    judgment_ids = session.scalars(insert(JudgmentRow).returning(JudgmentRow.id, sort_by_parameter_order=True), [
        {"item_id": j.item_id, "annotator": annotator, "none_fit": bool(j.none_fit), "seconds": j.seconds,
         "client_token": j.client_token, "correction": j.correction, **when}
        for j in judgments
    ]).all()
    decisions = [row for judgment_id, judgment in zip(judgment_ids, judgments)
                 for row in _decision_rows(judgment_id, judgment)]
    if decisions:
        session.execute(insert(DecisionRow), decisions)
    return list(judgment_ids)


def revise_judgment(session: Session, row: JudgmentRow, judgment: ResolvedJudgment, revised_at: datetime) -> None:
    """Replace the judgment `row` (locked by the caller) by `judgment`, in the caller's transaction.

    The version replaced is first copied into `judgment_revisions` (`FeedbackStore.judgment_history`). The
    judgment keeps its id, `created_at` and client token (the caller sets a new one); its decisions are replaced
    by exactly the new ones, `updated_at` is set, and `seconds` (the time spent revising) is added to the time
    already recorded. The shown order is `judgment.shown_order` if given, else the one recorded before.
    """
    shown_order = judgment.shown_order
    if shown_order is None:
        shown = dict(session.execute(
            select(DecisionRow.candidate_id, DecisionRow.position_shown)
            .where(DecisionRow.judgment_id == row.id, DecisionRow.position_shown.is_not(None))
        ).all())
        if set(shown) == set(judgment.candidate_ids):
            shown_order = sorted(shown, key=shown.__getitem__)
    previous = sorted(session.scalars(select(DecisionRow.candidate_id).where(
        DecisionRow.judgment_id == row.id, DecisionRow.accepted.is_(True))))
    session.execute(insert(JudgmentRevisionRow).values(
        judgment_id=row.id, none_fit=row.none_fit, accepted=previous, seconds=row.seconds,
        judged_at=row.updated_at or row.created_at, revised_at=revised_at, correction=row.correction,
    ))
    row.none_fit = bool(judgment.none_fit)
    row.correction = judgment.correction
    if judgment.seconds is not None:
        row.seconds = (row.seconds or 0.0) + judgment.seconds
    row.updated_at = revised_at
    session.execute(delete(DecisionRow).where(DecisionRow.judgment_id == row.id))
    decisions = _decision_rows(row.id, dataclasses.replace(judgment, shown_order=shown_order))
    if decisions:
        session.execute(insert(DecisionRow), decisions)


def _decision_rows(judgment_id: int, judgment: ResolvedJudgment) -> list[dict[str, Any]]:
    """One decision per candidate of the item, in drawn order, with its place in the order shown (if known)."""
    shown = judgment.shown_order
    position = {candidate_id: i for i, candidate_id in enumerate(shown)} if shown else {}
    return [{"judgment_id": judgment_id, "candidate_id": candidate_id, "accepted": candidate_id in judgment.accepted,
             "position_shown": position.get(candidate_id)} for candidate_id in judgment.candidate_ids]


def check_annotator_kind(session: Session, annotator: str, kind: str) -> bool:
    """Refuse an unknown kind, or one other than the annotator's registered kind; True if registered."""
    check_kind(kind)
    stored = session.scalar(select(AnnotatorRow.kind).where(AnnotatorRow.name == annotator))
    if stored is not None and stored != kind:
        raise ValueError(f"annotator {annotator!r} is registered as kind {stored!r}, not {kind!r}: an "
                         "annotator's kind never changes (judge under another name)")
    return stored is not None


def register_annotator(session: Session, annotator: str, kind: str) -> None:
    """Register (annotator, kind) in the caller's transaction, before its first judgment is inserted."""
    try:
        with session.begin_nested():  # a savepoint: a concurrent first write (off SQLite) may win the race
            session.execute(insert(AnnotatorRow).values(name=annotator, kind=kind, created_at=utc_now()))
    except IntegrityError:
        if not check_annotator_kind(session, annotator, kind):
            raise


def _get_or_add_round(session: Session, round_idx: int) -> RoundRow:
    row = session.get(RoundRow, round_idx)
    if row is None:
        try:
            with session.begin_nested():  # a savepoint: off SQLite a concurrent writer may add the round first
                session.execute(insert(RoundRow).values(round_idx=round_idx, created_at=utc_now()))
        except IntegrityError:
            pass
        row = session.get(RoundRow, round_idx)
    return row





def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")