"""`illume plan`: parameter counts on the meta device and the memory formula, checked against autograd."""

import argparse
import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from illume.config import AdapterConfig, LMConfig, ModelConfig, VisionConfig, load_config
from illume.models.magma import MagmaForCausalLM, build_magma_config
from illume.plan import (
    ATTENTION,
    GIB,
    PRECISIONS,
    add_plan_parser,
    attention_implementation,
    meta_model,
    model_config,
    plan,
    training_activation_bytes,
)
from tests.conftest import REPO

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _run_plan_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return args.handler(args)


def test_vqax_magma_trains_adapters_within_24_gb_and_prints_the_numbers(capsys):
    result = plan(load_config(CONFIGS / "vqax_magma.yaml"))
    params, training = result["parameters"], result["training"]
    assert params["lm"] == 6_050_882_784  # GPT-J-6B with its 50,400-row head
    assert params["adapters"] == params["trainable"] == 235_139_072  # v2: attention + MLP, downsample 8
    assert (training["micro_batch_size"], training["global_batch_size"]) == (8, 256)
    assert training["precision"] == "bf16" and training["gradient_checkpointing"]
    assert training["total_bytes"] < 24e9  # a 24 GB card, in decimal GB (22.4 GiB)
    assert result["sampling"]["total_bytes"] < 24e9
    assert _run_plan_command([str(CONFIGS / "vqax_magma.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "6,050,882,784" in printed and "235,139,072" in printed
    assert f"{training['total_bytes'] / GIB:.2f}" in printed
    with capsys.disabled():  # the numbers, for whoever runs this test with -s
        print(f"\nvqax_magma.yaml: training {training['total_bytes'] / GIB:.2f} GiB, "
              f"sampling {result['sampling']['total_bytes'] / GIB:.2f} GiB per GPU")


def test_memory_levers_move_the_estimate_the_right_way():
    path = CONFIGS / "vqax_magma.yaml"
    base = plan(load_config(path))["training"]["bytes"]
    no_checkpointing = plan(load_config(path, ["train.gradient_checkpointing=false"]))["training"]["bytes"]
    assert no_checkpointing["activations"] > 10 * base["activations"]
    fp32 = plan(load_config(path, ["train.bf16=false"]))["training"]["bytes"]
    assert fp32["frozen_weights"] == 2 * base["frozen_weights"]
    zero2 = plan(load_config(path, ["train.deepspeed=configs/deepspeed/zero2.json"]), num_gpus=4)["training"]
    assert zero2["zero_stage"] == 2 and zero2["global_batch_size"] == 4 * 256
    trainable = plan(load_config(path))["parameters"]["trainable"]
    assert zero2["bytes"]["gradients"] == trainable * 2 // 4  # bf16 gradients, sharded over 4 GPUs
    assert zero2["bytes"]["optimizer_states"] == trainable * 12 // 4  # fp32 master + Adam m, v, sharded
    assert zero2["bytes"]["frozen_weights"] == base["frozen_weights"]  # only ZeRO-3 shards weights
    zero3 = plan(load_config(path, ["train.deepspeed=configs/deepspeed/zero3.json"]), num_gpus=4)["training"]
    assert zero3["zero_stage"] == 3
    assert zero3["bytes"]["frozen_weights"] == base["frozen_weights"] // 4  # ZeRO-3 shards the frozen weights
    assert zero3["bytes"]["trainable_weights"] == trainable * 2 // 4


def test_plan_reads_a_saved_models_config(tmp_path, tiny_vlm):
    tiny_vlm.save(tmp_path / "model")
    result = plan(load_config(CONFIGS / "demo.yaml", [f"model.path={tmp_path / 'model'}"]))
    assert result["model"]["source"].endswith("config.json")
    assert result["parameters"]["total"] == sum(p.numel() for p in tiny_vlm.model.parameters())


def _saved_for_backward(model, **inputs) -> tuple[int, list[str]]:
    """Bytes autograd keeps for backward in one forward pass (weights and buffers excluded), and the names of
    the backward graph's nodes (which kernels ran)."""
    weights = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    names, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(node.name())
            todo.extend(next_node for next_node, _ in node.next_functions)
    return sum(saved.values()), names


class _CudaAutocastPolicy(TorchFunctionMode):
    """CUDA autocast's fp32 rule for the ops of GPT-J it covers and CPU autocast does not (torch's autocast op
    lists): layer_norm, pow and softmax run in fp32 on fp32 copies of their inputs. Emulated on CPU, where the
    test runs, to check the `autocast` count `illume plan` gives a GPU run; the rule itself is torch's."""

    OPS = {F.layer_norm, torch.pow, torch.Tensor.pow, F.softmax, torch.softmax, torch.Tensor.softmax}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS and torch.is_autocast_enabled("cpu"):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            args, kwargs = tuple(map(up, args)), {name: up(value) for name, value in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


# How training holds the model: (dtype of the frozen weights, the adapters', autocast on, CUDA's autocast
# rule emulated, `PRECISIONS` key).
PRECISION_CASES = {
    "float32": (torch.float32, torch.float32, False, False, "fp32"),
    "bfloat16": (torch.bfloat16, torch.bfloat16, False, False, "half"),  # DeepSpeed casts the whole model
    "bfloat16-autocast": (torch.bfloat16, torch.float32, True, False, "autocast-cpu"),  # HF Trainer, CPU AMP
    "bfloat16-autocast-cuda": (torch.bfloat16, torch.float32, True, True, "autocast"),  # HF Trainer on a GPU
}


# Every attention implementation `illume plan` has a formula for (`ATTENTION`), each measured below.
IMPLEMENTATIONS = ["sdpa", "eager"]


@pytest.mark.parametrize("precision", PRECISION_CASES)
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_activation_formula_matches_what_autograd_saves(attn_implementation, precision):
    """The per-layer count in illume/plan.py's docstring, against a tiny MAGMA training its adapters on a
    padded batch (as the collator makes them); the forward also saves the loss's fp32 log-softmax
    (b * T * V * 4 bytes), which `logits` covers, and its int64 targets (b * T * 8), which no term covers.

    Within 1 %, both ways: what is left is explained. fp32: the loss's 4-byte total weight. bf16: CPU's
    layer_norm keeps mean and rstd in bf16 (counted at fp32, as CUDA keeps them). Autocast: its cache also
    holds copies autograd does not save (biases, the first block's down-projections). `bfloat16-autocast-cuda`
    measures on CPU with CUDA's fp32 rule applied (`_CudaAutocastPolicy`): no GPU ran it."""
    model_cfg = ModelConfig(vision=VisionConfig([1, 1, 1, 1], 8, 64),
                            lm=LMConfig(64, 3, 4, 8, 256, 96, "gelu_new"),
                            adapters=AdapterConfig(8, 4))
    config = build_magma_config(model_cfg, vocab_size=96, image_token_id=95, eos_token_id=0, pad_token_id=0)
    frozen_dtype, adapter_dtype, autocast, cuda_rule, key = PRECISION_CASES[precision]
    model = MagmaForCausalLM(config).to(frozen_dtype)
    model.set_attn_implementation(attn_implementation)  # a run gets sdpa (the next test)
    assert model.lm.config._attn_implementation == attn_implementation
    model.set_trainable(adapters=True)  # float32 adapters (master weights)
    if adapter_dtype != torch.float32:  # DeepSpeed casts the trainable weights too (its master copy is apart)
        model.to(adapter_dtype)
    model.train()
    batch_size, text_len = 3, 44
    seq_len = config.num_image_tokens + text_len
    image_slots = torch.full((batch_size, config.num_image_tokens), 95)
    ids = torch.cat([image_slots, torch.randint(1, 95, (batch_size, text_len))], 1)
    mask = torch.ones_like(ids)
    mask[1, -6:] = mask[2, -11:] = 0  # right-padded rows
    pixels = torch.randn(batch_size, 3, 64, 64).to(frozen_dtype)
    with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
          _CudaAutocastPolicy() if cuda_rule else contextlib.nullcontext()):
        measured, ran = _saved_for_backward(model, input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                            labels=ids.masked_fill(mask == 0, -100))
    # The model really ran that implementation: one attention backward per block that needs a gradient (not
    # the first), SDPA's fused kernel (its math fallback decomposes into matmul + softmax) or eager's softmax.
    layers_with_grad = config.text_config.n_layer - 1
    sdpa_kernels = [name for name in ran if name.startswith("ScaledDotProduct")]
    softmaxes = ran.count("SoftmaxBackward0")
    if attn_implementation == "sdpa":
        assert (len(sdpa_kernels), softmaxes) == (layers_with_grad, 0), (sdpa_kernels, softmaxes)
    else:
        assert (len(sdpa_kernels), softmaxes) == (0, layers_with_grad), (sdpa_kernels, softmaxes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = training_activation_bytes(config, batch_size, seq_len, key, attn_implementation,
                                         gradient_checkpointing=False)
    estimate += trainable * PRECISIONS[key].weight_copy  # autocast's 16-bit copies of the adapters' weights
    estimate += batch_size * seq_len * (96 * 4 + 8)
    assert abs(estimate - measured) <= 0.01 * measured, (measured, estimate)


def test_plan_reports_the_attention_implementation_the_model_runs(capsys):
    """A run builds the model without asking for an implementation: transformers picks SDPA, and the plan
    reads it from the built model and says so; another one set on the config is followed, too."""
    cfg = load_config(CONFIGS / "vqax_magma.yaml")
    config, _ = model_config(cfg)
    assert attention_implementation(meta_model(config)) == "sdpa"
    result = plan(cfg)
    assert result["model"]["attn_implementation"] == result["training"]["attn_implementation"] == "sdpa"
    assert _run_plan_command([str(CONFIGS / "vqax_magma.yaml")]) == 0
    assert "attention: sdpa" in capsys.readouterr().out
    model = meta_model(config)
    model.set_attn_implementation("eager")
    assert attention_implementation(model) == "eager"
    assert sorted(ATTENTION) == sorted(IMPLEMENTATIONS)  # every formula is measured above
    eager = training_activation_bytes(config, 8, 276, "autocast", "eager", gradient_checkpointing=False)
    sdpa = training_activation_bytes(config, 8, 276, "autocast", "sdpa", gradient_checkpointing=False)
    assert eager > sdpa  # the a·T probabilities
    with pytest.raises(ValueError, match="flash_attention_2"):
        training_activation_bytes(config, 8, 276, "autocast", "flash_attention_2", False)


def test_plan_refuses_an_hf_model_instead_of_estimating_another(capsys):
    from illume.cli import main

    assert main(["plan", str(REPO / "configs" / "vqax_llava.yaml")]) == 2
    assert "model.kind=hf is not estimated" in capsys.readouterr().err
