"""Pre-train the demo base model for configs/demo.yaml and ship it with the package (illume/demo/assets).

    python scripts/ship_demo_model.py            # about 4 min on 2 cores; then commit illume/demo/assets/demo-base

Run it when a change makes tests/test_demo_asset.py fail (the demo's settings, the model code, the recipe or the
pre-training data changed). It pre-trains in ONE thread, as the asset records: thread counts change float sums,
and over 1,200 steps those give a visibly different model. `asset.json` records the settings hash
(`illume.demo.pretrain.demo_digest`), the settings themselves, the thread count, the library versions and the
weights' sha256; `pretrain_report.json` the loss curve the test reproduces.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from illume.config import load_config
from illume.demo.pretrain import SHIPPED_DEMO_MODEL, demo_digest, demo_settings, pretrain_demo_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"output_dir={tempfile.mkdtemp()}"])
    with tempfile.TemporaryDirectory() as tmp:
        made = pretrain_demo_model(cfg, Path(tmp) / "demo-base")
        shutil.rmtree(SHIPPED_DEMO_MODEL, ignore_errors=True)
        shutil.copytree(made, SHIPPED_DEMO_MODEL)
    weights = (SHIPPED_DEMO_MODEL / "model.safetensors").read_bytes()
    info = {"digest": demo_digest(cfg), "made_by": "python scripts/ship_demo_model.py", "threads": 1,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "model_sha256": hashlib.sha256(weights).hexdigest(), "settings": demo_settings(cfg)}
    (SHIPPED_DEMO_MODEL / "asset.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"shipped {SHIPPED_DEMO_MODEL} (settings hash {info['digest']}, {len(weights) / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    main()
