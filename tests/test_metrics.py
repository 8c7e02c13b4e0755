"""Tests for illume/metrics: caption scores against pycocoevalcap, the PTB tokenizer port, VQA accuracy.

The reference values come from pycocoevalcap's own classes (PTBTokenizer, Bleu(4), Meteor(), Rouge(), Cider())
run on the same inputs, and must be equal to ours. METEOR's JVM takes about 10 s to start, so one METEOR
process serves the whole module.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import evaluate
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge, my_lcs
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from illume.metrics import caption_scores as caption_module
from illume.metrics.answer_accuracy import AnswerAccuracy, answer_accuracy, normalize_answer
from illume.metrics.caption_scores import (
    CAPTION_METRICS,
    CaptionScores,
    JavaMissingWarning,
    _lcs_length,
    caption_scores,
    rouge_l_per_item,
)
from illume.metrics.ptb_tokenizer import java_ptb_tokenize, python_ptb_tokenize

REPO = Path(__file__).resolve().parents[1]
METRICS_DIR = REPO / "illume" / "metrics"
# ILLUME's val split, kept outside the repository (see ../shared/data/vqax/README.md).
SHARED_VAL = REPO.parent / "shared" / "data" / "vqax" / "val.json"

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime (pycocoevalcap)")

PREDICTIONS = [
    "A man is riding a horse on the beach.",
    "Two dogs are playing with a frisbee in the park",
    "there is a red bus parked next to the sidewalk",
    "The woman's holding an umbrella because it's raining.",
    "a plate with pizza and a glass of wine",
    "Kids are flying kites (three of them) on a windy day!",
]
REFERENCES = [
    [
        "A man rides a horse along the beach.",
        "Someone on horseback at the seaside.",
        "a person riding a brown horse",
    ],
    [
        "Dogs playing frisbee in a park.",
        "Two dogs chase a frisbee on the grass",
        "two puppies are playing outside",
    ],
    [
        "A red double-decker bus by the curb.",
        "The bus is red and parked.",
        "a red bus stopped near a sidewalk",
    ],
    [
        "It is raining, so she holds an umbrella.",
        "The woman has an umbrella; it's wet.",
        "she doesn't want to get wet",
    ],
    [
        "A pizza on a plate next to wine.",
        "pizza and wine are on the table",
        "There's a glass of red wine and pizza.",
    ],
    ["Children fly kites in the wind.", "Three kids with kites.", "kites are flying over the field"],
]

# Inputs the pure-Python tokenizer must tokenize exactly like Stanford's PTBTokenizer, one per line and
# in this order (some rules look at the next line: "no." before a line starting with a digit).
TRICKY = [
    "",
    "   ",
    "...",
    'A colour, Mr. "Smith" & Co. -- don\'t 1/2 * (x) [y] {z} U.S.',
    "It's 10:30 a.m. and the dog's bowl isn't full... I'm sure they're fine!",
    "The man cannot go; he's gonna wait. 'Tis the season. O'clock? rock 'n' roll",
    "e.g. the t-shirt is well-known, i.e. 5-10 people; 3.5% of $100",
    "visit www.google.com or http://example.com/a?b=c. mail bob@example.com",
    "plan B. The end",
    "He lives in the U.S. The end",
    "the answer is no.",
    "2 dogs are there",
    "etc. The dog etc.",
    "\u201cCurly quotes\u201d and \u2018single\u2019 \u2014 em dash \u2013 en dash \u2026 ellipsis",
    "wow!! really?! ok?? hmm....",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 1\u00bd \u00a35 \u20ac10 \u00a2 \u00a5",
    ":) ;-) :D (^_^) x_x",
    "he said \"hi\" to 'Bob' and the dogs' toys",
    "I.e. the 1990s, '90s, 1,000,000 and 2nd-hand 4x4 covid-19 mp3 5pm 3D",
    "AT&T at&t S&P-500 c++ C# f# #hashtag @user",
    "and/or 1/2/3 12/25/2020 1 1/2 555-123-4567 (555) 123-4567",
    "----- --- - -- ..... . . . .. ....",
    '<b>bold</b> <a href="x">link</a> a < b > c',
    "St. Mary Mt. Fuji Dr. Who vs. Alien Jan. 5 no. 5 fig. 3 Inc. Co. Ltd. Pty. Ltd.",
    "THE DOG'S BALL ISN'T RED; O'Neil D'Angelo y'all ma'am 'em 'til c'mon li'l",
    "soft\u00adhyphen non\u00a0breaking tab\there two  spaces zero\u200bwidth",
    "emoji \U0001f600 and \U0001f436 are dropped, \u2022 bullets \u2122 \u00a9 kept",
    "a line\nbreak inside a caption",
    "The dog is brown.The cat is black.",
    "it is 5 ft. tall and 3 in. wide, approx. 2 lbs.",
    "Yes",
]


def reference_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on one caption per image, in order."""
    tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [tokenized[i][0] for i in range(len(captions))]


def reference_scores(predictions: list[str], references: list[list[str]], meteor: Meteor) -> dict[str, Any]:
    """The COCO caption evaluation done with pycocoevalcap's classes directly (as COCOEvalCap does)."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_score, meteor_items = meteor.compute_score(gts, res)
    rouge, rouge_items = Rouge().compute_score(gts, res)
    cider, cider_items = Cider().compute_score(gts, res)
    scores: dict[str, Any] = {f"bleu_{n + 1}": bleu[n] for n in range(4)}
    scores.update(meteor=meteor_score, rouge_l=rouge, cider=cider)
    items: dict[str, Any] = {f"bleu_{n + 1}": list(bleu_items[n]) for n in range(4)}
    items.update(meteor=list(meteor_items), rouge_l=list(rouge_items), cider=list(cider_items))
    scores["per_example"] = items
    return scores


def assert_same_scores(ours: dict[str, Any], reference: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Exact equality: the same pycocoevalcap code runs on the same tokens, so even the last bit agrees."""
    for key in CAPTION_METRICS:
        if key in skip:
            continue
        assert ours[key] == reference[key], key
        if "per_example" in ours:
            assert ours["per_example"][key] == [float(s) for s in reference["per_example"][key]], key


@pytest.fixture(scope="module")
def reference_meteor() -> Meteor:
    """pycocoevalcap's METEOR: the very process caption_scores uses, since each JVM takes ~10 s to load.

    It is pycocoevalcap's own `Meteor` object, which keeps no state between calls, so the reference
    scores are still pycocoevalcap's on pycocoevalcap's tokenization.
    """
    if shutil.which("java") is None:
        pytest.skip("needs a Java runtime (pycocoevalcap)")
    meteor = caption_module._meteor()
    assert type(meteor) is Meteor
    return meteor


@pytest.fixture(scope="module")
def vqax_rows() -> list[list[str]]:
    """The three reference explanations of each row of ILLUME's VQA-X val split (skips when absent)."""
    if not SHARED_VAL.is_file():
        pytest.skip(f"{SHARED_VAL} not present")
    table = json.loads(SHARED_VAL.read_text())
    columns = ["explanation", "explanation_2", "explanation_3"]
    return [[table[c][row] for c in columns] for row in table["explanation"]]


# ---------------------------------------------------------------------------------------------- tokenizer


@needs_java
def test_java_tokenizer_equals_pycocoevalcap_ptbtokenizer() -> None:
    assert java_ptb_tokenize(TRICKY) == reference_tokenize(TRICKY)


@needs_java
def test_python_tokenizer_matches_java_on_tricky_strings() -> None:
    expected = reference_tokenize(TRICKY)
    ours = python_ptb_tokenize(TRICKY)
    mismatches = [(s, e, o) for s, e, o in zip(TRICKY, expected, ours) if e != o]
    assert not mismatches
    # Spot checks of the conventions that matter most for scores.
    assert ours[3] == "a colour mr. smith & co. do n't 1/2 * -lrb- x -rrb- -lsb- y -rsb- -lcb- z -rcb- u.s."
    assert ours[8] == "plan b the end"  # a one-letter acronym before "The" loses its period
    assert ours[10] == "the answer is no."  # "no." stays an abbreviation before a line starting with a digit


def test_python_tokenizer_without_java() -> None:
    assert python_ptb_tokenize(["It's a dog's life, isn't it?", "", "(Yes)!"]) == [
        "it 's a dog 's life is n't it",
        "",
        "-lrb- yes -rrb-",
    ]


@needs_java
def test_python_tokenizer_matches_java_on_vqax(vqax_rows: list[list[str]]) -> None:
    sentences = [s for row in vqax_rows for s in row]
    expected = reference_tokenize(sentences)
    ours = python_ptb_tokenize(sentences)
    mismatches = [(s, e, o) for s, e, o in zip(sentences, expected, ours) if e != o]
    assert not mismatches, mismatches[:5]


# ----------------------------------------------------------------------------------------- caption scores


@needs_java
def test_caption_scores_equal_pycocoevalcap(reference_meteor: Meteor) -> None:
    reference = reference_scores(PREDICTIONS, REFERENCES, reference_meteor)
    ours = caption_scores(PREDICTIONS, REFERENCES, per_example=True)
    assert_same_scores(ours, reference)
    assert set(ours) == {*CAPTION_METRICS, "per_example"}
    assert all(isinstance(ours[k], float) for k in CAPTION_METRICS)
    assert 0 < ours["meteor"] < 1 and ours["cider"] > 0
    # The pure-Python tokenizer gives the same tokens here, hence the same scores.
    assert_same_scores(
        caption_scores(PREDICTIONS, REFERENCES, per_example=True, tokenizer="python"), reference
    )


@needs_java
def test_caption_scores_equal_pycocoevalcap_on_vqax(
    reference_meteor: Meteor, vqax_rows: list[list[str]]
) -> None:
    # Each first explanation scored against the other two, as in a human-agreement baseline.
    predictions = [row[0] for row in vqax_rows]
    references = [row[1:] for row in vqax_rows]
    reference = reference_scores(predictions, references, reference_meteor)
    ours = caption_scores(predictions, references, per_example=True)
    assert_same_scores(ours, reference)


@needs_java
def test_empty_prediction_and_reference(reference_meteor: Meteor) -> None:
    predictions = ["", "a dog runs", "!!!"]
    references = [["a cat sleeps", "a cat"], ["a dog is running", ""], ["a dog", "..."]]
    reference = reference_scores(predictions, references, reference_meteor)
    assert_same_scores(caption_scores(predictions, references, per_example=True), reference)


def check_rouge_l_per_item(predictions: list[str], references: list[list[str]]) -> None:
    """rouge_l_per_item equals Rouge().calc_score per item on PTBTokenizer output, with either tokenizer."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    expected = [Rouge().calc_score(res[i], gts[i]) for i in range(len(predictions))]
    assert rouge_l_per_item(predictions, references) == expected
    assert rouge_l_per_item(predictions, references, tokenizer="java") == expected


@needs_java
def test_rouge_l_per_item_equals_pycocoevalcap() -> None:
    check_rouge_l_per_item(PREDICTIONS, REFERENCES)


@needs_java
def test_rouge_l_per_item_equals_pycocoevalcap_on_vqax(vqax_rows: list[list[str]]) -> None:
    check_rouge_l_per_item([row[0] for row in vqax_rows], [row[1:] for row in vqax_rows])


def test_rouge_l_per_item_on_fixture_without_java() -> None:
    # Hand-checkable: identical -> 1; no overlap -> 0; "a dog runs" vs "a dog": lcs 2, p=2/3, r=1.
    scores = rouge_l_per_item(["A dog.", "cat", "a dog runs"], [["a dog"], ["the sky"], ["a dog", "the sky"]])
    p, r = 2 / 3, 1.0
    assert scores == [1.0, 0.0, ((1 + 1.2**2) * p * r) / (r + 1.2**2 * p)]


def test_lcs_matches_pycocoevalcap() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(1, 25))]
        b = [rng.choice("abcde") for _ in range(rng.randint(1, 25))]
        assert _lcs_length(a, b) == my_lcs(a, b)


def test_java_missing_skips_meteor(monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():  # on a machine without Java this call warns too
        warnings.simplefilter("ignore", JavaMissingWarning)
        expected = caption_scores(PREDICTIONS, REFERENCES, per_example=True, tokenizer="python")
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(caption_module, "_meteor", lambda: pytest.fail("METEOR started without Java"))
    with pytest.warns(JavaMissingWarning) as record:
        scores = caption_scores(PREDICTIONS, REFERENCES, per_example=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "METEOR is skipped" in message and "apt-get install default-jre-headless" in message
    assert scores["meteor"] is None and scores["per_example"]["meteor"] is None
    assert_same_scores(scores, expected, skip=("meteor",))


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="3 predictions, 2 references"):
        caption_scores(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        rouge_l_per_item(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match=r"references\[0\] is a str"):
        rouge_l_per_item(["a"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores([], [])


@needs_java
def test_evaluate_metric_imported_and_loaded_from_path(
    reference_meteor: Meteor, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = caption_scores(PREDICTIONS, REFERENCES)
    imported = CaptionScores().compute(predictions=PREDICTIONS, references=REFERENCES)
    assert imported == expected

    loaded = evaluate.load(str(METRICS_DIR / "caption_scores.py"))
    # The loaded copy is a separate module; lend it our METEOR process instead of starting a third JVM.
    monkeypatch.setattr(sys.modules[type(loaded).__module__], "_meteor", caption_module._meteor)
    assert loaded.compute(predictions=PREDICTIONS, references=REFERENCES) == expected
    with_items = loaded.compute(predictions=PREDICTIONS, references=REFERENCES, per_example=True)
    assert with_items["per_example"]["rouge_l"] == rouge_l_per_item(PREDICTIONS, REFERENCES)


# ---------------------------------------------------------------------------------------- answer accuracy


def official_vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official VQA loop (vqaEval.py) on already-normalised answers."""
    accuracies = []
    for left_out in range(len(human_answers)):
        others = human_answers[:left_out] + human_answers[left_out + 1 :]
        accuracies.append(min(1, float(sum(a == prediction for a in others)) / 3))
    return float(sum(accuracies)) / len(accuracies)


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("Two", "2"),
        ("  The Dog. ", "dog"),
        ("a t-shirt", "t shirt"),  # punctuation inside a word becomes a space
        ("red, white", "red white"),  # next to a space it is removed
        ("1,000", "1000"),  # digit-comma-digit: all marks removed
        ("3.5", "3.5"),  # a period before a digit stays
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("youre right", "you're right"),
        ("none", "0"),
    ],
)
def test_normalize_answer(answer: str, normalised: str) -> None:
    assert normalize_answer(answer) == normalised


def test_answer_accuracy_hand_computed() -> None:
    ten = lambda n: ["2"] * n + ["3"] * (10 - n)  # noqa: E731
    cases = [
        ("Two", "2", 1.0),  # one reference: exact match after normalisation
        ("the dog", "Dog.", 1.0),
        ("dogs", "dog", 0.0),
        ("two", ten(0), 0.0),
        ("two", ten(1), 0.3),  # 9 subsets with 1 match (1/3), 1 with none
        ("two", ten(2), 0.6),  # 8 subsets with 2 matches, 2 with 1: (8*2/3 + 2/3) / 10
        ("two", ten(3), 0.9),  # 7 subsets with 3 matches (1), 3 with 2 (2/3)
        ("two", ten(4), 1.0),
        ("yes", ["yes", "yes"], 1.0),  # 2 answers: divisor 1
        ("yes", ["yes", "no"], 0.5),
        ("yes", ["yes", "yes", "no"], 2 / 3),  # 3 answers: divisor 2 -> (1/2 + 1/2 + 1) / 3
        ("yes", ["yes", "yes", "yes"], 1.0),
    ]
    for prediction, refs, expected in cases:
        assert answer_accuracy([prediction], [refs])["answer_accuracy"] == pytest.approx(expected, abs=1e-12)
    result = answer_accuracy(["two", "dogs", "yes"], [ten(3), "dog", ["yes", "no"]], per_example=True)
    assert result["per_example"] == pytest.approx([0.9, 0.0, 0.5], abs=1e-12)
    assert result["answer_accuracy"] == pytest.approx(1.4 / 3, abs=1e-12)


def test_answer_accuracy_equals_official_loop_for_ten_answers() -> None:
    rng = random.Random(0)
    for _ in range(200):
        humans = [rng.choice(["2", "3", "yes", "no"]) for _ in range(10)]
        prediction = rng.choice(["2", "3", "yes", "no", "4"])
        ours = answer_accuracy([prediction], [humans])["answer_accuracy"]
        assert ours == official_vqa_accuracy(prediction, humans)


def test_answer_accuracy_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions, 1 references"):
        answer_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        answer_accuracy(["a"], [[]])


def test_answer_accuracy_metric_imported_and_loaded_from_path() -> None:
    for metric in (AnswerAccuracy(), evaluate.load(str(METRICS_DIR / "answer_accuracy.py"))):
        assert metric.compute(predictions=["Two", "cat"], references=["2", "dog"]) == {"answer_accuracy": 0.5}
        result = metric.compute(predictions=["two"], references=[["2"] * 3 + ["3"] * 7], per_example=True)
        assert result["answer_accuracy"] == pytest.approx(0.9) and result["per_example"] == pytest.approx(
            [0.9]
        )
