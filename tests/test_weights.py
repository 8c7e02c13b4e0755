"""A damaged safetensors file of ours fails with one line that names the file and says what to do, not with
safetensors' bare `header too large`."""

import json

import pytest

from illume import loading
from illume.cli import main
from illume.config import load_config, save_config
from illume.models.weights import load_trainable_weights
from reward.model import RewardModel
from tests.conftest import REPO, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
# Eight 0xff bytes read as a header length far beyond the file: safetensors' "header too large".
GARBAGE = b"\xff" * 64


def _damage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(GARBAGE)
    return path


def test_damaged_adapters_name_the_file(tiny_vlm, tmp_path):
    path = _damage(tmp_path / "round_01" / "adapters.safetensors")
    with pytest.raises(ValueError) as error:
        load_trainable_weights(tiny_vlm.model, path)
    assert f"{path} is not a readable safetensors file (header too large)" in str(error.value)
    assert "\n" not in str(error.value)


def test_damaged_reward_head_names_the_file_and_says_what_to_do(tiny_vlm, tmp_path):
    RewardModel(tiny_vlm).save(tmp_path / "rm")
    path = _damage(tmp_path / "rm" / "head.safetensors")
    with pytest.raises(ValueError) as error:
        RewardModel.load(tmp_path / "rm", tiny_vlm)
    assert f"{path} is not a readable safetensors file" in str(error.value)
    assert f"delete {tmp_path / 'rm'}" in str(error.value)


def test_damaged_cached_demo_model_names_the_file(tmp_path):
    cfg = load_config(DEMO, tiny_overrides(tmp_path) + ["pretrain.num_steps=2"])
    loading.load_vlm(cfg)  # pre-trains and caches it
    directory = next((tmp_path / "cache").glob("demo-base-*"))
    path = _damage(directory / "model.safetensors")
    with pytest.raises(ValueError) as error:
        loading.load_vlm(cfg)
    assert f"{path} is not a readable safetensors file" in str(error.value)
    assert f"delete {directory}" in str(error.value)


def test_dpo_from_a_damaged_round_is_one_error_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "runs" / "demo"
    save_config(load_config(DEMO, tiny_overrides(tmp_path)), run_dir / "config.yaml")
    path = _damage(run_dir / "round_00" / "adapters.safetensors")

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the round's adapters were checked")

    monkeypatch.setattr(loading, "load_vlm", fail)
    assert main(["dpo", str(run_dir), "--init-round", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"weights error: {path} is not a readable safetensors file")
    assert err.count("\n") == 1  # one line
    assert f"delete {run_dir / 'round_00'}" in err


def test_resuming_over_a_damaged_round_is_one_error_line(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path) + ["loop.num_rounds=2", "sample.samples_per_temperature=2"]
    run_dir = tmp_path / "runs" / "demo"
    # A run whose files say round 0 finished and trained, but whose adapters were damaged since.
    save_config(load_config(DEMO, overrides), run_dir / "config.yaml")
    (run_dir / "base_metrics.json").write_text(json.dumps({"cider": 0.0}))
    _damage(run_dir / "round_00" / "adapters.safetensors")
    (run_dir / "round_00" / "metrics.json").write_text(json.dumps({"round": 0, "trained": True,
                                                                   "val": {"cider": 0.0}}))
    assert main(["run", DEMO, *overrides]) == 2
    err = capsys.readouterr().err  # the pre-training's progress bars, then the error
    last = err.splitlines()[-1]
    path = run_dir / "round_00" / "adapters.safetensors"
    assert last.startswith(f"weights error: {path} is not a readable safetensors file")
    assert f"delete {run_dir / 'round_00'}" in last and "Traceback" not in err
