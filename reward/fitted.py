"""The reward model a run uses, fitted on people's judgments or saved elsewhere: one place that both the
reward critic (reward/critic.py) and GRPO (policies/grpo.py, policies/grpo_trl.py) ask (`reward_model_on`).

- **Fit or reuse.** The reward model is fitted on every judgment by people (`feedback.people`, by default
  `verdicts.PEOPLE`; `reward.learn_from` overrides it: the annotators' stored kind, never their name) in the
  rounds asked for, with its accept threshold calibrated on held-out examples
  (`reward.train.fit_reward_from_store`), and saved to RUN_DIR/reward/round_NN with `reward_critic.json`. When
  no new judgment by people came in since a fit, that fit is reused (also on resume), so the model is fitted
  once per new batch of people's work.
- **Or a saved one.** `reward.checkpoint` names a reward model fitted elsewhere (another run, `illume reward
  train`); it is used as it is, every round, after `check_reward_checkpoint` made sure (before any model
  loads) that it was fitted on this run's base model.
- Every process fits (together, through the Trainer); rank 0 writes the files.
- **A saved one, served or exported.** `saved_reward_folder` is the one rule of which saved reward model a
  command takes from a run (`illume reward serve`, `illume export-model --reward`); `check_reward_base` that
  it belongs to the run's base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from illume import distributed
from illume.config import ConfigError, RunConfig
from illume.data.records import Example
from illume.feedback.store import FeedbackStore
from illume.tracking import trainer_report

REWARD_CRITIC_FILE = "reward_critic.json"


def learn_from(cfg: RunConfig) -> list[str]:
    """Annotator kinds whose judgments the reward model learns from: `reward.learn_from`, else
    `feedback.people`."""
    return list(cfg.reward.learn_from if cfg.reward.learn_from is not None else cfg.feedback.people)


def _saved_config(directory: Path) -> dict:
    from reward.model import CONFIG_FILE

    return json.loads((directory / CONFIG_FILE).read_text())


def check_reward_checkpoint(cfg: RunConfig) -> None:
    """`reward.checkpoint`, checked from the files alone (before any model loads): a saved reward model,
    calibrated when a reward or hybrid critic must threshold it, fitted on the base model this run loads.

    Raises:
        ConfigError: naming the folder and what is wrong with it.
    """
    from illume.loading import model_identity
    from reward.model import CONFIG_FILE

    if cfg.reward.checkpoint is None:
        return
    directory = Path(cfg.reward.checkpoint)
    if not (directory / CONFIG_FILE).is_file():
        raise ConfigError(f"reward.checkpoint={directory}: no saved reward model there ({CONFIG_FILE} missing); "
                          "name a folder written by a run (RUN_DIR/reward/round_NN) or `illume reward train`")
    saved = _saved_config(directory)
    ours = model_identity(cfg)
    if saved.get("backbone") is None:
        raise ConfigError(f"reward.checkpoint={directory}: {CONFIG_FILE} does not say which base model it was "
                          f"fitted on (written before that was recorded); fit it again on {ours}")
    if saved["backbone"] != ours:
        raise ConfigError(f"reward.checkpoint={directory} was fitted on another base model ({saved['backbone']}); "
                          f"this run's model is {ours}. Fit a reward model on this run's judgments (leave "
                          "reward.checkpoint unset) or set model.* to the base model it was fitted on")
    if cfg.critic.kind in ("reward", "hybrid") and saved.get("threshold") is None:
        raise ConfigError(f"reward.checkpoint={directory} has no calibrated accept threshold, which critic.kind="
                          f"{cfg.critic.kind} needs; calibrate it with `illume reward eval`")


def reward_folders(run_dir: Path) -> dict[int | None, Path]:
    """The run's saved reward models: round -> RUN_DIR/reward/round_NN, and None -> RUN_DIR/reward (the one
    `illume reward train` writes), where there is one."""
    from reward.model import CONFIG_FILE

    root = Path(run_dir) / "reward"
    folders: dict[int | None, Path] = {int(p.parent.name.removeprefix("round_")): p.parent
                                       for p in sorted(root.glob(f"round_*/{CONFIG_FILE}"))
                                       if p.parent.name.removeprefix("round_").isdigit()}
    if (root / CONFIG_FILE).is_file():
        folders[None] = root
    return folders


def saved_reward_folder(run_dir: Path, round_idx: int | None = None) -> Path:
    """The reward model a command takes from a run (`illume export-model --reward`, `illume reward serve`):
    RUN_DIR/reward/round_NN with `round_idx` (what a run with a reward or hybrid critic fitted for round N),
    else RUN_DIR/reward (`illume reward train`), else the latest round's.

    Raises:
        FileNotFoundError: no such folder (the message lists the run's reward models and how to fit one).
    """
    run_dir = Path(run_dir)
    folders = reward_folders(run_dir)
    shown = ", ".join(("reward/ (illume reward train)" if key is None else f"reward/round_{key:02d}")
                      for key in sorted(folders, key=lambda k: -1 if k is None else k))
    if round_idx is not None:
        if round_idx not in folders:
            raise FileNotFoundError(f"{run_dir / 'reward' / f'round_{round_idx:02d}'} holds no reward model; "
                                    + (f"{run_dir} has {shown}" if folders else "the run has none"))
        return folders[round_idx]
    if None in folders:
        return folders[None]
    if folders:
        return folders[max(k for k in folders if k is not None)]
    raise FileNotFoundError(f"{run_dir} has no reward model: fit one with `illume reward train {run_dir}` (a run "
                            "with critic.kind=reward or hybrid saves one per round under reward/round_NN)")


def check_reward_base(cfg: RunConfig, folder: Path) -> None:
    """A reward model saved in `folder` may be rebuilt on the base model `cfg` loads: it was fitted on it (or
    does not say, having been fitted before that was recorded, by this run).

    Raises:
        ValueError: it was fitted on another base model (its adapters belong to that one).
    """
    from illume.loading import model_identity

    saved = _saved_config(Path(folder)).get("backbone")
    ours = model_identity(cfg)
    if saved is not None and saved != ours:
        raise ValueError(f"{folder} was fitted on another base model ({saved}) than the run's config.yaml "
                         f"names ({ours}): its adapters belong to that model")


def _load_checkpoint(cfg: RunConfig) -> tuple[object, dict]:
    from illume.loading import load_vlm
    from reward.model import RewardModel

    directory = Path(cfg.reward.checkpoint)
    rm = RewardModel.load(directory, load_vlm(cfg))
    info_path = directory / REWARD_CRITIC_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {
        "threshold": rm.threshold, "heldout_precision": None, "heldout_recall": None, "heldout_roc_auc": None,
        "heldout_pairwise_accuracy": None, "num_people_judgments": None}
    return rm, {**info, "checkpoint": str(directory)}


def reward_model_on(cfg: RunConfig, upto_round: int, store: FeedbackStore, examples_by_id: dict[str, Example],
                    say: Callable[[str], None] = print) -> tuple[object, dict]:
    """The reward model fitted on people's judgments of rounds 0..`upto_round` (`learn_from`), and its
    `reward_critic.json` facts (the module doc): `reward.checkpoint` when one is named; else a fit on exactly
    these judgments made before (also by another caller, also before a resume); else fitted now.

    The one hand-off between the reward critic and GRPO: the critic of round r asks for `upto_round = r - 1`
    (it judges round r), GRPO in round r for `upto_round = r` (it scores round r's samples); a fit is saved in
    RUN_DIR/reward/round_{upto_round + 1}, the round it serves first, so round r + 1's critic reuses the model
    GRPO fitted in round r when no judgment by people came in between.
    """
    round_idx = upto_round + 1  # the round this model serves first: its folder's name
    from illume.loading import load_vlm, model_identity
    from reward.model import RewardModel
    from reward.train import fit_reward_from_store

    if cfg.reward.checkpoint is not None:
        return _load_checkpoint(cfg)
    kinds = learn_from(cfg)
    backbone = model_identity(cfg)
    # Rank 0's count, so that every rank takes the same reuse-or-fit decision below.
    num_people = distributed.broadcast_object(store.num_judgments(upto_round=round_idx - 1, kinds=kinds))
    reward_root = cfg.run_dir / "reward"
    for earlier in range(round_idx, -1, -1):  # reuse a fit on exactly these judgments (also on resume)
        info_path = reward_root / f"round_{earlier:02d}" / REWARD_CRITIC_FILE
        if (info_path.is_file() and json.loads(info_path.read_text())["num_people_judgments"] == num_people
                and _saved_config(info_path.parent).get("backbone") in (backbone, None)):
            # (None: fitted before the base model was recorded, by this run and so on its model.) A fit on
            # another base model (a run continued with a changed model.*) is not reused: it is fitted again.
            return RewardModel.load(info_path.parent, load_vlm(cfg)), json.loads(info_path.read_text())
    out_dir = reward_root / f"round_{round_idx:02d}"
    say(f"round {round_idx}: fitting the reward model on {num_people} judgments by people")
    rm, result = fit_reward_from_store(store, examples_by_id, load_vlm(cfg), cfg.reward, out_dir,
                                       upto_round=round_idx - 1, kinds=kinds, aggregate=cfg.feedback.aggregate,
                                       train=cfg.train,
                                       backbone_id=backbone, report=trainer_report(cfg, out_dir))
    report = result["eval"]
    info = {"threshold": report["threshold"], "heldout_precision": report["precision"],
            "heldout_recall": report["recall"], "heldout_roc_auc": report["roc_auc"],
            "heldout_pairwise_accuracy": report["pairwise_accuracy"], "num_people_judgments": num_people}
    if distributed.is_main():
        _write_json(out_dir / REWARD_CRITIC_FILE, info)
    return rm, info


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
