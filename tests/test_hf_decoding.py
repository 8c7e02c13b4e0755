"""The `hf` backend's shared pre-fill: K candidates of a prompt from one pre-fill and a repeated KV cache draw
exactly what K repeated prompts draw (tiny random LLaVA and Qwen2-VL, CPU, offline)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from illume.demo.tiny_models import build_tiny_hf_vlm
from illume.models.hf import HFVLM, SHARED_PREFILL_FAMILIES, _decode_loop, _generate

# Different lengths (left padding differs per row) and image sizes (Qwen2-VL: different numbers of image tokens).
PROMPTS = ["Q: what color is the circle ? A: red, seeing that", "Q: is there a square ? A: no, seeing that",
           "Q: how many shapes are there ? A: two shapes, seeing that"]
K = 4
TEMPERATURES = torch.tensor([0.0, 0.3, 0.8, 0.8] * len(PROMPTS))  # a greedy row and two temperatures
MAX_NEW_TOKENS = 10


@pytest.fixture(params=["llava", "qwen2_vl"])
def vlm(request) -> HFVLM:
    return build_tiny_hf_vlm(request.param)


def _rows(vlm: HFVLM) -> list[dict]:
    images = [Image.new("RGB", (40 + 8 * i, 56), (60 * i, 120, 30)) for i in range(len(PROMPTS))]
    return [vlm.encode_row(image, prompt) for image, prompt in zip(images, PROMPTS)]


def _decode(vlm: HFVLM, share_prefill: bool, **kwargs) -> tuple[list[list[int]], list[float]]:
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]
    return _generate(vlm, _rows(vlm), K, MAX_NEW_TOKENS, [vlm.eos_token_id], TEMPERATURES, generators,
                     share_prefill=share_prefill, **kwargs)


def _vision_inputs(vlm: HFVLM) -> list[int]:
    """A list that records the leading size of every input to the vision tower (images or image patches)."""
    base = vlm.model.get_base_model()
    tower = base.model.vision_tower if hasattr(base.model, "vision_tower") else base.model.visual
    seen: list[int] = []
    tower.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.6}])
def test_shared_prefill_draws_what_repeated_prompts_draw(vlm, filters):
    tokens, logprobs = _decode(vlm, share_prefill=True, **filters)
    reference_tokens, reference_logprobs = _decode(vlm, share_prefill=False, **filters)
    assert tokens == reference_tokens
    assert logprobs == pytest.approx(reference_logprobs, abs=1e-5)
    assert len(tokens) == len(PROMPTS) * K
    # Not a vacuous comparison: rows differ within a prompt, and the greedy row is the greedy continuation.
    assert len({tuple(t) for t in tokens[:K]}) > 1
    greedy, _ = _generate(vlm, _rows(vlm)[:1], 1, MAX_NEW_TOKENS, [vlm.eos_token_id])
    assert tokens[0] == greedy[0]


def test_shared_prefill_runs_each_image_once(vlm):
    seen = _vision_inputs(vlm)
    _decode(vlm, share_prefill=True)
    _decode(vlm, share_prefill=False)
    shared, repeated = seen
    assert repeated == K * shared  # the repeated path encodes every image once per copy


def test_both_tiny_families_share_by_default(vlm, monkeypatch):
    assert vlm.model.get_base_model().config.model_type in SHARED_PREFILL_FAMILIES
    import illume.models.hf as hf

    used = []
    original = hf._shared_prefill_inputs
    monkeypatch.setattr(hf, "_shared_prefill_inputs", lambda *a: used.append(1) or original(*a))
    _generate(vlm, _rows(vlm), K, 2, [vlm.eos_token_id], TEMPERATURES,
              [torch.Generator().manual_seed(0) for _ in PROMPTS])
    _generate(vlm, _rows(vlm), 1, 2, [vlm.eos_token_id])  # one copy: nothing to share
    assert used == [1]


@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.6}])
def test_our_decode_loop_draws_what_generate_draws(vlm, filters):
    """`HFVLM.decode`'s own loop (one pre-fill, finished rows dropped) gives `generate`'s tokens and
    log-probabilities, for K sampled rows and for one greedy row per prompt that stops at an answer stop."""
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]
    tokens, logprobs = _decode_loop(vlm, _rows(vlm), K, MAX_NEW_TOKENS, [vlm.eos_token_id], TEMPERATURES,
                                    generators, **filters)
    reference_tokens, reference_logprobs = _decode(vlm, share_prefill=True, **filters)
    assert tokens == reference_tokens
    assert logprobs == pytest.approx(reference_logprobs, abs=1e-5)
    # Greedy, stopping at the most probable first token of some row: rows stop at different steps.
    stops = [vlm.eos_token_id, reference_tokens[0][1]]
    greedy = _decode_loop(vlm, _rows(vlm), 1, MAX_NEW_TOKENS, stops)
    reference = _generate(vlm, _rows(vlm), 1, MAX_NEW_TOKENS, stops)
    assert greedy[0] == reference[0] and greedy[1] == pytest.approx(reference[1], abs=1e-5)


def test_our_decode_loop_drops_finished_rows(vlm):
    """Rows that stopped leave the batch: later steps run fewer rows (generate runs all until the last stops)."""
    steps: list[int] = []
    vlm.model.get_base_model().register_forward_hook(lambda module, args, kwargs, output: steps.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]
    tokens, _ = _decode_loop(vlm, _rows(vlm), K, MAX_NEW_TOKENS, [vlm.eos_token_id, *range(5, 40)],
                             TEMPERATURES, generators)
    assert steps[0] == len(PROMPTS)  # the pre-fill: each prompt once
    assert steps[1] == len(PROMPTS) * K - sum(len(t) == 0 for t in tokens)
    assert steps[1:] == sorted(steps[1:], reverse=True) and steps[-1] < steps[1]
