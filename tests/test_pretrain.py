"""Pre-training the demo base model: only captions and answers, loss goes down, cached once."""

import json

import pytest

from illume import loading
from illume.config import load_config
from illume.data.shapes import ShapesWorld
from illume.demo.pretrain import PretrainRows, demo_model_dir, pretrain_demo_model
from illume.demo.tiny_models import build_demo_vlm
from tests.conftest import REPO, TINY_DATA, TINY_MODEL, tiny_overrides


def test_pretraining_rows_never_contain_image_rationales(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tmp_path))
    vlm = build_demo_vlm(cfg.model)
    rows = PretrainRows(vlm, ShapesWorld(num_pretrain_scenes=cfg.data.shapes.num_pretrain_scenes), cfg.pretrain)
    kinds = {"caption": 0, "answer": 0, "generic": 0}
    for i in range(300):
        row = rows[i]
        text = vlm.tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        target = vlm.tokenizer.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
        if row["pixel_values"] is None:
            kinds["generic"] += 1
            assert "seeing that" in text
        else:
            assert "seeing" not in text  # an image row never shows the rationale format
            assert row["input_ids"][: vlm.model.config.num_image_tokens] == [vlm.image_token_id] * 9
            kinds["answer" if text.startswith("q :") else "caption"] += 1
            if text.startswith("q :"):
                assert text.endswith(target) and len(target.split()) == 1  # loss on the answer only
    assert all(count > 0 for count in kinds.values()), kinds


@pytest.mark.slow
def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      tiny_overrides(tmp_path) + ["pretrain.num_steps=40", "pretrain.warmup_steps=4"])
    directory = pretrain_demo_model(cfg)
    assert directory == demo_model_dir(cfg)
    report = json.loads((directory / "pretrain_report.json").read_text())
    assert report["losses"][-1] < report["losses"][0] * 0.8
    assert not directory.with_name(directory.name + ".partial").exists()
    vlm = loading.load_vlm(cfg)
    assert vlm.model.config.num_image_tokens == 9  # 96 px -> a 3 x 3 grid


@pytest.mark.slow
def test_load_vlm_pretrains_once_then_uses_the_cache(tmp_path, monkeypatch):
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tmp_path) + ["pretrain.num_steps=2"])
    loading.load_vlm(cfg)  # pre-trains: nothing cached yet

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained again although a cached model exists")

    monkeypatch.setattr("illume.demo.pretrain.pretrain_demo_model", fail)
    loading.load_vlm(cfg)
    # A setting that changes the model changes the cache key.
    other = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tmp_path) + ["pretrain.num_steps=3"])
    assert demo_model_dir(other) != demo_model_dir(cfg)
    with pytest.raises(AssertionError, match="pre-trained again"):
        loading.load_vlm(other)


@pytest.mark.slow
def test_another_working_folder_finds_the_same_cached_model(tmp_path, monkeypatch):
    for name in ("ILLUME_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    overrides = TINY_MODEL + TINY_DATA + ["pretrain.num_steps=2"]  # no model.cache_dir: the per-user default
    for folder in ("here", "there"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "here")
    loading.load_vlm(load_config(REPO / "configs" / "demo.yaml", overrides))  # pre-trains into the user cache

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained again in another working folder")

    monkeypatch.setattr("illume.demo.pretrain.pretrain_demo_model", fail)
    monkeypatch.chdir(tmp_path / "there")
    loading.load_vlm(load_config(REPO / "configs" / "demo.yaml", overrides))
    assert not (tmp_path / "here" / ".cache").exists()
