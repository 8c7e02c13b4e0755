"""`model.kind=hf` through the shared infrastructure, on tiny LLaVA and Qwen2-VL models built from configs:
sampling (`illume.sampling.sample`), one selection-SFT step, one reward-model step, one DPO step and a KTO step."""

from __future__ import annotations

import pytest
import torch

from illume.config import PolicyConfig, RewardConfig, SampleConfig, TrainConfig, load_config
from illume.data.datasets import load_split
from illume.demo.tiny_models import build_tiny_hf_vlm
from illume.models.hf import HFVLM
from illume.sampling import sample
from illume.training import TrainingRow, fine_tune
from policies.data import UnpairedRow
from policies.dpo import train_dpo
from policies.kto import train_kto
from reward.model import RewardModel, score
from reward.pairs import PreferencePair
from reward.train import fit_reward
from tests.conftest import REPO

SAMPLE = SampleConfig(temperatures=[0.8], samples_per_temperature=3, max_new_tokens=5, answer_max_new_tokens=3,
                      batch_size=4, seed=0)
TRAIN = TrainConfig(num_epochs=1, batch_size=4, learning_rate=5e-3)


@pytest.fixture(params=["llava", "qwen2_vl"])
def vlm(request):
    return build_tiny_hf_vlm(request.param)


@pytest.fixture(scope="module")
def examples():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.shapes.num_train_scenes=4"])
    return load_split(cfg.data, "train")[:4]


def _lora(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_" in n}


def _frozen(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_" not in n}


def _changed(before: dict, model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, t in before.items() if not torch.equal(t, now[n])}


def test_sample_dispatches_to_the_hf_sampler(vlm, examples):
    sets = sample(vlm, examples, SAMPLE, use_reference_answer=True)
    assert [cs.example_id for cs in sets] == [e.id for e in examples]
    assert all(cs.answer == e.answer for cs, e in zip(sets, examples))
    assert sum(len(cs.candidates) for cs in sets) > 0


def test_one_selection_sft_epoch_changes_lora_only(vlm, examples, tmp_path):
    rows = [TrainingRow(e.id, "rationale", f"Q: {e.question} A: {e.answer}, seeing that", e.explanations[0], 1.0)
            for e in examples]
    lora, frozen = _lora(vlm), _frozen(vlm)
    result = fine_tune(vlm, rows, examples, examples[:2], TRAIN, SAMPLE, tmp_path)
    assert result["losses"] or result["epochs"]
    assert _changed(lora, vlm.model) and not _changed(frozen, vlm.model)


def _pairs(examples) -> list[PreferencePair]:
    return [PreferencePair(e.id, f"Q: {e.question} A: {e.answer}, seeing that", e.explanations[0],
                           "the sky is blue", 0) for e in examples]


def test_one_reward_model_epoch_trains_head_and_lora_and_scores(vlm, examples, tmp_path):
    by_id = {e.id: e for e in examples}
    cfg = RewardConfig(num_epochs=1, batch_size=2, learning_rate=1e-2)
    frozen = _frozen(vlm)
    rm, metrics = fit_reward(vlm, _pairs(examples), [], by_id, cfg, tmp_path)
    assert isinstance(rm, RewardModel) and isinstance(rm.vlm, HFVLM) and metrics["losses"]
    assert not _changed(frozen, vlm.model)  # the reward model trains its own copy
    rewards = score(rm, [(e, p.prompt, [p.chosen, p.rejected]) for e, p in zip(examples, _pairs(examples))])
    assert all(len(r) == 2 and all(torch.isfinite(torch.tensor(r))) for r in rewards)
    again = RewardModel.load(tmp_path, vlm)
    item = [(examples[0], _pairs(examples)[0].prompt, ["the circle", "two dogs"])]
    assert score(again, item)[0] == pytest.approx(score(rm, item)[0], abs=1e-5)


@pytest.mark.slow
def test_one_dpo_and_one_kto_epoch_change_lora_only(vlm, examples, tmp_path):
    by_id = {e.id: e for e in examples}
    lora, frozen = _lora(vlm), _frozen(vlm)
    result = train_dpo(vlm, _pairs(examples), by_id, PolicyConfig(kind="dpo"), TRAIN, tmp_path / "dpo")
    assert result.report["train_rows"] == 4 and len(result.trained.epoch_weights) == TRAIN.num_epochs
    assert _changed(lora, vlm.model) and not _changed(frozen, vlm.model)
    rows = [UnpairedRow(p.example_id, p.prompt, text, ok) for p in _pairs(examples)
            for text, ok in ((p.chosen, True), (p.rejected, False))]
    lora = _lora(vlm)
    result = train_kto(vlm, rows, by_id, PolicyConfig(kind="kto"), TRAIN, tmp_path / "kto")
    assert result.report["train_rows"] == 8 and _changed(lora, vlm.model) and not _changed(frozen, vlm.model)


def test_selection_sft_with_gradient_checkpointing_still_trains_lora(examples, tmp_path):
    """train.gradient_checkpointing on a PEFT model whose base is frozen: LoRA must still get gradients."""
    vlm = build_tiny_hf_vlm("llava")
    rows = [TrainingRow(e.id, "rationale", f"Q: {e.question} A: {e.answer}, seeing that", e.explanations[0], 1.0)
            for e in examples]
    lora = _lora(vlm)
    cfg = TrainConfig(num_epochs=1, batch_size=4, learning_rate=5e-3, gradient_checkpointing=True)
    fine_tune(vlm, rows, examples, examples[:1], cfg, SAMPLE, tmp_path)
    assert _changed(lora, vlm.model)


@pytest.mark.slow
def test_illume_run_with_a_saved_hf_model(tmp_path):
    """The user path: `illume run ... model.kind=hf model.path=DIR` (a folder written by HFVLM.save) runs a
    round end to end: sampling, the simulated critic, selection-SFT with LoRA, val scores."""
    import json

    from illume.cli import main
    from tests.conftest import TINY_DATA

    build_tiny_hf_vlm("qwen2_vl").save(tmp_path / "base")
    overrides = TINY_DATA + ["model.kind=hf", f"model.path={tmp_path / 'base'}", f"output_dir={tmp_path}",
                             "name=hf", "loop.num_rounds=1", "critic.threshold=0.0", "train.num_epochs=1",
                             "sample.max_new_tokens=4", "sample.samples_per_temperature=1"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    results = json.loads((tmp_path / "hf" / "results.json").read_text())
    assert results[1]["trained"] and "cider" in results[1]["val"]
    assert (tmp_path / "hf" / "round_00" / "adapters.safetensors").is_file()


def test_hf_without_a_model_path_is_a_config_error(tmp_path, capsys):
    from illume.cli import main

    assert main(["run", str(REPO / "configs" / "demo.yaml"), "model.kind=hf", f"output_dir={tmp_path}"]) == 2
    assert "model.kind=hf needs model.path" in capsys.readouterr().err
