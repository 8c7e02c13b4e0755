"""Two rounds of adapter training (selection-SFT, DPO or KTO), or a reward model's fit, on the tiny model, as
`tests/test_sharded.py` launches it: one process, or several under torchrun with ZeRO-3. Not a test itself (no
test_ prefix): the test compares what two launches write.

    python -m tests.sharded_training OUT {sft,dpo,kto,reward} BATCH_PER_PROCESS [DEEPSPEED_JSON]

reward: `fit_reward` on fixed pairs (2 epochs), then rank 0 alone scores the val questions' references, as the
reward critic does; rank 0 writes OUT/reward/ (the saved model) and OUT/reward/scores.json.

Each round trains from fixed rows (2 epochs), keeps the best val epoch (`keep_best_epoch`), then samples the
train questions with the kept weights, in per-rank shares gathered in order, as the loop does. Rank 0 writes
OUT/round_N/{adapters.safetensors,kept.json,candidates.json}; kept.json also counts the elements rank 0
holds whole between training and evaluation (ZeRO-3: only its partitions and the small parameters). The second round starts from weights ZeRO-3
already partitioned: its reference log-probs (DPO), loading and sampling all read gathered weights.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from illume import distributed
from illume.config import PolicyConfig, RewardConfig, SampleConfig, TrainConfig, load_config
from illume.data.shapes import ShapesWorld
from illume.demo.tiny_models import build_demo_vlm
from illume.evaluation import keep_best_epoch
from illume.feedback.verdicts import PreferencePair
from illume.prompts import rationale_prompt
from illume.sampling import sample
from illume.training import ADAPTERS_FILE, build_training_set, selection_trainer, trained
from policies.data import UnpairedRow
from policies.dpo import train_dpo
from policies.kto import train_kto
from reward.model import score
from reward.train import fit_reward
from tests.conftest import REPO, TINY_MODEL

NUM_ROWS = 8
"""Rows per round: whole global batches of 4 (one process x 4 or two x 2), so both launches take the same
steps on the same rows (the Trainer's sampler draws one seeded order; accelerate gives rank r the r-th
per-process batch of each global batch)."""


def rows_of(policy: str, examples, round_idx: int):
    """A fixed training set per round: the train questions' first references (accepted, or chosen over the
    second reference)."""
    picked = examples[round_idx * NUM_ROWS // 2:][:NUM_ROWS]
    if policy == "sft":
        accepted = [(e.id, e.explanations[0]) for e in picked]
        return build_training_set(accepted, examples, num_answer_only_rows=0)
    if policy == "kto":
        return [UnpairedRow(e.id, rationale_prompt(e.question, e.answer),
                            e.explanations[0] if i % 2 else f"there is no {e.answer}", bool(i % 2))
                for i, e in enumerate(picked)]
    return [PreferencePair(e.id, rationale_prompt(e.question, e.answer), e.explanations[0],
                           f"there is no {e.answer}", round_idx) for e in picked]


def fit_and_score(out: Path, vlm, train, val, batch_size: int, train_cfg: TrainConfig) -> None:
    """The `reward` launch (module doc): one fixed pair per train question (12: whole global batches of 4)."""
    pairs = [PreferencePair(e.id, rationale_prompt(e.question, e.answer), e.explanations[0],
                            f"there is no {e.answer}", 0) for e in train]
    cfg = RewardConfig(num_epochs=2, batch_size=batch_size, learning_rate=5e-3)
    rm, _ = fit_reward(vlm, pairs, [], {e.id: e for e in train}, cfg, out / "reward", train=train_cfg)
    if distributed.is_main():  # rank 0 alone, as the reward critic: the model must be whole there
        scores = score(rm, [(e, rationale_prompt(e.question, e.answer), e.explanations) for e in val])
        (out / "reward" / "scores.json").write_text(json.dumps(scores))
    distributed.barrier()


def main(out: Path, policy: str, batch_size: int, deepspeed: str | None) -> None:
    distributed.init_if_launched()
    # No dropout: its draws depend on the rank, and the launches are compared update for update.
    cfg = load_config(REPO / "configs" / "demo.yaml", [*TINY_MODEL, "model.prefix_dropout=0.0"])
    vlm = build_demo_vlm(cfg.model, seed=0)
    world = ShapesWorld(num_train_scenes=12, num_val_scenes=4)
    train, val = world.examples("train"), world.examples("val")
    by_id = {e.id: e for e in train}
    train_cfg = TrainConfig(num_epochs=2, batch_size=batch_size, learning_rate=5e-3, deepspeed=deepspeed)
    if policy == "reward":
        fit_and_score(out, vlm, train, val, batch_size, train_cfg)
        return
    sample_cfg = SampleConfig(temperatures=[0.7], samples_per_temperature=2, max_new_tokens=6, batch_size=4)
    for round_idx in range(2):
        round_dir = out / f"round_{round_idx}"
        rows = rows_of(policy, train, round_idx)
        if policy == "sft":
            trainer = selection_trainer(vlm, rows, train, train_cfg, round_dir)
            trainer.train()
            result = trained(trainer)
        else:
            optimise = train_dpo if policy == "dpo" else train_kto
            result = optimise(vlm, rows, by_id, PolicyConfig(learning_rate=5e-3), train_cfg, round_dir).trained
        held = sum(p.numel() for p in vlm.model.parameters())  # ZeRO-3 between rounds: partitions only
        kept = keep_best_epoch(vlm, val, sample_cfg, "cider", result.epoch_weights, round_dir / ADAPTERS_FILE)
        sets = distributed.gather_objects(sample(vlm, distributed.shard(train, sample_cfg.batch_size), sample_cfg,
                                                 round_idx=round_idx, use_reference_answer=True, progress=False))
        if distributed.is_main():
            (round_dir / "kept.json").write_text(json.dumps(
                {"best": kept.best, "epochs": kept.epochs, "losses": result.losses,
                 "world_size": result.world_size, "elements_held_whole": held,
                 "elements": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                 for p in vlm.model.parameters())}, indent=1))
            (round_dir / "candidates.json").write_text(json.dumps([asdict(s) for s in sets], indent=1))
        distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
