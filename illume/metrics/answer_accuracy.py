"""VQA answer accuracy with the official answer normalisation, as a plain function and an `evaluate` metric.

Scoring rule (per example, after normalising the prediction and every reference answer):

* one reference answer (most of our datasets): exact match, 1.0 or 0.0;
* several reference answers: the official VQA accuracy, i.e. the mean over the leave-one-out subsets of
  the references of min(1, #answers in the subset equal to the prediction / 3). With the usual 10 human
  answers this is exactly the VQA evaluation's number (about min(1, #matches / 3)). With 2 or 3
  answers a subset holds fewer than 3 answers, so the divisor is the subset size instead (full credit
  means agreeing with every other annotator); from 4 answers on the official formula applies unchanged.

Unlike the official script, which only re-normalises ground truth when the annotators disagree (the VQA
annotation files are normalised already), we always normalise both sides, since our references are raw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import datasets
import evaluate

# The official VQA evaluation's punctuation list, number words and articles (vqaEval.py).
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # one mark per character
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a typo for a lookbehind that never
# applies, so it strips every period not followed by a digit. Written here as what it does.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")

# Canonical contractions; the official table maps their apostrophe-less spellings ("dont", "youre") to
# them. We derive that table instead of copying it: every spelling with some apostrophes left out. (The
# official keys "Im", "Ive", ... are capitalised and never match lower-cased words, so they are left out.)
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()


def _spellings_without_apostrophes(word: str) -> list[str]:
    parts = word.split("'")
    spellings = {""}
    for part in parts[:-1]:
        spellings = {s + part + sep for s in spellings for sep in ("'", "")}
    return [s + parts[-1] for s in spellings if s + parts[-1] != word]


_CONTRACTION_MAP = {
    variant: word for word in _CONTRACTIONS for variant in _spellings_without_apostrophes(word)
}


def normalize_answer(answer: str) -> str:
    """Normalise an answer as the official VQA evaluation does.

    Punctuation is removed (or, when it sits inside a word like "t-shirt", replaced by a space), periods
    not followed by a digit are dropped, text is lower-cased, number words become digits, articles are
    removed and apostrophe-less contractions get their apostrophe ("dont" -> "don't").

    Args:
        answer: A predicted or reference answer.

    Returns:
        The normalised answer.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # processPunctuation: a mark next to a space (or any text with a digit-comma-digit) is deleted,
    # otherwise it becomes a space; the official test looks at the original text for every mark.
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if strip_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD_STRIP.sub("", out)
    # processDigitArticle
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTION_MAP.get(w, w) for w in words if w not in _ARTICLES)


def _example_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Accuracy of one normalised prediction against normalised references (see the module docstring)."""
    if len(references) == 1:
        return float(prediction == references[0])
    matches = sum(ref == prediction for ref in references)
    divisor = min(3, len(references) - 1)
    # One term per left-out answer, summed in the official order so the floats agree bit for bit.
    accuracies = [min(1.0, (matches - (ref == prediction)) / divisor) for ref in references]
    return sum(accuracies) / len(accuracies)


def answer_accuracy(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], per_example: bool = False
) -> dict[str, Any]:
    """VQA accuracy of predicted answers (see the module docstring for the scoring rule).

    Args:
        predictions: One predicted answer per example.
        references: Per example, the reference answer (a string) or the list of human answers.
        per_example: Also return the per-example accuracies under "per_example".

    Returns:
        {"answer_accuracy": mean accuracy in 0..1} and, with per_example, {"per_example": [...]}.

    Raises:
        ValueError: If the lengths differ, the batch is empty, or an example has no reference answers.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} predictions, "
            f"{len(references)} references"
        )
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    scores = []
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(
                f"references[{i}] is empty: every prediction needs at least one reference answer"
            )
        scores.append(_example_accuracy(normalize_answer(prediction), [normalize_answer(r) for r in refs]))
    result: dict[str, Any] = {"answer_accuracy": sum(scores) / len(scores)}
    if per_example:
        result["per_example"] = scores
    return result



def answer_containment(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """ILLUME's notebook answer metric: the share of examples whose predicted answer and a reference answer
    contain one another (either is a substring of the other), after lower-casing and stripping.

    It reads the official VQA-X figures (e.g. the paper's Q/A accuracy 85.5) the way they were computed, so
    the demo and those figures compare like for like; VQA accuracy (`answer_accuracy`) is the stricter one.
    An empty prediction contains nothing and scores 0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} and {len(references)}")
    if not predictions:
        raise ValueError("no predictions to score")
    hits = 0
    for prediction, refs in zip(predictions, references):
        prediction = prediction.strip().lower()
        refs = [refs] if isinstance(refs, str) else list(refs)
        hits += bool(prediction) and any(prediction in r.strip().lower() or r.strip().lower() in prediction
                                         for r in refs if r.strip())
    return hits / len(predictions)

_DESCRIPTION = """\
VQA answer accuracy with the official answer normalisation: exact match for a single reference answer,
the official min(1, #matching humans / 3) formula (leave-one-out averaged) for several.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one answer per example.
    references: list of str (one answer each) or list of list of str (several human answers each).
    per_example: bool, also return per-example accuracies (default False).
Returns:
    answer_accuracy: float in 0..1; per_example: list of float (when asked for).
Examples:
    >>> AnswerAccuracy().compute(predictions=["Two"], references=["2"])
    {'answer_accuracy': 1.0}
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerAccuracy(evaluate.Metric):
    """VQA answer accuracy as an `evaluate` metric; see `answer_accuracy`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Several human answers per example, or a single answer string.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
            codebase_urls=["https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(
        self, predictions: list[str], references: list[str] | list[list[str]], per_example: bool = False
    ) -> dict[str, Any]:
        return answer_accuracy(predictions, references, per_example=per_example)
