"""Bradley-Terry training of the reward model on preference pairs, through the HF Trainer.

Assumptions, up front:
- loss = mean(-log sigmoid(r_chosen - r_rejected - margin)) + center_coef * mean((r_chosen + r_rejected)^2),
  the same as TRL's `trl.RewardTrainer.compute_loss` (its `center_rewards_coefficient`, Eq. 2 of
  https://arxiv.org/abs/2312.09244); TRL's RewardTrainer is text-only, hence this trainer for a VLM.
- A batch is [chosen rows, rejected rows] of B pairs (`VLM.collate_scored`), with each pair's image once where
  the backend can share it (MAGMA: `image_index` maps the 2B rows onto the B images, so the image encoder
  runs once per pair).
- Only the backbone's adapters and the head train, at a constant AdamW learning rate without weight decay;
  mixed precision and DeepSpeed (a JSON path) pass through to `TrainingArguments`. Under ZeRO-3 the backbone
  is partitioned while it trains (the held-out accuracy after each epoch runs on every rank alike, DeepSpeed's
  hooks gathering each layer), and made whole again on every rank after training
  (`illume.models.sharding.unshard`): the reward model is then scored on one rank alone (the critic on rank 0)
  and saved as plain tensors.
- No model selection on the held-out pairs (they calibrate and evaluate): the last epoch is kept; the held-out
  pairwise accuracy after each epoch is only recorded.
- Several processes (torchrun / accelerate launch): DDP (gloo on CPU); every rank ends with the same weights
  and runs the evaluation and calibration identically; rank 0 alone writes the files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from illume import distributed
from illume.collate import RowEncoder
from illume.config import RewardConfig, TrainConfig
from illume.data.records import Example
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import DEFAULT_AGGREGATE, PEOPLE, PreferencePair
from illume.models.loading import load_saved_vlm
from illume.models.sharding import release_training_hooks, unshard
from illume.models.vlm import VLM
from illume.tracking import NO_REPORT, TrainerReport
from illume.training import trainer_arguments
from reward.model import RewardModel, encode_scored_rows
from reward.pairs import (
    RewardDataError,
    calibration_split,
    labelled_candidates,
    preference_pairs,
    reward_feedback,
)

TRAINING_FILE = "training.json"
SPLIT_FILE = "split.json"


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a batch of pairs, with TRL's optional margin and reward centring.

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)

    Args:
        chosen_rewards: (B,) rewards of the preferred rationales.
        rejected_rewards: (B,) rewards of the other ones.
        margin: m: the chosen reward must exceed the rejected one by m before the loss flattens.
        center_coef: Weight of the centring term (0: off).

    Returns:
        The scalar loss.
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


class RewardPairsDataset(torch.utils.data.Dataset):
    """Both rationales of each pair as scored rows (`encode_scored_rows`), each (example, prompt)'s image
    processed once and shared by its rows."""

    def __init__(self, rm: RewardModel, pairs: Sequence[PreferencePair], examples_by_id: dict[str, Example]):
        encode = RowEncoder(rm.vlm, examples_by_id)
        self.items = [{"rows": encode_scored_rows(encode, p.example_id, p.prompt, [p.chosen, p.rejected])}
                      for p in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_pairs(items: list[dict], vlm: VLM) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded rows, chosen first (rows 0..B-1), then rejected; row i and row B + i show
    pair i's image, which the backend may encode once for both (`VLM.collate_scored`)."""
    rows = [item["rows"][0] for item in items] + [item["rows"][1] for item in items]
    return vlm.collate_scored(rows, list(range(len(items))) * 2)


class BradleyTerryTrainer(Trainer):
    """HF Trainer whose loss is `bradley_terry_loss` on batches from `collate_pairs`."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps
    margin: float = 0.0
    center_coef: float = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = model(**inputs)  # (2B,)
        chosen_rewards, rejected_rewards = rewards.chunk(2)  # batch is [chosen rows, rejected rows]
        loss = bradley_terry_loss(chosen_rewards, rejected_rewards, self.margin, self.center_coef)
        return (loss, {"rewards": rewards}) if return_outputs else loss


class _RecordHeldout(TrainerCallback):
    """After each epoch: the held-out pairwise accuracy (recorded only; nothing is selected on it)."""

    def __init__(self, rm: RewardModel, pairs: Sequence[PreferencePair], examples_by_id: dict[str, Example]):
        self.rm, self.pairs, self.examples_by_id = rm, pairs, examples_by_id
        self.epochs: list[dict] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        from reward.evaluate import pairwise_accuracy

        if self.pairs:
            accuracy = pairwise_accuracy(self.rm, self.pairs, self.examples_by_id)
            self.epochs.append({"epoch": round(state.epoch), "heldout_pairwise_accuracy": accuracy})
        self.rm.train()
        return control


def fit_reward(base: str | Path | VLM, pairs_train: Sequence[PreferencePair],
               pairs_eval: Sequence[PreferencePair], examples_by_id: dict[str, Example], cfg: RewardConfig,
               out_dir: str | Path, train: TrainConfig | None = None,
               pooling: str = "mean", backbone_id: str | None = None,
               report: TrainerReport = NO_REPORT) -> tuple[RewardModel, dict]:
    """Train a reward model on `pairs_train` and save it to `out_dir`.

    Args:
        base: A saved VLM's directory, or a loaded VLM (copied: the caller's model is not changed).
        pairs_train: The training pairs.
        pairs_eval: Held-out pairs whose pairwise accuracy is recorded after each epoch (may be empty).
        examples_by_id: The examples the pairs belong to (their images).
        cfg: num_epochs, batch_size, learning_rate, margin, center_coef, seed.
        out_dir: Where the model (`RewardModel.save`) and `training.json` go.
        train: The run's `train` section, passed whole: its DeepSpeed config (ZeRO-2 or 3) and mixed precision
            (bf16/fp16, GPUs). The reward model's own epochs, batch and learning rate are `cfg` (reward.*).
        pooling: The head's input: "mean" of the rationale's hidden states, or the "last" token's.
        backbone_id: Which base model `base` is (`illume.loading.model_identity`), saved with the model.
        report: Where the trainer reports (train.report_to: illume.tracking.trainer_report); none by default.

    Returns:
        (the trained model in eval mode, metrics: pair counts, seconds, losses, held-out accuracy per epoch,
        final train and held-out pairwise accuracy).

    Raises:
        RewardDataError: no training pairs.
    """
    if not pairs_train:
        raise RewardDataError("no preference pairs to train the reward model on")
    train = train or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if isinstance(base, (str, Path)):
        rm = RewardModel(load_saved_vlm(base), base_model_path=str(base), copy_backbone=False, seed=cfg.seed,
                         pooling=pooling)
    else:
        rm = RewardModel(base, seed=cfg.seed, pooling=pooling)
    rm.backbone_id = backbone_id
    rm.train()
    dataset = RewardPairsDataset(rm, pairs_train, examples_by_id)
    record = _RecordHeldout(rm, pairs_eval, examples_by_id)
    args = trainer_arguments(
        out_dir, seed=cfg.seed, report=report, num_train_epochs=cfg.num_epochs, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=min(10, math.ceil(len(dataset) / cfg.batch_size)),  # >= 1 loss per epoch
        bf16=train.bf16, fp16=train.fp16, deepspeed=train.deepspeed,
    )
    trainer = BradleyTerryTrainer(model=rm, args=args, train_dataset=dataset,
                                  data_collator=partial(collate_pairs, vlm=rm.vlm),
                                  callbacks=[record, *report.callbacks()])
    trainer.margin, trainer.center_coef = cfg.margin, cfg.center_coef
    trainer.train()
    release_training_hooks(trainer.model_wrapped)
    unshard(rm)  # ZeRO-3: whole on every rank from here on (collective)
    rm.eval()
    train_seconds = time.perf_counter() - start
    if distributed.is_main():
        rm.save(out_dir)
    from reward.evaluate import pairwise_accuracy

    metrics = {
        "num_train_pairs": len(pairs_train),
        "num_eval_pairs": len(pairs_eval),
        "train_seconds": round(train_seconds, 1),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "epochs": record.epochs,
        "train_pairwise_accuracy": pairwise_accuracy(rm, pairs_train, examples_by_id),
        "heldout_pairwise_accuracy": record.epochs[-1]["heldout_pairwise_accuracy"] if record.epochs else None,
        "world_size": args.world_size,
    }
    if distributed.is_main():
        (out_dir / TRAINING_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return rm, metrics


def fit_reward_from_store(store: FeedbackStore, examples_by_id: dict[str, Example], base: str | Path | VLM,
                          cfg: RewardConfig, out_dir: str | Path, upto_round: int | None = None,
                          kinds: Collection[str] | None = PEOPLE, aggregate: str = DEFAULT_AGGREGATE,
                          train: TrainConfig | None = None, pooling: str = "mean", backbone_id: str | None = None,
                          report: TrainerReport = NO_REPORT) -> tuple[RewardModel, dict]:
    """The whole recipe: pairs from the store, split by example, train, evaluate and calibrate, save.

    Writes to `out_dir`: the model (with its calibrated threshold), `split.json` (the held-out examples, so
    `evaluate_saved` scores the same ones), `training.json`, `reward_eval.json` and `calibration.png`.

    Args:
        kinds: The annotator kinds whose judgments count (default: people, never the reward model itself).
        aggregate: How several annotators of one item combine (illume.feedback.verdicts).
        train: The run's `train` section (DeepSpeed, mixed precision), as `fit_reward` takes it.
        backbone_id: Which base model `base` is (`illume.loading.model_identity`), saved with the model.

    Returns:
        (the model, {"training": fit metrics, "eval": held-out report}).
    """
    from reward.evaluate import check_heldout_labels, evaluate_reward_model

    out_dir = Path(out_dir)
    feedback = reward_feedback(store, upto_round=upto_round, kinds=kinds, aggregate=aggregate)
    pairs = preference_pairs(feedback, examples_by_id, cfg.include_reference_pairs)
    train_ids, heldout_ids = calibration_split(feedback, cfg.heldout_fraction, cfg.seed)
    heldout = set(heldout_ids)
    pairs_train = [p for p in pairs if p.example_id not in heldout]
    pairs_heldout = [p for p in pairs if p.example_id in heldout]
    judged_heldout = labelled_candidates(feedback, example_ids=heldout)
    check_heldout_labels(judged_heldout)  # before the fit: a threshold could not be calibrated after it
    rm, training = fit_reward(base, pairs_train, pairs_heldout, examples_by_id, cfg, out_dir, train=train,
                              pooling=pooling, backbone_id=backbone_id, report=report)
    if distributed.is_main():
        out_dir.joinpath(SPLIT_FILE).write_text(json.dumps({
            "upto_round": upto_round, "include_reference_pairs": cfg.include_reference_pairs,
            "heldout_fraction": cfg.heldout_fraction, "seed": cfg.seed,
            "train_example_ids": train_ids, "heldout_example_ids": heldout_ids,
        }, indent=2) + "\n")
    report = evaluate_reward_model(rm, pairs_heldout, judged_heldout, examples_by_id, cfg.target_precision,
                                   out_dir)
    if distributed.is_main():
        rm.save(out_dir)  # again, now with the calibrated threshold
    distributed.barrier()  # the files are complete when any rank returns
    return rm, {"training": training, "eval": report}


def evaluate_saved(store: FeedbackStore, examples_by_id: dict[str, Example], rm: RewardModel,
                   out_dir: str | Path, target_precision: float,
                   kinds: Collection[str] | None = PEOPLE, aggregate: str = DEFAULT_AGGREGATE) -> dict:
    """Evaluate a saved reward model on the held-out examples recorded in `out_dir/split.json`, and save it
    again with what that calibrates (the threshold, Platt's (a, b)): a model saved before (a, b) were kept
    gets them here."""
    from reward.evaluate import evaluate_reward_model

    out_dir = Path(out_dir)
    if not (out_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(f"no {SPLIT_FILE} in {out_dir}: train with `illume reward train` first")
    split = json.loads((out_dir / SPLIT_FILE).read_text())
    heldout = set(split["heldout_example_ids"])
    feedback = reward_feedback(store, upto_round=split["upto_round"], kinds=kinds, aggregate=aggregate)
    pairs = preference_pairs(feedback, examples_by_id, split["include_reference_pairs"])
    judged = labelled_candidates(feedback, example_ids=heldout)
    report = evaluate_reward_model(rm, [p for p in pairs if p.example_id in heldout], judged, examples_by_id,
                                   target_precision, out_dir)
    if distributed.is_main():
        rm.save(out_dir)
    distributed.barrier()
    return report
