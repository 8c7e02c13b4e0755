"""Pre-train a demo base model for its demo config and ship it with the package (illume/demo/assets).

    python scripts/ship_demo_model.py         # MAGMA, configs/demo.yaml: about 4 min on 2 cores -> assets/demo-base
    python scripts/ship_demo_model.py --hf    # HF (a tiny Qwen2-VL), configs/demo_hf.yaml -> assets/demo-hf

then commit the asset folder. Run it when a change makes tests/test_demo_asset.py (MAGMA) or tests/test_demo_hf.py
(HF) fail (the demo's settings, the model code, the recipe or the pre-training data changed). It pre-trains in
ONE thread, as the asset records: thread counts change float sums, and over hundreds of steps those give a
visibly different model. `asset.json` records the settings hash (`illume.demo.pretrain.demo_digest`), the settings
themselves, the thread count, the library versions and the weights' sha256; `pretrain_report.json` the loss curve
the test reproduces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers

from illume.config import load_config
from illume.demo.pretrain import SHIPPED_DEMO_MODELS, demo_digest, demo_settings, pretrain_demo_model

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", action="store_true", help="the HF demo model (configs/demo_hf.yaml)")
    args = parser.parse_args(argv)
    config = REPO / "configs" / ("demo_hf.yaml" if args.hf else "demo.yaml")
    torch.set_num_threads(1)
    cfg = load_config(config, [f"output_dir={tempfile.mkdtemp()}"])
    shipped = SHIPPED_DEMO_MODELS[cfg.model.kind]
    with tempfile.TemporaryDirectory() as tmp:
        made = pretrain_demo_model(cfg, Path(tmp) / shipped.name)
        shutil.rmtree(shipped, ignore_errors=True)
        shutil.copytree(made, shipped)
    weights = (shipped / "model.safetensors").read_bytes()
    info = {"digest": demo_digest(cfg), "made_by": "python scripts/ship_demo_model.py" + (" --hf" if args.hf else ""),
            "config": str(config.relative_to(REPO)), "threads": 1, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": sys.version.split()[0],
            "model_sha256": hashlib.sha256(weights).hexdigest(), "settings": demo_settings(cfg)}
    (shipped / "asset.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(path.stat().st_size for path in shipped.iterdir())
    print(f"shipped {shipped} (settings hash {info['digest']}, {len(weights) / 1e6:.1f} MB of weights, "
          f"{size / 1e6:.1f} MB in all)")


if __name__ == "__main__":
    main()
