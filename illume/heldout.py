"""A finished run's models scored on a held-out split (test) that no epoch or setting choice saw.

Every round keeps the epoch with the best val score, and a study picks its settings on val too, so val scores
of the kept models are optimistic; the study reports these instead. Each trained round's folder holds the
adapters of its kept epoch (`round_NN/adapters.safetensors`; the supervised baseline's in `supervised/`):
loading them into the base model gives that round's model exactly, so one base model is loaded and the
folders are swapped in one after another.

Scores are cached in RUN_DIR/heldout_<split>.json by folder, so asking again (or after a stop) scores only
what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from illume.config import RunConfig
from illume.data.datasets import load_split
from illume.evaluation import explanation_scores
from illume.loading import load_vlm
from illume.models.weights import load_trainable_weights
from illume.training import ADAPTERS_FILE

BASE = "base"


def trained_folders(run_dir: Path) -> list[str]:
    """The run's folders that hold a kept epoch's adapters, in round order (the supervised one last)."""
    folders = sorted(p.parent.name for p in run_dir.glob(f"round_*/{ADAPTERS_FILE}"))
    if (run_dir / "supervised" / ADAPTERS_FILE).is_file():
        folders.append("supervised")
    return folders


def heldout_scores(cfg: RunConfig, folders: list[str] | None = None, split: str = "test",
                   progress: bool = False) -> dict[str, dict]:
    """{folder: explanation_scores on `split`} for "base" (the model before any round) and `folders`
    (default: every trained folder of cfg.run_dir).

    Raises:
        FileNotFoundError: a named folder has no adapters (the run did not train it).
    """
    run_dir = cfg.run_dir
    folders = [BASE, *trained_folders(run_dir)] if folders is None else folders
    cache_path = run_dir / f"heldout_{split}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    missing = [f for f in folders if f not in cache]
    for folder in missing:
        if folder != BASE and not (run_dir / folder / ADAPTERS_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / folder / ADAPTERS_FILE}: no kept adapters to score on {split}")
    if missing:
        examples = load_split(cfg.data, split, images_must_exist=True)
        vlm = load_vlm(cfg)
        # The base model first, before any folder's adapters are loaded into it.
        for folder in sorted(missing, key=lambda f: f != BASE):
            if folder != BASE:
                load_trainable_weights(vlm.model, run_dir / folder / ADAPTERS_FILE)
            vlm.model.eval()
            cache[folder] = explanation_scores(vlm, examples, cfg.sample, progress=progress)
            tmp = cache_path.with_suffix(".tmp")  # written after each folder: a stop loses at most one
            tmp.write_text(json.dumps(cache, indent=2, sort_keys=True))
            tmp.replace(cache_path)
    return {folder: cache[folder] for folder in folders}
