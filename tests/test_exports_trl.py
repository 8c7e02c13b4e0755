"""A chat-format run's exports are TRL's conversational rows: TRL's own `SFTTrainer` and `DPOTrainer` take one
step on a tiny chat VLM straight from `illume export`, with nothing of ours in between."""

from __future__ import annotations

import pytest
import torch
from datasets import load_from_disk
from PIL import Image

from illume.cli import main
from illume.config import load_config, save_config
from illume.data.records import Candidate, CandidateSet
from illume.feedback.store import FeedbackStore
from illume.prompts import rationale_prompt

GOOD, BAD = "the circle is red", "the square is blue"
FAMILY = "llava"  # its processor has no video part, so stock `AutoProcessor` loads it without torchvision


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from illume.demo.tiny_models import build_tiny_hf_vlm

    directory = tmp_path_factory.mktemp("model")
    build_tiny_hf_vlm(FAMILY).save(directory)
    return directory


@pytest.fixture
def chat_run(tmp_path, model_dir):
    """A chat-format HF run whose store holds two judged items: GOOD accepted, BAD rejected in each."""
    run = tmp_path / "run"
    cfg = load_config(None, ["model.kind=hf", f"model.path={model_dir}", "prompt.format=chat",
                             f"output_dir={tmp_path}", "name=run"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    refs = {}
    for name, colour in (("e1", "red"), ("e2", "blue")):
        Image.new("RGB", (32, 32), colour).save(run / f"{name}.png")
        refs[name] = f"{name}.png"
    sets = [CandidateSet(name, "red", "red", rationale_prompt("what colour is the circle?", "red"), 1,
                         [Candidate(GOOD, 0.8, 1, 0, -1.0), Candidate(BAD, 0.8, 1, 1, -2.0)])
            for name in refs]
    with FeedbackStore(run / "feedback.db") as store:
        store.add_candidate_sets(0, "train", sets, image_refs=refs)
        store.add_judgments(0, [(name, [GOOD], False, 1.0) for name in refs], "alice")
    return run


def _export(run, fmt):
    assert main(["export", str(run), "--format", fmt]) == 0
    return load_from_disk(str(run / "exports" / fmt))


def test_a_chat_runs_export_is_the_runs_conversation(chat_run):
    row = _export(chat_run, "dpo")[0]
    assert row["prompt"] == [{"role": "user", "content": [
        {"type": "image", "text": None},
        {"type": "text", "text": "Q: what colour is the circle? A: red Explain why."}]}]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": f"red, seeing that {GOOD}"}]}]
    assert row["rejected"][0]["content"][0]["text"] == f"red, seeing that {BAD}"
    assert len(row["images"]) == 1


def _stock_model_and_processor(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _trained(trainer) -> bool:
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return any(not torch.equal(before[n], after[n]) for n in before)


def test_trls_dpo_trainer_takes_the_export_as_it_is(chat_run, model_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    model, processor = _stock_model_and_processor(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2,
                     learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=_export(chat_run, "dpo"), processing_class=processor,
                         peft_config=_lora())
    assert _trained(trainer)


def test_trls_sft_trainer_takes_the_export_as_it_is(chat_run, model_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, processor = _stock_model_and_processor(model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2,
                     learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_export(chat_run, "sft"), processing_class=processor,
                         peft_config=_lora())
    assert _trained(trainer)
