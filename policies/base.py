"""The policy interface: what one round's optimisation gets and what it gives back, the same for every policy.

A policy is a function `(RoundContext) -> PolicyResult`, registered under its `policy.kind` in
`policies.registry.POLICIES`: the loop calls `POLICIES[cfg.policy.kind](context)` and asks nothing else about
it. It leaves the kept epoch's weights in `context.vlm.model` and `context.out_dir/adapters.safetensors`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from illume.config import RunConfig
from illume.data.records import Example
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import Feedback
from illume.models.vlm import VLM


@dataclass
class RoundContext:
    """One round's inputs to a policy."""

    cfg: RunConfig
    vlm: VLM
    """The model as the round found it (the reference of DPO/KTO); trained in place."""
    store: FeedbackStore
    """Every round's candidates and judgments up to this one."""
    round_idx: int
    train: list[Example]
    train_by_id: dict[str, Example]
    val: list[Example]
    """Scored after every epoch to keep the best one."""
    out_dir: Path
    """The round's folder: training_set.jsonl, adapters.safetensors, training.json."""
    feedback: Feedback
    """The verdicts of every judgment up to this round (`feedback.aggregate`), read once by the loop: what
    selection-SFT trains on and GRPO anchors on (DPO/KTO read their own range, `policy.rounds`)."""
    say: Callable[[str], None] = print
    """Where a policy tells the user what it trains on (the loop's console)."""


@dataclass
class PolicyResult:
    """What every policy returns."""

    best: dict
    """Val scores of the kept epoch, with its `epoch`."""
    epochs: list[dict]
    """Val scores after every epoch."""
    report: dict = field(default_factory=dict)
    """Keys the policy adds to the round's row of results.json (e.g. DPO's `train_rows`: pairs trained on)."""


Policy = Callable[[RoundContext], PolicyResult]
