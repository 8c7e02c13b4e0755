"""`illume export`: TRL-format datasets (SFT, DPO, KTO) and the flat JSONL from a run's feedback store."""

from __future__ import annotations

import json
import shutil

import pytest
from datasets import load_from_disk
from PIL import Image

from illume.cli import main
from illume.config import load_config, save_config
from illume.data.records import Candidate, CandidateSet
from illume.exports import ExportError, export
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import read_feedback

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)

# The texts of the store built by `run_dir` (see there for who judged what).
CIRCLE, RED_CIRCLE, SKY = "the circle is red", "there is a red circle", "the sky is blue"
SQUARE, TWO = "a square", "two squares"
LEFT, RIGHT = "it is left", "it is right"
BLUE_SQUARE = "a blue square"

TRL_COLUMNS = {  # what TRL's trainers read from a vision dataset
    "sft": {"prompt", "completion", "images"},
    "dpo": {"prompt", "chosen", "rejected", "images"},
    "kto": {"prompt", "completion", "label", "images"},
}
META = {"example_id", "round_idx", "annotators", "created_at"}


def prompt(example_id: str) -> str:
    return f"Q: what is in picture {example_id}? A: yes, seeing that"


def candidate_set(example_id: str, texts: list[str]) -> CandidateSet:
    return CandidateSet(
        example_id=example_id, answer="yes", predicted_answer="yes", prompt=prompt(example_id), seed=7,
        candidates=[Candidate(text=t, temperature=(0.3, 0.8)[k % 2], seed=7, sample_idx=k, logprob=-1.5 * (k + 1))
                    for k, t in enumerate(texts)],
    )


def png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path)
    return path


def colour_of(image) -> tuple[int, int, int]:
    assert isinstance(image, Image.Image)
    return image.convert("RGB").getpixel((0, 0))


@pytest.fixture
def run_dir(tmp_path):
    """A run with two rounds of judged train items, a val item, an unjudged item and tiny PNG images.

    Round 0: e1 [CIRCLE, RED_CIRCLE, SKY]: alice accepts CIRCLE, bob accepts CIRCLE and RED_CIRCLE;
             e2 [SQUARE, TWO]: alice says none fits; e3 [LEFT, RIGHT]: alice accepts LEFT;
             e4: nobody judged it; e5: no candidates, alice says none fits.
    Round 1: e1 [CIRCLE, BLUE_SQUARE]: alice accepts CIRCLE.   Val, round 0: v1 [SQUARE]: alice accepts it.
    """
    run = tmp_path / "run"
    images = {"e1": png(run / "images" / "e1.png", RED), "e2": png(run / "images" / "e2.png", GREEN),
              "e3": png(tmp_path / "elsewhere" / "e3.png", BLUE), "v1": png(run / "images" / "v1.png", RED)}
    refs = {"e1": "images/e1.png", "e2": "images/e2.png", "e3": str(images["e3"]), "e4": "images/e1.png",
            "e5": "images/e1.png", "v1": "images/v1.png"}  # relative to the run directory, or absolute
    with FeedbackStore(run / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [
            candidate_set("e1", [CIRCLE, RED_CIRCLE, SKY]), candidate_set("e2", [SQUARE, TWO]),
            candidate_set("e3", [LEFT, RIGHT]), candidate_set("e4", ["unseen"]), candidate_set("e5", []),
        ], image_refs=refs)
        store.add_candidate_sets(1, "train", [candidate_set("e1", [CIRCLE, BLUE_SQUARE])], image_refs=refs)
        store.add_candidate_sets(0, "val", [candidate_set("v1", [SQUARE])], image_refs=refs)
        assert store.add_judgments(0, [("e1", [CIRCLE], False, 3.0), ("e2", [], True, 1.0),
                                       ("e3", [LEFT], False, 2.5), ("e5", [], True, None)], "alice") == 4
        assert store.add_judgments(0, [("e1", [CIRCLE, RED_CIRCLE], False, 4.0)], "bob") == 1
        assert store.add_judgments(1, [("e1", [CIRCLE], False, 1.0)], "alice") == 1
        assert store.add_judgments(0, [("v1", [SQUARE], False, 1.0)], "alice", split="val") == 1
    return run


def load(path):
    dataset = load_from_disk(str(path))
    return dataset, [dict(row) for row in dataset]


def test_dpo_export_has_trl_columns_and_exact_pairs(run_dir):
    result = export(run_dir, "dpo", aggregate="any")
    assert result.path == run_dir / "exports" / "dpo" and result.num_rows == 4
    dataset, rows = load(result.path)
    assert set(dataset.column_names) == TRL_COLUMNS["dpo"] | META
    # Every (accepted, rejected) pair of one item, items in round order; e2 (none fit) has no accepted one.
    assert [(r["example_id"], r["round_idx"], r["chosen"], r["rejected"]) for r in rows] == [
        ("e1", 0, " " + CIRCLE, " " + SKY), ("e1", 0, " " + RED_CIRCLE, " " + SKY),
        ("e3", 0, " " + LEFT, " " + RIGHT), ("e1", 1, " " + CIRCLE, " " + BLUE_SQUARE),
    ]
    assert rows[0]["prompt"] == prompt("e1") and rows[2]["prompt"] == prompt("e3")
    # Both annotators of e1 saw both candidates; timestamps are parallel ISO strings, oldest first.
    assert rows[0]["annotators"] == ["alice", "bob"] and rows[2]["annotators"] == ["alice"]
    assert len(rows[0]["created_at"]) == 2 and rows[0]["created_at"] == sorted(rows[0]["created_at"])
    assert rows[0]["created_at"][0].endswith("+00:00")
    assert [len(r["images"]) for r in rows] == [1, 1, 1, 1]
    assert [colour_of(r["images"][0]) for r in rows] == [RED, RED, BLUE, RED]


def test_sft_export_one_row_per_accepted_rationale(run_dir):
    dataset, rows = load(export(run_dir, "sft", aggregate="any").path)
    assert set(dataset.column_names) == TRL_COLUMNS["sft"] | META
    assert [(r["example_id"], r["round_idx"], r["prompt"], r["completion"], r["annotators"]) for r in rows] == [
        ("e1", 0, prompt("e1"), " " + CIRCLE, ["alice", "bob", "alice"]),  # accepted in rounds 0 and 1
        ("e1", 0, prompt("e1"), " " + RED_CIRCLE, ["bob"]),
        ("e3", 0, prompt("e3"), " " + LEFT, ["alice"]),
    ]
    assert [colour_of(r["images"][0]) for r in rows] == [RED, RED, BLUE]
    # The same set the loop fine-tunes on (policies.sft reads it so).
    with FeedbackStore(run_dir / "feedback.db") as store:
        accepted = read_feedback(store, upto_round=1, aggregate="any").accepted()
    assert [(r["example_id"], r["completion"]) for r in rows] == [(a.example_id, " " + a.text) for a in accepted]


def test_kto_export_labels_every_judged_rationale(run_dir):
    dataset, rows = load(export(run_dir, "kto", aggregate="any").path)
    assert set(dataset.column_names) == TRL_COLUMNS["kto"] | META
    assert dataset.features["label"].dtype == "bool"
    assert [(r["example_id"], r["completion"], r["label"], r["annotators"]) for r in rows] == [
        ("e1", " " + CIRCLE, True, ["alice", "bob", "alice"]),
        ("e1", " " + RED_CIRCLE, True, ["bob"]),  # bob accepted it, alice did not: one accept is enough (any)
        ("e1", " " + SKY, False, ["alice", "bob"]),
        ("e2", " " + SQUARE, False, ["alice"]),  # none fits rejects every candidate
        ("e2", " " + TWO, False, ["alice"]),
        ("e3", " " + LEFT, True, ["alice"]),
        ("e3", " " + RIGHT, False, ["alice"]),
        ("e1", " " + BLUE_SQUARE, False, ["alice"]),
    ]
    assert [colour_of(r["images"][0]) for r in rows] == [RED, RED, RED, GREEN, GREEN, BLUE, BLUE, RED]


def test_majority_leaves_ties_out(run_dir):
    # By majority (the default: no config.yaml here) alice and bob tie on RED_CIRCLE: contested, in no format.
    _, sft = load(export(run_dir, "sft").path)
    assert [r["completion"] for r in sft] == [" " + CIRCLE, " " + LEFT]
    _, dpo = load(export(run_dir, "dpo").path)
    assert [(r["chosen"], r["rejected"]) for r in dpo] == [
        (" " + CIRCLE, " " + SKY), (" " + LEFT, " " + RIGHT), (" " + CIRCLE, " " + BLUE_SQUARE)]
    _, kto = load(export(run_dir, "kto").path)
    assert [(r["completion"], r["label"]) for r in kto] == [
        (" " + CIRCLE, True), (" " + SKY, False), (" " + SQUARE, False), (" " + TWO, False),
        (" " + LEFT, True), (" " + RIGHT, False), (" " + BLUE_SQUARE, False),
    ]
    with FeedbackStore(run_dir / "feedback.db") as store:
        assert [a.text for a in read_feedback(store, upto_round=1).accepted()] == [CIRCLE, LEFT]
    with pytest.raises(ExportError, match="aggregate must be one of"):
        export(run_dir, "sft", aggregate="most")


def test_round_and_split_filters(run_dir):
    _, rows = load(export(run_dir, "dpo", round_idx=1).path)
    assert [(r["round_idx"], r["chosen"], r["rejected"]) for r in rows] == [(1, " " + CIRCLE, " " + BLUE_SQUARE)]
    _, rows = load(export(run_dir, "sft", upto_round=0).path)
    assert [r["annotators"] for r in rows][0] == ["alice", "bob"]  # round 1's judgment left out
    _, rows = load(export(run_dir, "sft", split="val", force=True).path)  # replaces the export above
    assert [(r["example_id"], r["completion"]) for r in rows] == [("v1", " " + SQUARE)]
    _, rows = load(export(run_dir, "kto", split="all").path)
    assert {r["example_id"] for r in rows} == {"e1", "e2", "e3", "v1"}


def test_saved_images_are_embedded(run_dir):
    path = export(run_dir, "dpo").path
    shutil.rmtree(run_dir / "images")
    _, rows = load(path)
    assert colour_of(rows[0]["images"][0]) == RED


def test_jsonl_has_one_flat_row_per_decision(run_dir):
    result = export(run_dir, "jsonl")
    assert result.path == run_dir / "exports" / "jsonl.jsonl"
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    # e1 r0: 2 judgments x 3, e2: 2, e3: 2, e5: 1 (no candidates), e1 r1: 2.
    assert len(rows) == result.num_rows == 13
    first = rows[0]
    assert first["round_idx"] == 0 and first["split"] == "train" and first["example_id"] == "e1"
    assert first["prompt"] == prompt("e1") and first["answer"] == "yes" and first["text"] == CIRCLE
    assert first["temperature"] == 0.3 and first["seed"] == 7 and first["logprob"] == -1.5
    assert first["annotator"] == "alice" and first["accepted"] is True and first["none_fit"] is False
    assert first["seconds"] == 3.0 and first["created_at"].endswith("+00:00")
    assert first["images"] == [str((run_dir / "images" / "e1.png").resolve())]
    [e5] = [r for r in rows if r["example_id"] == "e5"]
    assert e5["text"] is None and e5["accepted"] is None and e5["none_fit"] is True
    assert sum(r["accepted"] is True for r in rows) == 5
    assert {r["annotator"] for r in rows} == {"alice", "bob"}


def test_as_jsonl_writes_trl_rows_with_image_paths(run_dir):
    result = export(run_dir, "dpo", as_jsonl=True, aggregate="any")
    assert result.path == run_dir / "exports" / "dpo.jsonl"
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows][2] == (" " + LEFT, " " + RIGHT)
    assert rows[2]["images"] == [str(run_dir.parent / "elsewhere" / "e3.png")]
    assert TRL_COLUMNS["dpo"] | META <= set(rows[0])


def test_conversational_format(run_dir):
    _, rows = load(export(run_dir, "kto", conversational=True).path)
    assert rows[0]["prompt"] == [{"role": "user", "content": prompt("e1")}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": CIRCLE}]


def test_no_images(run_dir):
    dataset, _ = load(export(run_dir, "sft", images=False).path)
    assert "images" not in dataset.column_names


def test_images_of_items_without_ref_come_from_the_run_dataset(tmp_path):
    from illume.config import load_config, save_config
    from illume.data.datasets import load_split

    shapes = ["data.shapes.num_train_scenes=3", "data.shapes.num_val_scenes=1", "data.shapes.num_test_scenes=1"]
    cfg = load_config(None, shapes + [f"output_dir={tmp_path}", "name=shapes"])
    save_config(cfg, cfg.run_dir / "config.yaml")
    examples = load_split(cfg.data, "train")
    with FeedbackStore(cfg.run_dir / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set(e.id, ["yes", "no"]) for e in examples[1:]])
        store.add_judgments(0, [(e.id, ["yes"], False, None) for e in examples[1:]], "simulated")
    _, rows = load(export(cfg.run_dir, "dpo").path)
    assert [r["example_id"] for r in rows] == [e.id for e in examples[1:]]
    for row, example in zip(rows, examples[1:]):
        assert row["images"][0].convert("RGB").tobytes() == example.image.convert("RGB").tobytes()
    rows = [json.loads(line) for line in export(cfg.run_dir, "sft", as_jsonl=True).path.read_text().splitlines()]
    with Image.open(rows[0]["images"][0]) as image:
        assert image.size == examples[1].image.size


def test_store_url_from_config(tmp_path, run_dir):
    elsewhere = tmp_path / "team" / "store.db"
    elsewhere.parent.mkdir()
    shutil.move(run_dir / "feedback.db", elsewhere)
    (run_dir / "config.yaml").write_text(f"store_url: sqlite:///{elsewhere}\n")
    assert export(run_dir, "sft", images=False).num_rows == 2  # majority: RED_CIRCLE is a tie
    (run_dir / "config.yaml").write_text(f"store_url: sqlite:///{tmp_path / 'missing.db'}\n")
    with pytest.raises(ExportError, match="missing.db"):
        export(run_dir, "sft", force=True)


def test_errors(tmp_path, run_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=f"no feedback store at {empty / 'feedback.db'}"):
        export(empty, "sft")
    assert not (empty / "feedback.db").exists()  # nothing created
    with pytest.raises(ExportError, match="run directory not found"):
        export(tmp_path / "nope", "sft")

    unjudged = tmp_path / "unjudged"
    with FeedbackStore(unjudged / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("a", ["x", "y"])])
    with pytest.raises(ExportError, match="no judgments"):
        export(unjudged, "kto")
    with pytest.raises(ExportError, match="no judgments.*round 5"):
        export(run_dir, "kto", round_idx=5)

    with FeedbackStore(unjudged / "feedback.db") as store:
        store.add_judgments(0, [("a", [], True, None)], "alice")
    with pytest.raises(ExportError, match="no item has both an accepted and a rejected candidate"):
        export(unjudged, "dpo", images=False)
    with pytest.raises(ExportError, match="no accepted rationale"):
        export(unjudged, "sft", images=False)

    (run_dir / "images" / "e2.png").unlink()
    with pytest.raises(ExportError, match=r"image not found: .*e2\.png.*'e2'"):
        export(run_dir, "kto")
    (run_dir / "not_a_dataset").mkdir()
    (run_dir / "not_a_dataset" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not_a_dataset exists .folder.: choose another path, or pass --force"):
        export(run_dir, "dpo", run_dir / "not_a_dataset")
    with pytest.raises(ExportError, match="not a saved dataset"):  # --force replaces only an earlier export
        export(run_dir, "dpo", run_dir / "not_a_dataset", force=True)
    assert (run_dir / "not_a_dataset" / "notes.txt").is_file()


def test_export_replaces_a_previous_export_only_with_force(run_dir):
    out = run_dir / "my_dpo"
    assert export(run_dir, "dpo", out).num_rows == 3
    with pytest.raises(ExportError, match="my_dpo exists .folder.: choose another path, or pass --force"):
        export(run_dir, "dpo", out, round_idx=1)
    assert len(load_from_disk(str(out))) == 3
    assert export(run_dir, "dpo", out, round_idx=1, force=True).num_rows == 1
    assert len(load_from_disk(str(out))) == 1
    jsonl = run_dir / "elsewhere.jsonl"
    jsonl.write_text("someone's notes\n")
    with pytest.raises(ExportError, match="elsewhere.jsonl exists .file."):
        export(run_dir, "jsonl", jsonl)
    assert jsonl.read_text() == "someone's notes\n"


@pytest.mark.parametrize("target, fmt", [("feedback.db", "jsonl"), ("config.yaml", "jsonl"),
                                         ("round_00/metrics.json", "jsonl"), ("round_00", "dpo"), (".", "dpo")])
def test_export_never_replaces_a_runs_own_files(run_dir, capsys, target, fmt):
    """Issue 24: `--out RUN/feedback.db` replaced the store with JSONL (exit 0); now refused, with --force too."""
    save_config(load_config(), run_dir / "config.yaml")  # an illume run folder (as before illume-run.json)
    (run_dir / "round_00").mkdir()
    (run_dir / "round_00" / "metrics.json").write_text("{}")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    for force in ([], ["--force"]):
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(run_dir / target), *force]) == 2
        err = capsys.readouterr().err
        assert err.startswith("export error: --out") and err.count("\n") == 1
        assert "illume never replaces it" in err
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    with FeedbackStore(run_dir / "feedback.db", create=False) as store:
        assert store.num_judgments() > 0


def test_cli_export(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "dpo"]) == 0
    assert "exported 3 dpo rows" in capsys.readouterr().out
    dataset, rows = load(run_dir / "exports" / "dpo")
    assert set(dataset.column_names) >= TRL_COLUMNS["dpo"] and len(rows) == 3
    out = run_dir / "k.jsonl"
    assert main(["export", str(run_dir), "--format", "kto", "--out", str(out), "--as-jsonl",
                 "--aggregate", "unanimous", "--round", "0"]) == 0
    assert len(out.read_text().splitlines()) == 6  # RED_CIRCLE (one accept, one reject) left out
    assert main(["export", str(run_dir / "missing"), "--format", "sft"]) == 2
    assert "run directory not found" in capsys.readouterr().err
