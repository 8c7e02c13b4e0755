"""Tiny random VLMs of eleven HF families, built offline: config, processor and chat template all in code.

`build_tiny_hf_vlm` (illume.demo.tiny_models) turns a family's `TinyParts` into a PEFT model with LoRA. Each
family here has 2 layers, widths 16-32, images of 32-64 pixels and 4-36 image tokens per image, so a row of
the shapes world stays under ~100 tokens and a model builds in well under a second.

Every tokenizer is the shapes world's word-level tokenizer re-wrapped with the family's special tokens (image
tokens and the chat template's markers, as extra special tokens: each is one token). Image processors are the
PIL ones (`*ImageProcessorPil`), and processors that own a video processor are built `without_video`: video
processors need torchvision.

The chat templates are written here, modelled on each family's released template (same markers, same image
placement, same generation prompt), without tools or videos. They render `{"type": "image"}` parts as the
family's image placeholder and text parts as text (string contents too); `continue_final_message` works as
transformers implements it (the rendered text is cut after the final message's text). PaliGemma is a base
model and has none: its processor writes `<image>` x N + BOS + prefix + "\n", and a `suffix` + EOS after.

Not here:
- Mistral3 (Mistral-Small-3.1): its processor, `PixtralProcessor`, cannot be imported without torchvision
  (processing_pixtral imports image_processing_pixtral, which imports torchvision), so neither a tiny nor a
  released Mistral3 loads in the `hf` backend here. Its model builds from a config, and LoRA
  (`LANGUAGE_MODEL_PROJECTIONS`) lands on its language model only.
- SmolVLM builds only where the `num2words` package is installed (its processor refuses to start without it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3Processor,
    GemmaConfig,
    Idefics3Config,
    Idefics3Processor,
    InternVLConfig,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    MistralConfig,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from illume.models.hf import without_video
from illume.models.word_tokenizer import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_word_tokenizer


@dataclass
class TinyParts:
    """What a family's builder returns; `build_tiny_hf_vlm` seeds, builds the model and adds LoRA."""

    processor: ProcessorMixin
    """The processor, chat template included; its `tokenizer` is the model's tokenizer."""
    config: PretrainedConfig
    """The model's config (vocabulary sized to the tokenizer after the processor added its tokens)."""


def _tiny_tokenizer(words: list[str], special_tokens: dict[str, str],
                    bos_token: str | None = None) -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer with the family's image and chat tokens as extra special tokens."""
    # Re-wrapped, not extended: the processors take their image token from `tokenizer.image_token`, which
    # the demo tokenizer sets to its own `<|image|>`. Named extra special tokens become attributes
    # (`tokenizer.image_token`, `tokenizer.image_token_id`), which several processors read.
    word_level = build_word_tokenizer(words).backend_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=UNK_TOKEN, bos_token=bos_token,
                                   extra_special_tokens=special_tokens)


def _ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


# A 2-layer text model of width 32 (4 heads of 8, 2 KV heads) and a 2-layer vision tower of width 16.
_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}
_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}

# --- Chat templates ----------------------------------------------------------------------------------------
# Jinja, as the released checkpoints ship them (chat_template.json), cut down to text and images. A message's
# content may be a string or a list of parts (`{"type": "image"}`, `{"type": "text", "text": ...}`).

_LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-*-hf: "USER: <image>\n... ASSISTANT: ..."
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}"
    "{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ part['text'] + ' ' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_LLAVA_NEXT_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n... [/INST] ...</s> "
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '<<SYS>>\n' + (message['content'] if message['content'] is string else message['content'][0]['text'])"
    " + '\n<</SYS>>\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}"
    "{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + (message['content'] if message['content'] is string else message['content'][-1]['text'])"
    " + eos_token + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# llava-hf/llava-onevision-qwen2-*-hf: "<|im_start|>user <image>\n...<|im_end|>"
_LLAVA_ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{%- if message['content'] is string -%}{{ '\n' + message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}"
    "{{ '<image>' }}{%- endfor -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ '\n' + part['text'] }}"
    "{%- endfor -%}"
    "{%- endif -%}{{ '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _chatml_template(image: str, default_system: str | None = None) -> str:
    """ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), the format of Qwen2-VL / Qwen2.5-VL (which open with a
    default system message), Qwen3-VL and InternVL (`<IMG_CONTEXT>\\n` per image)."""
    system = ("" if default_system is None else
              "{%- if messages[0]['role'] != 'system' -%}"
              "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{%- endif -%}")
    return (
        system +
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _idefics_template(bos: str) -> str:
    """Idefics3 (opening with `<|begin_of_text|>`) and SmolVLM (`<|im_start|>`):
    "User:<image>...<end_of_utterance>\\nAssistant:"."""
    return (
        bos +
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}"
        "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
        "{%- else -%}"
        "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}{{ '<end_of_utterance>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    )


_GEMMA3_TEMPLATE = (  # google/gemma-3-*-it: "<bos><start_of_turn>user\n<start_of_image>...<end_of_turn>\n"
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = (messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'][0]['text']) + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# --- The families ------------------------------------------------------------------------------------------
# Each builder takes the tokenizer's words and overrides of the text config (`text_size`).

def _llava(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # 32 px / patch 8 = 16 patches + CLS; the "default" strategy drops CLS -> 16 image tokens.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_LLAVA_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(**{
            "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **text_size}),
        image_token_id=tokenizer.image_token_id, image_seq_length=16, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return TinyParts(processor, config)


def _llava_next(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {"image_token": "<image>", "inst_token": "[INST]",
                                        "inst_end_token": "[/INST]"})
    # "anyres" with one grid point: the 32 px overview plus one 32 px tile, both through a CLIP tower of
    # patch 8; image tokens: 16 (overview, CLS dropped) + the tile's 4 x 4 patches unpadded to the image's
    # aspect ratio with a newline per row: 36 for a square image, fewer for others (28 for 40 x 56).
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=[[32, 32]])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_LLAVA_NEXT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=MistralConfig(**{**_TEXT, **_ids(tokenizer), **text_size}),
        image_token_index=tokenizer.image_token_id, image_grid_pinpoints=[[32, 32]], image_seq_length=16,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return TinyParts(processor, config)


def _llava_onevision(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {"image_token": "<image>", "video_token": "<video>",
                                        "im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>"})
    # As LLaVA-NeXT, with a SigLIP tower (no CLS, the "full" strategy): 16 + 16 + 4 = 36 tokens for a square
    # image, fewer for others.
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=[[32, 32]])
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        vision_feature_select_strategy="full", chat_template=_LLAVA_ONEVISION_TEMPLATE)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8, vision_use_head=False),
        text_config=Qwen2Config(**{**_TEXT, **_ids(tokenizer), **text_size}),
        image_token_index=tokenizer.image_token_id, video_token_index=tokenizer.video_token_id,
        image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    return TinyParts(processor, config)


_QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_CHATML_TOKENS = {"im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>"}


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in _QWEN_TOKENS.items()}


def _qwen2_vl(words: list[str], text_size: dict) -> TinyParts:
    # With the ChatML markers as single tokens, so that the chat format's end of turn is one token (as in the
    # released Qwen2-VL's vocabulary).
    tokenizer = _tiny_tokenizer(words, {**_QWEN_TOKENS, **_CHATML_TOKENS})
    # min = max = 56 x 56 pixels: a (1, 4, 4) patch grid for square images, 4 image tokens after 2 x 2
    # merging (other aspect ratios: up to 6).
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    processor = without_video(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=_chatml_template(_QWEN_IMAGE, default_system="You are a helpful assistant."))
    config = Qwen2VLConfig(
        text_config={**dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256,
                            # head dim 8: 4 rotary frequencies split over (time, height, width)
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [2, 1, 1]},
                            bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id), **text_size},
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=4, mlp_ratio=2),
        **_qwen_ids(tokenizer),
    )
    return TinyParts(processor, config)


def _qwen2_5_vl(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {**_QWEN_TOKENS, **_CHATML_TOKENS})
    # Patch 14, 2 x 2 merging: 56 x 56 pixels give 4-6 image tokens (as Qwen2-VL); windowed attention in
    # the vision tower's first block, full attention in its second.
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
                                               patch_size=14)
    processor = without_video(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=_chatml_template(_QWEN_IMAGE, default_system="You are a helpful assistant."))
    config = Qwen2_5_VLConfig(
        text_config={**_TEXT, **_ids(tokenizer), "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}, **text_size},
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=4, out_hidden_size=32,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1]),
        **_qwen_ids(tokenizer),
    )
    return TinyParts(processor, config)


def _qwen3_vl(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {**_QWEN_TOKENS, **_CHATML_TOKENS})
    # Patch 16, 2 x 2 merging: 64 x 64 pixels give 4 image tokens (other aspect ratios: up to 6); learned
    # position embeddings on a 4 x 4 grid; the first block's features also go to the first text layer
    # ("deepstack").
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64},
                                               patch_size=16)
    processor = without_video(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                chat_template=_chatml_template(_QWEN_IMAGE))
    config = Qwen3VLConfig(
        text_config={**_TEXT, **_ids(tokenizer), "head_dim": 8, "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}, **text_size},
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=4, out_hidden_size=32,
                           patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_qwen_ids(tokenizer),
    )
    return TinyParts(processor, config)


_IDEFICS_TOKENS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                   "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}


def _idefics3(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, _IDEFICS_TOKENS, bos_token="<|begin_of_text|>")
    # No splitting into tiles: each image resized to 64 x 64, 8 x 8 patches of 8 px, pixel-shuffled 2 x 2 ->
    # 16 image tokens, wrapped as <fake_token_around_image><global-img><image> x 16<fake_token_around_image>.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 64}, do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16,
                                  chat_template=_idefics_template("<|begin_of_text|>"))
    config = Idefics3Config(
        vision_config={**_VISION, "image_size": 64, "patch_size": 8},
        text_config=LlamaConfig(**{**_TEXT, **_ids(tokenizer), **text_size}),
        image_token_id=processor.image_token_id, scale_factor=2,
    )
    return TinyParts(processor, config)


def _smolvlm(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {**_IDEFICS_TOKENS, "im_start_token": "<|im_start|>"},
                                bos_token="<|im_start|>")
    # As Idefics3 (SmolVLM is Idefics3 with a SmolLM2 text model): 16 image tokens per image.
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 64},
                                               do_image_splitting=False)
    processor = without_video(SmolVLMProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16,
        chat_template=_idefics_template("<|im_start|>"))
    config = SmolVLMConfig(
        vision_config={**_VISION, "image_size": 64, "patch_size": 8},
        text_config=LlamaConfig(**{**_TEXT, **_ids(tokenizer), **text_size}),
        image_token_id=processor.image_token_id, scale_factor=2,
    )
    return TinyParts(processor, config)


def _gemma3(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                        "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
                                        "eot_token": "<end_of_turn>"}, bos_token="<bos>")
    # 32 px, SigLIP patch 8 (4 x 4 patches) average-pooled to 2 x 2 = 4 soft tokens; a prompt's
    # <start_of_image> becomes "\n\n<start_of_image><image_soft_token> x 4<end_of_image>\n\n".
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=_GEMMA3_TEMPLATE)
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8, vision_use_head=False),
        # One sliding-window layer (a window shorter than a row, as Gemma3's 1024 is shorter than long
        # prompts) and one global layer, Gemma3's two kinds (5 : 1 in the released models).
        text_config={**_TEXT, **_ids(tokenizer), "head_dim": 8, "query_pre_attn_scalar": 8,
                     "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                     **text_size},
        mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    return TinyParts(processor, config)


def _internvl(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                        "end_image_token": "</img>", "video_token": "<video>",
                                        **_CHATML_TOKENS})
    # Tiles of 32 px, 4 x 4 patches of 8 px each, pixel-shuffled by 0.5 -> 4 image tokens per tile. The
    # processor crops an image into the grid of at most 2 tiles closest to its aspect ratio, plus a thumbnail
    # when that is more than one tile: <img><IMG_CONTEXT> x 4 (or x 12)</img>.
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=2)
    processor = without_video(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
        chat_template=_chatml_template("<IMG_CONTEXT>\n"))
    config = InternVLConfig(
        vision_config={**_VISION, "image_size": [32, 32], "patch_size": [8, 8]},
        text_config=Qwen2Config(**{**_TEXT, **_ids(tokenizer), **text_size}),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=4, downsample_ratio=0.5,
    )
    return TinyParts(processor, config)


def _paligemma(words: list[str], text_size: dict) -> TinyParts:
    tokenizer = _tiny_tokenizer(words, {"image_token": "<image>"}, bos_token="<bos>")
    # 32 px, SigLIP patch 8: 16 image tokens, put before BOS and the prefix by the processor.
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    # The processor adds PaliGemma's 1024 <locNNNN> and 128 <segNNN> tokens to the vocabulary.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8, projection_dim=32,
                                         vision_use_head=False),
        text_config=GemmaConfig(**{**_TEXT, **_ids(tokenizer), "head_dim": 8, **text_size}),
        image_token_index=tokenizer.image_token_id, projection_dim=32, hidden_size=32,
    )
    return TinyParts(processor, config)


TINY_FAMILIES: dict[str, Callable[[list[str], dict], TinyParts]] = {
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision, "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "idefics3": _idefics3, "smolvlm": _smolvlm,
    "gemma3": _gemma3, "internvl": _internvl, "paligemma": _paligemma,
}
"""Builders by family (= the model's `config.model_type`)."""
