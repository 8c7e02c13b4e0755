"""Choosing what people see: annotate.order (stored, random, uncertainty), annotate.budget_per_round and the
reward model's uncertainty (reward/uncertainty.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from illume.cli import main
from illume.config import ConfigError, RunConfig, load_config
from illume.critics import Critique, CritiqueContext, WebCritic, left_for_people, order_items
from illume.data.records import Candidate, CandidateSet, Example
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from reward import critic as reward_critic
from reward import uncertainty
from reward.critic import (
    HybridCritic,
    RewardDecider,
    accepts_below_target,
    check_critique_order,
    check_first_round,
    first_round_draw,
)
from reward.pairs import OneSidedJudgments
from reward.uncertainty import fit_ensemble, item_disagreement
from tests.conftest import REPO, tiny_overrides

IDS = [f"e{i}" for i in range(6)]
# The reward model's scores (threshold 0): e1 and e4 sit close to it, the others far.
SCORES = {"e0": [3.0, -3.0], "e1": [0.2, -2.5], "e2": [-4.0, -3.5], "e3": [2.5, 4.0], "e4": [-0.1, -3.0],
          "e5": [-2.2, -5.0]}
# A second opinion that doubts e5 and e2 most (far from the threshold: the band rule would never send them).
DOUBT = {"e0": 0.0, "e1": 0.0, "e2": 0.25, "e3": 0.0, "e4": 0.125, "e5": 0.5}


def _sets(ids=IDS):
    return [CandidateSet(e, "red", "red", "Q: what colour is it? A: red, seeing that", i,
                         [Candidate(f"{e} reason {k}", 0.3, i, k, -1.0) for k in range(2)])
            for i, e in enumerate(ids)]


def _examples(ids=IDS):
    return {e: Example(e, None, "what colour is it?", ["red"], [f"{e} reason 0"]) for e in ids}


def _cfg(tmp_path, *overrides) -> RunConfig:
    return load_config(REPO / "configs" / "demo_hybrid.yaml", [f"output_dir={tmp_path}", *overrides])


def _hybrid_round(tmp_path, monkeypatch, *overrides, people_before: tuple[str, ...] = ()):
    """Round 1 of a hybrid critic over IDS with fixed scores and a fixed second opinion (no model is
    fitted); people are the simulated critic. Returns (who judged what: example -> annotator kind, the
    critic's `Critique`, the order the reward model handed the people critic: `PeopleCritic.review`'s `order`)."""
    cfg = _cfg(tmp_path, "reward.people_rounds=1", "reward.hybrid_band=1.0", *overrides)
    store = FeedbackStore(tmp_path / "feedback.db")
    sets = _sets()
    store.add_candidate_sets(1, "train", sets)
    for example_id in people_before:  # judged by people on the annotation page before the critic ran
        store.add_judgments(1, [(example_id, [], True, None)], "alice", "train", kind="person")
    monkeypatch.setattr(reward_critic, "reward_model_on", lambda *a, **k: (None, {
        "threshold": 0.0, "heldout_precision": None, "heldout_recall": None, "heldout_roc_auc": None}))
    monkeypatch.setattr(RewardDecider, "scores", lambda self, todo, _: [SCORES[cs.example_id] for cs in todo])
    monkeypatch.setitem(uncertainty.UNCERTAINTY, "ensemble", lambda cfg, rm, threshold, store, round_idx, todo, *_:
                        ([SCORES[cs.example_id] for cs in todo], [DOUBT[cs.example_id] for cs in todo]))
    context = CritiqueContext(cfg, store, 1, {cs.example_id: cs for cs in sets}, _examples(), say=lambda _: None)
    critic, handed = HybridCritic(cfg), []
    people = critic.people

    def review(context, order=None):  # the people critic, recording what the reward model hands it
        handed.append(order)
        return people.review(context, order)

    critic.people = SimpleNamespace(review=review)
    critique = critic.review(context)
    assert critique.done and len(handed) == 1
    judged = {item.example_id: [j.annotator_kind for j in item.judgments]
              for item in store.judged_items("train", round_idx=1)}
    assert all(len(kinds) == 1 for kinds in judged.values()) and set(judged) == set(IDS)  # each once, by one
    return {e: kinds[0] for e, kinds in judged.items()}, critique, handed[0]


def _people(judged):
    return {e for e, kind in judged.items() if kind != "reward"}


# ------------------------------------------------------------------ the estimator


def _constructed_ensemble(seed=0):
    """Pairs that pin the first feature's weight down (chosen - rejected ~ (1, noise)) and leave the second's
    to chance; held-out candidates that sit on the first feature only."""
    generator = torch.Generator().manual_seed(0)
    differences = torch.stack([1 + 0.2 * torch.randn(30, generator=generator),
                               0.5 * torch.randn(30, generator=generator)], 1)
    heldout = torch.tensor([[2.0, 0.0], [1.5, 0.0], [1.8, 0.0], [-2.0, 0.0], [-1.5, 0.0], [-1.8, 0.0]])
    return fit_ensemble(differences, heldout, [True, True, True, False, False, False], 8, seed, 0.9)


def test_the_ensemble_is_deterministic_and_doubts_what_the_pairs_leave_open():
    heads = _constructed_ensemble()
    again = _constructed_ensemble()
    assert all(torch.equal(w, w2) and t == t2 for (w, t), (w2, t2) in zip(heads, again))
    assert len({round(float(w[1]), 6) for w, _ in heads}) > 1  # the resamples give different second weights
    # The reward model: score = first feature, threshold 0.
    certain = torch.tensor([[-0.2, 0.0]])  # close to the threshold, but every head agrees: reject
    doubtful = torch.tensor([[1.3, 4.0]])  # far from it (accept), on the unseen feature the heads split
    u_certain = item_disagreement(heads, certain, [-0.2], 0.0)
    u_doubtful = item_disagreement(heads, doubtful, [1.3], 0.0)
    assert u_certain == 0.0 and 0.25 <= u_doubtful <= 0.75, (u_certain, u_doubtful)
    keys = {"certain": (u_certain, 0.2), "doubtful": (u_doubtful, 1.3)}  # (uncertainty, distance)
    assert order_items("uncertainty", ["certain", "doubtful"], 0, 1, keys) == ["doubtful", "certain"]
    # The distance to the threshold alone (the band rule's ranking) would put the other one first.
    assert order_items("uncertainty", ["doubtful", "certain"], 0, 1,
                       {k: (0.0, d) for k, (_, d) in keys.items()}) == ["certain", "doubtful"]
    assert item_disagreement(heads, torch.zeros(0, 2), [], 0.0) == 0.0


def test_orders_are_seeded_and_stable():
    assert order_items("stored", IDS, 0, 1) == IDS
    shuffled = order_items("random", IDS, 0, 1)
    assert shuffled == order_items("random", IDS, 0, 1) and sorted(shuffled) == sorted(IDS) and shuffled != IDS
    assert order_items("random", IDS, 0, 2) != shuffled  # another round, another draw
    assert order_items("uncertainty", IDS, 0, 1) == IDS  # no reward model yet: as stored
    keys = {e: (DOUBT[e], min(abs(s) for s in SCORES[e])) for e in IDS}
    # Most doubted first; the undoubted by distance to the threshold.
    assert order_items("uncertainty", IDS, 0, 1, keys) == ["e5", "e2", "e4", "e1", "e3", "e0"]


# ------------------------------------------------------------------ the budget


@pytest.mark.parametrize("order", ["stored", "random", "uncertainty"])
def test_a_budget_sends_exactly_n_items_to_people_in_the_order_and_the_model_decides_the_rest(
        tmp_path, monkeypatch, order):
    judged, critique, handed = _hybrid_round(tmp_path, monkeypatch, "annotate.budget_per_round=2",
                                             f"annotate.order={order}")
    expected = {"stored": ["e0", "e1"], "random": order_items("random", IDS, 0, 1)[:2],
                "uncertainty": ["e5", "e2"]}[order]
    assert _people(judged) == set(expected)  # exactly N, the first N in the order
    assert sum(kind == "reward" for kind in judged.values()) == len(IDS) - 2  # the model: exactly the rest
    assert handed == expected
    assert critique.report["people_items"] == 2 and critique.report["rm_decided_items"] == 4
    # e5 and e2: the model rejects both and the simulated critic accepts "reason 0": both are its mistakes.
    if order == "uncertainty":
        assert critique.report["people_items_rm_wrong"] == 1.0


def test_a_budget_counts_what_people_already_judged_this_round(tmp_path, monkeypatch):
    judged, _, _ = _hybrid_round(tmp_path, monkeypatch, "annotate.budget_per_round=2",
                                 "annotate.order=uncertainty", people_before=("e3",))
    assert _people(judged) == {"e3", "e5"}  # one of the two already spent on the page


def test_a_budget_of_zero_leaves_everything_to_the_model(tmp_path, monkeypatch):
    judged, _, _ = _hybrid_round(tmp_path, monkeypatch, "annotate.budget_per_round=0", "annotate.order=uncertainty")
    assert _people(judged) == set()


def test_the_band_rule_is_unchanged_by_default(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert (cfg.annotate.order, cfg.annotate.budget_per_round) == ("stored", None)
    judged, critique, handed = _hybrid_round(tmp_path, monkeypatch)
    assert _people(judged) == {"e1", "e4"}  # a candidate within the band of 1.0
    assert handed is None and "people_items" not in critique.report  # results.json as before
    # The band rule with order=uncertainty: the same items, the least certain first.
    (tmp_path / "feedback.db").unlink()
    judged, _, handed = _hybrid_round(tmp_path, monkeypatch, "annotate.order=uncertainty")
    assert _people(judged) == {"e1", "e4"} and handed == ["e4", "e1"]


def _model_accepts(tmp_path) -> int:
    """How many candidates the reward model accepted in round 1 of `_hybrid_round`'s store."""
    items = FeedbackStore(tmp_path / "feedback.db").judged_items("train", round_idx=1)
    return sum(accepted for item in items for j in item.judgments if j.annotator_kind == "reward"
               for accepted in j.decisions.values())


def test_below_target_reject_withholds_the_models_accepts_and_keeps_who_judges_what(tmp_path, monkeypatch):
    budget = ("annotate.budget_per_round=2", "annotate.order=uncertainty")
    judged, critique, handed = _hybrid_round(tmp_path, monkeypatch, *budget)
    # By default: e0's first, e1's first and both of e3's candidates score >= 0 (e2 and e5 go to people).
    assert _model_accepts(tmp_path) == 4 and "rm_accepts" not in critique.report
    (tmp_path / "feedback.db").unlink()
    # The stub's model has no held-out precision: below any target, so with `reject` it accepts nothing.
    rejecting, critique, handed_then = _hybrid_round(tmp_path, monkeypatch, *budget, "reward.below_target=reject")
    assert _model_accepts(tmp_path) == 0 and critique.report["rm_accepts"] is False
    assert rejecting == judged and handed_then == handed  # the same items to people, in the same order


@pytest.mark.parametrize(("setting", "precision", "accepts"), [
    ("threshold", None, True), ("threshold", 0.1, True), ("reject", None, False), ("reject", 0.89, False),
    ("reject", 0.9, True)])
def test_the_models_accepts_count_when_its_threshold_reached_the_target(setting, precision, accepts):
    cfg = load_config(REPO / "configs" / "demo_hybrid.yaml",
                      [f"reward.below_target={setting}", "reward.target_precision=0.9"])
    assert accepts_below_target(cfg, precision) is accepts


# ------------------------------------------------------------------ the annotation page


def test_lease_item_hands_items_out_by_priority_then_in_the_order_added(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", _sets())
        store.set_priorities(0, {"e4": 0.0, "e2": 1.0, "e5": 2.0, "unknown": 3.0})
        queue = AnnotationQueue(store)
        handed = [_lease(queue, f"person{i}") for i in range(6)]
        assert handed == ["e4", "e2", "e5", "e0", "e1", "e3"]
        assert queue.lease_item(0, "person6", 1, 60.0) is None


def _lease(queue, annotator):
    """The example id of the item the queue hands `annotator` next (round 0, one judgment per item)."""
    return queue.item(queue.lease_item(0, annotator, 1, 60.0).item_id)["example_id"]


def test_the_web_critic_writes_the_hand_out_order(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "critic.kind=person", "critic.wait=false", "annotate.order=random")
    with FeedbackStore(tmp_path / "feedback.db") as store:
        sets = _sets()
        store.add_candidate_sets(0, "train", sets)
        context = CritiqueContext(cfg, store, 0, {cs.example_id: cs for cs in sets}, _examples(), say=lambda _: None)
        assert not WebCritic(cfg).review(context).done  # nobody judged yet: stops, to be continued
        queue = AnnotationQueue(store)
        handed = [_lease(queue, f"p{i}") for i in range(6)]
        assert handed == order_items("random", IDS, cfg.seed, 0)
        # A model critic's choice (the order it hands over) wins over annotate.order, and only its items are
        # ranked first.
        assert [cs.example_id for cs in left_for_people(context, "bob", ["e3", "e1"])] == ["e3", "e1"]


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize("overrides, message", [
    (["annotate.budget_per_round=5"], "only critic.kind=hybrid"),
    (["critic.kind=reward", "annotate.budget_per_round=5"], "only critic.kind=hybrid"),
    (["critic.kind=person", "annotate.order=uncertainty"], "no reward model"),
    (["critic.kind=hybrid", "annotate.order=uncertainty", "reward.uncertainty=vibes"], "not one of ensemble"),
])
def test_nonsense_is_a_config_error(tmp_path, overrides, message):
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        check_critique_order(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["critic.kind=reward"], "round 0 has no reward model"),
    (["critic.kind=hybrid"], "round 0 has no reward model"),  # the band rule: nothing to fit a model on
    (["critic.kind=hybrid", "annotate.budget_per_round=5", "critic.people_kind=person"], "waits for every item"),
])
def test_round_0_without_people_needs_a_reward_model(overrides, message):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["reward.people_rounds=0", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_first_round(cfg)
    check_first_round(load_config(REPO / "configs" / "demo.yaml", overrides))  # people judge round 0: fine
    fixed = "critic.ui=terminal" if "critic.people_kind=person" in overrides else "annotate.budget_per_round=5"
    if cfg.critic.kind == "hybrid":  # a budget, judged in the terminal: fine
        check_first_round(load_config(REPO / "configs" / "demo.yaml", ["reward.people_rounds=0", *overrides, fixed]))


def test_round_0_on_a_budget_is_a_seeded_draw():
    cfg = load_config(REPO / "configs" / "demo_hybrid.yaml", ["reward.people_rounds=0", "annotate.budget_per_round=3",
                                                              "annotate.order=uncertainty"])
    drawn = first_round_draw(cfg, IDS)
    assert len(drawn) == 3 and drawn == order_items("random", IDS, cfg.seed, 0)[:3]  # no model to doubt: random
    stored = load_config(REPO / "configs" / "demo_hybrid.yaml", ["annotate.budget_per_round=3"])
    assert first_round_draw(stored, IDS) == IDS[:3]


def _first_round(tmp_path, monkeypatch, budget: int, accepted: set[str]):
    """Round 0 of a hybrid critic on a budget over IDS, people simulated as accepting the first candidate of
    `accepted` only, and a reward model fit that, like the real one, cannot be made on one-sided judgments.
    Returns (the items people judged, in the order judged; what the critic said; the fits attempted)."""
    cfg = _cfg(tmp_path, "reward.people_rounds=0", f"annotate.budget_per_round={budget}",
               "annotate.order=uncertainty")
    store = FeedbackStore(tmp_path / "feedback.db")
    sets = _sets()
    store.add_candidate_sets(0, "train", sets)
    fits = []

    def fit(cfg, upto_round, store, *_):
        items = store.judged_items("train", round_idx=0)
        labels = [accepted for item in items for j in item.judgments for accepted in j.decisions.values()]
        fits.append(len(items))
        if not any(labels):
            raise OneSidedJudgments(f"all {len(labels)} rejected")
        return None, {"threshold": 0.0, "heldout_precision": None, "heldout_recall": None, "heldout_roc_auc": None}

    monkeypatch.setattr(reward_critic, "reward_model_on", fit)
    monkeypatch.setattr(RewardDecider, "scores", lambda self, todo, _: [SCORES[cs.example_id] for cs in todo])
    monkeypatch.setitem(uncertainty.UNCERTAINTY, "ensemble", lambda cfg, rm, threshold, store, round_idx, todo, *_:
                        ([SCORES[cs.example_id] for cs in todo], [DOUBT[cs.example_id] for cs in todo]))
    said, judged = [], []

    def review(context, order=None):  # people: accept the first candidate of `accepted`'s items
        rows = [(e, [f"{e} reason 0"] if e in accepted else [], e not in accepted, None)
                for e in order or [] if e not in judged]
        judged.extend(e for e, *_ in rows)
        store.add_judgments(0, rows, "sim", "train", kind="simulated")
        return Critique()

    critic = HybridCritic(cfg)
    critic.people = SimpleNamespace(review=review)
    context = CritiqueContext(cfg, store, 0, {cs.example_id: cs for cs in sets}, _examples(), say=said.append)
    critic.review(context)
    return judged, said, fits


def test_round_0_on_a_budget_draws_more_until_a_reward_model_can_be_fitted(tmp_path, monkeypatch):
    draw = first_round_draw(_cfg(tmp_path, "annotate.budget_per_round=6", "annotate.order=uncertainty"), IDS)
    # People accept only the 4th item of the draw: budgets of 1 judge 4 items before the fit succeeds.
    judged, said, fits = _first_round(tmp_path, monkeypatch, budget=1, accepted={draw[3]})
    assert judged[:4] == draw[:4] and fits == [1, 2, 3, 4]
    assert len(said) == 3 and "people judge 1 more items of the draw (4 in all)" in said[-1]
    items = FeedbackStore(tmp_path / "feedback.db").judged_items("train", round_idx=0)
    assert sorted(len(item.judgments) for item in items) == [1] * len(IDS)  # the rest the model's, none twice
    assert {item.example_id for item in items if item.judgments[0].annotator_kind == "reward"} == set(draw[4:])
    # Nothing accepted anywhere: the draw runs out and the fit's error is raised.
    (tmp_path / "feedback.db").unlink()
    with pytest.raises(OneSidedJudgments):
        _first_round(tmp_path, monkeypatch, budget=4, accepted=set())


def test_a_negative_budget_or_an_empty_ensemble_fails_at_load():
    with pytest.raises(ConfigError, match="budget_per_round must be >= 0"):
        load_config(REPO / "configs" / "demo_hybrid.yaml", ["annotate.budget_per_round=-1"])
    with pytest.raises(ConfigError, match="ensemble_size must be >= 1"):
        load_config(REPO / "configs" / "demo_hybrid.yaml", ["reward.ensemble_size=0"])
    check_critique_order(load_config(REPO / "configs" / "demo_hybrid.yaml",
                                     ["annotate.budget_per_round=3", "annotate.order=uncertainty"]))


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_hybrid_run_with_a_budget_and_the_ensemble(tmp_path):
    """Tiny models: round 0 by people (simulated), round 1 people judge exactly 3 items, chosen by the
    ensemble's doubt, and the reward model the other 9."""
    from tests.test_loop import LOOP

    args = ["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *LOOP, "name=budget",
            "loop.num_rounds=2", "critic.kind=hybrid", "reward.people_rounds=1", "reward.num_epochs=1",
            "reward.batch_size=8", "annotate.budget_per_round=3", "annotate.order=uncertainty"]
    assert main(args) == 0
    run_dir = Path(tmp_path) / "runs" / "budget"
    results = json.loads((run_dir / "results.json").read_text())
    assert results[1]["human_judgments"] == 12 and "people_items" not in results[1]  # round 0: all people
    assert results[2]["human_judgments"] == 12 + 3 and results[2]["people_items"] == 3
    assert results[2]["rm_decided_items"] == 9


@pytest.mark.slow
def test_round_0_on_a_budget_people_judge_a_draw_and_its_reward_model_the_rest(tmp_path):
    """reward.people_rounds=0 with a budget (the human-effort curve of scripts/compare.py): in round 0 people
    (simulated) judge 4 of the 12 items, a reward model fitted on those 4 decides the other 8; round 1 reuses
    that model (no judgment by people came in between) and people judge 4 more, chosen by its doubt."""
    from tests.test_loop import LOOP

    args = ["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *LOOP, "name=budget0",
            "loop.num_rounds=2", "critic.kind=hybrid", "reward.people_rounds=0", "reward.num_epochs=1",
            "reward.batch_size=8", "annotate.budget_per_round=4", "annotate.order=uncertainty"]
    assert main(args) == 0
    run_dir = Path(tmp_path) / "runs" / "budget0"
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["human_judgments"] for r in results[1:]] == [4, 8]
    assert [r["judgments"] for r in results[1:]] == [12, 24]
    assert results[1]["rm_decided_items"] == 8 and results[2]["rm_decided_items"] == 8
    assert results[2]["people_items"] == 4
    store = FeedbackStore(run_dir / "feedback.db")
    people = {item.example_id for item in store.judged_items("train", round_idx=0)
              if any(j.annotator_kind == "simulated" for j in item.judgments)}
    cfg = load_config(run_dir / "config.yaml")
    assert people == set(first_round_draw(cfg, [s for s in store.unjudged_items(0, "nobody", "train")]))
    assert [p.name for p in sorted((run_dir / "reward").glob("round_*"))] == ["round_01"]  # fitted once


@pytest.mark.slow
def test_round_0_on_a_budget_of_one_judges_on_until_a_reward_model_can_be_fitted(tmp_path, capsys):
    """Tiny models, a budget of 1 item and half of the judged items held out: one judged item leaves nothing to
    calibrate on, so people judge a second item of the draw before the reward model decides the other 10; a run
    that stopped with an error before."""
    from tests.test_loop import LOOP

    args = ["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *LOOP, "name=budget1",
            "loop.num_rounds=1", "critic.kind=hybrid", "reward.people_rounds=0", "reward.num_epochs=1",
            "reward.batch_size=8", "annotate.budget_per_round=1", "annotate.order=uncertainty",
            "reward.heldout_fraction=0.5"]
    assert main(args) == 0
    results = json.loads((Path(tmp_path) / "runs" / "budget1" / "results.json").read_text())
    assert (results[1]["human_judgments"], results[1]["judgments"], results[1]["rm_decided_items"]) == (2, 12, 10)
    said = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "people judge 1 more items of the draw (2 in all)" in said

