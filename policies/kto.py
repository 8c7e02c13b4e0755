"""KTO straight from accept/reject judgments (unpaired), on the shared adapter-training infrastructure.

A selection is exactly KTO's data: each judged rationale is desirable (accepted) or undesirable (rejected),
with no need to pair them. The loss is `policies.losses.kto_losses` (TRL's loss_type="kto"; parity test in
tests/test_policies.py). Its reference point z0 is estimated per batch, as TRL does, from mismatched
completions: each row is also scored with the completion of another example (fixed once per dataset, with
`policy.seed`), under the policy (no gradient) and the reference; z0 = mean difference, clamped at 0.

`policy.kto.undesirable_weight=None` weighs the rejected side by #accepted / #rejected: selections reject far
more than they accept (round 0 of the demo: ~4 % accepted), and the KTO paper asks for the two sides to
weigh about the same in total.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer

from illume.collate import RowEncoder
from illume.config import PolicyConfig, TrainConfig
from illume.data.records import Example
from illume.models.vlm import VLM
from illume.tracking import NO_REPORT, TrainerReport, trainer_report
from illume.training import adapter_trainer, trained
from policies.base import PolicyResult, RoundContext
from policies.data import ROUNDS_SAID, UnpairedRow, trained_on, unpaired_rows, write_jsonl
from policies.losses import kto_losses
from policies.reference import batch_logps
from policies.trainer import PolicyTrainer, answer_nll, answer_rows, score_before_training


def mismatched_completions(rows: Sequence[UnpairedRow], seed: int) -> list[str]:
    """For every row, the completion of a row of another example (a seeded derangement where possible)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # Row order[i] borrows from order[i + 1]: a cycle, so no row borrows its own completion when n > 1.
    borrowed = [""] * len(rows)
    for i, index in enumerate(order):
        borrowed[index] = rows[order[(i + 1) % len(order)]].completion
    return borrowed


class KTODataset(torch.utils.data.Dataset):
    """Encoded rows, their mismatched (KL) rows and labels, with reference log-probs filled in later."""

    def __init__(self, vlm: VLM, rows: Sequence[UnpairedRow], examples_by_id: dict[str, Example], seed: int,
                 with_answer_rows: bool = False):
        encode = RowEncoder(vlm, examples_by_id)
        self.items = [{"row": encode(r.example_id, r.prompt, r.completion),
                       "kl_row": encode(r.example_id, r.prompt, other), "label": r.accepted}
                      for r, other in zip(rows, mismatched_completions(rows, seed), strict=True)]
        if with_answer_rows:  # policy.kto.answer_weight: one answer-only row rides along with each labelled row
            for item, row in zip(self.items, answer_rows(encode, examples_by_id, len(self.items), seed)):
                item["answer"] = row

    def set_reference(self, logps: torch.Tensor, kl_logps: torch.Tensor) -> None:
        for item, value, kl in zip(self.items, logps.tolist(), kl_logps.tolist(), strict=True):
            item["ref_logps"], item["ref_kl_logps"] = value, kl

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_labelled(items: list[dict], vlm: VLM) -> dict:
    batch = vlm.collate([item["row"] for item in items])
    batch["kl"] = vlm.collate([item["kl_row"] for item in items])
    batch["label"] = torch.tensor([item["label"] for item in items], dtype=torch.bool)
    batch["ref_logps"] = torch.tensor([item["ref_logps"] for item in items])
    batch["ref_kl_logps"] = torch.tensor([item["ref_kl_logps"] for item in items])
    answers = [item["answer"] for item in items if "answer" in item]
    if answers:
        batch["answer"] = vlm.collate(answers)
    return batch


class KTOLossTrainer(PolicyTrainer):
    """HF Trainer whose loss is KTO's, with the batch KL estimate as the reference point."""

    def __init__(self, *args, policy: PolicyConfig, undesirable_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy, self.undesirable_weight = policy, undesirable_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        kl_batch, labels = inputs.pop("kl"), inputs.pop("label")
        ref_logps, ref_kl_logps = inputs.pop("ref_logps"), inputs.pop("ref_kl_logps")
        answers = inputs.pop("answer", None)
        with torch.no_grad():
            kl_logps = batch_logps(model, kl_batch)[0]
        kl = (kl_logps - ref_kl_logps.to(kl_logps.device)).mean()
        if dist.is_available() and dist.is_initialized():  # one z0 for the global batch, as TRL gathers it
            dist.all_reduce(kl, op=dist.ReduceOp.SUM)
            kl = kl / dist.get_world_size()
        kl = kl.clamp(min=0).detach()
        logps = batch_logps(model, inputs)[0]
        losses = kto_losses(logps, ref_logps.to(logps.device), labels.to(logps.device), kl, self.policy.kto.beta,
                            self.policy.kto.desirable_weight, self.undesirable_weight)
        if model.training:
            self._metrics["kl"].append(kl.item())
            rewards = self.policy.kto.beta * (logps - ref_logps.to(logps.device)).detach()
            for name, mask in (("chosen", labels), ("rejected", ~labels)):
                if mask.any():
                    self._metrics[f"rewards/{name}"].append(rewards[mask.to(rewards.device)].mean().item())
        loss = losses.nanmean()
        nll = answer_nll(model, answers) if self.policy.kto.answer_weight else None
        if nll is not None:
            loss = loss + self.policy.kto.answer_weight * nll
            if model.training:
                self._metrics["answer_nll"].append(nll.item())
        return (loss, None) if return_outputs else loss


def fill_labelled_reference(trainer: Trainer, dataset: KTODataset, vlm: VLM) -> None:
    """Score every row and its mismatched row under the model before the first update: the reference."""
    rows = [item["row"] for item in dataset.items] + [item["kl_row"] for item in dataset.items]
    logps = score_before_training(trainer, vlm, rows)
    dataset.set_reference(*logps.split(len(dataset.items)))


def train_kto(vlm: VLM, rows: Sequence[UnpairedRow], examples_by_id: dict[str, Example], policy: PolicyConfig,
              train_cfg: TrainConfig, out_dir: Path, report: TrainerReport = NO_REPORT) -> PolicyResult:
    """One KTO optimisation of the adapters on `rows` (`policy.*`, `train.*`), reference = the model as passed
    in; every epoch's weights saved for the evaluate step; reports to `report`'s trackers."""
    num_accepted = sum(r.accepted for r in rows)
    if not num_accepted or num_accepted == len(rows):
        raise ValueError("KTO needs both accepted and rejected rationales")
    undesirable_weight = (policy.kto.undesirable_weight if policy.kto.undesirable_weight is not None
                          else policy.kto.desirable_weight * num_accepted / (len(rows) - num_accepted))
    write_jsonl(rows, out_dir / "training_set.jsonl")
    dataset = KTODataset(vlm, rows, examples_by_id, policy.seed, with_answer_rows=bool(policy.kto.answer_weight))
    trainer = adapter_trainer(KTOLossTrainer, vlm, dataset, partial(collate_labelled, vlm=vlm), train_cfg, out_dir,
                              learning_rate=policy.learning_rate, report=report, policy=policy,
                              undesirable_weight=undesirable_weight)
    fill_labelled_reference(trainer, dataset, vlm)
    trainer.train()
    num_rationales = len({(r.example_id, r.completion) for r in rows})
    return PolicyResult(trained(trainer), {"train_rationales": num_rationales, "train_rows": len(rows)},
                        training={"num_accepted": num_accepted, "undesirable_weight": undesirable_weight})


def kto_round(context: RoundContext) -> PolicyResult:
    """policy.kind=kto as a loop policy: on this round's judgments (`policy.rounds=latest`) or every round's
    (`all`), from the feedback the loop read."""
    cfg = context.cfg
    context.say(f"round {context.round_idx}: kto on the judgments of {ROUNDS_SAID[cfg.policy.rounds]}")
    rows = unpaired_rows(trained_on(context), context.train_by_id)
    return train_kto(context.vlm, rows, context.train_by_id, cfg.policy, cfg.train, context.out_dir,
                     trainer_report(cfg, context.out_dir))
