"""Real 2-process runs on the CPU (gloo): the loop, reward training and DPO under torchrun / accelerate launch.

One tiny base model is pre-trained once for the module (in this process) and one 2-process `illume run` is
made; the reward and DPO commands then run with 2 processes on that run. Each launch is a subprocess with
OMP_NUM_THREADS=1 and a free port; a hang fails after SUBPROCESS_TIMEOUT instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from illume import distributed
from illume.cli import main
from illume.config import load_config
from illume.data.datasets import load_split
from illume.feedback.store import FeedbackStore
from illume.loading import load_vlm
from illume.sampling import sample
from tests.conftest import REPO, tiny_overrides
from tests.test_deepspeed import _free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]

SUBPROCESS_TIMEOUT = 300
# Threshold 0.1: the barely pre-trained model's rationales still get accepted and rejected ones (pairs).
# sample.batch_size=4: the 12 train questions are 3 sampler batches, split 1 + 2 over the two ranks.
RUN = ["critic.threshold=0.1", "loop.stop_when_nothing_new=false", "loop.num_rounds=2", "train.num_epochs=1",
       "train.batch_size=4", "sample.samples_per_temperature=2", "sample.max_new_tokens=6", "sample.batch_size=4"]


def _launch(*command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # the launcher sets them
        env.pop(name, None)
    return subprocess.run(list(command), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return _launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "illume.cli", *args)


def _ok(process: subprocess.CompletedProcess) -> str:
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> list[str]:
    """The config args of the runs here, with the tiny base model pre-trained (once, in one process)."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    args = [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *RUN]
    assert main(["pretrain", *args, "name=pretrain"]) == 0
    return args


@pytest.fixture(scope="module")
def two_process_run(config):
    """A 2-round `illume run` with 2 processes: (run dir, its output)."""
    output = _ok(_torchrun("run", *config, "name=two"))
    return load_config(config[0], config[1:] + ["name=two"]).run_dir, output


def _without_logprobs(sets):
    return [replace(s, candidates=[replace(c, logprob=0.0) for c in s.candidates]) for s in sets]


def _logprobs(sets) -> list[float]:
    return [c.logprob for s in sets for c in s.candidates]


@pytest.mark.slow
def test_two_process_run_stores_the_one_process_candidates_once(config, two_process_run):
    run_dir, output = two_process_run
    cfg = load_config(config[0], config[1:] + ["name=two"])
    train = load_split(cfg.data, "train")
    store = FeedbackStore(run_dir / "feedback.db")
    for round_idx in (0, 1):
        sets = store.candidate_sets(round_idx)
        assert sorted(cs.example_id for cs in sets) == sorted(e.id for e in train)  # each exactly once
        judged = [r["example_id"] for r in store.judgments_table() if r["round_idx"] == round_idx]
        assert len(set(judged)) == len(train)

    # Round 0 samples the base model: the candidates one process draws (the same sampler batches): the same
    # texts, seeds, order and answers exactly. Log-probs are float32 sums computed here with this process's
    # thread count and under torchrun with OMP_NUM_THREADS=1, so the kernels reduce in another order: they
    # agree to a relative 1e-5 (seen: 3e-8), which is all a float32 sum of ~20 terms promises.
    one_process = sample(load_vlm(cfg), train, cfg.sample, round_idx=0, use_reference_answer=True)
    stored = store.candidate_sets(0)
    assert _without_logprobs(stored) == _without_logprobs(one_process)
    assert _logprobs(stored) == pytest.approx(_logprobs(one_process), rel=1e-5, abs=0)

    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1] and all(r["trained"] for r in results[1:])
    assert output.count("results: ") == 1  # rank 1 prints (and writes) nothing of its own
    assert not list(run_dir.rglob("*.tmp"))
    for round_idx in (0, 1):
        training = json.loads((run_dir / f"round_{round_idx:02d}" / "training.json").read_text())
        assert training["world_size"] == 2  # the Trainer ran DDP over both processes
        assert (run_dir / f"round_{round_idx:02d}" / "adapters.safetensors").is_file()


@pytest.mark.slow
def test_reward_training_with_two_processes(two_process_run):
    run_dir, _ = two_process_run
    output = _ok(_torchrun("reward", "train", str(run_dir)))
    reward_dir = run_dir / "reward"
    for name in ("backbone.safetensors", "head.safetensors", "reward_model.json", "split.json",
                 "training.json", "reward_eval.json", "calibration.png"):
        assert (reward_dir / name).is_file(), name
    assert json.loads((reward_dir / "training.json").read_text())["world_size"] == 2
    assert output.count("pairwise accuracy") == 1  # one report, from rank 0


@pytest.mark.slow
def test_dpo_with_two_processes(two_process_run):
    run_dir, _ = two_process_run
    _ok(_torchrun("dpo", str(run_dir)))
    metrics = json.loads((run_dir / "dpo" / "metrics.json").read_text())
    assert metrics["num_rows"] > 0 and "cider" in metrics["val"]
    assert json.loads((run_dir / "dpo" / "training.json").read_text())["world_size"] == 2
    assert (run_dir / "dpo" / "adapters.safetensors").is_file()


@pytest.mark.slow
def test_dpo_with_accelerate_launch(two_process_run, tmp_path):
    """`accelerate launch --cpu` starts ONE process unless given an MPI hostfile (accelerate 1.x runs
    `--cpu` through its simple launcher), so 2 CPU processes need `--multi_gpu`, which launches through
    torch.distributed.run; without a GPU the processes join over gloo. No accelerate config file needed."""
    run_dir, _ = two_process_run
    _ok(_launch(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "illume.cli", "dpo", str(run_dir),
                "--out", str(tmp_path / "dpo")))
    assert (tmp_path / "dpo" / "metrics.json").is_file()
    assert json.loads((tmp_path / "dpo" / "training.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("num_items", [12, 10, 3])
def test_shards_are_whole_blocks_in_rank_order(monkeypatch, num_items):
    items = list(range(num_items))
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        shares.append(distributed.shard(items, block_size=4))
    assert shares[0] + shares[1] == items  # gather_objects' rank order restores the order
    assert all(len(share) % 4 == 0 for share in shares[:-1])  # sampler batches stay whole


def test_single_process_helpers_are_no_ops():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.shard(list(range(5)), block_size=2) == list(range(5))
    assert distributed.gather_objects([1, 2]) == [1, 2] and distributed.broadcast_object("x") == "x"
    distributed.barrier()
    assert distributed.ddp_backend() is None


def _node(rank_count: int, endpoint: str, *args: str) -> subprocess.Popen:
    """One node's torchrun agent: `--nnodes 2`, one process, rendezvous at `endpoint` (c10d), as on a cluster."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # the launcher sets them
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(rank_count),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "illume-two-nodes",
               "-m", "illume.cli", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_node_ranks_run_the_loop_end_to_end(config, postgres_url):
    """Two torchrun agents on this machine stand for two nodes (`--nnodes 2`, one process each, a c10d
    rendezvous endpoint), with one run folder both see and a PostgreSQL store: what docs/scaling.md's
    several-node recipe runs on a cluster, with the hosts changed. Every candidate is stored once, both
    processes train together, rank 0 alone writes the folder."""
    endpoint = f"127.0.0.1:{_free_port()}"
    args = ["run", *config, "name=nodes", f"store_url={postgres_url}"]
    nodes = [_node(1, endpoint, *args) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=SUBPROCESS_TIMEOUT)[0])
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    assert sum(output.count("results: ") for output in outputs) == 1  # one node's rank 0 reports

    cfg = load_config(config[0], config[1:] + ["name=nodes", f"store_url={postgres_url}"])
    train = load_split(cfg.data, "train")
    with FeedbackStore(postgres_url) as store:
        for round_idx in (0, 1):
            assert sorted(cs.example_id for cs in store.candidate_sets(round_idx)) == sorted(e.id for e in train)
            judged = [r["example_id"] for r in store.judgments_table() if r["round_idx"] == round_idx]
            assert sorted(set(judged)) == sorted(e.id for e in train)  # every item judged
        assert store.num_judgments() == 2 * len(train)  # once each: one critic, on one node
        # Round 0: the candidates one process draws, as with two processes on one node.
        one_process = sample(load_vlm(cfg), train, cfg.sample, round_idx=0, use_reference_answer=True)
        assert _without_logprobs(store.candidate_sets(0)) == _without_logprobs(one_process)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1] and all(r["trained"] for r in results[1:])
    for round_idx in (0, 1):
        training = json.loads((cfg.run_dir / f"round_{round_idx:02d}" / "training.json").read_text())
        assert training["world_size"] == 2
    assert not (cfg.run_dir / "feedback.db").exists()  # the store is the PostgreSQL database
