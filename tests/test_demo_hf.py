"""The HF demo: its base model (a tiny Qwen2-VL with its chat template, pre-trained on the shapes world in the chat
format by our recipe and shipped as illume/demo/assets/demo-hf) and configs/demo_hf.yaml.

When the asset checks fail after a change to the HF demo's settings, the model code, the pre-training recipe or
its data, re-make the asset with `python scripts/ship_demo_model.py --hf` and commit it.
"""

import hashlib
import json
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForImageTextToText

from illume import loading
from illume.cli import main
from illume.config import DEMO_MODEL_PATH, load_config
from illume.data.datasets import load_split
from illume.data.records import load_image
from illume.data.shapes import ShapesWorld
from illume.demo import pretrain
from illume.demo.pretrain import (
    SHIPPED_DEMO_MODELS,
    PretrainRows,
    build_demo_hf_vlm,
    demo_digest,
    ensure_demo_model,
    pretrain_demo_model,
)
from illume.models.hf import ADAPTER_DIR, HFVLM
from illume.prompts import answer_prompt, rationale_prompt
from tests.conftest import REPO

DEMO_HF = REPO / "configs" / "demo_hf.yaml"
SHIPPED = SHIPPED_DEMO_MODELS["hf"]
ASSET = json.loads((SHIPPED / "asset.json").read_text())
REPORT = json.loads((SHIPPED / "pretrain_report.json").read_text())
# A short run of the demo config that leaves the base model's settings (hence the shipped model) as they are; the
# critic's bar lowered so that a dozen questions give round 0 something to train on (the demo accepts 3 %).
SHORT_RUN = ["data.shapes.num_train_scenes=12", "data.shapes.num_val_scenes=8", "loop.num_rounds=1",
             "train.num_epochs=1", "sample.samples_per_temperature=2", "critic.threshold=0.4"]


@pytest.fixture
def no_pretraining(tmp_path, monkeypatch):
    """An empty per-user cache, and pre-training fails the test: only the shipped model can be used."""
    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "empty-cache"))

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained although the shipped HF demo model fits these settings")

    monkeypatch.setattr(pretrain, "pretrain_demo_model", fail)


def test_the_shipped_model_is_for_the_demo_hf_settings_and_intact():
    assert ASSET["digest"] == demo_digest(load_config(DEMO_HF))
    weights = (SHIPPED / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == ASSET["model_sha256"]
    assert (SHIPPED / "model.safetensors.sha256").read_text().split()[0] == ASSET["model_sha256"]
    assert not (SHIPPED / ADAPTER_DIR).exists()  # a base model: each run adds its own LoRA
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) <= 10 * 2**20


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(ASSET["threads"])  # as the asset was made: thread counts change float sums
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_recipe_reproduces_the_shipped_loss_curve(tmp_path, one_thread):
    """The first logged mean loss (the first 1/20 of the steps, under the full run's schedule) of pre-training
    with today's code and settings is the one the shipped model's run recorded (bit for bit on the machine
    that made it; the tolerance allows another CPU's kernels, as tests/test_demo_asset.py's)."""
    cfg = load_config(DEMO_HF, [f"output_dir={tmp_path / 'runs'}"])
    steps = max(1, cfg.pretrain.num_steps // 20)  # the report's logging interval
    made = pretrain_demo_model(cfg, tmp_path / "start", stop_after=steps)
    losses = json.loads((made / "pretrain_report.json").read_text())["losses"]
    assert losses[0] == pytest.approx(REPORT["losses"][0], rel=1e-3)


def test_any_working_folder_loads_the_shipped_model_as_an_hf_checkpoint(tmp_path, monkeypatch, no_pretraining):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO_HF)
    assert cfg.model.path == DEMO_MODEL_PATH and cfg.model.kind == "hf" and cfg.prompt.format == "chat"
    assert ensure_demo_model(cfg) == SHIPPED
    vlm = loading.load_vlm(cfg)
    assert isinstance(vlm, HFVLM) and vlm.chat is not None
    assert vlm.model.get_base_model().config.model_type == "qwen2_vl"
    assert vlm.tokenizer.convert_ids_to_tokens(vlm.eos_token_id) == "<|im_end|>"
    assert vlm.model.peft_config["default"].r == cfg.model.lora.r  # fresh LoRA of the run's settings
    # The weights are the shipped ones (as stock transformers loads the folder; it renames some keys on load).
    stock = AutoModelForImageTextToText.from_pretrained(SHIPPED).state_dict()
    state = {name.replace(".base_layer.", "."): tensor for name, tensor in vlm.model.get_base_model().state_dict().items()
             if "lora_" not in name}
    assert state.keys() == stock.keys() and all(torch.equal(state[name], stock[name]) for name in stock)
    # The folder itself is an HF checkpoint: `model.path` may name it.
    by_path = loading.load_vlm(load_config(DEMO_HF, [f"model.path={SHIPPED}"]))
    assert torch.equal(by_path.model.get_base_model().lm_head.weight, vlm.model.get_base_model().lm_head.weight)
    # Other settings are not what it was made for: they pre-train.
    with pytest.raises(AssertionError, match="pre-trained although"):
        loading.load_vlm(load_config(DEMO_HF, ["pretrain.num_steps=3"]))


def test_the_shipped_model_answers_and_stops(no_pretraining):
    """Greedy sanity: on the 100 val questions the base model answers far better than always giving the most
    common answer (22 %; it answers 55, the demo table's base row), and its rationales (in the chat format, after
    "{answer}, seeing that") end with the end of its turn, well before the limit."""
    cfg = load_config(DEMO_HF)
    vlm = loading.load_vlm(cfg)
    examples = load_split(cfg.data, "val")
    most_common = max(sum(answer in e.answers for e in examples) for answer in {e.answer for e in examples})
    images = vlm.prepare_images([load_image(e) for e in examples])
    answers, _ = vlm.decode(images, [answer_prompt(e.question) for e in examples], 1, 4, [vlm.eos_token_id])
    answers = [vlm.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
    assert sum(a in e.answers for a, e in zip(answers, examples)) >= 2 * most_common, answers
    rationales, _ = vlm.decode(images[:16], [rationale_prompt(e.question, e.answer) for e in examples[:16]], 1, 24,
                               [vlm.eos_token_id])
    assert all(len(ids) < 24 for ids in rationales), rationales  # each ended its turn
    assert sum(len(ids) > 0 for ids in rationales) >= 12, rationales  # (a rare one ends it at once)


@pytest.mark.slow
def test_the_demo_hf_config_runs_a_round_on_the_shipped_model(tmp_path, no_pretraining):
    assert main(["run", str(DEMO_HF), *SHORT_RUN, f"output_dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "demo_hf" / "results.json").read_text())
    assert results[1]["round"] == 0 and "cider" in results[1]["val"]
    config = (tmp_path / "demo_hf" / "config.yaml").read_text()
    assert DEMO_MODEL_PATH in config and "format: chat" in config


def test_pretrain_refuses_a_config_that_names_another_model(tmp_path, capsys):
    assert main(["pretrain", str(DEMO_HF), f"model.path={tmp_path}", f"output_dir={tmp_path / 'runs'}"]) == 2
    assert "illume pretrain makes the demo base model" in capsys.readouterr().err


def test_pretraining_rows_are_chat_turns(tmp_path):
    """The HF recipe's rows are the MAGMA recipe's rows in the chat format: captions and answers as the assistant's
    turn after an image (loss on the assistant's words and its end of turn only), generic sentences as text-only
    turns; no image row holds a rationale."""
    cfg = load_config(DEMO_HF, ["model.lm.hidden_size=32", "model.lm.num_layers=1", "data.shapes.num_pretrain_scenes=20"])
    vlm = build_demo_hf_vlm(cfg.model)
    rows = PretrainRows(vlm, ShapesWorld(**asdict(cfg.data.shapes)), cfg.pretrain)
    kinds = {"caption": 0, "answer": 0, "generic": 0}
    end = vlm.eos_token_id
    for i in range(200):
        row = rows[i]
        text = vlm.tokenizer.decode(row["input_ids"], skip_special_tokens=False)
        target = [t for t in row["labels"] if t != -100]
        assert target[-1] == end and row["labels"][-1] == end
        assert text.startswith("<|im_start|>") and "<|unk|>" not in text
        if "pixel_values" not in row:
            kinds["generic"] += 1
            assert "<|image_pad|>" not in text and "seeing that" in text
        else:
            assert "seeing" not in text  # an image row never shows the rationale format
            assert row["input_ids"].count(vlm.image_token_id) == 9  # 84 px: 3 x 3 image tokens
            kinds["answer" if " q :" in text.lower() or "q:" in text.lower() else "caption"] += 1
    assert all(count > 0 for count in kinds.values()), kinds
    batch = vlm.collate([rows[i] for i in range(16)])  # image and text-only rows in one batch
    assert batch["image_grid_thw"].shape[0] == sum(rows[i].get("pixel_values") is not None for i in range(16))
    assert torch.isfinite(vlm.model(**batch).loss)
