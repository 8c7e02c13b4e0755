"""The `illume` command.

    illume run configs/demo.yaml [key=value ...]      run (or continue) the ILLUME rounds
    illume pretrain configs/demo.yaml                 pre-train (and cache) the demo base model
    illume baseline configs/demo.yaml [key=value ...] how well the base model answers and rationalises
    illume annotate runs/demo [--host H --port P --token T --round N]
                                                      serve the annotation page over a run's feedback store
    illume annotators add runs/demo NAME [--role admin]  a person's own link to the page (list, revoke)
    illume status runs/demo                           progress per round, work per person, agreement
    illume export runs/demo --format sft|dpo|kto|jsonl [--out P --force]  the feedback as TRL-format datasets
    illume export-model runs/demo OUT [--round N] [--merge] [--reward]
                                                      the tuned model (or the reward model) as a folder
                                                      stock transformers / PEFT load, with a model card
    illume reward train runs/demo [--round N]         fit the reward model on the judgments (rounds <= N)
    illume reward eval runs/demo                      its pairwise accuracy, ROC-AUC, precision/recall,
                                                      P(accept) Brier/ECE, plot; saves its calibration
    illume reward serve runs/demo [--round N] [--host H --port P --token T]
                                                      the reward model over HTTP (TRL, verl, OpenRLHF)
    illume dpo runs/demo [key=value ...]              DPO on the run's judgments (or on a saved TRL dataset)
    illume kto runs/demo [key=value ...]              KTO on the run's judgments (or on a saved TRL dataset)
    illume convert-magma mp_rank_00_model_states.pt OUT --version v1|v2
                                                      the official MAGMA checkpoint as a safetensors HF model
    illume plan configs/vqax_magma.yaml [--gpus N]    parameters and GPU memory estimate (meta device)

`run`, `pretrain` and `baseline` take a config file and `key.sub=value` overrides and write the resolved config
into the run directory (output_dir/name) before anything else (`run` continues an existing run only with its
settings, unless loop.allow_changed_settings=true; `pretrain` and `baseline` leave an existing run's
config.yaml as it is); `reward`, `dpo` and `kto` read RUN_DIR/config.yaml
(plus overrides for `dpo`/`kto`); `plan` reads a config and writes nothing. `annotate` reads RUN_DIR/config.yaml (its
`annotate` settings and `store_url`) or takes a store URL; it binds 127.0.0.1 unless --host says otherwise,
and then needs an access token (--token, or one is generated and printed).

One writer per run: `run`, `pretrain`, `baseline`, `reward`, `dpo` and `kto` hold the run folder's lock
(RUN_DIR/run.lock; with a PostgreSQL store also the database's) while they work, and a second one refuses
naming the holder; `annotate`, `status`, `export` and `export-model` only read (the page writes judgments)
and run beside them.
Nothing is written into a folder illume did not make, and an earlier result (an export, a baseline, a reward
model, a dpo/kto folder, a conversion) is replaced only with --force, a run's own files never
(illume.run_folder). Errors are one line: `config error:`, `data error:`, `weights error:`, `store error:`,
`refused:` or `busy:` (exit status 2).

`run`, `reward train` and `dpo`/`kto` also run as several processes (DDP; gloo on CPU, nccl on GPUs), e.g.
    torchrun --nproc_per_node 8 -m illume.cli run configs/vqax_magma.yaml \\
        train.deepspeed=configs/deepspeed/zero2.json
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        -m illume.cli dpo runs/demo      (--multi_gpu also on CPU: --cpu starts a single process)
Pre-train the demo base model in one process first (`illume pretrain`); rank 0 writes the store and files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from illume import distributed, run_folder
from illume.config import (
    DEMO_MODEL_PATH,
    AnnotateConfig,
    ConfigError,
    RunConfig,
    load_config,
    load_run_config,
    save_config,
)

logger = logging.getLogger(__name__)


def _write_config(cfg: RunConfig) -> None:
    """Write the resolved config into the run folder (claimed and locked: `_writing`), unless the loop has
    started there: its config.yaml is what a resumed run is checked against, so it stays."""
    from illume.resume import loop_started

    if loop_started(cfg.run_dir):
        logger.info("%s holds a run: its config.yaml is left as the run wrote it", cfg.run_dir)
    elif distributed.is_main():  # several processes: one writes
        save_config(cfg, cfg.run_dir / "config.yaml")


@contextlib.contextmanager
def _writing(run_dir: Path, command: str, store_url: str | None = None) -> Iterator[None]:
    """Claim the run folder and hold its lock (illume.run_folder) for a command that writes to the run; with a
    store elsewhere (a PostgreSQL URL), also the store's own lock, since other folders may share it."""
    from illume.feedback.store import FeedbackStore

    database_lock = None
    if store_url and distributed.is_main():  # rank 0 takes the locks for every rank of a launch
        database_lock = FeedbackStore(store_url, create=False).writer_lock
    with run_folder.writing(run_dir, command, database_lock):
        yield


def cmd_run(args: argparse.Namespace) -> int:
    from illume.loop import run

    run(load_config(args.config, args.overrides))  # the loop writes config.yaml once it checked a resumed run
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from illume.demo.pretrain import demo_model_dir, pretrain_demo_model

    cfg = load_config(args.config, args.overrides)
    if not cfg.model.names_demo_model():
        raise ConfigError(f"illume pretrain makes the demo base model, but model.path names {cfg.model.path} "
                          f"(leave it unset for MAGMA, or set it to {DEMO_MODEL_PATH})")
    with _writing(cfg.run_dir, "pretrain"):
        _write_config(cfg)
        directory = demo_model_dir(cfg)
        if (directory / "config.json").is_file() and not args.force:
            print(f"demo base model already cached at {directory} (use --force to pre-train again)")
            return 0
        start = time.perf_counter()
        directory = pretrain_demo_model(cfg, directory)
    print(f"pre-trained the demo base model in {time.perf_counter() - start:.0f} s -> {directory}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from illume.data.datasets import load_split

    cfg = load_config(args.config, args.overrides)
    # The data before the model: a bad row or an unreadable image fails in seconds, not after pre-training.
    train = load_split(cfg.data, "train", images_must_exist=True)
    val = load_split(cfg.data, "val", images_must_exist=True)
    with _writing(cfg.run_dir, "baseline"):
        if (cfg.run_dir / "baseline.json").is_file() and not args.force:
            raise run_folder.RunFolderError(f"{cfg.run_dir / 'baseline.json'} holds an earlier baseline: pass "
                                            "--force to measure again and replace it")
        _write_config(cfg)
        return _baseline(cfg, args.threshold, train, val)


def _baseline(cfg: RunConfig, threshold: float, train: list, val: list) -> int:
    """Sample and score the base model; write RUN_DIR/baseline.json and print the table."""
    from rich.console import Console
    from rich.table import Table

    from illume.evaluation import explanation_scores, rationale_pass_rate
    from illume.loading import load_vlm
    from illume.sampling import sample

    vlm = load_vlm(cfg)
    start = time.perf_counter()
    train_sets = sample(vlm, train, cfg.sample, use_reference_answer=True)
    val_sets = sample(vlm, val, cfg.sample, use_reference_answer=False)
    sampling_seconds = time.perf_counter() - start
    k = len(cfg.sample.temperatures) * cfg.sample.samples_per_temperature
    report = {
        "num_train": len(train), "num_val": len(val), "samples_per_example": k,
        "train_rationale_pass_rate": rationale_pass_rate(train_sets, train, threshold),
        "val_rationale_pass_rate": rationale_pass_rate(val_sets, val, threshold),
        "train_answer_accuracy": sum(cs.predicted_answer == e.answer for cs, e in zip(train_sets, train)) / len(train),
        "mean_distinct_candidates": sum(len(cs.candidates) for cs in train_sets) / len(train_sets),
        "sampling_seconds": round(sampling_seconds, 1),
        "val": explanation_scores(vlm, val, cfg.sample),
        "threshold": threshold,
    }
    (cfg.run_dir / "baseline.json").write_text(json.dumps(report, indent=2))
    table = Table(title=f"Base model ({len(train)} train / {len(val)} val questions, {k} samples each)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"train questions with a rationale at ROUGE-L >= {threshold}",
                  f"{100 * report['train_rationale_pass_rate']:.1f}%")
    table.add_row(f"val questions with a rationale at ROUGE-L >= {threshold}",
                  f"{100 * report['val_rationale_pass_rate']:.1f}%")
    table.add_row("distinct candidates per train question", f"{report['mean_distinct_candidates']:.1f}")
    for key, value in report["val"].items():
        table.add_row(f"val {key}", f"{100 * value:.1f}" if key != "cider" else f"{100 * value:.1f}")
    Console().print(table)
    print(f"written to {cfg.run_dir / 'baseline.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from illume.exports import ExportError, export
    from illume.models.loading import chat_format

    config_path = Path(args.run_dir) / "config.yaml"
    chat = chat_format(load_run_config(config_path)) if config_path.is_file() else None
    try:
        result = export(args.run_dir, args.format, args.out, round_idx=args.round, upto_round=args.upto_round,
                        split=args.split, aggregate=args.aggregate, as_jsonl=args.as_jsonl,
                        conversational=args.conversational, chat=chat, images=not args.no_images,
                        force=args.force)
    except ExportError as error:
        print(f"export error: {error}", file=sys.stderr)
        return 2
    print(f"exported {result.num_rows} {result.format} rows -> {result.path}")
    return 0


def _add_export_parser(commands) -> None:
    from illume.exports import FORMATS, SPLIT_CHOICES
    from illume.feedback.verdicts import AGGREGATES

    sub = commands.add_parser("export", help="export the run's feedback: TRL datasets (sft, dpo, kto) or JSONL",
                              description="Rows and verdict rules: see the illume.exports module doc.")
    sub.add_argument("run_dir", help="run directory (its config.yaml and feedback.db)")
    sub.add_argument("--format", required=True, choices=FORMATS, help="sft | dpo | kto | jsonl (every decision)")
    sub.add_argument("--out", help="dataset folder, or .jsonl file (default: RUN_DIR/exports/FORMAT[.jsonl])")
    rounds = sub.add_mutually_exclusive_group()
    rounds.add_argument("--round", type=int, help="only this round's items")
    rounds.add_argument("--upto-round", type=int, help="only rounds <= N")
    sub.add_argument("--split", default="train", choices=SPLIT_CHOICES, help="items' split (default: train)")
    sub.add_argument("--aggregate", choices=AGGREGATES,
                     help="how several annotators of an item combine (default: the run's feedback.aggregate)")
    sub.add_argument("--as-jsonl", action="store_true", help="write sft/dpo/kto as JSONL (images as paths)")
    sub.add_argument("--conversational", action="store_true",
                     help="plain-format runs: TRL conversational format (one user and one assistant message); "
                          "chat-format runs always write the chat turns")
    sub.add_argument("--no-images", action="store_true", help="text only: no images column")
    sub.add_argument("--force", action="store_true",
                     help="replace an existing --out (an earlier export; never a run's own files)")
    sub.set_defaults(handler=cmd_export)


def cmd_export_model(args: argparse.Namespace) -> int:
    import shlex

    from illume.export_model import ExportModelError, export_model

    command = shlex.join(["illume", "export-model", args.run_dir, args.out,
                          *(["--round", str(args.round)] if args.round is not None else []),
                          *(["--reward"] if args.reward else []), *(["--merge"] if args.merge else []),
                          *(["--force"] if args.force else [])])
    try:
        result = export_model(args.run_dir, args.out, round_idx=args.round, merge=args.merge, reward=args.reward,
                              force=args.force, command=command)
    except ExportModelError as error:
        print(f"export-model error: {error}", file=sys.stderr)
        return 2
    print(f"exported {result.what} of {args.run_dir} ({result.exported.description}) -> {result.path}")
    return 0


def _add_export_model_parser(commands) -> None:
    sub = commands.add_parser("export-model", help="the tuned model (or the reward model) as a folder stock "
                                                   "transformers / PEFT load, with a model card",
                              description="What the folder holds: see the illume.export_model module doc.")
    sub.add_argument("run_dir", help="run directory (its config.yaml, round_NN/ folders and feedback store)")
    sub.add_argument("out", help="folder to write (new, or an earlier export-model folder with --force)")
    sub.add_argument("--round", type=int, default=None,
                     help="the model after this round (default: the last that trained); with --reward: "
                          "RUN_DIR/reward/round_NN (default: RUN_DIR/reward, else the latest round's)")
    sub.add_argument("--merge", action="store_true",
                     help="model.kind=hf: merge the LoRA into a standalone model (default: a PEFT adapter "
                          "folder); MAGMA's adapters are always part of the model")
    sub.add_argument("--reward", action="store_true", help="export the run's reward model instead")
    sub.add_argument("--force", action="store_true", help="replace an earlier export-model folder at OUT")
    sub.set_defaults(handler=cmd_export_model)


def _annotate_target(target: str) -> tuple[Path | None, str | Path, AnnotateConfig]:
    """(run_dir, store URL or path, annotate settings) for `illume annotate TARGET`."""
    if "://" in target:
        return None, target, AnnotateConfig()
    path = Path(target)
    if path.is_dir():
        run_dir, store = path, path / "feedback.db"
    elif path.is_file():
        run_dir, store = path.parent, path
    else:
        raise ConfigError(f"{target} is neither a run directory, a feedback store file nor a store URL")
    cfg = AnnotateConfig()
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        raw = OmegaConf.load(config_path)
        try:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AnnotateConfig),
                                                      raw.get("annotate") or {}))
        except OmegaConfBaseException as error:
            raise ConfigError(f"{config_path}: annotate: {str(error).splitlines()[0]}") from error
        if path.is_dir() and raw.get("store_url"):
            store = raw.get("store_url")
    if isinstance(store, Path) and not store.is_file():
        raise ConfigError(f"no feedback store at {store}: start the run first (`illume run ...`)")
    return run_dir, store, cfg


def cmd_annotate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from illume.annotate import server
    from illume.feedback.store import FeedbackStore

    run_dir, store_url, cfg = _annotate_target(args.target)
    host = args.host or cfg.host
    port = args.port if args.port is not None else cfg.port
    cfg = replace(cfg, host=host, port=port)  # the app answers only the bound host's names (and allowed_hosts)
    token = args.token
    store = FeedbackStore(store_url, create=False)  # the page serves a run's store; it never makes one
    accounts = store.has_accounts()
    if not server.is_loopback(host) and not token and not accounts:
        token = secrets.token_urlsafe(24)
        print(f"--host {host} is reachable from other machines: generated an access token: {token}")
    assist = None
    if cfg.assist and run_dir is not None:
        from illume.annotate.assist import reward_assist

        assist = reward_assist(run_dir, load_run_config(run_dir / "config.yaml"))
        print("assist: candidates ordered by the reward model, its confident accepts pre-checked" if assist
              else "assist: this run has no reward model yet (illume reward train RUN_DIR); showing plain order")
    app = server.create_app(store, run_dir, cfg, token=token, round_idx=args.round, assist=assist)
    if accounts:
        print(f"annotation page for {store.url} ({cfg.annotations_per_item} judgment(s) per item): "
              f"{_page_url(cfg, host, port)} with each person's own link (`illume annotators add`; "
              "`illume annotators list`)")
    else:
        print(f"annotation page for {store.url} ({cfg.annotations_per_item} judgment(s) per item): "
              f"{_page_url(cfg, host, port, token)}\n    admin page: {_page_url(cfg, host, port, token, '/admin')}")
    print("stop with Ctrl+C; judgments are saved as they are submitted")
    server.serve(app, host, port, log_level="warning")
    return 0


def _page_url(cfg: AnnotateConfig, host: str | None = None, port: int | None = None, token: str | None = None,
              path: str = "/") -> str:
    """The address people open: the configured host (this machine's name for a wildcard bind) and port."""
    host = host or cfg.host
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    return f"http://{shown_host}:{port if port is not None else cfg.port}{path}" + (f"?token={token}" if token else "")


def cmd_annotators(args: argparse.Namespace) -> int:
    from illume.feedback.store import FeedbackStore

    _, store_url, cfg = _annotate_target(args.target)
    store = FeedbackStore(store_url, create=False)
    if args.action == "add":
        try:
            token = store.add_account(args.name, args.role)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        print(f"{args.name} ({args.role}): their own link to the annotation page (shown once; only a hash is "
              f"stored):\n    {_page_url(cfg, token=token)}")
        if args.role == "admin":
            print(f"admin page:\n    {_page_url(cfg, token=token, path='/admin')}")
        print("Once a store has accounts, the page lets in only these links (`illume annotators revoke NAME`).")
    elif args.action == "revoke":
        if not store.revoke_account(args.name):
            raise ConfigError(f"{args.name!r} has no active account in {store.url}")
        print(f"revoked {args.name}: their link stops working at their next request")
    else:
        accounts = store.accounts()
        if not accounts:
            print(f"no accounts in {store.url}: the page is open to whoever reaches it (loopback by default)")
        for account in accounts:
            state = "active" if account.active else f"revoked {account.revoked_at:%Y-%m-%d %H:%M}"
            print(f"{account.name}\t{account.role}\t{state}\tsince {account.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from illume.feedback.store import FeedbackStore
    from illume.feedback.verdicts import DEFAULT_AGGREGATE
    from illume.status import print_status

    run_dir, store_url, _ = _annotate_target(args.target)
    config_path = run_dir / "config.yaml" if run_dir is not None else None
    raw = OmegaConf.load(config_path) if config_path is not None and config_path.is_file() else {}
    aggregate = OmegaConf.select(OmegaConf.create(raw), "feedback.aggregate", default=DEFAULT_AGGREGATE)
    print_status(FeedbackStore(store_url, create=False), aggregate=aggregate)  # the rules the run trains by
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    if args.action == "serve":
        return cmd_reward_serve(args)
    misplaced = [name for name in SERVE_OPTIONS if getattr(args, name) is not None]
    if misplaced:
        raise ConfigError(f"{SERVE_OPTIONS[misplaced[0]]} is for `illume reward serve`")
    from rich.console import Console
    from rich.table import Table

    from illume.data.datasets import load_split
    from illume.feedback.store import FeedbackStore
    from illume.loading import load_vlm, model_identity
    from illume.tracking import check_report_to, trainer_report
    from reward.model import CONFIG_FILE, RewardModel
    from reward.pairs import RewardDataError
    from reward.train import evaluate_saved, fit_reward_from_store

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    if args.action == "train":
        check_report_to(cfg)  # before the model loads
    # Checked before the model loads: an unreadable image fails in seconds, not after pre-training.
    examples_by_id = {e.id: e for e in load_split(cfg.data, "train", images_must_exist=True)}
    out_dir = run_dir / "reward"
    with _writing(run_dir, f"reward {args.action}", cfg.store_url):
        if args.action == "train":  # an earlier fit is replaced only on request (the loop's round_NN/ stay)
            run_folder.check_output_folder(out_dir, CONFIG_FILE, args.force, "illume reward train",
                                           alongside=("round_*",))
        store = FeedbackStore(cfg.store_url or run_dir / "feedback.db", create=False)
        try:
            if args.action == "train":
                _, result = fit_reward_from_store(store, examples_by_id, load_vlm(cfg), cfg.reward, out_dir,
                                                  upto_round=args.round, train=cfg.train,
                                                  backbone_id=model_identity(cfg),
                                                  report=trainer_report(cfg, out_dir))
                report, training = result["eval"], result["training"]
            else:
                rm = RewardModel.load(out_dir, load_vlm(cfg), copy_backbone=False)
                report = evaluate_saved(store, examples_by_id, rm, out_dir, cfg.reward.target_precision)
                training = None
        except (RewardDataError, FileNotFoundError) as error:
            print(f"reward error: {error}", file=sys.stderr)
            return 2
    if not distributed.is_main():  # several processes: rank 0 reports
        return 0
    table = Table(title=f"Reward model on {report['num_examples']} held-out examples ({out_dir})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if training is not None:
        table.add_row("training pairs / time", f"{training['num_train_pairs']} / {training['train_seconds']:.0f} s")
    rows = [("pairwise accuracy", "pairwise_accuracy"), ("  judged pairs", "pairwise_accuracy_judged"),
            ("  reference pairs", "pairwise_accuracy_reference"), ("ROC-AUC", "roc_auc"),
            ("threshold", "threshold"), ("precision (calibration set)", "precision"),
            ("recall (calibration set)", "recall"), ("precision (2-fold cross-fit)", "precision_crossfit"),
            ("recall (2-fold cross-fit)", "recall_crossfit"),
            ("P(accept): Brier (calibration set)", "brier"),
            ("P(accept): ECE, 10 bins (calibration set)", "ece"),
            ("P(accept): Brier (2-fold cross-fit)", "brier_crossfit"),
            ("P(accept): ECE (2-fold cross-fit)", "ece_crossfit"),
            ("Brier of always saying the acceptance rate", "brier_base_rate")]
    for label, key in rows:
        table.add_row(label, "-" if report[key] is None else f"{report[key]:.3f}")
    table.add_row("held-out pairs / candidates / accepted",
                  f"{report['num_pairs']} / {report['num_candidates']} / {report['num_accepted']}")
    Console().print(table)
    if report["probability_unavailable"] is not None:
        print(report["probability_unavailable"])
    print(f"written to {out_dir / 'reward_eval.json'} and {out_dir / 'calibration.png'}")
    return 0


def _add_reward_parser(commands) -> None:
    from reward.serve import ServeConfig

    sub = commands.add_parser("reward", help="train, evaluate or serve the reward model of a run's judgments",
                              description="serve: the reward model over HTTP (GET /health, POST /score, POST "
                                          "/openrlhf) for TRL, verl and OpenRLHF; see the reward.serve module "
                                          "doc and docs/reward-model.md.")
    sub.add_argument("action", choices=("train", "eval", "serve"),
                     help="train (then evaluate) | eval (the saved one) | serve (it, over HTTP)")
    sub.add_argument("run_dir", help="run directory (its config.yaml and feedback store); train writes "
                                     "RUN_DIR/reward/")
    sub.add_argument("--round", type=int, default=None,
                     help="train: judgments of rounds <= N (default: all); serve: the reward model of "
                          "RUN_DIR/reward/round_NN (default: RUN_DIR/reward, else the latest round's)")
    sub.add_argument("--force", action="store_true", help="train: replace the reward model an earlier train wrote")
    serve = sub.add_argument_group("serve")
    serve.add_argument("--host", default=None,
                       help=f"interface to bind (default {ServeConfig.host}; another one needs a token, generated "
                            "and printed when --token is not given)")
    serve.add_argument("--port", type=int, default=None, help=f"TCP port (default {ServeConfig.port})")
    serve.add_argument("--token", default=None, help="the token every route but /health requires (Authorization: "
                                                     "Bearer T, or ?token=T); default: $ILLUME_REWARD_TOKEN, else "
                                                     "none on loopback")
    serve.add_argument("--allowed-host", action="append", default=None, dest="allowed_hosts", metavar="NAME",
                       help="another Host name to answer (a proxy's; '*.example.org'); repeatable")
    serve.add_argument("--max-items", type=int, default=None,
                       help=f"the most items one request may hold (default {ServeConfig.max_items})")
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help=f"the largest request body read (default {ServeConfig.max_body_bytes})")
    serve.add_argument("--batch-size", type=int, default=None,
                       help=f"rationales per forward pass (default {ServeConfig.batch_size})")
    serve.add_argument("--image-root", type=Path, default=None,
                       help="a folder items may name images in (`image_path`); default: base64 images only")
    sub.set_defaults(handler=cmd_reward)


SERVE_OPTIONS = {"host": "--host", "port": "--port", "token": "--token", "allowed_hosts": "--allowed-host",
                 "max_items": "--max-items", "max_body_bytes": "--max-body-bytes", "batch_size": "--batch-size",
                 "image_root": "--image-root"}
"""`illume reward serve`'s own options (None unless given): attribute -> flag."""
TOKEN_VARIABLE = "ILLUME_REWARD_TOKEN"
"""The reward service's token when --token is not given (a flag's value shows in every user's process list)."""


def cmd_reward_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from illume.http_guard import allowed_hosts, is_loopback, serve
    from reward.serve import ServeConfig, create_app, load_served_model

    given = {name: getattr(args, name) for name in SERVE_OPTIONS if getattr(args, name) is not None}
    if "token" not in given and os.environ.get(TOKEN_VARIABLE):  # kept out of the process list
        given["token"] = os.environ[TOKEN_VARIABLE]
    if "allowed_hosts" in given:
        given["allowed_hosts"] = tuple(given["allowed_hosts"])
    if args.force:
        raise ConfigError("--force is for `illume reward train`")
    if "image_root" in given and not given["image_root"].is_dir():
        raise ConfigError(f"--image-root {given['image_root']} is not a folder")
    try:
        cfg = ServeConfig(**given)
        allowed_hosts(cfg.host, cfg.allowed_hosts, "--allowed-host")  # checked before the model loads
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if not is_loopback(cfg.host) and not cfg.token:
        cfg = replace(cfg, token=secrets.token_urlsafe(24))
        print(f"--host {cfg.host} is reachable from other machines: generated a token: {cfg.token}")
    run_dir = Path(args.run_dir)
    try:
        served = load_served_model(run_dir, args.round)
    except ConfigError:  # no readable config.yaml: main() says `config error:`
        raise
    except (FileNotFoundError, ValueError) as error:  # no such reward model; fitted on another base model
        print(f"reward error: {error}", file=sys.stderr)
        return 2
    app = create_app(served, cfg)
    rm = served.rm
    accept = f"accept: score >= {rm.threshold:.4g}" if rm.threshold is not None else "no accept threshold"
    accept += "; probability: Platt scaling" if rm.platt is not None else "; no accept probability"
    shown_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {run_dir / served.reward_dir} (fitted on {rm.backbone_id or 'an unrecorded base model'}; "
          f"{accept}) on http://{shown_host}:{cfg.port}: POST /score, "
          f"POST /openrlhf, GET /health" + ("" if cfg.token is None else " (token required but for /health)"))
    print("stop with Ctrl+C")
    serve(app, cfg.host, cfg.port, log_level="warning")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from policies.data import PolicyDataError
    from policies.optimize import optimize_standalone

    source = Path(args.source)
    if (source / "config.yaml").is_file():
        cfg = (load_config(args.config, args.overrides) if args.config
               else load_run_config(source / "config.yaml", args.overrides))
    elif (source / "dataset_info.json").is_file() or (source / "state.json").is_file():
        if args.config is None:
            raise ConfigError(f"{source} is a dataset: say which model and val split with --config CONFIG")
        cfg = load_config(args.config, args.overrides)
    else:
        raise ConfigError(f"{source} is neither a run directory (config.yaml) nor a dataset saved with datasets")
    is_run = (source / "config.yaml").is_file()
    run_dir = source if is_run else cfg.run_dir  # the run the result is written into (by default)
    out_dir = Path(args.out) if args.out is not None else run_dir / args.kind
    with _writing(run_dir, args.kind, cfg.store_url if is_run else None):
        run_folder.check_output_folder(out_dir, "metrics.json", args.force, f"illume {args.kind}", kind=args.kind)
        try:
            metrics = optimize_standalone(args.kind, source, cfg, out_dir, args.init_round)
        except PolicyDataError as error:
            print(f"{args.kind} error: {error}", file=sys.stderr)
            return 2
    if not distributed.is_main():  # several processes: rank 0 reports
        return 0
    table = Table(title=f"{args.kind.upper()} on {source}: {metrics['num_rows']} "
                        f"{'pairs' if args.kind == 'dpo' else 'rows'}, val scores x100 of the kept epoch")
    for key in ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy"):
        table.add_column(key, justify="right")
    table.add_row(*(f"{100 * metrics['val'][k]:.1f}" if metrics["val"].get(k) is not None else "-"
                    for k in ("bleu_4", "meteor", "rouge_l", "cider", "answer_accuracy")))
    Console().print(table)
    return 0


def _add_policy_parsers(commands) -> None:
    for kind, text in (("dpo", "DPO on chosen vs rejected rationales"),
                       ("kto", "KTO on accepted / rejected rationales (unpaired)")):
        sub = commands.add_parser(kind, help=f"{text}, on a run's store or a saved TRL dataset")
        sub.add_argument("source", help="run directory (its feedback store) or a dataset saved with datasets "
                                        f"(illume export --format {kind})")
        sub.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. policy.dpo.beta=0.2")
        sub.add_argument("--config", default=None,
                         help="config file (default: RUN_DIR/config.yaml; required for a dataset)")
        sub.add_argument("--out", default=None, help=f"output folder (default: RUN_DIR/{kind})")
        sub.add_argument("--init-round", type=int, default=None,
                         help="start from this round's adapters (default: the base model)")
        sub.add_argument("--force", action="store_true", help=f"replace the result of an earlier `illume {kind}` in "
                                                              "the output folder")
        sub.set_defaults(handler=cmd_policy, kind=kind)


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
    baseline = add("baseline", cmd_baseline, "answer accuracy and rationale quality of the base model")
    baseline.add_argument("--threshold", type=float, default=0.7,
                          help="ROUGE-L a rationale needs to count as acceptable")
    baseline.add_argument("--force", action="store_true", help="measure again, replacing RUN_DIR/baseline.json")

    annotate = commands.add_parser("annotate", help="serve the annotation page people critique in")
    annotate.add_argument("target", metavar="RUN_DIR_OR_STORE_URL",
                          help="run directory (reads its config.yaml and feedback.db) or a store URL")
    annotate.add_argument("--host", default=None,
                          help="interface to bind (default: annotate.host, 127.0.0.1)")
    annotate.add_argument("--port", type=int, default=None, help="TCP port (default: annotate.port)")
    annotate.add_argument("--token", default=None,
                          help="access token; generated and printed when --host is not loopback")
    annotate.add_argument("--round", type=int, default=None,
                          help="round to judge (default: the latest one that still needs judgments)")
    annotate.set_defaults(handler=cmd_annotate)
    annotators = commands.add_parser("annotators", help="people's own links to the annotation page")
    actions = annotators.add_subparsers(dest="action", required=True)
    for action, help_text in (("add", "create a person's account and print their link (shown once)"),
                              ("list", "every account, with its role and whether it is revoked"),
                              ("revoke", "stop a person's link at once")):
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument("target", metavar="RUN_DIR_OR_STORE_URL", help="run directory or a store URL")
        if action != "list":
            sub.add_argument("name", help="the person's name (their judgments are stored under it)")
        if action == "add":
            sub.add_argument("--role", choices=("annotator", "admin"), default="annotator",
                             help="admin: also the admin page (progress, agreement, disagreements)")
        sub.set_defaults(handler=cmd_annotators)
    status = commands.add_parser("status", help="progress per round, judgments and time per person, agreement")
    status.add_argument("target", metavar="RUN_DIR_OR_STORE_URL", help="run directory or a store URL")
    status.set_defaults(handler=cmd_status)
    _add_export_parser(commands)
    _add_export_model_parser(commands)
    _add_reward_parser(commands)
    _add_policy_parsers(commands)
    from illume.models.magma_checkpoint import add_convert_magma_parser
    from illume.plan import add_plan_parser

    add_convert_magma_parser(commands)
    add_plan_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `illume` console script; `argv` lets tests call it in-process."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    distributed.init_if_launched()  # torchrun / accelerate launch with several processes: join the group
    from illume.data.datasets import DatasetError
    from illume.feedback.engine import StoreError
    from illume.models.weights import WeightsFileError

    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except run_folder.RunFolderError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    except run_folder.RunInUse as error:
        print(f"busy: {error}", file=sys.stderr)
        return 2
    except StoreError as error:
        print(f"store error: {error}", file=sys.stderr)
        return 2
    except DatasetError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2
    except WeightsFileError as error:
        print(f"weights error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
