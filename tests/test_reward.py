"""The reward model: pairs from the store, the Bradley-Terry loss, training, scoring, metrics, `illume reward`."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from illume.config import RewardConfig, TrainConfig, load_config, save_config
from illume.data.records import Candidate, CandidateSet, Example
from illume.feedback.store import FeedbackStore
from reward.evaluate import (
    MIN_PLATT_PER_CLASS,
    accept_metrics,
    brier_score,
    calibrate_threshold,
    calibration_plot,
    evaluate_reward_model,
    expected_calibration_error,
    fit_platt,
    pairwise_accuracy,
    roc_auc,
    score_judged,
)
from reward.model import RewardModel, accept_probability, score
from reward.pairs import (
    PreferencePair,
    RewardDataError,
    calibration_split,
    judged_candidates,
    reward_feedback,
    split_by_example,
    to_preference_pairs,
)
from reward.train import bradley_terry_loss, fit_reward
from tests import test_deepspeed
from tests.conftest import REPO, TINY_MODEL

COLOURS = {"e1": (255, 0, 0), "e2": (0, 255, 0), "e3": (0, 0, 255), "e4": (255, 255, 0), "e5": (0, 255, 255)}


def example(example_id: str) -> Example:
    return Example(id=example_id, image=Image.new("RGB", (96, 96), COLOURS.get(example_id, (9, 9, 9))),
                   question=f"what colour is {example_id}?", answers=["red"],
                   explanations=[f"ref one {example_id}", f"ref two {example_id}"])


def prompt(example_id: str) -> str:
    return f"Q: what colour is {example_id}? A: red, seeing that"


def candidate_set(example_id: str, texts: list[str]) -> CandidateSet:
    return CandidateSet(example_id=example_id, answer="red", predicted_answer="red", prompt=prompt(example_id),
                        seed=1, candidates=[Candidate(text=t, temperature=0.3, seed=1, sample_idx=k, logprob=-1.0)
                                            for k, t in enumerate(texts)])


@pytest.fixture
def store(tmp_path):
    """Round 0: e1 [A, B, C]: alice accepts A, bob accepts A and B (B: accepted by one, rejected by the other);
    e2 [D, E]: alice says none fits; e3 [F, G]: alice accepts F, the reward model accepts G; e4: not judged.
    Round 1: e1 [A, C] again (same prompt): alice accepts A -> the pair (A, C) repeats and is stored once."""
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A", "B", "C"]), candidate_set("e2", ["D", "E"]),
                                              candidate_set("e3", ["F", "G"]), candidate_set("e4", ["H"])])
        store.add_candidate_sets(1, "train", [candidate_set("e1", ["A", "C"])])
        store.add_judgments(0, [("e1", ["A"], False, None), ("e2", [], True, None), ("e3", ["F"], False, None)],
                            "alice")
        store.add_judgments(0, [("e1", ["A", "B"], False, None)], "bob")
        store.add_judgments(0, [("e3", ["G"], False, None)], "reward:round0", kind="reward")
        store.add_judgments(1, [("e1", ["A"], False, None)], "alice")
        yield store


EXAMPLES = {example_id: example(example_id) for example_id in ("e1", "e2", "e3", "e4")}


def as_tuples(pairs: list[PreferencePair]) -> set[tuple]:
    return {(p.example_id, p.chosen, p.rejected, p.source) for p in pairs}


# ------------------------------------------------------------------ pairs


def test_pairs_accepted_by_anyone_count_as_accepted_and_none_fit_pairs_with_references(store):
    pairs = to_preference_pairs(store, EXAMPLES, aggregate="any")
    assert as_tuples(pairs) == {
        ("e1", "A", "C", "judged"), ("e1", "B", "C", "judged"),  # B: bob accepted, alice did not -> accepted
        ("e2", "ref one e2", "D", "reference"), ("e2", "ref two e2", "E", "reference"),  # candidate i, ref i % 2
        ("e3", "F", "G", "judged"),  # the reward model's accept of G does not count
    }
    assert len(pairs) == 5  # (e1, A, C) of round 1 is a duplicate of round 0's
    assert all(p.prompt == prompt(p.example_id) for p in pairs)
    assert {p.round_idx for p in pairs if p.example_id == "e1"} == {0}
    # By majority (the default), alice and bob tie on B: contested, so no pair has it on either side.
    assert as_tuples(to_preference_pairs(store, EXAMPLES)) == as_tuples(pairs) - {("e1", "B", "C", "judged")}


def test_pairs_without_reference_pairs_and_with_every_annotator(store):
    without_refs = to_preference_pairs(store, EXAMPLES, include_reference_pairs=False, aggregate="any")
    assert {p.source for p in without_refs} == {"judged"} and len(without_refs) == 3
    everyone = to_preference_pairs(store, EXAMPLES, include_reference_pairs=False, kinds=None, aggregate="any")
    assert ("e3", "F", "G", "judged") not in as_tuples(everyone)  # G is accepted too once "reward" counts
    only_round_1 = to_preference_pairs(store, EXAMPLES, upto_round=0, include_reference_pairs=False, kinds=None,
                                       aggregate="any")
    assert len(only_round_1) == 2


def test_judged_candidates_give_one_label_per_candidate_per_item(store):
    judged = judged_candidates(store, EXAMPLES, aggregate="any")
    assert [(e, t, a) for e, _, t, a in judged] == [
        ("e1", "A", True), ("e1", "B", True), ("e1", "C", False), ("e2", "D", False), ("e2", "E", False),
        ("e3", "F", True), ("e3", "G", False), ("e1", "A", True), ("e1", "C", False),
    ]
    assert [t for e, _, t, _ in judged_candidates(store, EXAMPLES, example_ids=["e2"])] == ["D", "E"]


def test_split_is_by_example_deterministic_and_independent_of_order():
    ids = [f"x{i}" for i in range(50)]
    train, heldout = split_by_example(ids, 0.2, seed=3)
    assert len(heldout) == 10 and not set(train) & set(heldout) and set(train) | set(heldout) == set(ids)
    assert split_by_example(list(reversed(ids)) + ids[:5], 0.2, seed=3) == (train, heldout)
    assert split_by_example(ids, 0.2, seed=4) != (train, heldout)
    assert split_by_example(["a", "b"], 0.01)[1] != [] and split_by_example(["a", "b"], 0.9)[0] != []
    assert split_by_example(ids, 0.0) == (sorted(ids), [])


def _feedback_accepting_in(tmp_path, ids: list[str], accepted_in: set[str]):
    """One round over `ids` ([A, B] each): alice accepts A where the example is in `accepted_in`, else none fits."""
    with FeedbackStore(tmp_path / f"split-{len(accepted_in)}-{min(accepted_in)}.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set(i, ["A", "B"]) for i in ids])
        store.add_judgments(0, [(i, ["A"], False, None) if i in accepted_in else (i, [], True, None) for i in ids],
                            "alice")
        return reward_feedback(store)


def test_calibration_split_holds_out_an_accepted_example_when_the_seeded_split_holds_none(tmp_path):
    ids = [f"x{i:02d}" for i in range(20)]
    train, heldout = split_by_example(ids, 0.2, seed=3)
    assert len(heldout) == 4
    three = set(train[:3])  # accepts only in train examples: the seeded split holds out rejects alone
    repaired_train, repaired_heldout = calibration_split(_feedback_accepting_in(tmp_path, ids, three), 0.2, seed=3)
    assert len(repaired_heldout) == 4 and sorted(repaired_train + repaired_heldout) == ids
    moved_in, moved_out = set(repaired_heldout) - set(heldout), set(heldout) - set(repaired_heldout)
    assert len(moved_in) == 1 and moved_in <= three and len(moved_out) == 1  # one swap, one accepted example in
    # The swap is the seeded order's: the accepted example held out first as the fraction grows comes in.
    grows = [split_by_example(ids, f / 20, seed=3)[1] for f in range(4, 20)]
    first_in = next(set(h) & three for h in grows if set(h) & three)
    assert moved_in == first_in
    assert moved_out == set(heldout) - set(split_by_example(ids, 3 / 20, seed=3)[1])  # the last held out leaves
    # Deterministic, and a split that held out an accepted example already is the seeded one.
    assert calibration_split(_feedback_accepting_in(tmp_path, ids, three), 0.2, seed=3) == (repaired_train,
                                                                                             repaired_heldout)
    held_one = {heldout[0], train[0]}
    assert calibration_split(_feedback_accepting_in(tmp_path, ids, held_one), 0.2, seed=3) == (train, heldout)
    # With one accepted example in all, holding it out would leave none to train on: the seeded split stays
    # (and the fit's label check says so).
    assert calibration_split(_feedback_accepting_in(tmp_path, ids, {train[0]}), 0.2, seed=3) == (train, heldout)


def test_no_judgments_only_accepts_or_only_rejects_are_clear_errors(tmp_path):
    with FeedbackStore(tmp_path / "a.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A", "B"]), candidate_set("e2", ["C"])])
        with pytest.raises(RewardDataError, match="no judgments in sqlite"):
            to_preference_pairs(store, EXAMPLES)
        store.add_judgments(0, [("e1", ["A", "B"], False, None), ("e2", ["C"], False, None)], "alice")
        with pytest.raises(RewardDataError, match="preference learning: both accepted and rejected rationales are needed.* are accepted"):
            to_preference_pairs(store, EXAMPLES)
        with pytest.raises(RewardDataError, match="no judgments in"):  # alice's judgments do not count
            to_preference_pairs(store, EXAMPLES, kinds={"reward"})
    with FeedbackStore(tmp_path / "b.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A", "B"])])
        store.add_judgments(0, [("e1", [], True, None)], "alice")
        with pytest.raises(RewardDataError, match="preference learning: both accepted and rejected rationales are needed.* are rejected"):
            to_preference_pairs(store, EXAMPLES)
        with pytest.raises(RewardDataError, match="not in the dataset"):
            to_preference_pairs(store, {})


def test_no_pairs_is_an_error(tmp_path):
    with FeedbackStore(tmp_path / "a.db") as store:  # accepts and rejects, but never in the same item
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A"]), candidate_set("e2", ["B"])])
        store.add_judgments(0, [("e1", ["A"], False, None), ("e2", [], True, None)], "alice")
        with pytest.raises(RewardDataError, match="no preference pairs"):
            to_preference_pairs(store, EXAMPLES, include_reference_pairs=False)
        assert len(to_preference_pairs(store, EXAMPLES)) == 1  # (reference, B)
    with pytest.raises(RewardDataError, match="no preference pairs"):
        fit_reward(None, [], [], EXAMPLES, RewardConfig(), tmp_path / "rm")


# ------------------------------------------------------------------ the loss


def test_bradley_terry_loss_equals_the_hand_computed_value():
    """r_c = [2, 0], r_r = [1, 1], margin 0.5, centring 0.1:
    r_c - r_r - m = [0.5, -1.5]; -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770,
    -log sigmoid(-1.5) = log(1 + e^1.5) = 1.7014133; mean = 1.0877451;
    (r_c + r_r)^2 = [9, 1], mean 5, x 0.1 = 0.5; loss = 1.5877451.
    Without margin and centring: mean(log(1 + e^-1), log(1 + e^1)) = (0.3132617 + 1.3132617) / 2 = 0.8132617."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert bradley_terry_loss(chosen, rejected, margin=0.5, center_coef=0.1).item() == pytest.approx(1.5877451)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.8132617)


@pytest.mark.parametrize("margin,center_coef", [(0.0, None), (0.0, 0.01), (0.7, 0.3)])
def test_bradley_terry_loss_equals_trls_reward_loss(margin, center_coef):
    """Runs TRL's own `trl.RewardTrainer.compute_loss` (the unbound function, TRL >= 1.0) on a stub model that
    returns fixed rewards for a [chosen; rejected] batch, with a stub trainer holding only what that function
    reads (args.center_rewards_coefficient, the accelerator's gathers, the metric buffers), and compares its
    loss with ours on the same rewards. What is compared is the loss arithmetic: sign conventions, the margin
    (TRL reads a per-pair `margin` column; we use one float) and the centring term; not TRL's data pipeline."""
    import trl

    chosen = torch.tensor([1.3, -0.2, 0.4, 2.0])
    rejected = torch.tensor([0.1, 0.5, -1.0, 2.5])
    rewards = torch.cat([chosen, rejected]).unsqueeze(-1)  # TRL's model output: (2B, 1) logits

    class StubModel(torch.nn.Module):
        def forward(self, **inputs):
            return SimpleNamespace(logits=rewards)

    identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub_trainer = SimpleNamespace(model=StubModel().train(), args=SimpleNamespace(
        center_rewards_coefficient=center_coef), accelerator=identity, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": __import__("collections").defaultdict(list)})
    inputs = {"input_ids": torch.ones(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3)}
    if margin:
        inputs["margin"] = torch.full((4,), margin)
    trl_loss = trl.RewardTrainer.compute_loss(stub_trainer, stub_trainer.model, inputs)
    ours = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center_coef or 0.0)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)


# ------------------------------------------------------------------ metrics


def test_roc_auc_matches_hand_examples():
    """scores [0.1, 0.4, 0.35, 0.8], labels [0, 0, 1, 1]: of the 4 (positive, negative) pairs, 3 are ordered
    right (0.35 < 0.4 is wrong) -> 0.75. Ties count half: scores [1, 1, 2], labels [0, 1, 1]: (1 vs 1) = 1/2,
    (2 vs 1) = 1 -> 0.75."""
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([1, 1, 2], [False, True, True]) == pytest.approx(0.75)
    assert roc_auc([3, 2, 1], [1, 0, 0]) == 1.0 and roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 2], [1, 1])


def test_calibrated_threshold_meets_its_target_precision_on_the_calibration_data():
    """Scores 1..10, accepted: 10, 9, 8, 6, 5, 2. Precision of 'score >= t' for t = 10..1: 1, 1, 1, 3/4,
    4/5, 5/6, 5/7, 5/8, 6/9, 6/10. The lowest t with precision >= 0.8 is 5; with >= 0.7 it is 4 (5/7)."""
    scores = [float(s) for s in range(1, 11)]
    labels = [s in (10, 9, 8, 6, 5, 2) for s in range(1, 11)]
    for target, expected in [(0.8, 5.0), (0.7, 4.0), (1.0, 8.0), (0.5, 1.0)]:
        threshold = calibrate_threshold(scores, labels, target)
        assert threshold == expected
        precision, recall = accept_metrics(scores, labels, threshold)
        assert precision >= target
    assert accept_metrics(scores, labels, 5.0) == (pytest.approx(5 / 6), pytest.approx(5 / 6))
    precision, recall = accept_metrics(scores, labels, 11.0)
    assert math.isnan(precision) and recall == 0.0


def test_unreachable_precision_warns_and_takes_the_most_precise_threshold():
    with pytest.warns(RuntimeWarning, match="no reward threshold reaches precision 0.9"):
        assert calibrate_threshold([3.0, 2.0, 1.0], [False, True, True], 0.9) == 1.0  # 2/3 at t=1 and t=2
    with pytest.raises(ValueError, match="at least one accepted"):
        calibrate_threshold([1.0, 2.0], [False, False], 0.9)


def test_calibration_plot_is_a_png(tmp_path):
    path = calibration_plot([0.1, 0.5, 0.9, 1.2, -0.3], [0, 1, 1, 1, 0], tmp_path / "c.png", threshold=0.5,
                            target_precision=0.9, platt=(2.0, -0.5))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_platt_scaling_recovers_the_logistic_model_its_labels_were_drawn_from():
    """20,000 scores ~ N(0.5, 2), each accepted with probability sigmoid(1.5 s - 0.7): the fit is within 0.08
    of (1.5, -0.7). Their standard errors at this size are 0.021 and 0.023 (the inverse Fisher information
    at the truth), so 0.08 is about 3.5 of them; Platt's targets move the optimum by O(1/N) only."""
    rng = random.Random(0)
    scores = [rng.gauss(0.5, 2.0) for _ in range(20_000)]
    labels = [rng.random() < p for p in accept_probability(scores, (1.5, -0.7))]
    a, b = fit_platt(scores, labels)
    assert a == pytest.approx(1.5, abs=0.08) and b == pytest.approx(-0.7, abs=0.08)
    shifted = fit_platt([10 * s + 300 for s in scores], labels)  # any reward scale: a / 10, b - 30 a
    assert shifted == pytest.approx((a / 10, b - 30 * a), rel=1e-6)


def test_platt_scaling_is_the_maximum_likelihood_fit_on_platts_targets():
    """At the optimum the log-likelihood's gradient is zero: sum(p_i - t_i) = 0 and sum((p_i - t_i) s_i) = 0,
    with t = (N+ + 1) / (N+ + 2) = 7/8 for the 6 accepted and 1 / (N- + 2) = 1/8 for the 6 rejected. Scores
    that separate the labels perfectly still give finite (a, b), and the probability rises with the score."""
    scores = [0.3, -1.2, 2.5, 0.9, -0.4, 1.7, 0.1, -2.0, 1.1, 0.6, -0.8, 3.0]
    labels = [True, False, True, False, False, True, True, False, True, False, False, True]
    platt = fit_platt(scores, labels)
    targets = [7 / 8 if y else 1 / 8 for y in labels]
    residuals = [p - t for p, t in zip(accept_probability(scores, platt), targets)]
    assert sum(residuals) == pytest.approx(0, abs=1e-9)
    assert sum(r * s for r, s in zip(residuals, scores)) == pytest.approx(0, abs=1e-9)
    separated = fit_platt(list(range(10)), [k >= 5 for k in range(10)])
    assert all(math.isfinite(x) for x in separated) and separated[0] > 0
    probabilities = accept_probability([-5.0, 0.0, 4.5, 9.0, 50.0], separated)
    assert probabilities == sorted(probabilities) and 0 < probabilities[0] and probabilities[-1] <= 1


def test_platt_scaling_refuses_too_few_judgments_of_a_kind_and_constant_scores():
    few = MIN_PLATT_PER_CLASS - 1
    with pytest.raises(ValueError, match=f"at least {MIN_PLATT_PER_CLASS} accepted .* got {few} and 20"):
        fit_platt([float(k) for k in range(few + 20)], [k < few for k in range(few + 20)])
    with pytest.raises(ValueError, match="got 0 and 12"):
        fit_platt([float(k) for k in range(12)], [False] * 12)
    with pytest.raises(ValueError, match="all 12 held-out candidates have the same score"):
        fit_platt([0.5] * 12, [k % 2 == 0 for k in range(12)])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        fit_platt([1.0, 2.0, 3.0], [True, False])


def test_brier_score_and_ece_equal_the_hand_computed_values():
    """p = [0.1, 0.15, 0.8, 0.85], y = [0, 1, 1, 1]. Brier: (0.01 + 0.7225 + 0.04 + 0.0225) / 4 = 0.19875.
    ECE, 10 bins: [0.1, 0.2) holds 0.1 and 0.15 (1 accepted, 0.25 predicted): 2/4 * |1/2 - 0.125| = 0.1875;
    [0.8, 0.9) holds 0.8 and 0.85 (2 accepted, 1.65 predicted): 2/4 * |1 - 0.825| = 0.0875; sum 0.275."""
    probabilities, labels = [0.1, 0.15, 0.8, 0.85], [False, True, True, True]
    assert brier_score(probabilities, labels) == pytest.approx(0.19875)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.275)
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0  # p = 1 falls in the last bin


# ------------------------------------------------------------------ the model


def _pairs(n: int = 8) -> list[PreferencePair]:
    ids = ["e1", "e2", "e3", "e4"]
    return [PreferencePair(ids[i % 4], prompt(ids[i % 4]), f"there is a red circle {i}", f"the sky {i}", 0)
            for i in range(n)]


def test_training_changes_head_and_adapters_but_not_the_frozen_backbone(tiny_vlm, tmp_path):
    before = {name: p.detach().clone() for name, p in tiny_vlm.model.named_parameters()}
    buffers = {name: b.clone() for name, b in tiny_vlm.model.named_buffers()}
    cfg = RewardConfig(num_epochs=2, batch_size=4, learning_rate=1e-2, center_coef=0.01)
    rm, metrics = fit_reward(tiny_vlm, _pairs(), _pairs(4), EXAMPLES, cfg, tmp_path / "rm")
    assert rm.backbone is not tiny_vlm.model
    trained = dict(rm.backbone.named_parameters())
    adapters = [n for n in before if ".adapter." in n]
    assert adapters and all(not torch.equal(before[n], trained[n]) for n in adapters if n.endswith("weight"))
    frozen = [n for n in before if ".adapter." not in n]
    assert all(torch.equal(before[n], trained[n]) for n in frozen)
    assert all(torch.equal(buffers[n], b) for n, b in rm.backbone.named_buffers())  # BatchNorm stats too
    assert all(torch.equal(before[n], p) for n, p in tiny_vlm.model.named_parameters())  # the caller's model
    head_init = RewardModel(tiny_vlm, seed=cfg.seed).head.weight
    assert not torch.equal(head_init, rm.head.weight)
    assert metrics["losses"] and all(math.isfinite(x) for x in metrics["losses"])
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["num_train_pairs"] == 8
    assert metrics["train_pairwise_accuracy"] >= 0.75  # 8 easy pairs, 4 steps at lr 1e-2
    for name in ("backbone.safetensors", "head.safetensors", "reward_model.json", "training.json"):
        assert (tmp_path / "rm" / name).is_file()


def test_save_load_round_trip_and_batched_scoring(tiny_vlm, tmp_path):
    rm = RewardModel(tiny_vlm, seed=1)
    with torch.no_grad():
        for name, p in rm.backbone.named_parameters():
            if ".adapter." in name:
                p.add_(0.05 * torch.randn_like(p))
    rm.threshold = 0.25
    items = [(EXAMPLES["e1"], prompt("e1"), ["a", "b b", "c c c"]), (EXAMPLES["e2"], prompt("e2"), ["d"]),
             (EXAMPLES["e3"], prompt("e3"), ["e e", "f"])]
    calls = []
    encode = rm.backbone.encode_images
    rm.backbone.encode_images = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    batched = score(rm, items, batch_size=2)
    assert sum(calls) == 3  # each item's image once, although items span batches
    del rm.backbone.encode_images
    one_by_one = [[score(rm, [(e, p, [t])], batch_size=1)[0][0] for t in texts] for e, p, texts in items]
    assert [len(s) for s in batched] == [3, 1, 2]
    assert torch.allclose(torch.tensor(sum(batched, [])), torch.tensor(sum(one_by_one, [])), atol=1e-5)
    rm.save(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert config["threshold"] == 0.25 and config["hidden_size"] == 32
    loaded = RewardModel.load(tmp_path / "rm", tiny_vlm)
    assert loaded.threshold == 0.25 and loaded.pooling == "mean"
    assert torch.allclose(torch.tensor(sum(score(loaded, items), [])), torch.tensor(sum(batched, [])), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_does_not_change_the_reward(tiny_vlm, pooling):
    rm = RewardModel(tiny_vlm, pooling=pooling).eval()
    ids, start = rm.row_ids(prompt("e1"), "a red circle")
    assert ids[start - 1] == rm.vlm.text_ids(prompt("e1"))[-1] and ids[-1] == rm.vlm.eos_token_id
    ids, start = torch.tensor([ids]), torch.tensor([start])
    pixels = rm.vlm.pixel_values([EXAMPLES["e1"].image])
    alone = rm(ids, torch.ones_like(ids), pixel_values=pixels, rationale_start=start)
    padded_ids = torch.cat([ids, torch.full((1, 3), rm.vlm.pad_token_id)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], 1)
    padded = rm(padded_ids, mask, pixel_values=pixels, rationale_start=start)
    assert torch.allclose(alone, padded, atol=1e-5)


def test_mean_pooling_needs_the_rationale_start(tiny_vlm):
    rm = RewardModel(tiny_vlm)
    ids = torch.tensor([rm.row_ids(prompt("e1"), "a red circle")[0]])
    with pytest.raises(ValueError, match="rationale_start"):
        rm(ids, torch.ones_like(ids), pixel_values=rm.vlm.pixel_values([EXAMPLES["e1"].image]))
    with pytest.raises(ValueError, match="pooling must be one of"):
        RewardModel(tiny_vlm, pooling="max")


def test_evaluate_writes_report_and_plot_and_sets_the_threshold(tiny_vlm, tmp_path, store):
    rm = RewardModel(tiny_vlm)
    pairs = to_preference_pairs(store, EXAMPLES, aggregate="any")
    judged = judged_candidates(store, EXAMPLES, aggregate="any")
    report = evaluate_reward_model(rm, pairs, judged, EXAMPLES, 0.9, tmp_path / "eval")
    assert (tmp_path / "eval" / "calibration.png").is_file()
    assert json.loads((tmp_path / "eval" / "reward_eval.json").read_text()) == report
    assert report["pairwise_accuracy"] == pytest.approx(pairwise_accuracy(rm, pairs, EXAMPLES))
    assert report["num_pairs"] == 5 and report["num_pairs_reference"] == 2 and report["num_candidates"] == 9
    assert rm.threshold == report["threshold"] and 0.0 <= report["roc_auc"] <= 1.0
    # 4 of the 9 held-out candidates accepted: too few for an accept probability, and the report says why
    assert report["num_accepted"] == 4 and rm.platt is None and report["platt_a"] is None
    assert report["brier"] is None and report["brier_crossfit"] is None
    assert f"at least {MIN_PLATT_PER_CLASS} accepted" in report["probability_unavailable"]
    assert report["brier_base_rate"] == pytest.approx(4 / 9 * 5 / 9)
    with pytest.raises(RewardDataError, match="need both accepted and rejected"):
        evaluate_reward_model(rm, pairs, [j for j in judged if j[3]], EXAMPLES, 0.9, tmp_path / "eval")


def test_evaluate_fits_the_accept_probability_and_save_load_keeps_it(tiny_vlm, tmp_path):
    """24 examples, each with one accepted and two rejected candidates: Platt's (a, b) are fitted on the 72
    judgments, the report's Brier score and ECE are those of sigmoid(a * reward + b) against the labels,
    the 2-fold cross-fit is measured, and (a, b) survive save and load; a file written before they were kept
    loads without them."""
    examples = {f"p{k}": Example(f"p{k}", Image.new("RGB", (96, 96), (10 * k, 255 - 10 * k, 99)),
                                 "what colour is it?", ["red"], ["it is red"]) for k in range(24)}
    judged = [(example_id, "Q: what colour is it? A: red, seeing that", text, text == "it is red")
              for example_id in examples for text in ("it is red", "the sky is blue", f"a dog {example_id}")]
    rm = RewardModel(tiny_vlm, seed=3)
    report = evaluate_reward_model(rm, [], judged, examples, 0.5, tmp_path / "eval")
    scores, labels = score_judged(rm, judged, examples), [row[3] for row in judged]
    assert rm.platt == (report["platt_a"], report["platt_b"]) == pytest.approx(fit_platt(scores, labels))
    assert report["probability_unavailable"] is None
    probabilities = accept_probability(scores, rm.platt)
    assert report["brier"] == pytest.approx(brier_score(probabilities, labels))
    assert report["ece"] == pytest.approx(expected_calibration_error(probabilities, labels))
    assert report["brier_base_rate"] == pytest.approx(1 / 3 * 2 / 3)
    assert 0 <= report["brier_crossfit"] <= 1 and 0 <= report["ece_crossfit"] <= 1
    rm.save(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["platt"] == {
        "a": report["platt_a"], "b": report["platt_b"]}
    assert RewardModel.load(tmp_path / "rm", tiny_vlm).platt == rm.platt
    config = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    del config["platt"]  # as written before (a, b) were kept
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps(config))
    old = RewardModel.load(tmp_path / "rm", tiny_vlm)
    assert old.platt is None and old.threshold == rm.threshold


# ------------------------------------------------------------------ the command


def _run_dir(tmp_path, tiny_vlm, judge: bool = True):
    """A run directory of the tiny shapes world: config.yaml (model.path = a saved tiny VLM) and a store whose
    round-0 items each have an accepted candidate (a reference) and rejected ones."""
    from illume.data.datasets import load_split

    tiny_vlm.save(tmp_path / "base")
    overrides = TINY_MODEL + [
        f"model.path={tmp_path / 'base'}", "data.shapes.num_train_scenes=10", f"output_dir={tmp_path}",
        "name=run", "reward.num_epochs=1", "reward.batch_size=8", "reward.heldout_fraction=0.3",
        "reward.target_precision=0.5",
    ]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    train = load_split(cfg.data, "train")
    with FeedbackStore(run_dir / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [
            candidate_set(e.id, [e.explanations[0], "the sky is blue", "two dogs"]) for e in train])
        if judge:
            store.add_judgments(0, [(e.id, [e.explanations[0]], False, None) for e in train], "simulated:x")
    return run_dir


@pytest.mark.slow
def test_reward_train_and_eval_commands_write_their_files(tiny_vlm, tmp_path, capsys):
    from illume.cli import main

    run_dir = _run_dir(tmp_path, tiny_vlm)
    assert main(["reward", "train", str(run_dir), "--round", "0"]) == 0
    out = capsys.readouterr().out
    assert "pairwise accuracy" in out and "ROC-AUC" in out
    reward_dir = run_dir / "reward"
    for name in ("backbone.safetensors", "head.safetensors", "reward_model.json", "split.json",
                 "training.json", "reward_eval.json", "calibration.png"):
        assert (reward_dir / name).is_file(), name
    report = json.loads((reward_dir / "reward_eval.json").read_text())
    split = json.loads((reward_dir / "split.json").read_text())
    assert len(split["heldout_example_ids"]) == 3 and split["upto_round"] == 0
    assert report["num_examples"] == 3 and report["num_candidates"] == 9
    assert json.loads((reward_dir / "reward_model.json").read_text())["threshold"] == report["threshold"]
    precision, _ = report["precision"], report["recall"]
    assert precision >= 0.5  # the target it was calibrated to, on the same held-out judgments
    saved = json.loads((reward_dir / "reward_model.json").read_text())
    assert saved["platt"] is None and "got 3 and 6" in report["probability_unavailable"]  # 3 of 9 accepted
    del saved["threshold"], saved["platt"]  # as a file written before the eval's calibration was kept
    (reward_dir / "reward_model.json").write_text(json.dumps(saved))
    assert main(["reward", "eval", str(run_dir)]) == 0
    assert "Platt scaling needs at least" in capsys.readouterr().out
    assert json.loads((reward_dir / "reward_eval.json").read_text())["roc_auc"] == pytest.approx(report["roc_auc"])
    resaved = json.loads((reward_dir / "reward_model.json").read_text())  # eval saved what it calibrated
    assert resaved["threshold"] == pytest.approx(report["threshold"]) and resaved["platt"] is None


def test_reward_train_on_a_run_without_judgments_says_so(tiny_vlm, tmp_path, capsys):
    from illume.cli import main

    run_dir = _run_dir(tmp_path, tiny_vlm, judge=False)
    assert main(["reward", "train", str(run_dir)]) == 2
    assert "no judgments in" in capsys.readouterr().err


# ------------------------------------------------------------------ DeepSpeed


deepspeed_cpu = test_deepspeed.deepspeed_cpu  # the single-process CPU DeepSpeed fixture


@pytest.mark.slow
def test_zero2_reward_training_on_cpu(deepspeed_cpu, tiny_vlm, tmp_path, monkeypatch):
    from reward import train

    trainers = []

    class RecordingTrainer(train.BradleyTerryTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(train, "BradleyTerryTrainer", RecordingTrainer)
    cfg = RewardConfig(num_epochs=1, batch_size=4, learning_rate=1e-2)
    rm, metrics = train.fit_reward(tiny_vlm, _pairs(), [], EXAMPLES, cfg, tmp_path / "rm",
                                   train=TrainConfig(deepspeed=str(test_deepspeed.ZERO2)))
    (trainer,) = trainers
    try:
        assert isinstance(trainer.model_wrapped, deepspeed_cpu.DeepSpeedEngine)
        assert trainer.model_wrapped.zero_optimization_stage() == 2 and trainer.model_wrapped.module is rm
        assert trainer.state.global_step == 2
    finally:
        trainers.clear()
        del trainer
    assert all(math.isfinite(x) for x in metrics["losses"])
    assert torch.allclose(RewardModel.load(tmp_path / "rm", tiny_vlm).head.weight, rm.head.weight)
    # ZeRO-3 (one process here; two in tests/test_sharded.py): the model ends whole, with nothing of DeepSpeed left.
    rm3, _ = train.fit_reward(tiny_vlm, _pairs(), [], EXAMPLES, cfg, tmp_path / "rm3",
                              train=TrainConfig(deepspeed=str(test_deepspeed.ZERO3)))
    assert not any(hasattr(p, "ds_id") for p in rm3.parameters())
    assert all(p.numel() > 0 for p in rm3.parameters())
    torch.testing.assert_close(RewardModel.load(tmp_path / "rm3", tiny_vlm).head.weight, rm3.head.weight)
