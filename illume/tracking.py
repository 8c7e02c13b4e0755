"""Experiment tracking (`train.report_to`): where a run's trainers and its loop report, all under one run.

Assumptions, up front:
- `train.report_to` takes the HF Trainer's integration names (tensorboard, wandb, mlflow, trackio, comet_ml,
  ... as `transformers.integrations.INTEGRATION_TO_CALLBACK` lists them), a list of them, "none" (the default:
  nothing is reported) or "all" (every integration whose package is installed). An unknown name, or one whose
  package is missing, fails when a command starts (`check_report_to`), naming the key.
- Every trainer here is an HF Trainer (selection-SFT, DPO, KTO, our GRPO and TRL's, the reward model, the demo
  pre-training); each reports through the Trainer's own integrations (`TrainerReport`: TrainingArguments'
  report_to / run_name / project, plus the TensorBoard callback pointed at the run's folder, since
  transformers 5 has no `logging_dir`). They log what the Trainer logs: loss, learning rate, grad norm and
  each trainer's own metrics (DPO's reward margins, GRPO's KL, ...) every `logging_steps`, and a summary at
  the end (`train/train_loss`).
- The loop reports its per-round table (the rows of results.json) and the annotation progress through a
  `Tracker` (`open_tracker`), one per integration in `TRACKERS`, with step = the round index.
- Where it lands: TensorBoard event files in RUN_DIR/tracking/: `loop/` (the round table, the annotation
  progress) and one folder per trainer, named as its output folder relative to the run directory
  (`round_00/`, `reward/round_01/`, `dpo/`; `pretrain/`), so `tensorboard --logdir RUN_DIR/tracking` shows
  the whole run. wandb: one run named after the run (the trainers' logs join it); mlflow: a run `NAME/loop`
  beside the trainers' runs `NAME/round_00`, ...; trackio: project NAME, runs `loop`, `round_00`, ....
- Reporting never changes what is computed: nothing here draws random numbers or touches the model, and only
  rank 0 reports.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from illume import distributed
from illume.config import ConfigError, RunConfig

TRACKING_DIR = "tracking"
"""RUN_DIR/tracking: where TensorBoard's event files (and wandb's local files) of a run go."""
LOOP_NAME = "loop"
"""The loop's own run / folder beside the trainers'."""
KEY = "train.report_to"

# Integrations whose pip package is not named as the integration (the rest: `pip install NAME`).
INSTALL = {"tensorboard": "pip install illume-vlm[tensorboard]", "comet_ml": "pip install comet-ml",
           "azure_ml": "pip install azureml-core", "flyte": "pip install flytekit"}


def _integrations() -> list[str]:
    # The HF Trainer's own list, so a name it supports is never refused here (imported when needed: slow).
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def _installed(name: str) -> bool:
    from transformers.integrations import integration_utils

    if name == "tensorboard":  # our loop writes with torch.utils.tensorboard, which needs tensorboard itself
        return importlib.util.find_spec("tensorboard") is not None
    if name == "azure_ml":  # transformers leaves it out of the "available" list when mlflow is installed
        return integration_utils.is_azureml_available()
    return name in integration_utils.get_available_reporting_integrations()


def report_names(report_to: str | Sequence[str]) -> list[str]:
    """`train.report_to` as a list of integration names, checked ("none": [], "all": those installed).

    Raises:
        ConfigError: an unknown name, "none"/"all" mixed with others, or an integration whose package is not
            installed; the message names train.report_to and what to do.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if not names or names == ["none"]:
        return []
    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise ConfigError(f"{KEY}={names}: 'none' and 'all' stand alone, not in a list with other names")
    if names == ["all"]:
        from transformers.integrations.integration_utils import get_available_reporting_integrations

        return get_available_reporting_integrations()
    known = _integrations()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"{KEY}: unknown integration(s) {', '.join(map(repr, unknown))}; the HF Trainer's are "
                          f"{', '.join(known)}, or 'none' / 'all'")
    for name in names:
        if not _installed(name):
            raise ConfigError(f"{KEY}={name} needs `{INSTALL.get(name, f'pip install {name}')}`")
    return list(dict.fromkeys(names))


def check_report_to(cfg: RunConfig) -> None:
    """Fail before any work when train.report_to names an unknown integration or one not installed."""
    report_names(cfg.train.report_to)


def tracking_dir(run_dir: str | Path) -> Path:
    """RUN_DIR/tracking."""
    return Path(run_dir) / TRACKING_DIR


# --- The trainers: the HF Trainer's integrations --------------------------------------------------------------

@dataclass(frozen=True)
class TrainerReport:
    """Where one HF Trainer reports (the default: nowhere)."""

    names: tuple[str, ...] = ()
    """Checked integration names (`report_names`)."""
    logdir: Path | None = None
    """TensorBoard's folder for this trainer."""
    run_name: str | None = None
    """TrainingArguments.run_name (wandb, mlflow, trackio, ... name the trainer's run so)."""
    project: str | None = None
    """TrainingArguments.project (trackio's project: the run's name)."""

    def arguments(self) -> dict:
        """The TrainingArguments settings: every integration but TensorBoard, which `callbacks` points at
        `logdir` (transformers 5 reads its folder from an environment variable only)."""
        others = [name for name in self.names if name != "tensorboard"]
        settings = {"report_to": others or "none"}
        if self.run_name is not None:
            settings.update(run_name=self.run_name, project=self.project)
        return settings

    def callbacks(self) -> list:
        """Callbacks to give the Trainer: TensorBoard's, writing to `logdir` (rank 0 opens it, at train start)."""
        if "tensorboard" not in self.names:
            return []
        from transformers.integrations import TensorBoardCallback

        callback = TensorBoardCallback()
        callback.logging_dir = str(self.logdir)  # what TENSORBOARD_LOGGING_DIR would set
        return [callback]


NO_REPORT = TrainerReport()


def trainer_report(cfg: RunConfig, out_dir: str | Path) -> TrainerReport:
    """Where the trainer writing to `out_dir` reports under `cfg`'s train.report_to.

    Its name is `out_dir` relative to the run directory (`round_00`, `reward/round_01`), or the folder's own
    name when it lies elsewhere.
    """
    names = report_names(cfg.train.report_to)
    if not names:
        return NO_REPORT
    out_dir, run_dir = Path(out_dir).resolve(), cfg.run_dir.resolve()
    name = out_dir.relative_to(run_dir).as_posix() if out_dir.is_relative_to(run_dir) else out_dir.name
    return TrainerReport(tuple(names), tracking_dir(cfg.run_dir) / name, f"{cfg.name}/{name}", cfg.name)


# --- The loop: its round table and the annotation progress ---------------------------------------------------

class Tracker(Protocol):
    """One integration's run for the loop's own figures."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record `metrics` (name -> number) at `step` (the round index)."""
        ...

    def close(self) -> None:
        ...


class TensorBoardTracker:
    """Event files in RUN_DIR/tracking/loop, flushed at every log (a crash loses nothing logged)."""

    def __init__(self, cfg: RunConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(tracking_dir(cfg.run_dir) / LOOP_NAME))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run named after the run (files in RUN_DIR/tracking/wandb); the trainers' WandbCallback logs
    into the same run (it starts one only when none is active). Round figures are plotted against `round`."""

    def __init__(self, cfg: RunConfig):
        import wandb

        root = tracking_dir(cfg.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "illume"), name=cfg.name,
                                           dir=str(root))
        self.run.define_metric("round")
        for prefix in ("round", "base", "annotation"):
            self.run.define_metric(f"{prefix}/*", step_metric="round")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({**metrics, "round": step})

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run `NAME/loop` in the experiment MLFLOW_EXPERIMENT_NAME (else MLflow's default), beside the
    runs the trainers' MLflowCallback starts. Logged through a client by run id, never as the active run: a
    trainer's callback would otherwise log its arguments into it (and refuse the next round's)."""

    def __init__(self, cfg: RunConfig):
        import mlflow

        self.client = mlflow.MlflowClient()
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        if experiment_name:
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(experiment_name))
        self.run_id = self.client.create_run(experiment_id, run_name=f"{cfg.name}/{LOOP_NAME}").info.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.client.log_metric(self.run_id, name, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """A trackio run `loop` in project NAME, beside the trainers' runs (`round_00`, ...). Logged through its
    run object: a trainer's callback starts and finishes runs of its own meanwhile."""

    def __init__(self, cfg: RunConfig):
        import trackio

        self.run = trackio.init(project=cfg.name, name=LOOP_NAME)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Callable[[RunConfig], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MLflowTracker,
    "trackio": TrackioTracker,
}
"""train.report_to name -> the loop's tracker. Another HF integration (comet_ml, neptune, ...) gets the
trainers' logs only."""


class RunTracker:
    """The loop's trackers together (none: every call does nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            for tracker in self.trackers:
                tracker.log(metrics, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_tracker(cfg: RunConfig, say: Callable[[str], None] = print) -> RunTracker:
    """The loop's trackers for train.report_to (rank 0; the other ranks get one that does nothing)."""
    names = report_names(cfg.train.report_to)
    if not distributed.is_main():
        return RunTracker()
    others = [name for name in names if name not in TRACKERS]
    if others:
        say(f"{KEY}: {', '.join(others)} get the trainers' logs only; the round table goes to "
            f"{' / '.join(TRACKERS)}")
    return RunTracker([TRACKERS[name](cfg) for name in names if name in TRACKERS])


def scalars(row: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) results row as `prefix/key/sub` -> float: booleans as 0/1; text, lists and
    missing values (None) left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(scalars(value, name))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out


def round_scalars(row: Mapping) -> dict[str, float]:
    """A round's row of results.json for the trackers: `round/accepted_pct`, `round/val/rouge_l`, ... (the
    round index is the step, not a value); the base model's row as `base/val/...`."""
    if row.get("round") == "base":
        return scalars({"val": row.get("val", {})}, "base")
    return scalars({key: value for key, value in row.items() if key != "round"}, "round")
