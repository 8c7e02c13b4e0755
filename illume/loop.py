"""The ILLUME loop: sample -> critique -> store -> build the training set -> fine-tune -> evaluate, per round.

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

import json
import logging
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from illume import distributed
from illume.config import ConfigError, RunConfig, save_config
from illume.critics import CRITICS
from illume.data.datasets import load_split
from illume.evaluation import explanation_scores
from illume.models.loading import load_vlm
from illume.models.weights import load_trainable_weights
from illume.resume import CHANGES_FILE, check_resumed_settings, describe, record_setting_changes
from illume.sampling import sample
from illume.store import FeedbackStore
from illume.training import ADAPTERS_FILE, retrain_round_remedy
from policies.base import RoundContext
from policies.registry import POLICIES

logger = logging.getLogger(__name__)
CRITIQUE_CHUNK = 100
VAL_KEYS = ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy")


# Wall-clock figures differ between two runs of the same command: results.json leaves them out, so that the
# same command writes the same file; each round's time stays in its round_NN/metrics.json.
WALL_CLOCK_KEYS = ("seconds",)


def _result_row(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in WALL_CLOCK_KEYS}


def init_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory and write the resolved config first; a resumed run rewrites it, so it always
    shows the settings of the latest invocation (the store and round folders carry what was done before; the
    loop checks first that those settings are the run's, illume.resume)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
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
    # rationales new this round / in the training set; judgments: all judgments in the store so far, by people:
    # those not made by the reward model (the simulated critic stands in for people).
    for column in ("round", "accepted %", "new", "total", "judgments", "by people", "B-4", "METEOR", "ROUGE-L",
                   "CIDEr", "answer acc."):
        table.add_column(column, justify="right")

    def pct(row: dict, key: str) -> str:
        value = row["val"].get(key)
        return "-" if value is None else f"{100 * value:.1f}"

    for row in results:
        accepted = "-" if row.get("accepted_pct") is None else f"{row['accepted_pct']:.1f}"
        table.add_row(str(row["round"]), accepted, str(row.get("new_rationales", "-")),
                      str(row.get("train_rationales", "-")), str(row.get("judgments", "-")),
                      str(row.get("human_judgments", "-")),
                      *(pct(row, k) for k in VAL_KEYS))
    return table


def run(cfg: RunConfig) -> list[dict]:
    """Run (or continue) the ILLUME rounds of `cfg`; returns the per-round results also in results.json."""
    distributed.init_if_launched()
    # Logs and pipes get 80 columns: too narrow. One process prints.
    console = Console(width=max(Console().width, 120), quiet=not distributed.is_main())
    if cfg.policy.kind not in POLICIES:
        raise ConfigError(f"policy.kind={cfg.policy.kind!r} is not a policy: one of {', '.join(POLICIES)}")
    # Before anything is written: a run continued with other settings refuses and leaves everything as it was.
    changes = check_resumed_settings(cfg)
    distributed.barrier()  # every rank has read the old config.yaml before rank 0 rewrites it
    run_dir = init_run_dir(cfg)
    if changes and distributed.is_main():  # allowed by loop.allow_changed_settings
        record_setting_changes(cfg, changes)
        console.print(f"continuing with changed settings ({describe(changes)}), recorded in "
                      f"{run_dir / CHANGES_FILE}", markup=False)
    # The data before the model: a malformed row or a missing image fails in a second, not after the model
    # loaded (or minutes of pre-training).
    train = load_split(cfg.data, "train", images_must_exist=True)
    val = load_split(cfg.data, "val", images_must_exist=True)
    with distributed.main_process_first():  # rank 0 creates the store's tables; the others open it after
        store = FeedbackStore(cfg.store_url or run_dir / "feedback.db")
    vlm = load_vlm(cfg)
    train_by_id = {e.id: e for e in train}
    critic = _make_critic(cfg)
    image_refs = save_images(run_dir, train)

    base_path = run_dir / "base_metrics.json"
    if base_path.is_file():
        base_scores = json.loads(base_path.read_text())
    else:
        console.print("[bold]scoring the base model on val[/bold]")
        base_scores = explanation_scores(vlm, val, cfg.sample, progress=distributed.is_main())
        if distributed.is_main():
            _write_json(base_path, base_scores)
    results = [{"round": "base", "val": base_scores}]
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
                                 image_refs)
            if metrics is None:  # people have not finished judging and the config says not to wait
                break
            if distributed.is_main():
                _write_json(metrics_path, metrics)
                store.set_round_metrics(round_idx, metrics)
                if metrics["trained"]:
                    store.mark_trained(round_idx)
        results.append(_result_row(metrics))
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
    console.print(f"results: {run_dir / 'results.json'}")
    return results


def _make_critic(cfg: RunConfig):
    """The people of the run: the simulated critic standing in for them, a terminal prompt, or None for the
    annotation page (the loop then waits on the store). Reward/hybrid runs add the reward model per round."""
    people_kind = cfg.critic.people if cfg.critic.kind in ("reward", "hybrid") else cfg.critic.kind
    if people_kind == "simulated":
        return CRITICS["simulated"](cfg.critic)
    if cfg.critic.ui == "terminal":
        return CRITICS["terminal"](cfg.critic)
    return None


def _is_person(annotator: str) -> bool:
    return not annotator.startswith("reward")


def _fit_reward_critic(cfg: RunConfig, round_idx: int, store: FeedbackStore, train_by_id: dict, console: Console):
    """The reward model for this round, fitted on every judgment people made in earlier rounds (reused from
    the latest round that saw the same judgments), with its accept threshold calibrated on held-out examples."""
    from reward.model import RewardModel
    from reward.train import fit_reward_from_store

    # Rank 0's count, so that every rank takes the same reuse-or-fit decision below.
    num_people = distributed.broadcast_object(
        sum(1 for j in _judgments(store) if _is_person(j[2]) and j[0] < round_idx))
    reward_root = cfg.run_dir / "reward"
    for earlier in range(round_idx, -1, -1):  # reuse a fit on exactly these judgments (also on resume)
        info_path = reward_root / f"round_{earlier:02d}" / "reward_critic.json"
        if info_path.is_file() and json.loads(info_path.read_text())["num_people_judgments"] == num_people:
            info = json.loads(info_path.read_text())
            rm = RewardModel.load(info_path.parent, load_vlm(cfg))
            break
    else:
        out_dir = reward_root / f"round_{round_idx:02d}"
        console.print(f"round {round_idx}: fitting the reward model on {num_people} judgments by people")
        rm, result = fit_reward_from_store(store, train_by_id, load_vlm(cfg), cfg.reward, out_dir,
                                           upto_round=round_idx - 1, annotators=_is_person,
                                           deepspeed=cfg.train.deepspeed, bf16=cfg.train.bf16, fp16=cfg.train.fp16)
        report = result["eval"]
        info = {"threshold": report["threshold"], "heldout_precision": report["precision"],
                "heldout_recall": report["recall"], "heldout_roc_auc": report["roc_auc"],
                "heldout_pairwise_accuracy": report["pairwise_accuracy"], "num_people_judgments": num_people}
        if distributed.is_main():
            _write_json(out_dir / "reward_critic.json", info)
    band = cfg.reward.hybrid_band if cfg.critic.kind == "hybrid" else None
    critic = CRITICS["reward"](rm, info["threshold"], band, annotator=f"reward:{cfg.critic.kind}")
    return critic, info


def _judgments(store: FeedbackStore) -> set[tuple[int, str, str]]:
    """(round, example id, annotator) of every judgment."""
    return {(r["round_idx"], r["example_id"], r["annotator"]) for r in store.judgments_table()}


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


def _reward_critique(cfg, round_idx, store, sets, train_by_id, console) -> dict:
    """The reward model judges the round (kind=reward) or its confident items (kind=hybrid).

    Every rank fits the reward model (together, through the Trainer) and reviews identically; rank 0 stores."""
    rm_critic, info = _fit_reward_critic(cfg, round_idx, store, train_by_id, console)
    # Rank 0's view, taken before it writes: people may be judging on the annotation page meanwhile.
    judged = distributed.broadcast_object({e for r, e, _ in _judgments(store) if r == round_idx})
    todo = [cs for example_id, cs in sets.items() if example_id not in judged]
    reviews = rm_critic.review(todo, train_by_id) if todo else []
    if distributed.is_main():
        store.add_judgments(round_idx, [
            (r.example_id, [sets[r.example_id].candidates[i].text for i in r.accepted], r.none_fit, None)
            for r in reviews], rm_critic.annotator, "train")
    distributed.barrier()  # the others read these judgments below
    report = {"rm_threshold": info["threshold"], "rm_heldout_precision": info["heldout_precision"],
              "rm_heldout_recall": info["heldout_recall"], "rm_heldout_roc_auc": info["heldout_roc_auc"],
              "rm_decided_items": sum(1 for r, _, a in _judgments(store) if r == round_idx and not _is_person(a))}
    # Where the references are known (the demo), say how the reward model's decisions compare with the
    # simulated critic's: the achieved precision and recall of its accepts.
    decided = [cs for cs in todo if cs.example_id in {r.example_id for r in reviews}]
    if decided and all(train_by_id[cs.example_id].explanations for cs in decided):
        oracle = CRITICS["simulated"](cfg.critic).review(decided, train_by_id)
        by_id = {r.example_id: r for r in reviews}
        pairs = [(i in set(by_id[o.example_id].accepted), i in set(o.accepted))
                 for o in oracle for i in range(len(sets[o.example_id].candidates))]
        true_pos = sum(rm and ref for rm, ref in pairs)
        report["rm_precision_vs_simulated"] = true_pos / max(1, sum(rm for rm, _ in pairs))
        report["rm_recall_vs_simulated"] = true_pos / max(1, sum(ref for _, ref in pairs))
    return report


def _critique(cfg, round_idx, store, critic, sets, train_by_id, image_refs, run_dir, console) -> bool:
    """Get this round's judgments into the store; False when the run should stop and wait for people."""
    if critic is None:
        return _wait_for_people(cfg, store, round_idx, console)
    judged_by_rm = {e for r, e, a in _judgments(store) if r == round_idx and not _is_person(a)}
    todo = [sets[example_id] for example_id in store.unjudged_items(round_idx, critic.annotator, "train")
            if example_id not in judged_by_rm]
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
        # Each rank draws its share in whole sampler batches, so the candidates are those one process draws.
        sets = distributed.gather_objects(sample(
            vlm, distributed.shard(train, cfg.sample.batch_size), cfg.sample, round_idx=round_idx,
            use_reference_answer=True, progress=distributed.is_main()))
        if distributed.is_main():
            store.add_candidate_sets(round_idx, "train", sets, image_refs=image_refs)
            store.mark_sampled(round_idx)
    distributed.barrier()  # the others read the candidates once rank 0 stored them
    sets = {cs.example_id: cs for cs in store.candidate_sets(round_idx, "train")}
    # 2. Critique: the reward model (after its human rounds), then people for what is left.
    reward_report = {}
    if cfg.critic.kind in ("reward", "hybrid") and round_idx >= cfg.reward.human_rounds:
        reward_report = _reward_critique(cfg, round_idx, store, sets, train_by_id, console)
    # The critic (people or their simulation) works on rank 0; the others wait here for its outcome.
    judged = (_critique(cfg, round_idx, store, critic, sets, train_by_id, image_refs, cfg.run_dir, console)
              if distributed.is_main() else None)
    if not distributed.broadcast_object(judged):
        return None
    counts = store.judgment_counts(round_idx)
    accepted_before = {(e, t) for e, t, _ in store.accepted_rationales(round_idx - 1)} if round_idx else set()
    accepted = [(e, t) for e, t, _ in store.accepted_rationales(round_idx)]
    new = [pair for pair in accepted if pair not in accepted_before]
    metrics = {"round": round_idx, "accepted_pct": 100 * counts["items_with_accepted"] / max(1, counts["items"]),
               "new_rationales": len(new), "train_rationales": len(accepted),
               "judgments": store.num_judgments(),
               "human_judgments": sum(1 for *_, a in _judgments(store) if _is_person(a)),
               "trained": False, "val": {}, **reward_report}
    if not new and cfg.loop.stop_when_nothing_new:
        return metrics
    # 3. Tune with the configured policy (policies.registry: selection-SFT, DPO, KTO); each keeps its best
    #    epoch on val.
    result = POLICIES[cfg.policy.kind](RoundContext(cfg, vlm, store, round_idx, train, train_by_id, val, out_dir,
                                                    say=console.print))
    metrics.update(result.report)
    metrics.update(trained=True, val={k: result.best[k] for k in VAL_KEYS if k in result.best},
                   best_epoch=result.best["epoch"], seconds=round(time.perf_counter() - start, 1))
    return metrics
