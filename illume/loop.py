"""The ILLUME loop: sample -> critique -> verdicts -> tune -> evaluate -> report, per round.

`run` reads top to bottom: `opened` checks everything it can and holds what the rounds share (`Run`); each
round is one `Round` that its steps fill in, one call each: `sample_round`, `critique_round`,
`read_verdicts`, `tune_round`, `evaluate_round` (each epoch's weights scored on val, the best kept),
`save_round` and `report_round`; `stopping` decides whether to go on. Each step is behind an interface
chosen by one dict: the critic by `illume.critic_registry.CRITICS[critic.kind]`, the policy by
`policies.registry.POLICIES[policy.kind]`; what was accepted is read by the rules of
`illume.feedback.verdicts`; the backend is whatever `load_vlm` gives. This module asks none of them which
kind it is.

Assumptions, up front:
- Everything that must survive a crash is in the feedback store (candidates, judgments) or in the round
  folder (`adapters.safetensors`, `metrics.json`, the last file a round writes). Running the same command
  again continues where it stopped: a round with `metrics.json` is done and its adapters are loaded; a round
  whose candidates are stored is not sampled again; items already judged are not judged again; an
  interrupted fine-tuning starts over from the previous round's weights. Nothing is lost or written twice.
- Round r samples with the model tuned in round r - 1 (round 0: the base model), on the train split, with the
  reference answer in the prompt; val scores are of greedy rationales for the model's own answers.
- Several processes (torchrun / accelerate launch): each samples its share of the examples and rank 0 stores
  them all; rank 0 alone runs the critic (simulated, terminal, waiting for people) while the others wait;
  then every rank reads the same judgments and trains together (DDP / DeepSpeed through the HF Trainer).
  Only rank 0 writes the store and files. Every rank takes the same decisions: rank 0 writes only after a
  collective (gather, training step, barrier) that the others reach after their reads, and they read what
  rank 0 wrote only after a barrier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from illume import distributed, run_folder
from illume.config import RunConfig, save_config
from illume.critic_registry import CRITICS, check_critic_config
from illume.critics import Critic, CritiqueContext
from illume.data.datasets import load_split
from illume.data.records import CandidateSet, Example
from illume.evaluation import VAL_SCORES, explanation_scores
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import Feedback, check_aggregate, read_feedback
from illume.loading import load_vlm
from illume.models.vlm import VLM
from illume.models.weights import WeightsFileError, check_safetensors, load_trainable_weights
from illume.pool import check_pool, merge_pool, sample_pool
from illume.resume import CHANGES_FILE, check_resumed_settings, describe, record_setting_changes
from illume.sampling import engine_session, sample
from illume.status import POLICY_COLUMNS, policy_cell
from illume.tracking import RunTracker, check_report_to, open_tracker, round_scalars
from illume.training import ADAPTERS_FILE, retrain_round_remedy
from illume.vllm_engine import check_vllm_settings
from policies.base import PolicyResult, RoundContext, keep_best, kept_epoch
from policies.registry import POLICIES, check_policy_config

logger = logging.getLogger(__name__)

PREFLIGHT = (
    check_critic_config,  # critic.kind, a saved reward model, annotate.order / budget (illume.critic_registry)
    check_policy_config,  # policy.kind and its section (policies.registry)
    check_aggregate,  # feedback.aggregate (illume.feedback.verdicts)
    check_pool,  # sample.pool (illume.pool)
    check_report_to,  # an unknown tracker or a missing package fails now, not after the first round
    check_vllm_settings,  # sample.vllm: a server to use or a Python to start one with (illume.vllm_engine)
)
"""The settings checks `run` makes before any work, after the config loaded (types, ranges, kinds)."""
TABLE_SCORES = ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy")  # the table's columns


# Wall-clock figures differ between two runs of the same command: results.json leaves them out, so that the
# same command writes the same file; each round's time stays in its round_NN/metrics.json.
WALL_CLOCK_KEYS = ("seconds",)


def _result_row(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in WALL_CLOCK_KEYS}


def init_run_dir(cfg: RunConfig) -> Path:
    """Write the resolved config into the run folder first (rank 0); a resumed run rewrites it, so it always
    shows the settings of the latest invocation (the store and round folders carry what was done before; the
    loop checks first that those settings are the run's, illume.resume). The caller has claimed the folder
    and holds its lock (`illume.run_folder.writing`)."""
    run_dir = cfg.run_dir
    if distributed.is_main():
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def round_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / f"round_{round_idx:02d}"


def _write_json(path: Path, data) -> None:
    # Write then rename: a kill mid-write never leaves a truncated file that looks complete.
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # a round that trained nothing has no folder yet
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def results_table(results: list[dict]) -> Table:
    table = Table(title="ILLUME rounds (val scores x100)")
    # accepted %: train questions of the round with >= 1 accepted rationale; new / total: distinct accepted
    # rationales new this round / in the training set (illume.feedback.verdicts); judgments: all judgments in
    # the store so far; by people: those by the kinds in feedback.people (default person and simulated: the
    # simulated critic stands in for people), not the reward model's or an AI judge's.
    extra = [column for column in POLICY_COLUMNS if any(column[0] in row for row in results)]
    for column in ("round", "accepted %", "new", "total", "judgments", "by people", "B-4", "METEOR", "ROUGE-L",
                   "CIDEr", "answer acc.", *(title for _, title, _ in extra)):
        table.add_column(column, justify="right")

    def pct(row: dict, key: str) -> str:
        value = row["val"].get(key)
        return "-" if value is None else f"{100 * value:.1f}"

    for row in results:
        accepted = "-" if row.get("accepted_pct") is None else f"{row['accepted_pct']:.1f}"
        table.add_row(str(row["round"]), accepted, str(row.get("new_rationales", "-")),
                      str(row.get("train_rationales", "-")), str(row.get("judgments", "-")),
                      str(row.get("human_judgments", "-")),
                      *(pct(row, k) for k in TABLE_SCORES),
                      *(policy_cell(row, key, fmt) for key, _, fmt in extra))
    return table


def run(cfg: RunConfig) -> list[dict]:
    """Run (or continue) the ILLUME rounds of `cfg`; returns the per-round results also in results.json.

    Each round: sample -> critique -> verdicts -> tune -> evaluate -> report, one call each over one `Round`.
    A round finished earlier (its metrics.json) is taken from disk; the run stops when people are not done
    and the config says not to wait, when a round accepted nothing new, or by `loop.patience`.
    """
    with opened(cfg) as run:
        results = [score_base(run)]
        for round_idx in range(cfg.loop.num_rounds):
            rnd = Round(round_idx, round_dir(run.run_dir, round_idx))
            if not take_finished(run, rnd):
                sample_round(run, rnd)
                critique_round(run, rnd)
                if not rnd.people_done:  # people have not finished judging and the config says not to wait
                    break
                read_verdicts(run, rnd)
                if rnd.metrics["new_rationales"] or not cfg.loop.stop_when_nothing_new:
                    tune_round(run, rnd)
                    evaluate_round(run, rnd)
                save_round(run, rnd)
            results.append(report_round(run, rnd, results))
            if stopping(run, results):
                break
    run.console.print(f"results: {run.run_dir / 'results.json'}")
    return results


@contextlib.contextmanager
def opened(cfg: RunConfig) -> Iterator[Run]:
    """Everything a run needs, checked before anything is written: the settings, the data (every image
    opened), the store's database, then the run folder (illume's, and nobody else writing to it); then the
    model, the critic and the trackers. The folder's lock and the trackers are released on leaving."""
    distributed.init_if_launched()
    # Logs and pipes get 80 columns: too narrow. One process prints.
    console = Console(width=max(Console().width, 120), quiet=not distributed.is_main())
    for check in PREFLIGHT:  # each owned by the module whose settings it checks
        check(cfg)
    # The data before the model: a malformed row or an unreadable image fails in seconds, not after the model
    # loaded (or minutes of pre-training).
    train = load_split(cfg.data, "train", images_must_exist=True)
    val = load_split(cfg.data, "val", images_must_exist=True)
    with contextlib.ExitStack() as held:
        if cfg.store_url:  # a database that cannot be used fails before the run folder is touched
            with distributed.main_process_first():  # rank 0 creates the store's tables; the others open it after
                store = FeedbackStore(cfg.store_url)
        # One writer per run; a store other folders or machines may share has its own lock too.
        database_lock = store.writer_lock if cfg.store_url else None
        run_dir = held.enter_context(run_folder.writing(cfg.run_dir, "run", database_lock))
        # Before anything is written: a run continued with other settings refuses and leaves everything as it was.
        changes = check_resumed_settings(cfg)
        check_finished_rounds(run_dir)  # damaged adapters fail now, not after the model loaded
        if not cfg.store_url:
            with distributed.main_process_first():
                store = FeedbackStore(run_dir / "feedback.db")
        distributed.barrier()  # every rank has read the old config.yaml before rank 0 rewrites it
        init_run_dir(cfg)
        if changes and distributed.is_main():  # allowed by loop.allow_changed_settings
            record_setting_changes(cfg, changes)
            console.print(f"continuing with changed settings ({describe(changes)}), recorded in "
                          f"{run_dir / CHANGES_FILE}", markup=False)
        vlm = load_vlm(cfg)
        # What sample.engine needs while the run draws (illume.sampling.ENGINES): nothing for generate, the vLLM
        # server for vllm (started now unless sample.vllm.url; stopped when the run ends).
        held.enter_context(engine_session(cfg.sample, vlm, run_dir))
        critic = CRITICS[cfg.critic.kind](cfg)
        image_refs = save_images(run_dir, train)
        # The round table and the annotation progress, to train.report_to's trackers (the trainers report on
        # their own, illume.tracking); step = the round. Closed (files flushed, remote runs ended) also when a
        # round fails.
        tracker = open_tracker(cfg, say=console.print)
        held.callback(tracker.close)
        yield Run(cfg, run_dir, store, vlm, critic, train, val, image_refs, console, tracker)


@dataclass
class Run:
    """What every round of a run shares: its settings, folder, store, model (tuned round by round), critic and
    data, and where it reports."""

    cfg: RunConfig
    run_dir: Path
    store: FeedbackStore
    vlm: VLM
    critic: Critic
    train: list[Example]
    val: list[Example]
    image_refs: dict[str, str]
    """Example id -> the image people are shown (`save_images`)."""
    console: Console
    tracker: RunTracker

    @cached_property
    def train_by_id(self) -> dict[str, Example]:
        return {e.id: e for e in self.train}


@dataclass
class Round:
    """One round as its steps fill it in: the candidates, whether people are done, the verdicts, the metrics
    that become its row of results.json."""

    idx: int
    out_dir: Path
    started: float = field(default_factory=time.perf_counter)
    sets: dict[str, CandidateSet] = field(default_factory=dict)
    """The round's train candidate sets by example id (step 1)."""
    people_done: bool = True
    """False when people have not judged everything and the config says not to wait (step 2): the run stops."""
    critique: dict = field(default_factory=dict)
    """Keys the critic adds to the round's row (the reward model's threshold, ...)."""
    feedback: Feedback | None = None
    """The verdicts of every judgment up to this round (step 3), handed to the policy."""
    tuned: PolicyResult | None = None
    """What the policy trained (step 4): each epoch's weights, for the evaluate step (5)."""
    metrics: dict = field(default_factory=dict)
    """The round's row of results.json (round_NN/metrics.json)."""


def score_base(run: Run) -> dict:
    """The base model's val scores (once: base_metrics.json), the first row of results.json."""
    base_path = run.run_dir / "base_metrics.json"
    if base_path.is_file():
        base_scores = json.loads(base_path.read_text())
    else:
        run.console.print("[bold]scoring the base model on val[/bold]")
        base_scores = explanation_scores(run.vlm, run.val, run.cfg.sample, progress=distributed.is_main())
        if distributed.is_main():
            _write_json(base_path, base_scores)
    row = {"round": "base", "val": base_scores}
    run.tracker.log(round_scalars(row), step=0)
    return row


def take_finished(run: Run, rnd: Round) -> bool:
    """A round finished earlier (its metrics.json, the last file a round writes): take its row and, if it
    trained, its weights."""
    metrics_path = rnd.out_dir / "metrics.json"
    if not metrics_path.is_file():
        return False
    rnd.metrics = json.loads(metrics_path.read_text())
    if rnd.metrics.get("trained"):
        load_trainable_weights(run.vlm.model, rnd.out_dir / ADAPTERS_FILE, retrain_round_remedy(rnd.out_dir))
    return True


def save_round(run: Run, rnd: Round) -> None:
    """The round's row, last: round_NN/metrics.json (a round with it is done) and the store's copy."""
    if distributed.is_main():
        _write_json(rnd.out_dir / "metrics.json", rnd.metrics)
        run.store.set_round_metrics(rnd.idx, rnd.metrics)
        if rnd.metrics["trained"]:
            run.store.mark_trained(rnd.idx)


def report_round(run: Run, rnd: Round, results: list[dict]) -> dict:
    """6. Report: the round's row to results.json, the trackers and the console table."""
    row = _result_row(rnd.metrics)
    run.tracker.log(round_scalars(row), step=rnd.idx)
    if distributed.is_main():
        _write_json(run.run_dir / "results.json", [*results, row])
    run.console.print(results_table([*results, row]))
    return row


def stopping(run: Run, results: list[dict]) -> bool:
    """The loop's stopping rules, after a round's row: nothing new was accepted (so nothing trained), or val
    `train.select_metric` has not improved by `loop.min_improvement` for `loop.patience` rounds."""
    cfg, last = run.cfg, results[-1]
    if not last.get("trained"):
        run.console.print(f"stopping: round {last['round']} accepted no new rationale")
        return True
    if cfg.loop.patience is None:
        return False
    best, rounds_without_gain = results[0]["val"][cfg.train.select_metric], 0
    for row in results[1:]:
        score = row["val"][cfg.train.select_metric]
        if score > best + cfg.loop.min_improvement:
            best, rounds_without_gain = score, 0
        else:
            rounds_without_gain += 1
    if rounds_without_gain >= cfg.loop.patience:
        run.console.print(f"stopping: val {cfg.train.select_metric} has not improved for {rounds_without_gain} rounds")
        return True
    return False


def check_finished_rounds(run_dir: Path) -> None:
    """Check the adapters of every finished round that trained (their recorded digest and header; the values
    when they are loaded), so a damaged file fails before the model loads, naming the round to retrain.

    Raises:
        WeightsFileError: naming the file and the remedy (`retrain_round_remedy`).
    """
    for metrics_path in sorted(run_dir.glob("round_*/metrics.json")):
        if json.loads(metrics_path.read_text()).get("trained"):
            out_dir = metrics_path.parent
            if not (out_dir / ADAPTERS_FILE).is_file():
                raise WeightsFileError(f"{out_dir / ADAPTERS_FILE} is missing: {retrain_round_remedy(out_dir)}")
            check_safetensors(out_dir / ADAPTERS_FILE, retrain_round_remedy(out_dir))


def save_images(run_dir: Path, examples) -> dict[str, str]:
    """Image references the annotation page and exports can serve: in-memory images are written once (by
    rank 0) to run_dir/images/<id>.png (relative refs); file images keep their absolute path."""
    refs = {}
    for example in examples:
        if isinstance(example.image, Image.Image):
            path = run_dir / "images" / f"{example.id}.png"
            if distributed.is_main() and not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                example.image.save(path)
            refs[example.id] = str(path.relative_to(run_dir))
        else:
            refs[example.id] = str(Path(example.image).resolve())
    return refs


def sample_round(run: Run, rnd: Round) -> None:
    """1. Sample (skipped when this round's candidates are already stored)."""
    cfg, store = run.cfg, run.store
    if not store.is_sampled(rnd.idx):
        run.console.print(f"[bold]round {rnd.idx}[/bold]: sampling {len(run.train)} train questions")
        # Each rank draws its share in whole sampler batches, so the candidates are those one process draws.
        sets = distributed.gather_objects(sample(
            run.vlm, distributed.shard(run.train, cfg.sample.batch_size), cfg.sample, round_idx=rnd.idx,
            use_reference_answer=True, progress=distributed.is_main()))
        if cfg.sample.pool:  # more models' candidates join each item's list (illume.pool)
            sets = merge_pool(sets, sample_pool(cfg, run.vlm, run.train, rnd.idx, rnd.out_dir.parent,
                                                say=run.console.print))
        if distributed.is_main():
            store.add_candidate_sets(rnd.idx, "train", sets, image_refs=run.image_refs,
                                     questions={e.id: e.question for e in run.train})
            store.mark_sampled(rnd.idx)
    distributed.barrier()  # the others read the candidates once rank 0 stored them
    rnd.sets = {cs.example_id: cs for cs in store.candidate_sets(rnd.idx, "train")}


def critique_round(run: Run, rnd: Round) -> None:
    """2. Critique (illume.critic_registry): people, their simulation or a model put the round's judgments
    into the store. Rank 0's answer counts: people work there while the others wait."""
    context = CritiqueContext(run.cfg, run.store, rnd.idx, rnd.sets, run.train_by_id, run.image_refs,
                              say=run.console.print, track=run.tracker.log)
    critique = distributed.broadcast_object(run.critic.review(context))
    rnd.people_done, rnd.critique = critique.done, critique.report


def read_verdicts(run: Run, rnd: Round) -> None:
    """3. What was accepted, by the rules of illume.feedback.verdicts, read once for the round: a rationale is
    new this round when it was first accepted in it."""
    cfg, store = run.cfg, run.store
    rnd.feedback = read_feedback(store, upto_round=rnd.idx, aggregate=cfg.feedback.aggregate)
    accepted = rnd.feedback.accepted()
    new = [row for row in accepted if row.item.round_idx == rnd.idx]
    rnd.metrics = {"round": rnd.idx,
                   "accepted_pct": 100 * rnd.feedback.items_with_accepted(rnd.idx) / max(1, len(rnd.sets)),
                   "new_rationales": len(new), "train_rationales": len(accepted),
                   "judgments": store.num_judgments(), "human_judgments": store.num_judgments(kinds=cfg.feedback.people),
                   "trained": False, "val": {}, **rnd.critique}


def tune_round(run: Run, rnd: Round) -> None:
    """4. Tune with the configured policy (policies.registry: selection-SFT, DPO, KTO, GRPO) on the round's
    feedback; it saves every epoch's weights."""
    cfg = run.cfg
    context = RoundContext(cfg, run.vlm, run.store, rnd.idx, run.train, run.train_by_id, run.val, rnd.out_dir,
                           feedback=rnd.feedback, say=run.console.print)
    rnd.tuned = POLICIES[cfg.policy.kind](context)


def evaluate_round(run: Run, rnd: Round) -> None:
    """5. Evaluate: score each epoch's weights on val (illume.evaluation), keep the best; the round's row gets
    its scores and what the policy reports."""
    cfg, tuned = run.cfg, rnd.tuned
    kept = keep_best(tuned, run.vlm, run.val, cfg, rnd.out_dir)
    best = kept.best
    run.console.print(f"round {rnd.idx}: kept epoch {best['epoch']} of {len(kept.epochs)} "
                      f"(val {cfg.train.select_metric} {best[cfg.train.select_metric]:.4f})")
    rnd.metrics.update(tuned.report)
    rnd.metrics.update(kept_epoch(tuned, kept))
    rnd.metrics.update(trained=True, val={k: best[k] for k in VAL_SCORES if k in best}, best_epoch=best["epoch"],
                       seconds=round(time.perf_counter() - rnd.started, 1))
