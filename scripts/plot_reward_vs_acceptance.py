"""Is an online-RL run learning or gaming its reward? Plot the reward model's mean score of each round's
samples against the share of them the simulated critic (or people) would accept, and val CIDEr.

    python scripts/plot_reward_vs_acceptance.py runs/demo_grpo [--out docs/grpo_reward_vs_acceptance.png]

Reads RUN_DIR/results.json (`grpo_reward`, `grpo_accept`, `grpo_kl` per round, written by policy.kind=grpo).
A reward that rises while acceptance falls is the policy exploiting the reward model; the title says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def gaming_rounds(rows: list[dict]) -> list[int]:
    """Rounds whose mean reward rose while the acceptance of the same samples fell, versus the round before."""
    flagged = []
    for before, after in zip(rows, rows[1:]):
        if after["grpo_reward"] > before["grpo_reward"] and after["grpo_accept"] < before["grpo_accept"]:
            flagged.append(after["round"])
    return flagged


def plot(run_dir: Path, out: Path) -> list[int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((run_dir / "results.json").read_text())
    rows = [r for r in results[1:] if r.get("grpo_reward") is not None and r.get("grpo_accept") is not None]
    if not rows:
        raise SystemExit(f"{run_dir / 'results.json'} has no GRPO rounds (grpo_reward / grpo_accept)")
    rounds = [r["round"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, [r["grpo_reward"] for r in rows], marker="o", color="tab:blue", label="reward (RM mean)")
    left.set_xlabel("round")
    left.set_xticks(rounds)
    left.set_ylabel("mean reward of the round's samples", color="tab:blue")
    accept = left.twinx()
    accept.plot(rounds, [100 * r["grpo_accept"] for r in rows], marker="s", color="tab:orange",
                label="accepted by the simulated critic")
    accept.set_ylabel("samples the simulated critic accepts (%)", color="tab:orange")
    right.plot(["base", *rounds], [100 * results[0]["val"]["cider"], *(100 * r["val"]["cider"] for r in rows)],
               marker="o", color="tab:green")
    right.set_xlabel("round")
    right.set_ylabel("val CIDEr (x100)")
    flagged = gaming_rounds(rows)
    verdict = (f"reward up, acceptance down in round(s) {flagged}: the reward model is being gamed" if flagged
               else "reward and acceptance move together: no sign of reward hacking")
    fig.suptitle(f"{run_dir.name}: {verdict}", fontsize=10)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return flagged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/reward_vs_acceptance.png)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "reward_vs_acceptance.png"
    flagged = plot(args.run_dir, out)
    print(f"{out}" + (f" (reward up, acceptance down in rounds {flagged})" if flagged else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
