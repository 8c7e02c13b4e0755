"""Official MAGMA checkpoints: strict key accounting, tiny round trips, the full-size config's counts."""

import numpy as np
import pytest
import torch
from PIL import Image

from illume.config import AdapterConfig, LMConfig, ModelConfig, VisionConfig
from illume.models.image_processing import resize_and_crop, to_pixel_values
from illume.models.magma import MagmaForCausalLM, build_magma_config
from illume.models.magma_checkpoint import (
    OFFICIAL_EMBEDDING_ROWS,
    MagmaCheckpointError,
    add_convert_magma_parser,
    convert_magma,
    load_official_checkpoint,
    magma_config,
    official_key,
    official_state_dict,
    save_official_checkpoint,
)
from illume.models.vlm import MagmaVLM
from illume.models.word_tokenizer import IMAGE_TOKEN, build_word_tokenizer

WORDS = "a red blue circle square is on the left right there".split()
PAD_ROWS = 6  # the LM head has more rows than the tokenizer has ids, as GPT-J's 50,400 vs 50,258


def _tiny(version: str, seed: int = 0):
    """A tiny MAGMA in the v1 (MLP adapters) or v2 (attention + MLP adapters) layout, with its tokenizer."""
    tokenizer = build_word_tokenizer(WORDS)
    adapters = AdapterConfig(0, 4) if version == "v1" else AdapterConfig(4, 4)
    model_cfg = ModelConfig(vision=VisionConfig([1, 1, 1, 1], 8, 64),
                            lm=LMConfig(32, 2, 2, 8, 64, vocab_size=len(tokenizer) + PAD_ROWS,
                                        activation="gelu_new"),
                            adapters=adapters)
    config = build_magma_config(model_cfg, vocab_size=len(tokenizer),
                                image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = MagmaForCausalLM(config).eval()
    with torch.no_grad():  # make adapters and BatchNorm statistics matter, so a mix-up shows in the logits
        for name, tensor in model.state_dict().items():
            if ".adapter." in name or "running_" in name:
                tensor.copy_(torch.rand_like(tensor) * 0.5 + (0.5 if "running_var" in name else 0.0))
    return model, tokenizer, config


def _logits(model, tokenizer) -> torch.Tensor:
    vlm = MagmaVLM(model, tokenizer)
    ids = torch.tensor([vlm.prompt_ids("a red circle is on the left")])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_official_layout_loads_with_every_key_accounted_for_and_same_logits(tmp_path, version):
    source, tokenizer, config = _tiny(version, seed=0)
    path = tmp_path / "mp_rank_00_model_states.pt"
    save_official_checkpoint(source, path, embedding_rows=len(tokenizer))
    target, _, _ = _tiny(version, seed=1)
    assert not torch.allclose(_logits(source, tokenizer), _logits(target, tokenizer))
    report = load_official_checkpoint(target, path)
    assert not report.allowed_missing and not report.allowed_unexpected
    assert sorted(report.loaded) == sorted(target.state_dict())
    assert report.padded == {"lm.transformer.wte.weight": [len(tokenizer), len(tokenizer) + PAD_ROWS]}
    assert set(report.ignored) == {"fork attention buffers", "alias of lm.transformer.wte / lm.transformer.h"}
    assert len(report.ignored["fork attention buffers"]) == 2 * 5  # bias, masked_bias, scale_attn, sin, cos
    torch.testing.assert_close(_logits(target, tokenizer), _logits(source, tokenizer), rtol=0, atol=0)


@pytest.mark.parametrize("version, ours, theirs", [
    ("v1", "attn.q_proj.weight", "attn.attention.q_proj.weight"),
    ("v2", "attn.attention.q_proj.weight", "attn.attn_block.attention.q_proj.weight"),
    ("v2", "attn.adapter.adapter.0.weight", "attn.adapter.0.weight"),
    ("v1", "mlp.0.fc_in.weight", "mlp.0.c_fc.weight"),
    ("v2", "mlp.0.fc_out.bias", "mlp.0.c_proj.bias"),
    ("v1", "mlp.1.adapter.0.weight", "mlp.1.adapter.0.weight"),
    ("v1", "ln_1.weight", "ln_1.weight"),
])
def test_official_block_names_are_the_forks(version, ours, theirs):
    """The names the official code gives (see the module docstring), for both adapter layouts."""
    block = "lm.transformer.h.3."
    assert official_key(block + ours, magma_config(version)) == block + theirs


@pytest.mark.parametrize("key", [
    "image_prefix.enc.layer1.0.conv1.weight", "image_prefix.enc.layer1.0.downsample.0.weight",
    "image_prefix.proj.weight", "image_prefix.ln.bias", "lm.transformer.wte.weight",
    "lm.transformer.ln_f.weight", "lm.lm_head.bias",
])
def test_names_outside_the_blocks_are_the_same(key):
    assert official_key(key, magma_config("v2")) == key


def _mismatch(state: dict, kind: str) -> str:
    if kind == "extra":
        state["lm.transformer.h.0.attn.attention.rotary_scale"] = torch.zeros(1)
        return "lm.transformer.h.0.attn.attention.rotary_scale"
    if kind == "missing":
        del state["lm.transformer.h.1.mlp.1.adapter.2.bias"]
        return "lm.transformer.h.1.mlp.1.adapter.2.bias"
    state["image_prefix.proj.weight"] = state["image_prefix.proj.weight"][:, :-1].clone()
    return "image_prefix.proj.weight"


@pytest.mark.parametrize("kind", ["extra", "missing", "shape"])
def test_mismatched_checkpoint_fails_listing_the_keys(tmp_path, kind):
    source, tokenizer, _ = _tiny("v1")
    state = official_state_dict(source, embedding_rows=len(tokenizer))
    key = _mismatch(state, kind)
    path = tmp_path / "bad.pt"
    torch.save({"module": state}, path)
    target, _, _ = _tiny("v1", seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(MagmaCheckpointError, match={"extra": "1 unexpected", "missing": "1 missing",
                                                    "shape": "1 wrong shapes"}[kind]) as error:
        load_official_checkpoint(target, path)
    assert key in str(error.value)
    assert key in {"extra": error.value.unexpected, "missing": error.value.missing,
                   "shape": [line.split(":")[0] for line in error.value.wrong]}[kind]
    unchanged = all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert unchanged, "a failed load changed weights"
    if kind == "extra":  # an explicit, narrow permission lets it through, and the report says so
        report = load_official_checkpoint(target, path, allow_unexpected=[r".*\.rotary_scale"])
        assert report.allowed_unexpected == [key]
    if kind == "missing":
        report = load_official_checkpoint(target, path, allow_missing=[r".*\.adapter\.2\.bias"])
        assert report.allowed_missing == [key]


def test_v1_checkpoint_into_v2_model_fails_and_says_which_layout_it_looks_like(tmp_path):
    source, tokenizer, _ = _tiny("v1")
    path = tmp_path / "v1.pt"
    save_official_checkpoint(source, path, embedding_rows=len(tokenizer))
    target, _, _ = _tiny("v2")
    with pytest.raises(MagmaCheckpointError, match="looks like MAGMA v1") as error:
        load_official_checkpoint(target, path)
    assert "lm.transformer.h.0.attn.adapter.0.weight" in str(error.value)


def test_alias_that_differs_from_its_original_fails(tmp_path):
    source, tokenizer, _ = _tiny("v1")
    state = official_state_dict(source, embedding_rows=len(tokenizer))
    state["transformer.0.ln_1.weight"] = state["transformer.0.ln_1.weight"] + 1
    path = tmp_path / "alias.pt"
    torch.save({"module": state}, path)
    with pytest.raises(MagmaCheckpointError, match="transformer.0.ln_1.weight: differs"):
        load_official_checkpoint(_tiny("v1", seed=1)[0], path)


def test_convert_then_load_gives_the_same_logits(tmp_path):
    source, tokenizer, config = _tiny("v2")
    checkpoint = tmp_path / "mp_rank_00_model_states.pt"
    save_official_checkpoint(source, checkpoint, embedding_rows=len(tokenizer))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    report = convert_magma(checkpoint, tmp_path / "converted", config, tokenizer_dir)
    assert (tmp_path / "converted" / "conversion_report.json").is_file()
    assert report.padded
    loaded = MagmaVLM.load(tmp_path / "converted")
    assert loaded.image_token_id == config.image_token_id
    expected = _logits(source, tokenizer)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), expected, rtol=0, atol=0)
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)


def test_convert_magma_command_needs_no_allow_missing(tmp_path, monkeypatch, capsys):
    """`illume convert-magma` as a user runs it (the full-size config swapped for the tiny one): the model is
    built on the meta device, so the rotary table (a non-persistent buffer no checkpoint holds) must be
    rebuilt through transformers' current GPT-J layout, without --allow-missing."""
    from illume.cli import main
    from illume.models import magma_checkpoint

    source, tokenizer, config = _tiny("v2")
    checkpoint = tmp_path / "mp_rank_00_model_states.pt"
    save_official_checkpoint(source, checkpoint, embedding_rows=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.setattr(magma_checkpoint, "magma_config", lambda version: config)
    assert main(["convert-magma", str(checkpoint), str(tmp_path / "out"), "--version", "v2",
                 "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = MagmaVLM.load(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), _logits(source, tokenizer), rtol=0, atol=0)


def test_convert_keeps_the_checkpoint_dtype_unless_told(tmp_path):
    source, tokenizer, config = _tiny("v1")
    checkpoint = tmp_path / "half.pt"
    save_official_checkpoint(source, checkpoint, embedding_rows=len(tokenizer), dtype=torch.float16)
    convert_magma(checkpoint, tmp_path / "half", config)
    half = MagmaForCausalLM.from_pretrained(tmp_path / "half")
    assert half.lm.lm_head.weight.dtype == torch.float16
    convert_magma(checkpoint, tmp_path / "full", config, dtype=torch.float32)
    assert MagmaForCausalLM.from_pretrained(tmp_path / "full").lm.lm_head.weight.dtype == torch.float32


def _parse_convert(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_convert_magma_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["convert-magma", *argv])


def test_convert_cli_arguments():
    args = _parse_convert(["ckpt.pt", "out", "--version", "v2", "--allow-missing", "a.*",
                           "--allow-missing", "b.*", "--tokenizer", "gpt2"])
    assert (args.checkpoint, args.out_dir, args.version, args.tokenizer) == ("ckpt.pt", "out", "v2", "gpt2")
    assert args.allow_missing == ["a.*", "b.*"] and args.allow_unexpected is None


def test_convert_cli_reports_a_checkpoint_that_does_not_fit_and_writes_nothing(tmp_path, capsys):
    source, tokenizer, _ = _tiny("v1")
    save_official_checkpoint(source, tmp_path / "tiny.pt", embedding_rows=len(tokenizer))
    args = _parse_convert([str(tmp_path / "tiny.pt"), str(tmp_path / "out"), "--version", "v1"])
    assert args.handler(args) == 1  # a tiny checkpoint against the full-size v1 model
    printed = capsys.readouterr().out
    assert "missing keys: image_prefix.enc.layer1.1.conv1.weight" in printed and "wrong shapes" in printed
    assert not (tmp_path / "out").exists()


def test_full_size_v1_on_meta_has_gptj_6b_and_its_adapters():
    """GPT-J-6B with its 50,400-row head: 6,050,882,784 parameters. v1 adapters: 28 x (4096*1024 + 1024 +
    1024*4096 + 4096) = 28 x 8,393,728 = 235,024,384. v2: 2 x 28 x (2*4096*512 + 512 + 4096) = 235,139,072."""
    with torch.device("meta"):
        v1, v2 = MagmaForCausalLM(magma_config("v1")), MagmaForCausalLM(magma_config("v2"))

    def count(model, keep):
        return sum(p.numel() for n, p in model.named_parameters() if keep(n))

    assert count(v1, lambda n: n.startswith("lm.") and ".adapter." not in n) == 6_050_882_784
    assert count(v1, lambda n: ".adapter." in n) == 235_024_384
    assert count(v2, lambda n: ".adapter." in n) == 235_139_072
    assert v1.config.num_image_tokens == 144 and v1.image_prefix.enc.output_dim == 3072
    assert v1.lm.transformer.wte.weight.shape == (50400, 4096) and v1.config.image_token_id == 50257
    assert v1.config.text_config.activation_function == "gelu_new"
    assert OFFICIAL_EMBEDDING_ROWS == 50258  # what official_state_dict cuts wte to by default


def test_preprocessing_is_clips_resize_truncated_and_crop_rounded():
    """torchvision's Resize(384) on a 703 x 500 image gives int(384 * 703 / 500) = int(539.9) = 539 x 384
    (not 540), and CenterCrop(384) starts at int(round((539 - 384) / 2)) = round(77.5) = 78 (not 77)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (500, 703, 3), dtype=np.uint8))
    resized = image.resize((539, 384), Image.Resampling.BICUBIC)
    expected = resized.crop((78, 0, 78 + 384, 384))
    assert np.array_equal(np.asarray(resize_and_crop(image, 384)), np.asarray(expected))
    tall = Image.fromarray(rng.integers(0, 256, (703, 500, 3), dtype=np.uint8))
    assert resize_and_crop(tall, 384).size == (384, 384)
    same = Image.fromarray(rng.integers(0, 256, (384, 400, 3), dtype=np.uint8))  # shorter side already 384
    assert np.array_equal(np.asarray(resize_and_crop(same, 384)), np.asarray(same)[:, 8:392])
    pixels = to_pixel_values([image], 384)
    assert pixels.shape == (1, 3, 384, 384)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    raw = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255.0).permute(2, 0, 1)
    torch.testing.assert_close(pixels[0], (raw - mean) / std)


def test_image_token_is_added_after_the_lm_tokens_as_magma_does(tmp_path):
    """MAGMA adds <|image|> to GPT-2's tokenizer as a special token, so it gets the next id (50,257 there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from illume.models.magma_checkpoint import _tokenizer_with_image_token

    words = ["<|endoftext|>", "a", "red", "circle"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tokenizer = _tokenizer_with_image_token(tmp_path, image_token_id=len(words))
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == len(words)
    assert tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(MagmaCheckpointError, match="has id 4, the model expects 50257"):
        _tokenizer_with_image_token(tmp_path, image_token_id=50257)


def test_new_model_fields_leave_the_demo_cache_key_alone():
    """lm.vocab_size and lm.activation were added for the full-size MAGMA: at their defaults the demo's cache
    key (and so every cached demo base model) stays what it was; other values change the model and the key."""
    from pathlib import Path

    from illume.config import load_config
    from illume.demo.pretrain import demo_model_dir

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cached = "demo-base-b58830c43f5a"
    assert demo_model_dir(load_config(demo)).name == cached
    assert demo_model_dir(load_config(demo, ["model.lm.activation=gelu_new"])).name != cached
    assert demo_model_dir(load_config(demo, ["model.lm.vocab_size=160"])).name != cached
