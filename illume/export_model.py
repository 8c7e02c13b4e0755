"""`illume export-model`: a run's tuned model, or its reward model, as a folder people can take away.

    illume export-model RUN_DIR OUT [--round N] [--merge] [--force]   the policy as it was after round N
    illume export-model RUN_DIR OUT --reward [--round N] [--force]    the reward model

Assumptions, up front:
- A round's model is the run's base model (RUN_DIR/config.yaml, `illume.loading.load_vlm`) with the weights
  the round kept (`round_NN/adapters.safetensors`) loaded: what the loop continued from and `illume.heldout`
  scores. Only finished rounds that trained count (their metrics.json says so); the default is the last.
- What OUT holds is the backend's business (`illume.models.export.export_vlm`): for `hf` a PEFT
  adapter folder naming the base model (or with --merge a standalone model), for MAGMA the whole model
  (adapters included) and its tokenizer. Both with the processor or tokenizer.
- The reward model (`--reward`): RUN_DIR/reward/round_NN with --round N (what a run with a reward or hybrid
  critic fitted for round N), else RUN_DIR/reward (`illume reward train`), else the latest round's. Its
  backbone (the base model with the reward model's own adapters) is exported as a round's model is, into
  OUT/backbone; its head goes to OUT/head.safetensors and its threshold, pooling and base model to
  OUT/reward_config.json. A reward model fitted on another base model than the run's config names is refused.
- Every export has a model card (README.md: base model, data, rounds, the run's results table, the feedback
  counts, the command, a usage snippet) and `MARKER_FILE`, by which a later export recognises it.
- OUT is written whole: into a temporary folder beside it, then moved into place. An existing OUT is replaced
  only when it is an earlier export-model folder and --force is given; nothing else is ever replaced
  (`illume.run_folder.check_output_folder`). The run is only read (no lock, as `illume export`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from rich.table import Table

from illume.config import RunConfig, load_run_config
from illume.data.datasets import DatasetError, load_split
from illume.data.records import SPLITS, Example, load_image
from illume.exports import ExportError, store_for_run
from illume.feedback.verdicts import read_feedback
from illume.loading import load_vlm, model_identity
from illume.loop import results_table
from illume.models.export import ExportedModel, ModelExportError, export_vlm
from illume.models.weights import load_trainable_weights, save_safetensors
from illume.prompts import answer_prompt
from illume.run_folder import check_output_folder
from illume.training import ADAPTERS_FILE, retrain_round_remedy
from reward.fitted import check_reward_base, saved_reward_folder
from reward.model import RewardModel

COMMAND = "illume export-model"
MARKER_FILE = "illume-export-model.json"
"""Written into every export-model folder: what was exported, from where, by which command. An existing OUT is
replaced (with --force) only when it holds this file."""
REWARD_EXPORT_FILE = "reward_config.json"
"""The exported reward model's threshold, Platt scaling's (a, b), pooling and base model (not the run's
`reward_model.json`, whose folder layout it does not have)."""


class ExportModelError(ValueError):
    """A model that cannot be exported: no such round, no reward model, a base model that changed, ..."""


@dataclass
class ModelExport:
    path: Path
    """The folder written."""
    what: str
    """What was exported, in words ("round 1", "the reward model of reward/round_02")."""
    exported: ExportedModel


# -------------------------------------------------------------------- what a run holds


def trained_rounds(run_dir: Path) -> list[int]:
    """The run's finished rounds that trained (metrics.json says so, adapters kept), ascending."""
    rounds = []
    for metrics_path in sorted(run_dir.glob("round_*/metrics.json")):
        if not metrics_path.parent.name.removeprefix("round_").isdigit():
            continue
        try:
            trained = json.loads(metrics_path.read_text()).get("trained")
        except (OSError, ValueError):  # a round written by something else: not a finished round
            continue
        if trained and (metrics_path.parent / ADAPTERS_FILE).is_file():
            rounds.append(int(metrics_path.parent.name.removeprefix("round_")))
    return rounds


def _choose_round(run_dir: Path, round_idx: int | None) -> int:
    rounds = trained_rounds(run_dir)
    if not rounds:
        raise ExportModelError(f"{run_dir} has no finished round that trained (no round_NN/metrics.json with "
                               f"trained: true and its {ADAPTERS_FILE}): run `illume run` first")
    if round_idx is None:
        return rounds[-1]
    if round_idx not in rounds:
        raise ExportModelError(f"{run_dir} has no trained round {round_idx}; the finished rounds that trained are "
                               f"{', '.join(map(str, rounds))}")
    return round_idx


def _choose_reward(run_dir: Path, round_idx: int | None) -> Path:
    try:
        return saved_reward_folder(run_dir, round_idx)
    except FileNotFoundError as error:
        raise ExportModelError(str(error)) from error


def _base_model(cfg: RunConfig) -> str:
    """The base model as others can name it: a local folder's absolute path, a hub name as given, or (the
    demo base model, which has no path) its cache name."""
    if cfg.model.path is None:
        return model_identity(cfg)
    path = Path(cfg.model.path).expanduser()
    return str(path.resolve()) if path.exists() else cfg.model.path


# -------------------------------------------------------------------- the export


def export_model(run_dir: str | Path, out: str | Path, *, round_idx: int | None = None, merge: bool = False,
                 reward: bool = False, force: bool = False, command: str = COMMAND) -> ModelExport:
    """Export a run's model after a round (or its reward model) into `out` (see the module doc).

    Args:
        run_dir: The run folder (its config.yaml, rounds, feedback store).
        out: The folder to write; it must not exist, or be an earlier export with `force`.
        round_idx: The round (default: the last that trained; with `reward`: see the module doc).
        merge: hf: merge the LoRA into a standalone model instead of an adapter folder.
        reward: Export the reward model instead of the policy.
        force: Replace an earlier export-model folder at `out`.
        command: The command line that asked for it, written into the model card.

    Raises:
        ExportModelError: no such round or reward model, a reward model of another base model, weights a
            PEFT adapter cannot carry, no run there.
        RunFolderError: `out` holds anything but an earlier export (or one without `force`).
    """
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise ExportModelError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_run_config(run_dir / "config.yaml")
    check_output_folder(out, MARKER_FILE, force, COMMAND)  # before any model loads
    if reward:
        source = _choose_reward(run_dir, round_idx)
        _check_reward_base(cfg, source)
    else:
        round_idx = _choose_round(run_dir, round_idx)
    examples = _splits(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        if reward:
            what, exported, card = _export_reward(cfg, run_dir, source, tmp, out, merge, examples, command)
        else:
            what, exported, card = _export_round(cfg, run_dir, round_idx, tmp, out, merge, examples, command)
        (tmp / "README.md").write_text(card)
        marker = {"made_by": COMMAND, "command": command, "run_dir": str(run_dir.resolve()), "exported": what,
                  "model_kind": cfg.model.kind, "merge": merge, "created": _now()}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        check_output_folder(out, MARKER_FILE, force, COMMAND)  # nothing else appeared there meanwhile
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ModelExport(out, what, exported)


def _export_round(cfg: RunConfig, run_dir: Path, round_idx: int, tmp: Path, out: Path, merge: bool,
                  examples: dict[str, list[Example] | str], command: str) -> tuple[str, ExportedModel, str]:
    round_dir = run_dir / f"round_{round_idx:02d}"
    vlm = load_vlm(cfg)
    trained = load_trainable_weights(vlm.model, round_dir / ADAPTERS_FILE, retrain_round_remedy(round_dir))
    vlm.model.eval()
    exported = _export_vlm(cfg, vlm, tmp, out, merge, trained, examples)
    what = f"round {round_idx}"
    rounds = trained_rounds(run_dir)
    lines = [
        f"# {cfg.name}, round {round_idx}: tuned with ILLUME on human feedback on rationales",
        "",
        f"{exported.description[0].upper()}{exported.description[1:]}: the model of the illume run `{cfg.name}` "
        f"as it was after round {round_idx} (rounds that trained: {', '.join(map(str, rounds))}), tuned by "
        f"`policy.kind={cfg.policy.kind}` on the rationales the critic (`critic.kind={cfg.critic.kind}`) "
        "accepted. ILLUME's loop: the model samples rationales for train questions, people (or a critic standing "
        "in for them) accept or reject them, the model is tuned on what was accepted, and again.",
        "",
        *_base_section(cfg),
        *_data_section(cfg, examples),
        *_feedback_section(cfg, run_dir, round_idx),
        *_results_section(run_dir),
        "## Use", "", "```python", exported.usage, "```", "",
        *_made_section(command, run_dir),
    ]
    return what, exported, _front_matter(exported) + "\n".join(lines) + "\n"


def _export_reward(cfg: RunConfig, run_dir: Path, source: Path, tmp: Path, out: Path, merge: bool,
                   examples: dict[str, list[Example] | str], command: str) -> tuple[str, ExportedModel, str]:
    rm = RewardModel.load(source, load_vlm(cfg), copy_backbone=False)
    trained = [name for name, p in rm.backbone.named_parameters() if p.requires_grad]  # what backbone.safetensors holds
    exported = _export_vlm(cfg, rm.vlm, tmp / "backbone", out / "backbone", merge, trained, examples)
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in rm.head.state_dict().items()},
                     tmp / "head.safetensors")
    facts = {name: _read_json(source / name) for name in ("split.json", "training.json", "reward_eval.json",
                                                           "reward_critic.json")}
    heldout = facts["reward_eval.json"] or {}
    config = {
        "threshold": rm.threshold, "target_precision": rm.target_precision,
        "platt": None if rm.platt is None else {"a": rm.platt[0], "b": rm.platt[1]},
        "probability": "P(people accept) = sigmoid(platt.a * reward + platt.b)", "pooling": rm.pooling,
        "hidden_size": rm.head.in_features, "base_model": _base_model(cfg), "base_model_identity": rm.backbone_id,
        "backbone": "backbone", "backbone_holds": exported.description, "head": "head.safetensors",
        "row": "the backbone's input for prompt + ' ' + rationale + EOS (the prompt as the policy's)",
        "reward": "head(final hidden states pooled over the rationale's tokens and EOS (mean) or at EOS (last))",
        "fitted_on_rounds_upto": (facts["split.json"] or {}).get("upto_round"),
        "heldout": {key: heldout.get(key) for key in ("pairwise_accuracy", "roc_auc", "precision", "recall",
                                                      "brier", "ece", "num_examples", "num_pairs")}
        if heldout else None,
    }
    (tmp / REWARD_EXPORT_FILE).write_text(json.dumps(config, indent=2) + "\n")
    where = source.relative_to(run_dir)
    what = f"the reward model of {where}/"
    upto = config["fitted_on_rounds_upto"]
    num_pairs = (facts["training.json"] or {}).get("num_train_pairs")
    threshold = "not calibrated" if rm.threshold is None else f"{rm.threshold:.4f}"
    lines = [
        f"# {cfg.name}: the reward model of {where}/, fitted with ILLUME on people's judgments of rationales",
        "",
        f"A reward model that scores a rationale for an (image, question, answer): the base model with its own "
        f"adapters ({exported.description}, in `backbone/`) and a linear head (`head.safetensors`) on its final "
        f"hidden states pooled by `{rm.pooling}`. Fitted (Bradley-Terry) on the judgments of the illume run "
        f"`{cfg.name}`" + ("" if upto is None else f" in rounds <= {upto}")
        + ("" if num_pairs is None else f", {num_pairs} training pairs") + f". Accept a rationale when its "
        f"reward >= {threshold}" + ("" if rm.target_precision is None else
                                    f" (calibrated to a held-out precision of {rm.target_precision})") + ".",
        "",
        *_base_section(cfg),
        *_data_section(cfg, examples),
        *_feedback_section(cfg, run_dir, upto),
        "## Held-out evaluation", "",
        *([f"- {key}: {'-' if value is None else round(value, 4)}" for key, value in config["heldout"].items()]
          if config["heldout"] else ["(no reward_eval.json beside the reward model)"]),
        "",
        "## Use", "",
        f"`{REWARD_EXPORT_FILE}` holds the threshold, Platt scaling's (a, b) of the accept probability "
        "(null when too few held-out judgments fitted them), the pooling and the base model. Load the "
        "backbone:", "",
        "```python", exported.usage, "```", "",
        "then score rows of prompt + \" \" + rationale + EOS, `start` being the rationale's first token:", "",
        "```python", _reward_usage(out, rm.pooling), "```", "",
        *_made_section(command, run_dir),
    ]
    return what, exported, _front_matter(exported) + "\n".join(lines) + "\n"


def _export_vlm(cfg: RunConfig, vlm, tmp: Path, out: Path, merge: bool, trained, examples) -> ExportedModel:
    try:
        return export_vlm(vlm, tmp, base_model=_base_model(cfg), merge=merge, trained=trained, where=str(out),
                          example=_example(examples))
    except ModelExportError as error:
        raise ExportModelError(str(error)) from error


def _check_reward_base(cfg: RunConfig, source: Path) -> None:
    try:
        check_reward_base(cfg, source)
    except ValueError as error:
        raise ExportModelError(str(error)) from error


# -------------------------------------------------------------------- the model card


def _front_matter(exported: ExportedModel) -> str:
    base = f"base_model: {exported.base_model}\n" if exported.base_model else ""
    return (f"---\nlibrary_name: {exported.library_name}\n{base}tags:\n- illume\n- vision-language\n"
            "- rationales\n- human-feedback\n---\n\n")


def _base_section(cfg: RunConfig) -> list[str]:
    base, identity = _base_model(cfg), model_identity(cfg)
    also = "" if identity == base else f"; illume's name for it: `{identity}`"
    return ["## Base model", "", f"- `{base}` (`model.kind={cfg.model.kind}`{also})", ""]


def _splits(cfg: RunConfig) -> dict[str, list[Example] | str]:
    """The run's splits: their examples, or why they cannot be read here (the card says so; a model exports
    without its data, e.g. on another machine than the run's, and a test split is optional)."""
    splits: dict[str, list[Example] | str] = {}
    for split in SPLITS:
        try:
            splits[split] = load_split(cfg.data, split)
        except DatasetError as error:
            splits[split] = str(error)
    return splits


def _example(examples: dict[str, list[Example] | str]) -> tuple[Image.Image, str]:
    """An (image, prompt) for the usage snippet: the first val (else train) question, else a grey image."""
    for split in ("val", "train"):
        if isinstance(examples[split], list):
            example = examples[split][0]
            return load_image(example), answer_prompt(example.question)
    return Image.new("RGB", (64, 64), "grey"), answer_prompt("What is shown?")


def _data_section(cfg: RunConfig, examples: dict[str, list[Example] | str]) -> list[str]:
    data = cfg.data
    source = ("the shapes world (illume.data.shapes, generated from its settings)" if data.kind == "shapes"
              else ", ".join(f"{split}: `{getattr(data, f'{split}_path')}`" for split in SPLITS
                             if getattr(data, f"{split}_path")))
    return ["## Data", "", f"- `data.kind={data.kind}`: {source}",
            *(f"- {split}: {len(rows)} questions" if isinstance(rows, list) else f"- {split}: not read here ({rows})"
              for split, rows in examples.items()), ""]


def _feedback_section(cfg: RunConfig, run_dir: Path, upto_round: int | None) -> list[str]:
    """Counts from the run's store (judgments of rounds <= upto_round; None: all), by the rules the run
    trained by (`feedback.aggregate`, `feedback.people`)."""
    scope = "every round" if upto_round is None else f"rounds <= {upto_round}"
    try:
        with store_for_run(run_dir) as store:
            judgments = store.num_judgments(upto_round=upto_round)
            by_people = store.num_judgments(upto_round=upto_round, kinds=cfg.feedback.people)
            feedback = read_feedback(store, upto_round=upto_round, aggregate=cfg.feedback.aggregate)
    except ExportError as error:
        return ["## Feedback", "", f"(the run's feedback store cannot be read: {error})", ""]
    return ["## Feedback", "", f"From the run's feedback store, {scope} (train questions; "
            f"`feedback.aggregate={cfg.feedback.aggregate}`):", "",
            f"- judgments: {judgments} (by people, kinds {', '.join(sorted(cfg.feedback.people))}: {by_people})",
            f"- items judged (a question in a round): {len(feedback.items)}, with an accepted rationale: "
            f"{feedback.items_with_accepted()}",
            f"- accepted rationales (distinct): {len(feedback.accepted())}", ""]


def _results_section(run_dir: Path) -> list[str]:
    results = _read_json(run_dir / "results.json")
    if not results:
        return []
    table = results_table(results)  # the table the loop prints after each round
    return [f"## Results: {table.title}", "", _markdown(table), ""]


def _markdown(table: Table) -> str:
    """A rich table as a Markdown table (the same headers and cells)."""
    header = [str(column.header) for column in table.columns]
    rows = zip(*(list(column.cells) for column in table.columns))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _made_section(command: str, run_dir: Path) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        made_by = f"illume-vlm {version('illume-vlm')}"
    except PackageNotFoundError:
        made_by = "illume"
    return ["## How it was made", "", f"By {made_by}, {_now()}, from the run folder `{run_dir.resolve()}`:", "",
            "```bash", command, "```"]


def _reward_usage(out: Path, pooling: str) -> str:
    pool = ("pooled = hidden[:, start:].mean(1)  # mean over the rationale's tokens and EOS" if pooling == "mean"
            else "pooled = hidden[:, -1]  # the EOS's state")
    return f"""import json
import math

from safetensors.torch import load_file

head = load_file({str(out / 'head.safetensors')!r})  # weight (1, D), bias (1,)
config = json.load(open({str(out / REWARD_EXPORT_FILE)!r}))
threshold, platt = config["threshold"], config["platt"]
# inputs: one row, the backbone's input (as above) for prompt + " " + rationale, then EOS
hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]  # (1, T, D), after the final norm
{pool}
reward = float(pooled @ head["weight"].T + head["bias"])
accepted = reward >= threshold
if platt is not None:  # the calibrated probability that people accept it
    probability = 1 / (1 + math.exp(-(platt["a"] * reward + platt["b"])))"""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
