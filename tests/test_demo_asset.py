"""The shipped demo base model (illume/demo/assets/demo-base): made for configs/demo.yaml's settings by the
recipe in this repository, and what a fresh machine loads instead of pre-training.

When these fail after a change to the demo's settings, the model code, the pre-training recipe or its data,
re-make the asset with `python scripts/ship_demo_model.py` and commit it.
"""

import hashlib
import json

import pytest
import torch

from illume import loading
from illume.config import load_config
from illume.demo import pretrain
from illume.demo.pretrain import SHIPPED_DEMO_MODEL, demo_digest, ensure_demo_model, pretrain_demo_model
from tests.conftest import REPO, tiny_overrides

DEMO = REPO / "configs" / "demo.yaml"
ASSET = json.loads((SHIPPED_DEMO_MODEL / "asset.json").read_text())
REPORT = json.loads((SHIPPED_DEMO_MODEL / "pretrain_report.json").read_text())


def test_the_shipped_model_is_for_the_demo_settings_and_intact():
    assert ASSET["digest"] == demo_digest(load_config(DEMO))
    weights = (SHIPPED_DEMO_MODEL / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == ASSET["model_sha256"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(ASSET["threads"])  # as the asset was made: thread counts change float sums
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_recipe_reproduces_the_shipped_loss_curve(tmp_path, one_thread):
    """The first 60 of 1,200 steps (the first logged mean loss, under the full run's schedule) of pre-training
    with today's code and settings give the loss the shipped model's run recorded. On the machine that made
    the asset it is bit for bit; the tolerance allows another CPU's kernels. Measured relative moves: another
    seed 1.4e-2 (caught), 1 % of rows moved from captions to answers 5.8e-4 (not caught here: the settings
    hash above catches that one), two threads 6e-5, channels-last convolutions 1.3e-4."""
    cfg = load_config(DEMO, [f"output_dir={tmp_path / 'runs'}"])
    steps = max(1, cfg.pretrain.num_steps // 20)  # the report's logging interval
    made = pretrain_demo_model(cfg, tmp_path / "start", stop_after=steps)
    losses = json.loads((made / "pretrain_report.json").read_text())["losses"]
    assert losses[0] == pytest.approx(REPORT["losses"][0], rel=1e-3)


def test_a_new_machine_loads_the_shipped_model_without_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "empty-cache"))

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained although the shipped model fits these settings")

    monkeypatch.setattr(pretrain, "pretrain_demo_model", fail)
    cfg = load_config(DEMO)
    assert ensure_demo_model(cfg) == SHIPPED_DEMO_MODEL
    vlm = loading.load_vlm(cfg)
    from safetensors.torch import load_file

    shipped = load_file(SHIPPED_DEMO_MODEL / "model.safetensors")
    state = vlm.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in shipped.items())
    # Other settings are not what it was made for: they pre-train.
    with pytest.raises(AssertionError, match="pre-trained although"):
        loading.load_vlm(load_config(DEMO, ["pretrain.num_steps=3"]))


def test_a_cached_model_comes_before_the_shipped_one(tmp_path, monkeypatch):
    """`illume pretrain configs/demo.yaml --force` writes the cache, and a run then uses that model."""
    cfg = load_config(DEMO, [f"model.cache_dir={tmp_path / 'cache'}"])
    cached = pretrain.demo_model_dir(cfg)
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert ensure_demo_model(cfg) == cached


def test_tiny_settings_never_use_the_shipped_model(tmp_path):
    assert pretrain.shipped_demo_model(load_config(DEMO, tiny_overrides(tmp_path))) is None
