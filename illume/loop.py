"""The ILLUME loop: sample -> critique -> store -> build the training set -> fine-tune -> evaluate, per round.

Assumptions, up front:
- Everything that must survive a crash is in the feedback store (candidates, judgments) or in the round
  folder (`adapters.safetensors`, `metrics.json`, the last file a round writes). Running the same command
  again continues where it stopped: a round with `metrics.json` is done and its adapters are loaded; a round
  whose candidates are stored is not sampled again; items already judged are not judged again; an
  interrupted fine-tuning starts over from the previous round's weights. Nothing is lost or written twice.
- Round r samples with the model tuned in round r - 1 (round 0: the base model), on the train split, with the
  reference answer in the prompt; val scores are of greedy rationales for the model's own answers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from illume.config import RunConfig, save_config
from illume.critics import CRITICS
from illume.data.datasets import load_split
from illume.evaluation import explanation_scores
from illume.models.loading import load_vlm
from illume.models.weights import load_trainable_weights
from illume.sampling import sample
from illume.store import FeedbackStore
from illume.training import ADAPTERS_FILE, build_training_set, fine_tune, write_manifest

logger = logging.getLogger(__name__)
CRITIQUE_CHUNK = 100
VAL_KEYS = ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy")


def init_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory and write the resolved config first (kept from the first run on resume)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def round_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / f"round_{round_idx:02d}"


def _write_json(path: Path, data) -> None:
    # Write then rename: a kill mid-write never leaves a truncated file that looks complete.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def results_table(results: list[dict]) -> Table:
    table = Table(title="ILLUME rounds (val scores x100)")
    # accepted %: train questions of the round with >= 1 accepted rationale; new / total: distinct accepted
    # rationales new this round / in the training set; judgments: all judgments in the store so far.
    for column in ("round", "accepted %", "new", "total", "judgments", "B-4", "METEOR", "ROUGE-L", "CIDEr",
                   "answer acc."):
        table.add_column(column, justify="right")

    def pct(row: dict, key: str) -> str:
        value = row["val"].get(key)
        return "-" if value is None else f"{100 * value:.1f}"

    for row in results:
        accepted = "-" if row.get("accepted_pct") is None else f"{row['accepted_pct']:.1f}"
        table.add_row(str(row["round"]), accepted, str(row.get("new_rationales", "-")),
                      str(row.get("train_rationales", "-")), str(row.get("judgments", "-")),
                      *(pct(row, k) for k in VAL_KEYS))
    return table


def run(cfg: RunConfig) -> list[dict]:
    """Run (or continue) the ILLUME rounds of `cfg`; returns the per-round results also in results.json."""
    console = Console(width=max(Console().width, 100))  # logs and pipes get 80 columns: too narrow
    run_dir = init_run_dir(cfg)
    store = FeedbackStore(cfg.store_url or run_dir / "feedback.db")
    vlm = load_vlm(cfg)
    train, val = load_split(cfg.data, "train"), load_split(cfg.data, "val")
    train_by_id = {e.id: e for e in train}
    critic = _make_critic(cfg)
    image_refs = save_images(run_dir, train)

    base_path = run_dir / "base_metrics.json"
    if not base_path.is_file():
        console.print("[bold]scoring the base model on val[/bold]")
        _write_json(base_path, explanation_scores(vlm, val, cfg.sample))
    results = [{"round": "base", "val": json.loads(base_path.read_text())}]
    best_score, rounds_without_gain = results[0]["val"][cfg.train.select_metric], 0

    for round_idx in range(cfg.loop.num_rounds):
        out_dir = round_dir(run_dir, round_idx)
        metrics_path = out_dir / "metrics.json"
        if metrics_path.is_file():  # finished earlier: take its weights and go on
            metrics = json.loads(metrics_path.read_text())
            if metrics.get("trained"):
                load_trainable_weights(vlm.model, out_dir / ADAPTERS_FILE)
        else:
            metrics = _run_round(cfg, round_idx, out_dir, store, vlm, critic, train, train_by_id, val, console,
                                 image_refs)
            if metrics is None:  # people have not finished judging and the config says not to wait
                break
            _write_json(metrics_path, metrics)
            store.set_round_metrics(round_idx, metrics)
            if metrics["trained"]:
                store.mark_trained(round_idx)
        results.append(metrics)
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
    console.print(f"results: {run_dir / 'results.json'}")
    return results


def _make_critic(cfg: RunConfig):
    if cfg.critic.kind == "simulated":
        return CRITICS["simulated"](cfg.critic)
    if cfg.critic.ui == "terminal":
        return CRITICS["terminal"](cfg.critic)
    return None  # people judge in the annotation page; the loop waits on the store


def save_images(run_dir: Path, examples) -> dict[str, str]:
    """Image references the annotation page and exports can serve: in-memory images are written once to
    run_dir/images/<id>.png (relative refs); file images keep their absolute path."""
    refs = {}
    for example in examples:
        if isinstance(example.image, Image.Image):
            path = run_dir / "images" / f"{example.id}.png"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                example.image.save(path)
            refs[example.id] = str(path.relative_to(run_dir))
        else:
            refs[example.id] = str(Path(example.image).resolve())
    return refs


def _wait_for_people(cfg: RunConfig, store: FeedbackStore, round_idx: int, console: Console) -> bool:
    """Block until every item of the round has its judgments (True), or return False when not waiting."""
    wanted = cfg.annotate.annotations_per_item
    progress = store.annotation_progress(round_idx, wanted)
    if progress["complete_items"] == progress["items"]:
        return True
    console.print(f"round {round_idx}: {progress['items']} items wait for {wanted} judgment(s) each "
                  f"({progress['counted_judgments']} of {progress['needed_judgments']} so far). "
                  f"People judge them in the annotation page:\n    illume annotate {cfg.run_dir}")
    if not cfg.critic.wait:
        console.print("critic.wait=false: stopping here; run the same command again to continue")
        return False
    with tqdm(total=progress["needed_judgments"], initial=progress["counted_judgments"],
              desc="waiting for judgments") as bar:
        while progress["complete_items"] < progress["items"]:
            time.sleep(cfg.critic.poll_seconds)
            progress = store.annotation_progress(round_idx, wanted)
            bar.update(progress["counted_judgments"] - bar.n)
    return True


def _critique(cfg, round_idx, store, critic, sets, train_by_id, image_refs, run_dir, console) -> bool:
    """Get this round's judgments into the store; False when the run should stop and wait for people."""
    if critic is None:
        return _wait_for_people(cfg, store, round_idx, console)
    todo = [sets[example_id] for example_id in store.unjudged_items(round_idx, critic.annotator, "train")]
    if isinstance(critic, CRITICS["terminal"]):
        for cs in tqdm(todo, desc=f"critique ({critic.annotator})", unit="item", disable=not todo):
            image = image_refs.get(cs.example_id)
            if image and not Path(image).is_absolute():
                image = str(run_dir / image)
            review = critic.review_one(cs, train_by_id[cs.example_id], image)
            # Stored one by one: a person's work is never lost to a crash or Ctrl-C.
            store.add_judgment(round_idx, cs.example_id, critic.annotator,
                               [cs.candidates[i].text for i in review.accepted], review.none_fit, review.seconds)
        return True
    # In chunks, each stored in its own transaction: a kill loses at most the chunk under way.
    for start in tqdm(range(0, len(todo), CRITIQUE_CHUNK), desc=f"critique ({critic.annotator})", unit="chunk",
                      disable=not todo):
        reviews = critic.review(todo[start:start + CRITIQUE_CHUNK], train_by_id)
        store.add_judgments(round_idx, [
            (r.example_id, [sets[r.example_id].candidates[i].text for i in r.accepted], r.none_fit, r.seconds)
            for r in reviews], critic.annotator, "train")
    return True


def _run_round(cfg, round_idx, out_dir, store, vlm, critic, train, train_by_id, val, console,
               image_refs) -> dict | None:
    start = time.perf_counter()
    # 1. Sample (skipped when this round's candidates are already stored).
    if not store.is_sampled(round_idx):
        console.print(f"[bold]round {round_idx}[/bold]: sampling {len(train)} train questions")
        sets = sample(vlm, train, cfg.sample, round_idx=round_idx, use_reference_answer=True)
        store.add_candidate_sets(round_idx, "train", sets, image_refs=image_refs)
        store.mark_sampled(round_idx)
    sets = {cs.example_id: cs for cs in store.candidate_sets(round_idx, "train")}
    # 2. Critique: the items this critic has not judged yet, or wait for people.
    if not _critique(cfg, round_idx, store, critic, sets, train_by_id, image_refs, cfg.run_dir, console):
        return None
    counts = store.judgment_counts(round_idx)
    accepted_before = {(e, t) for e, t, _ in store.accepted_rationales(round_idx - 1)} if round_idx else set()
    accepted = [(e, t) for e, t, _ in store.accepted_rationales(round_idx)]
    new = [pair for pair in accepted if pair not in accepted_before]
    metrics = {"round": round_idx, "accepted_pct": 100 * counts["items_with_accepted"] / max(1, counts["items"]),
               "new_rationales": len(new), "train_rationales": len(accepted),
               "judgments": store.num_judgments(), "trained": False, "val": {}}
    if not new and cfg.loop.stop_when_nothing_new:
        return metrics
    # 3. Fine-tune on everything accepted so far (+ answer-only rows), keep the best epoch.
    rows = build_training_set(accepted, train, cfg.train.num_answer_only_rows, cfg.train.rationale_weight,
                              seed=cfg.train.seed + round_idx)
    write_manifest(rows, out_dir / "training_set.jsonl")
    console.print(f"round {round_idx}: training on {len(rows)} rows "
                  f"({sum(r.kind == 'rationale' for r in rows)} rationales)")
    result = fine_tune(vlm, rows, train, val, cfg.train, cfg.sample, out_dir)
    metrics.update(trained=True, val={k: result["best"][k] for k in VAL_KEYS if k in result["best"]},
                   best_epoch=result["best"]["epoch"], seconds=round(time.perf_counter() - start, 1))
    return metrics
