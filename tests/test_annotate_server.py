"""The annotation app: hand-out and leases, judgments, bad input, images, token, live server, browser."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from illume.annotate import server
from illume.annotate.server import STATIC_DIR, create_app
from illume.cli import main
from illume.config import AnnotateConfig
from illume.data.records import Candidate, CandidateSet
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from tests.conftest import REPO

LOCAL = "http://127.0.0.1"
"""Base URL of a TestClient for a loopback-bound app (TestClient's own Host, "testserver", gets 400)."""
HOSTILE = '<script>alert("x")</script><img src=x onerror="alert(1)"> & &amp;'


def png_bytes(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def make_sets(example_ids, num_candidates=3, texts=None):
    return [
        CandidateSet(
            example_id=example_id, answer="red", predicted_answer="red",
            prompt=f"Q: what colour is the shape in {example_id}? A: red, seeing that", seed=i,
            candidates=[Candidate(text=(texts or {}).get((example_id, k), f"{example_id} rationale {k}"),
                                  temperature=0.3, seed=i, sample_idx=k, logprob=-1.0 - k)
                        for k in range(num_candidates)],
        )
        for i, example_id in enumerate(example_ids)
    ]


class Clock:
    """An injected clock the tests move forward."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory: 4 train items with images (e3 has none), a val item, and a store."""
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    ids = ["e0", "e1", "e2", "e3"]
    refs = {}
    for i, example_id in enumerate(ids[:3]):
        (run_dir / "images" / f"{example_id}.png").write_bytes(png_bytes((60 * i, 100, 200)))
        refs[example_id] = f"images/{example_id}.png"
    with FeedbackStore(run_dir / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets(ids, texts={("e1", 1): HOSTILE}), image_refs=refs)
        store.add_candidate_sets(0, "val", make_sets(["v0"]), image_refs={"v0": "images/e0.png"})
        store.mark_sampled(0)
    return run_dir


@pytest.fixture
def store(run_dir):
    with FeedbackStore(run_dir / "feedback.db") as store:
        yield store


def client_for(store, run_dir, token=None, round_idx=None, clock=None, **cfg) -> TestClient:
    app = create_app(store, run_dir, AnnotateConfig(**cfg), token=token, round_idx=round_idx, clock=clock)
    return TestClient(app, base_url=LOCAL)


def take(client, annotator):
    response = client.post("/api/next", json={"annotator": annotator})
    assert response.status_code == 200, response.text
    return response.json()["item"]


def judge(client, annotator, item, accepted=None, none_fit=False, token=None, seconds=1.5, method="POST"):
    accepted = [item["candidates"][0]["id"]] if accepted is None and not none_fit else (accepted or [])
    body = {"annotator": annotator, "item_id": item["item_id"], "accepted": accepted, "none_fit": none_fit,
            "seconds": seconds, "client_token": token or str(uuid.uuid4())}
    return client.request(method, "/api/judgment", json=body)


def judgments(store):
    """(annotator, example_id) -> {candidate text: accepted}, plus none_fit and seconds, from the store."""
    out = {}
    for row in store.judgments_table():
        entry = out.setdefault((row["annotator"], row["example_id"]),
                               {"decisions": {}, "none_fit": row["none_fit"], "seconds": row["seconds"],
                                "client_token": row["client_token"]})
        if row["text"] is not None:
            entry["decisions"][row["text"]] = row["accepted"]
    return out


# ---------------------------------------------------------------- hand-out and leases


def test_hand_out_respects_annotations_per_item_and_never_repeats(store, run_dir):
    client = client_for(store, run_dir, annotations_per_item=2)
    # Two annotators share the first item's two slots; a third one gets the next item.
    first_a, first_b, first_c = take(client, "ann"), take(client, "bob"), take(client, "cy")
    assert first_a["item_id"] == first_b["item_id"] != first_c["item_id"]
    assert first_a["example_id"] == "e0" and first_c["example_id"] == "e1"
    seen: dict[str, list[str]] = {"ann": [], "bob": [], "cy": []}
    for _ in range(20):  # bounded: 4 items x 2 judgments
        progressed = False
        for annotator in seen:
            item = take(client, annotator)
            if item is not None:
                assert judge(client, annotator, item).status_code == 200
                seen[annotator].append(item["example_id"])
                progressed = True
        if not progressed:
            break
    for annotator, examples in seen.items():
        assert len(examples) == len(set(examples)), f"{annotator} saw an item twice"
    counts = AnnotationQueue(store).annotation_progress(0, 2)
    assert counts["items"] == 4 and counts["complete_items"] == 4 and counts["judgments"] == 8
    assert sum(map(len, seen.values())) == 8
    for example in ["e0", "e1", "e2", "e3"]:
        assert len({a for a, e in judgments(store) if e == example}) == 2
    # Nothing left: the response says so, and val items are never handed out.
    data = client.post("/api/next", json={"annotator": "dee"}).json()
    assert data["item"] is None and "fully judged" in data["message"]
    assert data["progress"]["round"] == {"judged": 4, "total": 4}


def test_a_reloaded_page_gets_its_own_item_back_in_the_same_order(store, run_dir):
    client = client_for(store, run_dir)
    first, again = take(client, "ann"), take(client, "ann")
    assert first["item_id"] == again["item_id"] and first["candidates"] == again["candidates"]
    assert take(client, "bob")["item_id"] != first["item_id"]  # one slot per item by default


def test_an_expired_lease_returns_the_item_to_the_pool(store, run_dir):
    clock = Clock()
    client = client_for(store, run_dir, clock=clock, annotations_per_item=1, lease_seconds=60)
    held = take(client, "ann")
    assert take(client, "bob")["item_id"] != held["item_id"]
    clock.advance(30)  # a heartbeat keeps it
    assert client.post("/api/lease", json={"annotator": "ann", "item_id": held["item_id"]}).json()["held"]
    clock.advance(59)
    assert take(client, "cy")["item_id"] != held["item_id"]
    clock.advance(2)  # ann's browser went away: the lease expired
    taken_over = take(client, "dee")
    assert taken_over["item_id"] == held["item_id"]
    # ann comes back: her hold is gone and her late judgment would exceed the one judgment wanted.
    assert not client.post("/api/lease", json={"annotator": "ann", "item_id": held["item_id"]}).json()["held"]
    late = judge(client, "ann", held)
    assert late.status_code == 409 and "already has" in late.json()["detail"]
    assert judge(client, "dee", taken_over).status_code == 200
    assert [a for a, e in judgments(store)] == ["dee"]


def test_a_late_judgment_is_taken_while_the_slot_is_still_free(store, run_dir):
    clock = Clock()
    client = client_for(store, run_dir, clock=clock, lease_seconds=10)
    item = take(client, "ann")
    clock.advance(3600)
    assert judge(client, "ann", item).status_code == 200
    assert take(client, "bob")["item_id"] != item["item_id"]


# ---------------------------------------------------------------- judgments


def test_judgments_are_stored_exactly_with_the_order_shown(store, run_dir):
    client = client_for(store, run_dir)
    item = take(client, "ann")
    shown = [c["id"] for c in item["candidates"]]
    assert sorted(shown) == store.candidate_ids(0)["e0"]
    accepted = [shown[2], shown[0]]
    response = judge(client, "ann", item, accepted=accepted, token="tok-1", seconds=4.25)
    assert response.status_code == 200 and response.json()["duplicate"] is False
    assert response.json()["progress"]["mine"] == {"judged": 1, "total": 4}
    texts = {c["id"]: c["text"] for c in item["candidates"]}
    assert judgments(store) == {("ann", "e0"): {
        "decisions": {texts[i]: i in accepted for i in shown}, "none_fit": False, "seconds": 4.25,
        "client_token": "tok-1"}}
    [mine] = AnnotationQueue(store).judgments_by(0, "ann")
    assert mine["shown_order"] == shown and sorted(mine["accepted"]) == sorted(accepted)
    # none fits is stored as such, every candidate rejected
    other = take(client, "ann")
    assert judge(client, "ann", other, none_fit=True).status_code == 200
    assert judgments(store)[("ann", "e1")]["none_fit"] is True
    assert not any(judgments(store)[("ann", "e1")]["decisions"].values())


def test_candidates_are_shuffled_and_the_shown_order_is_the_one_recorded(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets([f"x{i}" for i in range(20)], num_candidates=4))
        client = client_for(store, None)
        orders = []
        for _ in range(20):
            item = take(client, "ann")
            order = [c["id"] for c in item["candidates"]]
            orders.append(order == sorted(order))
            # A page may report its own order (e.g. after a reload); that one is recorded.
            reported = list(reversed(order))
            body = {"annotator": "ann", "item_id": item["item_id"], "accepted": [order[1]],
                    "client_token": str(uuid.uuid4()), "shown_order": reported}
            assert client.post("/api/judgment", json=body).status_code == 200
            assert AnnotationQueue(store).judgments_by(0, "ann")[0]["shown_order"] == reported
        assert not all(orders)  # all 20 in drawn order: probability 24**-20


def test_a_repeated_submission_is_counted_once(store, run_dir):
    client = client_for(store, run_dir)
    item = take(client, "ann")
    first = judge(client, "ann", item, token="same")
    again = judge(client, "ann", item, token="same")
    double_click = judge(client, "ann", item, token="another")  # e.g. a second tab
    assert first.status_code == again.status_code == double_click.status_code == 200
    assert [r.json()["duplicate"] for r in (first, again, double_click)] == [False, True, True]
    assert store.num_judgments() == 1
    # The same token for a different item is a client bug: refused, not silently dropped.
    other = take(client, "ann")
    reused = judge(client, "ann", other, token="same")
    assert reused.status_code == 409 and "client_token" in reused.json()["detail"]
    assert store.num_judgments() == 1


@pytest.mark.parametrize("change, status, reason", [
    ({"item_id": 999_999}, 404, "not in this annotation round"),
    ({"accepted": ["OTHER"]}, 422, "not one of this item's candidates"),
    ({"none_fit": True}, 422, "none_fit"),
    ({"accepted": [], "none_fit": False}, 422, "nothing chosen"),
    ({"annotator": ""}, 422, "annotator"),
    ({"annotator": "   "}, 422, "annotator"),
    ({"annotator": "a\nb"}, 422, "annotator"),
    ({"accepted": "1"}, 422, "accepted"),
    ({"accepted": ["SAME", "SAME"]}, 422, "twice"),
    ({"item_id": "1"}, 422, "item_id"),
    ({"none_fit": "yes", "accepted": []}, 422, "none_fit"),
    ({"seconds": -1}, 422, "seconds"),
    ({"seconds": "soon"}, 422, "seconds"),
    ({"shown_order": [1, 2]}, 422, "shown_order"),
    ({"surprise": 1}, 422, "surprise"),
    ({"item_id": "VAL"}, 404, "not in this annotation round"),
    ({"item_id": 2**70}, 422, "item_id"),
])
def test_malformed_submissions_get_a_4xx_with_a_reason(store, run_dir, change, status, reason):
    client = client_for(store, run_dir)
    item = take(client, "ann")
    other_item = take(client, "bob")
    val_item_id = next(i for i in range(1, 6) if AnnotationQueue(store).item(i)["split"] == "val")
    # Placeholders in `change` stand for ids known only now.
    ids = {"OTHER": other_item["candidates"][0]["id"], "SAME": item["candidates"][0]["id"],
           "VAL": val_item_id}

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return ids.get(value, value) if isinstance(value, str) else value

    body = {"annotator": "ann", "item_id": item["item_id"], "accepted": [item["candidates"][0]["id"]],
            "none_fit": False, "seconds": 2.0, "client_token": "t"}
    body.update({key: resolve(value) for key, value in change.items()})
    response = client.post("/api/judgment", json=body)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]
    assert store.num_judgments() == 0


def test_a_body_that_is_not_json_gets_a_422(store, run_dir):
    client = client_for(store, run_dir)
    response = client.post("/api/judgment", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"]
    assert client.post("/api/next", json={}).status_code == 422


def test_put_replaces_only_the_annotators_own_judgment(store, run_dir):
    client = client_for(store, run_dir, annotations_per_item=2)
    first = take(client, "ann")
    ids = [c["id"] for c in first["candidates"]]
    assert judge(client, "ann", first, accepted=[ids[0]], seconds=3.0).status_code == 200
    second = take(client, "ann")
    assert judge(client, "ann", second, none_fit=True).status_code == 200
    history = client.get("/api/history", params={"annotator": "ann"}).json()["items"]
    assert [h["item_id"] for h in history] == [second["item_id"], first["item_id"]]  # newest first
    assert history[1]["accepted"] == [ids[0]] and history[1]["candidates"] == first["candidates"]

    revised = judge(client, "ann", first, accepted=[ids[1], ids[2]], seconds=2.0, method="PUT", token="rev-1")
    assert revised.status_code == 200 and revised.json()["duplicate"] is False
    repeat = judge(client, "ann", first, accepted=[ids[1], ids[2]], seconds=2.0, method="PUT", token="rev-1")
    assert repeat.json()["duplicate"] is True
    texts = {c["id"]: c["text"] for c in first["candidates"]}
    stored = judgments(store)[("ann", first["example_id"])]
    assert stored["decisions"] == {texts[ids[0]]: False, texts[ids[1]]: True, texts[ids[2]]: True}
    assert stored["seconds"] == 5.0 and store.num_judgments() == 2
    [_, mine] = AnnotationQueue(store).judgments_by(0, "ann")
    assert mine["updated_at"] is not None and mine["shown_order"] == ids  # the order shown is kept
    # Nobody replaces a judgment they did not make; a PUT never creates one.
    assert judge(client, "bob", first, method="PUT").status_code == 404
    assert judge(client, "ann", take(client, "ann"), method="PUT").status_code == 404
    assert judge(client, "ann", first, none_fit=True, accepted=[ids[0]], method="PUT").status_code == 422
    assert store.num_judgments() == 2
    # The store kept the version the PUT replaced; readers see only the latest.
    versions = store.judgment_history(first["item_id"], "ann")
    assert [(v["accepted"], v["seconds"]) for v in versions] == [([ids[0]], 3.0), (sorted(ids[1:]), 5.0)]
    assert versions[0]["revised_at"] is not None and versions[-1]["revised_at"] is None


def test_page_judgments_are_stored_as_peoples(store, run_dir):
    client = client_for(store, run_dir, annotations_per_item=2)
    assert judge(client, "ann", take(client, "ann")).status_code == 200
    assert store.annotator_kinds() == {"ann": "person"}
    # A name the store knows as another kind (here: the reward model's) cannot judge in the page.
    store.add_judgments(0, [("e3", [], True, None)], "rm", kind="reward")
    response = judge(client, "rm", take(client, "rm"))
    assert response.status_code == 422 and "'rm'" in response.json()["detail"]
    assert store.num_judgments(kinds=["person"]) == 1 and store.num_judgments(kinds=["reward"]) == 1


def test_the_page_shows_the_stored_question_and_the_whole_prompt_without_one(store, run_dir):
    # Round 1: stored with questions; the prompts deliberately hold another question, which must not show.
    sets = make_sets(["q0", "q1"])
    store.add_candidate_sets(1, "train", sets, questions={"q0": "Which <b>colour</b> is the shape?"})
    client = client_for(store, run_dir, round_idx=1)
    shown = {item["example_id"]: item for item in (take(client, "ann"), take(client, "bob"))}
    assert shown["q0"]["question"] == "Which <b>colour</b> is the shape?"  # as text, verbatim
    assert shown["q0"]["answer"] == "red"
    assert shown["q1"]["question"] == sets[1].prompt  # stored without a question: the whole prompt
    # Round 0 was stored without questions (an older store): every item shows its whole prompt.
    old = take(client_for(store, run_dir, round_idx=0), "carol")
    assert old["question"] == make_sets(["e0"])[0].prompt and old["question"].startswith("Q: ")
    # The history view shows the same question.
    assert judge(client, "ann", shown["q0"]).status_code == 200
    [past] = client.get("/api/history", params={"annotator": "ann"}).json()["items"]
    assert past["question"] == "Which <b>colour</b> is the shape?"


def test_the_server_and_assist_do_not_parse_prompts():
    """The question comes from the store: no regular expressions over the prompt in the annotation app."""
    from illume.annotate import assist

    for module in (server, assist):
        source = Path(module.__file__).read_text()
        assert not re.search(r"^\s*(import re\b|from re import)", source, re.MULTILINE), module.__name__
        assert "re.compile(" not in source and "re.match(" not in source, module.__name__
    prompt = "Q: x A: y, seeing that"
    assert server.question_shown({"question": None, "prompt": prompt}) == prompt
    assert server.question_shown({"question": "x?", "prompt": prompt}) == "x?"


# ---------------------------------------------------------------- untrusted text, images, token


def test_html_in_model_text_is_returned_as_data_and_rendered_as_text(store, run_dir):
    client = client_for(store, run_dir)
    take(client, "ann")
    item = take(client, "bob")
    assert item["example_id"] == "e1"
    assert HOSTILE in [c["text"] for c in item["candidates"]]  # verbatim, unescaped: JSON data
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"app.js uses {sink}"
    for field in (r"el\.question\.textContent = item\.question", r"el\.answer\.textContent = item\.answer",
                  r"text\.textContent = candidate\.text"):
        assert re.search(field, script), field
    html = (STATIC_DIR / "index.html").read_text()
    assert "<script>" not in html.replace('<script src="/static/app.js"', "")  # no inline script


def test_image_route_serves_only_the_items_own_image(store, run_dir, tmp_path):
    client = client_for(store, run_dir)
    item = take(client, "ann")
    response = client.get(item["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (run_dir / "images" / "e0.png").read_bytes()
    assert client.get(item["image_url"], params={"path": "/etc/passwd"}).content == response.content
    for attempt in ["/api/image/..%2F..%2Fetc%2Fpasswd", "/api/image/../../etc/passwd", "/api/image/%2e%2e",
                    "/api/image/-1", "/api/image/0", "/api/image/999999", "/api/image/1.0",
                    "/api/image/%2Fetc%2Fpasswd", f"/api/image/{2**70}"]:
        assert client.get(attempt).status_code in (404, 422), attempt
    no_image = next(i for i in range(1, 6) if AnnotationQueue(store).item(i)["example_id"] == "e3")
    assert client.get(f"/api/image/{no_image}").status_code == 404
    val_item = next(i for i in range(1, 6) if AnnotationQueue(store).item(i)["split"] == "val")
    assert client.get(f"/api/image/{val_item}").status_code == 404  # not an item people judge here


def test_image_refs_that_leave_the_run_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes((1, 2, 3)))
    (run_dir / "images" / "link.png").symlink_to(secret)
    (run_dir / "images" / "notes.txt").write_text("not an image")
    absolute = tmp_path / "dataset" / "coco.jpg"
    absolute.parent.mkdir()
    absolute.write_bytes(png_bytes((9, 9, 9)))
    (run_dir / "images" / "plain.png").write_bytes(png_bytes((4, 5, 6)))
    refs = {"up": "../secret.png", "images-up": "images/../../secret.png", "link": "images/link.png",
            "text": "images/notes.txt", "url": "http://example.com/a.png", "passwd": "/etc/passwd",
            "absolute": str(absolute), "bare": "plain.png"}
    with FeedbackStore(run_dir / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets(list(refs)), image_refs=refs)
        client = client_for(store, run_dir, annotations_per_item=1)
        served = {}
        for item_id in range(1, len(refs) + 1):
            response = client.get(f"/api/image/{item_id}")
            served[AnnotationQueue(store).item(item_id)["example_id"]] = response.status_code
        assert served == {"up": 404, "images-up": 404, "link": 404, "text": 404, "url": 404, "passwd": 404,
                          "absolute": 200, "bare": 200}
        assert client.get("/api/image/7").headers["content-type"] == "image/jpeg"


def test_token_is_required_when_set(store, run_dir):
    client = client_for(store, run_dir, token="s3cret")
    assert client.get("/api/config").status_code == 401
    assert client.get("/api/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/config", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/config", params={"token": "s3cret"}).status_code == 200
    assert client.post("/api/next", json={"annotator": "ann"}).status_code == 401
    assert client.post("/api/judgment", json={}).status_code == 401  # the token is checked first
    assert client.get("/api/history", params={"annotator": "ann"}).status_code == 401
    assert client.get("/api/image/1").status_code == 401
    assert client.get("/api/image/1", params={"token": "s3cret"}).status_code == 200
    assert client.get("/").status_code == 401 and "token" in client.get("/").json()["detail"]
    assert client.get("/", params={"token": "s3cret"}).status_code == 200
    assert client.get("/static/app.js").status_code == 200  # no data in it
    item = client.post("/api/next", json={"annotator": "ann"}, headers={"Authorization": "Bearer s3cret"})
    assert item.status_code == 200 and item.json()["item"] is not None
    assert store.num_judgments() == 0


# ---------------------------------------------------------------- rounds, config, store schema, CLI


def test_the_page_moves_on_to_the_latest_round_that_needs_judgments(store, run_dir):
    client = client_for(store, run_dir)
    for _ in range(4):
        assert judge(client, "ann", take(client, "ann")).status_code == 200
    assert take(client, "ann") is None
    store.add_candidate_sets(1, "train", make_sets(["r1a", "r1b"]))
    data = client.post("/api/next", json={"annotator": "ann"}).json()
    assert data["round_idx"] == 1 and data["item"]["example_id"] == "r1a"
    assert data["progress"]["round"] == {"judged": 0, "total": 2}
    assert client.get("/api/history", params={"annotator": "ann"}).json()["items"] == []
    fixed = client_for(store, run_dir, round_idx=0, annotations_per_item=2)
    assert fixed.post("/api/next", json={"annotator": "bob"}).json()["item"]["example_id"] == "e0"
    assert fixed.get(f"/api/image/{data['item']['item_id']}").status_code == 404
    config = client.get("/api/config").json()
    assert config["guidelines"] == AnnotateConfig().guidelines and config["annotations_per_item"] == 1


def test_an_older_store_gets_the_new_columns(tmp_path):
    path = tmp_path / "feedback.db"
    with FeedbackStore(path) as store:
        store.add_candidate_sets(0, "train", make_sets(["a"]))
        store.add_judgment(0, "a", "ann", [], none_fit=True)
    if sqlite3.sqlite_version_info < (3, 35):
        pytest.skip("SQLite < 3.35 cannot drop columns to fake an old store")
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE alembic_version")  # written before the migrations
        connection.execute("ALTER TABLE decisions DROP COLUMN position_shown")
        connection.execute("ALTER TABLE judgments DROP COLUMN updated_at")
    with FeedbackStore(path) as store:
        assert AnnotationQueue(store).judgments_by(0, "ann")[0]["shown_order"] is None
        item_id = AnnotationQueue(store).judgments_by(0, "ann")[0]["item_id"]
        ids = store.candidate_ids(0)["a"]
        assert AnnotationQueue(store).replace_judgment(item_id, "ann", [ids[0]], shown_order=ids[::-1])
        assert AnnotationQueue(store).judgments_by(0, "ann")[0]["shown_order"] == ids[::-1]


def test_cli_annotate_reads_the_run_config_and_requires_a_token_off_loopback(store, run_dir, monkeypatch,
                                                                              capsys):
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"annotate": {"annotations_per_item": 2,
                                                                      "guidelines": "Be kind."}}))
    served = []
    monkeypatch.setattr(server, "serve", lambda app, host, port, log_level="warning": served.append(
        (app, host, port)))
    assert main(["annotate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8765/" in out and "token" not in out
    app, host, port = served[-1]
    assert (host, port) == ("127.0.0.1", 8765)
    config = TestClient(app, base_url=LOCAL).get("/api/config").json()
    assert config["annotations_per_item"] == 2 and config["guidelines"] == "Be kind."

    assert main(["annotate", str(run_dir), "--host", "0.0.0.0", "--port", "9000"]) == 0
    token = re.search(r"\?token=(\S+)", capsys.readouterr().out).group(1)
    app, host, port = served[-1]
    assert (host, port) == ("0.0.0.0", 9000) and len(token) >= 32
    assert TestClient(app, base_url=LOCAL).get("/api/config").status_code == 401
    assert TestClient(app, base_url=LOCAL).get("/api/config", params={"token": token}).status_code == 200

    assert main(["annotate", f"sqlite:///{run_dir / 'feedback.db'}", "--token", "given", "--round", "0"]) == 0
    assert "?token=given" in capsys.readouterr().out
    assert main(["annotate", str(run_dir / "missing")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


# ---------------------------------------------------------------- a live server, killed mid-session


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(db_path: Path | str, run_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "illume.annotate.server", "--store", str(db_path),
             "--run-dir", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
             "--annotations-per-item", "2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/config", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start within 60 s")


class Annotator(threading.Thread):
    """Takes items and judges them; records every submission the server acknowledged, and the one in
    flight when the server went away."""

    def __init__(self, name: str, url: str, num_submissions: int, acked: list, lock: threading.Lock):
        super().__init__(daemon=True)
        self.annotator, self.url, self.num_submissions = name, url, num_submissions
        self.acked, self.lock = acked, lock
        self.in_flight: dict | None = None
        self.errors: list[str] = []

    def run(self) -> None:
        rng = __import__("random").Random(self.annotator)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(self.num_submissions):
                try:
                    item = client.post("/api/next", json={"annotator": self.annotator}).json()["item"]
                    if item is None:
                        self.errors.append("no item left")
                        return
                    ids = [c["id"] for c in item["candidates"]]
                    accepted = sorted(rng.sample(ids, rng.randint(0, len(ids))))
                    body = {"annotator": self.annotator, "item_id": item["item_id"], "accepted": accepted,
                            "none_fit": not accepted, "seconds": round(rng.uniform(1, 9), 2),
                            "client_token": str(uuid.uuid4())}
                    self.in_flight = body
                    response = client.post("/api/judgment", json=body)
                except httpx.TransportError:
                    return  # the server was killed: `in_flight` may or may not be stored
                if response.status_code != 200 or response.json()["duplicate"]:
                    self.errors.append(f"{response.status_code} {response.text}")
                    return
                with self.lock:
                    self.acked.append(body)
                self.in_flight = None


def _check_store(db_path: Path | str, acked: list[dict]) -> dict[str, dict]:
    """Every acknowledged submission is stored exactly as sent; no duplicates; overlap respected."""
    with FeedbackStore(db_path) as store:
        rows = store.judgments_table()
    by_token: dict[str, dict] = {}
    for row in rows:
        entry = by_token.setdefault(row["client_token"], {
            "annotator": row["annotator"], "accepted": [], "none_fit": row["none_fit"],
            "seconds": row["seconds"], "example_id": row["example_id"]})
        if row["accepted"]:
            entry["accepted"].append(row["candidate_id"])
    for body in acked:
        stored = by_token.get(body["client_token"])
        assert stored is not None, f"acknowledged but lost: {body}"
        assert (stored["annotator"], sorted(stored["accepted"]), stored["none_fit"], stored["seconds"]) == (
            body["annotator"], body["accepted"], body["none_fit"], body["seconds"])
    pairs = [(entry["annotator"], entry["example_id"]) for entry in by_token.values()]
    assert len(pairs) == len(set(pairs)), "an annotator judged an item twice"
    per_item: dict[str, int] = {}
    for _, example_id in pairs:
        per_item[example_id] = per_item.get(example_id, 0) + 1
    assert max(per_item.values()) <= 2, "an item got more than annotations_per_item judgments"
    return by_token


@pytest.mark.slow
def test_live_server_concurrent_annotators_and_kill_9(tmp_path, store_url):
    """20 annotators x 25 submissions against uvicorn on loopback: nothing lost or duplicated, overlap kept;
    then kill -9 while they submit, restart on the same store: every acknowledged submission is there. On
    SQLite and on PostgreSQL (where the server's requests write at once: row locks keep the slots)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    db_path = store_url
    with FeedbackStore(db_path) as store:
        store.add_candidate_sets(0, "train", make_sets([f"x{i:03d}" for i in range(600)], num_candidates=4))
    log_path = tmp_path / "server.log"
    timings = {}
    process, url = _start_server(db_path, run_dir, log_path)
    try:
        acked: list[dict] = []
        lock = threading.Lock()
        start = time.perf_counter()
        threads = [Annotator(f"person{i:02d}", url, 25, acked, lock) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        timings["20x25"] = time.perf_counter() - start
        assert not any(thread.is_alive() for thread in threads)
        assert [e for thread in threads for e in thread.errors] == []
        assert len(acked) == 500
        assert len(_check_store(db_path, acked)) == 500

        # Again, and kill -9 the server while the annotators submit.
        phase_2: list[dict] = []
        threads = [Annotator(f"person{i:02d}", url, 25, phase_2, lock) for i in range(20)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(phase_2) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.kill()  # SIGKILL
        process.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert 100 <= len(phase_2) < 500, len(phase_2)
        in_flight = [thread.in_flight for thread in threads if thread.in_flight is not None]

        start = time.perf_counter()
        process, url = _start_server(db_path, run_dir, log_path)
        timings["restart"] = time.perf_counter() - start
        stored = _check_store(db_path, acked + phase_2)
        # Pages retry what was in flight with the same client_token: stored once either way.
        with httpx.Client(base_url=url, timeout=30) as client:
            retried = [client.post("/api/judgment", json=body) for body in in_flight]
        assert all(response.status_code == 200 for response in retried), [r.text for r in retried]
        newly = sum(not response.json()["duplicate"] for response in retried)
        final = _check_store(db_path, acked + phase_2 + in_flight)
        assert len(final) == len(stored) + newly == len(acked) + len(phase_2) + len(in_flight)
        print(f"\nlive server: {timings}, phase 2 acknowledged {len(phase_2)}, in flight at kill "
              f"{len(in_flight)} ({len(in_flight) - newly} of them had been stored)")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
def test_the_page_in_a_real_browser_with_the_keyboard_only(tmp_path):
    """Judge 3 items with keys only, go back two and change one: the store holds exactly that, and a
    <script> rationale stays inert text."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "images" / "scene.png").write_bytes(png_bytes((200, 40, 40), size=96))
    script = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    ids = ["e0", "e1", "e2", "e3"]
    with FeedbackStore(run_dir / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets(ids, texts={("e0", 1): script}),
                                 image_refs={e: "images/scene.png" for e in ids})
    process, url = _start_server(run_dir / "feedback.db", run_dir, tmp_path / "server.log")
    main_item = "document.getElementById('main').dataset.itemId"

    def wait_for_item(page, is_wanted) -> str:
        # Polled from here: the page's CSP forbids the string eval behind Playwright's wait_for_function.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            item_id = page.evaluate(main_item)
            if item_id and is_wanted(item_id):
                return item_id
            time.sleep(0.02)
        raise AssertionError(f"the page shows item {page.evaluate(main_item)}")

    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{url}/")
            page.wait_for_selector("#name-input", state="visible")
            page.keyboard.type("alice")
            page.keyboard.press("Enter")
            page.wait_for_selector("#main:not([hidden])")
            shown = []
            for keys in (["1", "2"], ["n"], ["3"]):
                item_id = page.evaluate(main_item)
                shown.append(int(item_id))
                for key in keys:
                    page.keyboard.press(key)
                page.keyboard.press("Enter")
                wait_for_item(page, lambda shown_id, before=item_id: shown_id != before)
            current = page.evaluate(main_item)
            page.keyboard.press("Backspace")
            wait_for_item(page, lambda shown_id: shown_id == str(shown[2]))
            page.keyboard.press("Backspace")
            wait_for_item(page, lambda shown_id: shown_id == str(shown[1]))
            page.keyboard.press("1")  # "none fits" becomes the first rationale shown
            page.keyboard.press("Enter")
            wait_for_item(page, lambda shown_id: shown_id == str(shown[2]))  # forward, still reviewing
            page.keyboard.press("Escape")
            wait_for_item(page, lambda shown_id: shown_id == str(current))
            texts = page.locator(".candidate-text").all_text_contents()
            page.keyboard.press("Backspace")
            page.keyboard.press("Backspace")
            page.keyboard.press("Backspace")
            wait_for_item(page, lambda shown_id: shown_id == str(shown[0]))
            assert script in page.locator(".candidate-text").all_text_contents()
            assert page.evaluate("window.pwned") is None and errors == []
            page.keyboard.press("Escape")
            wait_for_item(page, lambda shown_id: shown_id == str(current))
            page.keyboard.press("2")
            page.screenshot(path=str(tmp_path / "annotate.png"))
            browser.close()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert len(texts) == 3 and (tmp_path / "annotate.png").stat().st_size > 10_000
    with FeedbackStore(run_dir / "feedback.db") as store:
        mine = {j["item_id"]: j for j in AnnotationQueue(store).judgments_by(0, "alice")}
        assert set(mine) == set(shown) and store.num_judgments() == 3
        first, second, third = (mine[i] for i in shown)
        assert sorted(first["accepted"]) == sorted(first["shown_order"][:2]) and not first["none_fit"]
        assert second["accepted"] == second["shown_order"][:1] and not second["none_fit"]
        assert second["updated_at"] is not None and first["updated_at"] is None
        assert third["accepted"] == third["shown_order"][2:3]


def test_assist_orders_by_reward_and_prechecks_confident_accepts(store, run_dir):
    def assist(item):  # a stand-in reward model: lower candidate ids score higher; only the best is confident
        ids = sorted(cid for cid, _ in item["candidates"])
        return {cid: -float(cid) for cid in ids}, -float(ids[0])

    app = create_app(store, run_dir, AnnotateConfig(), assist=assist)
    item = TestClient(app, base_url=LOCAL).post("/api/next", json={"annotator": "ann"}).json()["item"]
    ids = [c["id"] for c in item["candidates"]]
    assert len(ids) > 1 and ids == sorted(ids)
    assert [c["prechecked"] for c in item["candidates"]] == [True] + [False] * (len(ids) - 1)
    plain = client_for(store, run_dir).post("/api/next", json={"annotator": "bob"}).json()["item"]
    assert not any(c["prechecked"] for c in plain["candidates"])
