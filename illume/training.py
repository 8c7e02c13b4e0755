"""Selection fine-tuning: tune the adapters on every rationale accepted so far (ILLUME's tune step), and the
adapter trainer every policy shares (`adapter_trainer`: SFT, DPO, KTO, GRPO).

Assumptions, up front:
- The training set is rebuilt each round from the feedback the loop read: every accepted rationale of every
  round so far (deduplicated per example and text) as `Q: q A: a, seeing that r<eos>` rows with loss on the rationale, plus
  answer-only rows `Q: q A: a<eos>` (loss on the answer) for examples that have no accepted rationale.
- loss = answer CE + w * rationale CE, summed over rows: each row's mean token CE is weighted by 1 (answer rows)
  or w (rationale rows), w = #answer-only rows / #rationale rows unless configured (the paper's choice: both
  kinds weigh the same in total however few rationales were accepted).
- Only the adapters train (optionally the prefix projection); each round continues from the weights the
  previous round kept. Every epoch's weights are saved (`round_NN/epochs/`); the loop's evaluate step scores
  them on val and keeps the best (`adapters.safetensors`, loaded back into the model).
- A DeepSpeed JSON path (`train.deepspeed`) switches ZeRO on through the HF Trainer. ZeRO-2 keeps full weights
  on every rank; ZeRO-3 partitions them (frozen ones too), and each epoch's adapters are gathered to be saved,
  the model gathered to be sampled and scored (illume.models.sharding).
- Several processes (torchrun / accelerate launch): DDP over gloo on CPU, nccl on GPUs; `train.batch_size` is
  per process. Val is decoded in shares and gathered, so every rank keeps the same epoch; rank 0 writes files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from illume import distributed
from illume.collate import RowEncoder
from illume.config import SampleConfig, TrainConfig
from illume.data.records import Example
from illume.evaluation import keep_best_epoch
from illume.models.sharding import release_training_hooks, whole
from illume.models.vlm import VLM
from illume.models.weights import save_trainable_weights
from illume.prompts import ANSWER_PROMPT, rationale_prompt
from illume.tracking import NO_REPORT, TrainerReport

ADAPTERS_FILE = "adapters.safetensors"
EPOCHS_DIR = "epochs"
"""Where a round's training saves each epoch's adapters until the evaluate step keeps the best."""


def retrain_round_remedy(round_dir: Path) -> str:
    """What to do about a round's damaged adapters: the loop trains a round without its folder again, from the
    judgments the store keeps."""
    return f"delete {round_dir} and run `illume run` again to retrain that round"


@dataclass
class TrainingRow:
    """One row of the selection-SFT set, as text (written to the round's manifest)."""

    example_id: str
    kind: str
    """"rationale" (loss on the rationale) or "answer" (loss on the answer)."""
    prompt: str
    target: str
    weight: float


def build_training_set(accepted: Sequence[tuple[str, str]], examples: Sequence[Example],
                       num_answer_only_rows: int | None = None, rationale_weight: float | None = None,
                       seed: int = 0) -> list[TrainingRow]:
    """Rows for selection-SFT from the accepted (example id, rationale) pairs.

    Args:
        accepted: Every accepted rationale so far, possibly with repeats (deduplicated here).
        examples: The train examples (the answer in the prompt is each example's reference answer).
        num_answer_only_rows: How many examples without an accepted rationale get an answer-only row (drawn
            at random with `seed`); None: all of them.
        rationale_weight: w; None: #answer-only rows / #rationale rows (1 when there are no answer rows).
    """
    by_id = {e.id: e for e in examples}
    unknown = sorted({example_id for example_id, _ in accepted} - set(by_id))
    if unknown:
        raise KeyError(f"{len(unknown)} accepted rationales belong to examples not in the train split, "
                       f"e.g. {unknown[:3]}")
    pairs = list(dict.fromkeys((example_id, text.strip()) for example_id, text in accepted))
    with_rationale = {example_id for example_id, _ in pairs}
    without = [e for e in examples if e.id not in with_rationale]
    if num_answer_only_rows is not None and num_answer_only_rows < len(without):
        without = random.Random(seed).sample(without, num_answer_only_rows)
    if rationale_weight is None:
        rationale_weight = len(without) / len(pairs) if pairs and without else 1.0
    rows = [TrainingRow(example_id, "rationale", rationale_prompt(by_id[example_id].question,
                                                                  by_id[example_id].answer),
                        text, rationale_weight) for example_id, text in pairs]
    rows += [TrainingRow(e.id, "answer", ANSWER_PROMPT.format(question=e.question), e.answer, 1.0)
             for e in without]
    return rows


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Sum over rows of weight x (mean next-token CE over the row's targets), divided by the number of rows.

    Args:
        logits: (B, T, V); labels: (B, T) with -100 where there is no target; row_weights: (B,).
    """
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                                 reduction="none")  # (B, T - 1)
    mask = (shift_labels != -100).float()
    row_loss = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (row_loss * row_weights.to(row_loss.dtype)).sum() / len(row_loss)


class RowWeightedTrainer(Trainer):
    """HF Trainer whose loss is `weighted_lm_loss` (rows carry their weight in the batch)."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, row_weights = inputs.pop("labels"), inputs.pop("row_weights")
        outputs = model(**inputs)
        loss = weighted_lm_loss(outputs.logits, labels, row_weights)
        return (loss, outputs) if return_outputs else loss


class TrainingRowsDataset(torch.utils.data.Dataset):
    """Encoded rows with their weights; rows of one example share its image tensors (RowEncoder)."""

    def __init__(self, vlm: VLM, rows: Sequence[TrainingRow], examples_by_id: dict[str, Example]):
        encode = RowEncoder(vlm, examples_by_id)
        self.items = [{**encode(row.example_id, row.prompt, row.target), "weight": row.weight} for row in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_rows(rows: list[dict], vlm: VLM) -> dict:
    batch = vlm.collate([{k: v for k, v in row.items() if k != "weight"} for row in rows])
    batch["row_weights"] = torch.tensor([row["weight"] for row in rows], dtype=torch.float32)
    return batch


def selection_trainer(vlm: VLM, rows: Sequence[TrainingRow], examples: Sequence[Example], cfg: TrainConfig,
                      round_dir: Path, report: TrainerReport = NO_REPORT) -> Trainer:
    """Selection-SFT on `rows` (`adapter_trainer` with the row-weighted loss); `train()` it."""
    if not rows:
        raise ValueError("the training set is empty: no accepted rationale and no answer-only row")
    dataset = TrainingRowsDataset(vlm, rows, {e.id: e for e in examples})
    return adapter_trainer(RowWeightedTrainer, vlm, dataset, partial(collate_rows, vlm=vlm), cfg, round_dir,
                           report=report)


class SaveEachEpoch(TrainerCallback):
    """After each epoch, rank 0 saves the trainable weights to `round_dir/epochs/epoch_NN.safetensors`: the
    loop's evaluate step scores them on val and keeps the best (`illume.evaluation.keep_best_epoch`)."""

    def __init__(self, vlm: VLM, round_dir: Path):
        self.vlm, self.round_dir = vlm, round_dir
        self.saved: list[Path] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        path = self.round_dir / EPOCHS_DIR / f"epoch_{round(state.epoch):02d}.safetensors"
        trainable = [p for p in self.vlm.model.parameters() if p.requires_grad]
        with whole(self.vlm.model, trainable):  # ZeRO-3: every rank gathers the adapters, rank 0 writes them
            if args.process_index == 0:
                save_trainable_weights(self.vlm.model, path)
        self.saved.append(path)
        return control


def check_zero_stage(deepspeed_config: str | None, what: str) -> None:
    """Refuse ZeRO-3 for what cannot run on partitioned weights (the AI judge, on rank 0 alone; TRL's GRPO):
    selection-SFT, DPO, KTO, our GRPO and the reward model can (illume.models.sharding). Failing early beats
    a hang or empty tensors."""
    if deepspeed_config is None:
        return
    stage = json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise NotImplementedError(f"{deepspeed_config}: ZeRO stage 3 is not supported by {what} (selection-SFT, "
                                  "DPO, KTO, GRPO and the reward model support it); use ZeRO-2 "
                                  "(configs/deepspeed/zero2.json)")


def trainer_arguments(out_dir: Path, *, seed: int, report: TrainerReport = NO_REPORT,
                      **settings) -> TrainingArguments:
    """The one builder of HF `TrainingArguments`: selection-SFT, DPO/KTO, the reward model and pre-training.

    Fixed here for every trainer: no Trainer checkpoints (each caller saves what it keeps), the CPU when there
    is no GPU, gloo for several CPU processes, data loaded in the main process, our collators' columns kept,
    progress bars on. The trackers are `report`'s (train.report_to; none by default: give the Trainer
    `report.callbacks()` too). `settings` are what differs between trainers: the schedule (epochs or
    steps, batch size, learning rate and its scheduler, logging), precision, checkpointing and DeepSpeed.
    """
    return TrainingArguments(
        output_dir=str(out_dir / "trainer"), seed=seed, data_seed=seed, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), ddp_backend=distributed.ddp_backend(), dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=False, **report.arguments(), **settings,
    )


def training_arguments(cfg: TrainConfig, out_dir: Path, learning_rate: float | None = None,
                       report: TrainerReport = NO_REPORT) -> TrainingArguments:
    """The arguments every adapter-tuning trainer here shares (SFT, DPO, KTO), from `train.*`."""
    return trainer_arguments(
        out_dir, seed=cfg.seed, report=report, num_train_epochs=cfg.num_epochs, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate if learning_rate is None else learning_rate,
        weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=cfg.adam_beta2, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=10, bf16=cfg.bf16, fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing, deepspeed=cfg.deepspeed,
    )


def adapter_trainer(trainer_cls: type[Trainer], vlm: VLM, dataset, collator, cfg: TrainConfig, round_dir: Path, *,
                    learning_rate: float | None = None,
                    report: TrainerReport = NO_REPORT, **trainer_kwargs) -> Trainer:
    """A `trainer_cls` that tunes the adapters (`train.*`) and saves them after every epoch (`SaveEachEpoch`);
    the caller calls `train()`, then hands `trained(trainer)` to the loop's evaluate step.

    Args:
        report: Where the trainer reports (train.report_to: illume.tracking.trainer_report); none by default.
    """
    round_dir.mkdir(parents=True, exist_ok=True)
    vlm.set_trainable(adapters=True, prefix=cfg.train_prefix)
    return trainer_cls(model=vlm.model, args=training_arguments(cfg, round_dir, learning_rate, report),
                       train_dataset=dataset, data_collator=collator,
                       callbacks=[SaveEachEpoch(vlm, round_dir), *report.callbacks()], **trainer_kwargs)


@dataclass
class Trained:
    """What a finished training leaves for the evaluate step and training.json."""

    epoch_weights: list[Path]
    """Each epoch's adapters, in order (`SaveEachEpoch`)."""
    losses: list[float]
    """The logged training losses."""
    world_size: int
    """How many processes trained."""
    log_history: list[dict]
    """The trainer's whole log (per-step metrics such as DPO's margins)."""


def trained(trainer: Trainer) -> Trained:
    """What `trainer` (made by `adapter_trainer`, or any trainer with a `SaveEachEpoch` callback) left after
    `train()`."""
    saver = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SaveEachEpoch))
    history = trainer.state.log_history
    release_training_hooks(trainer.model_wrapped)  # DeepSpeed: its hooks go (ZeRO-3: forwards run gathered)
    distributed.barrier()  # rank 0 saved the epochs' weights; every rank reads them
    return Trained(list(saver.saved), [entry["loss"] for entry in history if "loss" in entry],
                   trainer.args.world_size, history)


def fine_tune(vlm: VLM, rows: Sequence[TrainingRow], examples: Sequence[Example], val: Sequence[Example],
              cfg: TrainConfig, sample_cfg: SampleConfig, round_dir: Path, report: TrainerReport = NO_REPORT) -> dict:
    """Selection-SFT on `rows`, then the best val epoch kept, in one call (the supervised baseline, scripts):
    `selection_trainer`, `train()`, `illume.evaluation.keep_best_epoch`, as the loop's tune and evaluate steps
    do. Leaves the kept weights in `vlm.model` and `round_dir/adapters.safetensors`; writes training.json.

    Returns:
        {"best": val scores of the kept epoch, "epochs": val scores per epoch, "losses", "world_size",
         "num_rows", "log_history"}
    """
    trainer = selection_trainer(vlm, rows, examples, cfg, round_dir, report)
    trainer.train()
    result = trained(trainer)
    kept = keep_best_epoch(vlm, val, sample_cfg, cfg.select_metric, result.epoch_weights, round_dir / ADAPTERS_FILE)
    record = {"best": kept.best, "epochs": kept.epochs, "losses": result.losses, "world_size": result.world_size,
              "num_rows": len(rows), "log_history": result.log_history}
    if distributed.is_main():
        (round_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def write_manifest(rows: Sequence[TrainingRow], path: Path) -> None:
    """The training set of a round as JSONL (what was trained on, for audits and exports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(asdict(row)) + "\n")
