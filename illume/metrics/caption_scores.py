"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) computed by pycocoevalcap.

Use the plain functions from library code:

    caption_scores(predictions, references)          # corpus scores, as the COCO caption evaluation
    caption_scores(..., per_example=True)            # plus pycocoevalcap's per-prediction scores
    rouge_l_per_item(predictions, references)        # fast per-prediction ROUGE-L, no Java

or the `evaluate` metric, either imported (`CaptionScores()`) or loaded from this file with
`evaluate.load("/path/to/illume/metrics/caption_scores.py")`.

Captions are tokenized as in the COCO caption evaluation (Stanford PTBTokenizer, lower-cased, punctuation
removed). That tokenizer and METEOR need Java; without it METEOR is skipped (reported as None) and the
pure-Python port of the tokenizer is used, with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import datasets
import evaluate

from .ptb_tokenizer import java_available, ptb_tokenize

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
"""Keys of the scores returned by `caption_scores` (and of its `per_example` dict)."""

_ROUGE_BETA = 1.2  # pycocoevalcap's Rouge().beta


class JavaMissingWarning(UserWarning):
    """Java is not on PATH, so METEOR is skipped and the pure-Python tokenizer is used."""


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise a clear error for inputs pycocoevalcap would fail on with a bare assertion."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} predictions, "
            f"{len(references)} references"
        )
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] is {type(prediction).__name__}, expected str")
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is a str; expected a list of reference strings")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every prediction needs at least one reference")
        if not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] contains a non-string reference")


def _tokenize(
    predictions: Sequence[str], references: Sequence[Sequence[str]], implementation: str
) -> tuple[list[str], list[list[str]]]:
    """Tokenize references and predictions as two batches, in order, like pycocoevalcap's COCOEvalCap."""
    flat_refs = [r for refs in references for r in refs]
    if implementation == "java":
        # Two JVM starts dominate the cost; run them side by side.
        with ThreadPoolExecutor(max_workers=2) as pool:
            refs_job = pool.submit(ptb_tokenize, flat_refs, "java")
            tokenized_preds = ptb_tokenize(predictions, "java")
            tokenized_refs = refs_job.result()
    else:
        tokenized_refs = ptb_tokenize(flat_refs, implementation)
        tokenized_preds = ptb_tokenize(predictions, implementation)
    nested, start = [], 0
    for refs in references:
        nested.append(tokenized_refs[start : start + len(refs)])
        start += len(refs)
    return tokenized_preds, nested


def _resolve_tokenizer(tokenizer: str, have_java: bool) -> str:
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'auto', 'java' or 'python'")
    if tokenizer == "java" and not have_java:
        raise FileNotFoundError(
            "tokenizer='java' needs a Java runtime on PATH (e.g. `apt-get install default-jre-headless`)"
        )
    if tokenizer == "auto":
        return "java" if have_java else "python"
    return tokenizer


@cache
def _meteor() -> Any:
    # One METEOR JVM per process: it takes seconds to start (it loads a paraphrase table), and its
    # compute_score is guarded by a lock, so sharing it is safe.
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor_scores(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    meteor = _meteor()
    try:
        return meteor.compute_score(gts, res)
    except (BrokenPipeError, ValueError):
        # The METEOR JVM died (e.g. killed for memory): start a new one. pycocoevalcap's wrapper keeps
        # its lock when a call fails, and its __del__ takes that lock, so release it before letting go.
        if meteor.lock.locked():
            meteor.lock.release()
        _meteor.cache_clear()
        return _meteor().compute_score(gts, res)


def caption_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    per_example: bool = False,
    tokenizer: str = "auto",
) -> dict[str, Any]:
    """Score captions against references with pycocoevalcap, as the COCO caption evaluation does.

    CIDEr's document frequencies come from the references of this call, so CIDEr depends on the whole
    batch (a batch of one example always scores 0).

    Args:
        predictions: One caption per example.
        references: One or more reference captions per example.
        per_example: Also return pycocoevalcap's per-prediction scores under "per_example".
        tokenizer: "auto" (Stanford PTBTokenizer when Java is available, else the pure-Python port),
            "java" or "python".

    Returns:
        {"bleu_1", ..., "bleu_4", "meteor", "rouge_l", "cider"}: floats as pycocoevalcap gives them
        (0..1, CIDEr unscaled; "meteor" is None without Java). With per_example, also "per_example":
        the same keys mapped to lists with one score per prediction.

    Raises:
        ValueError: If the lengths differ, the batch is empty, or an example has no references.
        TypeError: If an input is not a string (or, for references, a list of strings).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(predictions, references)
    implementation = _resolve_tokenizer(tokenizer, have_java := java_available())
    if not have_java:
        warnings.warn(
            "Java runtime not found on PATH: METEOR is skipped (reported as None) and captions are "
            "tokenized with illume's pure-Python port of the Stanford PTBTokenizer instead of the original. "
            "Install a Java runtime (e.g. `apt-get install default-jre-headless`) for official COCO scores.",
            JavaMissingWarning,
            stacklevel=2,
        )
    preds, refs = _tokenize(predictions, references, implementation)
    # pycocoevalcap's input format: {id: [caption, ...]}, one prediction per id.
    res = {i: [p] for i, p in enumerate(preds)}
    gts = dict(enumerate(refs))

    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_items = Rouge().compute_score(gts, res)
    cider, cider_items = Cider().compute_score(gts, res)
    meteor, meteor_items = _meteor_scores(gts, res) if have_java else (None, None)

    scores: dict[str, Any] = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    scores.update(meteor=None if meteor is None else float(meteor), rouge_l=float(rouge), cider=float(cider))
    if per_example:
        items: dict[str, list[float] | None] = {
            f"bleu_{n + 1}": [float(s) for s in bleu_items[n]] for n in range(4)
        }
        items["meteor"] = None if meteor_items is None else [float(s) for s in meteor_items]
        items["rouge_l"] = [float(s) for s in rouge_items]
        items["cider"] = [float(s) for s in cider_items]
        scores["per_example"] = items
    return scores


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, Hyyrö 2004).

    Same result as pycocoevalcap's quadratic `my_lcs`, one big-integer step per token of `b`.
    """
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _rouge_l(candidate: str, refs: Sequence[str]) -> float:
    """pycocoevalcap's `Rouge().calc_score([candidate], refs)`, with the same arithmetic in the same order."""
    token_c = candidate.split(" ")
    prec, rec = [], []
    for reference in refs:
        token_r = reference.split(" ")
        lcs = _lcs_length(token_r, token_c)
        prec.append(lcs / float(len(token_c)))
        rec.append(lcs / float(len(token_r)))
    prec_max, rec_max = max(prec), max(rec)
    if prec_max != 0 and rec_max != 0:
        return ((1 + _ROUGE_BETA**2) * prec_max * rec_max) / float(rec_max + _ROUGE_BETA**2 * prec_max)
    return 0.0


def rouge_l_per_item(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "python"
) -> list[float]:
    """ROUGE-L of each prediction against its references, without Java by default.

    Equal to `caption_scores(..., per_example=True)["per_example"]["rouge_l"]` (pycocoevalcap's
    `Rouge().calc_score` per item) on the same tokenization, but without a JVM start or METEOR/CIDEr.

    Args:
        predictions: One candidate per example.
        references: One or more references per example.
        tokenizer: "python" (pure-Python PTBTokenizer port, the fast default), "java" or "auto".

    Returns:
        One ROUGE-L F-score (beta 1.2) per prediction.

    Raises:
        ValueError: If the lengths differ, the batch is empty, or an example has no references.
    """
    _check_inputs(predictions, references)
    preds, refs = _tokenize(predictions, references, _resolve_tokenizer(tokenizer, java_available()))
    return [_rouge_l(p, r) for p, r in zip(preds, refs)]


_CITATION = """\
@inproceedings{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = """\
BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap, with COCO's PTBTokenizer preprocessing.
METEOR needs Java; without it METEOR is None and a pure-Python tokenizer port is used.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per example.
    references: list of list of str, one or more references per example.
    per_example: bool, also return per-prediction scores under "per_example" (default False).
    tokenizer: "auto" (default), "java" or "python".
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, meteor (None without Java), rouge_l, cider: floats.
Examples:
    >>> metric = CaptionScores()
    >>> scores = metric.compute(predictions=["a dog runs"], references=[["a dog is running"]])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionScores(evaluate.Metric):
    """The COCO caption metrics as an `evaluate` metric; see `caption_scores`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[list[str]],
        per_example: bool = False,
        tokenizer: str = "auto",
    ) -> dict[str, Any]:
        return caption_scores(predictions, references, per_example=per_example, tokenizer=tokenizer)
