"""Choosing what people see, measured on the demo: the hybrid critic's band rule against a fixed budget of
items per round for people, chosen in random order or by the reward model's uncertainty.

    python scripts/compare_critique_order.py --run --seeds 0            # band rule, then the two budget runs
    python scripts/compare_critique_order.py --band-dir runs/study --seeds 0   # reuse the study's band runs

Per seed (scripts/compare.py `seed_overrides`; the study's data.shapes.num_test_scenes=500 too, so that a band
run of the study is the same run):
1. `band`: configs/demo_hybrid.yaml as it is (reward.hybrid_band). Its people-judged items per round from
   reward.people_rounds on set the budget N = their mean, rounded (or --budget N).
2. `budgetN-random` and `budgetN-uncertainty`: the same with annotate.budget_per_round=N and annotate.order=
   random | uncertainty (reward.uncertainty=ensemble, its default), so people judge (about) as many items.
Then it prints a markdown table: val CIDEr per round and final, judgments by people (total and per round) and,
for the budget runs, the share of people's items where the reward model would have decided otherwise than
the simulated critic (`people_items_rm_wrong`: whether the order found the model's mistakes).

Runs are single-threaded (OMP_NUM_THREADS=1) and reused: `illume run` on a finished run directory only reads
it, on an interrupted one it continues. --jobs 2 runs the two budget runs side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from illume.config import load_run_config  # noqa: E402  (after the repository is on the path)

ORDERS = ("random", "uncertainty")


def seed_overrides(seed: int) -> list[str]:
    """scripts/compare.py's seeds (one rule, read from there) plus its test split size."""
    spec = importlib.util.spec_from_file_location("compare", REPO / "scripts" / "compare.py")
    compare = sys.modules.setdefault("compare", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(compare)  # (registered first: its dataclasses look their module up)
    return [*compare.seed_overrides(seed), "data.shapes.num_test_scenes=500"]


def command(out: Path, name: str, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "illume.cli", "run", str(REPO / "configs" / "demo_hybrid.yaml"),
            f"output_dir={out}", f"name={name}", *seed_overrides(seed), *extra]


def run_all(commands: list[list[str]], jobs: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            cmd = pending.pop(0)
            name = next(a for a in cmd if a.startswith("name=")).split("=", 1)[1]
            print(" ".join(cmd[1:]), flush=True)
            log = open(out / f"{name}.log", "w")
            running.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
        process, log = running.pop(0)
        if process.wait() != 0:
            raise SystemExit(f"{' '.join(process.args)} failed; see {log.name}")
        log.close()


def people_per_round(results: list[dict]) -> list[int]:
    """Judgments by people in each round (results.json's human_judgments is cumulative)."""
    rounds = [row for row in results if row["round"] != "base"]
    totals = [row["human_judgments"] for row in rounds]
    return [b - a for a, b in zip([0, *totals], totals)]


def row(variant: str, seed: int, run_dir: Path) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    rounds = [r for r in results if r["round"] != "base"]
    cider = " / ".join(f"{100 * r['val']['cider']:.1f}" for r in rounds)
    wrong = " / ".join("-" if r.get("people_items_rm_wrong") is None else f"{100 * r['people_items_rm_wrong']:.0f}"
                       for r in rounds)
    precision = " / ".join("-" if r.get("rm_precision_vs_simulated") is None
                           else f"{100 * r['rm_precision_vs_simulated']:.0f}" for r in rounds)
    return (f"| {variant} | {seed} | {100 * rounds[-1]['val']['cider']:.1f} | {cider} | {rounds[-1]['human_judgments']} "
            f"| {' / '.join(map(str, people_per_round(results)))} | {wrong} | {precision} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "critique_order")
    parser.add_argument("--band-dir", type=Path, help="a folder with the band runs as hybrid__seed<s> (the study's)")
    parser.add_argument("--budget", type=int, help="items per round for people (default: the band run's mean)")
    parser.add_argument("--run", action="store_true", help="run what is missing (else: report only)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| variant | seed | final val CIDEr | val CIDEr per round | judgments by people | per round "
             "| people's items the RM got wrong % | RM precision vs simulated % |", "|" + "---|" * 8]
    for seed in args.seeds:
        band_dir = args.band_dir / f"hybrid__seed{seed}" if args.band_dir else args.out / f"band__seed{seed}"
        if args.run and not args.band_dir:  # a finished run is only read again (`illume run` resumes)
            run_all([command(band_dir.parent, band_dir.name, seed, [])], 1, args.out)
        band = json.loads((band_dir / "results.json").read_text())
        first = load_run_config(band_dir / "config.yaml").reward.people_rounds  # the rounds all judged by people
        per_round = people_per_round(band)[first:]
        budget = args.budget if args.budget is not None else round(sum(per_round) / len(per_round))
        names = {order: f"budget{budget}-{order}__seed{seed}" for order in ORDERS}
        if args.run:
            run_all([command(args.out, names[order], seed,
                             [f"annotate.budget_per_round={budget}", f"annotate.order={order}"])
                     for order in ORDERS], args.jobs, args.out)
        lines.append(row("band (reward.hybrid_band=1.0)", seed, band_dir))
        for order in ORDERS:
            if (args.out / names[order] / "results.json").is_file():
                lines.append(row(f"budget {budget}, order {order}", seed, args.out / names[order]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
