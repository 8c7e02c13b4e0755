"""How well annotators agree, and what each did: the statistics behind the admin page.

Pure functions over `FeedbackStore.judged_items(...)`; nothing here reads the store or decides what was
accepted (that is `illume.feedback.verdicts`, whose `PEOPLE` and `AGGREGATES` are used as they are).
Assumptions, up front:

- **The unit of agreement** is one candidate of one item. Each counted judgment that was shown the
  candidate gives it a value, accepted (True) or not (False); "none fits" (with or without a written
  correction) rejects every candidate shown. A candidate with fewer than two counted values is not pairable
  and does not enter alpha.
- **Who counts** is decided by annotator kind (`kinds`), never by name: people (`PEOPLE`: person and
  simulated) by default; `kinds=None` counts every kind. The reward model is compared with people
  separately (`reward_vs_people`), not mixed into alpha.
- **Undefined alpha is None** (not nan), so that every result serialises to JSON as it is: no pairable
  unit, or a single value used throughout (everyone always accepts: agreement is perfect but alpha,
  which compares it with chance, is 0/0).
- **One split at a time**: results are grouped by round only, so pass `judged_items(split)` (train, the
  default) rather than every split mixed.
- **Cheap**: each function makes one pass over the items and looks only at their judgments' decisions,
  so the page can poll it every few seconds on stores with thousands of items.
- Every result is plain dicts, lists, str, int, float, bool and None; datetimes as ISO 8601 strings.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from illume.feedback.reads import CandidateInfo, JudgedItem, Judgment
from illume.feedback.verdicts import ACCEPTED, AGGREGATES, CONTESTED, DEFAULT_AGGREGATE, PEOPLE

REWARD = frozenset({"reward"})
"""Annotator kinds compared with people by `reward_vs_people` by default."""


# -------------------------------------------------------------------- Krippendorff's alpha


class _Coincidences:
    """Nominal Krippendorff's alpha from the diagonal of the coincidence matrix, one unit at a time.

    For a pairable unit with m values of which n_uc are c, the coincidence matrix gains
    o_cc += n_uc (n_uc - 1) / (m - 1) on its diagonal and n_c += n_uc on its margins; nominal alpha only
    needs these: alpha = 1 - (n - 1) (n - sum_c o_cc) / (n^2 - sum_c n_c^2), with n = sum_c n_c
    (Krippendorff 2011, "Computing Krippendorff's alpha-reliability", sections A and C).
    """

    def __init__(self) -> None:
        self.totals: dict[Hashable, int] = {}
        self.matches: dict[Hashable, float] = {}

    def add(self, counts: Mapping[Hashable, int]) -> None:
        """Add one unit given as value -> how many coders gave it; units with < 2 values are skipped."""
        m = sum(counts.values())
        if m < 2:
            return
        for value, count in counts.items():
            if count:
                self.totals[value] = self.totals.get(value, 0) + count
                self.matches[value] = self.matches.get(value, 0.0) + count * (count - 1) / (m - 1)

    def merge(self, other: _Coincidences) -> None:
        for value, total in other.totals.items():
            self.totals[value] = self.totals.get(value, 0) + total
            self.matches[value] = self.matches.get(value, 0.0) + other.matches[value]

    def alpha(self) -> float | None:
        n = sum(self.totals.values())
        expected = n * n - sum(total * total for total in self.totals.values())
        if expected == 0:  # no pairable unit, or one value throughout
            return None
        return 1.0 - (n - 1) * (n - sum(self.matches.values())) / expected


def _is_missing(value: object) -> bool:
    return value is None or value != value  # nan (float or numpy) is the only value unequal to itself


def krippendorff_alpha(units: Iterable[Sequence[Any] | Mapping[Any, Any]]) -> float | None:
    """Nominal Krippendorff's alpha of reliability data given unit by unit.

    Args:
        units: One entry per unit: the values its coders gave, as a sequence (one slot per coder) or a
            mapping (coder -> value). None or nan is a missing value. Values are compared for equality
            only (nominal); they must be hashable. A coders x units matrix (the `krippendorff` package's
            `reliability_data`) is given as its transpose.

    Returns:
        Alpha (1 = perfect agreement, 0 = chance, < 0 = systematic disagreement); None when undefined: no
        unit has two or more values, or a single value is used throughout.
    """
    coincidences = _Coincidences()
    for unit in units:
        values = unit.values() if isinstance(unit, Mapping) else unit
        counts: dict[Hashable, int] = {}
        for value in values:
            if not _is_missing(value):
                counts[value] = counts.get(value, 0) + 1
        coincidences.add(counts)
    return coincidences.alpha()


# -------------------------------------------------------------------- one item, tallied


@dataclass
class _Tally:
    """One item as the counted judgments saw it."""

    item: JudgedItem
    judgments: list[Judgment]
    """The counted judgments, in the order stored."""
    candidates: list[tuple[CandidateInfo, list[str], list[str]]]
    """Each candidate with the counted annotators that accepted it and that rejected it."""
    disputed: int = field(init=False)
    """How many candidates some counted annotator accepted and another rejected."""
    minority_share: float = field(init=False)
    """On the most divided candidate, the smaller side's share of its values: 0 (none disputed) to 0.5."""

    def __post_init__(self) -> None:
        shares = [min(len(a), len(r)) / (len(a) + len(r)) for _, a, r in self.candidates if a and r]
        self.disputed = len(shares)
        self.minority_share = max(shares, default=0.0)


def _tally(item: JudgedItem, kinds: Collection[str] | None) -> _Tally:
    counted = [j for j in item.judgments if kinds is None or j.annotator_kind in kinds]
    candidates = []
    for candidate in item.candidates:
        accepted_by, rejected_by = [], []
        for judgment in counted:
            decision = judgment.decisions.get(candidate.id)
            if decision is not None:
                (accepted_by if decision else rejected_by).append(judgment.annotator)
        candidates.append((candidate, accepted_by, rejected_by))
    return _Tally(item, counted, candidates)


def _add_units(coincidences: _Coincidences, tally: _Tally) -> None:
    for _, accepted_by, rejected_by in tally.candidates:
        coincidences.add({True: len(accepted_by), False: len(rejected_by)})


def _correction(judgment: Judgment) -> str | None:
    """The rationale written when none fit; read with getattr so that a Judgment built without one works too."""
    text = getattr(judgment, "correction", None)
    return text if text and text.strip() else None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _sorted_kinds(kinds: Collection[str] | None) -> list[str] | None:
    return None if kinds is None else sorted(kinds)


# -------------------------------------------------------------------- agreement


def agreement(items: Iterable[JudgedItem], kinds: Collection[str] | None = PEOPLE) -> dict[int, float | None]:
    """Krippendorff's alpha (nominal) of the counted annotators' accept/reject decisions, per round.

    Args:
        items: Judged items, e.g. `store.judged_items(split)`.
        kinds: The annotator kinds that count (None: every kind).

    Returns:
        Round -> alpha over every (item, candidate) of the round seen by >= 2 counted annotators; None where
        undefined (see the module docstring). Rounds in the order first met.
    """
    per_round: dict[int, _Coincidences] = {}
    for item in items:
        _add_units(per_round.setdefault(item.round_idx, _Coincidences()), _tally(item, kinds))
    return {round_idx: coincidences.alpha() for round_idx, coincidences in per_round.items()}


# -------------------------------------------------------------------- disagreements and one item


def _item_header(item: JudgedItem) -> dict[str, Any]:
    return {"item_id": item.item_id, "round_idx": item.round_idx, "split": item.split,
            "example_id": item.example_id, "question": item.question}


def disagreements(
    items: Iterable[JudgedItem], kinds: Collection[str] | None = PEOPLE, limit: int | None = None,
) -> list[dict[str, Any]]:
    """The items where counted annotators disagree on at least one candidate, most divided first.

    Args:
        items: Judged items, e.g. `store.judged_items(split, round_idx=r)`.
        kinds: The annotator kinds that count (None: every kind).
        limit: At most this many (after sorting); None: all.

    Returns:
        `[{"item_id" (the store's row id), "round_idx", "split", "example_id", "question" (None if not
        stored), "annotators" (counted, in judgment order), "minority_share" (on the most divided candidate,
        the smaller side's share: 0.5 = an even split), "disputed_candidates" (how many are disputed),
        "none_fit_by" (annotators who chose "none fits"), "corrections" ({annotator: rationale written}),
        "candidates": [{"id", "text", "position", "accepted_by", "rejected_by", "disputed"}, ...] (drawn
        order)}, ...]`, sorted by minority_share, then disputed_candidates (both descending), then round and
        item.
    """
    found = [tally for tally in (_tally(item, kinds) for item in items) if tally.disputed]
    found.sort(key=lambda t: (-t.minority_share, -t.disputed, t.item.round_idx, t.item.item_id or 0,
                              t.item.example_id))
    return [
        {
            **_item_header(tally.item),
            "annotators": [j.annotator for j in tally.judgments],
            "minority_share": tally.minority_share,
            "disputed_candidates": tally.disputed,
            "none_fit_by": [j.annotator for j in tally.judgments if j.none_fit],
            "corrections": {j.annotator: text for j in tally.judgments
                            if (text := _correction(j)) is not None},
            "candidates": [
                {"id": c.id, "text": c.text, "position": c.position, "accepted_by": accepted_by,
                 "rejected_by": rejected_by, "disputed": bool(accepted_by and rejected_by)}
                for c, accepted_by, rejected_by in tally.candidates
            ],
        }
        for tally in found[:limit]
    ]


def item_detail(item: JudgedItem, kinds: Collection[str] | None = None) -> dict[str, Any]:
    """Who chose what on one item.

    Args:
        item: One judged item (e.g. found by `item_id` among `store.judged_items(...)`).
        kinds: The annotator kinds to show (None, the default: every kind, the reward model included).

    Returns:
        `{"item_id", "round_idx", "split", "example_id", "question", "prompt", "answer", "predicted_answer",
        "image_ref", "candidates": [{"id", "text", "position", "model", "accepted_by", "rejected_by"}, ...]
        (drawn order), "judgments": [{"annotator", "kind", "accepted_ids", "accepted_texts" (drawn order),
        "none_fit", "correction" (None if none written), "seconds", "created_at", "updated_at" (ISO, or
        None)}, ...] (order stored)}`.
    """
    tally = _tally(item, kinds)
    texts = {c.id: c.text for c in item.candidates}
    order = {c.id: c.position for c in item.candidates}
    judgments = []
    for j in tally.judgments:
        accepted = sorted((cid for cid, ok in j.decisions.items() if ok),
                          key=lambda cid: (order.get(cid, 0), cid))
        judgments.append({
            "annotator": j.annotator, "kind": j.annotator_kind, "accepted_ids": accepted,
            "accepted_texts": [texts.get(cid) for cid in accepted], "none_fit": bool(j.none_fit),
            "correction": _correction(j), "seconds": j.seconds, "created_at": _iso(j.created_at),
            "updated_at": _iso(j.updated_at),
        })
    return {
        **_item_header(item),
        "prompt": item.prompt, "answer": item.answer, "predicted_answer": item.predicted_answer,
        "image_ref": item.image_ref,
        "candidates": [
            {"id": c.id, "text": c.text, "position": c.position, "model": c.model, "accepted_by": accepted_by,
             "rejected_by": rejected_by}
            for c, accepted_by, rejected_by in tally.candidates
        ],
        "judgments": judgments,
    }


# -------------------------------------------------------------------- the reward model against people


@dataclass
class _Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    items: int = 0
    contested: int = 0

    def as_dict(self) -> dict[str, Any]:
        n = self.tp + self.fp + self.fn + self.tn
        return {
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn, "n": n,
            "precision": self.tp / (self.tp + self.fp) if self.tp + self.fp else None,
            "recall": self.tp / (self.tp + self.fn) if self.tp + self.fn else None,
            "accuracy": (self.tp + self.tn) / n if n else None,
            "items": self.items, "contested": self.contested,
        }


def reward_vs_people(
    items: Iterable[JudgedItem],
    reward_kinds: Collection[str] = REWARD,
    people_kinds: Collection[str] = PEOPLE,
    aggregate: str = DEFAULT_AGGREGATE,
) -> dict[str, Any] | None:
    """The reward model's accepts scored against people's verdicts, on the candidates both judged.

    People's verdict on a candidate in an item is `AGGREGATES[aggregate]` of their accepts and rejects
    there (`illume.feedback.verdicts`, rule 4); contested candidates are skipped (counted in `contested`).
    Each reward-kind judgment's decision on a candidate is one prediction, "accepted" the positive class.

    Args:
        items: Judged items, e.g. `store.judged_items(split)`.
        reward_kinds: The annotator kinds scored (default: the reward model).
        people_kinds: The annotator kinds that make the reference verdict (default: `PEOPLE`).
        aggregate: `feedback.aggregate`, a key of `AGGREGATES`.

    Returns:
        None when no candidate has both a reward decision and an uncontested people's verdict; otherwise
        `{"aggregate", "tp", "fp", "fn", "tn", "n", "precision" (tp / (tp + fp)), "recall" (tp / (tp + fn)),
        "accuracy", "items" (items with both kinds of judgment), "contested" (reward decisions skipped on
        contested candidates), "rounds": [{"round_idx", same counts and scores}, ...] (ascending)}`, a score
        None when its denominator is 0.

    Raises:
        ValueError: An unknown aggregate, or a kind both scored and in the reference.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"feedback.aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if set(reward_kinds) & set(people_kinds):
        both = sorted(set(reward_kinds) & set(people_kinds))
        raise ValueError(f"kinds {both} are both scored and the reference")
    combine = AGGREGATES[aggregate]
    total, rounds = _Confusion(), {}
    for item in items:
        scored = [j for j in item.judgments if j.annotator_kind in reward_kinds]
        people = [j for j in item.judgments if j.annotator_kind in people_kinds]
        if not scored or not people:
            continue
        in_round = rounds.setdefault(item.round_idx, _Confusion())
        for confusion in (total, in_round):
            confusion.items += 1
        for candidate in item.candidates:
            said = [j.decisions.get(candidate.id) for j in people]
            accepts, rejects = said.count(True), said.count(False)
            if not accepts and not rejects:
                continue
            verdict = combine(accepts, rejects)
            for judgment in scored:
                predicted = judgment.decisions.get(candidate.id)
                if predicted is None:
                    continue
                for confusion in (total, in_round):
                    if verdict == CONTESTED:
                        confusion.contested += 1
                    elif predicted:
                        confusion.tp += verdict == ACCEPTED
                        confusion.fp += verdict != ACCEPTED
                    else:
                        confusion.fn += verdict == ACCEPTED
                        confusion.tn += verdict != ACCEPTED
    if total.tp + total.fp + total.fn + total.tn == 0:
        return None
    return {"aggregate": aggregate, **total.as_dict(),
            "rounds": [{"round_idx": r, **c.as_dict()} for r, c in sorted(rounds.items())]}
