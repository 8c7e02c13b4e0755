"""Adding a critic or a policy is one new module plus one dict entry: the loop runs what CRITICS and POLICIES
hold for critic.kind and policy.kind, and asks nothing else about them. (A new kind's name also goes into the
config's Literal of kinds, which tests/test_config.py keeps equal to the registries; here the toys take the places
of `judge` and `sft`.)"""

from __future__ import annotations

import json
from functools import partial

import pytest

from illume.critics import Critique, CritiqueContext
from illume.feedback.writes import NewJudgment
from tests.conftest import REPO, tiny_overrides
from tests.test_policies import _toy_policy


class FirstCandidateJudge:
    """A toy AI judge: accepts each item's first candidate, stored under its own name and kind."""

    annotator, kind = "first-candidate", "judge"

    def __init__(self, cfg, seen: list):
        self.seen = seen

    def review(self, context: CritiqueContext) -> Critique:
        self.seen.append(context.round_idx)
        judgments = [NewJudgment(example_id, [cs.candidates[0].text] if cs.candidates else [], not cs.candidates)
                     for example_id, cs in context.sets.items()]
        context.store.add_judgments(context.round_idx, judgments, self.annotator, kind=self.kind)
        return Critique(report={"judge_items": len(judgments)})


@pytest.mark.slow
def test_a_toy_critic_and_a_toy_policy_run_the_loop(tmp_path, monkeypatch):
    from illume.cli import main
    from illume.critic_registry import CRITICS
    from illume.feedback.store import FeedbackStore
    from policies.registry import POLICIES

    seen, calls = [], []
    monkeypatch.setitem(CRITICS, "judge", lambda cfg: FirstCandidateJudge(cfg, seen))
    monkeypatch.setitem(POLICIES, "sft", partial(_toy_policy, calls))
    overrides = tiny_overrides(tmp_path) + ["critic.kind=judge", "policy.kind=sft", "loop.num_rounds=2",
                                            "sample.max_new_tokens=8", "loop.stop_when_nothing_new=false",
                                            "name=ext"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    assert seen == [0, 1] and calls == [0, 1]
    results = json.loads((tmp_path / "runs" / "ext" / "results.json").read_text())
    for row in results[1:]:
        # The critic's report reaches results.json; an AI judge is not people; every item has one accept.
        assert row["judge_items"] == row["toy_items"] == 12 and row["human_judgments"] == 0
        assert row["accepted_pct"] == 100.0 and row["trained"]
    with FeedbackStore(tmp_path / "runs" / "ext" / "feedback.db") as store:
        assert store.annotator_kinds() == {"first-candidate": "judge"}
        assert store.num_judgments(kinds={"judge"}) == 24


def test_an_unknown_critic_kind_fails_before_any_work(tmp_path, capsys):
    from illume.cli import main

    assert main(["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), "critic.kind=oracle"]) == 2
    err = capsys.readouterr().err
    assert "critic.kind" in err and "oracle" in err and "'simulated', 'person', 'reward', 'hybrid', 'judge'" in err
    assert not (tmp_path / "runs" / "demo").exists()
