"""Pre-training the demo's base model on shapes-world captions and answers, and caching it.

The demo needs what MAGMA brings to VQA-X: a VLM that describes images and answers questions but was never
taught rationales in the `, seeing that` format. So the model sees captions (image -> plain clauses stating
the facts), question/answer rows (`Q: ... A: answer`, loss on the answer) and a few generic text-only
"X, seeing that Y" sentences that are never about an image. Whatever rationales it then writes for an
ILLUME prompt are latent ability, imperfect, as the paper's round 0 is.

All weights train here (the ILLUME loop later trains adapters only). The result is cached in the per-user
cache (`illume.config.cache_root`: `model.cache_dir`, $ILLUME_CACHE, $XDG_CACHE_HOME/illume or
~/.cache/illume) keyed by a hash of every setting that changes it, so the demo pre-trains once per machine,
whatever the working folder: `ensure_demo_model` (called by `illume.loading.load_vlm` when a config names no
model) pre-trains only when that folder is missing. The architecture itself is `illume.demo.tiny_models
.build_demo_vlm`.

The base model of configs/demo.yaml's settings ships with the package (`SHIPPED_DEMO_MODEL`, 5.9 MB): a new
machine runs the demo at once instead of pre-training for about 8 minutes on 2 cores first. It is what
`illume pretrain configs/demo.yaml --force` makes (its `asset.json` records how it was made); the tests check
that its settings hash is the demo config's and that the recipe still reproduces its recorded loss curve
(tests/test_demo_asset.py). Other settings pre-train as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from illume import distributed
from illume.collate import collate_rows
from illume.config import PretrainConfig, RunConfig, cache_root
from illume.data.shapes import ShapesWorld, generic_sentences, make_caption, make_question, render
from illume.demo.tiny_models import build_demo_vlm
from illume.models.vlm import MagmaVLM
from illume.tracking import trainer_report
from illume.training import trainer_arguments

logger = logging.getLogger(__name__)

# Bump when the pre-training data or recipe changes in a way the config hash cannot see.
DEMO_MODEL_KIND = "magma"
"""The backend of the demo base model: a config of this model.kind without a model.path means it."""

PRETRAIN_RECIPE_VERSION = 1

# Model settings added after demo caches existed, with their defaults: left out of the cache key while at the
# default (the model is then the same, so existing caches stay valid); any other value enters the key.
_LATER_MODEL_FIELDS = {("lm", "vocab_size"): None, ("lm", "activation"): "gelu"}


SHIPPED_DEMO_MODEL = Path(__file__).parent / "assets" / "demo-base"
"""The demo base model for configs/demo.yaml, shipped (see the module docstring); `asset.json` names the
settings hash it was pre-trained for."""


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
    """Cache folder of the demo base model for these settings."""
    return cache_root(cfg.model) / f"demo-base-{demo_digest(cfg)}"


def shipped_demo_model(cfg: RunConfig) -> Path | None:
    """The shipped demo base model when it was pre-trained for exactly these settings, else None."""
    info = SHIPPED_DEMO_MODEL / "asset.json"
    if not info.is_file():
        return None
    return SHIPPED_DEMO_MODEL if json.loads(info.read_text())["digest"] == demo_digest(cfg) else None


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

    def __init__(self, vlm: MagmaVLM, world: ShapesWorld, cfg: PretrainConfig):
        self.vlm, self.world, self.cfg = vlm, world, cfg
        self.scenes = [world.scene("pretrain", i) for i in range(world.num_pretrain_scenes)]
        self.pixel_values = vlm.pixel_values([render(s, world.image_size) for s in self.scenes])
        self.generic = generic_sentences()

    def __len__(self) -> int:
        return self.cfg.num_steps * self.cfg.batch_size

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.cfg.seed}/pretrain-row/{index}")
        eos = self.vlm.eos_token_id
        kind = rng.random()
        if kind < self.cfg.generic_fraction:  # text only, loss everywhere
            ids = self.vlm.text_ids(rng.choice(self.generic)) + [eos]
            return {"input_ids": ids, "labels": ids, "pixel_values": None}
        scene_idx = rng.randrange(len(self.scenes))
        scene = self.scenes[scene_idx]
        if kind < self.cfg.generic_fraction + self.cfg.caption_fraction:  # image -> caption
            prompt = self.vlm.prompt_ids("")
            target = self.vlm.text_ids(make_caption(scene, rng)) + [eos]
        else:  # image + question -> answer, the prompt format ILLUME extends with ", seeing that"
            _, question, answer, _ = make_question(scene, rng)
            prompt = self.vlm.prompt_ids(f"Q: {question} A:")
            target = self.vlm.text_ids(answer) + [eos]
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
                "pixel_values": self.pixel_values[scene_idx]}


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
    vlm = build_demo_vlm(cfg.model, seed=pcfg.seed)
    vlm.model.set_trainable(everything=True)
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
    trainer = Trainer(model=vlm.model, args=args, train_dataset=rows,
                      data_collator=partial(collate_rows, pad_token_id=vlm.pad_token_id), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    vlm.model.eval()
    vlm.save(work_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {"seconds": round(seconds, 1), "num_steps": pcfg.num_steps, "losses": losses,
              "num_parameters": sum(p.numel() for p in vlm.model.parameters())}
    (work_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    # Publish atomically: a crash mid-training never leaves a half-written cache that looks complete.
    shutil.rmtree(out_dir, ignore_errors=True)
    work_dir.rename(out_dir)
    return out_dir
