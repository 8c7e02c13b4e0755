"""ILLUME's selection-SFT as a policy: every rationale accepted so far (deduplicated) plus answer-only rows,
row-weighted cross-entropy, adapters only (illume.training); the loop's evaluate step keeps the best epoch."""

from __future__ import annotations

from illume import distributed
from illume.tracking import trainer_report
from illume.training import build_training_set, selection_trainer, trained, write_manifest
from policies.base import PolicyResult, RoundContext


def sft_round(context: RoundContext) -> PolicyResult:
    cfg, round_idx = context.cfg, context.round_idx
    accepted = [(row.example_id, row.text) for row in context.feedback.accepted()]
    rows = build_training_set(accepted, context.train, cfg.train.num_answer_only_rows, cfg.train.rationale_weight,
                              seed=cfg.train.seed + round_idx)
    if distributed.is_main():
        write_manifest(rows, context.out_dir / "training_set.jsonl")
    context.say(f"round {round_idx}: training on {len(rows)} rows "
                f"({sum(r.kind == 'rationale' for r in rows)} rationales)")
    trainer = selection_trainer(context.vlm, rows, context.train, cfg.train, context.out_dir,
                                report=trainer_report(cfg, context.out_dir))
    trainer.train()
    return PolicyResult(trained(trainer), training={"num_rows": len(rows)})
