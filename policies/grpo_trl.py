"""GRPO for `model.kind=hf` with TRL's own `GRPOTrainer` (policy.kind=grpo; policies/grpo.py dispatches here).

The policy is the same as policies/grpo.py's (reward = sum of weight x source over `policy.grpo.reward_sources`,
adapters only, the best val epoch kept, reward / acceptance / KL reported per round); what differs is who
samples and optimises: TRL 1.16's `GRPOTrainer`, online (fresh samples for every step, from the model as it
is at that step), instead of our sampler once per round plus our loss.

- **Prompts.** One dataset row per train question: the rationale prompt as our sampler builds it for train
  (`illume.prompts.rationale_prompt(question, reference answer)`), the image, and `example_id`. TRL passes
  images only with conversational prompts and renders them with `processing_class.apply_chat_template`, always
  with a generation prompt. In the chat format (`prompt.format: chat`) TRL gets the model's own template and the
  user's turn of the chat format (`ChatStyle.turns`); the assistant's turn cannot be started for TRL, so the
  model writes the connective ("{answer}, seeing that") itself, as selection-SFT trains it to (the chat format
  labels the connective), and the reward reads what follows it (`_rationale_of`). In the plain format TRL gets
  a copy of our processor whose chat template (`plain_chat_template`) renders each image part as our
  placeholder and each text part as it is, nothing else (no roles, no generation prompt). Either way the copy
  pads on the left as TRL requires and ends completions at our end token: TRL's prompt ids are then
  `HFVLM.encode_row(image, prompt)`'s (chat: without the connective), image tokens expanded
  (tests/test_grpo_trl.py checks them, with Qwen2-VL's per-token `mm_token_type_ids`).
- **Generation.** TRL's `generate` at `policy.grpo.temperature`, `policy.grpo.num_generations` (G) completions per
  question, at most `sample.max_new_tokens` tokens, with every special token but EOS suppressed (as our
  sampler bans them). Unlike our path, duplicates and empty completions stay in their group (TRL's groups
  are always G samples); TRL computes log-probs at the sampling temperature.
- **Reward.** `RewardFunction`: TRL calls it with the completions and the dataset columns, images included; it
  builds candidate sets per example, puts the images TRL passed into the examples the reward sources read
  (after checking that each is the image of its `example_id`), and sums weight x source. The reward model
  (`reward_model`) is fitted (or reused) once per round before training, `reward.fitted.reward_model_on` as
  policies/grpo.py does, not in every call; other sources are called as they are. Every scored sample is
  recorded (with the simulated critic's verdict when the references exist) for training_set.jsonl.
- **KL reference: the round's starting weights.** Given a PEFT model (ours) and beta != 0, TRL adds a frozen
  copy of its adapter ("ref") and computes the reference log-probs with it: the base model plus the adapters
  as the round found them, which is what we want. (The adapter-disabled base model is TRL's reference only
  when TRL wraps a plain model itself, from a `peft_config`; a plain model gets a reference reloaded from its
  checkpoint.) The copy is deleted after the round. With `train.train_prefix` the projector, a base weight,
  trains too and the "ref" adapter would see it move: then TRL gets a frozen copy of the whole model as the
  round found it as its `ref_model` instead (memory: a second model). tests/test_grpo_trl.py starts a round
  with adapters away from zero and checks that the first step's KL, before any update, is 0.
- **Answer rows.** As our path, `policy.grpo.answer_weight` x the token-mean NLL of answer-only rows
  `Q: q A: a<eos>` is added to TRL's loss: one extra forward per step on as many answer rows as the step has
  questions, cycling through the train questions (so one row per question per epoch). Tested in one process;
  under DDP it is a second forward before the backward (all trainable weights are used by both).
- **Schedule.** `train.*` through `illume.training.training_arguments` (then a GRPOConfig with the same
  values), `policy.grpo.iterations` epochs over the questions (TRL's num_train_epochs; its num_iterations
  stays 1), `policy.learning_rate`, `train.batch_size` completions per device step rounded down to whole
  groups (at least one; TRL drops each epoch's last incomplete batch of questions), the seed offset by the
  round (as our GRPO seeds are). Every epoch's adapters are saved (`illume.training.SaveEachEpoch`); the
  loop's evaluate step scores them on val and keeps the best.
- **Reported** (training.json, results.json): `grpo_reward` (mean reward of all the round's samples),
  `grpo_accept` (the fraction of them the simulated critic accepts; None without references), `grpo_kl`
  (TRL's `kl`, averaged over the kept epoch's steps); per-epoch and per-step values in training.json, the
  samples in training_set.jsonl (with several processes: every process's).

ZeRO-3: TRL gathers the weights for generation itself (`unwrap_model_for_generation`); its "ref" adapter is
copied from ours inside `illume.models.sharding.whole` (from the second round on ours is partitioned), and
DeepSpeed partitions the new adapter when training starts. With `train.train_prefix` ZeRO-3 is refused (the
reference would be a copy of a partitioned model). tests/test_sharded.py compares two rounds with DDP.

What TRL does to the model while it trains is undone after the round (`_undo_trl_changes`): its reference
adapter, the fused log-prob head it patches into `forward`, the dropout it switches off.

policies/grpo.py chooses this trainer for `model.kind=hf` (its GRPO_TRAINERS) and passes its reward sources
(REWARDS) and its previous-round warning in: this module must not import policies/grpo.py, which imports it
(the import contracts in pyproject.toml forbid the cycle).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from illume import distributed
from illume.collate import RowEncoder
from illume.critics import SimulatedCritic
from illume.data.records import Candidate, CandidateSet, Example, load_image
from illume.models.hf import HFVLM, banned_token_ids
from illume.models.sharding import whole
from illume.prompts import ANSWER_PROMPT, ChatStyle, rationale_prompt
from illume.tracking import NO_REPORT, TrainerReport, trainer_report
from illume.training import SaveEachEpoch, check_zero_stage, trained, training_arguments
from policies.base import PolicyResult, RoundContext
from policies.data import PolicyDataError
from policies.losses import per_token_logps

SAMPLES_FILE = "training_set.jsonl"
SEED_ROUND_OFFSET = 10_000
"""As policies/grpo.py's: round r's GRPO draws use seed train.seed + this + r."""
REFERENCE_ADAPTER = "ref"
"""The name TRL gives the frozen copy of the adapter it uses as the reference."""

RewardSource = Callable[[RoundContext, Sequence[CandidateSet]], list[list[float]]]


# --- Prompts ------------------------------------------------------------------------------------------------

def plain_chat_template(image_placeholder: str) -> str:
    """A Jinja chat template that renders a conversation as our HF backend writes a prompt: each image part as
    `image_placeholder`, each text part (or string content) as it is; no roles, no generation prompt."""
    image = "{{ " + json.dumps(image_placeholder) + " }}"  # a JSON string is a Jinja string literal
    return ("{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}" + image +
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{%- endfor -%}")


def trl_processor(vlm: HFVLM):
    """A copy of the model's processor for TRL: its own chat template in the chat format, else
    `plain_chat_template`; padding on the left (TRL left-pads the prompt ids and concatenates the processor's
    per-token fields, e.g. Qwen2-VL's `mm_token_type_ids`, with them); EOS our end token (TRL stops a
    completion at the tokenizer's EOS; the chat format's is the end of the assistant's turn). The model's own
    processor is left as it is."""
    processor = copy.deepcopy(vlm.processor)
    processor.__class__ = _model_inputs_only(type(processor))
    if vlm.chat is None:
        processor.chat_template = plain_chat_template(vlm.image_placeholder)
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.eos_token = processor.tokenizer.convert_ids_to_tokens(vlm.eos_token_id)
    return processor


@functools.cache
def _model_inputs_only(processor_class: type) -> type:
    """`processor_class` whose outputs hold model inputs only: LLaVA-OneVision's processor also returns
    `batch_num_images`, which TRL hands to its log-prob function with the image inputs, where it fails (one
    image per prompt is the model's default anyway)."""

    class ModelInputsOnly(processor_class):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            out.pop("batch_num_images", None)
            return out

    ModelInputsOnly.__name__ = ModelInputsOnly.__qualname__ = processor_class.__name__
    return ModelInputsOnly


def user_text(vlm: HFVLM, prompt: str) -> str:
    """What TRL puts after the image in the user's turn: the chat format's user turn, or the plain prompt."""
    return prompt if vlm.chat is None else vlm.chat.turns(prompt).user


def _rationale_of(chat: ChatStyle | None, prompt: str, text: str) -> str:
    """The rationale in a completion TRL drew: in the chat format the text after the connective the model
    wrote (the whole text when it wrote another one), else the text."""
    reply = "" if chat is None else _clean(chat.turns(prompt).reply)
    return text[len(reply):].strip() if reply and text.startswith(reply) else text


def prompt_dataset(vlm: HFVLM, examples: Sequence[Example]) -> Dataset:
    """One row per train question: the conversational rationale prompt (one user turn, `user_text`), the image
    (RGB; a file path stays a path, read when a row is) and `example_id`."""
    features = Features({"prompt": [{"role": Value("string"), "content": Value("string")}],
                         "image": ImageFeature(mode="RGB"), "example_id": Value("string")})
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": user_text(vlm, rationale_prompt(e.question, e.answer))}]
                   for e in examples],
        "image": [e.image if isinstance(e.image, Image.Image) else str(e.image) for e in examples],
        "example_id": [e.id for e in examples],
    }, features=features)


# --- Reward -------------------------------------------------------------------------------------------------

def _clean(text: str) -> str:
    return " ".join(text.split())


def _completion_text(completion) -> str:
    """A TRL completion (conversational: [{"role": "assistant", "content": text}], or text) as our sampler
    stores a rationale: whitespace normalised."""
    if isinstance(completion, list):
        completion = "".join(message["content"] for message in completion if isinstance(message.get("content"), str))
    return _clean(completion)


def round_sources(context: RoundContext, sources: Mapping[str, RewardSource],
                  weights: Mapping[str, float]) -> dict[str, RewardSource]:
    """The round's reward sources by name: `sources[name]` as it is, except the reward model, fitted (or reused)
    here once (`reward.fitted.reward_model_on` on people's judgments of rounds <= this one, as policies/grpo.py's
    reward_model_source) and then only scored by each call."""
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise PolicyDataError(f"policy.grpo.reward_sources: unknown source(s) {unknown}; known: {sorted(sources)}")
    out = {name: sources[name] for name in weights}
    if "reward_model" in weights:
        from reward.fitted import reward_model_on
        from reward.model import score

        rm, _ = reward_model_on(context.cfg, context.round_idx, context.store, context.train_by_id, context.say)

        def reward_model(ctx: RoundContext, sets: Sequence[CandidateSet]) -> list[list[float]]:
            return score(rm, [(ctx.train_by_id[cs.example_id], cs.prompt, [c.text for c in cs.candidates])
                              for cs in sets])

        out["reward_model"] = reward_model
    return out


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


class RewardFunction:
    """TRL's reward function: `f(prompts, completions, example_id=..., image=..., **kw) -> list[float]`.

    Per call the rows are grouped by `example_id` into candidate sets (prompt: the example's rationale prompt);
    each example the sources read carries the image TRL passed with its rows, checked to be that example's
    image (PolicyDataError otherwise). Reward = sum of weight x source. Each scored sample is appended to
    `samples` (example_id, prompt, completion (chat: after the connective, `_rationale_of`), reward, accepted: the simulated critic's verdict or None without
    references, step and epoch of the trainer when it was drawn).
    """

    __name__ = "illume_reward"  # TRL logs rewards/<name>/mean

    def __init__(self, context: RoundContext, sources: Mapping[str, RewardSource], weights: Mapping[str, float],
                 chat: ChatStyle | None = None):
        self.context, self.sources, self.weights, self.chat = context, dict(sources), dict(weights), chat
        self.samples: list[dict] = []

    def _examples_with_images(self, example_ids: Sequence[str], images: Sequence) -> dict[str, Example]:
        """The examples of these rows, each with the image its rows came with."""
        by_id: dict[str, Example] = {}
        for example_id, image in zip(example_ids, images, strict=True):
            if example_id not in self.context.train_by_id:
                raise PolicyDataError(f"GRPO reward: example {example_id!r} is not a train question of this round")
            if isinstance(image, list):  # an `images` column: one image per prompt here
                (image,) = image
            if example_id in by_id:
                if image is not by_id[example_id].image and not _same_image(image, by_id[example_id].image):
                    raise PolicyDataError(f"GRPO reward: the rows of {example_id!r} came with different images")
                continue
            example = self.context.train_by_id[example_id]
            if not _same_image(image, load_image(example)):
                raise PolicyDataError(f"GRPO reward: the image passed with {example_id!r} is not that example's")
            by_id[example_id] = dataclasses.replace(example, image=image)
        return by_id

    def __call__(self, prompts, completions, example_id, image, trainer_state=None, **kwargs) -> list[float]:
        examples = self._examples_with_images(example_id, image)
        prompts_of = {eid: rationale_prompt(examples[eid].question, examples[eid].answer) for eid in examples}
        texts = [_rationale_of(self.chat, prompts_of[eid], _completion_text(c))
                 for eid, c in zip(example_id, completions, strict=True)]
        rows: dict[str, list[int]] = {}
        for i, eid in enumerate(example_id):
            rows.setdefault(eid, []).append(i)
        temperature = self.context.cfg.policy.grpo.temperature
        sets = [CandidateSet(eid, examples[eid].answer, examples[eid].answer, prompts_of[eid], 0,
                             [Candidate(texts[i], temperature, 0, j, 0.0) for j, i in enumerate(indices)])
                for eid, indices in rows.items()]
        context = dataclasses.replace(self.context, train_by_id={**self.context.train_by_id, **examples})
        totals = [0.0] * len(texts)
        for name, weight in self.weights.items():
            for cs, scores in zip(sets, self.sources[name](context, sets), strict=True):
                for i, value in zip(rows[cs.example_id], scores, strict=True):
                    totals[i] += weight * value
        accepted = acceptance(context, sets)
        step = trainer_state.global_step if trainer_state is not None else None
        epoch = (trainer_state.epoch or 0.0) if trainer_state is not None else None
        for k, cs in enumerate(sets):
            for j, i in enumerate(rows[cs.example_id]):
                self.samples.append({"example_id": cs.example_id, "prompt": cs.prompt, "completion": texts[i],
                                     "reward": totals[i],
                                     "accepted": accepted[k][j] if accepted is not None else None,
                                     "step": step, "epoch": epoch})
        return totals


def acceptance(context: RoundContext, sets: Sequence[CandidateSet]) -> list[list[bool]] | None:
    """Which samples the simulated critic accepts; None when some of these questions have no reference
    (policies/grpo.py's `acceptance`)."""
    if not sets or not all(context.train_by_id[cs.example_id].explanations for cs in sets):
        return None
    judgments = SimulatedCritic(context.cfg.critic).decide(sets, context.train_by_id)  # accepted by text
    return [[c.text in set(r.accepted) for c in cs.candidates] for cs, r in zip(sets, judgments, strict=True)]


# --- Trainer ------------------------------------------------------------------------------------------------

class IllumeGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer plus our answer-only NLL rows, a per-step record of TRL's KL, and (optionally) an
    explicit frozen reference model instead of TRL's reference adapter."""

    def __init__(self, *args, answer_rows: Sequence[dict] = (), answer_weight: float = 0.0,
                 collate: Callable[[list[dict]], dict] | None = None, reference: nn.Module | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_rows, self.answer_weight, self.collate = list(answer_rows), answer_weight, collate
        self._answer_order: list[int] = []
        self._answer_random = random.Random(self.args.seed)
        self.steps: list[dict] = []
        """One entry per training micro-batch: step, epoch (before the step), kl, policy_loss, answer_nll."""
        if reference is not None and self.beta != 0.0:
            self._use_reference_model(reference)

    def _use_reference_model(self, reference: nn.Module) -> None:
        """`reference` (frozen) as TRL's `ref_model`, set up as TRL sets up one it builds itself."""
        from trl.models import prepare_deepspeed
        from trl.trainer.utils import add_fused_lm_head

        policy = self.accelerator.unwrap_model(self.model)
        if REFERENCE_ADAPTER in getattr(policy, "peft_config", {}):
            policy.delete_adapter(REFERENCE_ADAPTER)  # TRL's own reference, not needed now
        reference.requires_grad_(False).eval()
        base = reference.get_base_model() if hasattr(reference, "get_base_model") else reference
        add_fused_lm_head(base, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            self.ref_model = prepare_deepspeed(reference, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)

    def _next_answer_rows(self, count: int) -> list[dict]:
        rows = []
        while len(rows) < count:
            if not self._answer_order:
                self._answer_order = list(range(len(self.answer_rows)))
                self._answer_random.shuffle(self._answer_order)
            rows.append(self.answer_rows[self._answer_order.pop()])
        return rows

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return loss
        metrics = self._metrics["train"]
        entry = {"step": self.state.global_step, "epoch": self.state.epoch,
                 "kl": metrics["kl"][-1] if metrics.get("kl") else None,  # TRL's, of this micro-batch
                 "policy_loss": loss.item() * self.current_gradient_accumulation_steps}
        if self.answer_weight and self.answer_rows:
            count = max(1, len(inputs["completion_ids"]) // self.num_generations)  # the questions of this batch
            batch = {k: v.to(loss.device) for k, v in self.collate(self._next_answer_rows(count)).items()}
            labels = batch.pop("labels")
            with self.accelerator.autocast():
                logits = model(**batch, use_cache=False).logits
            tokens, mask = per_token_logps(logits, labels)
            nll = -(tokens * mask).sum() / mask.sum().clamp(min=1)
            # TRL's loss is already divided by the accumulation steps (loss_is_scaled_for_ga); so is this term.
            loss = loss + self.answer_weight * nll / self.current_gradient_accumulation_steps
            metrics["answer_nll"].append(nll.item())
            entry["answer_nll"] = nll.item()
        self.steps.append(entry)
        return loss


@contextlib.contextmanager
def _undo_trl_changes(model: nn.Module) -> Iterator[None]:
    """Undo, on leaving, what GRPOTrainer changes in the model it trains: the reference adapter it adds, the
    fused log-prob head it patches into the base model's `forward`, the dropout it switches off."""
    base = model.get_base_model()
    had_forward = "forward" in vars(base)
    dropout = {module: module.p for module in model.modules() if isinstance(module, nn.Dropout)}
    try:
        yield
    finally:
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(REFERENCE_ADAPTER)
        if not had_forward:
            vars(base).pop("forward", None)
        for module, p in dropout.items():
            module.p = p


def questions_per_step(batch_size: int, num_generations: int, num_questions: int, world_size: int,
                       accumulation_steps: int) -> int:
    """Questions per device step: `train.batch_size` completions rounded down to whole groups of G (at least
    one), and no more than one generation batch (world x accumulation x this) of the round's questions holds.

    Raises:
        PolicyDataError: fewer questions than one generation batch needs.
    """
    if num_questions < world_size * accumulation_steps:
        raise PolicyDataError(f"TRL's GRPO needs at least {world_size * accumulation_steps} train questions "
                              f"(processes x train.gradient_accumulation_steps); this round has {num_questions}")
    return max(1, min(batch_size // num_generations, num_questions // (world_size * accumulation_steps)))


def grpo_config(context: RoundContext, banned_token_ids: Sequence[int],
                report: TrainerReport = NO_REPORT) -> GRPOConfig:
    """`illume.training.training_arguments(train.*)` as a GRPOConfig (its trackers `report`'s), with
    policy.*'s GRPO settings."""
    cfg, p = context.cfg, context.cfg.policy.grpo
    base = training_arguments(cfg.train, context.out_dir, cfg.policy.learning_rate, report)
    settings = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    world = distributed.world_size()
    questions = questions_per_step(cfg.train.batch_size, p.num_generations, len(context.train), world,
                                   cfg.train.gradient_accumulation_steps)
    seed = cfg.train.seed + SEED_ROUND_OFFSET + context.round_idx
    settings.update(
        seed=seed, data_seed=seed, num_train_epochs=p.iterations,
        per_device_train_batch_size=questions * p.num_generations,
        num_generations=p.num_generations, temperature=p.temperature, beta=p.beta, epsilon=p.epsilon,
        # sample.top_k / top_p as our sampler applies them (TRL's defaults 0 and 1.0 are "off", as ours)
        top_k=context.cfg.sample.top_k or 0, top_p=context.cfg.sample.top_p,
        loss_type=p.loss_type, scale_rewards="group" if p.scale_rewards else "none",
        max_completion_length=context.cfg.sample.max_new_tokens, num_iterations=1, use_vllm=False,
        disable_dropout=True, generation_kwargs={"suppress_tokens": list(banned_token_ids)},
        log_completions=False,
    )
    return GRPOConfig(**settings)


# --- The round ----------------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _epoch_of(epoch: float | None) -> int:
    """The (1-based) epoch a value recorded at trainer epoch `epoch` (before its step) belongs to."""
    return math.floor((epoch or 0.0) + 1e-6) + 1


def trl_grpo_round(context: RoundContext, *, sources: Mapping[str, RewardSource],
                   round_warning: Callable[[Path, int, float, float | None], str | None] | None = None
                   ) -> PolicyResult:
    """policy.kind=grpo for an HF VLM with TRL's GRPOTrainer (see the module doc).

    Args:
        sources: Reward sources by `policy.grpo.reward_sources` name (policies/grpo.py's REWARDS).
        round_warning: (out_dir, round, mean reward, acceptance) -> a warning to print or None
            (policies/grpo.py's `previous_round_warning`).
    """
    cfg, p, vlm, out_dir = context.cfg, context.cfg.policy.grpo, context.vlm, context.out_dir
    weights = {name: weight for name, weight in p.reward_sources.items() if weight}
    context.say(f"round {context.round_idx}: GRPO (TRL) on {p.num_generations} samples per train question and "
                f"step, reward " + " + ".join(f"{w:g} x {name}" for name, w in weights.items()))
    if not context.train:
        raise PolicyDataError("GRPO has no train question")
    if cfg.train.train_prefix:  # its reference is then a copy of the model, which a partitioned one cannot give
        check_zero_stage(cfg.train.deepspeed, "TRL's GRPO with train.train_prefix=true")
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm.set_trainable(adapters=True, prefix=cfg.train.train_prefix)
    reward = RewardFunction(context, round_sources(context, sources, weights), weights, vlm.chat)
    # The projector is a base weight: TRL's reference adapter would not keep it as the round found it.
    reference = copy.deepcopy(vlm.model) if cfg.train.train_prefix else None
    encode = RowEncoder(vlm, context.train_by_id)
    answer_rows = ([encode(e.id, ANSWER_PROMPT.format(question=e.question), e.answer) for e in context.train]
                   if p.answer_weight else [])
    report = trainer_report(cfg, out_dir)
    with _undo_trl_changes(vlm.model):
        with whole(vlm.model):  # ZeRO-3 after an earlier round: TRL copies the adapters into its "ref" adapter
            trainer = IllumeGRPOTrainer(
                model=vlm.model, reward_funcs=reward, args=grpo_config(context, banned_token_ids(vlm), report),
                train_dataset=prompt_dataset(vlm, context.train), processing_class=trl_processor(vlm),
                callbacks=[SaveEachEpoch(vlm, out_dir), *report.callbacks()], answer_rows=answer_rows,
                answer_weight=p.answer_weight, collate=vlm.collate, reference=reference)
        trainer.train()

    samples = distributed.gather_objects(reward.samples)
    if not samples:
        raise PolicyDataError("TRL's GRPO scored no sample: no training step ran")
    steps = trainer.steps
    mean_reward = _mean(s["reward"] for s in samples)
    accepted = [s["accepted"] for s in samples]
    accept = _mean(float(a) for a in accepted) if accepted and None not in accepted else None
    per_epoch = []
    for epoch in range(1, p.iterations + 1):
        drawn = [s for s in samples if _epoch_of(s["epoch"]) == epoch]
        in_epoch = [s for s in steps if _epoch_of(s["epoch"]) == epoch]
        flags = [s["accepted"] for s in drawn]
        per_epoch.append({"epoch": epoch, "kl": _mean(s["kl"] for s in in_epoch),
                          "policy_loss": _mean(s["policy_loss"] for s in in_epoch),
                          "answer_nll": _mean(s.get("answer_nll") for s in in_epoch),
                          "reward": _mean(s["reward"] for s in drawn),
                          "accept": _mean(float(a) for a in flags) if flags and None not in flags else None})
    report = {"train_rationales": len(samples), "train_rows": len(samples) + len(answer_rows) * p.iterations,
              "grpo_reward": mean_reward, "grpo_accept": accept}
    if distributed.is_main():
        with (out_dir / SAMPLES_FILE).open("w") as f:
            for record in samples:
                f.write(json.dumps(record) + "\n")
    training = {"trainer": "trl.GRPOTrainer", "num_questions": len(context.train),
                "num_answer_rows": len(answer_rows), "reward_sources": weights, "per_epoch": per_epoch, "steps": steps,
                "reference": "model copy" if reference is not None else "adapter copy"}
    context.say(f"round {context.round_idx}: GRPO samples' mean reward {mean_reward:.3f}"
                + (f", simulated critic accepts {accept:.1%}" if accept is not None else ""))
    warning = round_warning(out_dir, context.round_idx, mean_reward, accept) if round_warning else None
    if warning:
        context.say(warning)
    return PolicyResult(trained(trainer), report, [{"grpo_kl": e["kl"]} for e in per_epoch], training)
