"""GRPO for `model.kind=hf` through TRL's GRPOTrainer (policies/grpo_trl.py), on tiny Qwen2-VL / LLaVA models
built from configs: TRL's prompt ids are our `encode_row`'s, the reward function scores each sample with its own
question's image, adapters train against the round's starting weights, and the loop runs it end to end with
the simulated critic's metric as the reward and with an AI judge (no people) feeding the reward model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from illume.config import load_config
from illume.data.datasets import load_split
from illume.data.records import load_image
from illume.demo.tiny_models import build_tiny_hf_vlm
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import read_feedback
from illume.prompts import ChatStyle, rationale_prompt
from policies.base import RoundContext
from policies.data import PolicyDataError
from tests.conftest import REPO, TINY_DATA


def _cfg(tmp_path, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", TINY_DATA + [
        "model.kind=hf", f"model.path={tmp_path / 'unused'}", "policy.kind=grpo",
        "policy.grpo.reward_sources.reward_model=0", "policy.grpo.reward_sources.probe=1.0", "policy.grpo.num_generations=4",
        "policy.grpo.iterations=1", "policy.learning_rate=1e-2", "sample.max_new_tokens=5", "sample.batch_size=4",
        "train.batch_size=8", f"output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def questions():
    """Three train questions on three different images, and one val question."""
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_DATA)
    train, seen = [], []
    for example in load_split(cfg.data, "train"):
        image = np.asarray(load_image(example))
        if all(image.shape != other.shape or not np.array_equal(image, other) for other in seen):
            train.append(example)
            seen.append(image)
        if len(train) == 3:
            break
    return train, load_split(cfg.data, "val")[:1]


def _length_source(calls=None):
    """A reward source: the rationale's length (every group gets non-zero advantages); it records, per
    candidate set, the example id, the image the set's example carries and how many candidates it has."""
    def source(context, sets):
        if calls is not None:
            calls.extend((cs.example_id, context.train_by_id[cs.example_id].image, len(cs.candidates))
                         for cs in sets)
        return [[float(len(c.text)) for c in cs.candidates] for cs in sets]
    return source


def _round(cfg, vlm, questions, tmp_path, sources):
    """The loop's tune and evaluate steps of a GRPO (TRL) round: the policy's result and the kept epoch."""
    from policies.base import keep_best
    from policies.grpo_trl import trl_grpo_round

    train, val = questions
    store = FeedbackStore(tmp_path / "feedback.db")
    out_dir = tmp_path / "round_00"
    context = RoundContext(cfg, vlm, store, 0, train, {e.id: e for e in train}, val, out_dir,
                           feedback=read_feedback(store, upto_round=0), say=lambda _: None)
    result = trl_grpo_round(context, sources=sources)
    return result, keep_best(result, vlm, val, cfg, out_dir)


def _spy(monkeypatch, cls, name):
    """Record every (args, kwargs, result) of `cls.name` while calling through."""
    calls = []
    original = getattr(cls, name)

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append((self, args, kwargs, result))
        return result

    monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("family, chat", [("qwen2_vl", False), ("llava", False), ("qwen2_vl", True),
                                          ("llava", True)])
def test_trls_prompt_ids_and_image_inputs_are_encode_rows(family, chat, questions, tmp_path, monkeypatch):
    """What TRL generated from and trained on: each row's unpadded prompt ids are `encode_row(image, prompt)`'s
    prompt part (chat format: the user's turn and the generation prompt, rendered by the model's own template;
    the model writes the connective), its per-token fields (Qwen2-VL's mm_token_type_ids) line up with them
    under TRL's left padding, and the image tensors are the rows' own, in order."""
    import trl

    calls = _spy(monkeypatch, trl.GRPOTrainer, "_generate_and_score_completions")
    vlm = build_tiny_hf_vlm(family)
    vlm = dataclasses.replace(vlm, chat=ChatStyle() if chat else None)
    cfg = _cfg(tmp_path, "policy.grpo.num_generations=2", "policy.grpo.answer_weight=0", "train.batch_size=6")
    _round(cfg, vlm, questions, tmp_path, {"probe": _length_source()})
    by_id = {e.id: e for e in questions[0]}
    assert calls
    for _, (inputs,), _, out in calls:
        examples = [by_id[x["example_id"]] for x in inputs]
        prompts = [rationale_prompt(e.question, e.answer) for e in examples]
        if chat:  # the user's turn alone (not an ILLUME prompt: `ChatStyle.turns` keeps it as it is)
            prompts = [vlm.chat.turns(p).user for p in prompts]
        rows = [vlm.encode_row(load_image(e), p) for e, p in zip(examples, prompts)]
        mask = out["prompt_mask"].bool()
        assert mask.shape[0] == len(rows) and len({len(r["input_ids"]) for r in rows}) > 1  # padding matters
        for i, row in enumerate(rows):
            assert out["prompt_ids"][i][mask[i]].tolist() == row["input_ids"]
            assert not mask[i][:mask.shape[1] - len(row["input_ids"])].any()  # padded on the left
            if "mm_token_type_ids" in row:
                width = out["prompt_ids"].shape[1]
                assert out["mm_token_type_ids"][i, :width][mask[i]].tolist() == row["mm_token_type_ids"]
        assert torch.equal(out["pixel_values"].cpu(), vlm.collate(rows)["pixel_values"])
        if family == "qwen2_vl":
            assert torch.equal(out["image_grid_thw"].cpu(), vlm.collate(rows)["image_grid_thw"])


def test_the_reward_function_scores_each_sample_with_its_own_image(questions, tmp_path, monkeypatch):
    """Three questions on different images: in every call TRL makes, each row comes with the image of its
    example id, all G copies of a question together, and the reward sources read exactly those images."""
    from policies.grpo_trl import RewardFunction

    trl_calls = _spy(monkeypatch, RewardFunction, "__call__")
    source_calls = []
    vlm = build_tiny_hf_vlm("qwen2_vl")
    cfg = _cfg(tmp_path, "policy.grpo.iterations=2", "policy.grpo.answer_weight=0", "train.batch_size=12")
    _round(cfg, vlm, questions, tmp_path, {"probe": _length_source(source_calls)})
    by_id = {e.id: e for e in questions[0]}
    assert len(trl_calls) == 2 and len(source_calls) == 3 * 2  # one step of all 3 questions per epoch
    for _, _, kwargs, rewards in trl_calls:
        ids, images = kwargs["example_id"], kwargs["image"]
        assert len(ids) == len(images) == len(rewards) == 3 * 4
        for example_id, image in zip(ids, images):
            assert np.array_equal(np.asarray(image), np.asarray(load_image(by_id[example_id])))
        groups = [ids[i:i + 4] for i in range(0, len(ids), 4)]
        assert all(len(set(group)) == 1 for group in groups) and {g[0] for g in groups} == set(by_id)
    passed = {}
    for _, _, kwargs, _ in trl_calls:
        for example_id, image in zip(kwargs["example_id"], kwargs["image"]):
            passed.setdefault(example_id, []).append(image)
    for example_id, image, num_candidates in source_calls:
        assert num_candidates == 4
        assert image is not by_id[example_id].image and any(image is p for p in passed[example_id])


def test_the_reward_function_refuses_an_image_of_another_question(questions, tmp_path):
    from policies.grpo_trl import RewardFunction

    train, val = questions
    cfg = _cfg(tmp_path)
    context = RoundContext(cfg, None, None, 0, train, {e.id: e for e in train}, val, tmp_path, feedback=None)
    reward = RewardFunction(context, {"probe": _length_source()}, {"probe": 1.0})
    completions = [[{"role": "assistant", "content": " the circle is red"}]] * 2
    ids = [train[0].id, train[1].id]
    right = reward([None] * 2, completions, example_id=ids, image=[load_image(e) for e in train[:2]])
    assert right == [float(len("the circle is red"))] * 2
    assert [s["example_id"] for s in reward.samples] == ids and all(isinstance(s["accepted"], bool) for s in reward.samples)
    with pytest.raises(PolicyDataError, match="not that example's"):
        reward([None] * 2, completions, example_id=ids, image=[load_image(e) for e in reversed(train[:2])])


@pytest.mark.parametrize("train_prefix", [False, True])
def test_a_round_trains_adapters_only_against_the_rounds_starting_weights(train_prefix, questions, tmp_path,
                                                                          monkeypatch):
    """The adapters start away from zero (as after an earlier round), so the adapter-disabled base model differs
    from the round's starting weights: the KL of the first step, before any update, is 0 only if the reference
    is the starting weights. Adapters (and the projector with train.train_prefix) move, nothing else does, and
    what TRL added to the model is gone afterwards."""
    from policies.grpo_trl import IllumeGRPOTrainer

    trainers = _spy(monkeypatch, IllumeGRPOTrainer, "train")
    vlm = build_tiny_hf_vlm("qwen2_vl")
    with torch.no_grad():
        for name, parameter in vlm.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    start = {n: t.clone() for n, t in vlm.model.state_dict().items()}
    cfg = _cfg(tmp_path, "policy.grpo.iterations=2", f"train.train_prefix={train_prefix}")
    result, kept = _round(cfg, vlm, questions, tmp_path, {"probe": _length_source()})

    now = dict(vlm.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], now[n])}
    assert changed and set(now) == set(before)  # the reference adapter is gone again
    assert all("lora_" in n and ".default." in n or train_prefix and "visual.merger" in n for n in changed)
    assert any("visual.merger" in n for n in changed) == train_prefix
    assert list(vlm.model.peft_config) == ["default"] and "forward" not in vars(vlm.model.get_base_model())

    training = json.loads((tmp_path / "round_00" / "training.json").read_text())
    first = training["steps"][0]
    assert first["step"] == 0 and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert any(s["kl"] > 1e-6 for s in training["steps"][1:])  # the policy moved away from the reference
    assert all(s["answer_nll"] > 0 for s in training["steps"])
    assert training["reference"] == ("model copy" if train_prefix else "adapter copy")
    if train_prefix:  # TRL's reference model is the whole model as the round found it
        (trainer, *_), = trainers
        reference = trainer.ref_model.state_dict()
        assert all(torch.equal(reference[n], start[n]) for n in start if "lora_" in n or "visual.merger" in n)

    assert set(result.report) >= {"grpo_reward", "grpo_accept"} and len(result.per_epoch) == 2
    assert training["grpo_kl"] == training["per_epoch"][kept.best["epoch"] - 1]["kl"] >= 0  # the kept epoch's
    samples = [json.loads(line) for line in (tmp_path / "round_00" / "training_set.jsonl").read_text().splitlines()]
    assert len(samples) == training["train_rationales"] == 2 * 2 * 4  # 2 epochs x 1 step of 2 questions x G
    assert all(s["reward"] == len(s["completion"]) and s["accepted"] in (True, False) for s in samples)
    assert result.report["grpo_reward"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples))
    assert [e["epoch"] for e in training["per_epoch"]] == [1, 2] and kept.best["epoch"] in (1, 2)


LOOP = ["model.kind=hf", "critic.threshold=0.1", "loop.stop_when_nothing_new=false", "policy.kind=grpo",
        "policy.grpo.num_generations=4", "policy.grpo.iterations=1", "policy.learning_rate=1e-2", "sample.max_new_tokens=5",
        "sample.samples_per_temperature=1", "train.batch_size=8", "train.num_epochs=1"]


def _loop(tmp_path, name, *overrides):
    from illume.cli import main

    build_tiny_hf_vlm("qwen2_vl").save(tmp_path / "base")
    args = [str(REPO / "configs" / "demo.yaml"), *TINY_DATA, *LOOP, f"model.path={tmp_path / 'base'}",
            f"output_dir={tmp_path / 'runs'}", f"name={name}", *overrides]
    assert main(["run", *args]) == 0
    run = tmp_path / "runs" / name
    return run, json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_the_loop_runs_trl_grpo_on_a_tiny_qwen2_vl(tmp_path):
    """`illume run` with model.kind=hf, policy.kind=grpo and the simulated critic's metric as the reward: two
    rounds trained by TRL's GRPOTrainer, each with reward, acceptance and KL in results.json."""
    from safetensors.torch import load_file

    run, results = _loop(tmp_path, "trl", "loop.num_rounds=2", "policy.grpo.reward_sources.reward_model=0",
                         "policy.grpo.reward_sources.simulated=1.0")
    rows = [r for r in results[1:] if r["trained"]]
    assert [r["round"] for r in rows] == [0, 1], results
    for row in rows:
        assert 0 <= row["grpo_reward"] <= 1 and 0 <= row["grpo_accept"] <= 1 and row["grpo_kl"] >= 0
        assert row["train_rationales"] > 0 and "cider" in row["val"]
        training = json.loads((run / f"round_{row['round']:02d}" / "training.json").read_text())
        assert training["trainer"] == "trl.GRPOTrainer" and training["reward_sources"] == {"simulated": 1.0}
    first, second = (load_file(str(run / f"round_{r:02d}" / "adapters.safetensors")) for r in (0, 1))
    assert any(not torch.equal(first[n], second[n]) for n in first)  # round 1 trained on from round 0


@pytest.mark.slow
def test_our_grpo_trainer_runs_the_same_rounds_on_a_tiny_qwen2_vl(tmp_path):
    """policy.grpo.trainer=illume on model.kind=hf: our sampler and loss train the same HF model (the comparison
    with TRL's GRPOTrainer: scripts/compare.py's hf-grpo and hf-grpo-trl), with the same report keys."""
    run, results = _loop(tmp_path, "ours", "loop.num_rounds=2", "policy.grpo.trainer=illume",
                         "policy.grpo.reward_sources.reward_model=0", "policy.grpo.reward_sources.simulated=1.0")
    rows = [r for r in results[1:] if r["trained"]]
    assert [r["round"] for r in rows] == [0, 1], results
    for row in rows:
        assert 0 <= row["grpo_reward"] <= 1 and 0 <= row["grpo_accept"] <= 1 and row["grpo_kl"] >= 0
        training = json.loads((run / f"round_{row['round']:02d}" / "training.json").read_text())
        assert training.get("trainer") != "trl.GRPOTrainer"


def test_the_grpo_trainer_is_chosen_at_one_place():
    from illume.config import ConfigError
    from policies.grpo import check_config, grpo_trainer

    def cfg(*overrides):
        return load_config(REPO / "configs" / "demo_grpo.yaml", ["model.kind=hf", *overrides])

    for kind, choice, chosen in [("hf", "auto", "trl"), ("magma", "auto", "illume"), ("hf", "illume", "illume"),
                                 ("hf", "trl", "trl")]:
        assert grpo_trainer(cfg(f"model.kind={kind}", f"policy.grpo.trainer={choice}")) == chosen
    with pytest.raises(ConfigError, match="policy.grpo.trainer=trl: TRL's GRPOTrainer takes model.kind hf"):
        check_config(cfg("model.kind=magma", "policy.grpo.trainer=trl"))
    with pytest.raises(ConfigError, match="or policy.grpo.trainer=illume"):
        check_config(cfg("policy.grpo.accepted_weight=1.0"))
    check_config(cfg("policy.grpo.accepted_weight=1.0", "policy.grpo.trainer=illume"))


@pytest.mark.slow
def test_the_loop_runs_trl_grpo_with_an_ai_judge_and_no_people(tmp_path):
    """critic.kind=judge with the tiny Qwen2-VL as judge (the run's own base model, context-aware likelihood as
    demo_rlaif.yaml) and as policy, no people: the reward model learns from the judge's verdicts and is GRPO's
    reward."""
    from illume.feedback.verdicts import PEOPLE

    # The random model's mean log-prob per token is about -log(vocabulary) = -5.07 (its round-0 candidates
    # score -5.09 .. -4.88): -5.03 accepts some and rejects others, as a reward model needs.
    run, results = _loop(tmp_path, "rlaif", "loop.num_rounds=1", "prompt.format=plain", "critic.kind=judge",
                         "judge.method=likelihood",
                         "judge.context=references", "judge.threshold=-5.03", "reward.learn_from=[judge]",
                         "reward.num_epochs=1", "reward.batch_size=8")
    (row,) = results[1:]
    assert row["trained"] and row["human_judgments"] == 0 and row["judgments"] > 0
    assert row["judge_threshold"] == -5.03 and row["judge_threshold_from"] == "config"
    assert 0 < row["judge_accepted_candidates"] < row["judge_judged_items"] * 2  # 2 candidates per question
    assert row["grpo_reward"] is not None and row["grpo_accept"] is not None and row["grpo_kl"] >= 0
    training = json.loads((run / "round_00" / "training.json").read_text())
    assert training["trainer"] == "trl.GRPOTrainer" and training["reward_sources"] == {"reward_model": 1.0}
    assert (run / "reward" / "round_01" / "reward_critic.json").is_file()  # fitted on round 0's judge verdicts
    with FeedbackStore(run / "feedback.db") as store:
        assert store.annotator_kinds() == {"judge:likelihood": "judge"}
        assert store.num_judgments(kinds=PEOPLE) == 0
