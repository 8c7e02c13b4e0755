"""The study: ILLUME's selection-SFT beside preference optimisation, online RL, AI feedback and supervised
fine-tuning on k written rationales, and the human-effort curve, over several seeds, with final numbers on a
held-out test split.

    python scripts/compare.py --seeds 5 --jobs 2   # the full study in 2 worker processes -> docs/
    python scripts/compare.py --quick --docs /tmp/q   # a tiny version of every step (a test runs it)

What it does, in order:
1. A small sweep per preference method (SWEEP: beta x learning rate for DPO, KTO and GRPO) on seed 0 with
   fewer rounds, picked by final val CIDEr. The sweep's points run first (in parallel with --jobs); the chosen
   settings are used for every seed and written in the docs.
2. Every variant of STUDY, SFT on one written rationale for each of k train questions (k in SUPERVISED_K),
   and the human-effort curve (EFFORT_SHARES, below), for seeds 0..n-1. Seed s changes the world's
   train/val/test questions (data.shapes.seed) and every sampling, training and reward seed; the pre-trained
   base model is the same for all seeds (data.shapes.pretrain_seed=0), as every ILLUME run starts from the
   same pre-trained MAGMA.
3. Each variant's final model (the last trained round, its epoch kept on val) is scored on the test split
   (data.shapes.num_test_scenes questions that no epoch or setting choice saw); ILLUME's every round too,
   for the data-efficiency table.
4. docs/results.md: mean +- 95 % t-interval over seeds per variant on test, paired t-tests against
   selection-SFT on the same seeds, the data-efficiency table (ILLUME round r ~ SFT on k questions) with the
   human effort of each (selection judgments vs rationales written), the human-effort curve, the chosen
   settings and wall times; docs/compare_cider.png (test CIDEr per variant with intervals),
   docs/data_efficiency.png, docs/effort_curve.png, docs/rl_reward_accept.png (online RL's reward against
   people's acceptance, per round and seed), docs/study.json.

The human-effort curve: the hybrid critic with people's budget set so that they judge a share of what people
judge every round (illume-sft): `annotate.budget_per_round` = share x the round's items, from round 0 on
(`reward.people_rounds=0`: people judge a seeded draw of round 0's budget and a reward model fitted on it
decides the rest, reward/critic.py), `annotate.order=uncertainty` after round 0, the reward model's accepts
withheld in rounds where its threshold missed the target precision (`reward.below_target=reject`). The share
reported is the one counted in the store (results.json's human_judgments / judgments), not the nominal
budget; 100 % is illume-sft itself.

Workers: --jobs N (default 1) runs the runs in N spawned worker processes, each single-threaded
(OMP/MKL/torch threads 1: the thread count changes the numbers, docs/study.md); a run is deterministic given
its seed, so the run folders and numbers do not depend on N (a test checks --jobs 2 against --jobs 1 on
--quick). A base model not cached yet is pre-trained in a worker before any run starts.

Resuming: each run directory is reused. A finished run (RUN_DIR/wall_seconds.json says complete) is not run
again, if it ran with the study's settings (a changed config or sweep choice fails that run, naming the
settings: delete its folder to run it again); an interrupted one continues from its finished rounds and its
wall time is summed over invocations (a failed or stopped run's time so far is saved, also when the study's
process is killed: its workers save it as they end); test scores are cached per run (RUN_DIR/heldout_test.json).
The study's own wall clock is summed over invocations in OUT/study_wall.json, saved as each run finishes.
--fresh starts everything over.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from illume.config import load_config  # noqa: E402
from illume.metrics.stats import mean_interval, paired_comparison, t_quantile  # noqa: E402

# name: (what it is, config, overrides). Each keeps its demo config's settings; the sweep may add some.
STUDY = {
    "illume-sft": ("ILLUME selection-SFT, simulated critic (people) every round", "configs/demo.yaml", []),
    "illume-rm": ("ILLUME, people in round 0, then the reward model as critic", "configs/demo_reward.yaml", []),
    "hybrid": ("ILLUME, the reward model decides where it is sure, people the rest", "configs/demo_hybrid.yaml",
               []),
    "dpo": ("iterative DPO on each round's accepted vs rejected pairs, answer rows", "configs/demo_dpo.yaml", []),
    "kto": ("iterative KTO on each round's accept/reject labels, answer rows", "configs/demo_kto.yaml", []),
    "dpo-rm": ("iterative DPO, people in round 0, then the reward model's verdicts (GRPO's judgments)",
               "configs/demo_dpo.yaml", ["critic.kind=reward", "reward.target_precision=0.6"]),
    "grpo": ("online GRPO, reward model fitted on round 0's human judgments", "configs/demo_grpo.yaml", []),
    "rlaif": ("no people: AI judge -> reward model -> GRPO (VLM-RLAIF's row)", "configs/demo_rlaif.yaml", []),
    "silkie": ("no people: a pool of earlier rounds, AI-judged pairs, DPO (Silkie's row)", "configs/demo_silkie.yaml",
               []),
    # GRPO on the HF demo (a tiny Qwen2-VL), by our trainer and by TRL's GRPOTrainer, the same settings and
    # round-0 judgments: whether GRPO's gap is the method or our implementation.
    "hf-sft": ("the HF demo (tiny Qwen2-VL, chat format): selection-SFT, people every round", "configs/demo_hf.yaml",
               []),
    "hf-grpo": ("the HF demo: online GRPO by our trainer (sampled once per round)", "configs/demo_hf_grpo.yaml",
                ["policy.grpo.trainer=illume"]),
    "hf-grpo-trl": ("the HF demo: online GRPO by TRL's GRPOTrainer (sampled every step)",
                    "configs/demo_hf_grpo.yaml", ["policy.grpo.trainer=trl"]),
}
# More variants on demand (--only): not in the default study.
EXTRA = {
    "grpo-sft": ("online GRPO + NLL on every accepted rationale", "configs/demo_grpo.yaml",
                 ["policy.grpo.accepted_weight=1.0"]),
    "dpo-nll": ("iterative DPO + NLL on the chosen rationale (RPO)", "configs/demo_dpo.yaml",
                ["policy.dpo.sft_weight=1.0"]),
    "sft-ref": ("SFT on all 3 reference explanations of every train question", "configs/demo.yaml", []),
    "dpo-all": ("iterative DPO on the pairs of every round so far", "configs/demo_dpo.yaml", ["policy.rounds=all"]),
    "kto-all": ("iterative KTO on the labels of every round so far", "configs/demo_kto.yaml", ["policy.rounds=all"]),
}
# Paired comparisons besides every variant against illume-sft: (variant, against), where both ran.
PAIRS = (("grpo", "dpo-rm"), ("grpo", "dpo"), ("dpo-rm", "illume-rm"), ("rlaif", "silkie"),
         ("hf-grpo", "hf-sft"), ("hf-grpo-trl", "hf-sft"), ("hf-grpo-trl", "hf-grpo"))
# Variants on another base model (the HF demo's): paired among themselves (PAIRS), not with illume-sft.
ON_HF_DEMO = ("hf-sft", "hf-grpo", "hf-grpo-trl")
# Variants that take another's sweep choice (the same method on other judgments).
SETTINGS_FROM = {"dpo-rm": "dpo"}
SUPERVISED_K = (25, 50, 100, 200, 400)
# The human-effort curve: % of people-every-round's judgments that people make (the critic on a budget,
# EFFORT_CONFIG + EFFORT_OVERRIDES); 100 % is illume-sft's runs (people judge every item of every round). The
# critic is the hybrid on people's budget whose reward model's accepts count only in rounds where its threshold
# reached the target precision on held-out judgments (`reward.below_target=reject`: docs/critique_order.md
# measured it against the default `threshold`); CRITIC_SHARE's point is the study's "budget critic" row.
EFFORT_SHARES = (5, 10, 15, 25, 50)
EFFORT_CONFIG = "configs/demo_hybrid.yaml"
EFFORT_OVERRIDES = ["reward.people_rounds=0", "annotate.order=uncertainty", "reward.below_target=reject"]
CRITIC_SHARE = 10
SWEEP = {
    "dpo": {"policy.dpo.beta": (0.1, 0.3), "policy.learning_rate": (1e-4, 3e-4)},
    "kto": {"policy.kto.beta": (0.1, 0.3), "policy.learning_rate": (1e-4, 3e-4)},
    # Around configs/demo_grpo.yaml's setting (lr 3e-4, beta 0.04, from an earlier sweep written in that file):
    # a stronger pull towards the round's starting weights, and an NLL anchor on every accepted rationale (as
    # RPO adds to DPO; 98.1 final val CIDEr in that earlier sweep, against 79.2 without).
    "grpo": {"policy.grpo.beta": (0.04, 0.2), "policy.grpo.accepted_weight": (0.0, 1.0)},
}
SHORT = {"policy.dpo.beta": "beta", "policy.kto.beta": "beta", "policy.grpo.beta": "beta",
         "policy.learning_rate": "lr", "policy.grpo.accepted_weight": "acc"}  # sweep run names
METRICS = (("bleu_4", "B-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"),
           ("answer_accuracy", "VQA acc."), ("answer_contains", "Q/A acc. (ILLUME)"))
# Rough minutes per run on 2 CPU cores, for the first ETA; replaced by measured times as runs finish.
GUESS_MINUTES = {"illume-sft": 1.5, "illume-rm": 1.5, "hybrid": 3.5, "dpo": 2, "kto": 3, "grpo": 4, "rlaif": 9,
                 "grpo-sft": 4, "dpo-nll": 2, "dpo-rm": 3, "hf-sft": 4, "hf-grpo": 8, "hf-grpo-trl": 16, "silkie": 14,
                 "sft-ref": 1, "sft-k": 0.8, "effort": 5}


@dataclass
class Profile:
    """Sizes of one study: the full one, or --quick's tiny version of every step."""

    seed_overrides: list[str]
    sweep_rounds: int
    supervised_k: tuple[int, ...]
    variants: tuple[str, ...]
    effort_shares: tuple[int, ...] = EFFORT_SHARES
    sweep: dict = field(default_factory=lambda: SWEEP)


FULL = Profile(["data.shapes.num_test_scenes=500"], sweep_rounds=2, supervised_k=SUPERVISED_K,
               variants=tuple(STUDY))
# A 2-layer LM on 12 train / 8 val / 8 test questions; the random model's rationales score low, so the
# critic's threshold is low enough to accept some (as tests/test_loop.py).
QUICK = Profile([
    "model.vision.width=8", "model.lm.hidden_size=32", "model.lm.num_layers=2", "model.lm.num_heads=2",
    "model.lm.rotary_dim=8", "data.shapes.num_pretrain_scenes=40", "data.shapes.num_train_scenes=12",
    "data.shapes.num_val_scenes=8", "data.shapes.num_test_scenes=8", "pretrain.num_steps=20",
    "pretrain.batch_size=8", "critic.threshold=0.1", "loop.stop_when_nothing_new=false", "train.num_epochs=1",
    "train.batch_size=8", "sample.samples_per_temperature=2", "sample.max_new_tokens=6", "loop.num_rounds=2",
    "reward.heldout_fraction=0.5",  # the effort runs' reward model: 3 of a 6-item budget to calibrate on
], sweep_rounds=1, supervised_k=(4, 8), variants=("illume-sft", "dpo"), effort_shares=(50,),
    sweep={"dpo": {"policy.dpo.beta": (0.1, 0.3)}})


def seed_overrides(seed: int) -> list[str]:
    """Seed s: another world (its train/val/test questions) and other sampling, training and reward seeds;
    the same pre-trained base model."""
    return [f"seed={seed}", f"data.shapes.seed={seed}", "data.shapes.pretrain_seed=0", f"sample.seed={seed}",
            f"train.seed={seed}", f"reward.seed={seed}", f"policy.seed={seed}"]


@dataclass
class Job:
    """One run: a variant (or sweep point or supervised k) on one seed."""

    variant: str
    seed: int
    config: str
    overrides: list[str]
    supervised_k: int | None = None  # SFT on k written rationales
    all_reference: bool = False  # sft-ref
    folders: str = "final"  # which trained folders to score on test: "final" or "all" (every round)
    score_test: bool = True
    setting: list[str] = field(default_factory=list)  # a sweep point's overrides

    @property
    def name(self) -> str:
        return f"{self.variant}__seed{self.seed}"

    @property
    def kind(self) -> str:
        """What its minutes are guessed and measured under, for the ETA (GUESS_MINUTES)."""
        if self.supervised_k is not None:
            return "sft-k"
        return "effort" if self.variant.startswith("effort-") else self.variant.split("@")[0]


def _final_round(results: list[dict]) -> dict:
    trained = [r for r in results[1:] if r.get("trained")]
    return trained[-1] if trained else results[0]


def _folder(round_name) -> str:
    return "supervised" if isinstance(round_name, str) else f"round_{round_name:02d}"


def run_job(job: Job, out: Path, profile: Profile, fresh: bool, report_only: bool = False) -> dict | None:
    """Run (or reuse) one job; returns its results, test scores and wall time (None: report_only and the run
    has not finished)."""
    from illume.heldout import BASE, heldout_scores
    from illume.loop import run
    from illume.supervised import run_supervised

    overrides = profile.seed_overrides + seed_overrides(job.seed) + job.overrides + [
        f"name={job.name}", f"output_dir={out}"]
    cfg = load_config(REPO / job.config, overrides)
    if fresh and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    wall_path = cfg.run_dir / "wall_seconds.json"
    wall = json.loads(wall_path.read_text()) if wall_path.is_file() else {"seconds": 0.0}
    start = time.perf_counter()
    if wall.get("complete"):
        check_reused(cfg)
        results = json.loads((cfg.run_dir / "results.json").read_text())
    elif report_only:
        return None
    else:
        # Until the run ends, its time so far is kept also if it fails or its worker is stopped: a resumed run's
        # wall time is summed over invocations.
        _RUNNING["wall"] = (wall_path, wall["seconds"], start)
        try:
            if job.supervised_k is not None or job.all_reference:
                results = run_supervised(cfg, num_questions=job.supervised_k)
            else:
                results = run(cfg)
        except BaseException:
            _save_run_wall(*_RUNNING.pop("wall"))
            raise
        _RUNNING.pop("wall", None)
        wall = {"seconds": wall["seconds"] + time.perf_counter() - start, "complete": True}
        wall_path.write_text(json.dumps(wall))
    test = {}
    if job.score_test:
        start = time.perf_counter()
        trained = [r for r in results[1:] if r.get("trained")]
        rounds = trained if job.folders == "all" else trained[-1:]
        scores = heldout_scores(cfg, [BASE, *(_folder(r["round"]) for r in rounds)])
        test = {"base": scores[BASE], **{str(r["round"]): scores[_folder(r["round"])] for r in rounds}}
        if not wall.get("test_seconds"):
            wall["test_seconds"] = time.perf_counter() - start
            wall_path.write_text(json.dumps(wall))
    return {"variant": job.variant, "seed": job.seed, "setting": job.setting, "results": results, "test": test,
            "seconds": wall["seconds"] + wall.get("test_seconds", 0.0)}


_RUNNING: dict = {}
"""The run this worker is in: "wall" -> (its wall_seconds.json, seconds before this invocation, start)."""


def _save_run_wall(path: Path, before: float, start: float) -> None:
    """An unfinished run's wall time so far (not complete: it continues from its finished rounds)."""
    if path.parent.is_dir():
        path.write_text(json.dumps({"seconds": before + time.perf_counter() - start}))


def check_reused(cfg) -> None:
    """A finished run is reported only if it ran with the settings the study would run it with now: a config
    edited since, or a sweep that chose another setting, must not leave old numbers in the docs.

    Raises:
        ConfigError: the run's config.yaml differs in a setting that changes results; names each one.
    """
    from illume.config import ConfigError, load_run_config
    from illume.resume import describe, finished_rounds, setting_changes

    stored = cfg.run_dir / "config.yaml"
    if not stored.is_file():
        return
    changes = setting_changes(load_run_config(stored), cfg, finished_rounds(cfg.run_dir))
    if changes:
        raise ConfigError(f"{cfg.run_dir} finished with other settings than the study's ({describe(changes)}); "
                          "delete that folder to run it again with the study's settings (--fresh: every run)")


def final_test(run: dict) -> dict:
    """Test scores of the run's final model (the base model's if it never trained)."""
    final = _final_round(run["results"])
    return run["test"][str(final["round"])] if final.get("trained") else run["test"]["base"]


def human_effort(run: dict) -> tuple[int, int]:
    """(selection judgments by people, rationales written by people) of the run's final model."""
    final = _final_round(run["results"])
    if run["variant"].startswith("sft-"):
        return 0, final.get("train_rationales", 0)
    return final.get("human_judgments", 0), 0


def _single_threaded() -> None:
    """A worker's start, before it imports torch (importing this module does not): one thread per run; and the
    worker ends when the study's process does (`_exit_with_parent`)."""
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    _exit_with_parent()


def _exit_with_parent(poll_seconds: float = 2.0) -> None:
    """End this worker when its parent is gone: a study stopped with kill (no `finally` runs) would otherwise
    leave its workers training on, holding their runs' folders against the next invocation. The run they
    were in continues from its finished rounds then."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # a dead parent's children are re-parented
            time.sleep(poll_seconds)
        if "wall" in _RUNNING:
            _save_run_wall(*_RUNNING["wall"])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """`jobs` spawned worker processes, each single-threaded (`_single_threaded`). Spawned, not forked (torch's
    thread pools do not survive a fork); single-threaded because the thread count changes the numbers (floats
    summed in another order: docs/study.md) and two threads per process on shared cores slow every step."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_single_threaded)


class Study:
    """Runs jobs in a pool of worker processes (`worker_pool`), with a line per finished run and an ETA from
    the times measured so far."""

    def __init__(self, out: Path, profile: Profile, fresh: bool, planned: list[Job], pool: ProcessPoolExecutor,
                 jobs: int, record_wall: bool = True):
        self.out, self.profile, self.fresh, self.pool, self.jobs = out, profile, fresh, pool, jobs
        # The study's wall clock over its invocations (OUT/study_wall.json), saved as runs finish, so that a
        # stopped invocation's time is counted up to its last finished run.
        # A report-only invocation reads it (the study's time so far) and adds nothing: it runs nothing.
        self.wall_path, self.record_wall = out / "study_wall.json", record_wall
        earlier = self.wall_path.is_file() and not fresh
        self.wall_before = json.loads(self.wall_path.read_text())["minutes"] if earlier else 0.0
        self.total, self.done, self.start = len(planned), 0, time.perf_counter()
        self.left = {job.name: job.kind for job in planned}  # not finished yet, for the ETA
        self.measured: dict[str, list[float]] = {}
        self.failed: dict[str, str] = {}  # run name -> its error

    def wall_minutes(self) -> float:
        """The study's wall clock: earlier invocations' and this one's so far, saved; report-only: the saved one."""
        if not self.record_wall:
            return self.wall_before
        minutes = self.wall_before + (time.perf_counter() - self.start) / 60
        self.out.mkdir(parents=True, exist_ok=True)
        self.wall_path.write_text(json.dumps({"minutes": minutes, "jobs": self.jobs}))
        return minutes

    def _minutes(self, kind: str) -> float:
        times = self.measured.get(kind)
        return sum(times) / len(times) / 60 if times else GUESS_MINUTES.get(kind, 2.0)

    def _finished(self, job: Job, result: dict | None) -> None:
        self.left.pop(job.name, None)
        if result is None:
            print(f"[study] not finished, left out: {job.variant} seed {job.seed}", flush=True)
            return
        self.measured.setdefault(job.kind, []).append(result["seconds"])
        self.done += 1
        self.wall_minutes()
        # The runs left share the workers: their minutes (measured so far, else guessed) over the workers.
        eta = sum(self._minutes(kind) for kind in self.left.values()) / min(self.jobs, max(1, len(self.left)))
        elapsed = (time.perf_counter() - self.start) / 60
        print(f"[study] {self.done}/{self.total} done: {job.variant} seed {job.seed} "
              f"({result['seconds'] / 60:.1f} min) - elapsed {elapsed:.1f} min, about {eta:.0f} min to go",
              flush=True)

    def run_all(self, jobs: list[tuple[Job, bool]]) -> list[dict | None]:
        """Run (or reuse, or with report_only only read) each (job, report_only) in the workers; results in the
        given order (None: report_only and the run has not finished, or the run failed: `self.failed` says
        why, and the other runs go on)."""
        results: list[dict | None] = [None] * len(jobs)
        pending = {self.pool.submit(run_job, job, self.out, self.profile, self.fresh, report_only): index
                   for index, (job, report_only) in enumerate(jobs)}
        if any(not report_only for _, report_only in jobs):
            print(f"[study] {len(jobs)} runs to run or reuse in {self.jobs} worker(s)", flush=True)
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                job = jobs[index][0]
                try:
                    results[index] = future.result()  # a run's exception is raised here
                except Exception as error:  # reported in the docs; the other runs go on
                    self.failed[job.name] = f"{type(error).__name__}: {error}"
                    print(f"[study] FAILED {job.variant} seed {job.seed}: {self.failed[job.name]}", flush=True)
                    self.left.pop(job.name, None)
                    continue
                self._finished(job, results[index])
        return results


def sweep_points(method: str, grid: dict) -> list[list[str]]:
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in product(*(grid[k] for k in keys))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 for every variant (at least 2)")
    parser.add_argument("--out", default=None, help="parent folder of the run directories "
                        "(default runs/study, or runs/study-quick with --quick)")
    parser.add_argument("--only", default=None, help="comma-separated variants (default: the study's); "
                        f"more: {', '.join(EXTRA)}; 'sft-k' is the supervised curve, 'effort' the human-effort curve")
    parser.add_argument("--quick", action="store_true", help="a tiny version of every step (minutes)")
    parser.add_argument("--fresh", action="store_true", help="delete the run directories first")
    parser.add_argument("--run-seeds", default=None, metavar="S,S",
                        help="run only these seeds' runs (and the sweep) now, e.g. to split a study across "
                        "processes; finished runs of the others are still reported")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the docs from the finished runs (a study in progress)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results.md, study.json and plots go")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes running the runs, each "
                        "single-threaded (default 1: one after another)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. model.cache_dir=/scratch/cache)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.set:
        profile = replace(profile, seed_overrides=profile.seed_overrides + args.set)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: intervals and paired tests need two seeds or more")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    names = [n.strip() for n in args.only.split(",")] if args.only else [*profile.variants, "sft-k", "effort"]
    unknown = [n for n in names if n not in STUDY and n not in EXTRA and n not in ("sft-k", "effort")]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {[*STUDY, *EXTRA, 'sft-k', 'effort']}")
    out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    seeds = list(range(args.seeds))
    catalogue = {**STUDY, **EXTRA}

    # The jobs: every sweep point first (their choices apply to every seed), then the study's runs.
    plan: list[tuple[str, Job]] = []
    for name in names:
        if name == "sft-k":
            plan += [("sft-k", Job(f"sft-{k}", s, "configs/demo.yaml", [], supervised_k=k))
                     for s in seeds for k in profile.supervised_k]
            continue
        if name == "effort":
            plan += [("effort", job) for job in effort_jobs(profile, seeds)]
            continue
        _, config, extra = catalogue[name]
        for point in sweep_points(name, profile.sweep[name]) if name in profile.sweep else []:
            tag = "_".join(SHORT.get(o.split("=")[0], o.split("=")[0]) + o.split("=")[1] for o in point)
            plan.append((name, Job(f"{name}@{tag}", 0, config, extra + point + [
                f"loop.num_rounds={profile.sweep_rounds}"], score_test=False, setting=point)))
        plan += [(name, Job(name, s, config, extra, all_reference=name == "sft-ref",
                            folders="all" if name == "illume-sft" else "final")) for s in seeds]
    sweep = [job for _, job in plan if "@" in job.variant]
    rest = [(name, job) for name, job in plan if "@" not in job.variant]
    start = time.perf_counter()
    pool = worker_pool(args.jobs)
    study = Study(out, profile, args.fresh, [job for _, job in plan], pool, args.jobs,
                  record_wall=not args.report_only)
    try:
        if not args.report_only:
            ensure_base_models([job for _, job in plan], out, profile, pool)
        runs = study.run_all([(job, args.report_only) for job in sweep])
        chosen = {}
        for name in dict.fromkeys(name for name, _ in rest):
            if name in profile.sweep:
                choice = choose_setting(name, [r for r in runs if r is not None and r["variant"].startswith(
                    name + "@")])
                if choice is not None:  # None: --report-only before any sweep point finished
                    chosen[name] = choice
        for name, job in rest:
            method = SETTINGS_FROM.get(name, name)
            if method in chosen:
                job.overrides = job.overrides + chosen[method]["overrides"]
        runs += study.run_all([(job, args.report_only or (args.run_seeds is not None and str(job.seed)
                                                          not in args.run_seeds.split(","))) for _, job in rest])
    finally:  # after a failed run: the others under way finish (they would resume anyway), no new one starts
        pool.shutdown(wait=True, cancel_futures=True)
    missing = [job.name for job, run in zip(sweep + [job for _, job in rest], runs)
               if run is None and job.name not in study.failed]
    runs = [run for run in runs if run is not None]
    # The runs' own recorded wall times (summed over invocations when a run was resumed), sweep included; and
    # the study's wall clock, summed over its invocations (less than the runs' sum with several workers).
    minutes = sum(run["seconds"] for run in runs) / 60
    invocation = (time.perf_counter() - start) / 60
    study_minutes = study.wall_minutes()
    print(f"this invocation: {invocation:.1f} min")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, seeds, chosen)
    summary["missing"] = missing
    summary["failed"] = study.failed
    summary["study_wall_minutes"] = study_minutes
    (docs / "study.json").write_text(json.dumps(summary, indent=2))
    write_plots(summary, docs)
    write_markdown(summary, docs / "results.md", quick=args.quick, seeds=seeds, minutes=minutes,
                   command="python scripts/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"{len(runs)} runs in {minutes:.1f} min -> {docs / 'results.md'}")
    if study.failed:
        print(f"{len(study.failed)} runs failed (left out of the docs): {', '.join(study.failed)}")
    return 1 if study.failed else 0


def effort_jobs(profile: Profile, seeds: list[int]) -> list[Job]:
    """The human-effort curve's runs: per share, people's budget per round = share x the round's items (the
    train questions: every round samples each once), at least 1."""
    cfg = load_config(REPO / EFFORT_CONFIG, profile.seed_overrides)
    items = cfg.data.shapes.num_train_scenes
    return [Job(f"effort-{share}", s, EFFORT_CONFIG,
                [*EFFORT_OVERRIDES, f"annotate.budget_per_round={max(1, round(share / 100 * items))}"])
            for share in profile.effort_shares for s in seeds]


def ensure_base_models(jobs: list[Job], out: Path, profile: Profile, pool: ProcessPoolExecutor) -> None:
    """Pre-train the jobs' demo base models when they are not cached (one for all seeds:
    data.shapes.pretrain_seed=0), in a worker, before any run starts: runs starting at once would each pre-train
    the same one."""
    from illume.demo.pretrain import demo_model_dir, ensure_demo_model

    configs = {}
    for job in jobs:
        cfg = load_config(REPO / job.config, profile.seed_overrides + seed_overrides(job.seed) + job.overrides
                          + [f"name={job.name}", f"output_dir={out}"])
        if cfg.model.names_demo_model():
            configs.setdefault(demo_model_dir(cfg), cfg)
    for future in [pool.submit(ensure_demo_model, cfg) for cfg in configs.values()]:
        future.result()


def choose_setting(method: str, sweep_runs: list[dict]) -> dict | None:
    """The sweep point with the best final val CIDEr (seed 0, fewer rounds); None without any."""
    if not sweep_runs:
        return None
    scored = []
    for run in sweep_runs:
        final = _final_round(run["results"])
        scored.append((final["val"].get("cider", -math.inf) if final.get("trained") else -math.inf, run))
    best_score, best = max(scored, key=lambda pair: pair[0])
    return {"setting": " ".join(best["setting"]), "val_cider": best_score, "overrides": best["setting"],
            "tried": {" ".join(run["setting"]): score for score, run in scored}}


def summarise(runs: list[dict], seeds: list[int], chosen: dict) -> dict:
    """Per variant: per-seed test scores, mean +- interval, human effort, wall time; paired tests against
    illume-sft; the data-efficiency table."""
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        if "@" not in run["variant"]:
            by_variant.setdefault(run["variant"], []).append(run)
    variants = {}
    for name, group in by_variant.items():
        group = sorted(group, key=lambda r: r["seed"])
        per_seed = {key: [100 * final_test(r).get(key, math.nan) for r in group] for key, _ in METRICS}
        judgments, written = zip(*(human_effort(r) for r in group))
        variants[name] = {
            "seeds": [r["seed"] for r in group],
            "test": per_seed,
            "interval": {key: _interval(values) for key, values in per_seed.items()},
            "human_judgments": sum(judgments) / len(group), "rationales_written": sum(written) / len(group),
            "minutes": sum(r["seconds"] for r in group) / 60,
            "val_cider": [100 * _final_round(r["results"])["val"].get("cider", math.nan) for r in group],
            "rounds": [sum(1 for x in r["results"][1:] if x.get("trained")) for r in group],
        }
    first = sorted(next(iter(by_variant.values())), key=lambda r: r["seed"]) if by_variant else []
    base = [100 * r["test"]["base"].get("cider", math.nan) for r in first if r["test"]]
    comparisons = ({name: _paired(v, variants["illume-sft"]) for name, v in variants.items()
                    if name != "illume-sft" and name not in ON_HF_DEMO} if "illume-sft" in variants else {})
    comparisons = {name: c for name, c in comparisons.items() if c is not None}
    pairs = {f"{a} vs {b}": _paired(variants[a], variants[b]) for a, b in PAIRS if a in variants and b in variants}
    sweep_minutes = {}
    for run in runs:
        if "@" in run["variant"]:
            method = run["variant"].split("@")[0]
            sweep_minutes[method] = sweep_minutes.get(method, 0.0) + run["seconds"] / 60
    return {"variants": variants, "comparisons": comparisons, "chosen": chosen, "sweep_minutes": sweep_minutes,
            "data_efficiency": data_efficiency(by_variant), "base_test_cider": base,
            "effort": effort_curve(by_variant, variants, comparisons), "rl": rl_curves(by_variant),
            "pairs": {name: c for name, c in pairs.items() if c is not None},
            "descriptions": {**{k: v[0] for k, v in {**STUDY, **EXTRA}.items()}}}


def _paired(v: dict, reference: dict) -> dict | None:
    """Test CIDEr and VQA accuracy of variant `v` minus `reference` on the seeds both ran (a summarised
    variant each): mean difference, its 95 % interval, the paired t-test; None with fewer than 2 common seeds."""
    common = [seed for seed in v["seeds"] if seed in reference["seeds"]]  # pairs: the same seeds
    if len(common) < 2:
        return None
    out = {}
    for key in ("cider", "answer_accuracy"):
        a = [v["test"][key][v["seeds"].index(seed)] for seed in common]
        b = [reference["test"][key][reference["seeds"].index(seed)] for seed in common]
        if any(math.isnan(x) for x in a + b):
            continue
        c = paired_comparison(a, b)
        out[key] = {"difference": c.difference.mean, "half_width": c.difference.half_width, "t": c.t,
                    "p": c.p_value, "significant": c.significant(), "seeds": common}
    return out


def people_share(run: dict) -> float:
    """% of the run's judgments (up to its final model) that people made, as its feedback store counted them
    (results.json's human_judgments and judgments)."""
    final = _final_round(run["results"])
    return 100 * final.get("human_judgments", 0) / max(1, final.get("judgments", 0))


def effort_curve(by_variant: dict[str, list[dict]], variants: dict, comparisons: dict) -> list[dict]:
    """The human-effort curve's points (effort-<share> runs, and illume-sft as people judging everything),
    by nominal share: the share people judged (from the store), test CIDEr, the paired comparison with
    illume-sft."""
    names = sorted((n for n in by_variant if n.startswith("effort-")), key=lambda n: int(n.split("-")[1]))
    if not names:
        return []
    points = []
    for name in [*names, "illume-sft"]:
        if name not in by_variant:
            continue
        group = sorted(by_variant[name], key=lambda r: r["seed"])
        shares = [people_share(r) for r in group]
        points.append({"variant": name, "nominal": 100 if name == "illume-sft" else int(name.split("-")[1]),
                       "share": sum(shares) / len(shares), "share_per_seed": shares,
                       "judgments": variants[name]["human_judgments"], "seeds": variants[name]["seeds"],
                       "cider": variants[name]["interval"]["cider"], "per_seed": variants[name]["test"]["cider"],
                       "vs_people": comparisons.get(name, {}).get("cider")})
    return points


def rl_curves(by_variant: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """Per online-RL variant (its rounds report grpo_reward) and seed, each round's mean reward of the samples
    it trained on and the simulated critic's acceptance of the same samples: a reward that rises while
    acceptance does not is the reward model being gamed, not the policy getting better."""
    curves = {}
    for name, group in by_variant.items():
        per_seed = {str(run["seed"]): [{"round": row["round"], "reward": row["grpo_reward"],
                                        "accept": 100 * row["grpo_accept"]}
                                       for row in run["results"][1:] if row.get("grpo_reward") is not None
                                       and row.get("grpo_accept") is not None]
                    for run in sorted(group, key=lambda r: r["seed"])}
        if any(per_seed.values()):
            curves[name] = per_seed
    return curves


def _interval(values: list[float]) -> dict:
    if any(math.isnan(v) for v in values):
        return {"mean": math.nan, "half_width": math.nan}
    i = mean_interval(values)
    return {"mean": i.mean, "half_width": i.half_width}


def data_efficiency(by_variant: dict[str, list[dict]]) -> dict:
    """ILLUME's rounds against the supervised curve: test CIDEr per round and per k, and the k whose
    supervised score each round matches (log-linear interpolation on the mean curve)."""
    curve = {}
    for name, group in by_variant.items():
        if name.startswith("sft-") and name[4:].isdigit():
            curve[int(name[4:])] = [100 * final_test(r)["cider"] for r in sorted(group, key=lambda r: r["seed"])]
    illume = sorted(by_variant.get("illume-sft", []), key=lambda r: r["seed"])
    rounds = []
    if illume:
        trained = [r["round"] for r in illume[0]["results"][1:] if r.get("trained")]
        for round_idx in trained:
            if not all(str(round_idx) in r["test"] for r in illume):
                continue
            values = [100 * r["test"][str(round_idx)]["cider"] for r in illume]
            judgments = [next(x for x in r["results"][1:] if x["round"] == round_idx)["human_judgments"]
                         for r in illume]
            mean = sum(values) / len(values)
            rounds.append({"round": round_idx, "cider": _interval(values), "per_seed": values,
                           "judgments": sum(judgments) / len(judgments), "matched_k": match_k(mean, curve)})
    return {"curve": {k: {"cider": _interval(v), "per_seed": v} for k, v in sorted(curve.items())},
            "rounds": rounds}


def match_k(score: float, curve: dict[int, list[float]]) -> str:
    """The k of supervised rationales whose mean test CIDEr equals `score`: interpolated in log k between
    the two points that bracket it (the first crossing), or "< k_min" / "> k_max" outside the curve."""
    if not curve:
        return "-"
    points = sorted((k, sum(v) / len(v)) for k, v in curve.items())
    if score < points[0][1]:
        return f"< {points[0][0]}"
    for (k0, s0), (k1, s1) in zip(points, points[1:]):
        if s0 <= score <= s1 and s1 > s0:
            fraction = (score - s0) / (s1 - s0)
            return f"{math.exp(math.log(k0) + fraction * (math.log(k1) - math.log(k0))):.0f}"
    if score >= max(s for _, s in points):
        return f">= {points[-1][0]}" if score == points[-1][1] else f"> {points[-1][0]}"
    return f"~{min(points, key=lambda p: abs(p[1] - score))[0]}"  # the curve is not monotone around it


def _cell(interval: dict) -> str:
    if math.isnan(interval["mean"]):
        return "-"
    return f"{interval['mean']:.1f} ± {interval['half_width']:.1f}"


def write_markdown(summary: dict, path: Path, quick: bool, seeds: list[int], minutes: float, command: str) -> None:
    variants, comparisons = summary["variants"], summary["comparisons"]
    lines = [
        "# The study: selection-SFT, preference optimisation, online RL, AI feedback, supervised data and the "
        "human-effort curve",
        "",
        f"Written by `{command}` ({minutes:.0f} min: the wall times of all its runs, sweep and test "
        "scoring included, on the development machine, 2 CPU cores, no GPU; "
        f"{summary.get('study_wall_minutes', minutes):.0f} min of wall clock over the study's invocations, "
        "less than the runs' sum where --jobs ran them side by side)"
        + (" — the --quick profile: a tiny model and world, numbers mean nothing." if quick
           else ". The demo world: 400 train / 100 val / 500 test questions per seed, the cached demo base model."),
        "",
        f"Seeds {', '.join(map(str, seeds))}: seed s changes the world's questions (train, val and test) and every "
        "sampling, training and reward seed; the pre-trained base model is the same for all. Every epoch and "
        "every setting was chosen on **val**; the scores below are on the **test** split, which none of those "
        "choices saw. Scores x100 of each run's final model (its last trained round, the epoch kept on val), "
        "mean ± half-width of the 95 % t-interval over seeds (t with n - 1 degrees of freedom: with "
        f"{len(seeds)} seeds the half-width is {t_quantile(0.975, len(seeds) - 1) / math.sqrt(len(seeds)):.2f} "
        "standard deviations of the per-seed scores, so the intervals are wide).",
        "",
        "*VQA acc.*: the VQA answer accuracy; *Q/A acc. (ILLUME)*: ILLUME's notebook metric, predicted and "
        "reference answer contain one another (the paper's official VQA-X test figures are B-4 19.0, METEOR "
        "16.5, ROUGE-L 44.2, CIDEr 60.2, Q/A acc 85.5, read this way). *Human effort*: selection judgments by "
        "people (the simulated critic stands in for them; one judgment = one question's candidates looked at "
        "and the fitting ones clicked) or rationales written by people (supervised rows).",
        "",
        "| variant | " + " | ".join(label for _, label in METRICS) + " | human effort | rounds | wall time |",
        "|---|" + "---:|" * (len(METRICS) + 3),
    ]
    for name, v in variants.items():
        effort = (f"{v['rationales_written']:.0f} written" if v["rationales_written"]
                  else f"{v['human_judgments']:.0f} judgments" if v["human_judgments"] else "none")
        description = summary["descriptions"].get(name, _generated_description(name))
        lines.append(f"| **{name}**: {description} | " + " | ".join(_cell(v["interval"][k]) for k, _ in METRICS)
                     + f" | {effort} | {'/'.join(map(str, v['rounds']))} | {v['minutes']:.1f} min |")
    if summary.get("failed"):
        lines += ["", f"**Failed** ({len(summary['failed'])} runs, left out above): "
                  + "; ".join(f"{name}: {error}" for name, error in summary["failed"].items()) + "."]
    if summary.get("missing"):
        lines += ["", f"**Not finished when this was written** ({len(summary['missing'])} runs, left out above): "
                  + ", ".join(summary["missing"]) + "."]
    lines += ["", "Wall time: all seeds of the variant, the runs and their test scoring; the sweep is listed below.",
              "", "![test CIDEr per variant](compare_cider.png)", ""]
    if comparisons:
        lines += ["## Paired comparisons against ILLUME's selection-SFT (same seeds)", "",
                  "Difference (variant − illume-sft) of test scores x100, mean over seeds ± 95 % interval, paired "
                  "t-test on the per-seed differences. *real* marks p < 0.05 (no correction for the number of "
                  "comparisons: with that many tests one false alarm in twenty is expected).", "",
                  "| variant | Δ CIDEr | p | real? | Δ VQA acc. | p | real? |",
                  "|---|---:|---:|:---:|---:|---:|:---:|"]
        lines += [f"| {name} | " + " | ".join(_paired_cells(by_key)) + " |" for name, by_key in comparisons.items()
                  if not name.startswith("effort-")]  # (the effort points: in the human-effort curve's table)
        lines.append("")
    if summary.get("pairs"):
        lines += ["## Other paired comparisons (same seeds)", "",
                  "As above, variant − the other: GRPO against DPO on the same judgments (dpo-rm: people in round 0, "
                  "then the reward model, as GRPO's reward) and against DPO with people every round, the two "
                  "AI-feedback rows, and on the HF demo GRPO by our trainer and by TRL's GRPOTrainer (same settings, "
                  "same round-0 judgments) against each other and selection-SFT.", "",
                  "| comparison | Δ CIDEr | p | real? | Δ VQA acc. | p | real? |",
                  "|---|---:|---:|:---:|---:|---:|:---:|"]
        lines += [f"| {name} | " + " | ".join(_paired_cells(by_key)) + " |"
                  for name, by_key in summary["pairs"].items()]
        lines.append("")
    lines += _effort_lines(summary["effort"])
    lines += _rl_lines(summary.get("rl", {}))
    eff = summary["data_efficiency"]
    if eff["rounds"] or eff["curve"]:
        lines += ["## Data efficiency: ILLUME's rounds against SFT on k written rationales", "",
                  "The paper's claim: ILLUME reaches supervised fine-tuning's scores with far fewer human-written "
                  "rationales. Supervised rows: one reference explanation for each of k train questions (a person "
                  "writing one rationale per question), the rest of the train questions as answer-only rows, the "
                  "same trainer and weighting as selection-SFT, as many epochs as the loop's rounds together "
                  "(best on val). Test CIDEr x100, mean ± 95 % interval.", "",
                  "| supervised k (rationales written) | test CIDEr |", "|---:|---:|"]
        for k, point in eff["curve"].items():
            lines.append(f"| {k} | {_cell(point['cider'])} |")
        lines += ["", "| ILLUME round | test CIDEr | selection judgments (clicks) by people | ≈ SFT on k questions |",
                  "|---:|---:|---:|---:|"]
        for r in eff["rounds"]:
            lines.append(f"| {r['round']} | {_cell(r['cider'])} | {r['judgments']:.0f} (0 written) | "
                         f"{r['matched_k']} |")
        lines += ["", "*≈ SFT on k questions*: the k at which the mean supervised curve reaches the round's mean "
                  "test CIDEr, interpolated in log k between the two points that bracket it.", "",
                  "![data efficiency](data_efficiency.png)", ""]
    if summary["chosen"]:
        lines += ["## Settings chosen on val", "",
                  "A small sweep per method on seed 0 (fewer rounds than the study), the setting with the best "
                  "final val CIDEr used for every seed:", ""]
        for method, choice in summary["chosen"].items():
            tried = ", ".join(f"{setting}: {score:.1f}" for setting, score in
                              ((s, 100 * c if math.isfinite(c) else math.nan) for s, c in choice["tried"].items()))
            lines.append(f"- {method}: **{choice['setting']}** (tried, final val CIDEr: {tried}; "
                         f"{summary['sweep_minutes'].get(method, 0):.1f} min)")
        lines.append("")
    lines += ["Raw per-seed numbers: `study.json`. Base model on test, per seed: "
              + ", ".join(f"{x:.1f}" for x in summary["base_test_cider"]) + " CIDEr.", ""]
    path.write_text("\n".join(lines))


def _effort_lines(points: list[dict]) -> list[str]:
    if not points:
        return []
    lines = ["## The human-effort curve: test CIDEr against people's share of the judgments", "",
             "The hybrid critic (`configs/demo_hybrid.yaml`) with `reward.people_rounds=0`, "
             "`annotate.order=uncertainty` and `annotate.budget_per_round` = the share x the round's items (its "
             "train questions): in round 0 people judge a seeded random draw of that many items and a reward model "
             "fitted on those judgments decides the rest (when those are all rejected, people judge the draw's next "
             "budget's worth until a model can be fitted); from round 1 on people judge the items the reward model "
             "(refitted on all of people's judgments so far) is least sure of (its ensemble's disagreement) and it "
             "decides the others, its accepts counted only in rounds where its threshold reached the target "
             "precision on held-out judgments (`reward.below_target=reject`). *Share by people*: people's "
             "judgments / all judgments of the run up to its final model, counted in its feedback store (mean "
             "over seeds, and per seed), not the nominal budget. "
             "100 %: illume-sft (people judge every item of every round). Test CIDEr x100, mean ± 95 % interval; "
             "Δ: paired against illume-sft on the same seeds (p of the paired t-test).", "",
             "| nominal share | share by people (store) | per seed | people's judgments | test CIDEr | "
             "Δ CIDEr vs illume-sft | p | real? |", "|---:|---:|---|---:|---:|---:|---:|:---:|"]
    for point in points:
        c = point["vs_people"]
        versus = (["-", "-", "-"] if c is None else
                  [f"{c['difference']:+.1f} ± {c['half_width']:.1f}", f"{c['p']:.3f}",
                   "yes" if c["significant"] else "no"])
        label = f"{point['nominal']} %" + (" (illume-sft)" if point["variant"] == "illume-sft" else "")
        lines.append(f"| {label} | {point['share']:.1f} % | "
                     + " / ".join(f"{x:.1f}" for x in point["share_per_seed"])
                     + f" | {point['judgments']:.0f} | {_cell(point['cider'])} | " + " | ".join(versus) + " |")
    return lines + ["", "![human-effort curve](effort_curve.png)", ""]


def _paired_cells(by_key: dict) -> list[str]:
    cells = []
    for key in ("cider", "answer_accuracy"):
        c = by_key.get(key)
        cells += (["-", "-", "-"] if c is None else
                  [f"{c['difference']:+.1f} ± {c['half_width']:.1f}", f"{c['p']:.3f}",
                   "yes" if c["significant"] else "no"])
    return cells


def _rl_lines(curves: dict[str, dict[str, list[dict]]]) -> list[str]:
    if not curves:
        return []
    lines = ["## Online RL: the reward model's score against people's acceptance, per round and seed", "",
             "Per GRPO round: the mean reward-model score of the samples it trained on (*reward*) and the share of "
             "those samples the simulated critic (people) accepts (*accepted %*). Rising reward with flat or "
             "falling acceptance is the policy gaming the reward model.", "",
             "| variant | seed | reward per round | accepted % per round |", "|---|---:|---|---|"]
    for name, per_seed in curves.items():
        for seed, rows in per_seed.items():
            lines.append(f"| {name} | {seed} | " + " / ".join(f"{r['reward']:+.2f}" for r in rows) + " | "
                         + " / ".join(f"{r['accept']:.0f}" for r in rows) + " |")
    return lines + ["", "![reward against acceptance](rl_reward_accept.png)", ""]


def _generated_description(name: str) -> str:
    if name.startswith("effort-"):
        critic = " — the study's budget critic" if name == f"effort-{CRITIC_SHARE}" else ""
        return (f"people judge {name[7:]} % of each round's items (round 0 too; the ones the reward model is least "
                f"sure of), the reward model the rest, its accepts only where it reached the target precision{critic}")
    return f"SFT on one written rationale for each of {name[4:]} train questions"


def write_plots(summary: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    names = list(variants)
    means = [variants[n]["interval"]["cider"]["mean"] for n in names]
    errors = [variants[n]["interval"]["cider"]["half_width"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4.5))
    colours = ["tab:blue" if not n.startswith("sft-") else "tab:grey" for n in names]
    ax.bar(range(len(names)), means, yerr=errors, capsize=4, color=colours)
    for i, name in enumerate(names):
        ax.scatter([i] * len(variants[name]["test"]["cider"]), variants[name]["test"]["cider"], color="black",
                   s=8, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylabel("test CIDEr (x100)")
    ax.set_title("Final test CIDEr: mean, 95 % interval, each seed")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs / "compare_cider.png", dpi=120)
    plt.close(fig)

    if summary["effort"]:
        _plot_effort(summary["effort"], docs / "effort_curve.png")
    if summary.get("rl"):
        _plot_rl(summary["rl"], docs / "rl_reward_accept.png")
    eff = summary["data_efficiency"]
    if not (eff["curve"] and eff["rounds"]):
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = list(eff["curve"])
    ax.errorbar([int(k) for k in ks], [eff["curve"][k]["cider"]["mean"] for k in ks],
                yerr=[eff["curve"][k]["cider"]["half_width"] for k in ks], marker="s", capsize=4,
                label="SFT: x = rationales written")
    ax.errorbar([max(1, r["judgments"]) for r in eff["rounds"]], [r["cider"]["mean"] for r in eff["rounds"]],
                yerr=[r["cider"]["half_width"] for r in eff["rounds"]], marker="o", capsize=4,
                label="ILLUME rounds: x = selection judgments (clicks)")
    for r in eff["rounds"]:
        ax.annotate(f"round {r['round']}", (max(1, r["judgments"]), r["cider"]["mean"]), fontsize=8,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log")
    ax.set_xlabel("human actions (log scale; a written rationale costs far more than a click)")
    ax.set_ylabel("test CIDEr (x100)")
    ax.set_title("Data efficiency: ILLUME vs supervised rationales (mean, 95 % interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "data_efficiency.png", dpi=120)
    plt.close(fig)


def _plot_effort(points: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar([p["share"] for p in points], [p["cider"]["mean"] for p in points],
                yerr=[p["cider"]["half_width"] for p in points], marker="o", capsize=4,
                label="hybrid critic on a budget; 100 %: people every round (illume-sft)")
    for p in points:
        ax.scatter([p["share"]] * len(p["per_seed"]), p["per_seed"], color="black", s=8, zorder=3)
    people = next((p for p in points if p["variant"] == "illume-sft"), None)
    if people is not None and math.isfinite(people["cider"]["mean"]):
        ax.axhline(people["cider"]["mean"], color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ticks = sorted({p["nominal"] for p in points})
    ax.set_xticks(ticks, [f"{t} %" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("share of the judgments made by people (counted in the store; log scale)")
    ax.set_ylabel("test CIDEr (x100)")
    ax.set_title("Human-effort curve: mean, 95 % interval, each seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rl(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.2), squeeze=False)
    for ax, (name, per_seed) in zip(axes[0], curves.items()):
        for seed, rows in per_seed.items():
            ax.plot([r["reward"] for r in rows], [r["accept"] for r in rows], marker="o", label=f"seed {seed}")
            if rows:
                ax.annotate(f"r{rows[0]['round']}", (rows[0]["reward"], rows[0]["accept"]), fontsize=7)
                ax.annotate(f"r{rows[-1]['round']}", (rows[-1]["reward"], rows[-1]["accept"]), fontsize=7)
        ax.set_xlabel("mean reward-model score of the round's samples")
        ax.set_ylabel("accepted by the simulated critic (%)")
        ax.set_title(f"{name}: rounds, per seed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
