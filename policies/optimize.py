"""The standalone `illume dpo` / `illume kto` commands: one DPO or KTO optimisation on a run's whole store or
on a saved TRL dataset, then the best val epoch kept, as a loop round does (the loop's rounds call
`policies.dpo.dpo_round` / `policies.kto.kto_round`). The starting weights are the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from illume import distributed
from illume.config import ConfigError, RunConfig
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import read_feedback
from illume.tracking import check_report_to, trainer_report
from policies.base import keep_best
from policies.data import dataset_pairs, dataset_unpaired_rows, preference_pairs, unpaired_rows
from policies.dpo import train_dpo
from policies.kto import train_kto

TRAIN = {"dpo": train_dpo, "kto": train_kto}
"""policy.kind -> its optimisation on pairs (DPO) or unpaired rows (KTO)."""


def optimize_standalone(kind: str, source: str | Path, cfg: RunConfig, out_dir: Path | None = None,
                        init_round: int | None = None) -> dict:
    """`illume dpo|kto SOURCE`: one optimisation on a run's whole store or on a saved TRL dataset.

    Args:
        source: A run directory (its feedback store; `cfg` is then its config.yaml plus overrides) or a
            dataset folder saved with `datasets` (`illume export --format dpo|kto`, or any TRL dataset with an
            `images` column).
        cfg: The run config: the model, the val split, train.* and policy.*.
        out_dir: Where adapters.safetensors, training.json and metrics.json go (default: RUN_DIR/<kind>, or
            cfg.run_dir/<kind> for a dataset).
        init_round: Start from (and take as the reference) this round's adapters of the run; None: the base model.

    Returns:
        The metrics written to out_dir/metrics.json: val scores of the kept epoch and what was trained on.
    """
    from dataclasses import replace

    from illume.data.datasets import load_split
    from illume.loading import load_vlm
    from illume.models.weights import check_safetensors, load_trainable_weights
    from illume.training import ADAPTERS_FILE, retrain_round_remedy

    source = Path(source)
    is_run = (source / "config.yaml").is_file()
    out_dir = Path(out_dir) if out_dir is not None else (source if is_run else cfg.run_dir) / kind
    cfg = replace(cfg, policy=replace(cfg.policy, kind=kind))
    # Checked before the model loads: a wrong argument should fail in a second, not after minutes.
    check_report_to(cfg)
    init_weights = remedy = None
    if init_round is not None:
        if not is_run:
            raise ConfigError("--init-round needs a run directory as the source")
        init_weights = source / f"round_{init_round:02d}" / ADAPTERS_FILE
        if not init_weights.is_file():
            raise ConfigError(f"--init-round {init_round}: no trained round there ({init_weights} is missing)")
        remedy = retrain_round_remedy(init_weights.parent)
        check_safetensors(init_weights, remedy)
    # The data too: a malformed row or a missing image fails before the model loads (or pre-trains).
    val = load_split(cfg.data, "val", images_must_exist=True)
    if is_run:
        examples_by_id = {e.id: e for e in load_split(cfg.data, "train", images_must_exist=True)}
        store = FeedbackStore(cfg.store_url or source / "feedback.db", create=False)  # the run's; never a new one
        feedback = read_feedback(store, aggregate=cfg.feedback.aggregate)
        data = (preference_pairs(feedback, examples_by_id, cfg.policy.dpo.reference_as_chosen) if kind == "dpo"
                else unpaired_rows(feedback, examples_by_id))
    else:
        data, examples_by_id = dataset_pairs(source) if kind == "dpo" else dataset_unpaired_rows(source)
    vlm = load_vlm(cfg)
    if init_weights is not None:
        load_trainable_weights(vlm.model, init_weights, remedy)
    result = TRAIN[kind](vlm, data, examples_by_id, cfg.policy, cfg.train, out_dir, trainer_report(cfg, out_dir))
    kept = keep_best(result, vlm, val, cfg, out_dir)
    metrics = {"kind": kind, "source": str(source), "init_round": init_round, "val": kept.best,
               "num_rationales": result.report["train_rationales"],
               "num_rows": result.report["train_rows"], "epochs": kept.epochs}
    if distributed.is_main():
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
