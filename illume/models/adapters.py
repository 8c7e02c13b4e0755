"""MAGMA's serial bottleneck adapters, inserted into any Hugging Face decoder.

An adapter is `x + up(relu(down(x)))` with `down: d -> d / f` (Houlsby et al., 2019; MAGMA, Eichenberg et al.,
2022). MAGMA v1 puts one after every MLP with f = 4; v2 and ILLUME add one after every attention block with
f = 8. Module names mirror MAGMA's (`mlp.1.adapter.0.weight`, `attn.attention.q_proj.weight`) so that the
official checkpoint maps onto ours with few renames.
"""

from __future__ import annotations

import torch
from torch import nn

# Where decoder blocks keep their attention and MLP, by attribute name, across HF architectures.
_ATTENTION_NAMES = ("attn", "self_attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward")


class Adapter(nn.Module):
    """Bottleneck adapter with a residual connection, initialised close to the identity."""

    def __init__(self, dim: int, downsample_factor: int, init_std: float = 1e-3):
        super().__init__()
        self.adapter = nn.Sequential(
            nn.Linear(dim, dim // downsample_factor),
            nn.ReLU(),
            nn.Linear(dim // downsample_factor, dim),
        )
        # Small weights keep the frozen LM's behaviour at the start of training (MAGMA does the same).
        for layer in (self.adapter[0], self.adapter[2]):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # A trainable adapter is kept in float32 (master weights) inside a bf16/fp16 model: compute in its dtype
        # (autocast, when on, still runs the matmuls in half precision) and add back in the stream's dtype.
        update = self.adapter(hidden_states.to(self.adapter[0].weight.dtype))
        return hidden_states + update.to(hidden_states.dtype)


class AttentionWithAdapter(nn.Module):
    """Wraps an attention module whose forward returns a tuple and adapts its first output only."""

    def __init__(self, attention: nn.Module, dim: int, downsample_factor: int, init_std: float = 1e-3):
        super().__init__()
        self.attention = attention
        self.adapter = Adapter(dim, downsample_factor, init_std)

    def forward(self, *args, **kwargs):
        outputs = self.attention(*args, **kwargs)
        if isinstance(outputs, tuple):
            return (self.adapter(outputs[0]), *outputs[1:])
        return self.adapter(outputs)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """Find the list of decoder blocks of a causal LM (GPT-J `transformer.h`, Llama `model.layers`, ...)."""
    for path in ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "layers"):
        module = lm
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(lm).__name__}; expected one of transformer.h, "
                     "model.layers, gpt_neox.layers")


def _child_name(block: nn.Module, candidates: tuple[str, ...], what: str) -> str:
    for name in candidates:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise ValueError(f"{type(block).__name__} has no {what} module named any of {candidates}")


def add_adapters(lm: nn.Module, hidden_size: int, attention_downsample: int, mlp_downsample: int,
                 init_std: float = 1e-3) -> None:
    """Insert adapters in place after every block's attention and/or MLP; a factor of 0 means none there."""
    for block in decoder_layers(lm):
        if attention_downsample:
            name = _child_name(block, _ATTENTION_NAMES, "attention")
            setattr(block, name,
                    AttentionWithAdapter(getattr(block, name), hidden_size, attention_downsample, init_std))
        if mlp_downsample:
            name = _child_name(block, _MLP_NAMES, "MLP")
            setattr(block, name, nn.Sequential(getattr(block, name), Adapter(hidden_size, mlp_downsample, init_std)))


def is_adapter_parameter(name: str) -> bool:
    """True for the parameters that belong to an adapter (by the module names above)."""
    return ".adapter." in name or name.startswith("adapter.")
