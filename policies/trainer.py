"""What the DPO and KTO trainers share: per-step metrics logged next to the loss, and reference log-probs
computed on the device and in the precision the trainer is about to train in."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from policies.reference import reference_logps


class PolicyTrainer(Trainer):
    """HF Trainer with a per-batch mean loss and TRL-style averaged metrics (`self._metrics[name].append`)."""

    loss_is_scaled_for_ga = False  # a per-batch mean, as RowWeightedTrainer's

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Averages since the last log, next to the loss (as TRL's trainers report them).
        for key, values in self._metrics.items():
            if values:
                logs[key] = sum(values) / len(values)
        self._metrics.clear()
        super().log(logs, start_time)


def score_before_training(trainer: Trainer, vlm, rows: list[dict]) -> torch.Tensor:
    """Sequence log-probs of `rows` under the model as it is now: the reference of the coming optimisation."""
    args = trainer.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return reference_logps(vlm.model, rows, vlm.collate, args.per_device_train_batch_size * 2, args.device, dtype)
