"""The policy interface: what one round's optimisation gets and what it gives back, the same for every policy.

A policy is a function `(RoundContext) -> PolicyResult`, registered under its `policy.kind` in
`policies.registry.POLICIES`: the loop calls `POLICIES[cfg.policy.kind](context)` and asks nothing else about
it. It trains `context.vlm.model` and saves every epoch's weights (`illume.training.adapter_trainer`); the loop's
evaluate step scores them on val and keeps the best (`illume.evaluation.keep_best_epoch`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from illume import distributed
from illume.config import RunConfig
from illume.data.records import Example
from illume.evaluation import Kept, keep_best_epoch
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import Feedback
from illume.models.vlm import VLM
from illume.training import ADAPTERS_FILE, Trained


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
    """For policies that look at val themselves (none does: the loop's evaluate step scores the epochs)."""
    out_dir: Path
    """The round's folder: training_set.jsonl, adapters.safetensors, training.json."""
    feedback: Feedback
    """The verdicts of every judgment up to this round (`feedback.aggregate`), read once by the loop: what
    selection-SFT trains on, DPO/KTO make pairs and labelled rows of (`policy.rounds`) and GRPO anchors on."""
    say: Callable[[str], None] = print
    """Where a policy tells the user what it trains on (the loop's console)."""


@dataclass
class PolicyResult:
    """What every policy returns."""

    trained: Trained
    """Each epoch's saved weights (the loop's evaluate step keeps the best), the losses, the world size."""
    report: dict = field(default_factory=dict)
    """Keys the policy adds to the round's row of results.json (e.g. DPO's `train_rows`: pairs trained on)."""
    per_epoch: list[dict] = field(default_factory=list)
    """Per epoch, keys for the round's row that depend on which epoch is kept (GRPO's `grpo_kl`)."""
    training: dict = field(default_factory=dict)
    """More about what was trained on, for round_NN/training.json (counts, per-step metrics)."""


def keep_best(result: PolicyResult, vlm: VLM, val: list[Example], cfg: RunConfig, out_dir: Path) -> Kept:
    """The evaluate step after a policy: each epoch it saved scored on val, the best kept (its weights in
    `vlm.model` and `out_dir/adapters.safetensors`; `illume.evaluation.keep_best_epoch`), training.json written."""
    kept = keep_best_epoch(vlm, val, cfg.sample, cfg.train.select_metric, result.trained.epoch_weights,
                           out_dir / ADAPTERS_FILE)
    if distributed.is_main():
        (out_dir / "training.json").write_text(json.dumps(training_record(result, kept), indent=2))
    return kept


def training_record(result: PolicyResult, kept: Kept) -> dict:
    """round_NN/training.json: the val scores per epoch and of the kept one, the losses, what was trained on."""
    trained = result.trained
    return {"best": kept.best, "epochs": kept.epochs, "losses": trained.losses, "world_size": trained.world_size,
            **result.report, **kept_epoch(result, kept), **result.training, "log_history": trained.log_history}


def kept_epoch(result: PolicyResult, kept: Kept) -> dict:
    """The policy's per-epoch keys of the kept epoch (nothing for a policy without any)."""
    return result.per_epoch[kept.best["epoch"] - 1] if result.per_epoch else {}


Policy = Callable[[RoundContext], PolicyResult]
