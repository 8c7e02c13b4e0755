"""Shared fixtures: seeds, tiny models built from configs, the path to ../shared when it is there."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
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
