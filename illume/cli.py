"""The `illume` command.

    illume run configs/demo.yaml [key=value ...]      run (or continue) the ILLUME rounds
    illume pretrain configs/demo.yaml                 pre-train (and cache) the demo base model
    illume baseline configs/demo.yaml [key=value ...] how well the base model answers and rationalises

Every command takes a config file and `key.sub=value` overrides, and writes the resolved config into the run
directory (output_dir/name) before anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from illume.config import ConfigError, RunConfig, load_config, save_config


def _load(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config, args.overrides)
    save_config(cfg, cfg.run_dir / "config.yaml")
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from illume.loop import run

    run(_load(args))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from illume.pretrain import demo_model_dir, pretrain_demo_model

    cfg = _load(args)
    directory = demo_model_dir(cfg)
    if (directory / "config.json").is_file() and not args.force:
        print(f"demo base model already cached at {directory} (use --force to pre-train again)")
        return 0
    start = time.perf_counter()
    directory = pretrain_demo_model(cfg, directory)
    print(f"pre-trained the demo base model in {time.perf_counter() - start:.0f} s -> {directory}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from illume.data.datasets import load_split
    from illume.evaluation import explanation_scores, rationale_pass_rate
    from illume.models.loading import load_vlm
    from illume.sampling import sample

    cfg = _load(args)
    vlm = load_vlm(cfg)
    train, val = load_split(cfg.data, "train"), load_split(cfg.data, "val")
    start = time.perf_counter()
    train_sets = sample(vlm, train, cfg.sample, use_reference_answer=True)
    val_sets = sample(vlm, val, cfg.sample, use_reference_answer=False)
    sampling_seconds = time.perf_counter() - start
    k = len(cfg.sample.temperatures) * cfg.sample.samples_per_temperature
    report = {
        "num_train": len(train), "num_val": len(val), "samples_per_example": k,
        "train_rationale_pass_rate": rationale_pass_rate(train_sets, train, args.threshold),
        "val_rationale_pass_rate": rationale_pass_rate(val_sets, val, args.threshold),
        "train_answer_accuracy": sum(cs.predicted_answer == e.answer for cs, e in zip(train_sets, train)) / len(train),
        "mean_distinct_candidates": sum(len(cs.candidates) for cs in train_sets) / len(train_sets),
        "sampling_seconds": round(sampling_seconds, 1),
        "val": explanation_scores(vlm, val, cfg.sample),
        "threshold": args.threshold,
    }
    (cfg.run_dir / "baseline.json").write_text(json.dumps(report, indent=2))
    table = Table(title=f"Base model ({len(train)} train / {len(val)} val questions, {k} samples each)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"train questions with a rationale at ROUGE-L >= {args.threshold}",
                  f"{100 * report['train_rationale_pass_rate']:.1f}%")
    table.add_row(f"val questions with a rationale at ROUGE-L >= {args.threshold}",
                  f"{100 * report['val_rationale_pass_rate']:.1f}%")
    table.add_row("distinct candidates per train question", f"{report['mean_distinct_candidates']:.1f}")
    for key, value in report["val"].items():
        table.add_row(f"val {key}", f"{100 * value:.1f}" if key != "cider" else f"{100 * value:.1f}")
    Console().print(table)
    print(f"written to {cfg.run_dir / 'baseline.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="illume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
        sub.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        sub.set_defaults(handler=handler)
        return sub

    add("run", cmd_run, "run the ILLUME loop; running it again continues where it stopped")
    add("pretrain", cmd_pretrain, "pre-train and cache the demo base model").add_argument(
        "--force", action="store_true", help="pre-train even if a cached model exists")
    add("baseline", cmd_baseline, "answer accuracy and rationale quality of the base model").add_argument(
        "--threshold", type=float, default=0.7, help="ROUGE-L a rationale needs to count as acceptable")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `illume` console script; `argv` lets tests call it in-process."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from illume.data.datasets import DatasetError

    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except DatasetError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
