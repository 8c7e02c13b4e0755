"""What the DPO and KTO trainers share: per-step metrics logged next to the loss, reference log-probs
computed on the device and in the precision the trainer is about to train in, and the answer-only NLL rows
that keep answer accuracy from drifting (as selection-SFT's answer rows and GRPO's do)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping

import torch
from transformers import Trainer

from illume.collate import RowEncoder
from illume.data.records import Example
from illume.models.sharding import whole
from illume.prompts import ANSWER_PROMPT
from policies.reference import batch_logps, reference_logps


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
    with whole(vlm.model):  # ZeRO-3 after an earlier round: scored on the gathered weights (every rank)
        return reference_logps(vlm.model, rows, vlm.collate, args.per_device_train_batch_size * 2, args.device,
                               dtype)


def answer_rows(encode: RowEncoder, examples_by_id: Mapping[str, Example], count: int, seed: int) -> list[dict]:
    """`count` answer-only rows `Q: q A: a<eos>`, one attached to each pair (DPO) or labelled row (KTO).

    They cycle through the examples in a seeded order, so every question's answer is trained about equally
    often (count / #questions times an epoch) however many pairs a question has; with fewer pairs than
    questions, `count` of them. Examples without an answer get none.
    """
    examples = [e for e in examples_by_id.values() if e.answers and e.answers[0]]
    if not examples or not count:
        return []
    random.Random(f"{seed}/answer-rows").shuffle(examples)
    return [encode(e.id, ANSWER_PROMPT.format(question=e.question), e.answer)
            for e in (examples[i % len(examples)] for i in range(count))]


def answer_nll(model, batch: dict | None) -> torch.Tensor | None:
    """Token-mean NLL of a collated batch of answer rows (None: the batch has none)."""
    if batch is None:
        return None
    logps, lengths = batch_logps(model, batch)
    return -logps.sum() / lengths.sum().clamp(min=1)
