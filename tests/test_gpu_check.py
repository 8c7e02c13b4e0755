"""`python scripts/gpu_check.py --dry-run`: the one-shot GPU check's code at tiny sizes on the CPU (issue 27)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dry_run"] is True
    sections = report["sections"]
    assert set(sections) == {"magma", "hf", "zero", "vllm"}
    assert not [name for name, figures in sections.items() if "error" in figures], sections
    for name in ("magma", "hf"):
        methods = sections[name]["sampling"]
        assert methods["ours"]["candidates"] == methods["generate"]["candidates"] > 0
        assert sections[name]["training_peak_bytes"] is None  # no CUDA allocator on the CPU
    assert sections["magma"]["plan_training_bytes"] > 0
    assert sections["zero"]["zero2"]["ran"] is True
    assert sections["zero"]["zero3"]["ran"] is True  # sharded training (tests/test_sharded.py)
    assert sections["vllm"]["ran"] is False and "--vllm-python" in sections["vllm"]["why"]  # no vLLM here


def test_without_a_gpu_the_check_asks_for_the_dry_run(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr
    assert not (tmp_path / "x.json").exists()
