"""The `illume` command end to end on a tiny model, in-process."""

import json

import yaml

from illume.cli import main
from tests.conftest import REPO, tiny_overrides


def test_baseline_pretrains_then_reports_and_writes_the_config_first(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path) + ["name=base", "sample.samples_per_temperature=2",
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
