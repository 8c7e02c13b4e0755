"""Exports of a run's feedback store: TRL-format datasets (SFT, DPO, KTO) and a flat JSONL of every decision.

    illume export RUN_DIR --format sft|dpo|kto|jsonl [--out PATH] [--round N | --upto-round N]
                  [--split train|val|test|all] [--aggregate majority|any|unanimous] [--as-jsonl]
                  [--conversational] [--no-images]

What the rows are (every row also has `images`, `example_id`, `round_idx`, `annotators`, `created_at`).
Which candidates are accepted, rejected or contested is decided by `illume.feedback.verdicts` (its docstring
has the rules: revisions, several annotators by `--aggregate`, the same text in several rounds, "none fits"),
the same code the loop, the reward model, DPO and KTO read, so an export is exactly what they train on:

- `sft`  {prompt, completion}: one row per accepted rationale (`Feedback.accepted`), completion =
  " " + rationale (the prompt ends with "seeing that"): the loop's selection-SFT targets.
- `dpo`  {prompt, chosen, rejected}: `Feedback.pairs`: a candidate accepted in an item against a candidate
  of the same item whose rationale is rejected, deduplicated; `illume dpo` trains on the same pairs whether it
  reads RUN_DIR or this export (reference pairs, `policy.dpo.reference_as_chosen`, are not exported).
- `kto`  {prompt, completion, label}: `Feedback.labelled`: one row per rationale that is not contested,
  label True = accepted.
- `jsonl`: one flat object per decision (judgment x candidate shown) with everything the store holds,
  including each annotator's kind and the rationale a person wrote (`correction`, else null).

Corrections (`annotate.corrections`, rule 8 of the verdicts module) are accepted rationales: they appear as
`sft` rows, as `chosen` against the item's rejected candidates in `dpo`, and as `kto` rows labelled True.

`annotators` and `created_at` are parallel lists, oldest first: the judgments behind the row (SFT and
KTO True: those that accepted it; KTO False: those that rejected it; DPO: those of the item, which saw
both candidates), with the time of each judgment as an ISO-8601 UTC string.

Images: `images` holds one image per row, TRL's vision format (a list of images). In a saved dataset it is a
`Sequence(Image())` column, so `load_from_disk` gives PIL images; `save_to_disk` embeds the image bytes, so the
export does not depend on the run's image files. In JSONL files it is a list of absolute paths. An item's
image is its stored `image_ref` (a path, relative to the run directory unless absolute); items stored without
one take the image of the example in the run's dataset (config.yaml, e.g. the in-memory shapes world; those
are written as PNG files beside a JSONL export). `--no-images` exports text only (no `images` column).

Rows follow the run's prompt format (`prompt.format`, illume.prompts). In the chat format they are TRL's
conversational rows, as the run rendered them: prompt = [{"role": "user", "content": [{"type": "image"},
{"type": "text", "text": the user's turn}]}], each completion = [{"role": "assistant", "content": [{"type":
"text", "text": connective + " " + rationale}]}] (the whole assistant turn, as the run labels it), so TRL's
trainers render them with the model's own chat template and take them as they are. In the plain format
`--conversational` writes the plain prompt as one user message ([{"role": "user", "content": prompt}]) and the
completion as one assistant message; TRL then puts the image placeholder into the user turn.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from illume.feedback.reads import JudgedItem, Judgment
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import AGGREGATES, DEFAULT_AGGREGATE, Feedback
from illume.prompts import ChatStyle
from illume.run_folder import RunFolderError, check_new_path

FORMATS = ("sft", "dpo", "kto", "jsonl")
DATASET_FORMATS = ("sft", "dpo", "kto")
SPLIT_CHOICES = ("train", "val", "test", "all")

ACCEPTED, REJECTED, CONTESTED = "accepted", "rejected", "contested"


class ExportError(ValueError):
    """An export that cannot be made: no store, nothing judged, no pairs, an unreadable image, ..."""


# -------------------------------------------------------------------- rows

ImagesOf = Callable[[JudgedItem], list[Any]]
"""An item -> the value of its rows' `images` column."""

def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _provenance(judgments: Iterable[Judgment]) -> dict[str, list[str]]:
    """Parallel `annotators` / `created_at` lists of distinct judgments, oldest first."""
    unique = sorted({j.id: j for j in judgments}.values(), key=lambda j: (j.created_at, j.id))
    return {"annotators": [j.annotator for j in unique], "created_at": [_iso(j.created_at) for j in unique]}


@dataclass(frozen=True)
class RowFormat:
    """How a row writes its prompt and completions: plain text, one message each (`conversational`), or the
    chat format's turns (`chat`; `images`: the user's turn shows the image)."""

    conversational: bool = False
    chat: ChatStyle | None = None
    images: bool = True

    @property
    def messages(self) -> bool:
        return self.conversational or self.chat is not None

    def prompt(self, prompt: str) -> Any:
        if self.chat is not None:
            parts = [{"type": "image", "text": None}] if self.images else []
            return [{"role": "user", "content": [*parts, {"type": "text", "text": self.chat.turns(prompt).user}]}]
        return [{"role": "user", "content": prompt}] if self.conversational else prompt

    def completion(self, prompt: str, text: str) -> Any:
        if self.chat is not None:
            reply = self.chat.turns(prompt).reply
            content = f"{reply} {text}" if reply else text
            return [{"role": "assistant", "content": [{"type": "text", "text": content}]}]
        return [{"role": "assistant", "content": text}] if self.conversational else " " + text


def _meta(item: JudgedItem, images_of: ImagesOf | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"example_id": item.example_id, "round_idx": item.round_idx}
    if images_of is not None:
        meta["images"] = images_of(item)
    return meta


def sft_rows(feedback: Feedback, images_of: ImagesOf | None = None,
             form: RowFormat = RowFormat()) -> list[dict[str, Any]]:
    """{prompt, completion}: `Feedback.accepted`, the loop's selection-SFT targets (see the module doc)."""
    return [{
        "prompt": form.prompt(row.item.prompt),
        "completion": form.completion(row.item.prompt, row.text),
        **_meta(row.item, images_of), **_provenance(row.judgments),
    } for row in feedback.accepted()]


def kto_rows(feedback: Feedback, images_of: ImagesOf | None = None,
             form: RowFormat = RowFormat()) -> list[dict[str, Any]]:
    """{prompt, completion, label}: `Feedback.labelled`, what `illume kto RUN_DIR` trains on."""
    return [{
        "prompt": form.prompt(row.item.prompt),
        "completion": form.completion(row.item.prompt, row.text),
        "label": row.accepted,
        **_meta(row.item, images_of), **_provenance(row.judgments),
    } for row in feedback.labelled()]


def dpo_rows(feedback: Feedback, images_of: ImagesOf | None = None,
             form: RowFormat = RowFormat()) -> list[dict[str, Any]]:
    """{prompt, chosen, rejected}: `Feedback.pairs` (no reference pairs), what `illume dpo RUN_DIR` trains on.

    A pair repeated in several rounds (same example, prompt and texts) is one row with the first round and
    the judgments of all of them.
    """
    rows = []
    for pair in feedback.pairs():
        assert pair.item is not None  # pairs from the store carry their item
        rows.append({
            "prompt": form.prompt(pair.prompt),
            "chosen": form.completion(pair.prompt, pair.chosen),
            "rejected": form.completion(pair.prompt, pair.rejected),
            **_meta(pair.item, images_of), **_provenance(pair.judgments),
        })
    return rows


def judgment_rows(items: list[JudgedItem], images_of: ImagesOf | None = None) -> list[dict[str, Any]]:
    """One flat row per decision (judgment x candidate shown); a judgment of an item without candidates
    gives one row with the candidate fields None."""
    rows = []
    for item in items:
        item_fields = {
            "round_idx": item.round_idx, "split": item.split, "example_id": item.example_id,
            "prompt": item.prompt, "answer": item.answer, "predicted_answer": item.predicted_answer,
            "item_seed": item.seed, "image_ref": item.image_ref,
        }
        if images_of is not None:
            item_fields["images"] = images_of(item)
        for judgment in item.judgments:
            judgment_fields = {
                "judgment_id": judgment.id, "annotator": judgment.annotator,
                "annotator_kind": judgment.annotator_kind, "none_fit": judgment.none_fit,
                "correction": judgment.correction, "seconds": judgment.seconds, "created_at": _iso(judgment.created_at),
                "updated_at": _iso(judgment.updated_at) if judgment.updated_at else None,
                "client_token": judgment.client_token,
            }
            shown = [c for c in item.candidates if c.id in judgment.decisions]
            for candidate in shown or [None]:
                candidate_fields = {
                    "candidate_id": None, "position": None, "text": None, "temperature": None, "seed": None,
                    "sample_idx": None, "logprob": None, "model": None, "position_shown": None, "accepted": None,
                }
                if candidate is not None:
                    candidate_fields = {
                        "candidate_id": candidate.id, "position": candidate.position, "text": candidate.text,
                        "temperature": candidate.temperature, "seed": candidate.seed,
                        "sample_idx": candidate.sample_idx, "logprob": candidate.logprob, "model": candidate.model,
                        "position_shown": judgment.positions_shown.get(candidate.id),
                        "accepted": judgment.decisions[candidate.id],
                    }
                rows.append({**item_fields, **candidate_fields, **judgment_fields})
    return rows


# -------------------------------------------------------------------- images


class ImageResolver:
    """An item's image: its `image_ref` (relative to the run directory) or its example's in-memory image.

    Args:
        run_dir: Where relative image refs point, and whose config.yaml gives the dataset for items stored
            without an image ref (loaded only if such an item is met).
        as_paths: Give absolute path strings (JSONL); in-memory images are then written as PNG files
            into `image_dir`. Otherwise give what a `datasets.Image` feature encodes (a path string, or
            {"bytes": PNG, "path": None}).
        image_dir: Where in-memory images are written when `as_paths`.
    """

    def __init__(self, run_dir: Path, as_paths: bool = False, image_dir: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.as_paths = as_paths
        self.image_dir = image_dir
        self._examples: dict[tuple[str, str], Any] = {}
        self._loaded_splits: set[str] = set()
        self._cache: dict[tuple[str, str, str | None], Any] = {}

    def __call__(self, item: JudgedItem) -> list[Any]:
        key = (item.split, item.example_id, item.image_ref)
        if key not in self._cache:
            self._cache[key] = self._resolve(item)
        return [self._cache[key]]

    def _where(self, item: JudgedItem) -> str:
        return f"example {item.example_id!r} (round {item.round_idx}, {item.split})"

    def _resolve(self, item: JudgedItem) -> Any:
        if item.image_ref is not None:
            path = Path(item.image_ref).expanduser()
            path = path if path.is_absolute() else self.run_dir / path
            path = path.resolve()
            if not path.is_file():
                raise ExportError(f"image not found: {path} (image_ref {item.image_ref!r} of {self._where(item)})")
            return str(path)
        image = self._dataset_image(item)
        if isinstance(image, (str, Path)):
            path = Path(image).resolve()
            if not path.is_file():
                raise ExportError(f"image not found: {path} (the dataset's image of {self._where(item)})")
            return str(path)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        if not self.as_paths:
            return {"bytes": buffer.getvalue(), "path": None}
        assert self.image_dir is not None
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{_file_name(item.split + '-' + item.example_id)}.png"
        path.write_bytes(buffer.getvalue())
        return str(path.resolve())

    def _dataset_image(self, item: JudgedItem) -> Any:
        if item.split not in self._loaded_splits:
            self._load_split(item)
        try:
            return self._examples[(item.split, item.example_id)]
        except KeyError:
            raise ExportError(
                f"{self._where(item)} has no image_ref in the store and is not in the run's {item.split} "
                f"dataset ({self.run_dir / 'config.yaml'}); export with --no-images for text only"
            ) from None

    def _load_split(self, item: JudgedItem) -> None:
        from illume.config import ConfigError, load_run_config
        from illume.data.datasets import DatasetError, load_split

        config_path = self.run_dir / "config.yaml"
        if not config_path.is_file():
            raise ExportError(
                f"{self._where(item)} has no image_ref in the store and there is no {config_path} to find "
                "its dataset; export with --no-images for text only"
            )
        try:
            examples = load_split(load_run_config(config_path).data, item.split)
        except (ConfigError, DatasetError, OSError, ValueError) as error:
            raise ExportError(
                f"items have no image_ref and the run's {item.split} dataset cannot be loaded: {error}"
            ) from error
        self._loaded_splits.add(item.split)
        self._examples.update({(item.split, e.id): e.image for e in examples})


def _file_name(text: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


# -------------------------------------------------------------------- datasets and files


def features_for(fmt: str, images: bool = True, form: RowFormat = RowFormat()):
    """The `datasets.Features` of a saved sft/dpo/kto export."""
    from datasets import Features, Image, Sequence, Value

    text = Value("string")
    if form.chat is not None:
        message = [{"role": text, "content": [{"type": text, "text": text}]}]
    else:
        message = [{"role": text, "content": text}] if form.conversational else text
    columns: dict[str, Any] = {"prompt": message}
    if fmt == "sft":
        columns["completion"] = message
    elif fmt == "dpo":
        columns.update(chosen=message, rejected=message)
    elif fmt == "kto":
        columns.update(completion=message, label=Value("bool"))
    else:
        raise ValueError(f"format must be one of {DATASET_FORMATS}, got {fmt!r}")
    if images:
        columns["images"] = Sequence(Image())
    columns.update(example_id=text, round_idx=Value("int64"), annotators=Sequence(text),
                   created_at=Sequence(text))
    return Features(columns)


def to_dataset(rows: list[dict[str, Any]], fmt: str, images: bool = True, form: RowFormat = RowFormat()):
    """The rows as a `datasets.Dataset` with `features_for(fmt, ...)`."""
    from datasets import Dataset

    features = features_for(fmt, images, form)
    return Dataset.from_list([{name: row[name] for name in features} for row in rows], features=features)


@dataclass
class ExportResult:
    format: str
    path: Path
    """The dataset directory (`datasets.load_from_disk(path)`) or the JSONL file."""
    num_rows: int


def _run_aggregate(run_dir: Path) -> str:
    """The run's `feedback.aggregate` from RUN_DIR/config.yaml, else the default."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return DEFAULT_AGGREGATE
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.select(OmegaConf.load(config_path), "feedback.aggregate",
                                    default=DEFAULT_AGGREGATE))
    except Exception as error:  # a broken YAML file
        raise ExportError(f"cannot read {config_path}: {error}") from error


def store_for_run(run_dir: str | Path) -> FeedbackStore:
    """The run's feedback store: `store_url` of RUN_DIR/config.yaml if set, else RUN_DIR/feedback.db.

    Raises:
        ExportError: No such run directory or no store there (nothing is created).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    url = None
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        from omegaconf import OmegaConf

        try:
            url = OmegaConf.load(config_path).get("store_url")
        except Exception as error:  # a broken YAML file
            raise ExportError(f"cannot read {config_path}: {error}") from error
    if url:
        url = str(url)
        if "://" in url:  # a SQLAlchemy URL; a plain path is a SQLite file, as in the loop
            parsed = make_url(url)
            database = parsed.database if parsed.get_backend_name() == "sqlite" else None
        else:
            database = url
        if database not in (None, "", ":memory:") and not Path(database).expanduser().is_file():
            raise ExportError(f"no feedback store at {database} (store_url of {config_path})")
        return FeedbackStore(url, create=False)
    path = run_dir / "feedback.db"
    if not path.is_file():
        raise ExportError(f"no feedback store at {path}: is {run_dir} a run directory?")
    return FeedbackStore(path, create=False)


def export(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    round_idx: int | None = None,
    upto_round: int | None = None,
    split: str = "train",
    aggregate: str | None = None,
    as_jsonl: bool = False,
    conversational: bool = False,
    chat: ChatStyle | None = None,
    images: bool = True,
    force: bool = False,
) -> ExportResult:
    """Export a run's feedback in one format (see the module doc for the rows).

    Args:
        run_dir: The run directory (its config.yaml and feedback.db).
        fmt: "sft", "dpo", "kto" or "jsonl".
        out: Where to write: the dataset directory, or the .jsonl file for fmt="jsonl" or `as_jsonl`.
            Default: RUN_DIR/exports/<fmt> (a dataset) or RUN_DIR/exports/<fmt>.jsonl. Nothing that exists
            is replaced unless `force`, and never a run's own files (`illume.run_folder.check_new_path`).
        round_idx: Only this round's items.
        upto_round: Only items of rounds <= upto_round.
        split: The items' split ("train", "val", "test"), or "all".
        aggregate: How several annotators' judgments of an item combine (illume.feedback.verdicts); None: the
            run's `feedback.aggregate` (config.yaml), so the export is what the run trained on.
        as_jsonl: Write sft/dpo/kto as JSONL (images as absolute paths) rather than a saved dataset.
        conversational: TRL's conversational format (messages) rather than plain text.
        chat: The run's chat format (`illume.models.loading.chat_format`; None: the plain format): TRL's
            conversational rows in its turns, whatever `conversational` says.
        images: Write the `images` column.
        force: Replace an existing `out`: a file, or a folder holding an earlier export (a saved dataset).

    Raises:
        ExportError: No store, no judgments, no rows (e.g. no DPO pair), an unreadable image, a bad out path.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if split not in SPLIT_CHOICES:
        raise ExportError(f"split must be one of {SPLIT_CHOICES}, got {split!r}")
    if round_idx is not None and upto_round is not None:
        raise ExportError("give either round_idx or upto_round, not both")
    aggregate = aggregate or _run_aggregate(Path(run_dir))
    if aggregate not in AGGREGATES:
        raise ExportError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    run_dir = Path(run_dir)
    jsonl = as_jsonl or fmt == "jsonl"
    default = run_dir / "exports" / (f"{fmt}.jsonl" if jsonl else fmt)
    out = Path(out) if out is not None else default
    _check_out(out, jsonl, force)

    with store_for_run(run_dir) as store:
        items = store.judged_items(None if split == "all" else split, round_idx=round_idx,
                                   upto_round=upto_round)
        if not items:
            scope = ", ".join(filter(None, [
                f"split {split}" if split != "all" else "",
                f"round {round_idx}" if round_idx is not None else "",
                f"rounds <= {upto_round}" if upto_round is not None else "",
            ]))
            raise ExportError(f"no judgments in the feedback store {store.url}" + (f" ({scope})" if scope else ""))

    images_of = None
    if images:
        images_of = ImageResolver(run_dir, as_paths=jsonl, image_dir=out.parent / f"{out.stem}_images")
    if fmt == "jsonl":
        rows = judgment_rows(items, images_of)
    else:
        build = {"sft": sft_rows, "dpo": dpo_rows, "kto": kto_rows}[fmt]
        rows = build(Feedback(items, aggregate), images_of, RowFormat(conversational, chat, images))
    if not rows:
        raise ExportError({
            "sft": "no accepted rationale to export (no candidate was accepted by enough judgments)",
            "dpo": "no DPO pairs: no item has both an accepted and a rejected candidate",
            "kto": "no judged candidate to export (the judged items have no candidates, or all are contested)",
            "jsonl": "no decisions to export",
        }[fmt])

    if jsonl:
        _write_jsonl(rows, out)
    else:
        _save_dataset(to_dataset(rows, fmt, images, RowFormat(conversational, chat, images)), out)
    return ExportResult(format=fmt, path=out, num_rows=len(rows))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _check_out(out: Path, jsonl: bool, force: bool) -> None:
    """Before anything is read: `out` may be written (new, or replaceable with `force`), and is of the right
    kind (a file for JSONL, a dataset folder otherwise)."""
    if jsonl and out.is_dir():
        raise ExportError(f"{out} is a directory; the JSONL export needs a file path")
    try:
        check_new_path(out, force)
        if jsonl:  # the PNG files of in-memory images go beside the file
            check_new_path(out.parent / f"{out.stem}_images", force)
    except RunFolderError as error:
        raise ExportError(str(error)) from error
    if not jsonl:
        _check_replaceable(out)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (_is_saved_dataset(out) or not any(out.iterdir()))):
        raise ExportError(f"{out} exists and is not a saved dataset; choose another --out")


def _save_dataset(dataset: Any, out: Path) -> None:
    """save_to_disk into a fresh folder beside `out`, then swap it in (an old export is replaced whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        dataset.save_to_disk(str(tmp))
        _check_replaceable(out)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_jsonl(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
