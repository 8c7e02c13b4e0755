"""The shapes world: deterministic, varied, every text in the demo tokenizer's vocabulary."""

import collections

from illume.data.shapes import (
    COLORS,
    ShapesWorld,
    caption_clauses,
    generic_sentences,
    render,
    split_words,
    vocabulary,
)
from illume.models.word_tokenizer import build_word_tokenizer


def test_deterministic_by_seed_and_different_across_seeds():
    a = ShapesWorld(seed=1, num_train_scenes=30).examples("train")
    b = ShapesWorld(seed=1, num_train_scenes=30).examples("train")
    c = ShapesWorld(seed=2, num_train_scenes=30).examples("train")
    key = lambda exs: [(e.id, e.question, e.answers, e.explanations, e.image.tobytes()) for e in exs]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    # A split's scenes do not move when another size changes.
    d = ShapesWorld(seed=1, num_train_scenes=10, num_val_scenes=3).examples("train")
    assert key(d) == key(a)[:10]


def test_question_types_answers_and_three_varied_references():
    examples = ShapesWorld(num_train_scenes=300).examples("train")
    types = collections.Counter(e.question_type for e in examples)
    assert set(types) == {"color", "shape", "count", "exist", "position", "size"}
    assert min(types.values()) >= 20
    for e in examples:
        assert len(e.explanations) == 3 and len(set(e.explanations)) == 3
        assert e.answer and e.question.endswith("?")
        if e.question_type in ("color", "shape", "size"):
            # the evidence for an attribute names the attribute
            assert all(e.answer in ref for ref in e.explanations), (e.question, e.explanations)


def test_splits_do_not_share_ids_and_captions_never_rationalise():
    world = ShapesWorld(num_train_scenes=20, num_val_scenes=20, num_test_scenes=20)
    ids = [e.id for split in ("train", "val", "test") for e in world.examples(split)]
    assert len(ids) == len(set(ids))
    for index in range(50):
        for caption in world.captions("pretrain", index, 3):
            assert "seeing that" not in caption and "," not in caption
    assert all("seeing that" in s for s in generic_sentences())


def test_every_word_is_in_the_vocabulary():
    tokenizer = build_word_tokenizer(vocabulary())
    world = ShapesWorld(num_train_scenes=100, num_pretrain_scenes=100)
    texts = [t for e in world.examples("train") for t in (e.question, e.answer, *e.explanations)]
    texts += [c for i in range(100) for c in caption_clauses(world.scene("pretrain", i), world.rng("pretrain", i, "x"))]
    texts += generic_sentences()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert split_words(tokenizer.decode(ids)) == split_words(text)


def test_images_show_the_objects():
    world = ShapesWorld(num_val_scenes=5)
    for index in range(5):
        scene = world.scene("val", index)
        pixels = {color for _, color in render(scene).getcolors(maxcolors=1 << 16)}
        assert {COLORS[o.color] for o in scene.objects} <= pixels
