"""Selection-SFT through DeepSpeed ZeRO-2 on the CPU: a single-process run with the gloo backend.

DeepSpeed's CPU accelerator JIT-compiles a small shared-memory comm op on first use (about a minute on two
cores); the build goes to a versioned folder under ~/.cache/illume/torch_extensions (or $TORCH_EXTENSIONS_DIR
when set), so later runs on the same machine reuse it. The fixture undoes the global state DeepSpeed and
accelerate leave behind (process group, accelerate's shared state, HF's DeepSpeed-config weakref, environment
variables, torch threads) so that plain-Trainer tests later in the same pytest process still work.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from illume import training
from illume.config import SampleConfig, TrainConfig
from illume.data.shapes import ShapesWorld
from tests.conftest import REPO

ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
ZERO3 = REPO / "configs" / "deepspeed" / "zero3.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extensions_dir() -> Path:
    """Where DeepSpeed's JIT ops are built; keyed by the versions so an upgrade never reuses a stale build."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
           f"-deepspeed{importlib.metadata.version('deepspeed')}")
    return cache / "illume" / "torch_extensions" / key


def _release_distributed_state() -> None:
    """Destroy the process group and forget accelerate's and HF's DeepSpeed globals."""
    from accelerate.state import AcceleratorState, GradientState
    from deepspeed import comm as ds_comm
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached group handles
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()


@pytest.fixture
def deepspeed_cpu(monkeypatch):
    """A single-process DeepSpeed 'launch' on the CPU; skips when DeepSpeed or a C++ compiler is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[dev]')")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("DeepSpeed's CPU ops are compiled on first use and no C++ compiler was found")
    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
    if not torch.cuda.is_available():
        # Read when deepspeed is first imported (it picks its accelerator then), so set it before the import.
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(_extensions_dir()))
    deepspeed = pytest.importorskip("deepspeed")
    yield deepspeed

    try:
        _release_distributed_state()
    finally:
        # accelerate and DeepSpeed write os.environ directly (ACCELERATE_USE_DEEPSPEED, LOCAL_WORLD_SIZE, ...);
        # a leftover ACCELERATE_USE_DEEPSPEED=true turns the next plain Trainer into a DeepSpeed one.
        for name in set(os.environ) - set(saved_env):
            del os.environ[name]
        os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
        torch.set_num_threads(saved_threads)  # accelerate sets it for "MULTI_CPU"

    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import deepspeed_config

    assert not torch.distributed.is_initialized()
    assert not PartialState._shared_state and not AcceleratorState._shared_state
    assert deepspeed_config() is None


@pytest.mark.parametrize("path", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_configs_leave_the_trainer_settings_to_auto(path):
    config = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    assert "optimizer" not in config  # the Trainer's torch AdamW: no DeepSpeed CPU-Adam build needed
    assert config["zero_optimization"]["stage"] == (2 if path == ZERO2 else 3)


@pytest.mark.slow
def test_zero2_selection_sft_step_on_cpu(deepspeed_cpu, tiny_vlm, tmp_path, monkeypatch):
    world = ShapesWorld(num_train_scenes=8, num_val_scenes=2)
    examples, val = world.examples("train"), world.examples("val")
    rows = training.build_training_set([(examples[0].id, "there is a red circle on the left")], examples)
    assert len(rows) == 8  # two optimizer steps at batch 4

    trainers = []

    class RecordingTrainer(training.RowWeightedTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(training, "RowWeightedTrainer", RecordingTrainer)
    before = {n: t.clone() for n, t in tiny_vlm.model.state_dict().items()}
    cfg = TrainConfig(num_epochs=1, batch_size=4, deepspeed=str(ZERO2))
    result = training.fine_tune(tiny_vlm, rows, examples, val, cfg, SampleConfig(max_new_tokens=4),
                                tmp_path / "round")

    (trainer,) = trainers
    try:
        # DeepSpeed really ran the step: the engine wrapped the model and ZeRO-2 owned the optimizer.
        assert trainer.is_deepspeed_enabled
        assert isinstance(trainer.model_wrapped, deepspeed_cpu.DeepSpeedEngine)
        assert trainer.model_wrapped.zero_optimization_stage() == 2
        assert trainer.model_wrapped.module is tiny_vlm.model
        assert trainer.state.global_step == 2
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        assert config["train_micro_batch_size_per_gpu"] == 4  # "auto" filled from TrainingArguments
        assert config["zero_optimization"]["reduce_bucket_size"] == 32 * 32  # hidden_size ** 2
    finally:
        trainers.clear()  # drop the engine before the fixture releases the process group
        del trainer

    after = tiny_vlm.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".adapter." in n for n in changed)  # adapters moved, frozen weights did not
    saved = load_file(str(tmp_path / "round" / training.ADAPTERS_FILE))
    assert saved and all(torch.equal(saved[n], after[n]) for n in saved)
    assert len(result["epochs"]) == 1 and result["num_rows"] == len(rows)
