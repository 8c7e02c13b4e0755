"""A saved reward model names its base model's folder; `load_saved_vlm` loads it by the backend the folder
shows (an HF VLM's LoRA folder, else MAGMA), so reward/ never asks which backend it has."""

import pytest
import torch

from illume.demo.pretrain import SHIPPED_DEMO_MODELS
from illume.demo.tiny_models import build_tiny_hf_vlm
from illume.models.hf import HFVLM
from illume.models.loading import load_saved_vlm
from illume.models.vlm import MagmaVLM
from illume.models.weights import WeightsFileError


def test_a_saved_hf_vlm_loads_as_itself(tmp_path):
    vlm = build_tiny_hf_vlm("qwen2_vl")
    vlm.save(tmp_path / "hf")
    loaded = load_saved_vlm(tmp_path / "hf")
    assert isinstance(loaded, HFVLM)
    assert torch.equal(loaded.model.get_base_model().lm_head.weight, vlm.model.get_base_model().lm_head.weight)


def test_a_saved_magma_loads_as_magma_and_is_verified(tmp_path):
    assert isinstance(load_saved_vlm(SHIPPED_DEMO_MODELS["magma"]), MagmaVLM)
    damaged = tmp_path / "magma"
    damaged.mkdir()
    for path in SHIPPED_DEMO_MODELS["magma"].iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # cut short
    with pytest.raises(WeightsFileError, match="model.safetensors"):
        load_saved_vlm(damaged)
