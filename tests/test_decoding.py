"""Generation recipes: top-k / top-p filters (illume.models.logits_filters) in every backend's sampler, the
answer's temperature, and the configs and resume check that carry them (docs/byo-vlm.md, "Generation
recipes")."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from illume import loading
from illume.config import ConfigError, RunConfig, SampleConfig, load_config, save_config
from illume.data.records import load_image
from illume.data.shapes import ShapesWorld
from illume.models import magma_decoding
from illume.models.hf import _GumbelMaxSampling
from illume.models.logits_filters import filter_logits, top_k_filter, top_p_filter
from illume.prompts import ANSWER_PROMPT
from illume.resume import setting_changes
from illume.sampling import sample
from tests.conftest import REPO, tiny_overrides

NEW_KEYS = ("top_k", "top_p", "answer_temperature")


def kept(scores: torch.Tensor) -> list[int]:
    """Token ids a filter left (finite scores) in a one-row result."""
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


# --- (a) top-k --------------------------------------------------------------------------------------------

def test_top_k_keeps_exactly_the_k_highest():
    scores = torch.tensor([[1.0, 3.0, 2.5, 0.5, 2.0],
                           [0.0, -1.0, 4.0, 2.0, 3.0]])
    out = top_k_filter(scores, 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False, False],
                                            [False, False, True, False, True]]
    assert torch.equal(out[torch.isfinite(out)], scores[torch.isfinite(out)])  # kept scores untouched
    assert kept(top_k_filter(scores[:1], 3)) == [1, 2, 4]
    assert kept(top_k_filter(scores[:1], 1)) == [1]
    # Tokens tied with the k-th are all kept (transformers' TopKLogitsWarper does the same).
    assert kept(top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]]), 2)) == [1, 2, 3]
    # k >= vocabulary, 0 or None: nothing removed.
    assert torch.equal(top_k_filter(scores, 5), scores)
    for off in (0, None):
        assert filter_logits(scores, off, 1.0) is scores


# --- (b) top-p --------------------------------------------------------------------------------------------

def magma_style_top_p_removed(scores: torch.Tensor, p: float) -> torch.Tensor:
    """What Aleph-Alpha/magma's top_p_filter removes: sorted descending, cumulative probability `< 1 - p`
    marked, the marks shifted one to the right, the first token kept (docs/byo-vlm.md, Generation recipes)."""
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
    marked = cumulative < 1 - p
    shifted = torch.zeros_like(marked)
    shifted[..., 1:] = marked[..., :-1]
    return torch.zeros_like(shifted).scatter(-1, order, shifted)


def test_top_p_keeps_the_smallest_set_reaching_p():
    scores = logits_of([0.5, 0.3, 0.1, 0.1])
    # .5 + .3 + .1 = .9 reaches p = 0.9: the last token goes.
    assert kept(top_p_filter(scores, 0.9)) == [0, 1, 2]
    # MAGMA's filter on the same input removes nothing: its nucleus is the whole vocabulary.
    assert not magma_style_top_p_removed(scores, 0.9).any()
    assert kept(top_p_filter(scores, 0.8)) == [0, 1]  # .8 reached exactly by two tokens
    assert kept(top_p_filter(scores, 0.85)) == [0, 1, 2]
    assert kept(top_p_filter(scores, 0.5)) == [0]
    assert kept(top_p_filter(scores, 0.95)) == [0, 1, 2, 3]
    assert torch.equal(top_p_filter(scores, 1.0), scores)
    # The order of the vocabulary does not matter.
    assert kept(top_p_filter(logits_of([0.1, 0.3, 0.1, 0.5]), 0.9)) == [0, 1, 3]


def test_top_p_ties_and_the_top_token():
    # Ties at the boundary: the lower token id counts as the more probable (as argmax), so it is kept.
    assert kept(top_p_filter(logits_of([0.4, 0.3, 0.15, 0.15]), 0.8)) == [0, 1, 2]
    assert kept(top_p_filter(logits_of([0.15, 0.3, 0.15, 0.4]), 0.8)) == [0, 1, 3]
    # A tiny p keeps the most probable token only, never nothing; with a tie at the top, argmax's token.
    assert kept(top_p_filter(logits_of([0.2, 0.5, 0.3]), 1e-9)) == [1]
    assert kept(top_p_filter(logits_of([0.4, 0.4, 0.2]), 1e-9)) == [0]
    # Rows are filtered independently.
    both = top_p_filter(torch.cat([logits_of([0.5, 0.3, 0.1, 0.1]), logits_of([0.1, 0.1, 0.3, 0.5])]), 0.8)
    assert torch.isfinite(both).tolist() == [[True, True, False, False], [False, False, True, True]]


def test_filters_equal_transformers_warpers_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn((8, 500), generator=generator) * 3
        for k in (1, 5, 50):
            assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(None, scores.clone()))
        for p in (0.3, 0.7, 0.9, 0.95):
            ours = torch.isfinite(top_p_filter(scores, p))
            assert torch.equal(ours, torch.isfinite(TopPLogitsWarper(p)(None, scores.clone())))
        # top-k then top-p, as generate applies them (the nucleus renormalised over the top k).
        both = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(20)(None, scores.clone()))
        assert torch.equal(torch.isfinite(filter_logits(scores, 20, 0.9)), torch.isfinite(both))


# --- Both backends filter after the temperature, sampled rows only ----------------------------------------

class _FixedLogitsLM:
    """A stand-in for MagmaForCausalLM whose next-token logits are always `logits` (for every row)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids, **kwargs):
        cache = SimpleNamespace(batch_repeat_interleave=lambda n: None)
        rows = input_ids.shape[0]
        return SimpleNamespace(cache=kwargs.get("cache") or cache,
                               logits=self.logits.expand(rows, 1, -1).clone())


# probabilities [.5, .3, .1, .1, 0] (the last token banned): at T = 0.5 the top-0.9 nucleus is the first two
# tokens ([.69, .25, .03, .03]); at T = 2 it is all four ([.37, .29, .17, .17]); top-p before the temperature
# would keep three at both.
NEXT = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.1]).log()
ROWS = 400


def _magma_draws(temperature: float, top_k=None, top_p=1.0) -> set[int]:
    model = _FixedLogitsLM(NEXT)
    tokens, _ = magma_decoding.decode(model, [[0]], torch.zeros(1, 1, 1), ROWS,
                                      torch.full((ROWS,), temperature), [torch.Generator().manual_seed(1)], 1,
                                      [99], 0, [4], top_k, top_p)
    return {row[0] for row in tokens}


def _hf_draws(temperature: float, top_k=None, top_p=1.0) -> set[int]:
    processor = _GumbelMaxSampling([4], torch.full((ROWS,), temperature), [torch.Generator().manual_seed(1)],
                                   top_k, top_p)
    return set(processor(None, NEXT.expand(ROWS, -1).clone()).argmax(-1).tolist())


@pytest.mark.parametrize("draws", [_magma_draws, _hf_draws], ids=["magma", "hf"])
def test_backends_filter_the_temperature_scaled_logits(draws):
    assert draws(2.0) == {0, 1, 2, 3}  # unfiltered: every allowed token is drawn
    assert draws(0.5, top_p=0.9) == {0, 1}
    assert draws(2.0, top_p=0.9) == {0, 1, 2, 3}
    assert draws(2.0, top_k=2) == {0, 1}
    assert draws(2.0, top_k=3, top_p=0.5) == {0, 1}  # top-k then top-p on the renormalised three
    assert draws(0.0, top_k=2) == {0}  # greedy rows are left alone


# --- (d) top_k=1 (and a vanishing top_p) equal greedy ----------------------------------------------------

CFG = SampleConfig(temperatures=[0.7, 1.5], samples_per_temperature=3, max_new_tokens=8, batch_size=3)
GREEDY = dataclasses.replace(CFG, temperatures=[0.0], samples_per_temperature=1)


@pytest.fixture
def examples():
    return ShapesWorld(num_val_scenes=5).examples("val")


def _texts(sets) -> list[list[str]]:
    return [[c.text for c in cs.candidates] for cs in sets]


def test_top_k_1_and_tiny_top_p_sample_the_greedy_rationale(tiny_vlm, examples):
    greedy = _texts(sample(tiny_vlm, examples, GREEDY, progress=False))
    unfiltered = _texts(sample(tiny_vlm, examples, CFG, progress=False))
    assert unfiltered != greedy  # the temperatures alone do draw other rationales
    for cfg in (dataclasses.replace(CFG, top_k=1), dataclasses.replace(CFG, top_p=1e-9)):
        # K draws of the same single token per step: one distinct candidate, the greedy one.
        assert _texts(sample(tiny_vlm, examples, cfg, progress=False)) == greedy


def test_top_k_1_equals_greedy_on_an_hf_vlm():
    from illume.demo.tiny_models import build_tiny_hf_vlm
    from tests.test_hf_backend import _examples

    vlm = build_tiny_hf_vlm("llava")
    examples = _examples()
    cfg = SampleConfig(temperatures=[1.0], samples_per_temperature=3, max_new_tokens=5,
                       answer_max_new_tokens=3, batch_size=2)
    greedy_cfg = dataclasses.replace(cfg, temperatures=[0.0], samples_per_temperature=1)
    greedy = _texts(sample(vlm, examples, greedy_cfg, progress=False))
    assert _texts(sample(vlm, examples, cfg, progress=False)) != greedy
    assert _texts(sample(vlm, examples, dataclasses.replace(cfg, top_k=1), progress=False)) == greedy


def test_defaults_draw_as_before(tiny_vlm, examples, monkeypatch):
    """With the defaults, the answer is decoded without generators (no noise drawn) and the filters are off,
    so the candidates are those of the sampler before these settings existed."""
    calls = []
    original = tiny_vlm.decode

    def recording(images, prompts, num_copies, max_new_tokens, stop_ids, temperatures=None, generators=None,
                  top_k=None, top_p=1.0):
        calls.append((temperatures, generators, top_k, top_p))
        return original(images, prompts, num_copies, max_new_tokens, stop_ids, temperatures, generators,
                        top_k, top_p)

    monkeypatch.setattr(tiny_vlm, "decode", recording)
    sample(tiny_vlm, examples, CFG, progress=False)
    answers, rationales = calls[0::2], calls[1::2]
    assert all(t is None and g is None for t, g, _, _ in answers)
    assert all(k is None and p == 1.0 and g is not None for _, g, k, p in rationales)


# --- (c) the answer at temperature 0.01 is a real draw that equals greedy on a trained demo model -------

@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """The demo architecture (configs/demo.yaml, tiny sizes) pre-trained for 300 steps through illume.demo:
    most of its answers are confident, as a trained model's are; a random one's are not (there T = 0.01 does
    differ from greedy). How confident depends on the thread count the pre-training ran with, so the test below
    measures each answer's margin instead of assuming it."""
    overrides = tiny_overrides(tmp_path_factory.mktemp("demo")) + ["pretrain.num_steps=300"]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    world = dataclasses.asdict(cfg.data.shapes) | {"num_val_scenes": 16}
    return loading.load_vlm(cfg), ShapesWorld(**world).examples("val")


def _answers(vlm, examples, **changes) -> list[str]:
    cfg = dataclasses.replace(GREEDY, **{"max_new_tokens": 1, "batch_size": 8, **changes})
    return [cs.predicted_answer for cs in sample(vlm, examples, cfg, progress=False)]


def _answer_margins(vlm, examples, answers: list[str]) -> list[float]:
    """Each answer's first-token logit minus the runner-up's, over the tokens decoding may draw. At T = 0.01 a
    token that trails by m is drawn with odds at most exp(-100 m) against the leader."""
    rows = [vlm.encode_row(load_image(e), ANSWER_PROMPT.format(question=e.question), a)
            for e, a in zip(examples, answers)]
    batch = vlm.collate(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels" and v is not None}
    with torch.no_grad():
        logits = vlm.model(**inputs, use_cache=False).logits.float()
    logits[..., vlm.banned_token_ids] = -math.inf
    first = (batch["labels"] != -100).int().argmax(-1)  # the first answer token; its logits sit one before it
    top2 = logits[torch.arange(len(rows)), first - 1].topk(2).values
    return (top2[:, 0] - top2[:, 1]).tolist()


@pytest.mark.slow
def test_answer_at_temperature_001_equals_greedy(trained_demo):
    vlm, examples = trained_demo
    greedy = _answers(vlm, examples)
    assert len(set(greedy)) > 1 and all(greedy)
    # Where the leader is ahead by >= 0.15 a draw at T = 0.01 differs from greedy with odds below 1e-6 per token:
    # those answers must be greedy's. Near-ties (a few answers, depending on the pre-training's thread count) may
    # go either way and are not compared.
    margins = _answer_margins(vlm, examples, greedy)
    confident = [i for i, m in enumerate(margins) if m >= 0.15]
    assert len(confident) >= 0.75 * len(examples), margins
    for changes in ({}, {"top_k": 5}):
        cold = _answers(vlm, examples, answer_temperature=0.01, **changes)
        assert [cold[i] for i in confident] == [greedy[i] for i in confident], changes
    # The same code path at a higher temperature draws other answers: 0.01 is sampling, not a greedy switch.
    hot = _answers(vlm, examples, answer_temperature=1.0)
    assert hot != greedy
    assert _answers(vlm, examples, answer_temperature=1.0) == hot  # seeded per example: reproducible
    assert _answers(vlm, examples, answer_temperature=1.0, batch_size=3) == hot  # in any batch


def test_a_sampled_answer_leaves_the_rationale_noise_alone(tiny_vlm, examples):
    """The answer draws from its own generator: on the train split (reference answers in the prompts) the
    rationales are those of a greedy answer, whatever the answer temperature."""
    greedy = sample(tiny_vlm, examples, CFG, use_reference_answer=True, progress=False)
    hot = sample(tiny_vlm, examples, dataclasses.replace(CFG, answer_temperature=1.0),
                 use_reference_answer=True, progress=False)
    assert [cs.predicted_answer for cs in hot] != [cs.predicted_answer for cs in greedy]
    assert _texts(hot) == _texts(greedy)


# --- Configs and the resume check ---------------------------------------------------------------------------

def test_vqax_magma_uses_illumes_recipe():
    s = load_config(REPO / "configs" / "vqax_magma.yaml").sample
    assert (s.temperatures, s.samples_per_temperature, s.max_new_tokens) == ([0.3, 0.8], 5, 100)
    assert s.top_k == int(0.1 * 50400) == 5040 and s.top_p == 1.0
    assert s.answer_temperature == 0.01


def test_defaults_keep_todays_sampling():
    s = SampleConfig()
    assert (s.top_k, s.top_p, s.answer_temperature) == (None, 1.0, 0.0)


@pytest.mark.parametrize("override", ["sample.top_k=-1", "sample.top_p=0", "sample.top_p=1.5",
                                      "sample.answer_temperature=-0.1"])
def test_bad_values_are_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_a_run_saved_before_these_keys_resumes_at_their_defaults(tmp_path):
    """An older run's config.yaml lacks the keys: it loads with their defaults, so resuming with the defaults
    is no change, and setting one is."""
    save_config(load_config(REPO / "configs" / "demo.yaml"), tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    old_text = "\n".join(line for line in text.splitlines() if line.strip().split(":")[0] not in NEW_KEYS)
    assert old_text != text and all(f"{key}:" not in old_text for key in NEW_KEYS)
    (tmp_path / "config.yaml").write_text(old_text + "\n")
    old = load_config(tmp_path / "config.yaml")
    assert isinstance(old, RunConfig)
    assert setting_changes(old, load_config(REPO / "configs" / "demo.yaml"), 0) == {}
    new = load_config(REPO / "configs" / "demo.yaml", ["sample.top_k=5040", "sample.answer_temperature=0.01"])
    assert setting_changes(old, new, 0) == {"sample.top_k": (None, 5040),
                                            "sample.answer_temperature": (0.0, 0.01)}
    assert math.isclose(new.sample.answer_temperature, 0.01)
