"""The `hf` backend: any `AutoModelForImageTextToText` VLM (LLaVA, Qwen2-VL, Idefics3/SmolVLM, ...) with LoRA.

Layout of a row (the same for every family, no chat template): the image placeholder, then ILLUME's plain-text
prompt, then the completion and EOS:

    LLaVA:     "<image>\\nQ: What colour is the circle? A: red, seeing that" + " the circle is red" + EOS
    Qwen2-VL:  "<|vision_start|><|image_pad|><|vision_end|>Q: ..." + " the circle is red" + EOS
    others:    processor.image_token + "Q: ..." + completion + EOS

The processor expands the placeholder into as many image tokens as the model needs for that image. ILLUME's
prompt is itself the format the model is tuned on, so a chat template would only add tokens; without one, the
prompt's encoding is by construction the prefix of the full row's encoding, and generation from the prompt
continues exactly where training's completion starts.

Only the language model's attention/MLP projections get LoRA; the vision tower stays frozen, the multimodal
projector trains on request (`set_trainable(prefix=True)`).

The VLM protocol's backend operations (illume.models.vlm): `decode` runs `generate` with our Gumbel-max logits
processor (per-row temperatures, per-example generators, as MAGMA's decoding draws), each prompt pre-filled
once (image included) and its KV cache repeated per candidate (`SHARED_PREFILL_FAMILIES`); the reward head reads
the model's own last hidden states (`last_hidden_states`), each row with its own image inputs. Tiny random
LLaVA / Qwen2-VL models for tests are built by `illume.demo.tiny_models.build_tiny_hf_vlm`.

transformers 5.23 without torchvision (which would pull a CUDA torch): image processors fall back to their PIL
classes (`*ImageProcessorPil`), but processors that also own a video processor (Qwen2-VL, Qwen2.5-VL,
SmolVLM, ...) cannot be built or loaded, since video processors need torchvision. `without_video` gives
such a processor class without its video slot; we never pass videos.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from illume.models.logits_filters import filter_logits, filters_active
from illume.models.weights import check_finite, record_digests, verify_digests
from illume.prompts import ChatStyle, ChatTurns

ADAPTER_DIR = "adapter"
"""Subfolder of a saved model holding the LoRA weights (kept apart from the base model's files, because
`from_pretrained` would otherwise find `adapter_config.json` and attach the adapter itself)."""

LANGUAGE_MODEL_PROJECTIONS = (r".*(language_model|text_model).*\."
                              r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
"""LoRA targets: the language model's attention and MLP projections. The language model is `language_model`
(LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma3, InternVL, Mistral3, PaliGemma)
or `text_model` (Idefics3, SmolVLM). Vision towers with projections of the same names do not match:
SigLIP/CLIP (`vision_tower`, `vision_model`: q/k/v_proj), InternViT (`vision_tower`: q/k/v_proj), Pixtral
(`vision_tower`: q/k/v/o_proj and gate/up/down_proj), Qwen2.5-VL's (`visual`: gate/up/down_proj); tested per
family in tests/test_families.py."""

DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": LANGUAGE_MODEL_PROJECTIONS}

PROJECTOR_MODULES = ("multi_modal_projector", "image_newline", "visual.merger",
                     "visual.deepstack_merger_list", "connector")
"""The multimodal projector (image features -> LM width), as substrings of parameter names:
`multi_modal_projector` (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma3, InternVL, Mistral3, PaliGemma), with
`image_newline` (LLaVA-NeXT, LLaVA-OneVision: the learned embedding that ends each row of image features);
`visual.merger` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and `visual.deepstack_merger_list` (Qwen3-VL: the mergers
that feed vision features to the first text layers); `connector` (Idefics3, SmolVLM)."""

_MARKER = "\x00illume\x00"
"""Text no template writes: where a rendered assistant turn's content ends (`HFVLM._apply_template`)."""

_QWEN_IMAGE = "<|vision_start|>{image_token}<|vision_end|>"  # Qwen's chat template wraps the image pads so
IMAGE_PLACEHOLDERS = {
    "llava": "{image_token}\n",  # LLaVA-1.5 was trained with a newline after the image
    "llava_next": "{image_token}\n",  # as LLaVA-1.5: "[INST] <image>\n..."
    "llava_onevision": "{image_token}\n",  # "<|im_start|>user <image>\n..."
    "internvl": "{image_token}\n",  # "<|im_start|>user\n<IMG_CONTEXT>\n..."
    "qwen2_vl": _QWEN_IMAGE,
    "qwen2_5_vl": _QWEN_IMAGE,
    "qwen3_vl": _QWEN_IMAGE,
}
"""Text put in front of the prompt, by `config.model_type`, as the family's chat template puts it around the
image; other families: the processor's image token alone, text right after it, as their templates have it
(Idefics3, SmolVLM: "User:<image>..."; Gemma3: "<start_of_image>...", which the processor wraps in blank
lines; Mistral3: "[INST][IMG]..."; PaliGemma: "<image>", to which the processor adds BOS before and "\n" after
the prompt, PaliGemma's prefix format)."""


@dataclass
class HFVLM:
    """A PEFT-wrapped HF VLM with its processor; `encode_row` builds rows, `collate` batches them.

    Prompts come as ILLUME's plain text (illume.prompts) in either format: `chat` None writes them after the
    image placeholder as they are; a `ChatStyle` renders them as a conversation through the processor's own
    `apply_chat_template` (`render`).
    """

    model: PreTrainedModel
    """The PEFT model (LoRA on the language model's projections)."""
    processor: ProcessorMixin
    tokenizer: PreTrainedTokenizerBase
    chat: ChatStyle | None = None
    """The chat format's style (`prompt.format: chat`); None: the plain format."""
    answer_stops = ("\n", ",")
    """Chat-tuned VLMs end an answer with a newline as often as with EOS."""

    @functools.cached_property
    def eos_token_id(self) -> int:
        """The token that ends a completion: EOS in the plain format, the template's end of the assistant's turn
        in the chat format (`<|im_end|>`, `<end_of_turn>`, ...; EOS when the template writes none)."""
        if self.chat is None:
            return self.tokenizer.eos_token_id
        text = self._apply_template(ChatTurns("x"), _MARKER)
        tail = self.tokenizer(text[text.rindex(_MARKER) + len(_MARKER):], add_special_tokens=False)["input_ids"]
        return tail[0] if tail else self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        # Several VLM tokenizers have no pad token; padded positions are masked anyway.
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    @property
    def image_token_id(self) -> int:
        """The token the model fills with image features: the config's (Gemma 3's processor names the
        token that opens an image, `<start_of_image>`), else the processor's."""
        config = self.model.get_base_model().config
        for key in ("image_token_id", "image_token_index"):
            if getattr(config, key, None) is not None:
                return getattr(config, key)
        return self.processor.image_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_placeholder(self) -> str:
        model_type = self.model.get_base_model().config.model_type
        template = IMAGE_PLACEHOLDERS.get(model_type, "{image_token}")
        return template.format(image_token=self.processor.image_token)

    @property
    def max_length(self) -> int | None:
        """The most tokens a row may have: the language model's `max_position_embeddings` (None: unknown)."""
        config = self.model.get_base_model().config
        return getattr(config.get_text_config(), "max_position_embeddings", None)

    def check_length(self, length: int, image_tokens: int) -> None:
        """Rows are never truncated, since a cut would fall in the image tokens or leave a completion without
        its prompt (TRL refuses to truncate VLM prompts for the first reason); a row longer than the model
        reads is an error."""
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"a row of {length} tokens ({image_tokens} of them the image's) is longer than the "
                             f"model's {self.max_length} positions; illume does not truncate rows (the image "
                             f"tokens would be cut): use smaller images (the processor's size settings), a shorter "
                             f"prompt or sample.max_new_tokens")

    # --- prompts: the text the processor reads

    def _apply_template(self, turns: ChatTurns, reply: str | None = None, image: bool = True) -> str:
        """The processor's chat template over one user turn (image unless not `image`, then text) and, when
        `reply` is given, the assistant's turn holding it (closed), else the assistant's turn up to the end of
        `turns.reply` (left open, empty or not).

        The open turn is the closed one cut where its text ends (a marker's place), so it is by construction
        the prefix of the whole conversation as the template writes it. Not `add_generation_prompt`: some
        templates open an assistant turn in a conversation otherwise than in their generation prompt
        (LLaVA-OneVision: "assistant \\n" vs "assistant\\n"), and the model continues what training showed it.
        """
        text = [{"type": "text", "text": turns.user}]
        user = {"role": "user", "content": [{"type": "image"}, *text] if image else text}
        closed = turns.reply + _MARKER if reply is None else reply
        messages = [user, {"role": "assistant", "content": [{"type": "text", "text": closed}]}]
        rendered = self.processor.apply_chat_template(messages, tokenize=False)
        return rendered if reply is not None else rendered[:rendered.rindex(_MARKER)]

    def render(self, prompt: str, image: bool = True) -> str:
        """The text of a prompt as the processor reads it (image placeholder unexpanded): the plain format's
        placeholder + prompt, or the chat template's conversation up to where the model continues; without
        `image`, the same without the image."""
        if self.chat is None:
            return self.image_placeholder + prompt if image else prompt
        return self._apply_template(self.chat.turns(prompt), image=image)

    def _reply_length(self, prompt: str) -> int:
        """How many of the prompt's last tokens are the assistant's (the chat format's `connective`): they are
        the model's words, so training labels them."""
        if self.chat is None:
            return 0
        turns = self.chat.turns(prompt)
        if not turns.reply:
            return 0
        head, full = self._apply_template(ChatTurns(turns.user)), self._apply_template(turns)
        if not full.startswith(head):  # a template that rewrites the assistant's text (strips, ...)
            raise ValueError(f"{type(self.processor).__name__}'s chat template does not write the assistant's "
                             f"turn {turns.reply!r} after its start; use prompt.format=plain")
        return len(self.text_ids(full)) - len(self.text_ids(head))

    def _tokenizer_kwargs(self, text: str) -> dict:
        # As `apply_chat_template(tokenize=True)`: a template that writes BOS itself gets no second one.
        bos = self.tokenizer.bos_token
        return {"add_special_tokens": False} if self.chat is not None and bos and text.startswith(bos) else {}

    def _completion_ids(self, prompt: str, completion: str) -> list[int]:
        # Tokenized in context: sentencepiece tokenizers (LLaVA's Llama) add a prefix space to text encoded on
        # its own, so " the" alone may not give the ids that follow the prompt. Fall back to the text alone
        # when the two merge across the boundary.
        head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        if full[:len(head)] == head:
            return full[len(head):]
        return self.tokenizer(completion, add_special_tokens=False)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a piece of text on its own, without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_ids(self, text: str, prompt: str = "") -> list[int]:
        """The target ids of a completion after `prompt`: ` text` tokenized in context (in the chat format
        without the space when it opens the assistant's turn), then the end token (`eos_token_id`)."""
        if self.chat is None:
            return self._completion_ids(prompt, " " + text.strip()) + [self.eos_token_id]
        separator = " " if self.chat.turns(prompt).reply else ""
        return self._completion_ids(self.render(prompt), separator + text.strip()) + [self.eos_token_id]

    def encode_row(self, image: Image.Image | None, prompt: str, completion: str | None = None) -> dict:
        """One training/scoring row for one image, or without an image (None: a text-only row, no image
        tensors; the demo's pre-training has them).

        Returns:
            `input_ids` (list): the processor's encoding of the rendered prompt (`render`; image tokens
            expanded), then the completion's ids and end token when a completion is given; `labels` (list): -100
            over the image and the prompt, except the assistant's own words in the chat format (the connective),
            then the completion's ids; other per-token lists the model needs (`mm_token_type_ids` for Qwen2-VL);
            and the image tensors of this one image as the processor returns them (`pixel_values`, plus e.g.
            `image_grid_thw`); `collate` concatenates them on dim 0.
        """
        # The processor gets RGB, converted by PIL (`load_image` keeps the file's mode): what it got before
        # images kept their mode. Transformers' own conversion would composite RGBA/transparent images onto white.
        text = self.render(prompt, image=image is not None)
        images = {} if image is None else {"images": [image.convert("RGB")]}
        encoded = self.processor(**images, text=[text], return_tensors="pt", **self._tokenizer_kwargs(text))
        input_ids = encoded["input_ids"][0].tolist()
        target = [] if completion is None else self.completion_ids(completion, prompt)
        self.check_length(len(input_ids) + len(target), input_ids.count(self.image_token_id))
        reply = self._reply_length(prompt)
        labels = [-100] * (len(input_ids) - reply) + input_ids[len(input_ids) - reply:]
        row = {"input_ids": input_ids + target, "labels": labels + target}
        for key, value in encoded.items():
            # the mask is rebuilt by `collate`; labels are ours (PaliGemma's processor writes its own)
            if key in ("input_ids", "attention_mask", "labels"):
                continue
            if value.shape == encoded["input_ids"].shape:  # per-token types: the completion is text (0)
                row[key] = value[0].tolist() + [0] * len(target)
            else:
                row[key] = value
        return row

    def collate(self, rows: list[dict], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad the per-token lists (`input_ids` with pad, `labels` with -100, others with 0), add the
        attention mask, and concatenate the image tensors along dim 0 (zero-padding trailing dims when rows
        differ, e.g. Idefics3's number of crops; the model skips all-zero images). Other keys are left out.
        Text-only rows add no image tensors and 0s to the per-token lists they lack (the families whose image
        tensors are matched to the image tokens in order, as Qwen2-VL's and LLaVA's are, take such a mix).

        Args:
            padding_side: "right" for training and scoring, "left" for generation.
        """
        length = max(len(row["input_ids"]) for row in rows)
        pad_values = {"input_ids": self.pad_token_id, "labels": -100}
        batch = {}
        for key in dict.fromkeys(key for row in rows for key in row):  # every row's keys, in order
            value = next(row[key] for row in rows if key in row)
            if isinstance(value, list):
                batch[key] = _pad([row.get(key, [0] * len(row["input_ids"])) for row in rows],
                                  pad_values.get(key, 0), length, padding_side)
            elif isinstance(value, torch.Tensor):
                batch[key] = _concat([row[key] for row in rows if key in row])
        batch["attention_mask"] = _pad([[1] * len(row["input_ids"]) for row in rows], 0, length, padding_side)
        return batch

    # --- decoding: `generate` with our Gumbel-max logits processor (below)

    def prepare_images(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images themselves: the processor reads each one with its prompt (`encode_row`)."""
        return list(images)

    def decode(self, images: list[Image.Image], prompts: list[str], num_copies: int, max_new_tokens: int,
               stop_ids: Sequence[int], temperatures: torch.Tensor | None = None,
               generators: list[torch.Generator] | None = None, top_k: int | None = None,
               top_p: float = 1.0) -> tuple[list[list[int]], list[float]]:
        """`VLM.decode`: our decode loop (`_decode_loop`: one pre-fill per prompt, finished rows leave the batch)
        for `SHARED_PREFILL_FAMILIES`, else `generate` on repeated prompts (`_generate`); both draw alike."""
        rows = [self.encode_row(image, prompt) for image, prompt in zip(images, prompts)]
        for row in rows:
            self.check_length(len(row["input_ids"]) + max_new_tokens, row["input_ids"].count(self.image_token_id))
        family = self.model.get_base_model().config.model_type
        decode = _decode_loop if family in SHARED_PREFILL_FAMILIES else _generate
        return decode(self, rows, num_copies, max_new_tokens, list(stop_ids), temperatures, generators, top_k, top_p)

    # --- hidden states: the model's own forward, each row with its own image inputs

    def encode_scored(self, items: Sequence[tuple[Image.Image, str, Sequence[str]]]) -> list[list[dict]]:
        """`VLM.encode_scored`: `encode_row` rows without labels (image and prompt processed once per item,
        the completion appended in context as `completion_ids` does)."""
        groups = []
        for image, prompt, completions in items:
            base = self.encode_row(image, prompt)
            rows = []
            for text in completions:
                target = self.completion_ids(text, prompt)
                row = {key: value + [0] * len(target) if isinstance(value, list) else value
                       for key, value in base.items() if key != "labels"}  # other per-token lists: text (0)
                row["input_ids"] = base["input_ids"] + target
                row["rationale_start"] = len(base["input_ids"])
                rows.append(row)
            groups.append(rows)
        return groups

    def collate_scored(self, rows: list[dict], image_keys: Sequence[Hashable]) -> dict[str, torch.Tensor]:
        """`collate` of the rows (each keeps its own image inputs; `image_keys` is not needed), without
        labels, plus `rationale_start`."""
        batch = self.collate([{k: v for k, v in row.items() if k != "rationale_start"} for row in rows])
        batch.pop("labels", None)
        batch["rationale_start"] = torch.tensor([row["rationale_start"] for row in rows])
        return batch

    def last_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           **image_inputs) -> torch.Tensor:
        """The model's own forward (its logits are not used): the last of its hidden states."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          use_cache=False, **image_inputs).hidden_states[-1]

    def set_trainable(self, adapters: bool = True, prefix: bool = False, everything: bool = False) -> None:
        """LoRA weights train when `adapters`, the multimodal projector when `prefix`; the rest is frozen. With
        `everything`, every weight of the base model trains and LoRA is frozen (pre-training the demo base
        model, which is saved without LoRA)."""
        for name, parameter in self.model.named_parameters():
            if everything:
                parameter.requires_grad = "lora_" not in name
            elif "lora_" in name:
                parameter.requires_grad = adapters
            else:
                parameter.requires_grad = prefix and any(part in name for part in PROJECTOR_MODULES)

    def save(self, directory: str | Path) -> None:
        """Write the base model (safetensors, LoRA layers stripped) and the processor to `directory`, and the
        LoRA weights to `directory/adapter`. A trained projector is part of the base model's weights."""
        directory = Path(directory)
        base = self.model.get_base_model()
        # PEFT wraps each targeted Linear: its own weight lives under `.base_layer.`, LoRA's under `lora_*`.
        state = {name.replace(".base_layer.", "."): tensor for name, tensor in base.state_dict().items()
                 if "lora_" not in name}
        base.save_pretrained(directory, state_dict=state)
        self.processor.save_pretrained(directory)
        self.model.save_pretrained(directory / ADAPTER_DIR)
        record_digests(directory)  # the base's and the adapter's safetensors

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "auto", prompt_format: str | None = None,
             chat: ChatStyle = ChatStyle()) -> HFVLM:
        """Load what `save` wrote (the recorded digests checked first, every value finite after); the LoRA
        weights train, everything else is frozen. `prompt_format`, `chat`: as `load_hf_vlm`'s."""
        directory = Path(directory)
        if not (directory / ADAPTER_DIR / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no saved HF VLM in {directory} "
                                    f"({ADAPTER_DIR}/adapter_config.json missing)")
        verify_digests(directory)
        base = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype)
        model = PeftModel.from_pretrained(base, directory / ADAPTER_DIR, is_trainable=True).to(device).eval()
        check_finite(model.named_parameters(), directory)
        processor = load_processor(directory)
        vlm = cls(model, processor, processor.tokenizer, chat_style(processor, prompt_format, chat))
        vlm.set_trainable(adapters=True)
        return vlm


def _pad(sequences: list[list[int]], value: int, length: int, side: str) -> torch.Tensor:
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if side == "right":
            padded[i, :len(seq)] = torch.as_tensor(seq)
        else:
            padded[i, length - len(seq):] = torch.as_tensor(seq)
    return padded


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):  # F.pad lists the last dim first
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


@functools.cache
def without_video(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` minus its video processor slot (unchanged when it has none).

    ProcessorMixin takes its sub-processors from the `__init__` signature and type-checks each; without
    torchvision the video processor's base class cannot even be looked up. With `video_processor` gone from
    the signature, the parent's positional `None` for it is paired with no name and dropped.
    """
    if "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return processor_class

    class ImageOnlyProcessor(processor_class):
        # What `apply_chat_template` of some processors reads from their video processor (SmolVLM's: its
        # frame sampling defaults) even for a conversation without video: none.
        video_processor = types.SimpleNamespace(num_frames=None, fps=None)

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    # `save_pretrained` records the class name in processor_config.json: keep the stock one.
    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def load_processor(path_or_name: str | Path, **kwargs) -> ProcessorMixin:
    """The checkpoint's processor, image-only (`without_video`) whether or not torchvision is installed.

    Not `AutoProcessor.from_pretrained`: it always builds the video processor too, which needs torchvision,
    and for a directory `HFVLM.save` wrote it stops earlier (OSError: no video processor config there).
    """
    config = AutoConfig.from_pretrained(path_or_name, **kwargs)
    return without_video(PROCESSOR_MAPPING[type(config)]).from_pretrained(path_or_name, **kwargs)


def chat_style(processor: ProcessorMixin, prompt_format: str | None, chat: ChatStyle) -> ChatStyle | None:
    """The style of `prompt.format` for this processor: `chat` for "chat", None (plain) for "plain", and for
    None `chat` when the processor has a chat template, else plain (base models)."""
    has_template = bool(getattr(processor, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise ValueError(f"prompt.format=chat, but the model's processor ({type(processor).__name__}) has no chat "
                         f"template; use prompt.format=plain")
    if prompt_format == "plain" or (prompt_format is None and not has_template):
        return None
    return chat


def load_hf_vlm(path_or_name: str | Path, lora: dict | None = None, dtype: str | torch.dtype = "auto",
                device: str | torch.device = "cpu", prompt_format: str | None = None,
                chat: ChatStyle = ChatStyle(), remedy: str = "get an intact copy of the model",
                seed: int = 0) -> HFVLM:
    """A pretrained VLM (local directory or hub name) with fresh LoRA adapters.

    Args:
        lora: `peft.LoraConfig` fields overriding `DEFAULT_LORA` (e.g. {"r": 16, "lora_alpha": 32}).
        dtype: Weights' dtype ("auto": as stored; e.g. torch.bfloat16 on GPUs).
        prompt_format: "plain", "chat" or None (chat when the processor has a chat template: `chat_style`).
        chat: How the chat format words the prompts (`prompt.*`).
        remedy: What the error says to do about damaged weights (a digest that differs, NaN or infinity).
        seed: Seed of the LoRA initialisation (PEFT draws lora_A from torch's global generator: unseeded,
            every run would start training from other adapters, and no two runs would train alike).
    """
    if Path(path_or_name).is_dir():
        verify_digests(path_or_name, remedy)  # the digests a folder illume wrote records (others have none)
    processor = load_processor(path_or_name)
    base = AutoModelForImageTextToText.from_pretrained(path_or_name, dtype=dtype).to(device)
    check_finite(base.named_parameters(), path_or_name, remedy)
    with torch.random.fork_rng():  # the caller's generators are left as they were
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(**{**DEFAULT_LORA, **(lora or {})})).eval()
    vlm = HFVLM(model, processor, processor.tokenizer, chat_style(processor, prompt_format, chat))
    vlm.set_trainable(adapters=True)
    return vlm


# --- Decoding ----------------------------------------------------------------------------------------------

def banned_token_ids(vlm: HFVLM) -> list[int]:
    """Tokens an answer or rationale never contains: every special token but EOS (padding, image slots)."""
    special = {i for i, token in vlm.tokenizer.added_tokens_decoder.items() if token.special}
    return sorted((special | set(vlm.tokenizer.all_special_ids)) - {vlm.eos_token_id})


class _GumbelMaxSampling(LogitsProcessor):
    """Turns greedy search into sampling and records each chosen token's log-probability at T = 1.

    argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T) (the Gumbel-max trick). Each row has
    its own temperature (0: greedy, no noise); each example's rows draw their noise from the example's
    generator, so a draw depends on the example's seed, not on its batch. Sampled rows may be restricted to
    their top-k / top-p tokens of logits / T (illume.models.logits_filters, as MAGMA's decoding). Being the
    last logits processor, our argmax is the token generate picks.
    """

    def __init__(self, banned: list[int], temperatures: torch.Tensor | None = None,
                 generators: list[torch.Generator] | None = None, top_k: int | None = None,
                 top_p: float = 1.0):
        self.banned = torch.tensor(banned, dtype=torch.long)
        self.temperatures = temperatures  # (R,), rows grouped by example
        self.generators = generators
        self.top_k, self.top_p = top_k, top_p
        self.step_logprobs: list[torch.Tensor] = []  # one (R,) per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float().index_fill(1, self.banned.to(scores.device), float("-inf"))  # (R, V)
        chosen = _choice_scores(logits, self.temperatures, self.generators, self.top_k, self.top_p)
        tokens = chosen.argmax(-1, keepdim=True)
        self.step_logprobs.append(torch.log_softmax(logits, -1).gather(1, tokens).squeeze(1).double().cpu())
        return chosen


def _choice_scores(logits: torch.Tensor, temperatures: torch.Tensor | None,
                   generators: list[torch.Generator] | None, top_k: int | None, top_p: float,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """The scores whose argmax is each row's token (`_GumbelMaxSampling`): the logits for greedy rows (T = 0, or
    no generators), else logits / T, top-k / top-p filtered, plus the row's Gumbel noise.

    Args:
        logits: (A, V) float logits, banned tokens at -inf, of the rows `rows` of all R rows (None: all).
        temperatures: (R,) per-row temperatures, rows grouped by example.
        generators: One per example: each draws its rows' whole (R / #examples, V) block of noise, whichever
            of its rows are still decoded, so a draw does not depend on when other rows stopped.
    """
    if generators is None:
        return logits
    num_rows = len(temperatures)
    uniform = torch.cat([torch.rand((num_rows // len(generators), logits.shape[1]), generator=g)
                         for g in generators]).to(logits.device)  # (R, V)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    temperatures = temperatures.to(logits.device).float().unsqueeze(1)  # (R, 1)
    if rows is not None:
        gumbel, temperatures = gumbel[rows.to(logits.device)], temperatures[rows.to(logits.device)]
    scores = logits / temperatures.clamp(min=1e-6)
    if filters_active(top_k, top_p):  # after the temperature, as transformers' warpers
        scores = filter_logits(scores, top_k, top_p)
    return torch.where(temperatures > 0, scores + gumbel, logits)


SHARED_PREFILL_FAMILIES = frozenset({"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
                                     "qwen3_vl", "idefics3", "smolvlm", "gemma3", "internvl"})
"""Families (`config.model_type`) whose K candidates of a prompt share one pre-fill (`_generate`); the
others repeat the prompt K times. Listed once a test shows the shared path draws what the repeated path
draws (tests/test_hf_decoding.py for LLaVA and Qwen2-VL, tests/test_families.py for each): the cache trick
relies on the family's positions being a function of the prompt rows that generate accepts as
`position_ids`, and on image inputs being needed only in the pre-fill. Not PaliGemma: its positions start at
1 (added in `prepare_inputs_for_generation`, not by `_prepare_position_ids_for_generation`), and its prefix
attends bidirectionally by `token_type_ids`, which generate would not get."""


@torch.no_grad()
def _generate(vlm: HFVLM, rows: list[dict], num_copies: int, max_new_tokens: int, stop_ids: list[int],
              temperatures: torch.Tensor | None = None,
              generators: list[torch.Generator] | None = None, top_k: int | None = None,
              top_p: float = 1.0, share_prefill: bool | None = None) -> tuple[list[list[int]], list[float]]:
    """Decode `num_copies` continuations of every prompt row until a stop token (top_k / top_p: see
    `_GumbelMaxSampling`).

    Args:
        share_prefill: Pre-fill each prompt once and repeat its KV cache per copy (`_shared_prefill_inputs`)
            instead of repeating the prompt (image through the vision tower once per copy). Default: for
            `SHARED_PREFILL_FAMILIES` when there is more than one copy. Both draw the same candidates.

    Returns:
        The new tokens of each of the len(rows) * num_copies rows (stop token excluded), example-major, and
        their summed log-probabilities at T = 1 (stop token included).
    """
    rows = [{k: v for k, v in row.items() if k != "labels"} for row in rows]
    if share_prefill is None:
        share_prefill = num_copies > 1 and vlm.model.get_base_model().config.model_type in SHARED_PREFILL_FAMILIES
    if share_prefill:
        inputs = _shared_prefill_inputs(vlm, rows, num_copies)
    else:
        # Each prompt repeated: its image runs through the vision tower once per copy (as generate's own
        # num_return_sequences expansion does); exact for every family.
        copies = [row for row in rows for _ in range(num_copies)]
        inputs = {k: v.to(vlm.device) for k, v in vlm.collate(copies, padding_side="left").items()}
    sampler = _GumbelMaxSampling(banned_token_ids(vlm), temperatures, generators, top_k, top_p)
    # Explicit values, because generate fills unset ones from the checkpoint's defaults (e.g. a repetition
    # penalty), which would change what is drawn.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                              eos_token_id=list(stop_ids), pad_token_id=vlm.pad_token_id)
    sequences = vlm.model.generate(**inputs, generation_config=config,
                                   logits_processor=LogitsProcessorList([sampler]))
    new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
    step_logprobs = torch.stack(sampler.step_logprobs, 1)  # (R, steps)
    tokens, logprobs = [], []
    for row, row_tokens in enumerate(new_tokens):
        # Cut at the first stop token: generate pads the rows that stopped before the longest one.
        end = next((i for i, t in enumerate(row_tokens) if t in stop_ids), len(row_tokens))
        tokens.append(row_tokens[:end])
        logprobs.append(float(step_logprobs[row, :end + 1].sum()))  # the stop token's too, when there is one
    return tokens, logprobs


@torch.no_grad()
def _decode_loop(vlm: HFVLM, rows: list[dict], num_copies: int, max_new_tokens: int, stop_ids: list[int],
                 temperatures: torch.Tensor | None = None, generators: list[torch.Generator] | None = None,
                 top_k: int | None = None, top_p: float = 1.0) -> tuple[list[list[int]], list[float]]:
    """`_generate`'s draws by our own loop, as MAGMA's (illume.models.magma_decoding): the prompt rows (image
    inputs included) are pre-filled once, the cache and last logits repeated `num_copies` times per row, then
    every row is drawn as `_GumbelMaxSampling` draws it (`_choice_scores`) until it emits a stop token, when
    it leaves the batch with its cache rows, so a step costs what the rows still running cost (`generate`
    runs every row until the last one stops). The positions are the model's own for generation
    (`_prepare_position_ids_for_generation`: left padding, Qwen2-VL's M-RoPE), each step one further, as
    `generate` advances them; for `SHARED_PREFILL_FAMILIES`, whose decoding steps need no image inputs.

    Returns:
        As `_generate`: the new tokens of each row (stop token excluded), example-major, and their summed
        log-probabilities at T = 1 (stop token included).
    """
    model = vlm.model.get_base_model()
    batch = {k: v.to(vlm.device)
             for k, v in vlm.collate([{k: v for k, v in row.items() if k != "labels"} for row in rows],
                                     padding_side="left").items()}
    input_ids, attention_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    position_ids = model._prepare_position_ids_for_generation(input_ids, {"attention_mask": attention_mask, **batch})
    out = vlm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **batch,
                    use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1].float()  # (B, V)
    if num_copies > 1:
        cache.batch_repeat_interleave(num_copies)
        logits = logits.repeat_interleave(num_copies, 0)
        attention_mask = attention_mask.repeat_interleave(num_copies, 0)
        position_ids = position_ids.repeat_interleave(num_copies, -2)  # (..., R, T): Qwen2-VL's are (4, R, T)
    num_rows = len(logits)
    banned = torch.tensor(banned_token_ids(vlm), dtype=torch.long, device=logits.device)
    stop = torch.tensor(stop_ids, device=logits.device)
    next_position = position_ids[..., -1:] + 1
    tokens = torch.full((num_rows, max_new_tokens), -1, dtype=torch.long)
    logprobs = torch.zeros(num_rows, dtype=torch.float64)
    # `active` holds the original index of each row still decoded; every per-row tensor has one row per active row.
    active = torch.arange(num_rows)
    for step in range(max_new_tokens):
        logits = logits.index_fill(1, banned, float("-inf"))
        chosen = _choice_scores(logits, temperatures, generators, top_k, top_p, active).argmax(-1)  # (A,)
        tokens[active, step] = chosen.cpu()
        logprobs[active] += torch.log_softmax(logits, -1).gather(1, chosen.unsqueeze(1)).squeeze(1).double().cpu()
        running = ~torch.isin(chosen, stop)
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        if not bool(running.all()):
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            chosen, attention_mask = chosen[keep], attention_mask[keep]
            next_position = next_position.index_select(-2, keep)
            active = active[keep.cpu()]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
        out = vlm.model(input_ids=chosen.unsqueeze(1), attention_mask=attention_mask, position_ids=next_position,
                        cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
        next_position = next_position + 1
    sequences = []
    for row in tokens.tolist():
        new = [t for t in row if t >= 0]
        sequences.append(new[:-1] if new and new[-1] in stop_ids else new)
    return sequences, logprobs.tolist()


def _shared_prefill_inputs(vlm: HFVLM, rows: list[dict], num_copies: int) -> dict:
    """`generate` inputs for `num_copies` copies of each row that pre-fill each prompt once ("re-use a
    prompt cache", transformers' docs).

    The B prompt rows, image inputs included, are run through the model once up to their last token; the
    cache is repeated `num_copies` times per row (rows grouped by prompt) and handed to `generate` with the
    repeated full prompts, whose only token generate still has to run is the last one, text in every prompt
    (ILLUME's prompts end in "A:" or ", seeing that"), so the image inputs are not needed again. The
    positions are what generate would compute for the full prompts, by the model's own
    `_prepare_position_ids_for_generation` (left padding; Qwen2-VL's 3-D M-RoPE positions), passed to the
    pre-fill and to generate alike.
    """
    model = vlm.model.get_base_model()
    batch = {k: v.to(vlm.device) for k, v in vlm.collate(rows, padding_side="left").items()}
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if bool((input_ids[:, -1] == vlm.image_token_id).any()):
        raise ValueError("a prompt ends in an image token: its pre-fill cannot be shared (share_prefill=False)")
    image_inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    position_ids = model._prepare_position_ids_for_generation(
        input_ids, {"attention_mask": attention_mask, **image_inputs})
    # Per-token inputs (Qwen2-VL's `mm_token_type_ids`) are cut with the tokens; image tensors stay whole.
    prefix_inputs = {k: v[:, :-1] if v.shape == input_ids.shape else v for k, v in image_inputs.items()}
    cache = vlm.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                      position_ids=position_ids[..., :-1], **prefix_inputs, use_cache=True,
                      logits_to_keep=1).cache
    cache.batch_repeat_interleave(num_copies)
    return {"input_ids": input_ids.repeat_interleave(num_copies, 0),
            "attention_mask": attention_mask.repeat_interleave(num_copies, 0),
            "position_ids": position_ids.repeat_interleave(num_copies, -2), "cache": cache}
