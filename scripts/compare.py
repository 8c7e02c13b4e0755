"""Which makes better use of the same human feedback: ILLUME's selection-SFT or preference optimisation?

Runs the study's variants, and three variants of (c)/(d), on the demo world with the same seeds,
sampling, critic and epoch budgets, and writes
docs/results.md (a table of final val scores, human judgments and training rationales used, wall time) and
docs/compare_cider.png (val CIDEr against human judgments used, per round):

    (a) illume-sft   ILLUME selection-SFT, simulated critic          configs/demo.yaml
    (b) illume-rm    ILLUME with the reward-model critic             configs/demo_reward.yaml
    (c) dpo          iterative DPO on accepted vs rejected pairs     configs/demo_dpo.yaml
    (d) kto          iterative KTO on accept/reject labels           configs/demo_kto.yaml
    (e) sft-ref      SFT on every reference explanation (fully supervised; no critique)
    (f) grpo         online GRPO with the reward model fitted on round 0's judgments  configs/demo_grpo.yaml
    (g) rlaif        no people: an AI judge labels, the reward model learns from it   configs/demo_rlaif.yaml
        grpo-sft           (f) + an NLL term on every rationale accepted so far (policy.sft_weight=1.0)
    (h) silkie       no people: a pool of the policy's earlier rounds, AI-judged, DPO configs/demo_silkie.yaml
        dpo-all, kto-all   (c), (d) on the judgments of every round so far (policy.rounds=all), as SFT uses
                           them; (c) and (d) use only the round just judged (on-policy: policy.rounds=latest)
        dpo-nll            (c) + an NLL term on the chosen rationale (policy.sft_weight=1.0, RPO)

    python scripts/compare.py [--out runs/compare] [--only dpo,kto] [--fresh]

A finished variant (RUN_DIR/wall_seconds.json says complete) is not run again: its results and wall time are
reused, so adding a variant costs only that variant. An interrupted one continues from its finished rounds
(the loop resumes) and its wall time is summed over invocations. --fresh starts every variant over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from illume.config import load_config  # noqa: E402

VARIANTS = {
    "illume-sft": ("ILLUME selection-SFT, simulated critic", "configs/demo.yaml", []),
    "illume-rm": ("ILLUME, reward-model critic after round 0", "configs/demo_reward.yaml", []),
    "dpo": ("iterative DPO on the latest round's accepted vs rejected pairs", "configs/demo_dpo.yaml", []),
    "kto": ("iterative KTO on the latest round's accept/reject labels", "configs/demo_kto.yaml", []),
    "dpo-all": ("iterative DPO on the pairs of every round so far", "configs/demo_dpo.yaml",
                ["policy.rounds=all"]),
    "kto-all": ("iterative KTO on the labels of every round so far", "configs/demo_kto.yaml",
                ["policy.rounds=all"]),
    "dpo-nll": ("iterative DPO + NLL on the chosen rationale (RPO)", "configs/demo_dpo.yaml",
                ["policy.sft_weight=1.0"]),
    "sft-ref": ("SFT on all reference explanations (no critique)", "configs/demo.yaml", []),
    "grpo": ("online GRPO with the reward model fitted on round 0's human judgments", "configs/demo_grpo.yaml",
             []),
    "grpo-sft": ("online GRPO as (f) + NLL on every rationale accepted so far (policy.sft_weight=1.0)",
                 "configs/demo_grpo.yaml", ["policy.sft_weight=1.0"]),
    "rlaif": ("no people: an AI judge labels, the reward model learns from it", "configs/demo_rlaif.yaml", []),
    "silkie": ("no people: a pool of the policy's earlier rounds, AI-judged pairs, DPO", "configs/demo_silkie.yaml",
               []),
}
METRICS = (("bleu_4", "B-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"),
           ("answer_accuracy", "answer acc."))


def run_variant(name: str, out: Path, fresh: bool) -> dict:
    from illume.loop import run
    from illume.supervised import run_supervised

    _, config, extra = VARIANTS[name]
    cfg = load_config(REPO / config, extra + [f"name={name}", f"output_dir={out}"])
    if fresh and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    wall_path = cfg.run_dir / "wall_seconds.json"
    wall = json.loads(wall_path.read_text()) if wall_path.is_file() else {"seconds": 0.0}
    if wall.get("complete"):
        results = json.loads((cfg.run_dir / "results.json").read_text())
        return {"name": name, "results": results, "seconds": wall["seconds"]}
    start = time.perf_counter()
    results = run_supervised(cfg) if name == "sft-ref" else run(cfg)
    seconds = wall["seconds"] + time.perf_counter() - start
    wall_path.write_text(json.dumps({"seconds": seconds, "complete": True}))
    return {"name": name, "results": results, "seconds": seconds}


def _final(results: list[dict]) -> dict:
    trained = [r for r in results[1:] if r.get("trained")]
    return trained[-1] if trained else results[0]


def write_table(runs: list[dict], path: Path, plot_name: str) -> None:
    lines = [
        "# Selection-SFT vs preference optimisation on the same feedback",
        "",
        "Written by `python scripts/compare.py` (demo world, 400 train / 100 val questions, the cached demo base "
        "model, 2 CPU cores). Val scores x100 of the final model (the last trained round, its best epoch); "
        "*human judgments* = judgments by the critic that stands in for people (the reward model's own are not "
        "counted); *training rationales* = distinct rationales the last round trained on (SFT: accepted ones; "
        "DPO: in its pairs, chosen or rejected; KTO: judged ones; sft-ref: the reference explanations).",
        "",
        "| variant | " + " | ".join(label for _, label in METRICS)
        + " | best CIDEr (round) | human judgments | training rationales | rounds | wall time |",
        "|---|" + "---:|" * (len(METRICS) + 5),
    ]
    for run in runs:
        final = _final(run["results"])
        scores = " | ".join(f"{100 * final['val'][key]:.1f}" if final["val"].get(key) is not None else "-"
                            for key, _ in METRICS)
        rounds = sum(1 for r in run["results"][1:] if r.get("trained"))
        best = max((r for r in run["results"][1:] if r.get("trained")), key=lambda r: r["val"]["cider"])
        lines.append(f"| {run['name']}: {VARIANTS[run['name']][0]} | {scores} "
                     f"| {100 * best['val']['cider']:.1f} ({best['round']}) | {final.get('human_judgments', 0)} "
                     f"| {final.get('train_rationales', '-')} | {rounds} | {run['seconds'] / 60:.1f} min |")
    base = runs[0]["results"][0]["val"]
    total = sum(run["seconds"] for run in runs) / 60
    lines += ["", f"Wall time of all variants: {total:.1f} min.", "", "Base model (before any round): " + ", ".join(
        f"{label} {100 * base[key]:.1f}" for key, label in METRICS if base.get(key) is not None) + ".", "",
        f"![val CIDEr against human judgments]({plot_name})", "", "Per round (val CIDEr x100, human judgments):", ""]
    for run in runs:
        steps = [f"{r['round']}: {100 * r['val']['cider']:.1f} ({r.get('human_judgments', 0)})"
                 for r in run["results"] if r.get("val", {}).get("cider") is not None]
        lines.append(f"- {run['name']}: " + ", ".join(steps))
    path.write_text("\n".join(lines) + "\n")


def write_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = 0.0
    reference = None
    for run in runs:
        rows = [r for r in run["results"] if r.get("val", {}).get("cider") is not None]
        if run["name"] == "sft-ref":
            reference = rows[-1]
            continue
        xs = [0 if r["round"] == "base" else r.get("human_judgments", 0) for r in rows]
        ys = [100 * r["val"]["cider"] for r in rows]
        top = max(top, *ys)
        ax.plot(xs, ys, marker="o", label=run["name"])
    if reference is not None:  # far above the loop's scores on this templated world: a note, not a line
        ax.text(0.01, 0.98, f"sft-ref (SFT on all {reference['train_rationales']} reference explanations, "
                f"no judgments): CIDEr {100 * reference['val']['cider']:.1f}, above this scale",
                transform=ax.transAxes, va="top", fontsize=8, color="dimgrey")
        top *= 1.12  # room for the note
    ax.set_ylim(bottom=0, top=top * 1.05 if top else None)
    ax.set_xlabel("human judgments used (cumulative)")
    ax.set_ylabel("val CIDEr (x100)")
    ax.set_title("Same feedback, different optimisers (demo world)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare", help="parent folder of the variants' run directories")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants to run")
    parser.add_argument("--fresh", action="store_true", help="delete the variants' run directories first")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results.md and the plot go")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    start = time.perf_counter()
    runs = [run_variant(name, Path(args.out), args.fresh) for name in names]
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_plot(runs, docs / "compare_cider.png")
    write_table(runs, docs / "results.md", "compare_cider.png")
    print(f"{len(runs)} variants in {(time.perf_counter() - start) / 60:.1f} min -> {docs / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
