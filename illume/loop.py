"""The ILLUME loop: sample -> critique -> tune -> evaluate -> report, per round.

Each step is behind an interface chosen by one dict: the critic by `illume.critic_registry.CRITICS`
[critic.kind], the policy by `policies.registry.POLICIES[policy.kind]`; what was accepted is read by the
rules of `illume.feedback.verdicts`; the backend is whatever `load_vlm` gives. This module asks none of them
which kind it is.

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
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from illume import distributed, run_folder
from illume.config import ConfigError, RunConfig, save_config
from illume.critic_registry import CRITICS
from illume.critics import CritiqueContext
from illume.data.datasets import load_split
from illume.evaluation import SCORE_KEYS, explanation_scores
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import AGGREGATES, read_feedback
from illume.loading import load_vlm
from illume.models.weights import WeightsFileError, check_safetensors, load_trainable_weights
from illume.pool import check_pool, merge_pool, sample_pool
from illume.resume import CHANGES_FILE, check_resumed_settings, describe, record_setting_changes
from illume.sampling import sample
from illume.status import POLICY_COLUMNS, policy_cell
from illume.tracking import check_report_to, open_tracker, round_scalars
from illume.training import ADAPTERS_FILE, retrain_round_remedy
from policies.base import RoundContext
from policies.registry import POLICIES, check_policy_config
from reward.critic import check_critique_order, check_reward_checkpoint

logger = logging.getLogger(__name__)
VAL_KEYS = ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy")  # the table's columns


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
                      *(pct(row, k) for k in VAL_KEYS),
                      *(policy_cell(row, key, fmt) for key, _, fmt in extra))
    return table


def run(cfg: RunConfig) -> list[dict]:
    """Run (or continue) the ILLUME rounds of `cfg`; returns the per-round results also in results.json.

    Everything that can be checked is checked before anything is written: the settings, the data (every
    image opened), the store's database, then the run folder (illume's, and nobody else writing to it).
    """
    distributed.init_if_launched()
    # Logs and pipes get 80 columns: too narrow. One process prints.
    console = Console(width=max(Console().width, 120), quiet=not distributed.is_main())
    for key, value, choices in (("policy.kind", cfg.policy.kind, POLICIES), ("critic.kind", cfg.critic.kind, CRITICS),
                                ("feedback.aggregate", cfg.feedback.aggregate, AGGREGATES)):
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    check_policy_config(cfg)
    check_reward_checkpoint(cfg)  # a saved reward model fitted on another base model fails here, not rounds later
    check_critique_order(cfg)
    check_pool(cfg)
    check_report_to(cfg)  # an unknown tracker or a missing package fails here, not after the first round
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
        critic = CRITICS[cfg.critic.kind](cfg)
        image_refs = save_images(run_dir, train)
        # The round table and the annotation progress, to train.report_to's trackers (the trainers report on
        # their own, illume.tracking); step = the round. Closed (files flushed, remote runs ended) also when a
        # round fails.
        tracker = open_tracker(cfg, say=console.print)
        held.callback(tracker.close)
        results = _rounds(cfg, run_dir, store, vlm, critic, train, val, console, image_refs, tracker)
    console.print(f"results: {run_dir / 'results.json'}")
    return results


def _rounds(cfg, run_dir, store, vlm, critic, train, val, console, image_refs, tracker) -> list[dict]:
    """Score the base model, then run (or take from disk) each round until the loop's stopping rules say so."""
    train_by_id = {e.id: e for e in train}
    base_path = run_dir / "base_metrics.json"
    if base_path.is_file():
        base_scores = json.loads(base_path.read_text())
    else:
        console.print("[bold]scoring the base model on val[/bold]")
        base_scores = explanation_scores(vlm, val, cfg.sample, progress=distributed.is_main())
        if distributed.is_main():
            _write_json(base_path, base_scores)
    results = [{"round": "base", "val": base_scores}]
    tracker.log(round_scalars(results[0]), step=0)
    best_score, rounds_without_gain = results[0]["val"][cfg.train.select_metric], 0

    for round_idx in range(cfg.loop.num_rounds):
        out_dir = round_dir(run_dir, round_idx)
        metrics_path = out_dir / "metrics.json"
        if metrics_path.is_file():  # finished earlier: take its weights and go on
            metrics = json.loads(metrics_path.read_text())
            if metrics.get("trained"):
                load_trainable_weights(vlm.model, out_dir / ADAPTERS_FILE, retrain_round_remedy(out_dir))
        else:
            metrics = _run_round(cfg, round_idx, out_dir, store, vlm, critic, train, train_by_id, val, console,
                                 image_refs, tracker)
            if metrics is None:  # people have not finished judging and the config says not to wait
                break
            if distributed.is_main():
                _write_json(metrics_path, metrics)
                store.set_round_metrics(round_idx, metrics)
                if metrics["trained"]:
                    store.mark_trained(round_idx)
        results.append(_result_row(metrics))
        tracker.log(round_scalars(results[-1]), step=round_idx)
        if distributed.is_main():
            _write_json(run_dir / "results.json", results)
        console.print(results_table(results))
        if not metrics.get("trained"):
            console.print(f"stopping: round {round_idx} accepted no new rationale")
            break
        score = metrics["val"][cfg.train.select_metric]
        if score > best_score + cfg.loop.min_improvement:
            best_score, rounds_without_gain = score, 0
        else:
            rounds_without_gain += 1
        if cfg.loop.patience is not None and rounds_without_gain >= cfg.loop.patience:
            console.print(f"stopping: val {cfg.train.select_metric} has not improved for {rounds_without_gain} rounds")
            break
    return results


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


def _run_round(cfg, round_idx, out_dir, store, vlm, critic, train, train_by_id, val, console,
               image_refs, tracker) -> dict | None:
    start = time.perf_counter()
    # 1. Sample (skipped when this round's candidates are already stored).
    if not store.is_sampled(round_idx):
        console.print(f"[bold]round {round_idx}[/bold]: sampling {len(train)} train questions")
        # Each rank draws its share in whole sampler batches, so the candidates are those one process draws.
        sets = distributed.gather_objects(sample(
            vlm, distributed.shard(train, cfg.sample.batch_size), cfg.sample, round_idx=round_idx,
            use_reference_answer=True, progress=distributed.is_main()))
        if cfg.sample.pool:  # more models' candidates join each item's list (illume.pool)
            sets = merge_pool(sets, sample_pool(cfg, vlm, train, round_idx, out_dir.parent, say=console.print))
        if distributed.is_main():
            store.add_candidate_sets(round_idx, "train", sets, image_refs=image_refs,
                                     questions={e.id: e.question for e in train})
            store.mark_sampled(round_idx)
    distributed.barrier()  # the others read the candidates once rank 0 stored them
    sets = {cs.example_id: cs for cs in store.candidate_sets(round_idx, "train")}
    # 2. Critique (illume.critic_registry): people, their simulation or the reward model put the round's
    #    judgments into the store. Rank 0's answer counts: people work there while the others wait.
    context = CritiqueContext(cfg, store, round_idx, sets, train_by_id, image_refs, say=console.print,
                              track=tracker.log)
    if not distributed.broadcast_object(critic.review(context)):
        return None
    # What was accepted, by the rules of illume.feedback.verdicts: a rationale is new this round when it was
    # first accepted in it.
    accepted = read_feedback(store, upto_round=round_idx, aggregate=cfg.feedback.aggregate)
    new = [row for row in accepted.accepted() if row.item.round_idx == round_idx]
    metrics = {"round": round_idx, "accepted_pct": 100 * accepted.items_with_accepted(round_idx) / max(1, len(sets)),
               "new_rationales": len(new), "train_rationales": len(accepted.accepted()),
               "judgments": store.num_judgments(), "human_judgments": store.num_judgments(kinds=cfg.feedback.people),
               "trained": False, "val": {}, **context.report}
    if not new and cfg.loop.stop_when_nothing_new:
        return metrics
    # 3. Tune with the configured policy (policies.registry: selection-SFT, DPO, KTO); each keeps its best
    #    epoch on val.
    result = POLICIES[cfg.policy.kind](RoundContext(cfg, vlm, store, round_idx, train, train_by_id, val, out_dir,
                                                    say=console.print))
    metrics.update(result.report)
    metrics.update(trained=True, val={k: result.best[k] for k in SCORE_KEYS if k in result.best},
                   best_epoch=result.best["epoch"], seconds=round(time.perf_counter() - start, 1))
    return metrics
