"""The annotation web app: people critique candidate rationales in a page, the feedback store keeps it.

    illume annotate runs/demo                      # the usual way (see illume/cli.py)
    python -m illume.annotate.server --store runs/demo/feedback.db --run-dir runs/demo --port 8765

A JSON API and one static page (static/: plain JS, no build step). Assumptions, up front:
- The store is the only state: leases, judgments and the order candidates were shown in are written to it,
  so the server can be killed (-9) and restarted at any time. A judgment is answered 200 only after its
  transaction committed; a repeated submission of an item the annotator already judged (a retry with the
  same `client_token`, a second tab) is answered 200 with `duplicate: true` and stored once if it makes the
  same choices, and 409 with the stored judgment (`stored`) if it makes others: the page shows what is
  stored and offers to revise it (PUT), so a new choice is never dropped while the page says "saved".
- Every request passes three checks before any route runs (illume/http_guard.py, shared with the reward
  model service), in this order: its `Host` header must name the bound host (the loopback names for a
  loopback bind; this machine's names and addresses for 0.0.0.0/::; else the host itself) or one of
  `annotate.allowed_hosts` (400 otherwise: a web page that DNS-rebinds its own name to 127.0.0.1 reaches
  nothing); its body may be at most `annotate.max_body_bytes` (413: refused on its Content-Length before a
  byte is read, a streamed body as soon as it passes the limit, so the server never holds more than that);
  and its token (below) is checked from the headers and query alone, before the body is read or parsed
  (401). Only the static files need no token.
- Items are handed out so that each gets `annotations_per_item` judgments, each by a different person: an
  item handed to a page is leased to that annotator for `lease_seconds` (the page renews the lease while
  it shows the item) and goes back to the pool when the lease expires.
- Model-generated text is data: the API returns it as JSON strings and the page renders it with
  `textContent` only. Images are served from the item's own `image_ref` (inside RUN_DIR/images, or an
  absolute path the loop recorded) and never from a path the client sends.
- Who is asking. With accounts (`illume annotators add NAME`, stored in the store's `accounts` table, only
  a hash of each token), every route but the static files needs a personal token (`Authorization: Bearer
  ...` or `?token=...`, the link `illume annotators add` printed); the annotator is the token's account, a
  name sent in a request is never used to choose it (one that differs is answered 403), so a person reads,
  leases and revises only their own judgments; a revoked or unknown token gets 401 at its next request.
  The admin page and its API need the admin role (403 otherwise). Without accounts, the one shared token
  (`--token`), if any, lets anyone in, who then names themselves (the one-person loopback flow). Account
  tokens are looked up by their hash and the shared token is compared in constant time.
"""

from __future__ import annotations

import argparse
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, model_validator

from illume.annotate.admin import admin_routes
from illume.config import AnnotateConfig
from illume.feedback.queue import AnnotationQueue, JudgmentConflict
from illume.feedback.store import FeedbackStore
from illume.feedback.writes import MAX_CORRECTION_CHARS
from illume.http_guard import IDENTITY, add_guards, is_loopback, serve, validation_error

STATIC_DIR = Path(__file__).parent / "static"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}
"""The only files the image route serves, by suffix."""
SPLIT = "train"
"""People judge the train candidates (val/test candidates are for evaluation)."""
OPEN_PREFIX = "/static/"
"""Paths that need no token: the script and the style sheet hold no data."""

AnnotatorName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255,
                                                 pattern=r"^[^\x00-\x1f\x7f]+$")]
CandidateIds = Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(max_length=1000)]
RowId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class NextRequest(BaseModel):
    """POST /api/next."""

    model_config = ConfigDict(extra="forbid")
    annotator: AnnotatorName | None = None
    """Who asks; with accounts it comes from the token (and may be left out)."""


class LeaseRequest(BaseModel):
    """POST /api/lease: the page still shows this item (a heartbeat)."""

    model_config = ConfigDict(extra="forbid")
    annotator: AnnotatorName | None = None
    item_id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]


class JudgmentRequest(BaseModel):
    """POST and PUT /api/judgment."""

    model_config = ConfigDict(extra="forbid")
    annotator: AnnotatorName | None = None
    item_id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]
    accepted: CandidateIds = []
    """Ids of the accepted candidates."""
    none_fit: StrictBool = False
    """The explicit "none of them fits"."""
    seconds: Annotated[float, Field(ge=0, le=7 * 24 * 3600)] | None = None
    """Time spent on the item (on a PUT: time spent revising, added to the recorded time)."""
    client_token: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    """The page's id for this submission (one per item shown): a repeat is stored once."""
    shown_order: CandidateIds | None = None
    """The item's candidate ids in the order shown; default: the order the server handed out."""
    correction: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                 max_length=MAX_CORRECTION_CHARS)] | None = None
    """With none_fit and `annotate.corrections`: the rationale the person wrote instead."""

    @model_validator(mode="after")
    def _one_answer(self) -> JudgmentRequest:
        if self.none_fit and self.accepted:
            raise ValueError("none_fit=true together with accepted candidates: choose one or the other")
        if self.correction is not None and not self.none_fit:
            raise ValueError("a correction comes with none_fit=true (it replaces the candidates)")
        if not self.none_fit and not self.accepted:
            raise ValueError("nothing chosen: accept at least one candidate or send none_fit=true")
        if len(set(self.accepted)) != len(self.accepted):
            raise ValueError("a candidate is listed twice in accepted")
        if self.seconds is not None and not math.isfinite(self.seconds):
            raise ValueError("seconds must be a finite number")
        return self


@dataclass(frozen=True)
class Identity:
    """Who sent a request: an account (name and role, from its token), or, without accounts, whoever holds
    the page (name None: the request names the annotator; role admin: the one-person flow sees everything)."""

    name: str | None
    role: str

    def annotator(self, named: str | None) -> str:
        """The annotator a request acts as. With an account: the account's name; naming anyone else is a 403
        (so no request can read or change another person's judgments). Without: the name the request sends."""
        if self.name is None:
            if named is None:
                raise HTTPException(422, "annotator: say who is annotating (the page asks for a name)")
            return named
        if named is not None and named != self.name:
            raise HTTPException(403, f"this link belongs to {self.name!r}: you can only act as yourself")
        return self.name


def create_app(
    store: FeedbackStore,
    run_dir: Path | None,
    cfg: AnnotateConfig,
    token: str | None = None,
    round_idx: int | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    assist: Callable[[dict[str, Any]], tuple[dict[int, float], float]] | None = None,
) -> FastAPI:
    """The annotation app over a feedback store.

    Args:
        store: Where items are read from and leases and judgments written to.
        run_dir: The run directory; relative `image_ref`s are looked up in run_dir/images. None: only
            absolute image paths are served.
        cfg: Annotations per item, lease time and guidelines; `host` (the interface bound) and
            `allowed_hosts` give the `Host` names answered, `max_body_bytes` the largest body read.
        token: Access token every /api route and the page require; None: open (loopback only).
        round_idx: The round to judge; None: the latest round with items that still need judgments,
            looked up on every request (the page moves on to a new round when the loop adds one).
        clock: Current UTC time for leases (tests); default: the system clock.
        assist: Reward-model help (`annotate.assist`): maps an item to ({candidate id: score}, threshold);
            candidates are then shown best first and those scoring >= threshold come pre-checked (the person
            still submits; the order shown is recorded with the judgment as always).

    Returns:
        The FastAPI app; serve it with `serve` or uvicorn.
    """
    app = FastAPI(title="illume annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(JudgmentConflict, _judgment_conflict)
    queue = AnnotationQueue(store)
    per_item = cfg.annotations_per_item
    images_dir = (run_dir / "images").resolve() if run_dir is not None else None

    def now() -> datetime | None:
        return clock() if clock is not None else None

    def authenticate(request: Request) -> Identity:
        """Who sends `request`, from its headers and query (run by `Authenticate`, before any route)."""
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else request.query_params.get("token", "")
        # Looked up on every request, so that an account added or revoked while the page runs counts at once.
        # A valid account token answers it in one read; only without one: are there accounts at all?
        account = store.account_for_token(given)
        if account is not None:
            return Identity(account.name, account.role)
        if store.has_accounts():
            raise HTTPException(401, "this link is not valid (revoked, mistyped or missing its token): ask "
                                     "the study's admin for your link (`illume annotators add`)",
                                headers={"WWW-Authenticate": "Bearer"})
        if token is not None and not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "this page needs its access token: open the URL that `illume annotate` "
                                     "printed (it ends in ?token=...)",
                                headers={"WWW-Authenticate": "Bearer"})
        return Identity(None, "admin")

    def identify(request: Request) -> Identity:
        """Who asks, as `Authenticate` settled it (every route but the static files is behind it)."""
        return request.scope[IDENTITY]

    # (Depends as a default, not in Annotated[...]: with postponed annotations FastAPI resolves names in the
    # module's globals, where these local functions are not.)
    def require_admin(me: Identity = Depends(identify)) -> Identity:
        if me.role != "admin":
            raise HTTPException(403, f"{me.name!r} is an annotator: the admin page needs the admin role "
                                     "(`illume annotators add NAME --role admin`)")
        return me

    me_ = Depends(identify)

    def current_round() -> int | None:
        return round_idx if round_idx is not None else queue.open_round(per_item, SPLIT)

    def progress(round_: int | None, annotator: str) -> dict[str, Any] | None:
        if round_ is None:
            return None
        counts = queue.annotation_progress(round_, per_item, annotator, SPLIT)
        return {
            "mine": {"judged": counts["mine"], "total": counts["items"]},
            "everyone": {"judged": counts["counted_judgments"], "total": counts["needed_judgments"]},
            "round": {"judged": counts["complete_items"], "total": counts["items"]},
        }

    def load_item(item_id: int) -> dict[str, Any]:
        item = queue.item(item_id)
        other_round = round_idx is not None and item is not None and item["round_idx"] != round_idx
        if item is None or item["split"] != SPLIT or other_round:
            raise HTTPException(404, f"item {item_id} is not in this annotation round")
        return item

    def item_view(item: dict[str, Any], order: list[int] | None) -> dict[str, Any]:
        texts = dict(item["candidates"])
        if not order or sorted(order) != sorted(texts):
            order = list(texts)
        scores, threshold = assist(item) if assist is not None else ({}, None)
        if scores:
            order = sorted(order, key=lambda candidate_id: -scores.get(candidate_id, float("-inf")))
        return {
            "item_id": item["item_id"], "example_id": item["example_id"], "round_idx": item["round_idx"],
            "question": question_shown(item), "answer": item["answer"],
            "image_url": f"/api/image/{item['item_id']}" if item["image_ref"] else None,
            "candidates": [{"id": candidate_id, "text": texts[candidate_id],
                            "prechecked": bool(scores) and scores.get(candidate_id, float("-inf")) >= threshold}
                           for candidate_id in order],
        }

    api = APIRouter(prefix="/api")  # every route is behind `Authenticate` (the middleware below)

    @api.get("/config")
    def get_config(me: Identity = me_) -> dict[str, Any]:
        return {"guidelines": cfg.guidelines, "annotations_per_item": per_item,
                "lease_seconds": cfg.lease_seconds, "round_idx": current_round(), "corrections": cfg.corrections,
                "me": {"name": me.name, "role": me.role}}

    @api.post("/next")
    def next_item(body: NextRequest, me: Identity = me_) -> dict[str, Any]:
        annotator = me.annotator(body.annotator)
        round_ = current_round()
        if round_ is None:
            return {"round_idx": None, "item": None, "progress": None,
                    "message": "No candidates in the store yet: waiting for the loop to sample a round."}
        lease = queue.lease_item(round_, annotator, per_item, cfg.lease_seconds, SPLIT, now=now())
        if lease is None:
            counts = progress(round_, annotator)
            done = counts["round"]["judged"] == counts["round"]["total"]
            message = (f"Round {round_} is fully judged. Thank you! Waiting for the next round."
                       if done else f"Nothing left for you in round {round_} right now (the rest is held by "
                                    "others or already judged by you); checking again shortly.")
            return {"round_idx": round_, "item": None, "progress": counts, "message": message}
        item = queue.item(lease.item_id)
        return {"round_idx": round_, "item": {**item_view(item, lease.shown_order),
                                               "lease_expires_at": lease.expires_at.isoformat()},
                "progress": progress(round_, annotator), "message": None}

    @api.post("/lease")
    def renew_lease(body: LeaseRequest, me: Identity = me_) -> dict[str, Any]:
        annotator = me.annotator(body.annotator)
        load_item(body.item_id)
        lease = queue.renew_lease(body.item_id, annotator, per_item, cfg.lease_seconds, now=now())
        return {"held": lease is not None,
                "lease_expires_at": lease.expires_at.isoformat() if lease is not None else None}

    def write_judgment(body: JudgmentRequest, me: Identity, replace: bool) -> dict[str, Any]:
        annotator = me.annotator(body.annotator)
        if body.correction is not None and not cfg.corrections:
            raise HTTPException(422, "corrections are off for this run (annotate.corrections: false)")
        item = load_item(body.item_id)
        try:
            if replace:
                stored = queue.replace_judgment(
                    body.item_id, annotator, body.accepted, body.none_fit, body.seconds,
                    body.client_token, body.shown_order, now=now(), correction=body.correction)
            else:
                stored = queue.submit_judgment(
                    body.item_id, annotator, body.accepted, body.none_fit, body.seconds,
                    body.client_token, body.shown_order, per_item, now=now(), correction=body.correction)
        except KeyError as error:
            raise HTTPException(404, error.args[0] if error.args else str(error)) from error
        except ValueError as error:
            raise HTTPException(422, str(error)) from error
        # Reached only after the store's transaction committed: an acknowledged judgment is on disk.
        return {"ok": True, "duplicate": not stored, "item_id": body.item_id,
                "progress": progress(item["round_idx"], annotator)}

    @api.post("/judgment")
    def post_judgment(body: JudgmentRequest, me: Identity = me_) -> dict[str, Any]:
        return write_judgment(body, me, replace=False)

    @api.put("/judgment")
    def put_judgment(body: JudgmentRequest, me: Identity = me_) -> dict[str, Any]:
        return write_judgment(body, me, replace=True)

    @api.get("/history")
    def history(me: Identity = me_, annotator: Annotated[AnnotatorName | None, Query()] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        annotator = me.annotator(annotator)
        round_ = current_round()
        if round_ is None:
            return {"round_idx": None, "items": []}
        items = []
        for judgment in queue.judgments_by(round_, annotator, SPLIT, limit=limit):
            view = item_view(queue.item(judgment["item_id"]), judgment["shown_order"])
            items.append({**view, "accepted": judgment["accepted"], "none_fit": judgment["none_fit"],
                          "correction": judgment["correction"], "seconds": judgment["seconds"], "judged_at": judgment["created_at"].isoformat(),
                          "updated_at": judgment["updated_at"] and judgment["updated_at"].isoformat()})
        return {"round_idx": round_, "items": items}

    @api.get("/image/{item_id:int}")  # digits only: nothing else reaches the handler
    def image(item_id: RowId) -> FileResponse:
        item = load_item(item_id)
        path = _image_path(item["image_ref"], images_dir)
        if path is None:
            raise HTTPException(404, f"item {item_id} has no image this server may serve")
        return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()],
                            headers={"Cache-Control": "private, max-age=3600",
                                     "X-Content-Type-Options": "nosniff"})

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", **_PAGE_HEADERS})

    admin_routes(app, store, cfg, require_admin, current_round)

    @app.get("/admin", include_in_schema=False, dependencies=[Depends(require_admin)])
    def admin_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "admin.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", **_PAGE_HEADERS})

    app.mount(OPEN_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="static")
    # Host check -> body limit -> token (`Authenticate`, from headers and query alone) -> route.
    add_guards(app, identify=authenticate, is_open=lambda path: path.startswith(OPEN_PREFIX), host=cfg.host,
               extra_hosts=cfg.allowed_hosts, hosts_setting="annotate.allowed_hosts",
               max_body_bytes=cfg.max_body_bytes, body_setting="annotate.max_body_bytes")
    return app


_PAGE_HEADERS = {
    # Defence in depth beside textContent: no inline scripts, nothing from elsewhere.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def _judgment_conflict(request: Request, error: JudgmentConflict) -> JSONResponse:
    """409 with the reason (`detail`) and, for a resubmission that differs from the stored judgment, that
    judgment (`stored`: the page shows it and offers to revise it with a PUT)."""
    stored = {"stored": error.stored} if error.stored is not None else {}
    return JSONResponse({"detail": str(error), **stored}, status_code=409)


def question_shown(item: dict[str, Any]) -> str:
    """The question the page shows for an item (`AnnotationQueue.item`): the stored question, or the whole
    prompt for an item stored without one (an older store). The prompt is never parsed."""
    return item.get("question") or item["prompt"]


def _image_path(image_ref: str | None, images_dir: Path | None) -> Path | None:
    """The file to serve for an item's `image_ref`, or None if it may not be served.

    A relative ref is looked up as run_dir/REF and as run_dir/images/REF and must resolve (links followed)
    inside run_dir/images; an absolute path is served as the loop recorded it. Either way only existing
    files with an image suffix; URLs and anything else are refused.
    """
    if not image_ref or "\x00" in image_ref or "://" in image_ref:
        return None
    ref = Path(image_ref)
    if ref.is_absolute():
        places = [ref]
    elif images_dir is not None:
        places = [images_dir.parent / ref, images_dir / ref]
    else:
        return None
    for place in places:
        try:
            path = place.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        inside = ref.is_absolute() or path.is_relative_to(images_dir)
        if inside and path.is_file() and path.suffix.lower() in IMAGE_TYPES:
            return path
    return None


def main(argv: list[str] | None = None) -> None:
    """`python -m illume.annotate.server`: serve a store without a run config (tests, scripts)."""
    parser = argparse.ArgumentParser(description="Serve the annotation page over a feedback store.")
    parser.add_argument("--store", required=True, help="SQLAlchemy URL or SQLite file of the feedback store")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory (images are in RUN_DIR/images)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=AnnotateConfig.port)
    parser.add_argument("--token", default=None, help="access token (required with a non-loopback --host)")
    parser.add_argument("--round", type=int, default=None, dest="round_idx")
    parser.add_argument("--annotations-per-item", type=int, default=AnnotateConfig.annotations_per_item)
    parser.add_argument("--lease-seconds", type=float, default=AnnotateConfig.lease_seconds)
    parser.add_argument("--corrections", action="store_true", help="people may write a rationale when none fits")
    parser.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts", metavar="NAME",
                        help="another Host name to answer (a proxy's; '*.example.org'); repeatable")
    parser.add_argument("--max-body-bytes", type=int, default=AnnotateConfig.max_body_bytes)
    args = parser.parse_args(argv)
    store = FeedbackStore(args.store, create=False)
    if not is_loopback(args.host) and not args.token and not store.has_accounts():
        parser.error("a non-loopback --host needs --token (or accounts: `illume annotators add`)")
    cfg = AnnotateConfig(host=args.host, port=args.port, annotations_per_item=args.annotations_per_item,
                         lease_seconds=args.lease_seconds, corrections=args.corrections,
                         allowed_hosts=args.allowed_hosts, max_body_bytes=args.max_body_bytes)
    serve(create_app(store, args.run_dir, cfg, args.token, args.round_idx), args.host, args.port)


if __name__ == "__main__":
    main()
