"""MAGMA (Eichenberg et al., 2022) on stock `transformers`.

An image goes through CLIP's modified ResNet (attention pool removed); every cell of its last feature map is
projected to the LM width (Linear -> dropout -> LayerNorm) and placed in front of the text as a prefix. The LM
is any Hugging Face causal LM (GPT-J-6B for the official model, a tiny GPT-J for the demo), frozen, with
bottleneck adapters after attention and/or the MLP of every block.

The prefix travels through the token sequence as `num_image_tokens` copies of the `<|image|>` token whose
embeddings are replaced by the image features (as LLaVA does in transformers). So attention masks, position
ids, the KV cache and `GenerationMixin` need nothing special: `generate()` drops `pixel_values` after the
prefill, and a batch may mix image rows and text-only rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, GPTJConfig, PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from illume.models.adapters import add_adapters, is_adapter_parameter
from illume.models.clip_resnet import ModifiedResNet

if TYPE_CHECKING:
    from illume.config import ModelConfig


class MagmaConfig(PreTrainedConfig):
    """Configuration of `MagmaForCausalLM`. `text_config` is the inner LM's config (GPT-J by default)."""

    model_type = "magma"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gptj")}

    text_config: dict | PreTrainedConfig | None = None
    image_size: int = 384
    vision_layers: list[int] | None = None
    vision_width: int = 96
    image_token_id: int = 50400
    prefix_dropout: float = 0.1
    adapter_attention_downsample: int = 8
    adapter_mlp_downsample: int = 8
    adapter_init_std: float = 1e-3
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.vision_layers is None:
            self.vision_layers = [6, 8, 18, 8]  # RN50x16
        super().__post_init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Prefix length: the encoder's output grid is 32x smaller than the image on each side."""
        return (self.image_size // 32) ** 2


def build_magma_config(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int, eos_token_id: int,
                       pad_token_id: int) -> MagmaConfig:
    """The `MagmaConfig` (GPT-J inside) that `model_cfg`'s sizes describe: our YAML's one way to a model.

    Args:
        vocab_size: The tokenizer's size: the embedding and LM head rows, unless `model_cfg.lm.vocab_size`
            sets more (GPT-J-6B: 50,400 rows for 50,258 tokens).
        image_token_id: Id of `<|image|>`, whose embedding rows the image prefix replaces.
        eos_token_id: End of text; also the BOS id, as in GPT-2/GPT-J.
        pad_token_id: Padding id.
    """
    lm = model_cfg.lm
    rows = lm.vocab_size if lm.vocab_size is not None else vocab_size
    if rows < vocab_size:
        raise ValueError(f"model.lm.vocab_size={rows} is smaller than the tokenizer's {vocab_size} tokens")
    text_config = GPTJConfig(
        vocab_size=rows, n_positions=lm.max_positions, n_embd=lm.hidden_size, n_layer=lm.num_layers,
        n_head=lm.num_heads, rotary_dim=lm.rotary_dim, activation_function=lm.activation,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return MagmaConfig(
        text_config=text_config.to_dict(), image_size=model_cfg.vision.image_size,
        vision_layers=list(model_cfg.vision.layers), vision_width=model_cfg.vision.width,
        image_token_id=image_token_id, prefix_dropout=model_cfg.prefix_dropout,
        adapter_attention_downsample=model_cfg.adapters.attention_downsample,
        adapter_mlp_downsample=model_cfg.adapters.mlp_downsample,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


class ImagePrefix(nn.Module):
    """Image encoder + projection to the LM width (MAGMA's `image_prefix`: enc, proj, dropout, ln)."""

    def __init__(self, config: MagmaConfig, hidden_size: int):
        super().__init__()
        self.enc = ModifiedResNet(config.vision_layers, config.vision_width)
        self.proj = nn.Linear(self.enc.output_dim, hidden_size)
        self.dropout = nn.Dropout(config.prefix_dropout)
        self.ln = nn.LayerNorm(hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.enc(pixel_values.to(self.enc.conv1.weight.dtype))  # (N, C, h, w)
        tokens = features.flatten(2).transpose(1, 2)  # (N, h * w, C)
        # The projection may be trainable, hence float32, in a half-precision model: compute in its dtype.
        projected = self.dropout(self.proj(tokens.to(self.proj.weight.dtype)))
        return self.ln(projected.to(self.ln.weight.dtype))


class MagmaPreTrainedModel(PreTrainedModel):
    config: MagmaConfig
    config_class = MagmaConfig
    base_model_prefix = "magma"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True


class MagmaForCausalLM(MagmaPreTrainedModel, GenerationMixin):
    """The MAGMA model: `forward(input_ids, pixel_values, attention_mask, labels)` and `generate()`."""

    def __init__(self, config: MagmaConfig):
        super().__init__(config)
        text_config = config.text_config
        self.image_prefix = ImagePrefix(config, text_config.hidden_size)
        self.lm = AutoModelForCausalLM.from_config(text_config)
        add_adapters(self.lm, text_config.hidden_size, config.adapter_attention_downsample,
                     config.adapter_mlp_downsample, config.adapter_init_std)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image prefix embeddings (N, num_image_tokens, hidden) for images (N, 3, H, W)."""
        return self.image_prefix(pixel_values)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the `<|image|>` positions filled by image features, in row order."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None and image_embeds is None:
            return inputs_embeds
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        num_slots, num_features = int(image_mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if num_slots != num_features:
            raise ValueError(f"the batch has {num_slots} <|image|> tokens but {image_embeds.shape[0]} images x "
                             f"{image_embeds.shape[1]} prefix tokens = {num_features} image features")
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                cache=None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, image_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs):
        """Run the LM on text with image prefixes.

        Args:
            input_ids: (B, T) token ids; each image row starts with `num_image_tokens` `<|image|>` tokens.
            pixel_values: (N, 3, H, W) images, one per row that contains `<|image|>` tokens, in row order.
            image_embeds: Precomputed `encode_images` output instead of `pixel_values` (the sampler encodes
                each image once and reuses it).
            labels: (B, T) targets; `<|image|>` positions are always ignored.
            cache: The inner LM's KV cache (`cache` since transformers 5.24; the old name `past_key_values`
                is deprecated there and removed in 5.40).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_embeds)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, labels=labels, use_cache=use_cache, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen encoder must stay in eval mode, or BatchNorm keeps updating its running statistics.
        if mode and not any(p.requires_grad for p in self.image_prefix.enc.parameters()):
            self.image_prefix.enc.eval()
        return self

    def set_trainable(self, adapters: bool = True, prefix: bool = False, everything: bool = False) -> None:
        """Choose what trains: adapters only (ILLUME's default), optionally the prefix projection, or all.

        The image encoder and the LM stay frozen unless `everything` (used to pre-train the demo model).
        """
        for name, parameter in self.named_parameters():
            if everything:
                parameter.requires_grad_(True)
            elif is_adapter_parameter(name):
                parameter.requires_grad_(adapters)
            elif name.startswith("image_prefix.") and not name.startswith("image_prefix.enc."):
                parameter.requires_grad_(prefix)
            else:
                parameter.requires_grad_(False)
        # Trainable weights are float32 master weights even when the model was loaded in bf16/fp16 (a converted
        # checkpoint): the optimizer then updates them in full precision and fp16 gradient scaling works.
        for parameter in self.parameters():
            if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()
        self.train(self.training)


def register_magma() -> None:
    """Make `AutoConfig`/`AutoModelForCausalLM` know the "magma" type (called by loaders, not on import)."""
    AutoConfig.register("magma", MagmaConfig, exist_ok=True)
    AutoModelForCausalLM.register(MagmaConfig, MagmaForCausalLM, exist_ok=True)
