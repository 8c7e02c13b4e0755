"""A newcomer's path from `illume.loop.run` to the loss: how many of our frames it crosses (issue 26 asks for at
most 4 for selection-SFT and 5 for DPO), read off the stack when each loss is first computed in a real run."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

import illume.training
import policies.dpo
from illume.cli import main
from tests.conftest import REPO, tiny_overrides

OURS = tuple(str(REPO / part) for part in ("illume", "reward", "policies"))
LOOP = ["critic.threshold=0.1", "loop.stop_when_nothing_new=false", "train.num_epochs=1", "train.batch_size=8",
        "sample.samples_per_temperature=2", "sample.max_new_tokens=6", "loop.num_rounds=1"]


def _our_frames_to(module, name: str, monkeypatch) -> list[list[str]]:
    """Record, at every call of `module.name`, our frames from `run` down to its caller (the loss)."""
    seen, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        ours = [f"{Path(f.filename).stem}.{f.name}" for f in stack if f.filename.startswith(OURS)]
        seen.append(ours[ours.index("loop.run"):])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "module", "loss", "most"), [
    ("sft", illume.training, "weighted_lm_loss", 4),
    ("dpo", policies.dpo, "dpo_losses", 5),
])
def test_the_path_from_run_to_the_loss_is_short(kind, module, loss, most, tmp_path, monkeypatch):
    seen = _our_frames_to(module, loss, monkeypatch)
    main(["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *LOOP, f"policy.kind={kind}"])
    assert seen, f"the {kind} loss was never computed"
    path = seen[0]
    assert len(path) <= most, " -> ".join(path)
    assert path[0] == "loop.run" and path[1] == "loop.tune_round" and path[-1].endswith(".compute_loss"), path
