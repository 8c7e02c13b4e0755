"""Selection-SFT: the training set as specified, the weighted loss, adapters-only training with the best epoch kept."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from illume.config import SampleConfig, TrainConfig
from illume.data.shapes import ShapesWorld
from illume.training import build_training_set, fine_tune, weighted_lm_loss


@pytest.fixture(scope="module")
def examples():
    return ShapesWorld(num_train_scenes=10, num_val_scenes=4).examples("train")


def test_training_set_dedups_adds_answer_rows_and_weights(examples):
    a, b = examples[0], examples[1]
    accepted = [(a.id, "there is a red circle"), (a.id, " there is a red circle "), (b.id, "the square is blue"),
                (a.id, "the circle is red")]
    rows = build_training_set(accepted, examples)
    rationale_rows = [r for r in rows if r.kind == "rationale"]
    answer_rows = [r for r in rows if r.kind == "answer"]
    assert [(r.example_id, r.target) for r in rationale_rows] == [
        (a.id, "there is a red circle"), (b.id, "the square is blue"), (a.id, "the circle is red")]
    assert rationale_rows[0].prompt == f"Q: {a.question} A: {a.answer}, seeing that"
    # every example without an accepted rationale gets one answer-only row, loss on the answer
    assert sorted(r.example_id for r in answer_rows) == sorted(e.id for e in examples[2:])
    assert all(r.target == next(e.answer for e in examples if e.id == r.example_id) for r in answer_rows)
    assert all(r.prompt.startswith("Q: ") and r.prompt.endswith(" A:") for r in answer_rows)
    # w = #answer-only rows / #rationale rows = 8 / 3
    assert all(r.weight == pytest.approx(8 / 3) for r in rationale_rows)
    assert all(r.weight == 1.0 for r in answer_rows)


def test_training_set_options_and_errors(examples):
    accepted = [(examples[0].id, "the circle is red")]
    rows = build_training_set(accepted, examples, num_answer_only_rows=3, rationale_weight=0.5, seed=1)
    assert sum(r.kind == "answer" for r in rows) == 3
    assert [r.weight for r in rows if r.kind == "rationale"] == [0.5]
    assert build_training_set(accepted, examples, 3, seed=1) == build_training_set(accepted, examples, 3, seed=1)
    with pytest.raises(KeyError, match="not in the train split"):
        build_training_set([("nope", "x")], examples)


def test_weighted_loss_equals_hand_computation():
    """Two rows, vocabulary 2, uniform logits: every target token costs ln 2.

    Row 0 has 2 targets (weight 1): mean CE = ln 2. Row 1 has 1 target (weight 3): mean CE = ln 2.
    Loss = (1 * ln 2 + 3 * ln 2) / 2 rows = 2 ln 2.
    """
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[-100, 1, 0, -100], [-100, -100, 1, -100]])
    loss = weighted_lm_loss(logits, labels, torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx(2 * math.log(2))
    # a confident correct row costs ~0 whatever its weight
    logits[1, 1, 1] = 30.0
    assert weighted_lm_loss(logits, labels, torch.tensor([1.0, 3.0])).item() == pytest.approx(math.log(2) / 2)


@pytest.mark.slow
def test_fine_tune_trains_adapters_only_and_keeps_the_best_epoch(tiny_vlm, examples, tmp_path):
    val = ShapesWorld(num_val_scenes=4).examples("val")
    rows = build_training_set([(examples[0].id, "there is a red circle on the left")], examples)
    before = {n: t.clone() for n, t in tiny_vlm.model.state_dict().items()}
    cfg = TrainConfig(num_epochs=2, batch_size=4, learning_rate=1e-2)
    result = fine_tune(tiny_vlm, rows, examples, val, cfg, SampleConfig(max_new_tokens=4), tmp_path / "round")
    after = tiny_vlm.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".adapter." in n for n in changed)
    assert len(result["epochs"]) == 2 and result["best"] in result["epochs"]
    assert result["best"]["cider"] == max(e["cider"] for e in result["epochs"])
    saved = load_file(str(tmp_path / "round" / "adapters.safetensors"))
    assert all(torch.equal(saved[n], after[n]) for n in saved)  # the kept epoch is what the model holds
    assert json.loads((tmp_path / "round" / "training.json").read_text())["num_rows"] == len(rows)
    assert not (tmp_path / "round" / "epochs").exists()  # the epochs' files are removed once one is kept


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_vlm):
    """`train.gradient_checkpointing` (HF's activation checkpointing of the LM blocks) with a frozen LM and
    trainable adapters: the adapters must still get gradients, equal to those without checkpointing."""
    from illume.collate import RowEncoder
    from illume.data.shapes import ShapesWorld

    examples = ShapesWorld(num_train_scenes=3).examples("train")
    encode = RowEncoder(tiny_vlm, {e.id: e for e in examples})
    batch = tiny_vlm.collate([encode(e.id, f"Q: {e.question} A: {e.answer}, seeing that", e.explanations[0])
                              for e in examples])
    model = tiny_vlm.model.train()  # checkpointing is only active in training mode
    model.image_prefix.dropout.p = 0.0  # the two passes must see the same network
    model.set_trainable(adapters=True)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_zero3_is_refused_only_by_what_cannot_run_partitioned():
    from illume.config import load_config
    from illume.training import check_zero_stage
    from reward.judge import JudgeCritic
    from tests.conftest import REPO

    zero2, zero3 = (str(REPO / "configs" / "deepspeed" / f"zero{n}.json") for n in (2, 3))
    check_zero_stage(None, "the AI judge")
    check_zero_stage(zero2, "the AI judge")
    with pytest.raises(NotImplementedError, match="ZeRO stage 3 is not supported by the AI judge .selection-SFT"):
        check_zero_stage(zero3, "the AI judge")
    JudgeCritic(load_config(REPO / "configs" / "demo_rlaif.yaml", [f"train.deepspeed={zero2}"]))
    with pytest.raises(NotImplementedError, match="the AI judge critic"):
        JudgeCritic(load_config(REPO / "configs" / "demo_rlaif.yaml", [f"train.deepspeed={zero3}"]))
