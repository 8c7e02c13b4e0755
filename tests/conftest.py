"""Shared fixtures: seeds, tiny models built from configs, one finished tiny run for tests that only read a run,
the path to ../shared when it is there."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.postgres import postgres_cluster, postgres_url, store_url  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SHARED_VQAX_VAL = REPO.parent / "shared" / "data" / "vqax" / "val.json"

# A 2-layer, width-32 LM and a width-8 encoder: big enough to exercise every code path, fast on CPU.
TINY_MODEL = [
    "model.vision.width=8", "model.lm.hidden_size=32", "model.lm.num_layers=2", "model.lm.num_heads=2",
    "model.lm.rotary_dim=8",
]
TINY_DATA = [
    "data.shapes.num_pretrain_scenes=40", "data.shapes.num_train_scenes=12", "data.shapes.num_val_scenes=8",
    "data.shapes.num_test_scenes=4", "pretrain.num_steps=20", "pretrain.batch_size=8",
]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def tiny_overrides(tmp_path: Path, own_cache: bool = False) -> list[str]:
    """Overrides for a fast run writing only under tmp_path.

    The tiny demo base model comes from a cache the whole session shares (`shared_tiny_cache`): some forty
    runs need the same one, and pre-training it for each took minutes of the suite. A test about pre-training
    or the cache itself takes `own_cache=True`: tmp_path/cache, empty until its run pre-trains into it.
    """
    cache = tmp_path / "cache" if own_cache else shared_tiny_cache()
    return TINY_MODEL + TINY_DATA + [f"model.cache_dir={cache}", f"output_dir={tmp_path / 'runs'}"]


_SHARED_CACHE: list[Path] = []


def shared_tiny_cache() -> Path:
    """A model cache for the session, holding the tiny demo base model of `TINY_MODEL` + `TINY_DATA`,
    pre-trained on first use. Pre-trained here, in this process, before any run names the folder: runs started
    in several processes at once (torchrun, a second writer) then find it made instead of all making it."""
    if not _SHARED_CACHE:
        from illume.config import load_config
        from illume.demo.pretrain import ensure_demo_model

        cache = Path(tempfile.mkdtemp(prefix="illume-tests-cache-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        ensure_demo_model(load_config(REPO / "configs" / "demo.yaml", TINY_MODEL + TINY_DATA + [
            f"model.cache_dir={cache}", f"output_dir={cache / 'runs'}"]))
        _SHARED_CACHE.append(cache)
    return _SHARED_CACHE[0]


# The settings of `finished_run`: those of tests/test_loop.py (a threshold the barely trained tiny model's
# rationales reach, so both rounds train), plus reward settings that let `illume reward train RUN_DIR` fit on its
# 24 judgments (unused by the loop itself: the critic is simulated).
FINISHED_RUN = [
    "critic.kind=simulated", "critic.threshold=0.1", "policy.kind=sft", "loop.num_rounds=2",
    "loop.stop_when_nothing_new=false", "train.num_epochs=2", "train.batch_size=8",
    "sample.samples_per_temperature=2", "sample.max_new_tokens=6",
    "reward.num_epochs=1", "reward.batch_size=8", "reward.heldout_fraction=0.3", "reward.target_precision=0.5",
    "name=finished"]


@dataclass(frozen=True)
class FinishedRun:
    """A finished run: its folder, and the `illume run` arguments (config file, then overrides) that continue it
    (`main(["run", *args])`; as they were at its start, with output_dir its folder's parent)."""

    run_dir: Path
    args: list[str]

    def config(self, *overrides: str):
        """Its settings as `illume run` with `args` (and `overrides`) loads them; `run_dir` is this folder."""
        from illume.config import load_config

        return load_config(self.args[0], [*self.args[1:], *overrides])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> FinishedRun:
    """The ILLUME loop run once per session, for the tests that only need a finished run to look at.

    configs/demo.yaml on the tiny model (`TINY_MODEL` + `TINY_DATA`, the session's `shared_tiny_cache`) with
    `FINISHED_RUN`: 2 rounds, the simulated critic (ROUGE-L >= 0.1, annotator `simulated:rouge_l>=0.1`),
    selection-SFT, name `finished`. Both rounds train. It holds config.yaml; feedback.db (per round the 12 train
    questions, each with the distinct ones of its 4 sampled candidates, and one simulated judgment: 24 in all);
    images/ (the 12 train images); base_metrics.json; round_00/ and round_01/ (adapters.safetensors,
    metrics.json, training_set.jsonl, training.json); results.json (rows base, 0, 1). No reward model, no dpo/
    or kto/, no exports/.

    Shared by the whole session: never write to it; take `finished_run_copy`, a copy of one's own.
    """
    from illume.cli import main
    from tests.deprecation_guard import DeprecationGuard

    output_dir = tmp_path_factory.mktemp("finished_run") / "runs"
    args = [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(output_dir.parent), *FINISHED_RUN]
    guard = DeprecationGuard()  # set up before a test's own guard starts: the run gets its own
    guard.start()
    try:
        assert main(["run", *args]) == 0
    finally:
        guard.stop()
    return FinishedRun(output_dir / "finished", args)


@pytest.fixture
def finished_run_copy(finished_run, tmp_path_factory) -> FinishedRun:
    """A copy of `finished_run` for one test to read or change as it likes, in a folder of its own (not the
    test's tmp_path, which stays empty); its `args` continue the copy, not the original."""
    output_dir = tmp_path_factory.mktemp("finished_run_copy") / "runs"
    shutil.copytree(finished_run.run_dir, output_dir / finished_run.run_dir.name)
    return FinishedRun(output_dir / finished_run.run_dir.name, [*finished_run.args, f"output_dir={output_dir}"])


@pytest.fixture
def tiny_vlm():
    """A randomly initialised tiny MAGMA with the shapes-world tokenizer, in eval mode."""
    from illume.config import load_config
    from illume.demo.tiny_models import build_demo_vlm

    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_MODEL)
    return build_demo_vlm(cfg.model, seed=0)


@pytest.fixture(autouse=True)
def _no_deprecated_calls_from_our_code():
    """A deprecated call made by our code fails the test at the call site (see tests/deprecation_guard.py)."""
    from tests.deprecation_guard import DeprecationGuard

    guard = DeprecationGuard()
    guard.start()
    yield
    guard.stop()


CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
"""`.ci/run` installs every tool the tests use (ruff, import-linter, Java, Chromium, PostgreSQL, ...): there a
skipped test is a missing install step, so it fails instead of passing unnoticed."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every tool the tests need is installed: {reason}"
