"""DPO and KTO: loss parity with TRL, training moves the margin, the reference stays the round's start,
clear errors on unusable feedback, the loop's `policy.kind`, and `illume dpo|kto` on a store or a dataset."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from illume.config import DPOPolicyConfig, KTOPolicyConfig, PolicyConfig, load_config
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import PreferencePair
from policies.data import PolicyDataError, UnpairedRow, store_pairs, store_unpaired_rows
from policies.dpo import REFERENCE_FILE, train_dpo
from policies.kto import mismatched_completions
from policies.losses import dpo_losses, kto_losses, sequence_logps
from policies.reference import reference_logps
from tests.conftest import REPO, TINY_MODEL
from tests.test_reward import EXAMPLES, _run_dir, candidate_set, example

# ------------------------------------------------------------------ parity with TRL

VOCAB, LENGTH, PAIRS = 11, 7, 3


def _batch(num_rows: int, seed: int):
    """Random token rows with a prompt part, a completion part and right padding, and a logits function."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (num_rows, LENGTH), generator=generator)
    completion_mask = torch.zeros(num_rows, LENGTH, dtype=torch.long)
    attention_mask = torch.zeros(num_rows, LENGTH, dtype=torch.long)
    for row in range(num_rows):
        prompt_len, completion_len = 2 + row % 2, 1 + (row * 5) % 3
        completion_mask[row, prompt_len:prompt_len + completion_len] = 1
        attention_mask[row, :prompt_len + completion_len] = 1
    return input_ids, attention_mask, completion_mask


TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7))


def _logits(input_ids: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in LM: the logits of a position depend on its token (same for TRL and us)."""
    return TABLE[input_ids]


class FusedHeadStub(torch.nn.Module):
    """What TRL 1.16's fused LM head returns: per-token log-probs of the labels, zero where the label is -100."""

    def forward(self, input_ids, labels, **kwargs):
        targets = labels[:, 1:]
        logps = _logits(input_ids)[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0]
        logps = logps * (targets != -100)
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trl_stub(**attributes) -> SimpleNamespace:
    identity = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(model=FusedHeadStub().train(), accelerator=identity, aux_loss_enabled=False,
                           precompute_ref_logps=True, _total_train_tokens=0, _tp_size=1,
                           _metrics=defaultdict(lambda: defaultdict(list)), args=SimpleNamespace(), **attributes)


def _our_logps(input_ids, completion_mask):
    return sequence_logps(_logits(input_ids), input_ids.masked_fill(completion_mask == 0, -100))


@pytest.mark.parametrize("loss_type,label_smoothing,sft_weight", [
    ("sigmoid", 0.0, 0.0), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0), ("robust", 0.0, 0.0), ("robust", 0.2, 0.0),
    ("sigmoid", 0.0, 0.5)])
def test_dpo_loss_equals_trls_on_identical_log_probs(loss_type, label_smoothing, sft_weight):
    """Runs TRL 1.16's own `DPOTrainer._compute_loss` (unbound) with precomputed reference log-probs on a stub
    fused-head model, and our `sequence_logps` + `dpo_losses` on the same logits: the losses must agree.
    This checks the shift/masking of completion log-probs, the loss arithmetic, IPO's per-token averaging and
    TRL's "sft" term; not TRL's data pipeline."""
    import trl

    input_ids, attention_mask, completion_mask = _batch(2 * PAIRS, seed=1)
    ref_chosen, ref_rejected = torch.randn(PAIRS) - 8, torch.randn(PAIRS) - 8
    loss_types, weights = [loss_type] + (["sft"] if sft_weight else []), [1.0] + ([sft_weight] if sft_weight else [])
    beta = 0.3
    stub = _trl_stub(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights,
                     beta=beta, label_smoothing=label_smoothing, use_weighting=False)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    trl_loss = trl.DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)

    logps, lengths = _our_logps(input_ids, completion_mask)
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    ours = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, loss_type, beta, label_smoothing,
                      chosen_lengths, rejected_lengths).mean()
    if sft_weight:
        ours = ours + sft_weight * (-chosen.sum() / chosen_lengths.sum())
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)


def test_cdpo_label_smoothing_is_the_hand_formula():
    """TRL >= 1.0 ignores label_smoothing for sigmoid; ours is conservative DPO: a hand value."""
    delta = torch.tensor([2.0])  # chosen log-ratio 2, rejected 0
    loss = dpo_losses(torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), "sigmoid",
                      beta=0.5, label_smoothing=0.1)
    expected = -0.9 * torch.nn.functional.logsigmoid(0.5 * delta) - 0.1 * torch.nn.functional.logsigmoid(-0.5 * delta)
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_losses(delta, delta, delta, delta, "nope")


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.25)])
def test_kto_loss_equals_trls_on_identical_log_probs(weights):
    """TRL 1.16's own `KTOTrainer._compute_loss` with precomputed reference log-probs and the KL reference
    point from mismatched completions, vs our `kto_losses` with the same KL estimate."""
    import trl

    rows = 6
    input_ids, attention_mask, completion_mask = _batch(rows, seed=2)
    kl_ids, kl_attention, kl_completion = _batch(rows, seed=3)
    labels = torch.tensor([True, False, False, True, False, False])
    ref_logps, ref_kl_logps = torch.randn(rows) - 6, torch.randn(rows) - 9
    stub = _trl_stub(calculate_KL=True, loss_type="kto", beta=0.2, desirable_weight=weights[0],
                     undesirable_weight=weights[1])
    stub._compute_kl_logps = partial(trl.KTOTrainer._compute_kl_logps, stub)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
              "label": labels, "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps, "KL_input_ids": kl_ids,
              "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion}
    trl_loss = trl.KTOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)

    logps, _ = _our_logps(input_ids, completion_mask)
    kl_logps, _ = _our_logps(kl_ids, kl_completion)
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0)
    ours = kto_losses(logps, ref_logps, labels, kl, 0.2, *weights).nanmean()
    assert kl.item() > 0  # the test exercises a non-trivial reference point
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)


def test_mismatched_completions_never_borrow_their_own():
    rows = [UnpairedRow(f"e{i}", "p", f"text {i}", i % 2 == 0) for i in range(7)]
    borrowed = mismatched_completions(rows, seed=3)
    assert sorted(borrowed) == sorted(r.completion for r in rows)
    assert all(b != r.completion for b, r in zip(borrowed, rows))


# ------------------------------------------------------------------ training on a toy set


def _toy_pairs() -> tuple[list[PreferencePair], dict]:
    """Chosen: the example's first reference; rejected: an unrelated sentence. 4 examples x 2 pairs."""
    examples = {k: example(k) for k in ("e1", "e2", "e3", "e4")}
    pairs = [PreferencePair(e.id, f"Q: {e.question} A: red, seeing that", e.explanations[0], bad, 0)
             for e in examples.values() for bad in ("the sky is blue", "two dogs")]
    return pairs, examples


def _train_cfg(**changes):
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_MODEL + ["train.batch_size=4", "train.num_epochs=3",
                                                                   "sample.max_new_tokens=4"])
    return cfg, cfg.train.__class__(**{**cfg.train.__dict__, **changes})


def _margins(vlm, pairs, examples) -> torch.Tensor:
    from illume.collate import RowEncoder

    encode = RowEncoder(vlm, examples)
    rows = [encode(p.example_id, p.prompt, t) for p in pairs for t in (p.chosen, p.rejected)]
    logps = reference_logps(vlm.model, rows, vlm.collate, 8, torch.device("cpu"))
    return logps[0::2] - logps[1::2]


@pytest.mark.slow
def test_dpo_training_grows_the_margin_and_keeps_the_reference_of_the_round_start(tiny_vlm, tmp_path):
    """On a toy set the chosen-minus-rejected log-prob margin grows; the reference log-probs used throughout
    are those of the model as it was before the round, recomputed afterwards from a snapshot of its weights;
    only adapters change."""
    pairs, examples = _toy_pairs()
    cfg, train_cfg = _train_cfg(learning_rate=3e-2)
    snapshot = copy.deepcopy(tiny_vlm)
    frozen_before = {n: p.clone() for n, p in tiny_vlm.model.named_parameters() if not p.requires_grad}
    before = _margins(tiny_vlm, pairs, examples)
    policy = PolicyConfig(kind="dpo", dpo=DPOPolicyConfig(beta=0.5, answer_weight=0.0))  # DPO's loss alone (tests/test_answer_rows.py)
    result = train_dpo(tiny_vlm, pairs, examples, policy, train_cfg, tmp_path / "dpo")
    after = _margins(tiny_vlm, pairs, examples)
    assert after.mean() > before.mean() + 1.0, (before, after)
    assert result.training["num_pairs"] == len(pairs) and len(result.trained.epoch_weights) == 3

    used = load_file(str(tmp_path / "dpo" / REFERENCE_FILE))
    from illume.collate import RowEncoder

    encode = RowEncoder(snapshot, examples)
    rows = [encode(p.example_id, p.prompt, p.chosen) for p in pairs]
    rows += [encode(p.example_id, p.prompt, p.rejected) for p in pairs]
    recomputed = reference_logps(snapshot.model, rows, snapshot.collate, 8, torch.device("cpu"))
    torch.testing.assert_close(torch.cat([used["chosen"], used["rejected"]]), recomputed)
    trained = reference_logps(tiny_vlm.model, rows, tiny_vlm.collate, 8, torch.device("cpu"))
    assert not torch.allclose(trained, recomputed)  # the policy moved; the reference did not
    for name, parameter in tiny_vlm.model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name


@pytest.mark.slow
def test_kto_training_raises_accepted_and_lowers_rejected_log_probs(tiny_vlm, tmp_path):
    from policies.kto import train_kto

    pairs, examples = _toy_pairs()
    rows = [UnpairedRow(p.example_id, p.prompt, p.chosen, True) for p in pairs[::2]]
    rows += [UnpairedRow(p.example_id, p.prompt, p.rejected, False) for p in pairs]
    cfg, train_cfg = _train_cfg(learning_rate=3e-2)
    before = _margins(tiny_vlm, pairs, examples)
    result = train_kto(tiny_vlm, rows, examples,
                       PolicyConfig(kind="kto", kto=KTOPolicyConfig(beta=0.5, answer_weight=0.0)), train_cfg,
                       tmp_path / "kto")  # KTO's loss alone (the answer rows: tests/test_answer_rows.py)
    after = _margins(tiny_vlm, pairs, examples)
    assert after.mean() > before.mean() + 1.0, (before, after)
    assert result.training["undesirable_weight"] == pytest.approx(4 / 8)  # 4 accepted, 8 rejected


# ------------------------------------------------------------------ feedback that cannot be used


def test_a_store_without_pairs_is_a_clear_error(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A", "B"]), candidate_set("e2", ["C"])])
        with pytest.raises(PolicyDataError, match="DPO needs preference pairs: no judgments in"):
            store_pairs(store, EXAMPLES)
        store.add_judgments(0, [("e1", ["A", "B"], False, None), ("e2", ["C"], False, None)], "alice")
        with pytest.raises(PolicyDataError, match="DPO needs preference pairs.*all 3 .* are accepted"):
            store_pairs(store, EXAMPLES)
        with pytest.raises(PolicyDataError, match="KTO needs judged rationales: both accepted and rejected rationales are needed, but all 3 .* are accepted"):
            store_unpaired_rows(store, EXAMPLES)
    with FeedbackStore(tmp_path / "split.db") as store:
        # accepted and rejected candidates exist, but never in the same item: no pair, KTO still works
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A"]), candidate_set("e2", ["C"])])
        store.add_judgments(0, [("e1", ["A"], False, None), ("e2", [], True, None)], "alice")
        with pytest.raises(PolicyDataError, match="no preference pairs"):
            store_pairs(store, EXAMPLES)
        assert len(store_pairs(store, EXAMPLES, reference_as_chosen=True)) == 1
        rows = store_unpaired_rows(store, EXAMPLES)
        assert {(r.example_id, r.completion, r.accepted) for r in rows} == {("e1", "A", True), ("e2", "C", False)}


def test_pairs_of_the_latest_round_only(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A", "B"])])
        store.add_candidate_sets(1, "train", [candidate_set("e2", ["C", "D"])])
        store.add_judgments(0, [("e1", ["A"], False, None)], "alice")
        store.add_judgments(1, [("e2", ["D"], False, None)], "alice")
        everything = store_pairs(store, EXAMPLES, upto_round=1)
        latest = store_pairs(store, EXAMPLES, upto_round=1, from_round=1)
    assert {(p.chosen, p.rejected) for p in everything} == {("A", "B"), ("D", "C")}
    assert {(p.chosen, p.rejected) for p in latest} == {("D", "C")}


# ------------------------------------------------------------------ the loop and the commands


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_the_loop_runs_a_preference_policy_each_round(kind, tmp_path):
    from illume.cli import main
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path) + [f"policy.kind={kind}", "loop.num_rounds=2", "train.num_epochs=1",
                                            "critic.threshold=0.3", "sample.max_new_tokens=8", "name=pol"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    results = json.loads((tmp_path / "runs" / "pol" / "results.json").read_text())
    trained = [r for r in results[1:] if r["trained"]]
    assert trained, results  # at least round 0 found something to learn from
    for row in trained:
        assert row["train_rows"] > 0 and row["train_rationales"] > 0 and "cider" in row["val"]
        manifest = tmp_path / "runs" / "pol" / f"round_{row['round']:02d}" / "training_set.jsonl"
        first = json.loads(manifest.read_text().splitlines()[0])
        assert set(first) >= ({"chosen", "rejected"} if kind == "dpo" else {"completion", "accepted"})


def _toy_policy(calls: list, context):
    """A policy that trains nothing: it saves the weights as they are as its one epoch and reports how many
    items it saw (no HF Trainer needed: the loop's evaluate step scores whatever epochs a policy saved)."""
    from illume.models.weights import save_trainable_weights
    from illume.training import Trained
    from policies.base import PolicyResult

    calls.append(context.round_idx)
    epoch = context.out_dir / "epochs" / "epoch_01.safetensors"
    save_trainable_weights(context.vlm.model, epoch)
    items = len(context.store.candidate_sets(context.round_idx, "train"))
    return PolicyResult(Trained([epoch], losses=[], world_size=1, log_history=[]), {"toy_items": items})


@pytest.mark.slow
def test_a_new_policy_is_one_function_and_one_registry_entry(tmp_path, monkeypatch):
    """The loop runs whatever POLICIES holds for policy.kind, asking nothing else about it (a new kind's name
    also goes into PolicyConfig.kind's Literal, tests/test_config.py; here the toy takes the place of sft)."""
    from illume.cli import main
    from policies.registry import POLICIES
    from tests.conftest import tiny_overrides

    calls = []
    monkeypatch.setitem(POLICIES, "sft", partial(_toy_policy, calls))
    overrides = tiny_overrides(tmp_path) + ["policy.kind=sft", "loop.num_rounds=2", "critic.threshold=0.3",
                                            "sample.max_new_tokens=8", "loop.stop_when_nothing_new=false",
                                            "name=toy"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    assert calls == [0, 1]
    results = json.loads((tmp_path / "runs" / "toy" / "results.json").read_text())
    assert [r["toy_items"] for r in results[1:]] == [12, 12] and all(r["trained"] for r in results[1:])
    assert all("cider" in r["val"] and r["best_epoch"] == 1 for r in results[1:])
    assert not (tmp_path / "runs" / "toy" / "round_00" / "epochs").exists()  # kept as adapters.safetensors


def test_an_unknown_policy_kind_fails_before_any_work(tmp_path, capsys):
    from illume.cli import main
    from tests.conftest import tiny_overrides

    assert main(["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path, own_cache=True), "policy.kind=ppo"]) == 2
    assert "policy.kind" in (err := capsys.readouterr().err) and "ppo" in err and "'sft', 'dpo', 'kto', 'grpo'" in err
    assert not (tmp_path / "runs" / "demo").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_dpo_command_on_a_store_and_on_an_exported_dataset(tiny_vlm, tmp_path, capsys):
    from illume.cli import main

    run_dir = _run_dir(tmp_path, tiny_vlm)
    assert main(["dpo", str(run_dir), "train.num_epochs=1", "sample.max_new_tokens=4"]) == 0
    metrics = json.loads((run_dir / "dpo" / "metrics.json").read_text())
    assert metrics["num_rows"] == 20 and "cider" in metrics["val"]  # 10 items x (1 accepted x 2 rejected)
    assert (run_dir / "dpo" / "adapters.safetensors").is_file()

    assert main(["export", str(run_dir), "--format", "dpo", "--out", str(tmp_path / "pairs")]) == 0
    assert main(["dpo", str(tmp_path / "pairs"), "train.num_epochs=1", "sample.max_new_tokens=4",
                 "--config", str(run_dir / "config.yaml"), "--out", str(tmp_path / "from_dataset")]) == 0
    from_dataset = json.loads((tmp_path / "from_dataset" / "metrics.json").read_text())
    assert from_dataset["num_rows"] == 20

    def trained_on(folder):  # the pairs each route trained on, from its manifest
        rows = [json.loads(line) for line in (folder / "training_set.jsonl").read_text().splitlines()]
        return [(r["example_id"], r["prompt"], r["chosen"], r["rejected"], r["round_idx"]) for r in rows]

    assert trained_on(run_dir / "dpo") == trained_on(tmp_path / "from_dataset")  # the same pairs, in order
    assert main(["kto", str(run_dir), "train.num_epochs=1", "sample.max_new_tokens=4"]) == 0
    assert json.loads((run_dir / "kto" / "metrics.json").read_text())["num_rows"] == 30


def test_dpo_command_on_a_run_without_judgments_says_so(tiny_vlm, tmp_path, capsys):
    from illume.cli import main

    run_dir = _run_dir(tmp_path, tiny_vlm, judge=False)
    assert main(["dpo", str(run_dir)]) == 2
    assert "DPO needs preference pairs: no judgments in" in capsys.readouterr().err
    assert main(["dpo", str(tmp_path / "pairs")]) == 2  # neither a run nor a dataset
    assert "neither a run directory" in capsys.readouterr().err


def test_dpo_command_init_round_errors_name_the_problem(tiny_vlm, tmp_path, capsys):
    from illume.cli import main

    run_dir = _run_dir(tmp_path, tiny_vlm)
    assert main(["dpo", str(run_dir), "--init-round", "3"]) == 2
    assert "--init-round 3: no trained round there" in capsys.readouterr().err
    assert not (run_dir / "dpo").exists()  # nothing written before the check
