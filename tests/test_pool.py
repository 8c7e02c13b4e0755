"""A candidate pool from several models (illume/pool.py, `sample.pool`): checked before any model loads, the
policy's weights come back exactly after a pool entry's adapters were swapped in, the candidates of every
model join each item's list with their writer stored, and the annotation page never shows the writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from illume.data.records import POLICY_MODEL, Candidate, CandidateSet

REPO = Path(__file__).resolve().parents[1]


def _set(example_id: str, texts: list[str], model: str = POLICY_MODEL) -> CandidateSet:
    return CandidateSet(example_id, "red", "red", f"prompt {example_id}", 7,
                        [Candidate(t, 0.8, 7, j, -1.0, model) for j, t in enumerate(texts)])


def test_merge_appends_each_entrys_new_texts_after_the_policys():
    from illume.pool import merge_pool

    policy = [_set("a", ["x", "y"]), _set("b", ["z"])]
    pooled = {"old": [_set("a", ["y", "w"], "old"), _set("b", [], "old")],
              "other": [_set("a", ["w", "v"], "other"), _set("b", ["z", "u"], "other")]}
    merged = merge_pool(policy, pooled)
    assert [(c.text, c.model) for c in merged[0].candidates] == [
        ("x", POLICY_MODEL), ("y", POLICY_MODEL), ("w", "old"), ("v", "other")]
    assert [(c.text, c.model) for c in merged[1].candidates] == [("z", POLICY_MODEL), ("u", "other")]
    assert [c.text for c in policy[0].candidates] == ["x", "y"]  # the inputs are left as they were
    with pytest.raises(RuntimeError, match="item 0 is b"):
        merge_pool(policy, {"bad": list(reversed(pooled["old"]))})


@pytest.mark.parametrize(("entry", "message"), [
    ("{}", "set exactly one of round, adapters and model (it has none)"),
    ("{round: 0, adapters: /x.safetensors}", "it has round, adapters"),
    ("{round: -1}", "sample.pool[0].round must be >= 0, got -1"),
    ("{adapters: /no/such/adapters.safetensors}", "sample.pool[0].adapters=/no/such/adapters.safetensors: no such"),
    ("{round: 0, name: policy}", "the name 'policy' is taken"),
])
def test_a_bad_pool_fails_before_any_model_loads(tmp_path, monkeypatch, capsys, entry, message):
    import illume.loop
    from illume.cli import main
    from tests.conftest import tiny_overrides

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(illume.loop, "load_vlm", no_model)
    overrides = tiny_overrides(tmp_path) + [f"sample.pool=[{entry}]"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *overrides]) == 2
    assert message in capsys.readouterr().err


def test_two_entries_with_one_name_fail(tmp_path):
    from illume.config import ConfigError, load_config
    from illume.pool import check_pool

    cfg = load_config(REPO / "configs" / "demo.yaml", ["sample.pool=[{round: 0}, {round: 1, name: round_0}]"])
    with pytest.raises(ConfigError, match=r"sample.pool\[1\]: the name 'round_0' is taken"):
        check_pool(cfg)


def test_swapped_adapters_come_back_exactly_also_after_an_error(tiny_vlm, tmp_path):
    from illume.models.weights import save_trainable_weights, trainable_state_dict
    from illume.pool import swapped_adapters

    tiny_vlm.set_trainable(adapters=True)
    before = trainable_state_dict(tiny_vlm.model)
    with torch.no_grad():
        for p in tiny_vlm.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    save_trainable_weights(tiny_vlm.model, tmp_path / "other.safetensors")
    other = trainable_state_dict(tiny_vlm.model)
    with torch.no_grad():  # back to the policy's weights
        for name, p in tiny_vlm.model.named_parameters():
            if name in before:
                p.copy_(before[name])
    with swapped_adapters(tiny_vlm, tmp_path / "other.safetensors"):
        assert all(torch.equal(trainable_state_dict(tiny_vlm.model)[n], other[n]) for n in other)
    assert all(torch.equal(trainable_state_dict(tiny_vlm.model)[n], before[n]) for n in before)
    with pytest.raises(ZeroDivisionError), swapped_adapters(tiny_vlm, tmp_path / "other.safetensors"):
        1 / 0
    assert all(torch.equal(trainable_state_dict(tiny_vlm.model)[n], before[n]) for n in before)


@pytest.mark.slow
def test_a_run_pools_an_earlier_round_and_another_vlm_and_the_page_shows_neither_name(tmp_path, capsys):
    """Two rounds of the demo on the tiny MAGMA with a pool of round 0's policy (from round 1 on) and a tiny
    Qwen2-VL (another VLM, another backend): the writers are stored per candidate and exported, the page's
    item has ids and texts only, and the pool's candidates are those its model draws from its own seeds."""
    from illume.annotate.server import create_app
    from illume.cli import main
    from illume.config import AnnotateConfig, load_config
    from illume.demo.tiny_models import build_tiny_hf_vlm
    from illume.exports import judgment_rows
    from illume.feedback.store import FeedbackStore
    from illume.loading import load_vlm
    from illume.models.weights import load_trainable_weights
    from illume.pool import pool_candidate_sets
    from tests.conftest import tiny_overrides

    build_tiny_hf_vlm("qwen2_vl").save(tmp_path / "qwen")
    overrides = tiny_overrides(tmp_path) + [
        "name=pool", "loop.num_rounds=2", "loop.stop_when_nothing_new=false", "critic.threshold=0.1",
        "train.num_epochs=1", "sample.max_new_tokens=6", "sample.samples_per_temperature=1",
        f"sample.pool=[{{round: 0}}, {{name: qwen, model: {{kind: hf, path: {tmp_path / 'qwen'}}}}}]"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    assert "the pool's round_0 sits this round out" in capsys.readouterr().out
    run = tmp_path / "runs" / "pool"
    with FeedbackStore(run / "feedback.db") as store:
        writers = {r: {c.model for cs in store.candidate_sets(r) for c in cs.candidates} for r in (0, 1)}
        assert writers[0] == {POLICY_MODEL, "qwen"}
        assert writers[1] == {POLICY_MODEL, "qwen", "round_0"}
        round_1 = store.candidate_sets(1)
        # Every item's candidates: the policy's first, each text once.
        for cs in round_1:
            models = [c.model for c in cs.candidates]
            assert models == sorted(models, key=lambda m: m != POLICY_MODEL)
            assert len({c.text for c in cs.candidates}) == len(cs.candidates)
        # round_0's candidates are what round 0's adapters draw from the entry's own seeds.
        cfg = load_config(run / "config.yaml")
        vlm = load_vlm(cfg)
        load_trainable_weights(vlm.model, run / "round_00" / "adapters.safetensors")
        from illume.data.datasets import load_split

        train = load_split(cfg.data, "train")
        redrawn = {cs.example_id: [c.text for c in cs.candidates] for cs in pool_candidate_sets(vlm, train, cfg, 1, "round_0")}
        policy_texts = {cs.example_id: {c.text for c in cs.candidates if c.model == POLICY_MODEL} for cs in round_1}
        for cs in round_1:
            stored = [c.text for c in cs.candidates if c.model == "round_0"]
            assert stored == [t for t in redrawn[cs.example_id] if t not in policy_texts[cs.example_id]]
        # The export names the writer of every candidate.
        rows = judgment_rows(store.judged_items())
        assert {row["model"] for row in rows if row["round_idx"] == 1} == {POLICY_MODEL, "qwen", "round_0"}
        # The page: ids and texts, no writer anywhere in what it is sent.
        client = __import__("fastapi.testclient", fromlist=["TestClient"]).TestClient(
            create_app(store, run, AnnotateConfig(annotations_per_item=2), round_idx=1),  # a slot left
            base_url="http://127.0.0.1")
        page = client.post("/api/next", json={"annotator": "ann"})
        assert page.status_code == 200, page.text
        item = page.json()["item"]
        assert item is not None and all(set(c) == {"id", "text", "prechecked"} for c in item["candidates"])
        for name in ("qwen", "round_0", str(tmp_path / "qwen")):
            assert name not in json.dumps(page.json())
