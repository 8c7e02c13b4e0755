"""GRPO: online RL on rationales the policy draws itself, scored by a configurable reward (policy.kind=grpo).

Per round, after the round's judgments (the loop's step 2):
1. **Sample.** `policy.grpo.num_generations` (G) rationales per train question from the model as the round found
   it, by the shared sampler (image encoded once, K-way cache reuse) at `policy.grpo.temperature`, with
   seeds of their own per round (not the round's candidates' seeds). The sampler keeps distinct rationales
   only, so a group is a question's *distinct* rationales (at most G): each counts once in its group's mean
   and std. A duplicate carries no new information about the ranking; counting it twice (TRL) would weigh
   the mode of the policy more. A question with one distinct rationale has advantage 0 (only KL and the
   answer rows move it).
2. **Reward.** sum over `policy.grpo.reward_sources` of weight x source, sources in `REWARDS`: `reward_model` (the
   reward model fitted on people's judgments of this round and earlier, `reward.fitted.reward_model_on`; saved
   to RUN_DIR/reward/round_{r+1}, which a reward critic's next round then reuses) and `simulated` (the
   critic's metric, ROUGE-L, against the reference explanations). A new source (an AI judge) is one entry.
3. **Advantages.** Normalised within each group (`policies.losses.group_advantages`, TRL's epsilon), or
   RLOO's leave-one-out baseline (`policy.grpo.baseline=rloo`).
4. **Reference.** Per-token log-probs of every sample under the model as the round found it, at the
   sampling temperature (logits / `policy.grpo.temperature`, as TRL; so are the policy's), computed once
   in eval mode before the first update (the reference cannot drift during the round). The samples were
   drawn by that same model, so these are also the "old" log-probs of the clipped ratio.
5. **Train.** Adapters only (the shared HF Trainer, `illume.training.adapter_trainer`),
   `policy.grpo.iterations` epochs over the samples with `policies.losses.grpo_loss` (TRL 1.16's maths:
   clipped ratio, k3 KL x `policy.grpo.beta`, `policy.grpo.loss_type`), plus `policy.grpo.answer_weight` x the
   token-mean NLL of answer-only rows `Q: q A: a<eos>` (one per train question) so that answer accuracy does
   not drift, and with `policy.grpo.accepted_weight` > 0 the same NLL on every rationale accepted so far (selection-SFT's
   rows, `illume.feedback.verdicts`), an anchor as RPO adds to DPO; the loop's evaluate step keeps the best
   val epoch, as for every policy.

Reward hacking made visible: the round's training.json has the samples' mean reward, the fraction the
simulated critic accepts (when the references exist), and the KL to the reference per step and per epoch;
results.json gets `grpo_reward`, `grpo_accept` and `grpo_kl` (the kept epoch's mean KL); a round whose
reward rose while acceptance fell from the previous round prints a warning.

Distributed runs: every process samples and scores all questions alike (same seeds), then trains its shard.
Under ZeRO-3 the sampling and the reference read gathered weights (illume.models.sharding) and the reward
model is whole on every rank after its fit (reward.train).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from illume import distributed
from illume.collate import RowEncoder
from illume.config import ConfigError, GRPOPolicyConfig, RunConfig
from illume.critics import SimulatedCritic, candidate_scores
from illume.data.records import CandidateSet
from illume.models.sharding import whole
from illume.models.vlm import VLM
from illume.models.weights import save_safetensors
from illume.prompts import ANSWER_PROMPT, example_seed
from illume.sampling import sample
from illume.tracking import trainer_report
from illume.training import adapter_trainer, trained
from policies.base import PolicyResult, RoundContext
from policies.data import PolicyDataError
from policies.losses import group_advantages, grpo_loss, grpo_per_token_kl, per_token_logps
from policies.trainer import PolicyTrainer

REFERENCE_FILE = "reference_per_token_logps.safetensors"
SAMPLES_FILE = "training_set.jsonl"
SEED_ROUND_OFFSET = 10_000
"""GRPO's samples of round r use the sampler seeds of "round" r + this offset: distinct per round, and
distinct from the round's candidates (which the critic judged)."""

RewardSource = Callable[[RoundContext, Sequence[CandidateSet]], list[list[float]]]


def reward_model_source(context: RoundContext, sets: Sequence[CandidateSet]) -> list[list[float]]:
    """The reward model's scores, fitted (or reused) on people's judgments of rounds <= this one."""
    from reward.fitted import reward_model_on
    from reward.model import score

    rm, _ = reward_model_on(context.cfg, context.round_idx, context.store, context.train_by_id, context.say)
    items = [(context.train_by_id[cs.example_id], cs.prompt, [c.text for c in cs.candidates]) for cs in sets]
    return score(rm, items)


def simulated_source(context: RoundContext, sets: Sequence[CandidateSet]) -> list[list[float]]:
    """The simulated critic's metric (critic.metric, ROUGE-L by default) against the reference explanations."""
    missing = [cs.example_id for cs in sets if not context.train_by_id[cs.example_id].explanations]
    if missing:
        raise PolicyDataError(f"policy.grpo.reward_sources.simulated needs reference explanations; {len(missing)} "
                              f"train examples have none, e.g. {missing[:3]}")
    return candidate_scores(sets, context.train_by_id, context.cfg.critic.metric)


REWARDS: dict[str, RewardSource] = {
    "reward_model": reward_model_source,
    "simulated": simulated_source,
}
"""policy.grpo.reward_sources keys -> (context, candidate sets) -> a reward per candidate."""

def _trl_grpo_round(context: RoundContext, **kwargs) -> PolicyResult:
    from policies.grpo_trl import trl_grpo_round  # TRL's trainers load only for the runs that use them

    return trl_grpo_round(context, **kwargs)


GRPO_TRAINERS: dict[str, Callable[..., PolicyResult]] = {"trl": _trl_grpo_round}
"""policy.grpo.trainer -> a GRPO trainer other than ours, called as `trainer(context, sources=REWARDS,
round_warning=previous_round_warning)`: trl, TRL's GRPOTrainer (policies/grpo_trl.py); illume: ours (the rest
of `grpo_round`)."""
TRL_BACKENDS = ("hf",)
"""The model kinds TRL's GRPOTrainer takes (a transformers model with a processor)."""


def grpo_trainer(cfg: RunConfig) -> str:
    """policy.grpo.trainer with `auto` resolved: TRL's for the backends it takes, ours for the others."""
    choice = cfg.policy.grpo.trainer
    if choice == "auto":
        return "trl" if cfg.model.kind in TRL_BACKENDS else "illume"
    return choice


def check_config(cfg: RunConfig) -> None:
    """What a GRPO run needs from its config, checked before any model loads.

    Raises:
        ConfigError: an unknown reward source, or no source with a non-zero weight.
    """
    if cfg.policy.kind != "grpo":
        return
    sources = cfg.policy.grpo.reward_sources
    unknown = sorted(set(sources) - set(REWARDS))
    if unknown:
        raise ConfigError(f"policy.grpo.reward_sources: unknown source(s) {unknown}; known: {sorted(REWARDS)}")
    trainer = grpo_trainer(cfg)
    if trainer == "trl" and cfg.model.kind not in TRL_BACKENDS:
        raise ConfigError(f"policy.grpo.trainer=trl: TRL's GRPOTrainer takes model.kind {' or '.join(TRL_BACKENDS)}, "
                          f"not model.kind={cfg.model.kind}; set policy.grpo.trainer=illume (or auto)")
    if cfg.policy.grpo.accepted_weight and trainer == "trl":
        raise ConfigError(f"policy.grpo.accepted_weight={cfg.policy.grpo.accepted_weight:g}: GRPO's accepted-rationale "
                          "rows are not in TRL's GRPO trainer (policies/grpo_trl.py) yet; set "
                          "policy.grpo.accepted_weight=0, or policy.grpo.trainer=illume")
    if not any(sources.values()):
        raise ConfigError(f"policy.kind=grpo needs a reward: policy.grpo.reward_sources has no source with a non-zero "
                          f"weight ({dict(sources)})")


def rewards_of(context: RoundContext, sets: Sequence[CandidateSet]) -> list[list[float]]:
    """sum of weight x source over `policy.grpo.reward_sources`, per candidate."""
    total = [[0.0] * len(cs.candidates) for cs in sets]
    for name, weight in context.cfg.policy.grpo.reward_sources.items():
        if not weight:
            continue
        for row, scores in zip(total, REWARDS[name](context, sets), strict=True):
            for j, value in enumerate(scores):
                row[j] += weight * value
    return total


class SamplesDataset(torch.utils.data.Dataset):
    """Encoded sample rows (with their advantage; reference log-probs filled in before training) and
    answer-only rows."""

    def __init__(self, items: list[dict]):
        self.items = items

    def sample_items(self) -> list[dict]:
        return [item for item in self.items if item["is_sample"]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


ROW_KEYS = ("is_sample", "advantage", "reward", "ref_logps", "nll_weight")


def collate_samples(items: list[dict], vlm: VLM) -> dict:
    batch = vlm.collate([{k: v for k, v in item.items() if k not in ROW_KEYS} for item in items])
    samples = [item for item in items if item["is_sample"]]
    batch["is_sample"] = torch.tensor([item["is_sample"] for item in items])
    batch["nll_weights"] = torch.tensor([item["nll_weight"] for item in items if not item["is_sample"]],
                                        dtype=torch.float32)
    batch["advantages"] = torch.tensor([item["advantage"] for item in samples], dtype=torch.float32)
    batch["rewards"] = torch.tensor([item["reward"] for item in samples], dtype=torch.float32)
    width = max((len(item["ref_logps"]) for item in samples), default=0)
    batch["ref_logps"] = torch.tensor([item["ref_logps"] + [0.0] * (width - len(item["ref_logps"]))
                                       for item in samples], dtype=torch.float32).reshape(len(samples), width)
    return batch


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of weight x the row's token NLL sum, over all rows' tokens; the unweighted token mean):
    with one weight w for every row, w x the token-mean NLL."""
    tokens, mask = per_token_logps(logits, labels)
    total = mask.sum().clamp(min=1)
    weighted = -(tokens * mask * weights.to(tokens.device)[:, None]).sum() / total
    return weighted, -(tokens * mask).sum() / total


class GRPOLossTrainer(PolicyTrainer):
    """HF Trainer whose loss is GRPO's on the sample rows plus an NLL term on the answer-only rows."""

    def __init__(self, *args, policy: GRPOPolicyConfig, max_completion_length: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy, self.max_completion_length = policy, max_completion_length
        self.steps: list[dict] = []
        """One entry per training batch: step, epoch, kl, reward (mean of its samples), losses."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        is_sample, nll_weights = inputs.pop("is_sample"), inputs.pop("nll_weights")
        advantages, rewards, ref = inputs.pop("advantages"), inputs.pop("rewards"), inputs.pop("ref_logps")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and v is not None}
        logits = model(**model_inputs, use_cache=False).logits
        labels, p = inputs["labels"], self.policy
        loss = logits.sum().float() * 0  # in the graph even for a batch that adds no term below
        entry = {"step": self.state.global_step, "epoch": self.state.epoch}
        if is_sample.any():
            # The samples' log-probs at the temperature they were drawn at (as TRL, and as the reference).
            tokens, mask = per_token_logps(logits[is_sample] / p.temperature, labels[is_sample])
            width = ref.size(1)
            logps, sample_mask = tokens[:, :width], mask[:, :width]
            ref, advantages = ref.to(logps.device), advantages.to(logps.device)
            policy_loss = grpo_loss(logps, ref, ref, advantages, sample_mask, p.beta, p.epsilon, p.epsilon,
                                    p.loss_type, self.max_completion_length)
            loss = loss + policy_loss
            with torch.no_grad():
                kl = (grpo_per_token_kl(logps, ref) * sample_mask).sum() / sample_mask.sum().clamp(min=1)
                ratio = torch.exp(logps - ref)
                clipped = ((ratio - 1).abs() > p.epsilon) & sample_mask
            entry.update(kl=kl.item(), reward=rewards.mean().item(), policy_loss=policy_loss.item(),
                         clip_ratio=(clipped.sum() / sample_mask.sum().clamp(min=1)).item())
        if (~is_sample).any():
            # The NLL rows (answer-only rows, and the accepted rationales with policy.grpo.accepted_weight): each row's
            # tokens weighted by its row's weight, over the batch's NLL tokens.
            weighted, nll = weighted_nll(logits[~is_sample], labels[~is_sample], nll_weights)
            loss = loss + weighted
            entry["answer_nll"] = nll.item()
        if model.training:
            self.steps.append(entry)
            for key in ("kl", "reward", "policy_loss", "clip_ratio", "answer_nll"):
                if key in entry:
                    self._metrics[f"grpo/{key}"].append(entry[key])
        return (loss, None) if return_outputs else loss


@torch.no_grad()
def reference_per_token_logps(trainer, vlm: VLM, rows: list[dict], temperature: float = 1.0) -> list[list[float]]:
    """Completion-token log-probs of `rows` under the model as it is now, at `temperature`, in eval mode, on
    the trainer's device and in its precision: the reference (and the "old" policy) of the coming
    optimisation."""
    import contextlib

    args = trainer.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    model, device = vlm.model, args.device
    was_training = model.training
    model.eval()
    model.to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    out: list[list[float]] = []
    batch_size = args.per_device_train_batch_size * 2
    with autocast, whole(model):  # ZeRO-3 after an earlier round: the gathered weights, on every rank
        for start in range(0, len(rows), batch_size):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                     for k, v in vlm.collate(rows[start:start + batch_size]).items()}
            inputs = {k: v for k, v in batch.items() if k != "labels" and v is not None}
            tokens, mask = per_token_logps(model(**inputs, use_cache=False).logits / temperature, batch["labels"])
            out += [row[m].tolist() for row, m in zip(tokens.float().cpu(), mask.cpu())]
    model.train(was_training)
    return out


def fill_sample_reference(trainer, dataset: SamplesDataset, vlm: VLM, out_dir: Path) -> None:
    items = dataset.sample_items()
    rows = [{k: v for k, v in item.items() if k not in ROW_KEYS} for item in items]
    temperature = trainer.policy.temperature  # the samples' log-probs at the temperature they were drawn at
    for item, logps in zip(items, reference_per_token_logps(trainer, vlm, rows, temperature), strict=True):
        item["ref_logps"] = logps
    if distributed.is_main():  # for audits, and the test that the reference is the round's starting model
        flat = torch.tensor([x for item in items for x in item["ref_logps"]], dtype=torch.float32)
        lengths = torch.tensor([len(item["ref_logps"]) for item in items], dtype=torch.long)
        save_safetensors({"per_token_logps": flat, "lengths": lengths}, out_dir / REFERENCE_FILE)


def draw_samples(context: RoundContext) -> list[CandidateSet]:
    """G rationales per train question from the current model, with this round's own GRPO seeds."""
    cfg, p = context.cfg, context.cfg.policy.grpo
    sample_cfg = replace(cfg.sample, temperatures=[p.temperature], samples_per_temperature=p.num_generations)
    seeds = {e.id: example_seed(cfg.sample.seed, SEED_ROUND_OFFSET + context.round_idx, e.id) for e in context.train}
    sets = sample(context.vlm, context.train, sample_cfg, round_idx=context.round_idx, use_reference_answer=True,
                  seeds=seeds, progress=distributed.is_main())
    return [cs for cs in sets if cs.candidates]


def acceptance(context: RoundContext, sets: Sequence[CandidateSet]) -> list[list[bool]] | None:
    """Which samples the simulated critic accepts; None when some train question has no reference."""
    if not sets or not all(context.train_by_id[cs.example_id].explanations for cs in sets):
        return None
    judgments = SimulatedCritic(context.cfg.critic).decide(sets, context.train_by_id)  # accepted by text
    return [[c.text in set(r.accepted) for c in cs.candidates] for cs, r in zip(sets, judgments, strict=True)]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def previous_round_warning(out_dir: Path, round_idx: int, reward: float, accept: float | None) -> str | None:
    """A warning when the mean reward rose while the accepted fraction fell since the previous round."""
    previous = out_dir.parent / f"round_{round_idx - 1:02d}" / "metrics.json"
    if round_idx == 0 or accept is None or not previous.is_file():
        return None
    metrics = json.loads(previous.read_text())
    before_reward, before_accept = metrics.get("grpo_reward"), metrics.get("grpo_accept")
    if before_reward is None or before_accept is None:
        return None
    if reward > before_reward and accept < before_accept:
        return (f"warning: round {round_idx}: the GRPO reward rose ({before_reward:.3f} -> {reward:.3f}) while "
                f"the simulated critic's acceptance fell ({before_accept:.1%} -> {accept:.1%}): the policy may be "
                "gaming the reward")
    return None


def grpo_round(context: RoundContext) -> PolicyResult:
    """policy.kind=grpo as a loop policy (see the module doc)."""
    cfg, p, vlm, out_dir = context.cfg, context.cfg.policy.grpo, context.vlm, context.out_dir
    check_config(cfg)
    trainer = GRPO_TRAINERS.get(grpo_trainer(cfg))
    if trainer is not None:
        return trainer(context, sources=REWARDS, round_warning=previous_round_warning)
    sources = {name: weight for name, weight in p.reward_sources.items() if weight}
    context.say(f"round {context.round_idx}: GRPO on {p.num_generations} samples per train question, reward "
                + " + ".join(f"{w:g} x {name}" for name, w in sources.items()))
    sets = draw_samples(context)
    if not sets:
        raise PolicyDataError("GRPO drew no non-empty rationale for any train question")
    rewards = rewards_of(context, sets)
    flat = torch.tensor([r for row in rewards for r in row], dtype=torch.float32)
    advantages = group_advantages(flat, [len(cs.candidates) for cs in sets], scale=p.scale_rewards,
                                  baseline=p.baseline).tolist()
    accepted = acceptance(context, sets)
    accept = (_mean([float(a) for row in accepted for a in row]) if accepted is not None else None)
    mean_reward = flat.mean().item()

    encode = RowEncoder(vlm, context.train_by_id)
    items, manifest, k = [], [], 0
    for i, cs in enumerate(sets):
        for j, candidate in enumerate(cs.candidates):
            items.append({**encode(cs.example_id, cs.prompt, candidate.text), "is_sample": True,
                          "advantage": advantages[k], "reward": rewards[i][j], "ref_logps": [], "nll_weight": 0.0})
            manifest.append({"example_id": cs.example_id, "prompt": cs.prompt, "completion": candidate.text,
                             "reward": rewards[i][j], "advantage": advantages[k],
                             "accepted": accepted[i][j] if accepted is not None else None})
            k += 1
    num_answer_rows = 0
    if p.answer_weight:
        for example in context.train:
            items.append({**encode(example.id, ANSWER_PROMPT.format(question=example.question), example.answer),
                          "is_sample": False, "advantage": 0.0, "reward": 0.0, "ref_logps": [],
                          "nll_weight": p.answer_weight})
            num_answer_rows += 1
    num_accepted_rows = 0
    if p.accepted_weight:  # selection-SFT's rationales as an NLL anchor (as RPO adds one to DPO)
        for row in context.feedback.accepted():
            items.append({**encode(row.example_id, row.item.prompt, row.text), "is_sample": False,
                          "advantage": 0.0, "reward": 0.0, "ref_logps": [], "nll_weight": p.accepted_weight})
            num_accepted_rows += 1
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / SAMPLES_FILE).open("w") as f:
            for record in manifest:
                f.write(json.dumps(record) + "\n")

    dataset = SamplesDataset(items)
    trainer = adapter_trainer(
        GRPOLossTrainer, vlm, dataset, partial(collate_samples, vlm=vlm), replace(cfg.train, num_epochs=p.iterations),
        out_dir, learning_rate=cfg.policy.learning_rate, report=trainer_report(cfg, out_dir), policy=p,
        max_completion_length=cfg.sample.max_new_tokens + 1)  # + the end token the rows carry
    fill_sample_reference(trainer, dataset, vlm, out_dir)
    trainer.train()
    steps = trainer.steps
    per_epoch = []
    for epoch in range(1, p.iterations + 1):
        in_epoch = [s for s in steps if epoch - 1 <= (s["epoch"] or 0) < epoch]
        per_epoch.append({"epoch": epoch, "kl": _mean(s.get("kl") for s in in_epoch),
                          "policy_loss": _mean(s.get("policy_loss") for s in in_epoch),
                          "answer_nll": _mean(s.get("answer_nll") for s in in_epoch),
                          "reward": mean_reward, "accept": accept})
    report = {"train_rationales": len(manifest), "train_rows": len(items), "grpo_reward": mean_reward,
              "grpo_accept": accept}
    training = {"num_questions": len(sets), "num_answer_rows": num_answer_rows,
                "num_accepted_rows": num_accepted_rows, "reward_sources": sources, "per_epoch": per_epoch,
                "steps": steps}
    context.say(f"round {context.round_idx}: GRPO samples' mean reward {mean_reward:.3f}"
                + (f", simulated critic accepts {accept:.1%}" if accept is not None else ""))
    warning = previous_round_warning(out_dir, context.round_idx, mean_reward, accept)
    if warning:
        context.say(warning)
    return PolicyResult(trained(trainer), report, [{"grpo_kl": e["kl"]} for e in per_epoch], training)
