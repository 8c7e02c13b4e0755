"""`illume status RUN_DIR`: progress per round, work per annotator (and its kind), and agreement between people."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from illume.feedback import figures
from illume.feedback.agreement import krippendorff_alpha as krippendorff_alpha_nominal  # noqa: F401 (tests, callers)
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import DEFAULT_AGGREGATE

POLICY_COLUMNS = (("grpo_reward", "reward", "{:.3f}"), ("grpo_accept", "sim. accept %", "{:.1%}"),
                  ("grpo_kl", "KL", "{:.4f}"))
"""Round figures a policy reports when it has them, shown by the loop's table and `illume status` (online
RL: the reward model's mean score of the samples, the share the simulated critic accepts, the KL to the
round's reference; a reward that rises while acceptance falls is the policy gaming the reward model)."""


def policy_cell(row: dict, key: str, fmt: str) -> str:
    """One POLICY_COLUMNS value of a round's row as the tables show it ("-" when the policy has none)."""
    return "-" if row.get(key) is None else fmt.format(row[key]).rstrip("%")


def summarize(store: FeedbackStore, aggregate: str = DEFAULT_AGGREGATE) -> dict:
    """Per-round and per-annotator figures, and accept-decision agreement per round (where items overlap).

    Accepted candidates are counted by the rules of illume.feedback.verdicts (`aggregate` for items with
    several annotators), the same the loop trains on; each annotator's latest judgment of an item counts.
    Everything is counted by the database (illume.feedback.figures), so the time and memory do not grow
    with what Python would have to hold: a few rows per round and annotator come back.
    """
    with_accepted = figures.items_with_accepted(store, "train", aggregate)
    units = figures.coincidences(store, "train", kinds=None)  # every kind, as the table always showed
    rounds = {}
    for round_idx in store.rounds():
        status = store.round_status(round_idx)
        metrics = status["metrics"] or {}
        rounds[round_idx] = {**store.round_counts(round_idx, "train"),
                             **{key: metrics[key] for key, _, _ in POLICY_COLUMNS if key in metrics},
                             "items_with_accepted": with_accepted.get(round_idx, 0),
                             "status": status,
                             "alpha": units[round_idx].alpha() if round_idx in units else None}
    per_person = {
        name: {"kind": p["kind"], "judgments": p["items"], "total_seconds": p["seconds_sum"],
               "median_seconds": p["median_seconds"]}
        for (name,), p in sorted(figures.annotator_figures(store, "train", kinds=None).items())
    }
    return {"rounds": rounds, "people": per_person}


def print_status(store: FeedbackStore, console: Console | None = None,
                 aggregate: str = DEFAULT_AGGREGATE) -> dict:
    console = console or Console(width=max(Console().width, 100))
    summary = summarize(store, aggregate)
    table = Table(title="Rounds")
    extra = [c for c in POLICY_COLUMNS if any(c[0] in r for r in summary["rounds"].values())]
    for column in ("round", "items", "judged", "judgments", "with accepted", "sampled", "trained", "alpha",
                   *(title for _, title, _ in extra)):
        table.add_column(column, justify="right")
    for round_idx, r in summary["rounds"].items():
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        table.add_row(str(round_idx), str(r["items"]), str(r["judged_items"]), str(r["judgments"]),
                      str(r["items_with_accepted"]), "yes" if r["status"]["sampled_at"] else "no",
                      "yes" if r["status"]["trained_at"] or r["status"]["metrics"] else "no", alpha,
                      *(policy_cell(r, key, fmt) for key, _, fmt in extra))
    console.print(table)
    people = Table(title="People (and critics)")
    for column in ("annotator", "kind", "judgments", "median s / item", "total time"):
        people.add_column(column, justify="right")
    for name, p in sorted(summary["people"].items()):
        median = "-" if p["median_seconds"] is None else f"{p['median_seconds']:.1f}"
        total = f"{p['total_seconds'] / 60:.1f} min" if p["total_seconds"] else "-"
        people.add_row(name, p["kind"], str(p["judgments"]), median, total)
    console.print(people)
    console.print("alpha: Krippendorff's alpha of accept decisions on items judged by several people")
    return summary
