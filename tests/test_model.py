"""Our MAGMA on stock transformers: shapes, masking, adapters-only training, saving, generation."""

import pytest
import torch
import torch.nn.functional as F

from illume.collate import collate_rows
from illume.data.shapes import ShapesWorld
from illume.models.clip_resnet import ModifiedResNet
from illume.models.magma import MagmaForCausalLM
from illume.models.vlm import MagmaVLM
from illume.models.weights import load_trainable_weights, save_trainable_weights


def _batch(vlm, num_rows=3, with_text_only=True):
    examples = ShapesWorld(num_train_scenes=num_rows).examples("train")
    rows = []
    for e in examples:
        prompt = vlm.prompt_ids(f"Q: {e.question} A:")
        target = vlm.text_ids(e.answer) + [vlm.eos_token_id]
        rows.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
                     "pixel_values": vlm.pixel_values([e.image])[0]})
    if with_text_only:
        ids = vlm.text_ids("the street is wet, seeing that there is a puddle on the road") + [vlm.eos_token_id]
        rows.append({"input_ids": ids, "labels": ids, "pixel_values": None})
    return collate_rows(rows, vlm.pad_token_id)


def test_rn50x16_is_expressible_and_gives_144_tokens_of_3072():
    with torch.device("meta"):
        encoder = ModifiedResNet(layers=[6, 8, 18, 8], width=96)
        features = encoder(torch.empty(1, 3, 384, 384))
    assert encoder.output_dim == 3072
    assert tuple(features.shape) == (1, 3072, 12, 12)


def test_loss_is_cross_entropy_on_text_targets_only(tiny_vlm):
    batch = _batch(tiny_vlm)
    out = tiny_vlm.model(**batch)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    labels = batch["labels"][:, 1:].reshape(-1)
    assert torch.allclose(out.loss, F.cross_entropy(logits, labels, ignore_index=-100), atol=1e-6)
    # Even if a caller forgets to mask them, image slots never count as targets.
    unmasked = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    image_positions = batch["input_ids"] == tiny_vlm.image_token_id
    expected = unmasked["labels"].masked_fill(image_positions, -100)
    got = tiny_vlm.model(**unmasked).loss
    want = F.cross_entropy(logits, expected[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(got, want, atol=1e-6)


def test_image_changes_the_text_logits(tiny_vlm):
    batch = _batch(tiny_vlm, num_rows=2, with_text_only=False)
    swapped = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    a, b = tiny_vlm.model(**batch).logits, tiny_vlm.model(**swapped).logits
    assert not torch.allclose(a, b)


def test_image_token_count_must_match(tiny_vlm):
    batch = _batch(tiny_vlm, num_rows=2, with_text_only=False)
    with pytest.raises(ValueError, match="<|image|> tokens"):
        tiny_vlm.model(**dict(batch, pixel_values=batch["pixel_values"][:1]))


def test_adapters_train_and_everything_else_stays_frozen(tiny_vlm):
    model = tiny_vlm.model
    model.set_trainable(adapters=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}  # parameters and BatchNorm buffers
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_batch(tiny_vlm)).loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"


def test_prefix_can_be_trained_too(tiny_vlm):
    tiny_vlm.model.set_trainable(adapters=True, prefix=True)
    trainable = {n for n, p in tiny_vlm.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("image_prefix.proj") for n in trainable)
    assert not any(n.startswith("image_prefix.enc") for n in trainable)


def test_save_and_reload_gives_identical_logits(tiny_vlm, tmp_path):
    batch = _batch(tiny_vlm)
    expected = tiny_vlm.model(**batch).logits
    tiny_vlm.save(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    reloaded = MagmaVLM.load(tmp_path / "model")
    assert torch.equal(reloaded.model(**batch).logits, expected)
    assert reloaded.tokenizer.get_vocab() == tiny_vlm.tokenizer.get_vocab()


def test_trainable_weights_save_and_load_on_their_own(tiny_vlm, tmp_path):
    base_dir = tmp_path / "base"
    tiny_vlm.save(base_dir)
    model = tiny_vlm.model
    model.set_trainable(adapters=True)
    with torch.no_grad():  # stand-in for a round of training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(tiny_vlm)
    tuned_logits = model(**batch).logits
    save_trainable_weights(model, tmp_path / "adapters.safetensors")
    fresh = MagmaVLM.load(base_dir).model
    assert not torch.equal(fresh(**batch).logits, tuned_logits)
    loaded = load_trainable_weights(fresh, tmp_path / "adapters.safetensors")
    assert loaded and all(".adapter." in n for n in loaded)
    assert torch.equal(fresh(**batch).logits, tuned_logits)


def test_loading_mismatched_weights_fails_loudly(tiny_vlm, tmp_path):
    from safetensors.torch import save_file

    save_file({"lm.transformer.h.99.mlp.1.adapter.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="h.99"):
        load_trainable_weights(tiny_vlm.model, tmp_path / "bad.safetensors")


def test_generate_with_kv_cache_matches_full_recompute(tiny_vlm):
    example = ShapesWorld(num_val_scenes=2).examples("val")[0]
    ids = torch.tensor([tiny_vlm.prompt_ids(f"Q: {example.question} A: {example.answer}, seeing that")])
    pixel_values = tiny_vlm.pixel_values([example.image])
    kwargs = dict(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                  do_sample=False, pad_token_id=tiny_vlm.pad_token_id, eos_token_id=tiny_vlm.eos_token_id)
    cached = tiny_vlm.model.generate(**kwargs, use_cache=True)
    uncached = tiny_vlm.model.generate(**kwargs, use_cache=False)
    assert cached.shape[1] > ids.shape[1]
    assert torch.equal(cached, uncached)


def test_model_class_is_a_pretrained_model_with_generation():
    from transformers import GenerationMixin, PreTrainedModel

    assert issubclass(MagmaForCausalLM, PreTrainedModel) and issubclass(MagmaForCausalLM, GenerationMixin)


def test_a_loaded_model_trains_adapters_only_by_default(tiny_vlm, tmp_path):
    tiny_vlm.save(tmp_path / "m")
    for vlm in (tiny_vlm, MagmaVLM.load(tmp_path / "m")):
        trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
        assert trainable and all(".adapter." in n for n in trainable)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trainable_weights_stay_float32_in_a_half_precision_model(tiny_vlm, dtype):
    """A converted checkpoint loads in half precision: the adapters (and a trainable prefix) become float32
    master weights, the frozen weights keep their dtype, and a forward/backward pass works and sends float32
    gradients to the adapters (what fp16 loss scaling and the optimizer need)."""
    model = tiny_vlm.model.to(dtype)
    model.set_trainable(adapters=True, prefix=True)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if parameter.requires_grad else dtype), name
    batch = _batch(tiny_vlm, num_rows=2)
    # bf16 under CPU autocast, as the Trainer runs it; fp16 without (CPU autocast is bf16 only): the casts in
    # the adapters and the prefix alone must make the mixed dtypes work.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
