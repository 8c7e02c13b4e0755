"""scripts/plot_reward_vs_acceptance.py: the reward-hacking picture of an online-RL run."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("plot_rva", REPO / "scripts" / "plot_reward_vs_acceptance.py")
plot_rva = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_rva)


def _row(round_idx, reward, accept):
    return {"round": round_idx, "grpo_reward": reward, "grpo_accept": accept, "val": {"cider": 0.5}}


def test_rounds_where_reward_rises_and_acceptance_falls_are_flagged():
    rows = [_row(0, 0.1, 0.2), _row(1, 0.3, 0.3), _row(2, 0.5, 0.1), _row(3, 0.4, 0.05)]
    assert plot_rva.gaming_rounds(rows) == [2]  # round 3: both fell, not gaming


def test_the_plot_is_written_and_says_what_it_saw(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    results = [{"round": "base", "val": {"cider": 0.4}}, _row(0, 0.1, 0.2), _row(1, 0.6, 0.1)]
    (run / "results.json").write_text(json.dumps(results))
    assert plot_rva.main([str(run)]) == 0
    assert (run / "reward_vs_acceptance.png").stat().st_size > 1000
    assert "reward up, acceptance down in rounds [1]" in capsys.readouterr().out
    (run / "results.json").write_text(json.dumps(results[:1]))
    with pytest.raises(SystemExit, match="no GRPO rounds"):
        plot_rva.main([str(run)])
