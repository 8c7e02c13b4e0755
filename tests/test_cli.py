"""The `illume` command end to end on a tiny model, in-process."""

import json

import pytest
import yaml
from PIL import Image

from illume.cli import main
from illume.config import load_config, save_config
from tests.conftest import REPO, tiny_overrides


@pytest.mark.slow
def test_baseline_pretrains_then_reports_and_writes_the_config_first(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path, own_cache=True) + ["name=base", "sample.samples_per_temperature=2",
                                            "sample.max_new_tokens=6"]
    assert main(["baseline", str(REPO / "configs" / "demo.yaml"), *overrides]) == 0
    run_dir = tmp_path / "runs" / "base"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["name"] == "base" and config["model"]["lm"]["hidden_size"] == 32
    report = json.loads((run_dir / "baseline.json").read_text())
    assert report["num_train"] == 12 and report["num_val"] == 8 and report["samples_per_example"] == 4
    assert 0.0 <= report["train_rationale_pass_rate"] <= 1.0
    assert {"answer_accuracy", "bleu_4", "rouge_l", "cider"} <= set(report["val"])
    assert "rationale at ROUGE-L" in capsys.readouterr().out
    assert list((tmp_path / "cache").glob("demo-base-*/model.safetensors"))


def test_config_error_exits_with_the_key_named(tmp_path, capsys):
    code = main(["pretrain", str(REPO / "configs" / "demo.yaml"), "pretrain.num_stepz=3",
                 f"output_dir={tmp_path}"])
    assert code == 2
    assert "pretrain.num_stepz" in capsys.readouterr().err


# --- data are checked before any model is loaded ------------------------------------------------------------

DEMO = str(REPO / "configs" / "demo.yaml")
QUICK = ["sample.samples_per_temperature=2", "sample.max_new_tokens=6"]


def _jsonl_data(tmp_path, rows: list[dict]) -> list[str]:
    """Overrides reading train and val from one JSONL file of `rows` (images relative to tmp_path)."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["data.kind=jsonl", f"data.train_path={path}", f"data.val_path={path}"]


def _square(path) -> str:
    Image.new("RGB", (16, 16), "red").save(path)
    return path.name


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded or pre-trained."""
    import illume.loop

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the data were checked")

    monkeypatch.setattr("illume.loading.load_vlm", fail)
    monkeypatch.setattr(illume.loop, "load_vlm", fail)
    monkeypatch.setattr("illume.demo.pretrain.pretrain_demo_model", fail)


def _command(tmp_path, command: str, data: list[str]) -> list[str]:
    """`command`'s arguments: a config file (run, baseline), else a run folder with `data` in config.yaml."""
    overrides = tiny_overrides(tmp_path, own_cache=True) + QUICK + data + ["name=bad"]
    if command in ("run", "baseline"):
        return [command, DEMO, *overrides]
    run_dir = tmp_path / "runs" / "bad"
    save_config(load_config(DEMO, overrides), run_dir / "config.yaml")
    return [*command.split(), str(run_dir)]


@pytest.mark.parametrize("command", ["run", "baseline", "dpo", "kto"])
def test_malformed_row_fails_before_the_model_loads(tmp_path, capsys, no_model, command):
    data = _jsonl_data(tmp_path, [{"image": _square(tmp_path / "a.png"), "question": "q?", "answer": "yes"},
                                  {"image": "a.png", "answer": "no"}])
    assert main(_command(tmp_path, command, data)) == 2
    err = capsys.readouterr().err
    assert err.startswith("data error:") and "train.jsonl, line 2" in err and "'question'" in err
    assert not (tmp_path / "cache").exists()  # nothing was pre-trained


@pytest.mark.parametrize("command", ["run", "baseline", "reward train", "reward eval", "dpo", "kto"])
def test_missing_image_fails_before_the_model_loads(tmp_path, capsys, no_model, command):
    data = _jsonl_data(tmp_path, [{"image": _square(tmp_path / "a.png"), "question": "q?", "answer": "yes"},
                                  {"image": "gone.png", "question": "q?", "answer": "no"}])
    assert main(_command(tmp_path, command, data)) == 2
    err = capsys.readouterr().err
    assert err.startswith("data error:") and str(tmp_path / "gone.png") in err and "train.jsonl:2" in err
    assert not (tmp_path / "cache").exists()


def test_corrupt_image_is_one_data_error_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    data = _jsonl_data(tmp_path, [{"image": _square(tmp_path / "a.png"), "question": "q?", "answer": "yes"},
                                  {"image": "bad.png", "question": "q?", "answer": "no"}])
    assert main(["run", DEMO, *tiny_overrides(tmp_path, own_cache=True), *QUICK, *data, "loop.num_rounds=1"]) == 2
    err = capsys.readouterr().err
    assert "data error: train split (jsonl): cannot read image" in err  # found before the model loads
    assert str(tmp_path / "bad.png") in err and "train.jsonl:2" in err
