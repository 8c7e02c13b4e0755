"""ZeRO-3 on two CPU processes (DeepSpeed over gloo) trains what one process trains.

`tests/sharded_training.py` runs two rounds of selection-SFT, DPO or KTO on the tiny model (2 epochs each, the best
val epoch kept, the train questions sampled after each round) once in one process without DeepSpeed (batch 4)
and once under torchrun with 2 processes and ZeRO-3 (batch 2 each: the same global batches). The DeepSpeed
config is configs/deepspeed/zero3.json with `stage3_param_persistence_threshold` 100, so the adapters' weight
matrices (256 elements) are partitioned like frozen weights and their biases stay whole: both of ZeRO-3's ways of
holding a parameter are read and written.

Tolerance, measured on this machine (2026-12-07): kept adapters differ by at most 5.2e-6 (SFT), 1.3e-6 (DPO) and
1.1e-6 (KTO) in absolute value, entries up to 0.095; the tests allow 1e-4. Val scores and sampled texts are equal; the
candidates' log-probs agree to 1.4e-6 (allowed 1e-4). The differences are float32 sums taken in another order
(two ranks' gradients averaged, gathered tensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from illume.cli import main
from illume.config import load_config
from tests.conftest import REPO, tiny_overrides
from tests.test_deepspeed import _extensions_dir, _free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]

TOLERANCE = 1e-4
TIMEOUT = 300


@pytest.fixture(scope="module")
def zero3_config(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[dev]')")
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    path = tmp_path_factory.mktemp("zero3") / "zero3.json"
    path.write_text(json.dumps(config))
    return path


def _launch(command: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(_extensions_dir()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *args]


@pytest.fixture(scope="module", params=["sft", "dpo", "kto"])
def launches(request, zero3_config, tmp_path_factory) -> tuple[str, Path, Path]:
    """(policy, one process's output, two ZeRO-3 processes' output)."""
    policy, out = request.param, tmp_path_factory.mktemp(f"sharded_{request.param}")
    _launch([sys.executable, "-m", "tests.sharded_training", str(out / "one"), policy, "4"])
    _launch(_torchrun("-m", "tests.sharded_training", str(out / "zero3"), policy, "2", str(zero3_config)))
    return policy, out / "one", out / "zero3"


def _read(folder: Path, round_idx: int) -> tuple[dict, dict, list]:
    round_dir = folder / f"round_{round_idx}"
    return (load_file(str(round_dir / "adapters.safetensors")), json.loads((round_dir / "kept.json").read_text()),
            json.loads((round_dir / "candidates.json").read_text()))


@pytest.mark.parametrize("round_idx", [0, 1])
def test_zero3_on_two_processes_keeps_the_one_process_adapters_scores_and_candidates(launches, round_idx):
    policy, one, zero3 = launches
    adapters_one, kept_one, sets_one = _read(one, round_idx)
    adapters_z3, kept_z3, sets_z3 = _read(zero3, round_idx)
    assert (kept_one["world_size"], kept_z3["world_size"]) == (1, 2)

    assert adapters_one.keys() == adapters_z3.keys()
    for name, tensor in adapters_one.items():
        torch.testing.assert_close(adapters_z3[name], tensor, rtol=0, atol=TOLERANCE, msg=name)
    # The round moved the adapters by far more than the tolerance: the comparison is not between two zeros.
    assert max(t.abs().max().item() for t in adapters_one.values()) > 100 * TOLERANCE

    assert kept_z3["epochs"] == kept_one["epochs"] and kept_z3["best"] == kept_one["best"]
    texts = [[c["text"] for c in s["candidates"]] for s in sets_one]
    assert [[c["text"] for c in s["candidates"]] for s in sets_z3] == texts and any(texts)
    assert [c["logprob"] for s in sets_z3 for c in s["candidates"]] == pytest.approx(
        [c["logprob"] for s in sets_one for c in s["candidates"]], rel=0, abs=TOLERANCE)

    # The weights were sharded: between training and evaluation rank 0 held under a tenth of them whole.
    assert kept_one["elements_held_whole"] == kept_one["elements"]
    assert kept_z3["elements"] == kept_one["elements"]
    assert kept_z3["elements_held_whole"] < kept_z3["elements"] / 10


def test_a_kept_earlier_epoch_is_what_the_next_sharded_round_starts_from(launches):
    """The second round must start from the kept epoch, not from the optimizer's last partitions: DPO's first
    round keeps epoch 1 of 2 here, so a ZeRO-3 partition left at epoch 2 would show in round 1's adapters
    (it did, by 0.02, before loading wrote the partitions too)."""
    policy, one, zero3 = launches
    _, kept_one, _ = _read(one, 0)
    if policy == "dpo":
        assert kept_one["best"]["epoch"] == 1  # otherwise this test no longer checks what it says
    adapters_one, _, _ = _read(one, 1)
    adapters_z3, _, _ = _read(zero3, 1)
    for name, tensor in adapters_one.items():
        torch.testing.assert_close(adapters_z3[name], tensor, rtol=0, atol=TOLERANCE, msg=name)


def test_zero3_reward_model_fits_what_one_process_fits_and_scores_on_rank_0_alone(zero3_config, tmp_path):
    """The reward model's Bradley-Terry fit under ZeRO-3 on two processes, then scored by rank 0 alone (as the
    reward critic scores): made whole after training, it needs no other rank."""
    _launch([sys.executable, "-m", "tests.sharded_training", str(tmp_path / "one"), "reward", "4"])
    _launch(_torchrun("-m", "tests.sharded_training", str(tmp_path / "zero3"), "reward", "2", str(zero3_config)))
    one, zero3 = tmp_path / "one" / "reward", tmp_path / "zero3" / "reward"
    assert json.loads((zero3 / "training.json").read_text())["world_size"] == 2
    for name in ("backbone.safetensors", "head.safetensors"):
        weights_one, weights_z3 = load_file(str(one / name)), load_file(str(zero3 / name))
        assert weights_one.keys() == weights_z3.keys() and weights_one
        for key, tensor in weights_one.items():
            assert tensor.numel() > 0  # saved whole, not an empty partition
            torch.testing.assert_close(weights_z3[key], tensor, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")
    scores_one = json.loads((one / "scores.json").read_text())
    scores_z3 = json.loads((zero3 / "scores.json").read_text())
    assert [s for row in scores_z3 for s in row] == pytest.approx([s for row in scores_one for s in row], abs=TOLERANCE)
    assert len({round(s, 3) for row in scores_one for s in row}) > 1  # the scores are not all alike


def test_illume_run_with_zero3_on_two_processes(zero3_config, tmp_path):
    """The loop end to end under ZeRO-3: sampling, the critic, training, the kept epoch and the results."""
    args = [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), "name=zero3", "loop.num_rounds=2",
            "critic.threshold=0.1", "loop.stop_when_nothing_new=false", "train.num_epochs=1", "train.batch_size=2",
            "sample.samples_per_temperature=2", "sample.max_new_tokens=6", "sample.batch_size=4",
            f"train.deepspeed={zero3_config}"]
    assert main(["pretrain", *args]) == 0
    _launch(_torchrun("-m", "illume.cli", "run", *args))
    run_dir = load_config(args[0], args[1:]).run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1] and all(r["trained"] for r in results[1:])
    for round_idx in (0, 1):
        training = json.loads((run_dir / f"round_{round_idx:02d}" / "training.json").read_text())
        assert training["world_size"] == 2
        adapters = load_file(str(run_dir / f"round_{round_idx:02d}" / "adapters.safetensors"))
        assert adapters and all(t.numel() > 0 for t in adapters.values())  # gathered, not empty partitions


@pytest.fixture(scope="module")
def grpo_launches(zero3_config, tmp_path_factory) -> tuple[Path, Path]:
    """`illume run configs/demo_grpo.yaml` (2 rounds) on two processes, with DDP and with ZeRO-3 (batch 2 each):
    round 0 fits the reward model on people's judgments (reward/round_01) and trains GRPO on it; round 1's critic
    is that reward model, scored on rank 0 alone after its sharded training. Against DDP, not one process:
    the training sets here (33 pairs, the distinct samples) do not split into whole global batches, and the
    ranks' last uneven batch differs from one process's with or without sharding (the `reward` launch above
    compares with one process on whole batches)."""
    tmp_path = tmp_path_factory.mktemp("sharded_grpo")
    args = [str(REPO / "configs" / "demo_grpo.yaml"), *tiny_overrides(tmp_path), "loop.num_rounds=2",
            "model.prefix_dropout=0.0", "sample.samples_per_temperature=2", "sample.max_new_tokens=6",
            "sample.batch_size=4", "policy.grpo.num_generations=4", "policy.grpo.iterations=1",
            "reward.num_epochs=2", "critic.threshold=0.1", "train.batch_size=2", "reward.batch_size=2"]
    ddp, zero3 = [*args, "name=ddp"], [*args, "name=zero3", f"train.deepspeed={zero3_config}"]
    assert main(["pretrain", *ddp]) == 0
    _launch(_torchrun("-m", "illume.cli", "run", *ddp))
    _launch(_torchrun("-m", "illume.cli", "run", *zero3))
    return load_config(args[0], ddp[1:]).run_dir, load_config(args[0], zero3[1:]).run_dir


def test_zero3_grpo_and_its_reward_model_train_what_ddp_trains(grpo_launches):
    ddp, zero3 = grpo_launches
    rm_ddp, rm_z3 = ddp / "reward" / "round_01", zero3 / "reward" / "round_01"
    assert json.loads((rm_z3 / "training.json").read_text())["world_size"] == 2
    for name in ("backbone.safetensors", "head.safetensors"):
        weights_ddp, weights_z3 = load_file(str(rm_ddp / name)), load_file(str(rm_z3 / name))
        assert weights_ddp.keys() == weights_z3.keys() and weights_ddp
        for key, tensor in weights_ddp.items():
            torch.testing.assert_close(weights_z3[key], tensor, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")
    for round_idx in (0, 1):
        round_ddp, round_z3 = ddp / f"round_{round_idx:02d}", zero3 / f"round_{round_idx:02d}"
        assert json.loads((round_z3 / "training.json").read_text())["world_size"] == 2
        adapters_ddp = load_file(str(round_ddp / "adapters.safetensors"))
        adapters_z3 = load_file(str(round_z3 / "adapters.safetensors"))
        assert adapters_ddp.keys() == adapters_z3.keys()
        for key, tensor in adapters_ddp.items():
            torch.testing.assert_close(adapters_z3[key], tensor, rtol=0, atol=TOLERANCE, msg=key)
        assert max(t.abs().max().item() for t in adapters_ddp.values()) > 100 * TOLERANCE
    results_ddp = json.loads((ddp / "results.json").read_text())
    results_z3 = json.loads((zero3 / "results.json").read_text())
    assert [r["round"] for r in results_z3] == ["base", 0, 1]
    # Round 1's critic is the reward model, on rank 0 alone: it accepted what it accepted under DDP.
    for key in ("accepted_pct", "new_rationales", "judgments", "grpo_reward", "grpo_accept", "grpo_kl"):
        assert [r.get(key) for r in results_z3] == pytest.approx([r.get(key) for r in results_ddp], abs=TOLERANCE), key
    for r_z3, r_ddp in zip(results_z3, results_ddp, strict=True):
        assert r_z3["val"] == pytest.approx(r_ddp["val"], abs=TOLERANCE)


def test_zero3_trl_grpo_on_an_hf_vlm_trains_what_ddp_trains(zero3_config, tmp_path):
    """TRL's GRPOTrainer (model.kind=hf, a tiny Qwen2-VL) for two rounds on two processes, with DDP and with
    ZeRO-3: TRL gathers for generation, our sampler and val decoding gather, and round 1 copies the partitioned
    adapters into TRL's reference adapter. Against DDP for the same reason as the GRPO run above."""
    from illume.demo.tiny_models import build_tiny_hf_vlm

    build_tiny_hf_vlm("qwen2_vl").save(tmp_path / "base")
    args = [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), "model.kind=hf",
            f"model.path={tmp_path / 'base'}", "critic.threshold=0.1", "loop.stop_when_nothing_new=false",
            "loop.num_rounds=2", "policy.kind=grpo", "policy.grpo.num_generations=4", "policy.grpo.iterations=1",
            "policy.learning_rate=1e-2", "policy.grpo.reward_sources.reward_model=0",
            "policy.grpo.reward_sources.simulated=1.0", "sample.max_new_tokens=5", "sample.samples_per_temperature=1",
            "train.batch_size=4", "train.num_epochs=1"]
    _launch(_torchrun("-m", "illume.cli", "run", *args, "name=ddp"))
    _launch(_torchrun("-m", "illume.cli", "run", *args, "name=zero3", f"train.deepspeed={zero3_config}"))
    ddp, zero3 = tmp_path / "runs" / "ddp", tmp_path / "runs" / "zero3"
    for round_idx in (0, 1):
        training = json.loads((zero3 / f"round_{round_idx:02d}" / "training.json").read_text())
        assert training["trainer"] == "trl.GRPOTrainer" and training["world_size"] == 2
        adapters_ddp = load_file(str(ddp / f"round_{round_idx:02d}" / "adapters.safetensors"))
        adapters_z3 = load_file(str(zero3 / f"round_{round_idx:02d}" / "adapters.safetensors"))
        assert adapters_ddp.keys() == adapters_z3.keys() and adapters_ddp
        for key, tensor in adapters_ddp.items():
            torch.testing.assert_close(adapters_z3[key], tensor, rtol=0, atol=TOLERANCE, msg=key)
        assert max(t.abs().max().item() for t in adapters_ddp.values()) > 100 * TOLERANCE
    results_ddp = json.loads((ddp / "results.json").read_text())
    results_z3 = json.loads((zero3 / "results.json").read_text())
    for key in ("accepted_pct", "grpo_reward", "grpo_accept", "grpo_kl"):
        assert [r.get(key) for r in results_z3] == pytest.approx([r.get(key) for r in results_ddp], abs=TOLERANCE), key
    assert [r["trained"] for r in results_z3[1:]] == [True, True]
