"""Models built offline from configs, for the demo and the tests: no download, a second or two on CPU.

- `build_demo_vlm`: the demo's MAGMA architecture (a tiny GPT-J inside, sized by `model.*`) with the shapes
  world's word-level tokenizer, randomly initialised: what `illume.demo.pretrain` pre-trains, and the tests'
  tiny MAGMA.
- `build_tiny_hf_vlm`: a tiny random VLM of one of eleven HF families (LLaVA, Qwen2-VL, Idefics3, Gemma3,
  ...; `FAMILIES`) with LoRA, to run the `hf` backend's code paths.

They need the shapes world's vocabulary, which the backends in illume/models/ never import.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from illume.config import ModelConfig
from illume.data.shapes import vocabulary
from illume.demo.tiny_families import TINY_FAMILIES
from illume.models.hf import HFVLM, LANGUAGE_MODEL_PROJECTIONS
from illume.models.magma import MagmaForCausalLM, build_magma_config
from illume.models.vlm import MagmaVLM
from illume.models.word_tokenizer import IMAGE_TOKEN, build_word_tokenizer

FAMILIES = tuple(TINY_FAMILIES)
"""The HF VLM families `build_tiny_hf_vlm` builds (each family's `config.model_type`)."""


def build_demo_vlm(model_cfg: ModelConfig, seed: int = 0) -> MagmaVLM:
    """A randomly initialised MAGMA-architecture model with a tiny GPT-J and the shapes-world tokenizer."""
    tokenizer = build_word_tokenizer(vocabulary())
    config = build_magma_config(
        model_cfg, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MagmaForCausalLM(config).eval()
    model.set_trainable(adapters=True)
    return MagmaVLM(model, tokenizer)


def build_tiny_hf_vlm(family: str, seed: int = 0, vocab: list[str] | None = None,
                      text_size: dict | None = None) -> HFVLM:
    """A randomly initialised tiny VLM of one of `FAMILIES` (2 layers, width 16-32), its processor (chat
    template included) and LoRA (r=4) on the language model's projections, built offline from configs in
    about a second (illume.demo.tiny_families has each family's sizes and image tokens).

    Args:
        family: One of `FAMILIES`, e.g. "llava" (CLIP vision tower, 32 px images, 16 image tokens) or
            "qwen2_vl" (56 x 56 pixels per image at any aspect ratio, 4-6 image tokens).
        vocab: Words of the tokenizer; default: the shapes world's vocabulary.
        text_size: Overrides of the language model's config (e.g. {"hidden_size": 128, "num_hidden_layers":
            4}; scripts/bench_sampling.py sizes a LLaVA like the demo's MAGMA).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny HF VLM family {family!r}; expected one of {FAMILIES}")
    parts = TINY_FAMILIES[family](vocabulary() if vocab is None else vocab, text_size or {})
    torch.manual_seed(seed)
    base = AutoModelForImageTextToText.from_config(parts.config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_PROJECTIONS)
    model = get_peft_model(base, lora).eval()
    vlm = HFVLM(model, parts.processor, parts.processor.tokenizer)
    vlm.set_trainable(adapters=True)
    return vlm
