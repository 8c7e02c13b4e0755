"""`illume plan`: parameter counts on the meta device and the memory formula, checked against autograd."""

import argparse
from pathlib import Path

import pytest
import torch

from illume.config import AdapterConfig, LMConfig, ModelConfig, VisionConfig, load_config
from illume.models.magma import MagmaForCausalLM, build_magma_config
from illume.plan import GIB, add_plan_parser, plan, training_activation_bytes
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


def test_plan_reads_a_saved_models_config(tmp_path, tiny_vlm):
    tiny_vlm.save(tmp_path / "model")
    result = plan(load_config(CONFIGS / "demo.yaml", [f"model.path={tmp_path / 'model'}"]))
    assert result["model"]["source"].endswith("config.json")
    assert result["parameters"]["total"] == sum(p.numel() for p in tiny_vlm.model.parameters())


def _saved_for_backward(model, **inputs) -> int:
    """Bytes autograd keeps for backward in one forward pass (weights and buffers excluded)."""
    weights = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_what_autograd_saves(dtype):
    """The per-layer count in illume/plan.py's docstring, against a tiny MAGMA training its adapters; the
    forward also saves the loss's fp32 log-softmax (b * T * V * 4 bytes), which `logits` covers."""
    model_cfg = ModelConfig(vision=VisionConfig([1, 1, 1, 1], 8, 64),
                            lm=LMConfig(64, 3, 4, 8, 256, 96, "gelu_new"),
                            adapters=AdapterConfig(8, 4))
    config = build_magma_config(model_cfg, vocab_size=96, image_token_id=95, eos_token_id=0, pad_token_id=0)
    model = MagmaForCausalLM(config).to(dtype)
    model.set_trainable(adapters=True)
    model.train()
    batch_size, text_len = 3, 44
    seq_len = config.num_image_tokens + text_len
    image_slots = torch.full((batch_size, config.num_image_tokens), 95)
    ids = torch.cat([image_slots, torch.randint(1, 95, (batch_size, text_len))], 1)
    pixels = torch.randn(batch_size, 3, 64, 64).to(dtype)
    # bf16 as the Trainer runs it: half-precision frozen weights, float32 adapters (set_trainable), autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        measured = _saved_for_backward(model, input_ids=ids, pixel_values=pixels, labels=ids)
    p = 2 if dtype == torch.bfloat16 else 4
    estimate = training_activation_bytes(config, batch_size, seq_len, p, gradient_checkpointing=False)
    estimate += batch_size * seq_len * 96 * 4
    if dtype == torch.float32:
        assert 0.95 * measured <= estimate <= 1.05 * measured, (measured, estimate)
    else:  # under autocast some saved tensors are smaller than the formula's: it errs on the safe side
        assert measured <= estimate <= 1.3 * measured, (measured, estimate)


def test_plan_refuses_an_hf_model_instead_of_estimating_another(capsys):
    from illume.cli import main

    assert main(["plan", str(REPO / "configs" / "vqax_llava.yaml")]) == 2
    assert "model.kind=hf is not estimated" in capsys.readouterr().err
