"""Counts over every judgment, computed by the database: what `illume status` and the admin page show.

The team summary (`team_summary`, the admin page) and the figures of `illume status` used to be computed in
Python over `FeedbackStore.judged_items(...)`, i.e. after reading every judged item, candidate and decision of the
store; at a VQA-X-sized study (30 k items x 10 candidates x several rounds) that is seconds per call and
hundreds of MB. Here the same figures come from GROUP BY queries: Python receives a few rows per round and
annotator, never a table.

Assumptions, up front:
- The definitions are those of `illume.feedback.agreement` (its module docstring: who counts, what a unit of
  agreement is, what a disagreement is) and `illume.status`; the tests compare them with the same figures
  computed in Python on random stores (tests/test_figures.py; for the team summary that computation is the
  oracle in tests/team_summary_oracle.py, and illume has no other). Sums and means of `seconds` are added up by the database in its own order,
  so they may differ from the Python sums in the last bits; counts, medians and alpha's inputs are exact.
- What was accepted stays decided by `illume.feedback.verdicts`: `items_with_accepted` asks the database
  which (accepts, rejects) counts occur, applies `AGGREGATES[aggregate]` to each in Python, and lets the
  database count the items with a candidate whose counts give "accepted".
- One split at a time; a judgment counts when its annotator's registered kind is in `kinds` (None: every
  kind).
- Part of the store's package boundary, like `illume.feedback.queue`: it reads the store's tables through the
  store's read sessions (tests/test_store.py lists the modules allowed to).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import Integer, and_, case, cast, false, func, or_, select
from sqlalchemy.sql import Select

from illume.feedback.agreement import PEOPLE, _Coincidences, _sorted_kinds
from illume.feedback.schema import AnnotatorRow, DecisionRow, ItemRow, JudgmentRow
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import ACCEPTED, AGGREGATES, DEFAULT_AGGREGATE

_ACCEPTED = cast(case((DecisionRow.accepted, 1), else_=0), Integer)
_REJECTED = cast(case((DecisionRow.accepted, 0), else_=1), Integer)


def _counted(stmt: Select, split: str | None, kinds: Collection[str] | None) -> Select:
    """`stmt` (which selects from judgments) joined to the items and annotators it needs, filtered."""
    stmt = stmt.join(ItemRow, ItemRow.id == JudgmentRow.item_id)
    if split is not None:
        stmt = stmt.where(ItemRow.split == split)
    if kinds is not None:
        stmt = (stmt.join(AnnotatorRow, AnnotatorRow.name == JudgmentRow.annotator)
                .where(AnnotatorRow.kind.in_(sorted(kinds))))
    return stmt


def _candidate_counts(split: str | None, kinds: Collection[str] | None) -> Any:
    """Per (round, item, candidate) judged by a counted judgment: a (accepts) and r (rejects), a subquery."""
    # Grouped by the candidate alone (its item and round follow from it): the database walks the decisions in
    # the order of their candidate_id index instead of sorting a million rows.
    stmt = select(func.max(ItemRow.round_idx).label("round_idx"), func.max(JudgmentRow.item_id).label("item_id"),
                  DecisionRow.candidate_id, func.sum(_ACCEPTED).label("a"), func.sum(_REJECTED).label("r")) \
        .select_from(DecisionRow).join(JudgmentRow, JudgmentRow.id == DecisionRow.judgment_id)
    return _counted(stmt, split, kinds).group_by(DecisionRow.candidate_id).subquery()


def coincidences(store: FeedbackStore, split: str | None = "train", kinds: Collection[str] | None = PEOPLE
                 ) -> dict[int, _Coincidences]:
    """Round -> the coincidence sums of Krippendorff's alpha over every (item, candidate) with >= 2 counted
    values (`agreement.agreement`); rounds without a pairable unit are left out."""
    units = _candidate_counts(split, kinds)
    out: dict[int, _Coincidences] = {}
    with store.read_sessions() as session:
        for round_idx, accepts, rejects, count in session.execute(
            select(units.c.round_idx, units.c.a, units.c.r, func.count())
            .where(units.c.a + units.c.r >= 2).group_by(units.c.round_idx, units.c.a, units.c.r)
            .order_by(units.c.round_idx, units.c.a, units.c.r)
        ):
            coincidence = out.setdefault(round_idx, _Coincidences())
            for _ in range(count):
                coincidence.add({True: int(accepts), False: int(rejects)})
    return out


def items_with_accepted(store: FeedbackStore, split: str | None = "train", aggregate: str = DEFAULT_AGGREGATE,
                        kinds: Collection[str] | None = None) -> dict[int, int]:
    """Round -> how many items have a candidate accepted in them (`Feedback.items_with_accepted`), rounds
    with none left out; the verdict of each (accepts, rejects) is `AGGREGATES[aggregate]`'s."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"feedback.aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    units = _candidate_counts(split, kinds)
    with store.read_sessions() as session:
        pairs = session.execute(select(units.c.a, units.c.r).distinct()).all()
        accepting = [(int(a), int(r)) for a, r in pairs if AGGREGATES[aggregate](int(a), int(r)) == ACCEPTED]
        if not accepting:
            return {}
        chosen = or_(*(and_(units.c.a == a, units.c.r == r) for a, r in accepting)) if accepting else false()
        return {round_idx: count for round_idx, count in session.execute(
            select(units.c.round_idx, func.count(units.c.item_id.distinct())).where(chosen)
            .group_by(units.c.round_idx).order_by(units.c.round_idx))}


def _medians(store: FeedbackStore, split: str | None, kinds: Collection[str] | None, by_round: bool
             ) -> dict[tuple, float]:
    """(round, annotator) (by_round) or (annotator,) -> median of `seconds` over judgments with a time."""
    keys = [ItemRow.round_idx, JudgmentRow.annotator] if by_round else [JudgmentRow.annotator]
    ranked = _counted(select(*keys, JudgmentRow.seconds,
                             func.row_number().over(partition_by=keys, order_by=JudgmentRow.seconds).label("rank"),
                             func.count().over(partition_by=keys).label("n")).select_from(JudgmentRow),
                      split, kinds).where(JudgmentRow.seconds.is_not(None)).subquery()
    columns = [ranked.c.round_idx, ranked.c.annotator] if by_round else [ranked.c.annotator]
    middle: dict[tuple, list[float]] = {}
    with store.read_sessions() as session:
        for row in session.execute(
            select(*columns, ranked.c.seconds).where(
                ranked.c.rank >= (ranked.c.n + 1) // 2, ranked.c.rank <= (ranked.c.n + 2) // 2)
            .order_by(*columns, ranked.c.rank)
        ):
            middle.setdefault(tuple(row[:-1]), []).append(row[-1])
    # As statistics.median: the middle value, or the mean of the two middle ones.
    return {key: values[0] if len(values) == 1 else (values[0] + values[1]) / 2 for key, values in middle.items()}


def annotator_figures(store: FeedbackStore, split: str | None = "train", kinds: Collection[str] | None = PEOPLE,
                      by_round: bool = False) -> dict[tuple, dict[str, Any]]:
    """What each counted annotator did, per (round, annotator) or per (annotator,).

    Returns:
        key -> {"kind", "items" (judgments), "none_fit", "shown" (decisions), "accepted", "corrections",
        "seconds_count", "seconds_sum", "median_seconds" (None without a time), "last" (latest created_at or
        updated_at)}.
    """
    keys = [ItemRow.round_idx, JudgmentRow.annotator] if by_round else [JudgmentRow.annotator]
    judgments = _counted(select(
        *keys, func.max(AnnotatorRow.kind), func.count(JudgmentRow.id),
        func.sum(cast(case((JudgmentRow.none_fit, 1), else_=0), Integer)),
        func.sum(case((func.trim(func.coalesce(JudgmentRow.correction, "")) != "", 1), else_=0)),
        func.count(JudgmentRow.seconds), func.sum(JudgmentRow.seconds),
        func.max(JudgmentRow.created_at), func.max(JudgmentRow.updated_at),
    ).select_from(JudgmentRow), split, kinds)
    if kinds is None:
        judgments = judgments.outerjoin(AnnotatorRow, AnnotatorRow.name == JudgmentRow.annotator)
    decisions = _counted(select(*keys, func.count(), func.sum(_ACCEPTED)).select_from(DecisionRow)
                         .join(JudgmentRow, JudgmentRow.id == DecisionRow.judgment_id), split, kinds)
    width = len(keys)
    out: dict[tuple, dict[str, Any]] = {}
    with store.read_sessions() as session:
        for row in session.execute(judgments.group_by(*keys)):
            key = tuple(row[:width])
            kind, items, none_fit, corrections, seconds_count, seconds_sum, created, updated = row[width:]
            out[key] = {"kind": kind, "items": items, "none_fit": int(none_fit or 0), "shown": 0, "accepted": 0,
                        "corrections": int(corrections or 0), "seconds_count": seconds_count,
                        "seconds_sum": seconds_sum or 0.0, "median_seconds": None,
                        "last": max(created, updated) if updated is not None else created}
        for row in session.execute(decisions.group_by(*keys)):
            figures = out[tuple(row[:width])]
            figures["shown"], figures["accepted"] = row[width], int(row[width + 1] or 0)
    for key, median in _medians(store, split, kinds, by_round).items():
        out[key]["median_seconds"] = median
    return out


def _item_figures(store: FeedbackStore, split: str | None, kinds: Collection[str] | None) -> dict[int, dict]:
    """Round -> judged_items (>= 1 counted judgment), paired_items (>= 2), judgments, disagreement_items."""
    per_item = _counted(select(ItemRow.round_idx, JudgmentRow.item_id, func.count(JudgmentRow.id).label("k"))
                        .select_from(JudgmentRow), split, kinds) \
        .group_by(ItemRow.round_idx, JudgmentRow.item_id).subquery()
    units = _candidate_counts(split, kinds)
    out: dict[int, dict] = {}
    with store.read_sessions() as session:
        for round_idx, judged, paired, judgments in session.execute(
            select(per_item.c.round_idx, func.count(), func.sum(case((per_item.c.k >= 2, 1), else_=0)),
                   func.sum(per_item.c.k)).group_by(per_item.c.round_idx)
        ):
            out[round_idx] = {"judged_items": judged, "paired_items": int(paired or 0),
                              "judgments": int(judgments or 0), "disagreement_items": 0}
        for round_idx, disputed in session.execute(
            select(units.c.round_idx, func.count(units.c.item_id.distinct()))
            .where(units.c.a > 0, units.c.r > 0).group_by(units.c.round_idx)
        ):
            out[round_idx]["disagreement_items"] = disputed
    return out


def _person(name: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """One annotator as `team_summary` reports them."""
    items, shown, seconds = figures["items"], figures["shown"], figures["seconds_count"]
    return {
        "annotator": name,
        "kind": figures["kind"],
        "items_judged": items,
        "none_fit_rate": figures["none_fit"] / items if items else None,
        "accept_rate": figures["accepted"] / shown if shown else None,
        "median_seconds": figures["median_seconds"],
        "mean_seconds": figures["seconds_sum"] / seconds if seconds else None,
        "corrections": figures["corrections"],
        "last_activity": None if figures["last"] is None else figures["last"].isoformat(),
    }


def team_summary(store: FeedbackStore, items_per_round: Mapping[int, int] | None = None,
                 kinds: Collection[str] | None = PEOPLE, split: str = "train") -> dict[str, Any]:
    """Per round and in total: progress, agreement (alpha), disagreements, and what each annotator did, counted by
    the database (the admin page's team figures). The definitions are `illume.feedback.agreement`'s; the same
    summary computed in Python over `store.judged_items(split)` is the tests' oracle (tests/team_summary_oracle.py).

    Args:
        store: The feedback store.
        items_per_round: Round -> how many items it has (judged or not; `store.round_counts(r)["items"]`);
            its rounds are listed even when nothing in them is judged. None: `items` is reported as None.
        kinds: The annotator kinds that count (None: every kind); judgments of other kinds are ignored.
        split: The items' split.

    Returns:
        `{"kinds": sorted kinds or None, "rounds": [ROUND, ...] (ascending), "total": TOTAL}`, where ROUND is
        `{"round_idx", "items" (int | None), "judged_items" (>= 1 counted judgment), "paired_items" (>= 2),
        "judgments" (counted), "alpha" (float | None), "disagreement_items" (some candidate accepted by one
        counted annotator and rejected by another), "annotators": [PERSON, ...] (by name)}` and TOTAL is the
        same without round_idx, over all rounds (alpha pooled over every round's units). PERSON is
        `{"annotator", "kind", "items_judged", "none_fit_rate" (share of items judged "none fits"),
        "accept_rate" (share of candidates shown that were accepted), "median_seconds", "mean_seconds"
        (per item, over judgments with a time; None without any), "corrections" (judgments with a written
        rationale), "last_activity" (ISO time of the latest judgment or revision)}`. Rates are None when
        their denominator is 0. Rounds with a judged item of any kind are listed.
    """
    per_round = _item_figures(store, split, kinds)
    units = coincidences(store, split, kinds)
    people = annotator_figures(store, split, kinds, by_round=True)
    totals: dict[tuple, dict[str, Any]] = {}  # over every round: the rounds' figures added up
    for (_, name), figures in sorted(people.items()):
        total = totals.setdefault((name,), {**figures, "items": 0, "none_fit": 0, "shown": 0, "accepted": 0,
                                            "corrections": 0, "seconds_count": 0, "seconds_sum": 0.0})
        for key in ("items", "none_fit", "shown", "accepted", "corrections", "seconds_count", "seconds_sum"):
            total[key] += figures[key]
        total["last"] = max(total["last"], figures["last"])
    for name, median in _medians(store, split, kinds, by_round=False).items():
        totals[name]["median_seconds"] = median
    with store.read_sessions() as session:  # rounds with a judged item of any kind are listed (as agreement does)
        judged_rounds = set(session.scalars(_counted(select(ItemRow.round_idx).select_from(JudgmentRow), split,
                                                     None).distinct()))
    rounds = sorted(set(items_per_round or {}) | judged_rounds)
    sizes = items_per_round or {}
    known = items_per_round is not None
    empty = {"judged_items": 0, "paired_items": 0, "judgments": 0, "disagreement_items": 0}

    def as_dict(figures: Mapping[str, int], coincidence: _Coincidences, annotators: list, items: int | None):
        return {"items": items, "judged_items": figures["judged_items"], "paired_items": figures["paired_items"],
                "judgments": figures["judgments"], "alpha": coincidence.alpha(),
                "disagreement_items": figures["disagreement_items"], "annotators": annotators}

    total_units = _Coincidences()
    for coincidence in units.values():
        total_units.merge(coincidence)
    total = {key: sum(per_round.get(r, empty)[key] for r in rounds) for key in empty}
    return {
        "kinds": _sorted_kinds(kinds),
        "rounds": [{"round_idx": r, **as_dict(
            per_round.get(r, empty), units.get(r, _Coincidences()),
            [_person(name, figures) for (round_idx, name), figures in sorted(people.items()) if round_idx == r],
            sizes.get(r) if known else None)} for r in rounds],
        "total": as_dict(total, total_units, [_person(name, figures) for (name,), figures in sorted(totals.items())],
                         sum(sizes.values()) if known else None),
    }
