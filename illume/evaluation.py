"""How good are a model's answers and rationales: the numbers every round and the baseline report.

- `explanation_scores`: one greedy rationale per example for the model's own answer, scored against the
  references with BLEU-4, METEOR, ROUGE-L and CIDEr (pycocoevalcap), plus VQA answer accuracy.
- `keep_best_epoch`: the loop's evaluate step: every epoch's adapters scored on val, the best one kept.
- `rationale_pass_rate`: the share of examples where at least one sampled candidate reaches a ROUGE-L
  threshold against any reference, the simulated critic's acceptance rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from illume import distributed
from illume.config import SampleConfig
from illume.critics import candidate_scores
from illume.data.records import CandidateSet, Example
from illume.metrics.answer_accuracy import answer_accuracy, answer_containment
from illume.metrics.caption_scores import caption_scores
from illume.models.sharding import whole
from illume.models.vlm import VLM
from illume.models.weights import DIGEST_SUFFIX, load_trainable_weights, save_trainable_weights
from illume.sampling import sample

# What explanation_scores returns (meteor only with Java), in the order reports list them.
VAL_SCORES = ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy", "answer_contains")


def rationale_pass_rate(candidate_sets: Sequence[CandidateSet], examples: Sequence[Example],
                        threshold: float = 0.7) -> float:
    """Share of examples with at least one candidate whose ROUGE-L against a reference is >= threshold."""
    if not candidate_sets:
        return 0.0
    scores = candidate_scores(candidate_sets, {e.id: e for e in examples}, "rouge_l")
    return sum(any(s >= threshold for s in per_set) for per_set in scores) / len(candidate_sets)


def explanation_scores(vlm: VLM, examples: Sequence[Example], sample_cfg: SampleConfig,
                       progress: bool = True) -> dict[str, float]:
    """Answer accuracy and explanation metrics of greedy rationales for the model's own answers.

    Returns:
        answer_accuracy (VQA accuracy), answer_contains (ILLUME's notebook metric: predicted and reference
        answer contain one another), bleu_4, meteor (absent without Java), rouge_l, cider, all in [0, 1] except CIDEr.
    """
    greedy = replace(sample_cfg, temperatures=[0.0], samples_per_temperature=1)
    # Several processes: each decodes its share in whole batches; rank 0 scores them all (one METEOR Java
    # process, not one per rank) and every rank gets its numbers, so all keep the same epoch.
    sets = distributed.gather_objects(sample(vlm, distributed.shard(examples, greedy.batch_size), greedy,
                                             use_reference_answer=False, progress=progress))
    result = None
    if distributed.is_main():
        predictions = [cs.candidates[0].text if cs.candidates else "" for cs in sets]
        scores = caption_scores(predictions, [e.explanations for e in examples])
        answers, references = [cs.predicted_answer for cs in sets], [e.answers for e in examples]
        result = answer_accuracy(answers, references)
        result["answer_contains"] = answer_containment(answers, references)  # ILLUME's notebook metric
        result.update({k: v for k, v in scores.items()
                       if k in ("bleu_4", "meteor", "rouge_l", "cider") and v is not None})
    return distributed.broadcast_object(result)


@dataclass
class Kept:
    """The evaluate step's answer: val scores per epoch and the kept epoch's (with its `epoch`)."""

    best: dict
    epochs: list[dict]


def keep_best_epoch(vlm: VLM, val: Sequence[Example], sample_cfg: SampleConfig, metric: str,
                    epoch_weights: Sequence[Path], keep_as: Path) -> Kept:
    """Score each epoch's adapters on val (`explanation_scores`), keep the best by `metric` (the earliest of
    equals): its weights stay in `vlm.model` and are saved as `keep_as`; the epochs' files are removed.

    Every rank scores every epoch (val is decoded in shares and gathered), so all keep the same one.
    """
    if not epoch_weights:
        raise ValueError("the training saved no epoch: nothing to evaluate")
    # ZeRO-3: the weights gathered once for every epoch's loading, decoding and saving; the kept epoch's stay.
    with whole(vlm.model, keep_writes=True):
        epochs = []
        for number, path in enumerate(epoch_weights, 1):
            load_trainable_weights(vlm.model, path)
            scores = explanation_scores(vlm, val, sample_cfg, progress=False)
            scores["epoch"] = number
            epochs.append(scores)
        best = epochs[0]
        for scores in epochs[1:]:
            if scores[metric] > best[metric]:
                best = scores
        load_trainable_weights(vlm.model, epoch_weights[best["epoch"] - 1])
        distributed.barrier()  # every rank has read every epoch's file before rank 0 removes them
        if distributed.is_main():
            save_trainable_weights(vlm.model, keep_as)
            for path in epoch_weights:
                path.unlink(missing_ok=True)
                path.with_name(path.name + DIGEST_SUFFIX).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                epoch_weights[0].parent.rmdir()  # empty now, unless someone put files of their own there
    distributed.barrier()  # rank 0 saved the kept epoch before any rank reads it (a resumed round, an export)
    return Kept(best, epochs)
