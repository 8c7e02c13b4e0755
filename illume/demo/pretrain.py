"""Pre-training the demo's base models on shapes-world captions and answers, and caching them.

The demo needs what MAGMA brings to VQA-X: a VLM that describes images and answers questions but was never
taught rationales in the `, seeing that` format. So the model sees captions (image -> plain clauses stating
the facts), question/answer rows (`Q: ... A: answer`, loss on the answer) and a few generic text-only
"X, seeing that Y" sentences that are never about an image. Whatever rationales it then writes for an
ILLUME prompt are latent ability, imperfect, as the paper's round 0 is.

There are two demo base models, one recipe: MAGMA (`model.kind: magma`, configs/demo.yaml) and a tiny Qwen2-VL
with its chat template (`model.kind: hf`, `model.path: illume:demo`, configs/demo_hf.yaml: `build_demo_hf_vlm`).
Each row is (image or none, prompt, completion) and the model writes it in its own format (`VLM.encode_row`):
MAGMA's plain `<image> Q: ... A: answer`, the Qwen2-VL's chat turns (the image and `Q: ... A:` as the user's
turn, the answer as the assistant's, loss on the assistant's words); a generic sentence is a text-only row whose
whole text is the completion (the Qwen2-VL: an assistant's turn after an empty user turn).

All weights train here (the ILLUME loop later trains adapters only). The result is cached in the per-user
cache (`illume.config.cache_root`: `model.cache_dir`, $ILLUME_CACHE, $XDG_CACHE_HOME/illume or
~/.cache/illume) keyed by a hash of every setting that changes it, so the demo pre-trains once per machine,
whatever the working folder: `ensure_demo_model` (called by `illume.loading.load_vlm` when a config names the
demo base model: `ModelConfig.names_demo_model`) pre-trains only when that folder is missing. The architectures
are `illume.demo.tiny_models.build_demo_vlm` and `build_demo_hf_vlm` (below).

The base models of configs/demo.yaml's and configs/demo_hf.yaml's settings ship with the package
(`SHIPPED_DEMO_MODELS`: assets/demo-base, 5.9 MB; assets/demo-hf): a new machine runs the demos at once instead of
pre-training first. Each is what `illume pretrain CONFIG --force` makes (its `asset.json` records how it was
made); the tests check that its settings hash is its config's and that the recipe still reproduces its recorded
loss curve (tests/test_demo_asset.py, tests/test_demo_hf.py). Other settings pre-train as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from illume import distributed
from illume.config import ConfigError, ModelConfig, PretrainConfig, RunConfig, cache_root
from illume.data.shapes import (
    ShapesWorld,
    generic_sentences,
    make_caption,
    make_question,
    render,
    split_words,
    vocabulary,
)
from illume.demo.tiny_families import TINY_FAMILIES
from illume.demo.tiny_models import build_demo_vlm
from illume.models.hf import ADAPTER_DIR, DEFAULT_LORA, HFVLM
from illume.models.vlm import VLM
from illume.prompts import ChatStyle, answer_prompt
from illume.tracking import trainer_report
from illume.training import trainer_arguments

logger = logging.getLogger(__name__)

# Bump when the pre-training data or recipe changes in a way the config hash cannot see.
PRETRAIN_RECIPE_VERSION = 1

# Model settings added after demo caches existed, with their defaults: left out of the cache key while at the
# default (the model is then the same, so existing caches stay valid); any other value enters the key.
_LATER_MODEL_FIELDS = {("lm", "vocab_size"): None, ("lm", "activation"): "gelu"}


SHIPPED_DEMO_MODELS = {"magma": Path(__file__).parent / "assets" / "demo-base",
                       "hf": Path(__file__).parent / "assets" / "demo-hf"}
"""The demo base models for configs/demo.yaml (magma) and configs/demo_hf.yaml (hf), shipped (see the module
docstring); each `asset.json` names the settings hash it was pre-trained for. The folder names are the cache
folders' too (`demo_model_dir`)."""
SHIPPED_DEMO_MODEL = SHIPPED_DEMO_MODELS["magma"]

# --- The HF demo model: a tiny Qwen2-VL with its chat template ------------------------------------------------

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
"""Qwen's turn markers, one token each (the template's end of turn is the completion's end token)."""

CHAT_WORDS = "system user assistant You are a helpful assistant."
"""Words of the chat template itself (role names, Qwen's default system message), in the tokenizer's vocabulary
with the shapes world's and the chat prompts' words (`demo_hf_words`)."""

QWEN_IMAGE_PIXELS = 28
"""Pixels per image token along each side (patch 14, 2 x 2 merged)."""


def demo_hf_words() -> list[str]:
    """The HF demo tokenizer's words: the shapes world's vocabulary, then the words the chat template and the
    default chat prompts (`prompt.ask` / `explain` / `connective`) add, e.g. "explain", "why", "." (other words
    read as `<|unk|>`)."""
    style = ChatStyle()
    words = vocabulary()
    text = " ".join([CHAT_WORDS, style.ask, style.explain, style.connective])
    return words + sorted(set(split_words(re.sub(r"\{\w+\}", " ", text))) - set(words))


def build_demo_hf_vlm(model_cfg: ModelConfig, seed: int = 0) -> HFVLM:
    """A randomly initialised tiny Qwen2-VL (illume.demo.tiny_families's, with its ChatML chat template), sized
    by `model.*`, with LoRA (`DEFAULT_LORA`, frozen and dropped when pre-training saves it).

    The text model: `lm.hidden_size` wide, `lm.num_layers` layers of `lm.num_heads` heads (no grouped KV), a
    3x SwiGLU MLP, `lm.max_positions` positions; M-RoPE over the whole head. The vision tower: sum(`vision.layers`)
    blocks of width `vision.width`; images resized to `vision.image_size` pixels square (a multiple of 28), one
    image token per 28 x 28 pixels (84 px: 9). The tokenizer: the shapes world's word-level one over
    `demo_hf_words`, with Qwen's image tokens and turn markers as special tokens.
    """
    lm, vision = model_cfg.lm, model_cfg.vision
    if vision.image_size % QWEN_IMAGE_PIXELS:
        raise ConfigError(f"model.vision.image_size={vision.image_size}: the HF demo model (Qwen2-VL) needs a "
                          f"multiple of {QWEN_IMAGE_PIXELS} pixels")
    head_dim = lm.hidden_size // lm.num_heads
    # M-RoPE: head_dim / 2 rotary frequencies split over (time, height, width), as Qwen2-VL's [16, 24, 24] of 64.
    sections = [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8]
    text_size = {"hidden_size": lm.hidden_size, "intermediate_size": 3 * lm.hidden_size,
                 "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
                 "num_key_value_heads": lm.num_heads, "max_position_embeddings": lm.max_positions,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}}
    parts = TINY_FAMILIES["qwen2_vl"](demo_hf_words(), text_size)
    tokenizer = parts.processor.tokenizer
    tokenizer.add_tokens(list(CHATML_TOKENS), special_tokens=True)
    parts.config.text_config.vocab_size = len(tokenizer)
    parts.config.vision_config.hidden_size = lm.hidden_size  # the merger's output: the text model's width
    parts.config.vision_config.embed_dim = vision.width
    parts.config.vision_config.depth = sum(vision.layers)
    pixels = vision.image_size ** 2
    parts.processor.image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels})
    torch.manual_seed(seed)
    base = AutoModelForImageTextToText.from_config(parts.config)
    lora = LoraConfig(**{**DEFAULT_LORA, "lora_dropout": 0.0})  # frozen while pre-training: no dropout to pay
    vlm = HFVLM(get_peft_model(base, lora).eval(), parts.processor, tokenizer, ChatStyle())
    vlm.set_trainable(adapters=True)
    return vlm


DEMO_BUILDERS = {"magma": build_demo_vlm, "hf": build_demo_hf_vlm}
"""model.kind -> (model config, seed) -> the demo base model before pre-training."""


def demo_settings(cfg: RunConfig) -> dict:
    """Every setting that changes the demo base model (the cache key's contents)."""
    model = {k: v for k, v in asdict(cfg.model).items() if k not in ("path", "cache_dir", "dtype", "lora")}
    for (section, name), default in _LATER_MODEL_FIELDS.items():
        if model[section][name] == default:
            del model[section][name]
    world = cfg.data.shapes  # only the pre-training scenes' seed matters: train/val/test never enter the model
    relevant = {
        "model": model, "pretrain": asdict(cfg.pretrain), "version": PRETRAIN_RECIPE_VERSION,
        "world": {"seed": world.seed if world.pretrain_seed is None else world.pretrain_seed, "image_size": world.image_size, "max_objects": world.max_objects,
                  "num_pretrain_scenes": world.num_pretrain_scenes},
    }
    return relevant


def demo_digest(cfg: RunConfig) -> str:
    """The settings hash that names the demo base model's cache folder."""
    return hashlib.sha256(json.dumps(demo_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]


def demo_model_dir(cfg: RunConfig) -> Path:
    """Cache folder of the demo base model for these settings (`demo-base-HASH`; hf: `demo-hf-HASH`)."""
    return cache_root(cfg.model) / f"{SHIPPED_DEMO_MODELS[cfg.model.kind].name}-{demo_digest(cfg)}"


def shipped_demo_model(cfg: RunConfig) -> Path | None:
    """The shipped demo base model when it was pre-trained for exactly these settings, else None."""
    shipped = SHIPPED_DEMO_MODELS[cfg.model.kind]
    info = shipped / "asset.json"
    if not info.is_file():
        return None
    return shipped if json.loads(info.read_text())["digest"] == demo_digest(cfg) else None


def ensure_demo_model(cfg: RunConfig) -> Path:
    """The folder of the demo base model for these settings: the cached one (which `illume pretrain` writes),
    else the shipped one when it was made for these settings, else the cache folder after pre-training into
    it (once per machine)."""
    directory = demo_model_dir(cfg)
    if (directory / "config.json").is_file():
        return directory
    shipped = shipped_demo_model(cfg)
    if shipped is not None:
        logger.info("using the shipped demo base model %s (pre-trained for these settings)", shipped)
        return shipped
    logger.warning("no cached demo base model at %s: pre-training it now (once per machine, a few minutes)",
                   directory)
    pretrain_demo_model(cfg, directory)
    return directory


class PretrainRows(Dataset):
    """Row i of the pre-training stream, generated on demand and deterministic in (seed, i)."""

    def __init__(self, vlm: VLM, world: ShapesWorld, cfg: PretrainConfig):
        self.vlm, self.world, self.cfg = vlm, world, cfg
        self.scenes = [world.scene("pretrain", i) for i in range(world.num_pretrain_scenes)]
        self.images = [render(s, world.image_size) for s in self.scenes]
        self.generic = generic_sentences()

    def __len__(self) -> int:
        return self.cfg.num_steps * self.cfg.batch_size

    def row_text(self, index: int) -> tuple[int | None, str, str]:
        """Row `index` as (scene index, or None for a text-only row; prompt; completion)."""
        rng = random.Random(f"{self.cfg.seed}/pretrain-row/{index}")
        kind = rng.random()
        if kind < self.cfg.generic_fraction:  # text only, loss everywhere
            return None, "", rng.choice(self.generic)
        scene_idx = rng.randrange(len(self.scenes))
        scene = self.scenes[scene_idx]
        if kind < self.cfg.generic_fraction + self.cfg.caption_fraction:  # image -> caption
            return scene_idx, "", make_caption(scene, rng)
        # image + question -> answer, the prompt format ILLUME extends with ", seeing that"
        _, question, answer, _ = make_question(scene, rng)
        return scene_idx, answer_prompt(question), answer

    def __getitem__(self, index: int) -> dict:
        scene_idx, prompt, completion = self.row_text(index)
        return self.vlm.encode_row(None if scene_idx is None else self.images[scene_idx], prompt, completion)


class _StopAfter(TrainerCallback):
    """Ends training after `steps` optimizer steps, the schedule left as for the full run."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control


def pretrain_demo_model(cfg: RunConfig, out_dir: Path | None = None, stop_after: int | None = None) -> Path:
    """Pre-train the demo base model and save it (model + tokenizer + report) to `out_dir`.

    Args:
        stop_after: End after this many steps (the learning-rate schedule still that of `num_steps`): the
            start of the run, to check that the recipe reproduces a recorded loss curve.

    Returns:
        The folder the model was saved to (the cache folder by default).
    """
    out_dir = Path(out_dir) if out_dir is not None else demo_model_dir(cfg)
    if distributed.world_size() > 1:
        # Each process would train its own copy into the same cache folder, and a model pre-trained with
        # N processes differs from the one-process model the cache key promises.
        raise RuntimeError(f"the demo base model is not cached at {out_dir}: pre-train it once in a single "
                           "process first (`illume pretrain CONFIG` with the same overrides), then launch "
                           "several processes")
    pcfg = cfg.pretrain
    world = ShapesWorld(**asdict(cfg.data.shapes))
    vlm = DEMO_BUILDERS[cfg.model.kind](cfg.model, seed=pcfg.seed)
    vlm.set_trainable(everything=True)
    rows = PretrainRows(vlm, world, pcfg)
    work_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work_dir, ignore_errors=True)
    # Reported as the run's `pretrain` (RUN_DIR/tracking/pretrain), although the model is cached elsewhere.
    report = trainer_report(cfg, cfg.run_dir / "pretrain")
    args = trainer_arguments(
        work_dir, seed=pcfg.seed, report=report, max_steps=pcfg.num_steps, per_device_train_batch_size=pcfg.batch_size,
        learning_rate=pcfg.learning_rate, weight_decay=pcfg.weight_decay, warmup_steps=pcfg.warmup_steps,
        lr_scheduler_type="cosine", logging_steps=max(1, pcfg.num_steps // 20),
    )
    callbacks = report.callbacks() + ([_StopAfter(stop_after)] if stop_after is not None else [])
    trainer = Trainer(model=vlm.model, args=args, train_dataset=rows, data_collator=vlm.collate,
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    vlm.model.eval()
    vlm.save(work_dir)
    # hf: a base model without LoRA (frozen and zero here), so that each run adds its own (`model.lora`).
    shutil.rmtree(work_dir / ADAPTER_DIR, ignore_errors=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {"seconds": round(seconds, 1), "num_steps": pcfg.num_steps, "losses": losses,
              "num_parameters": sum(p.numel() for name, p in vlm.model.named_parameters() if "lora_" not in name)}
    (work_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    # Publish atomically: a crash mid-training never leaves a half-written cache that looks complete.
    shutil.rmtree(out_dir, ignore_errors=True)
    work_dir.rename(out_dir)
    return out_dir
