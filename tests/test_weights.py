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
    assert f"{path} is not the file that was written there" in str(error.value)  # its recorded sha256 differs
    assert f"delete {tmp_path / 'rm'}" in str(error.value)
    (path.parent / (path.name + ".sha256")).unlink()  # as written by an older illume: read unverified
    with pytest.raises(ValueError) as error:
        RewardModel.load(tmp_path / "rm", tiny_vlm)
    assert f"{path} is not a readable safetensors file" in str(error.value)


@pytest.mark.slow
def test_damaged_cached_demo_model_names_the_file(tmp_path):
    cfg = load_config(DEMO, tiny_overrides(tmp_path, own_cache=True) + ["pretrain.num_steps=2"])
    loading.load_vlm(cfg)  # pre-trains and caches it
    directory = next((tmp_path / "cache").glob("demo-base-*"))
    path = _damage(directory / "model.safetensors")
    with pytest.raises(ValueError) as error:
        loading.load_vlm(cfg)
    assert f"{path} is not the file that was written there" in str(error.value)  # its recorded sha256 differs
    assert f"delete {directory}" in str(error.value)
    (path.parent / (path.name + ".sha256")).unlink()
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
    capsys.readouterr()  # the shared tiny base model's pre-training bars, when this test is the first to need it
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


# ------------------------------------------------------------------ verified, not only readable


def _flip_last_bytes(path, count=16):
    """Damage the tensor data (the end of the file) and leave the header intact: safetensors reads it."""
    data = bytearray(path.read_bytes())
    data[-count:] = bytes(b ^ 0xFF for b in data[-count:])
    path.write_bytes(bytes(data))


def test_every_weights_file_gets_its_sha256_beside_it(tiny_vlm, tmp_path):
    import hashlib

    from illume.models.weights import save_trainable_weights

    path = tmp_path / "round_00" / "adapters.safetensors"
    save_trainable_weights(tiny_vlm.model, path)
    RewardModel(tiny_vlm).save(tmp_path / "rm")
    tiny_vlm.save(tmp_path / "model")
    for weights in (path, tmp_path / "rm" / "head.safetensors", tmp_path / "rm" / "backbone.safetensors",
                    tmp_path / "model" / "model.safetensors"):
        recorded = (weights.parent / (weights.name + ".sha256")).read_text()
        assert recorded == f"{hashlib.sha256(weights.read_bytes()).hexdigest()}  {weights.name}\n"  # sha256sum's
    assert not list(tmp_path.rglob(".*.tmp-*"))  # written whole, under a temporary name, then renamed


def test_damaged_bytes_behind_an_intact_header_are_one_weights_error(tiny_vlm, tmp_path):
    from illume.models.weights import WeightsFileError, save_trainable_weights

    path = tmp_path / "round_00" / "adapters.safetensors"
    save_trainable_weights(tiny_vlm.model, path)
    _flip_last_bytes(path)
    with pytest.raises(WeightsFileError) as error:
        load_trainable_weights(tiny_vlm.model, path, "delete round_00 and run again")
    message = str(error.value)
    assert message.startswith(f"{path} is not the file that was written there (its sha256 differs")
    assert message.endswith("delete round_00 and run again") and "\n" not in message


def test_a_saved_model_with_damaged_bytes_is_refused(tiny_vlm, tmp_path):
    from illume.models.vlm import MagmaVLM
    from illume.models.weights import WeightsFileError

    tiny_vlm.save(tmp_path / "model")
    _flip_last_bytes(tmp_path / "model" / "model.safetensors")
    with pytest.raises(WeightsFileError, match="sha256 differs"):
        MagmaVLM.load(tmp_path / "model")


def test_nan_weights_are_refused_also_without_a_recorded_digest(tiny_vlm, tmp_path):
    """A file written elsewhere (no .sha256 beside it) is read unverified, but NaN weights never load."""
    import torch
    from safetensors.torch import save_file

    from illume.models.weights import WeightsFileError, trainable_state_dict

    state = trainable_state_dict(tiny_vlm.model)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    path = tmp_path / "adapters.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsFileError, match=f"{name} holds {state[name].numel()} NaN or infinite value"):
        load_trainable_weights(tiny_vlm.model, path)


def test_nan_weights_in_a_saved_model_are_refused(tiny_vlm, tmp_path):
    import torch

    from illume.models.vlm import MagmaVLM
    from illume.models.weights import WeightsFileError, record_digests

    with torch.no_grad():
        next(tiny_vlm.model.parameters()).fill_(float("inf"))
    tiny_vlm.save(tmp_path / "model")
    record_digests(tmp_path / "model")  # intact file, faithful digest: the values themselves are refused
    with pytest.raises(WeightsFileError, match="NaN or infinite"):
        MagmaVLM.load(tmp_path / "model")


def test_resuming_over_damaged_round_bytes_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The case of issue 24: header intact, tensor bytes damaged. Before, the round loaded NaN weights and the
    next round stored 0 candidates per item and stopped as "accepted no new rationale"."""
    import torch

    from illume.models.weights import save_safetensors

    overrides = tiny_overrides(tmp_path) + ["loop.num_rounds=2", "sample.samples_per_temperature=2"]
    run_dir = tmp_path / "runs" / "demo"
    save_config(load_config(DEMO, overrides), run_dir / "config.yaml")
    (run_dir / "base_metrics.json").write_text(json.dumps({"cider": 0.0}))
    path = run_dir / "round_00" / "adapters.safetensors"
    save_safetensors({"x": torch.ones(64)}, path)
    _flip_last_bytes(path)
    (run_dir / "round_00" / "metrics.json").write_text(json.dumps({"round": 0, "trained": True,
                                                                   "val": {"cider": 0.0}}))

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the finished rounds' adapters were checked")

    monkeypatch.setattr("illume.loop.load_vlm", fail)
    assert main(["run", DEMO, *overrides]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"weights error: {path} is not the file that was written there")
    assert f"delete {run_dir / 'round_00'}" in last
