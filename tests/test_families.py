"""The `hf` backend's per-family facts on tiny random models of every family `build_tiny_hf_vlm` builds (CPU,
offline): image tokens, LoRA placement, the projector, chat templates, and decoding."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image

from illume.demo.tiny_models import FAMILIES, build_tiny_hf_vlm
from illume.models.hf import HFVLM, _generate

# PaliGemmaProcessor turns its torch input ids into numpy (np.array(tensor)) for its labels, which numpy 2
# deprecates for torch's __array__; the deprecation guard would blame our processor call for that.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

PROMPT = "Q: what colour is the circle? A:"
PROMPTS = ["Q: what color is the circle ? A: red, seeing that", "Q: is there a square ? A: no, seeing that",
           "Q: how many shapes are there ? A: two shapes, seeing that"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Image tokens the tiny models give a 40 x 56 image (illume.demo.tiny_families has how each comes about).
IMAGE_TOKENS = {"llava": 16, "llava_next": 28, "llava_onevision": 28, "qwen2_vl": 6, "qwen2_5_vl": 6,
                "qwen3_vl": 6, "idefics3": 16, "smolvlm": 16, "gemma3": 4, "internvl": 12, "paligemma": 16}


def _family(name: str):
    marks = []
    if name == "smolvlm" and importlib.util.find_spec("num2words") is None:
        marks.append(pytest.mark.skip(reason="SmolVLM's processor needs the num2words package"))
    return pytest.param(name, marks=marks)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small gain nothing from a second thread, and its OpenMP hand-offs cost seconds per test
    when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[_family(name) for name in FAMILIES])
def vlm(request) -> HFVLM:
    return build_tiny_hf_vlm(request.param)


def _family_of(vlm: HFVLM) -> str:
    return _base(vlm).config.model_type


def _base(vlm: HFVLM):
    return vlm.model.get_base_model()


def _image(i: int = 0) -> Image.Image:
    return Image.new("RGB", (40 + 8 * i, 56), (60 * i, 120, 30))


def _image_token_id(vlm: HFVLM) -> int:
    """The model's image token: the one its image features replace (Gemma3's processor names another one,
    `<start_of_image>`, its `image_token_id`)."""
    config = _base(vlm).config
    return getattr(config, "image_token_id", None) or config.image_token_index


def _vision_tower(vlm: HFVLM) -> torch.nn.Module:
    inner = _base(vlm).model
    names = ("vision_tower", "visual", "vision_model")
    return next(getattr(inner, name) for name in names if hasattr(inner, name))


def _projector_parameters(vlm: HFVLM) -> set[str]:
    """The projector's parameters, found by module (not by `PROJECTOR_MODULES`'s names)."""
    base = _base(vlm)
    inner = base.model
    names = ("multi_modal_projector", "connector")
    modules = [getattr(inner, name) for name in names if hasattr(inner, name)]
    if hasattr(inner, "visual"):  # Qwen: the merger(s) sit at the end of the vision tower
        modules += [inner.visual.merger] + list(getattr(inner.visual, "deepstack_merger_list", []))
    owned = {id(p) for module in modules for p in module.parameters()}
    if hasattr(inner, "image_newline"):
        owned.add(id(inner.image_newline))
    return {name for name, p in vlm.model.named_parameters() if id(p) in owned}


def _plain_inputs(vlm: HFVLM) -> dict[str, torch.Tensor]:
    encoded = vlm.processor(images=[_image()], text=[vlm.image_placeholder + PROMPT], return_tensors="pt")
    encoded.pop("labels", None)  # PaliGemma's processor adds labels (all -100 without a suffix)
    return dict(encoded)


def test_processor_expands_the_image_into_the_tokens_the_model_reads(vlm):
    inputs = _plain_inputs(vlm)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(_image_token_id(vlm)) == IMAGE_TOKENS[_family_of(vlm)] > 1
    assert len(ids) < 100
    # The model puts one image feature per image token and refuses a mismatch.
    loss = _base(vlm)(**inputs, labels=inputs["input_ids"]).loss
    assert math.isfinite(loss.item())


def test_lora_sits_on_the_language_models_projections_only(vlm):
    base = _base(vlm)
    language_model = base.get_decoder()
    in_language_model = {id(module) for module in language_model.modules()}
    wrapped = [(name, module) for name, module in base.named_modules() if isinstance(module, LoraLayer)]
    num_layers = base.config.get_text_config().num_hidden_layers
    assert len(wrapped) == len(PROJECTIONS) * num_layers
    for name, module in wrapped:
        assert id(module) in in_language_model and name.rsplit(".", 1)[1] in PROJECTIONS, name
    vlm.set_trainable(adapters=True)
    trainable = {name for name, p in vlm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(p.requires_grad for p in _vision_tower(vlm).parameters())


def test_prefix_training_trains_the_projector_and_nothing_else_outside_lora(vlm):
    projector = _projector_parameters(vlm)
    try:
        vlm.set_trainable(adapters=True, prefix=True)
        trainable = {name for name, p in vlm.model.named_parameters()
                     if p.requires_grad and "lora_" not in name}
    finally:
        vlm.set_trainable(adapters=True)
    assert projector and trainable == projector


def test_backward_reaches_lora_only(vlm):
    inputs = _plain_inputs(vlm)
    vlm.model.zero_grad(set_to_none=True)
    try:
        vlm.model(**inputs, labels=inputs["input_ids"]).loss.backward()
        with_grad = {name for name, p in vlm.model.named_parameters() if p.grad is not None}
        lora = {name for name, _ in vlm.model.named_parameters() if "lora_" in name}
        assert with_grad == lora
        assert any(p.grad.abs().sum() > 0 for name, p in vlm.model.named_parameters() if name in lora)
    finally:
        vlm.model.zero_grad(set_to_none=True)


def _chat_markers(text: str) -> list[str]:
    """Special-token-looking pieces of a rendered chat: <...>, <|...|>, [INST]-style."""
    return re.findall(r"<\|?[\w/-]+\|?>|\[/?[A-Z_]+\]", text)


def test_chat_template_renders_images_and_continues_the_final_message(vlm, request):
    family = _family_of(vlm)
    if family == "paligemma":
        assert vlm.processor.chat_template is None  # a base model: "<image>" x N, BOS, prefix, "\n", suffix
        return
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    opened = vlm.processor.apply_chat_template([user], add_generation_prompt=True)
    assert "hi" in opened and opened.count(vlm.processor.image_token) == 1
    reply = {"role": "assistant", "content": [{"type": "text", "text": "red, seeing that"}]}
    continued = vlm.processor.apply_chat_template([user, reply], continue_final_message=True)
    assert continued.startswith(vlm.processor.apply_chat_template([user])) and continued != opened
    assert continued.endswith("red, seeing that")  # left open: no end of turn after the reply
    # The rendered chat is what the processor reads: its image expands as in a plain prompt.
    ids = vlm.processor(images=[_image()], text=[opened])["input_ids"][0]
    assert list(ids).count(_image_token_id(vlm)) == IMAGE_TOKENS[family]
    if family != "qwen2_vl":  # its tokenizer predates the template (see tiny_families._qwen2_vl)
        assert all(len(vlm.tokenizer.tokenize(m)) == 1 for m in _chat_markers(continued)), continued


def _rows(vlm: HFVLM) -> list[dict]:
    return [vlm.encode_row(_image(i), prompt) for i, prompt in enumerate(PROMPTS)]


def test_decode_draws_two_copies_as_repeated_prompts_draw(vlm):
    rows = _rows(vlm)
    # A prompt's last token is its own text, never part of the image: a shared pre-fill runs all but that
    # token, and generate runs it without image inputs.
    assert all(vlm.tokenizer.convert_ids_to_tokens(row["input_ids"][-1]) == "that" for row in rows)
    temperatures = torch.tensor([0.0, 1.0] * len(PROMPTS))  # a greedy copy and a sampled one per prompt

    def generators():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]

    # `decode` pre-fills each prompt once for SHARED_PREFILL_FAMILIES, else repeats it (the reference).
    tokens, logprobs = vlm.decode([_image(i) for i in range(len(PROMPTS))], PROMPTS, 2, 5, [vlm.eos_token_id],
                                  temperatures, generators())
    reference, reference_logprobs = _generate(vlm, rows, 2, 5, [vlm.eos_token_id], temperatures, generators(),
                                              share_prefill=False)
    assert len(tokens) == 2 * len(PROMPTS) and all(math.isfinite(lp) for lp in logprobs)
    assert tokens == reference
    assert logprobs == pytest.approx(reference_logprobs, abs=1e-5)
    assert any(tokens[i] != tokens[i + 1] for i in range(0, len(tokens), 2))  # the copies are real draws


def test_encode_row_labels_the_completion_only(vlm, request):
    prompt_row = vlm.encode_row(_image(), PROMPTS[0])
    full_row = vlm.encode_row(_image(), PROMPTS[0], " the circle is red")
    n = len(prompt_row["input_ids"])
    assert full_row["input_ids"][:n] == prompt_row["input_ids"]
    assert full_row["labels"] == [-100] * n + full_row["input_ids"][n:]
    batch = vlm.collate([full_row, prompt_row])
    loss = vlm.model(**batch).loss
    assert math.isfinite(loss.item())
