"""The admin page's API: progress, time per item, agreement and disagreements while people work.

    GET /admin                               the page (static/admin.html; polls the routes below)
    GET /api/admin/summary                   per round and per person (illume.feedback.figures.team_summary)
                                             and the reward model's precision/recall against people
    GET /api/admin/disagreements?round=R     the items people disagree on, most divided first
    GET /api/admin/item/ID                   who chose what on one item

Every route needs the admin role (an account added with `--role admin`; without accounts, whoever holds the
page). The figures are counted by the database on each request that follows a change (illume.feedback.figures:
a few rows per round and person come back), so the page shows what people did a moment ago; it asks again
every few seconds. Model text in the answers is data: the page renders it with textContent only.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query

from illume.config import AnnotateConfig
from illume.feedback import figures
from illume.feedback.agreement import REWARD, disagreements, item_detail, reward_vs_people
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore

SPLIT = "train"
Round = Annotated[int | None, Query(ge=0, le=1_000_000)]


def admin_routes(app: FastAPI, store: FeedbackStore, cfg: AnnotateConfig, require_admin: Callable[..., Any],
                 current_round: Callable[[], int | None]) -> None:
    """Add the admin API to `app`, each route behind `require_admin` (a FastAPI dependency)."""
    router = APIRouter(prefix="/api/admin", dependencies=[Depends(require_admin)])
    queue = AnnotationQueue(store)
    per_item = cfg.annotations_per_item

    # The team figures read every judged item: recomputed only when a judgment was added or revised (or a
    # round added), so a page polling every few seconds costs two small queries while nobody works.
    cached: dict[str, Any] = {"version": None}

    @router.get("/summary")
    def summary() -> dict[str, Any]:
        items_per_round = {r: store.round_counts(r, SPLIT)["items"] for r in store.rounds()}
        rounds = [r for r, count in items_per_round.items() if count]
        version = (store.judgments_version(), tuple(items_per_round.items()))
        if cached["version"] != version:
            progress = {r: queue.annotation_progress(r, per_item, split=SPLIT) for r in rounds}
            # Counted by the database (illume.feedback.figures); the judged items are read only when a reward
            # model judged, to score it against people (without one there is nothing to score: None).
            scored = any(kind in REWARD for kind in store.annotator_kinds().values())
            cached.update(version=version, figures={
                "progress": [{"round_idx": r, "items": p["items"], "complete_items": p["complete_items"],
                              "judgments": p["counted_judgments"], "needed_judgments": p["needed_judgments"]}
                             for r, p in progress.items()],
                "team": figures.team_summary(store, {r: p["items"] for r, p in progress.items()}, split=SPLIT),
                "reward_vs_people": reward_vs_people(store.judged_items(SPLIT)) if scored else None,
            })
        return {"generated_at": datetime.now(timezone.utc).isoformat(), "current_round": current_round(),
                "annotations_per_item": per_item, **cached["figures"]}

    @router.get("/disagreements")
    def list_disagreements(round: Round = None,
                           limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        round_ = round if round is not None else current_round()
        items = store.judged_items(SPLIT, round_idx=round_) if round_ is not None else []
        return {"round_idx": round_, "items": disagreements(items, limit=limit)}

    @router.get("/item/{item_id:int}")
    def one_item(item_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> dict[str, Any]:
        found = queue.item(item_id)
        if found is None or found["split"] != SPLIT:
            raise HTTPException(404, f"item {item_id} is not a judged train item")
        for item in store.judged_items(SPLIT, round_idx=found["round_idx"]):
            if item.item_id == item_id:
                return item_detail(item)
        raise HTTPException(404, f"item {item_id} has no judgment yet")

    app.include_router(router)
