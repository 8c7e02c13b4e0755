"""Models built offline from configs, for the demo and the tests: no download, a second or two on CPU.

- `build_demo_vlm`: the demo's MAGMA architecture (a tiny GPT-J inside, sized by `model.*`) with the shapes
  world's word-level tokenizer, randomly initialised: what `illume.demo.pretrain` pre-trains, and the tests'
  tiny MAGMA.
- `build_tiny_hf_vlm`: a tiny random LLaVA or Qwen2-VL with LoRA, to run the `hf` backend's code paths.

They need the shapes world's vocabulary, which the backends in illume/models/ never import.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from illume.config import ModelConfig
from illume.data.shapes import vocabulary
from illume.models.hf import HFVLM, LANGUAGE_MODEL_PROJECTIONS, without_video
from illume.models.magma import MagmaForCausalLM, build_magma_config
from illume.models.vlm import MagmaVLM
from illume.models.word_tokenizer import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, UNK_TOKEN, build_word_tokenizer


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


def _tiny_tokenizer(words: list[str], image_tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer with the family's image tokens as extra special tokens."""
    # Re-wrapped, not extended: the processors take their image token from `tokenizer.image_token`, which
    # the demo tokenizer sets to its own `<|image|>`.
    word_level = build_word_tokenizer(words).backend_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=UNK_TOKEN, extra_special_tokens=image_tokens)


def build_tiny_hf_vlm(family: str, seed: int = 0, vocab: list[str] | None = None,
                      text_size: dict | None = None) -> HFVLM:
    """A randomly initialised tiny LLaVA or Qwen2-VL (2 layers, width 16/32), its processor and LoRA (r=4),
    built offline from configs in about a second.

    Args:
        family: "llava" (CLIP vision tower, 32 px images, 16 image tokens) or "qwen2_vl" (56 x 56 pixels per
            image at any aspect ratio, 4-6 image tokens).
        vocab: Words of the tokenizer; default: the shapes world's vocabulary.
        text_size: Overrides of the language model's config (e.g. {"hidden_size": 128, "num_hidden_layers":
            4}; scripts/bench_sampling.py sizes a LLaVA like the demo's MAGMA).
    """
    words = vocabulary() if vocab is None else vocab
    if family == "llava":
        tokenizer = _tiny_tokenizer(words, {"image_token": "<image>"})
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                crop_size={"height": 32, "width": 32})
        # 32 px / patch 8 = 16 patches + CLS; the "default" strategy drops CLS -> 16 image tokens.
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
            text_config=LlamaConfig(**{
                "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 256, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, **(text_size or {})}),
            image_token_id=tokenizer.image_token_id, image_seq_length=16, vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    elif family == "qwen2_vl":
        tokens = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
        tokenizer = _tiny_tokenizer(words, tokens)
        # min = max = 56 x 56 pixels: a (1, 4, 4) patch grid for square images, 4 image tokens after 2 x 2
        # merging (other aspect ratios: up to 6).
        image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
        processor = without_video(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
        config = Qwen2VLConfig(
            text_config={**dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256,
                             # head dim 8: 4 rotary frequencies split over (time, height, width)
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 1, 1]},
                             bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id), **(text_size or {})},
            vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=4, mlp_ratio=2),
            image_token_id=ids["image_token"], video_token_id=ids["video_token"],
            vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
        )
    else:
        raise ValueError(f"unknown tiny HF VLM family {family!r}; expected 'llava' or 'qwen2_vl'")
    torch.manual_seed(seed)
    base = AutoModelForImageTextToText.from_config(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_PROJECTIONS)
    model = get_peft_model(base, lora).eval()
    vlm = HFVLM(model, processor, tokenizer)
    vlm.set_trainable(adapters=True)
    return vlm
