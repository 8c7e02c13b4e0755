"""One policy optimisation (DPO or KTO) on the feedback of a run: the loop's step 3 when `policy.kind` is not
sft, and the standalone `illume dpo` / `illume kto` commands.

What it trains on (`policy.rounds`): the judgments of every round so far ("all", what ILLUME's SFT uses), or
only of the round just judged ("latest": on-policy iterative DPO). The starting weights are the reference.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from illume import distributed
from illume.config import ConfigError, RunConfig
from illume.data.records import Example
from illume.feedback.store import FeedbackStore
from illume.models.vlm import VLM
from illume.tracking import check_report_to, trainer_report
from policies.base import PolicyResult, RoundContext
from policies.data import store_labelled_rationales, store_pairs
from policies.dpo import optimize_dpo
from policies.kto import optimize_kto


def write_jsonl(records, path: Path) -> None:
    """What was trained on, one JSON object per pair / row (for audits, like SFT's training_set.jsonl)."""
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            # The record's own fields; a pair's provenance (its item and judgments, compare=False) stays out.
            f.write(json.dumps({field.name: getattr(record, field.name) for field in fields(record)
                                if field.compare}) + "\n")


def optimize_on_pairs(cfg: RunConfig, vlm: VLM, pairs, examples_by_id: dict[str, Example],
                      val: list[Example], out_dir: Path) -> dict:
    write_jsonl(pairs, out_dir / "training_set.jsonl")
    result = optimize_dpo(vlm, pairs, examples_by_id, val, cfg.policy, cfg.train, cfg.sample, out_dir,
                          report=trainer_report(cfg, out_dir))
    result["num_rationales"] = len({(p.example_id, text) for p in pairs for text in (p.chosen, p.rejected)})
    result["num_rows"] = len(pairs)
    return result


def optimize_on_labels(cfg: RunConfig, vlm: VLM, rows, examples_by_id: dict[str, Example],
                       val: list[Example], out_dir: Path) -> dict:
    write_jsonl(rows, out_dir / "training_set.jsonl")
    result = optimize_kto(vlm, rows, examples_by_id, val, cfg.policy, cfg.train, cfg.sample, out_dir,
                          report=trainer_report(cfg, out_dir))
    result["num_rationales"] = len({(r.example_id, r.completion) for r in rows})
    result["num_rows"] = len(rows)
    return result


def _dpo_on_store(cfg: RunConfig, vlm: VLM, store: FeedbackStore, examples_by_id: dict[str, Example],
                  val: list[Example], out_dir: Path, upto_round: int | None, from_round: int | None) -> dict:
    pairs = store_pairs(store, examples_by_id, upto_round, from_round, cfg.policy.dpo.reference_as_chosen,
                        cfg.feedback.aggregate)
    return optimize_on_pairs(cfg, vlm, pairs, examples_by_id, val, out_dir)


def _kto_on_store(cfg: RunConfig, vlm: VLM, store: FeedbackStore, examples_by_id: dict[str, Example],
                  val: list[Example], out_dir: Path, upto_round: int | None, from_round: int | None) -> dict:
    rows = store_labelled_rationales(store, examples_by_id, upto_round, from_round, cfg.feedback.aggregate)
    return optimize_on_labels(cfg, vlm, rows, examples_by_id, val, out_dir)


# policy.kind -> the optimisation on a store's judgments (the loop's rounds and `illume dpo|kto RUN_DIR`).
ON_STORE = {"dpo": _dpo_on_store, "kto": _kto_on_store}


def optimize_on_store(cfg: RunConfig, vlm: VLM, store: FeedbackStore, examples_by_id: dict[str, Example],
                      val: list[Example], out_dir: Path, upto_round: int | None = None) -> dict:
    """Run `cfg.policy.kind` (dpo | kto) on the store's judgments of rounds <= upto_round (None: all).

    Returns:
        The trainer's result: `best`, `epochs`, `num_rationales`, `num_rows` (pairs or labelled rows), ...

    Raises:
        PolicyDataError: the store has no usable feedback for the policy (no judgments, no pairs, ...).
    """
    if cfg.policy.kind not in ON_STORE:
        raise ValueError(f"policy.kind={cfg.policy.kind!r} is not a preference policy ({' | '.join(ON_STORE)})")
    from_round = upto_round if cfg.policy.rounds == "latest" and upto_round is not None else None
    result = ON_STORE[cfg.policy.kind](cfg, vlm, store, examples_by_id, val, out_dir, upto_round, from_round)
    if distributed.is_main():
        (out_dir / "training.json").write_text(
            json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=2))
    return result


def preference_round(context: RoundContext) -> PolicyResult:
    """DPO or KTO (`policy.kind`) as a loop policy: on the judgments of this round (`policy.rounds=latest`) or
    of every round so far (`all`)."""
    cfg = context.cfg
    context.say(f"round {context.round_idx}: {cfg.policy.kind} on the judgments of "
                f"{'this round' if cfg.policy.rounds == 'latest' else 'every round so far'}")
    result = optimize_on_store(cfg, context.vlm, context.store, context.train_by_id, context.val,
                               context.out_dir, upto_round=context.round_idx)
    return PolicyResult(result["best"], result["epochs"],
                        {"train_rationales": result["num_rationales"], "train_rows": result["num_rows"]})


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
    from policies.data import dataset_labelled_rationales, dataset_pairs

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
        train_by_id = {e.id: e for e in load_split(cfg.data, "train", images_must_exist=True)}
    elif kind == "dpo":
        pairs, examples_by_id = dataset_pairs(source)
    else:
        rows, examples_by_id = dataset_labelled_rationales(source)
    vlm = load_vlm(cfg)
    if init_weights is not None:
        load_trainable_weights(vlm.model, init_weights, remedy)
    if is_run:
        store = FeedbackStore(cfg.store_url or source / "feedback.db", create=False)  # the run's; never a new one
        result = optimize_on_store(cfg, vlm, store, train_by_id, val, out_dir)
    elif kind == "dpo":
        result = optimize_on_pairs(cfg, vlm, pairs, examples_by_id, val, out_dir)
    else:
        result = optimize_on_labels(cfg, vlm, rows, examples_by_id, val, out_dir)
    metrics = {"kind": kind, "source": str(source), "init_round": init_round, "val": result["best"],
               "num_rationales": result["num_rationales"],
               "num_rows": result["num_rows"], "epochs": result["epochs"]}
    if distributed.is_main():
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
