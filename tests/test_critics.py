"""Critics: the simulated critic's rule, and the reward critic's threshold and hybrid band."""

from illume.config import CriticConfig
from illume.critics import SimulatedCritic
from illume.data.records import Candidate, CandidateSet, Example
from reward.critic import RewardDecider


def _set(example_id, texts):
    return CandidateSet(example_id, "red", "red", "Q: what color is the circle? A: red, seeing that", 1,
                        [Candidate(t, 0.3, 1, i, -1.0) for i, t in enumerate(texts)])


def test_simulated_critic_accepts_by_rouge_l_against_any_reference():
    example = Example("e", None, "what color is the circle?", ["red"],
                      ["the circle is red", "there is a red circle on the left"])
    cs = _set("e", ["the circle is red", "there is a red circle on the left side", "a blue square", "the red"])
    [judgment] = SimulatedCritic(CriticConfig(threshold=0.7)).decide([cs], {"e": example})
    assert judgment.accepted == ["the circle is red", "there is a red circle on the left side"]
    assert not judgment.none_fit
    [strict] = SimulatedCritic(CriticConfig(threshold=1.0)).decide([cs], {"e": example})
    assert strict.accepted == ["the circle is red"]
    [none] = SimulatedCritic(CriticConfig(threshold=0.7)).decide([_set("e", ["a blue square"])], {"e": example})
    assert none.accepted == [] and none.none_fit


def test_reward_critic_threshold_and_hybrid_band(monkeypatch):
    sets = [_set("a", ["x", "y"]), _set("b", ["x", "y"]), _set("c", ["x"])]
    scores = {"a": [2.5, -3.0], "b": [0.4, -2.0], "c": [-4.0]}  # threshold 0: b's 0.4 is within the band 1
    critic = RewardDecider(reward_model=None, threshold=0.0)
    monkeypatch.setattr(critic, "scores", lambda sets, _: [scores[cs.example_id] for cs in sets])
    judgments = {j.example_id: j for j in critic.decide(sets, {})}
    assert judgments["a"].accepted == ["x"] and judgments["b"].accepted == ["x"] and judgments["c"].none_fit
    hybrid = RewardDecider(reward_model=None, threshold=0.0, band=1.0)
    monkeypatch.setattr(hybrid, "scores", lambda sets, _: [scores[cs.example_id] for cs in sets])
    decided = {r.example_id for r in hybrid.decide(sets, {})}
    assert decided == {"a", "c"}  # b goes to people
