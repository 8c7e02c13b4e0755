"""The reward model as a service: `illume reward serve RUN_DIR` scores rationales over HTTP, for RL engines
that run elsewhere (TRL's GRPOTrainer, verl, OpenRLHF: scripts/integrations/ and docs/reward-model.md).

    illume reward serve runs/demo [--round N] [--host 127.0.0.1 --port 8770 --token T]

Routes (JSON in and out; errors are `{"detail": ..., "errors": [{"field", "message"}]}`):
- `GET /health`, no token: `{"status": "ok", "model": {...}, "accept": ..., "probability": ..., "limits":
  {...}}`: which reward model is loaded (its folder under RUN_DIR and round, threshold, Platt's (a, b) or
  null, held-out precision, recall, Brier score and ECE), what `accept` and `probability` are (null when
  the model has none), and the limits.
- `POST /score`: `{"items": [{"image": BASE64, "question": Q, "answer": A, "rationale": R}, ...]}` ->
  `{"scores": [float, ...], "probability": [float, ...] | null, "accept": [bool, ...] | null, "threshold":
  float | null}`, parallel to the items.
  `image_path` (a path under the server's `--image-root`) may stand in for `image` when the server was
  started with one; by default images come as base64 only (a data: URL prefix is allowed).
- `POST /openrlhf`: OpenRLHF's remote reward request (`--reward.remote_url`, once `--remote_rm_url`):
  `{"query": [...], "prompts": [...], "labels": [...]}` -> `{"rewards": [...], "scores": [...], "extra_logs":
  {"accept": [...], "probability": [...]}}` (each log where the model has it), each label the item without
  its rationale (`{"image", "question", "answer"}`, as an object or a JSON string), the rationale the query's
  text after its prompt (`openrlhf_rationale`).

Assumptions, up front:
- An item is scored as the loop's reward critic scores a candidate: the rationale prompt
  `illume.prompts.rationale_prompt(question, answer)`, the image, and the rationale through
  `reward.model.score` (row = image + prompt + " " + rationale + EOS). The rationale's whitespace is
  normalised as the sampler stores it, and a leading "{answer}, seeing that" (the start of the reply in the
  chat format, which a chat model writes itself) is dropped (`rationale_text`).
- What the numbers mean. `scores` are the raw rewards (a Bradley-Terry head: only differences between
  rationales mean something). `probability` is the calibrated probability that people accept the rationale,
  sigmoid(a * score + b) (`reward.model.accept_probability`), with (a, b) fitted by Platt scaling on the
  held-out judgments by people (`reward.evaluate.fit_platt`); how good it is (its Brier score and expected
  calibration error there, in-sample and 2-fold cross-fit, beside the Brier score of always saying the
  acceptance rate) is in /health. It is null when the model has no (a, b): too few accepted or rejected
  held-out candidates to fit them (/health's `heldout.probability_unavailable` says which), or a model
  saved before they were kept; none is made up. `accept` is `score >= threshold`, the threshold calibrated
  on the same judgments to reach `target_precision` (its measured precision and a 2-fold cross-fit estimate
  are in /health); null when the model has no threshold. The two are fitted separately: `accept` is not
  `probability >= 0.5`.
- Batching: a request's items that show the same image with the same question and answer are one scored
  item (the image encoded once); rows are scored `batch_size` at a time. One request is scored at a time: the
  model is not thread-safe, so a lock serialises scoring (images are decoded before it, in the request's
  worker thread), and no request's rows can mix with another's.
- Protections (illume/http_guard.py, as the annotation page's): a `Host` header the server was not bound
  under gets 400; a body over `max_body_bytes` gets 413 before it is read; the token (`Authorization: Bearer
  T`, or `?token=T` for clients that cannot set a header, such as OpenRLHF) is checked from the headers and
  query before the body is read (401); more than `max_items` items get 413, as do images of more than
  `MAX_REQUEST_PIXELS` in all (read from their headers, before any is decoded); a malformed item gets 422
  naming the field and what is allowed. It binds 127.0.0.1 unless told otherwise, and then needs a token.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Strict, StringConstraints, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from illume.data.errors import DatasetError
from illume.data.records import Example, image_from_bytes
from illume.http_guard import add_guards, errors_response, validation_error
from illume.prompts import ChatStyle, rationale_prompt

MAX_TEXT_CHARS = 4096
"""The longest question, answer or rationale accepted (characters)."""
MAX_REQUEST_PIXELS = 1 << 26
"""The most pixels a request's distinct images may hold in all (67M: 256 images of 512 x 512), checked from their
headers before any is decoded (413 above): a small compressed file may decode to a huge image."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
"""The only files an `image_path` may name."""
HEALTH_PATH = "/health"
"""The one route that needs no token."""


@dataclass(frozen=True)
class ServeConfig:
    """How `illume reward serve` serves (its command-line options)."""

    host: str = "127.0.0.1"
    """Interface to bind; anything but loopback needs a token."""
    port: int = 8770
    """TCP port."""
    token: str | None = None
    """The token every route but /health requires; None: open (loopback only)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (the `Host` header) answered besides the bound host's own (a proxy's; "*.example.org")."""
    max_items: int = 256
    """The most items (rationales) one request may hold (413 above)."""
    max_body_bytes: int = 32 * 1024 * 1024
    """The largest request body read (413 above, refused before it is read)."""
    batch_size: int = 32
    """Rows (rationales) per forward pass of the reward model."""
    image_root: Path | None = None
    """A folder items may name images in (`image_path`, relative to it); None: images come as base64 only."""

    def __post_init__(self) -> None:
        for name in ("max_items", "max_body_bytes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServedModel:
    """A loaded reward model and what /health says about it."""

    rm: Any
    """The `reward.model.RewardModel`, in eval mode."""
    reward_dir: str
    """Its folder, relative to the run folder (reward/round_02, reward)."""
    round_idx: int | None
    """The round whose folder it is; None for RUN_DIR/reward (`illume reward train`)."""
    heldout: dict | None = None
    """Its held-out report (reward_eval.json: precision, recall, Brier score and ECE, cross-fit estimates,
    ROC-AUC), if written."""
    connective: str = ChatStyle.connective
    """How the run's chat format starts a reply (`prompt.connective`, slot {answer}): dropped from the start
    of a rationale (`rationale_text`)."""


HELDOUT_KEYS = ("target_precision", "precision", "recall", "precision_crossfit", "recall_crossfit", "brier",
                "ece", "brier_crossfit", "ece_crossfit", "brier_base_rate", "probability_unavailable", "roc_auc",
                "pairwise_accuracy", "num_candidates", "num_examples")
"""The facts of reward_eval.json that /health passes on."""


def load_served_model(run_dir: Path, round_idx: int | None = None) -> ServedModel:
    """The run's reward model (`reward.fitted.saved_reward_folder`: round_idx's, else RUN_DIR/reward, else the
    latest round's), rebuilt on the base model the run's config.yaml names.

    Raises:
        FileNotFoundError: no such reward model.
        ValueError: it was fitted on another base model.
        ConfigError: no readable config.yaml.
    """
    from illume.config import load_run_config
    from illume.loading import load_vlm
    from reward.evaluate import EVAL_FILE
    from reward.fitted import check_reward_base, saved_reward_folder
    from reward.model import RewardModel

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    folder = saved_reward_folder(run_dir, round_idx)
    check_reward_base(cfg, folder)  # before the model loads
    rm = RewardModel.load(folder, load_vlm(cfg), copy_backbone=False)
    eval_path = folder / EVAL_FILE
    heldout = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    name = folder.name
    return ServedModel(rm, folder.relative_to(run_dir).as_posix(),
                       int(name.removeprefix("round_")) if name.startswith("round_") else None,
                       {key: heldout.get(key) for key in HELDOUT_KEYS} if heldout else None,
                       cfg.prompt.connective)


# ------------------------------------------------------------------------------------------- requests

Text = Annotated[str, Strict(), StringConstraints(max_length=MAX_TEXT_CHARS)]
NonEmptyText = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1,
                                                          max_length=MAX_TEXT_CHARS)]
ITEM_FIELDS = ("image", "image_path", "question", "answer", "rationale")


class ScoreItem(BaseModel):
    """One item of POST /score: a rationale for an (image, question, answer)."""

    model_config = ConfigDict(extra="forbid")
    image: Annotated[str, Strict()] | None = None
    """The image file (PNG, JPEG, ...) as base64, optionally as a data: URL."""
    image_path: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=4096)] | None = None
    """A path relative to the server's --image-root (only when it has one)."""
    question: NonEmptyText
    answer: NonEmptyText
    rationale: Text
    """The rationale as the model wrote it after the prompt (see `rationale_text`)."""

    @model_validator(mode="after")
    def _one_image(self) -> ScoreItem:
        if (self.image is None) == (self.image_path is None):
            raise ValueError("give the image as exactly one of `image` (base64) or `image_path`")
        return self


@dataclass(frozen=True)
class Item:
    """A checked item, its image decoded."""

    image: Image.Image
    image_key: str
    """What identifies its image within a request (the base64 text or the path)."""
    question: str
    answer: str
    rationale: str


class RequestError(Exception):
    """A request refused: its status and field errors (`http_guard.errors_response`'s shape)."""

    def __init__(self, status_code: int, errors: list[dict]):
        super().__init__(errors)
        self.status_code, self.errors = status_code, errors


def _error(status_code: int, field: str | None, message: str) -> RequestError:
    return RequestError(status_code, [{"loc": tuple(field.split(".")) if field else (), "msg": message}])


def rationale_text(answer: str, text: str, connective: str = ChatStyle.connective) -> str:
    """The rationale scored for a completion `text`: whitespace normalised (as the sampler stores
    rationales), without a leading `connective` ("{answer}, seeing that": in the chat format a model writes
    it itself, and the scored prompt already ends with ILLUME's ", seeing that")."""
    text = " ".join(text.split())
    start = " ".join(connective.format(answer=answer).split())
    return text[len(start):].lstrip() if start and text.startswith(start) else text


def check_items(raw: Any, cfg: ServeConfig, field: str = "items",
                connective: str = ChatStyle.connective) -> list[Item]:
    """The items of a request, checked and their images decoded.

    Args:
        raw: The request's list of items (JSON).
        cfg: Its limits and image root.
        field: What error messages call the list.
        connective: `rationale_text`'s.

    Raises:
        RequestError: 413 for more than `cfg.max_items` items; 422 naming the first field(s) that are wrong.
    """
    if not isinstance(raw, list) or not raw:
        raise _error(422, field, "a non-empty list of items is required, each "
                                 "{image (base64) | image_path, question, answer, rationale}")
    if len(raw) > cfg.max_items:
        raise _error(413, field, f"at most {cfg.max_items} items per request (got {len(raw)}): send them in "
                                 "several requests")
    parsed, errors = [], []
    for i, item in enumerate(raw):
        try:
            parsed.append(ScoreItem.model_validate(item))
        except ValidationError as error:
            errors += [{**e, "loc": (field, i, *e["loc"]), "msg": _with_allowed(e)} for e in error.errors()]
    if errors:
        raise RequestError(422, errors)
    images: dict[str, Image.Image] = {}
    pixels = _PixelBudget(field)
    items = []
    for i, item in enumerate(parsed):
        key = item.image if item.image is not None else f"path:{item.image_path}"
        if key not in images:
            if item.image is not None:
                images[key] = _decode_image(item.image, f"{field}.{i}.image", pixels)
            else:
                images[key] = _read_image(item.image_path, cfg.image_root, f"{field}.{i}.image_path", pixels)
        items.append(Item(images[key], key, item.question, item.answer,
                          rationale_text(item.answer, item.rationale, connective)))
    return items


def _with_allowed(error: dict) -> str:
    """pydantic's message, with the allowed fields added where a field is unknown."""
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        return f"{message} (an item's fields: {', '.join(ITEM_FIELDS)})"
    return message


class _PixelBudget:
    """What is left of `MAX_REQUEST_PIXELS` while a request's images are opened."""

    def __init__(self, field: str):
        self.left, self.field = MAX_REQUEST_PIXELS, field

    def take(self, image: Image.Image) -> None:
        self.left -= image.width * image.height
        if self.left < 0:
            raise _error(413, self.field, f"the request's images hold more than {MAX_REQUEST_PIXELS} pixels in "
                                          "all: send fewer or smaller images per request")


def _decode_image(text: str, field: str, pixels: _PixelBudget) -> Image.Image:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _error(422, field, f"not base64 (standard alphabet, padded): {error}") from None
    if not data:
        raise _error(422, field, "empty: the image file as base64 is required")
    return _open(lambda: image_from_bytes(data, field), field, pixels)


def _read_image(ref: str, root: Path | None, field: str, pixels: _PixelBudget) -> Image.Image:
    if root is None:
        raise _error(422, field, "this server reads no image files (it was started without --image-root): "
                                 "send the image as base64 in `image`")
    base = root.resolve()
    try:
        path = (base / ref).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        path = None
    inside = path is not None and path.is_relative_to(base) and path.is_file()
    if not inside or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise _error(422, field, "no image file there: a path relative to the server's --image-root, ending "
                                 f"in one of {', '.join(IMAGE_SUFFIXES)}")
    return _open(lambda: image_from_bytes(path.read_bytes(), field), field, pixels)


def _open(opener: Callable[[], Image.Image], field: str, pixels: _PixelBudget) -> Image.Image:
    """The image, decoded now (so that a broken one is this request's 422, not a failure while scoring),
    once its header said that its pixels fit in the request's budget."""
    try:
        image = opener()  # the header only
    except Exception as error:
        raise _unreadable(error, field) from None
    pixels.take(image)
    try:
        image.load()
        return image
    except Exception as error:  # PIL raises several types for corrupt files
        raise _unreadable(error, field) from None


def _unreadable(error: Exception, field: str) -> RequestError:
    if isinstance(error, DatasetError):  # it names the image by `field`, which the 422 names anyway
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))  # PIL names its buffer
        return _error(422, field, message.replace(f"image {field}", "the image"))
    return _error(422, field, f"cannot read the image: {error}")


# ------------------------------------------------------------------------------------------- scoring

def score_items(rm: Any, items: Sequence[Item], batch_size: int) -> list[float]:
    """Rewards of the items, in their order, through `reward.model.score`: the items that show one image
    with one question and answer are one scored item (their image encoded once)."""
    from reward.model import score

    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.image_key, item.question, item.answer), []).append(i)
    scored = [(Example(f"request-item-{indices[0]}", items[indices[0]].image, question, [answer]),
               rationale_prompt(question, answer), [items[i].rationale for i in indices])
              for (_, question, answer), indices in groups.items()]
    rewards = [0.0] * len(items)
    for indices, values in zip(groups.values(), score(rm, scored, batch_size=batch_size), strict=True):
        for i, value in zip(indices, values, strict=True):
            rewards[i] = value
    return rewards


# ------------------------------------------------------------------------------------------- OpenRLHF

_END_MARKUP = re.compile(r"(?:\s*(?:<\|[^<>|\s]{1,40}\|>|</s>|<eos>|<end_of_turn>))+\s*$")
"""Special tokens a decoded query may end with (OpenRLHF decodes with skip_special_tokens=False)."""


def openrlhf_rationale(query: str, prompt: str) -> str | None:
    """The completion in an OpenRLHF query (`tokenizer.decode(prompt ids + response ids,
    skip_special_tokens=False)`): the text after the prompt, without the special tokens it ends with; None
    when the prompt's end is not in the query.

    A VLM's query holds its image tokens expanded (one per patch) where the prompt holds one placeholder, so
    when the query does not start with the prompt, the prompt's end (its last 512, 256, ... 16 characters: the
    text after the image) is looked up instead, and the completion is what follows its first occurrence.
    """
    if query.startswith(prompt):
        rest = query[len(prompt):]
    else:
        for size in (512, 256, 128, 64, 32, 16):
            tail = prompt[-size:]
            at = query.find(tail)
            if at >= 0:
                rest = query[at + len(tail):]
                break
        else:
            return None
    return _END_MARKUP.sub("", rest)


class OpenRLHFRequest(BaseModel):
    """What OpenRLHF POSTs to its remote reward URL (OpenRLHF 3c3be62, openrlhf/utils/agent.py,
    `SingleTurnAgentExecutor._fetch_rewards_via_http`): the decoded queries, the prompts and the dataset's
    labels (`--data.label_key`)."""

    model_config = ConfigDict(extra="ignore")  # as OpenRLHF's own serve_rm, which reads "query" alone
    query: list[Annotated[str, Strict()]]
    prompts: list[Annotated[str, Strict()]]
    labels: list[Any]

    @model_validator(mode="after")
    def _parallel(self) -> OpenRLHFRequest:
        if not len(self.query) == len(self.prompts) == len(self.labels):
            raise ValueError(f"query, prompts and labels must be parallel lists (got {len(self.query)}, "
                             f"{len(self.prompts)}, {len(self.labels)} entries)")
        return self


def openrlhf_items(body: OpenRLHFRequest, cfg: ServeConfig,
                   connective: str = ChatStyle.connective) -> list[Item]:
    """The items of an OpenRLHF request: each label (an object, or a JSON string of one: image or image_path,
    question, answer) with the rationale its query holds.

    Raises:
        RequestError: as `check_items`; fields are named `labels.N.x` and `query.N`.
    """
    if len(body.query) > cfg.max_items:
        raise _error(413, "query", f"at most {cfg.max_items} queries per request (got {len(body.query)})")
    raw = []
    for i, (query, prompt, label) in enumerate(zip(body.query, body.prompts, body.labels)):
        if isinstance(label, str):
            try:
                label = json.loads(label)
            except ValueError:
                label = None
        if not isinstance(label, dict):
            raise _error(422, f"labels.{i}", "each label is the item without its rationale: an object (or a "
                                             "JSON string of one) with image (base64) | image_path, question, "
                                             "answer")
        if "rationale" in label:
            raise _error(422, f"labels.{i}.rationale", "the rationale is read from the query, not the label")
        rationale = openrlhf_rationale(query, prompt)
        if rationale is None:
            raise _error(422, f"query.{i}", "the end of its prompt (prompts.N) is not in it: send the query "
                                            "as OpenRLHF decodes it (prompt + response)")
        raw.append({**label, "rationale": rationale})
    return check_items(raw, cfg, "labels", connective)


# ------------------------------------------------------------------------------------------- the app

def create_app(served: ServedModel, cfg: ServeConfig) -> FastAPI:
    """The reward service over a loaded reward model (the module doc has the routes).

    Args:
        served: The model and what /health says about it (`load_served_model`).
        cfg: Host, token, limits, image root.

    Returns:
        The FastAPI app; serve it with `illume.http_guard.serve` or uvicorn.
    """
    from reward.model import accept_probability

    app = FastAPI(title="illume reward", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, validation_error)
    rm = served.rm
    threshold, platt = rm.threshold, rm.platt
    lock = threading.Lock()  # one request's scoring at a time: the model is not thread-safe

    def scores_of(items: list[Item]) -> list[float]:
        with lock:
            return score_items(rm, items, cfg.batch_size)

    def accept_of(scores: list[float]) -> list[bool] | None:
        return None if threshold is None else [value >= threshold for value in scores]

    def probability_of(scores: list[float]) -> list[float] | None:
        return None if platt is None else accept_probability(scores, platt)

    def parsed(raw: bytes, parse: Callable[[Any], list[Item]]) -> list[Item]:
        try:
            payload = json.loads(raw)
        except ValueError:
            raise _error(422, None, "the body is not JSON") from None
        return parse(payload)

    async def answer(request: Request, parse: Callable[[Any], list[Item]],
                     reply: Callable[[list[float]], dict]) -> JSONResponse:
        raw = await request.body()  # the body limit (BodyLimit) applies while it is read
        try:  # parsing and decoding images in a worker thread, as scoring: the event loop stays free
            items = await run_in_threadpool(parsed, raw, parse)
        except RequestError as error:
            return errors_response(error.errors, error.status_code)
        return JSONResponse(reply(await run_in_threadpool(scores_of, items)))

    @app.get(HEALTH_PATH)
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            # (not the base model's identity: it may be a local path, and this route is open)
            "model": {"reward_dir": served.reward_dir, "round": served.round_idx, "pooling": rm.pooling,
                      "threshold": threshold, "target_precision": rm.target_precision,
                      "platt": None if platt is None else {"a": platt[0], "b": platt[1]},
                      "heldout": served.heldout},
            "accept": ("score >= threshold, calibrated on held-out judgments by people to reach "
                       "target_precision" if threshold is not None else None),
            "probability": ("P(people accept) = sigmoid(a * score + b), Platt scaling fitted on held-out "
                            "judgments by people" if platt is not None else None),
            "limits": {"max_items": cfg.max_items, "max_body_bytes": cfg.max_body_bytes,
                       "max_text_chars": MAX_TEXT_CHARS, "max_request_pixels": MAX_REQUEST_PIXELS,
                       "batch_size": cfg.batch_size,
                       "image_paths": cfg.image_root is not None},
        }

    @app.post("/score")
    async def score_route(request: Request) -> JSONResponse:
        def parse(payload: Any) -> list[Item]:
            if not isinstance(payload, dict) or set(payload) != {"items"}:
                raise _error(422, None, "the body is {\"items\": [...]}, each item {image (base64) | image_path, "
                                        "question, answer, rationale}")
            return check_items(payload["items"], cfg, connective=served.connective)

        return await answer(request, parse, lambda scores: {
            "scores": scores, "probability": probability_of(scores), "accept": accept_of(scores),
            "threshold": threshold})

    @app.post("/openrlhf")
    async def openrlhf_route(request: Request) -> JSONResponse:
        def parse(payload: Any) -> list[Item]:
            try:
                body = OpenRLHFRequest.model_validate(payload)
            except ValidationError as error:
                raise RequestError(422, error.errors()) from None
            return openrlhf_items(body, cfg, served.connective)

        def reply(scores: list[float]) -> dict:
            accept, probability = accept_of(scores), probability_of(scores)
            # extra_logs become tensors in OpenRLHF: numbers, not booleans
            extra = {} if accept is None else {"accept": [float(a) for a in accept]}
            if probability is not None:
                extra["probability"] = probability
            return {"rewards": scores, "scores": scores, "extra_logs": extra}

        return await answer(request, parse, reply)

    def identify(request: Request) -> None:
        if cfg.token is None:
            return None
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else request.query_params.get("token", "")
        if not secrets.compare_digest(given.encode(), cfg.token.encode()):
            raise HTTPException(401, "this reward service needs its token: `Authorization: Bearer TOKEN` (or "
                                     "?token=TOKEN in the URL)", headers={"WWW-Authenticate": "Bearer"})
        return None

    add_guards(app, identify=identify, is_open=lambda path: path == HEALTH_PATH, host=cfg.host,
               extra_hosts=cfg.allowed_hosts, hosts_setting="--allowed-host", max_body_bytes=cfg.max_body_bytes,
               body_setting="--max-body-bytes")
    return app

