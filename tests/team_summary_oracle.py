"""The team summary computed in Python over `store.judged_items(split)`: the oracle that the one computation
illume ships, `illume.feedback.figures.team_summary` (counted by the database), is checked against
(tests/test_figures.py on random stores; tests/test_agreement.py checks this one against hand-computed values).

It is what `illume.feedback.agreement.team_summary` was before the figures moved into the database; it reads
every judged item into Python, so it is for tests and for scripts/store_history.py's "before" timing only.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from illume.feedback.agreement import (
    _add_units,
    _Coincidences,
    _correction,
    _iso,
    _sorted_kinds,
    _Tally,
    _tally,
)
from illume.feedback.reads import JudgedItem, Judgment
from illume.feedback.verdicts import PEOPLE


def _last_activity(judgment: Judgment) -> datetime:
    return max(judgment.created_at, judgment.updated_at or judgment.created_at)


@dataclass
class _AnnotatorStats:
    kind: str
    items: int = 0
    none_fit: int = 0
    shown: int = 0
    accepted: int = 0
    corrections: int = 0
    seconds: list[float] = field(default_factory=list)
    last: datetime | None = None

    def add(self, judgment: Judgment) -> None:
        self.items += 1
        self.none_fit += bool(judgment.none_fit)
        self.shown += len(judgment.decisions)
        self.accepted += sum(judgment.decisions.values())
        self.corrections += _correction(judgment) is not None
        if judgment.seconds is not None:
            self.seconds.append(judgment.seconds)
        moment = _last_activity(judgment)
        self.last = moment if self.last is None else max(self.last, moment)

    def merge(self, other: _AnnotatorStats) -> None:
        self.items += other.items
        self.none_fit += other.none_fit
        self.shown += other.shown
        self.accepted += other.accepted
        self.corrections += other.corrections
        self.seconds.extend(other.seconds)
        if other.last is not None:
            self.last = other.last if self.last is None else max(self.last, other.last)

    def as_dict(self, annotator: str) -> dict[str, Any]:
        return {
            "annotator": annotator,
            "kind": self.kind,
            "items_judged": self.items,
            "none_fit_rate": self.none_fit / self.items if self.items else None,
            "accept_rate": self.accepted / self.shown if self.shown else None,
            "median_seconds": statistics.median(self.seconds) if self.seconds else None,
            "mean_seconds": statistics.fmean(self.seconds) if self.seconds else None,
            "corrections": self.corrections,
            "last_activity": _iso(self.last),
        }


@dataclass
class _RoundStats:
    judged_items: int = 0
    paired_items: int = 0
    judgments: int = 0
    disagreement_items: int = 0
    coincidences: _Coincidences = field(default_factory=_Coincidences)
    annotators: dict[str, _AnnotatorStats] = field(default_factory=dict)

    def add(self, tally: _Tally) -> None:
        if not tally.judgments:
            return
        self.judged_items += 1
        self.paired_items += len(tally.judgments) >= 2
        self.judgments += len(tally.judgments)
        self.disagreement_items += tally.disputed > 0
        _add_units(self.coincidences, tally)
        for judgment in tally.judgments:
            person = self.annotators.setdefault(judgment.annotator, _AnnotatorStats(judgment.annotator_kind))
            person.add(judgment)

    def merge(self, other: _RoundStats) -> None:
        self.judged_items += other.judged_items
        self.paired_items += other.paired_items
        self.judgments += other.judgments
        self.disagreement_items += other.disagreement_items
        self.coincidences.merge(other.coincidences)
        for name, person in other.annotators.items():
            self.annotators.setdefault(name, _AnnotatorStats(person.kind)).merge(person)

    def as_dict(self, items: int | None) -> dict[str, Any]:
        return {
            "items": items,
            "judged_items": self.judged_items,
            "paired_items": self.paired_items,
            "judgments": self.judgments,
            "alpha": self.coincidences.alpha(),
            "disagreement_items": self.disagreement_items,
            "annotators": [stats.as_dict(name) for name, stats in sorted(self.annotators.items())],
        }


def team_summary(
    items: Iterable[JudgedItem],
    items_per_round: Mapping[int, int] | None = None,
    kinds: Collection[str] | None = PEOPLE,
) -> dict[str, Any]:
    """Per round and in total: progress, agreement (alpha), disagreements, and what each annotator did.

    Args:
        items: Judged items, e.g. `store.judged_items(split)`.
        items_per_round: Round -> how many items it has (judged or not; `store.round_counts(r)["items"]`);
            its rounds are listed even when nothing in them is judged. None: `items` is reported as None.
        kinds: The annotator kinds that count (None: every kind); judgments of other kinds are ignored.

    Returns:
        What `illume.feedback.figures.team_summary` returns (its docstring states every field): the oracle
        the tests compare that SQL with.
    """
    rounds: dict[int, _RoundStats] = {r: _RoundStats() for r in items_per_round or {}}
    for item in items:
        rounds.setdefault(item.round_idx, _RoundStats()).add(_tally(item, kinds))
    total = _RoundStats()
    for stats in rounds.values():
        total.merge(stats)
    sizes = items_per_round or {}
    known = items_per_round is not None
    return {
        "kinds": _sorted_kinds(kinds),
        "rounds": [{"round_idx": r, **stats.as_dict(sizes.get(r) if known else None)}
                   for r, stats in sorted(rounds.items())],
        "total": total.as_dict(sum(sizes.values()) if known else None),
    }
