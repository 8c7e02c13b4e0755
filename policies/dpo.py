"""DPO on chosen vs rejected rationales, on the shared adapter-training infrastructure (HF Trainer).

Why not `trl.DPOTrainer` itself: TRL 1.16 patches the model's forward with a fused LM head that calls the
backbone through `model.base_model` and expects a text-only or TRL-known VLM input layout; our MAGMA feeds the
image through `<|image|>` slots of its own forward. So the loss is ours (`policies.losses.dpo_losses`, equal
to TRL's on identical log-probabilities: tests/test_policies.py drives TRL's own `_compute_loss`), the training
loop is the HF Trainer every other optimiser here uses (DeepSpeed, bf16, several processes, each epoch saved
for the loop's evaluate step).

A batch holds B pairs as 2B rows: chosen rows first, then rejected rows, in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer

from illume.collate import RowEncoder
from illume.config import PolicyConfig, TrainConfig
from illume.data.records import Example
from illume.feedback.verdicts import PreferencePair
from illume.models.vlm import VLM
from illume.models.weights import save_safetensors
from illume.tracking import NO_REPORT, TrainerReport, trainer_report
from illume.training import adapter_trainer, trained
from policies.base import PolicyResult, RoundContext
from policies.data import ROUNDS_SAID, preference_pairs, trained_on, write_jsonl
from policies.losses import dpo_losses
from policies.reference import batch_logps
from policies.trainer import PolicyTrainer, answer_nll, answer_rows, score_before_training

REFERENCE_FILE = "reference_logps.safetensors"


class DPODataset(torch.utils.data.Dataset):
    """Encoded (chosen, rejected) rows per pair, with reference log-probs filled in before training."""

    def __init__(self, vlm: VLM, pairs: Sequence[PreferencePair], examples_by_id: dict[str, Example],
                 with_answer_rows: bool = False, seed: int = 0):
        encode = RowEncoder(vlm, examples_by_id)
        self.items = [{"chosen": encode(p.example_id, p.prompt, p.chosen),
                       "rejected": encode(p.example_id, p.prompt, p.rejected)} for p in pairs]
        if with_answer_rows:  # policy.dpo.answer_weight: one answer-only row rides along with each pair
            for item, row in zip(self.items, answer_rows(encode, examples_by_id, len(self.items), seed)):
                item["answer"] = row

    def set_reference(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        for item, c, r in zip(self.items, chosen.tolist(), rejected.tolist(), strict=True):
            item["ref_chosen_logps"], item["ref_rejected_logps"] = c, r

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_pairs(items: list[dict], vlm: VLM) -> dict:
    """One batch of 2B rows (chosen then rejected) plus the reference log-probs of the pairs."""
    batch = vlm.collate([item["chosen"] for item in items] + [item["rejected"] for item in items])
    batch["ref_chosen_logps"] = torch.tensor([item["ref_chosen_logps"] for item in items])
    batch["ref_rejected_logps"] = torch.tensor([item["ref_rejected_logps"] for item in items])
    answers = [item["answer"] for item in items if "answer" in item]
    if answers:
        batch["answer"] = vlm.collate(answers)
    return batch


class DPOLossTrainer(PolicyTrainer):
    """HF Trainer whose loss is DPO's (TRL's loss types) plus an optional NLL term on the chosen rows."""

    def __init__(self, *args, policy: PolicyConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        ref_chosen, ref_rejected = inputs.pop("ref_chosen_logps"), inputs.pop("ref_rejected_logps")
        answers = inputs.pop("answer", None)
        logps, lengths = batch_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        ref_chosen, ref_rejected = ref_chosen.to(chosen.device), ref_rejected.to(chosen.device)
        p = self.policy.dpo
        loss = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, p.loss_type, p.beta, p.label_smoothing,
                          chosen_lengths, rejected_lengths).mean()
        if p.sft_weight:  # TRL's "sft" loss: mean NLL over all chosen tokens of the batch
            loss = loss + p.sft_weight * (-chosen.sum() / chosen_lengths.sum().clamp(min=1))
        nll = answer_nll(model, answers) if p.answer_weight else None
        if nll is not None:
            loss = loss + p.answer_weight * nll
            if model.training:
                self._metrics["answer_nll"].append(nll.item())
        if model.training:
            margins = p.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
            self._metrics["rewards/margins"].append(margins.mean().item())
            self._metrics["rewards/accuracies"].append((margins > 0).float().mean().item())
            self._metrics["logps/chosen"].append(chosen.detach().mean().item())
            self._metrics["logps/rejected"].append(rejected.detach().mean().item())
        return (loss, None) if return_outputs else loss


def fill_pair_reference(trainer: Trainer, dataset: DPODataset, vlm: VLM) -> None:
    """Score every pair under the model as it is now (before the first update): the reference."""
    rows = [item["chosen"] for item in dataset.items] + [item["rejected"] for item in dataset.items]
    logps = score_before_training(trainer, vlm, rows)
    chosen, rejected = logps.split(len(dataset.items))
    dataset.set_reference(chosen, rejected)
    # Kept for audits (and the test that the reference is the model the round started from).
    if trainer.args.process_index == 0:
        save_safetensors({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()},
                         Path(trainer.args.output_dir).parent / REFERENCE_FILE)


def train_dpo(vlm: VLM, pairs: Sequence[PreferencePair], examples_by_id: dict[str, Example], policy: PolicyConfig,
              train_cfg: TrainConfig, out_dir: Path, report: TrainerReport = NO_REPORT) -> PolicyResult:
    """One DPO optimisation of the adapters on `pairs` (`policy.*`, `train.*`), reference = the model as passed
    in; every epoch's weights saved for the evaluate step; reports to `report`'s trackers."""
    if not pairs:
        raise ValueError("DPO needs at least one preference pair")
    write_jsonl(pairs, out_dir / "training_set.jsonl")
    dataset = DPODataset(vlm, pairs, examples_by_id, with_answer_rows=bool(policy.dpo.answer_weight), seed=policy.seed)
    trainer = adapter_trainer(DPOLossTrainer, vlm, dataset, partial(collate_pairs, vlm=vlm), train_cfg, out_dir,
                              learning_rate=policy.learning_rate, report=report, policy=policy)
    fill_pair_reference(trainer, dataset, vlm)
    trainer.train()
    result = trained(trainer)
    num_rationales = len({(p.example_id, text) for p in pairs for text in (p.chosen, p.rejected)})
    margins = [entry["rewards/margins"] for entry in result.log_history if "rewards/margins" in entry]
    return PolicyResult(result, {"train_rationales": num_rationales, "train_rows": len(pairs)},
                        training={"num_pairs": len(pairs), "margins": margins})


def dpo_round(context: RoundContext) -> PolicyResult:
    """policy.kind=dpo as a loop policy: on the pairs of this round's judgments (`policy.rounds=latest`) or of
    every round so far (`all`), from the feedback the loop read."""
    cfg = context.cfg
    context.say(f"round {context.round_idx}: dpo on the judgments of {ROUNDS_SAID[cfg.policy.rounds]}")
    pairs = preference_pairs(trained_on(context), context.train_by_id, cfg.policy.dpo.reference_as_chosen)
    return train_dpo(context.vlm, pairs, context.train_by_id, cfg.policy, cfg.train, context.out_dir,
                     trainer_report(cfg, context.out_dir))
