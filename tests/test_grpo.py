"""GRPO (policies/grpo.py, policies/losses.py): the loss equals TRL 1.16's on identical inputs, advantages are
normalised within each group, the config refuses a GRPO run with no reward, and the loop runs it end to end."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from illume.feedback.verdicts import read_feedback
from policies.losses import group_advantages, grpo_loss, per_token_logps, to_completion_layout

REPO = Path(__file__).resolve().parents[1]
B, T = 6, 7


def _grpo_stub(loss_type: str, beta: float, epsilon: float, max_completion_length: int, per_token: torch.Tensor):
    """Just enough of a GRPOTrainer for its unbound `_compute_loss`: the model's per-token log-probs are
    `per_token` (its `_get_per_token_logps_and_entropies` is stubbed), no entropy mask, token-level importance
    sampling, no vLLM, one accumulation step."""
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
    return SimpleNamespace(
        model=torch.nn.Linear(1, 1).train(), accelerator=accelerator, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        loss_type=loss_type, beta=beta, epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False,
        vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (per_token, torch.zeros_like(per_token), None))


def _inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logps = -torch.rand(B, T, generator=generator) * 3
    old = logps + 0.4 * torch.randn(B, T, generator=generator)  # ratios far enough from 1 to be clipped
    ref = logps + 0.3 * torch.randn(B, T, generator=generator)
    advantages = torch.randn(B, generator=generator)
    return logps, old, ref, advantages, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_loss_equals_trls_on_identical_per_token_log_probs(loss_type, beta):
    """TRL 1.16's own `GRPOTrainer._compute_loss` (unbound, on a stub) vs our `grpo_loss` on the same per-token
    log-probs, old log-probs, reference log-probs and advantages: clipping, k3 KL and the normalisations."""
    import trl

    logps, old, ref, advantages, mask = _inputs(seed=3)
    stub = _grpo_stub(loss_type, beta, 0.2, T + 3, logps)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    trl_loss = trl.GRPOTrainer._compute_loss(stub, stub.model, inputs)
    ours = grpo_loss(logps, old, ref if beta else None, advantages, mask, beta, 0.2, 0.2, loss_type, T + 3)
    clipped = ((torch.exp(logps - old) - 1).abs() > 0.2) & mask.bool()
    assert clipped.any()  # the clip is exercised
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    if beta:
        assert stub._metrics["train"]["kl"][0] == pytest.approx(
            ((torch.exp(ref - logps) - (ref - logps) - 1) * mask).sum().item() / mask.sum().item(), rel=1e-5)


def test_advantages_are_normalised_within_each_group():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.0, 5.0, -1.0])
    advantages = group_advantages(rewards, 3)
    groups = rewards.view(-1, 3)
    expected = (groups - groups.mean(1, keepdim=True)) / (nanstd(groups, dim=1).unsqueeze(1) + 1e-4)
    assert torch.allclose(advantages, expected.flatten())
    for group in advantages.view(-1, 3):
        assert group.mean().abs() < 1e-6  # centred within its own group, not the batch
    assert torch.equal(advantages[3:6], torch.zeros(3))  # a group of equal rewards teaches nothing
    # Unscaled: only centred (TRL's scale_rewards="none"); variable group sizes (distinct rationales).
    assert torch.allclose(group_advantages(rewards, 3, scale=False), (groups - groups.mean(1, keepdim=True)).flatten())
    ragged = group_advantages(torch.tensor([1.0, 3.0, 7.0, 2.0, 4.0, 6.0]), [2, 1, 3])
    assert torch.allclose(ragged[:2], torch.tensor([-1.0, 1.0]) / (torch.tensor([1.0, 3.0]).std() + 1e-4))
    assert ragged[2] == 0 and torch.allclose(ragged[3:], torch.tensor([-2.0, 0.0, 2.0]) / (2.0 + 1e-4))
    with pytest.raises(ValueError, match="do not add up"):
        group_advantages(rewards, [2, 2])


def test_rloo_advantages_are_each_reward_minus_the_mean_of_the_others_in_its_group():
    """As TRL 1.16's RLOOTrainer: baseline = (group sum - own reward) / (G - 1), advantage = reward - baseline,
    never scaled; a group of one sample has advantage 0."""
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 7.0, 3.0])
    advantages = group_advantages(rewards, [3, 2, 1, 1], baseline="rloo")
    expected = [1 - 4, 2 - 3.5, 6 - 1.5, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(advantages, torch.tensor(expected))
    groups = rewards[:3]  # G / (G - 1) times the group-centred reward
    assert torch.allclose(advantages[:3], 3 / 2 * (groups - groups.mean()))
    assert torch.equal(advantages, group_advantages(rewards, [3, 2, 1, 1], scale=False, baseline="rloo"))
    with pytest.raises(ValueError, match="'group' or 'rloo'"):
        group_advantages(rewards, 7, baseline="ppo")


def test_per_token_log_probs_are_the_completion_tokens_left_aligned():
    from policies.losses import sequence_logps

    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, -100, -100, -100, 2, 3],
                           [-100, 1, 2, 3, 4, 5]])
    tokens, mask = per_token_logps(logits, labels)
    assert mask.sum(-1).tolist() == [3, 2, 5]
    total, _ = sequence_logps(logits, labels)
    assert torch.allclose((tokens * mask).sum(-1), total)
    values, value_mask = to_completion_layout(torch.arange(1.0, 6.0), torch.tensor([2, 0, 3]))
    assert values.tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5]] and value_mask.sum().item() == 5


def _length_reward(context, sets):
    """A toy reward source: longer rationales score higher (so every group has non-zero advantages)."""
    return [[float(len(c.text)) for c in cs.candidates] for cs in sets]


def test_grpo_round_trains_adapters_only_against_a_fixed_reference(tiny_vlm, tmp_path, monkeypatch):
    """One GRPO round on a tiny MAGMA with a toy reward and no answer rows: the policy-gradient term alone moves
    the adapters, nothing else moves, and the stored reference log-probs are those of the model as the round
    found it (recomputed from a snapshot after training)."""
    import copy

    from safetensors.torch import load_file

    from illume.collate import RowEncoder
    from illume.config import load_config
    from illume.data.datasets import load_split
    from illume.feedback.store import FeedbackStore
    from policies.base import RoundContext, keep_best
    from policies.grpo import REFERENCE_FILE, REWARDS, grpo_round
    from tests.conftest import TINY_DATA, TINY_MODEL

    monkeypatch.setitem(REWARDS, "length", _length_reward)
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_MODEL + TINY_DATA + [
        "policy.kind=grpo", "policy.grpo.reward_sources.reward_model=0", "policy.grpo.reward_sources.length=1.0",
        "policy.grpo.num_generations=4", "policy.grpo.iterations=1", "policy.grpo.answer_weight=0",
        "policy.learning_rate=1e-2", "sample.max_new_tokens=6", "train.batch_size=8", f"output_dir={tmp_path}"])
    train = load_split(cfg.data, "train")[:4]
    val = load_split(cfg.data, "val")[:2]
    snapshot = copy.deepcopy(tiny_vlm.model)
    before = {n: t.clone() for n, t in tiny_vlm.model.state_dict().items()}
    said = []
    out_dir = tmp_path / "round_00"
    store = FeedbackStore(tmp_path / "f.db")
    result = grpo_round(RoundContext(cfg, tiny_vlm, store, 0, train, {e.id: e for e in train}, val, out_dir,
                                     feedback=read_feedback(store, upto_round=0), say=said.append))
    keep_best(result, tiny_vlm, val, cfg, out_dir)  # the loop's evaluate step

    assert set(result.report) >= {"grpo_reward", "grpo_accept"} and result.per_epoch[0]["grpo_kl"] >= 0
    after = tiny_vlm.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".adapter." in n for n in changed)  # adapters moved, frozen weights did not
    training = json.loads((out_dir / "training.json").read_text())
    assert training["steps"] and all("kl" in s and "reward" in s for s in training["steps"])
    assert training["num_answer_rows"] == 0 and training["grpo_reward"] == result.report["grpo_reward"]

    samples = [json.loads(line) for line in (out_dir / "training_set.jsonl").read_text().splitlines()]
    assert len(samples) == training["train_rationales"] > len(train)  # several samples per question
    assert all(s["reward"] == len(s["completion"]) for s in samples)
    saved = load_file(str(out_dir / REFERENCE_FILE))
    tiny_vlm.model = snapshot  # the model as the round found it
    encode = RowEncoder(tiny_vlm, {e.id: e for e in train})
    rows = [encode(s["example_id"], s["prompt"], s["completion"]) for s in samples]
    with torch.no_grad():
        batch = tiny_vlm.collate(rows)
        logits = snapshot.eval()(**{k: v for k, v in batch.items() if k != "labels" and v is not None}).logits
        tokens, mask = per_token_logps(logits / cfg.policy.grpo.temperature, batch["labels"])  # as drawn
    assert saved["lengths"].tolist() == mask.sum(-1).tolist()
    assert torch.allclose(saved["per_token_logps"], tokens[mask], atol=1e-5)


def test_the_nll_rows_are_weighted_per_row_over_the_batchs_tokens():
    from policies.grpo import weighted_nll

    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, -100, -100, -100, 2, 3],
                           [-100, 1, 2, 3, 4, 5]])
    tokens, mask = per_token_logps(logits, labels)
    row_nll = -(tokens * mask).sum(-1)  # per row, summed over its tokens
    weighted, plain = weighted_nll(logits, labels, torch.tensor([0.5, 2.0, 1.0]))
    assert torch.allclose(weighted, (0.5 * row_nll[0] + 2.0 * row_nll[1] + row_nll[2]) / 10)
    assert torch.allclose(plain, row_nll.sum() / 10)
    same, _ = weighted_nll(logits, labels, torch.full((3,), 0.7))  # one weight: w x the token mean
    assert torch.allclose(same, 0.7 * plain)


def test_sft_weight_adds_every_accepted_rationale_as_an_nll_row(tiny_vlm, tmp_path, monkeypatch):
    """policy.grpo.accepted_weight: GRPO's batch gets one NLL row per rationale accepted so far (the rules of
    illume.feedback.verdicts: the rejected and the other rounds' later ones stay out), at that weight."""
    import policies.grpo
    from illume.config import load_config
    from illume.data.datasets import load_split
    from illume.data.records import Candidate, CandidateSet
    from illume.feedback.store import FeedbackStore
    from policies.base import RoundContext
    from policies.grpo import REWARDS, grpo_round
    from tests.conftest import TINY_DATA, TINY_MODEL

    monkeypatch.setitem(REWARDS, "length", _length_reward)
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_MODEL + TINY_DATA + [
        "policy.kind=grpo", "policy.grpo.reward_sources.reward_model=0", "policy.grpo.reward_sources.length=1.0",
        "policy.grpo.num_generations=2", "policy.grpo.accepted_weight=0.5", "policy.grpo.answer_weight=2.0",
        "sample.max_new_tokens=4", f"output_dir={tmp_path}"])
    train = load_split(cfg.data, "train")[:3]
    store = FeedbackStore(tmp_path / "f.db")
    sets = [CandidateSet(e.id, e.answer, e.answer, f"Q: {e.question} A: {e.answer}, seeing that", 1,
                         [Candidate(f"good {i}", 0.8, 1, 0, -1.0), Candidate(f"bad {i}", 0.8, 1, 1, -1.0)])
            for i, e in enumerate(train)]
    store.add_candidate_sets(0, "train", sets)
    store.add_judgments(0, [(train[0].id, ["good 0"], False, None), (train[1].id, ["good 1"], False, None),
                            (train[2].id, [], True, None)], "simulated:x", kind="simulated")
    seen = {}

    class Stop(Exception):
        pass

    def no_training(trainer_cls, vlm, dataset, *args, **kwargs):
        seen["items"] = dataset.items
        raise Stop  # the rows are what this test looks at: no trainer

    monkeypatch.setattr(policies.grpo, "adapter_trainer", no_training)
    with pytest.raises(Stop):
        grpo_round(RoundContext(cfg, tiny_vlm, store, 0, train, {e.id: e for e in train}, train[:1],
                                tmp_path / "round_00", feedback=read_feedback(store, upto_round=0),
                                say=lambda _: None))
    rows = [item for item in seen["items"] if not item["is_sample"]]
    assert sorted(item["nll_weight"] for item in rows) == [0.5, 0.5, 2.0, 2.0, 2.0]  # 2 accepted, 3 answers
    assert all(item["nll_weight"] == 0.0 for item in seen["items"] if item["is_sample"])


def test_grpo_with_no_reward_source_fails_before_any_model_loads(tmp_path):
    from illume.config import ConfigError, load_config
    from policies.grpo import check_config

    with pytest.raises(ConfigError, match="needs a reward"):
        load_config(REPO / "configs" / "demo_grpo.yaml", ["policy.grpo.reward_sources.reward_model=0"])
    cfg = load_config(REPO / "configs" / "demo_grpo.yaml", ["policy.grpo.reward_sources.nope=1.0"])
    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['nope'\]"):
        check_config(cfg)
    check_config(load_config(REPO / "configs" / "demo_grpo.yaml"))  # the demo's is fine
    hf_with_anchor = load_config(REPO / "configs" / "demo_grpo.yaml",
                                 ["model.kind=hf", "model.path=/some/vlm", "policy.grpo.accepted_weight=1.0"])
    with pytest.raises(ConfigError, match="accepted-rationale rows are not in TRL.s GRPO trainer"):
        check_config(hf_with_anchor)


@pytest.mark.slow
def test_the_loop_runs_grpo_with_the_reward_model_each_round(tmp_path):
    """configs/demo_grpo.yaml on the tiny MAGMA: people (simulated) judge round 0, the reward model is fitted on
    their judgments, GRPO with it in every round; the round rows carry reward, acceptance and KL."""
    from safetensors.torch import load_file

    from illume.cli import main
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path) + [
        "loop.num_rounds=2", "policy.grpo.num_generations=4", "policy.grpo.iterations=1", "sample.max_new_tokens=6",
        "sample.samples_per_temperature=2", "critic.threshold=0.1", "reward.num_epochs=1", "reward.batch_size=8",
        "train.batch_size=16", "name=grpo"]  # as tests/test_loop.py's reward-critic run: both labels in round 0
    assert main(["run", str(REPO / "configs" / "demo_grpo.yaml"), *overrides]) == 0
    run = tmp_path / "runs" / "grpo"
    results = json.loads((run / "results.json").read_text())
    rows = [r for r in results[1:] if r["trained"]]
    assert len(rows) == 2, results
    for row in rows:
        assert row["grpo_reward"] is not None and 0 <= row["grpo_accept"] <= 1 and row["grpo_kl"] >= 0
        assert row["train_rationales"] > 0 and "cider" in row["val"]
        training = json.loads((run / f"round_{row['round']:02d}" / "training.json").read_text())
        assert training["reward_sources"] == {"reward_model": 1.0} and training["per_epoch"][0]["kl"] is not None
    # The reward model GRPO used in round 0 was fitted on round 0's judgments by people, and the reward critic
    # of round 1 reused it.
    assert (run / "reward" / "round_01" / "reward_critic.json").is_file()
    first, second = (load_file(str(run / f"round_{r:02d}" / "adapters.safetensors")) for r in (0, 1))
    assert any(not torch.equal(first[n], second[n]) for n in first)  # round 1 trained on from round 0

    # The fitted reward model records the base model it was fitted on ...
    from illume.config import load_config
    from illume.loading import model_identity

    saved = json.loads((run / "reward" / "round_01" / "reward_model.json").read_text())
    assert saved["backbone"] == model_identity(load_config(run / "config.yaml"))
    # ... so another run on the same base model can use it as reward.checkpoint, with no people at all ...
    again = overrides[:-1] + ["name=grpo_checkpoint", "loop.num_rounds=1", "reward.people_rounds=0",
                              f"reward.checkpoint={run / 'reward' / 'round_01'}"]
    assert main(["run", str(REPO / "configs" / "demo_grpo.yaml"), *again]) == 0
    row = json.loads((tmp_path / "runs" / "grpo_checkpoint" / "results.json").read_text())[1]
    assert row["trained"] and row["human_judgments"] == 0 and row["grpo_reward"] is not None
    assert not (tmp_path / "runs" / "grpo_checkpoint" / "reward").exists()  # used as it is, not fitted again


def test_a_reward_model_fitted_on_another_base_model_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import illume.loop
    from illume.cli import main
    from illume.config import ConfigError, load_config
    from illume.loading import model_identity
    from reward.fitted import check_reward_checkpoint
    from tests.conftest import tiny_overrides

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(illume.loop, "load_vlm", no_model)
    checkpoint = tmp_path / "reward_elsewhere"
    checkpoint.mkdir()
    overrides = tiny_overrides(tmp_path) + [f"reward.checkpoint={checkpoint}"]
    config = REPO / "configs" / "demo_grpo.yaml"
    assert main(["run", str(config), *overrides]) == 2
    assert "no saved reward model there (reward_model.json missing)" in capsys.readouterr().err

    other = model_identity(load_config(config, tiny_overrides(tmp_path) + ["model.lm.num_layers=3"]))
    (checkpoint / "reward_model.json").write_text(json.dumps({"backbone": other, "threshold": 0.1}))
    assert main(["run", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"was fitted on another base model ({other})" in err
    assert f"this run's model is {model_identity(load_config(config, overrides))}" in err

    (checkpoint / "reward_model.json").write_text(json.dumps({"backbone": None, "threshold": 0.1}))
    with pytest.raises(ConfigError, match="does not say which base model"):
        check_reward_checkpoint(load_config(config, overrides))
    ours = model_identity(load_config(config, overrides))
    (checkpoint / "reward_model.json").write_text(json.dumps({"backbone": ours, "threshold": None}))
    with pytest.raises(ConfigError, match="no calibrated accept threshold"):
        check_reward_checkpoint(load_config(config, overrides))
    (checkpoint / "reward_model.json").write_text(json.dumps({"backbone": ours, "threshold": 0.1}))
    check_reward_checkpoint(load_config(config, overrides))  # fitted on this base model: fine


def test_a_round_whose_reward_rose_while_acceptance_fell_says_so(tmp_path):
    from policies.grpo import previous_round_warning

    (tmp_path / "round_00").mkdir()
    (tmp_path / "round_00" / "metrics.json").write_text(json.dumps({"grpo_reward": 0.5, "grpo_accept": 0.4}))
    out_dir = tmp_path / "round_01"
    warning = previous_round_warning(out_dir, 1, reward=0.9, accept=0.3)
    assert warning and "reward rose (0.500 -> 0.900)" in warning and "acceptance fell (40.0% -> 30.0%)" in warning
    assert previous_round_warning(out_dir, 1, reward=0.9, accept=0.5) is None  # both rose: learning, not gaming
    assert previous_round_warning(out_dir, 1, reward=0.4, accept=0.3) is None
    assert previous_round_warning(out_dir, 1, reward=0.9, accept=None) is None  # no references: nothing to say
    assert previous_round_warning(tmp_path / "round_00", 0, reward=0.9, accept=0.1) is None


def test_acceptance_marks_each_sample_the_simulated_critic_accepts():
    """GRPO's `grpo_accept`: per sample, whether the simulated critic (ROUGE-L >= 0.7) accepts it; None when
    a question has no reference explanation."""
    from illume.config import CriticConfig
    from illume.data.records import Candidate, CandidateSet, Example
    from policies.grpo import acceptance

    example = Example("e1", Path("e1.png"), "What is red?", ["the circle"], ["the circle is red"])
    sets = [CandidateSet("e1", "the circle", "the circle", "Q: What is red? A: the circle, seeing that", 0,
                         [Candidate("two dogs run", 1.0, 1, 0, -1.0), Candidate("the circle is red", 1.0, 1, 1, -1.0)])]
    context = SimpleNamespace(cfg=SimpleNamespace(critic=CriticConfig(metric="rouge_l", threshold=0.7)),
                              train_by_id={"e1": example})
    assert acceptance(context, sets) == [[False, True]]
    context.train_by_id = {"e1": Example("e1", Path("e1.png"), "What is red?", ["the circle"])}
    assert acceptance(context, sets) is None
