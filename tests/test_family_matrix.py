"""The family matrix: every tiny family of `illume.demo.tiny_models.FAMILIES` (built from its config class, its
processor and chat template in code) through everything a round does — sampling K candidates with images, a
selection-SFT step, the reward model's features and a fit step, a DPO step, a KTO step, a GRPO step through TRL's
`GRPOTrainer`, and val scoring — in the family's own format (chat when it has a template, else plain).

Checked per family: rows equal `apply_chat_template`'s ids; labels are -100 over image and prompt tokens and the
ids elsewhere; image tokens are never cut (a row too long is an error); LoRA sits on the language model's
projections and nothing of the vision tower trains; the reward model reads the end token.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from PIL import Image

from illume.config import PolicyConfig, RewardConfig, SampleConfig, TrainConfig, load_config
from illume.data.datasets import load_split
from illume.data.records import load_image
from illume.demo.tiny_models import FAMILIES, build_tiny_hf_vlm
from illume.evaluation import explanation_scores
from illume.feedback.verdicts import read_feedback
from illume.models.hf import HFVLM, chat_style
from illume.prompts import ChatStyle, answer_prompt, rationale_prompt
from illume.sampling import sample
from illume.training import TrainingRow, fine_tune
from policies.data import UnpairedRow
from policies.dpo import train_dpo
from policies.kto import train_kto
from reward.model import score
from reward.pairs import PreferencePair
from reward.train import fit_reward
from tests.conftest import REPO, TINY_DATA

MATRIX = tuple(f for f in FAMILIES if f != "paligemma")
"""The families every round works with (docs/families.md). PaliGemma is a base model with prefix-LM attention:
its completion must carry token type 1 and attend causally, which illume's rows do not give it yet."""

SAMPLE = SampleConfig(temperatures=[0.8], samples_per_temperature=3, max_new_tokens=5, answer_max_new_tokens=3,
                      batch_size=4, seed=0)
TRAIN = TrainConfig(num_epochs=1, batch_size=4, learning_rate=5e-3)
RATIONALE = "the circle is red"


def family_vlm(family: str) -> HFVLM:
    """The tiny model in its default format: chat when its processor has a template (as `load_hf_vlm`)."""
    vlm = build_tiny_hf_vlm(family)
    return dataclasses.replace(vlm, chat=chat_style(vlm.processor, None, ChatStyle()))


@pytest.fixture(scope="module")
def examples():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.shapes.num_train_scenes=4"])
    return load_split(cfg.data, "train")[:4]


def _lora(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_" in n}


def _frozen(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_" not in n}


def _changed(before: dict, model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, t in before.items() if not torch.equal(t, now[n])}


def _words(text: str) -> str:
    """Text as the word-level tokenizer decodes it ("red , seeing"), written as people do ("red, seeing")."""
    return re.sub(r"\s+([,.?])", r"\1", " ".join(text.split()))


def _labels_shown(vlm, row) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]


@pytest.mark.parametrize("family", MATRIX)
def test_rows_labels_and_image_tokens(family, examples):
    vlm, example = family_vlm(family), examples[0]
    image, prompt = load_image(example), rationale_prompt(example.question, example.answer)
    row = vlm.encode_row(image, prompt, RATIONALE)
    ids, labels = row["input_ids"], row["labels"]
    image_positions = [i for i, t in enumerate(ids) if t == vlm.image_token_id]
    assert image_positions  # as many as the processor gives this image (the forward passes below check them)
    assert all(labels[i] == -100 for i in image_positions)
    assert all(label in (-100, token) for token, label in zip(ids, labels))
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label != -100 for label in labels[first:])  # one labelled span, to the end
    assert ids[-1] == vlm.eos_token_id and first > max(image_positions)
    shown = _words(vlm.tokenizer.decode(_labels_shown(vlm, row), skip_special_tokens=True))
    # plain: the rationale; chat: the assistant's turn, the connective and the rationale
    assert shown == (RATIONALE if vlm.chat is None else f"{example.answer}, seeing that {RATIONALE}")
    # the prompt alone is the prefix generation continues from
    assert vlm.encode_row(image, prompt)["input_ids"] == ids[:len(ids) - len(vlm.completion_ids(RATIONALE, prompt))]


@pytest.mark.parametrize("family", [f for f in MATRIX if build_tiny_hf_vlm(f).processor.chat_template])
@pytest.mark.parametrize("kind", ["answer", "rationale"])
def test_chat_rows_are_apply_chat_templates_ids(family, kind, examples):
    """Our ids of a whole row are the processor's `apply_chat_template` of the conversation (up to the end of the
    assistant's turn; what the template writes between turns after it is not the model's)."""
    vlm, example = family_vlm(family), examples[0]
    assert vlm.chat is not None
    image = load_image(example)
    prompt = answer_prompt(example.question) if kind == "answer" else rationale_prompt(example.question,
                                                                                         example.answer)
    turns = vlm.chat.turns(prompt)
    completion = example.answer if kind == "answer" else RATIONALE
    reply = f"{turns.reply} {completion}" if turns.reply else completion
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image.convert("RGB")},
                                     {"type": "text", "text": turns.user}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
    ]
    expected = vlm.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][0]
    expected = list(expected)
    ours = vlm.encode_row(image, prompt, completion)["input_ids"]
    assert ours[:-1] == expected[:len(ours) - 1]
    if expected[len(ours) - 1:len(ours)] == ours[-1:]:  # the template's end of the assistant's turn
        assert vlm.tokenizer.decode(expected[len(ours):]).strip() == ""
    else:  # a template that writes none (LLaVA-1.5's): the row ends in EOS, as the plain format's
        assert ours[-1] == vlm.tokenizer.eos_token_id
        assert vlm.tokenizer.decode(expected[len(ours) - 1:]).strip() == ""


@pytest.mark.parametrize("family", MATRIX)
def test_a_row_too_long_is_refused_not_cut(family):
    vlm = family_vlm(family)
    with pytest.raises(ValueError, match="does not truncate rows"):
        vlm.encode_row(Image.new("RGB", (32, 32), "red"), answer_prompt("circle " * (vlm.max_length or 10_000)))


@pytest.mark.parametrize("family", MATRIX)
def test_lora_on_the_language_model_only(family):
    vlm = family_vlm(family)
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    inner = vlm.model.get_base_model().model
    name = "language_model" if hasattr(inner, "language_model") else "text_model"  # Idefics3, SmolVLM
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in trainable}
    in_language_model = {f"base_model.model.model.{name}.{n}" for n, _ in getattr(inner, name).named_modules()}
    assert lora_modules <= in_language_model, sorted(lora_modules - in_language_model)[:3]


@pytest.mark.slow
@pytest.mark.parametrize("family", MATRIX)
def test_a_round_of_every_policy(family, examples, tmp_path):
    """Sampling, selection-SFT, the reward model, DPO and KTO, each one step, and val scoring: only LoRA (and the
    reward head) train, the vision tower never."""
    vlm, by_id = family_vlm(family), {e.id: e for e in examples}
    sets = sample(vlm, examples, SAMPLE, use_reference_answer=True)
    assert [cs.example_id for cs in sets] == [e.id for e in examples]
    assert sum(len(cs.candidates) for cs in sets) > 0

    frozen = _frozen(vlm)
    rows = [TrainingRow(e.id, "rationale", rationale_prompt(e.question, e.answer), e.explanations[0], 1.0)
            for e in examples]
    lora = _lora(vlm)
    fine_tune(vlm, rows, examples, examples[:2], TRAIN, SAMPLE, tmp_path / "sft")
    assert _changed(lora, vlm.model) and not _changed(frozen, vlm.model)

    pairs = [PreferencePair(e.id, rationale_prompt(e.question, e.answer), e.explanations[0], "the sky is blue", 0)
             for e in examples]
    scored = vlm.collate_scored(vlm.encode_scored([(load_image(e), p.prompt, [p.chosen]) for e, p in
                                                   zip(examples, pairs)])[0], [0])
    last = scored["attention_mask"].sum(-1) - 1
    assert scored["input_ids"][0, last[0]] == vlm.eos_token_id  # the token "last" pooling reads
    rm, metrics = fit_reward(vlm, pairs, [], by_id, RewardConfig(num_epochs=1, batch_size=2, learning_rate=1e-2),
                             tmp_path / "reward")
    rewards = score(rm, [(e, p.prompt, [p.chosen, p.rejected]) for e, p in zip(examples, pairs)])
    assert metrics["losses"] and all(torch.isfinite(torch.tensor(r)).all() for r in rewards)
    assert not _changed(frozen, vlm.model)

    lora = _lora(vlm)
    train_dpo(vlm, pairs, by_id, PolicyConfig(kind="dpo"), TRAIN, tmp_path / "dpo")
    assert _changed(lora, vlm.model) and not _changed(frozen, vlm.model)
    labelled = [UnpairedRow(p.example_id, p.prompt, text, ok) for p in pairs
                for text, ok in ((p.chosen, True), (p.rejected, False))]
    lora = _lora(vlm)
    train_kto(vlm, labelled, by_id, PolicyConfig(kind="kto"), TRAIN, tmp_path / "kto")
    assert _changed(lora, vlm.model) and not _changed(frozen, vlm.model)

    scores = explanation_scores(vlm, examples[:2], SAMPLE, progress=False)
    assert {"answer_accuracy", "cider"} <= set(scores)


@pytest.mark.slow
@pytest.mark.parametrize("family", MATRIX)
def test_a_grpo_step_through_trl(family, tmp_path):
    from illume.feedback.store import FeedbackStore
    from policies.base import RoundContext
    from policies.grpo_trl import trl_grpo_round

    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_DATA + [
        "model.kind=hf", f"model.path={tmp_path / 'unused'}", "policy.kind=grpo",
        "policy.grpo.reward_sources.reward_model=0", "policy.grpo.reward_sources.probe=1.0", "policy.grpo.num_generations=2",
        "policy.grpo.iterations=1", "policy.grpo.answer_weight=0", "sample.max_new_tokens=4",
        "sample.batch_size=4", "train.batch_size=4", f"output_dir={tmp_path}"])
    train = load_split(cfg.data, "train")[:2]
    val = load_split(cfg.data, "val")[:1]
    vlm = family_vlm(family)
    frozen, lora = _frozen(vlm), _lora(vlm)

    def length(context, sets):
        return [[float(len(c.text)) + 0.1 * j for j, c in enumerate(cs.candidates)] for cs in sets]

    store = FeedbackStore(tmp_path / "feedback.db")
    context = RoundContext(cfg, vlm, store, 0, train, {e.id: e for e in train}, val, tmp_path / "round_00",
                           feedback=read_feedback(store, upto_round=0), say=lambda _: None)
    trl_grpo_round(context, sources={"probe": length})
    assert _changed(lora, vlm.model) and not _changed(frozen, vlm.model)
