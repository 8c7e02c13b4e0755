"""The fully supervised baseline: SFT on every reference explanation of the train split, no critique at all.

It is what ILLUME is measured against: the same model, adapters, optimiser and val scoring as the loop's
selection-SFT, but trained on the human-written explanations (3 per question in the shapes world) instead of
on the model's own accepted samples. Budget: as many epochs as the loop would run in all its rounds
(loop.num_rounds x train.num_epochs), keeping the best epoch on val, so the comparison does not favour the
loop by giving it more passes. Every example also gets an answer-only row (see below). Writes results.json in the loop's format (a base row and one "sft-ref" row).

`num_questions=k` is the data-efficiency curve's point instead (the paper's claim: ILLUME matches supervised
fine-tuning with far fewer human rationales): one reference explanation for each of k train questions drawn
with `seed`, as a person writing one rationale per question would give, built into rows by the loop's own
rule (`build_training_set`: answer-only rows for the questions without a rationale, the same weighting), so
the only difference from an ILLUME round is where the rationales came from. Its row is "sft-<k>".
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

from illume import run_folder
from illume.config import RunConfig
from illume.data.datasets import load_split
from illume.evaluation import VAL_SCORES, explanation_scores
from illume.loading import load_vlm
from illume.prompts import ANSWER_PROMPT
from illume.training import TrainingRow, build_training_set, fine_tune, write_manifest


def written_rationales(train, num_questions: int, seed: int) -> list[tuple[str, str]]:
    """(example id, one reference explanation) for `num_questions` train questions drawn with `seed`."""
    if not 0 < num_questions <= len(train):
        raise ValueError(f"num_questions={num_questions}: the train split has {len(train)} questions")
    rng = random.Random(f"{seed}/written-rationales")
    return [(e.id, rng.choice(e.explanations)) for e in rng.sample(list(train), num_questions)]


def run_supervised(cfg: RunConfig, num_questions: int | None = None) -> list[dict]:
    """Train on all reference explanations, or on one for each of `num_questions` train questions; returns
    (and writes) [base row, trained row]."""
    from illume.loop import init_run_dir  # the run-directory convention only; no loop logic

    start = time.perf_counter()
    train = load_split(cfg.data, "train", images_must_exist=True)  # the data first: bad data fail in a second
    val = load_split(cfg.data, "val", images_must_exist=True)
    with run_folder.writing(cfg.run_dir, "supervised"):  # an illume folder, and nobody else writing to it
        run_dir = init_run_dir(cfg)
        return _train_supervised(cfg, num_questions, run_dir, train, val, start)


def _train_supervised(cfg: RunConfig, num_questions: int | None, run_dir, train, val, start: float) -> list[dict]:
    vlm = load_vlm(cfg)
    missing = [e.id for e in train if not e.explanations]
    if missing:
        raise ValueError(f"{len(missing)} train examples have no reference explanation, e.g. {missing[:3]}: "
                         "the supervised baseline needs them")
    base = explanation_scores(vlm, val, cfg.sample)
    if num_questions is None:
        references = [(e.id, text) for e in train for text in e.explanations]
        # Answer rows for every example too: the loop's SFT keeps answering through its answer-only rows, and a
        # baseline that never sees an answer target would lose answer accuracy for a reason unrelated to
        # rationales. Weighted as the loop weighs them: both kinds count the same in total.
        rows = build_training_set(references, train, rationale_weight=len(train) / len(set(references)))
        rows += [TrainingRow(e.id, "answer", ANSWER_PROMPT.format(question=e.question), e.answer, 1.0)
                 for e in train]
        label = "sft-ref"
    else:  # the selection-SFT rule on written rationales (module docstring)
        rows = build_training_set(written_rationales(train, num_questions, cfg.seed), train)
        label = f"sft-{num_questions}"
    out_dir = run_dir / "supervised"
    write_manifest(rows, out_dir / "training_set.jsonl")
    train_cfg = replace(cfg.train, num_epochs=cfg.loop.num_rounds * cfg.train.num_epochs)
    result = fine_tune(vlm, rows, train, val, train_cfg, cfg.sample, out_dir)
    results = [{"round": "base", "val": base},
               {"round": label, "trained": True, "train_rationales": sum(r.kind == "rationale" for r in rows),
                "judgments": 0, "human_judgments": 0, "best_epoch": result["best"]["epoch"],
                "val": {k: result["best"][k] for k in VAL_SCORES if k in result["best"]},
                "seconds": round(time.perf_counter() - start, 1)}]
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
