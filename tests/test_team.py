"""Annotation for a team: accounts (isolation, revocation), corrections, and the admin page's API."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import uuid

import krippendorff
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from illume.annotate.server import create_app
from illume.cli import main
from illume.config import AnnotateConfig
from illume.exports import dpo_rows, judgment_rows, kto_rows, sft_rows
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import read_feedback
from tests.test_annotate_server import LOCAL, make_sets


@pytest.fixture
def run_dir(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with FeedbackStore(run_dir / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets(["e0", "e1", "e2"]),
                                 questions={e: f"what colour is {e}?" for e in ["e0", "e1", "e2"]})
    return run_dir


@pytest.fixture
def store(run_dir, request):
    """The run's SQLite store; in the tests that take `store_url`, that backend's store with the same items."""
    url = request.getfixturevalue("store_url") if "store_url" in request.fixturenames else None
    if url is None or url.startswith("sqlite") or "://" not in url:
        with FeedbackStore(run_dir / "feedback.db") as store:
            yield store
        return
    with FeedbackStore(url) as store:
        store.add_candidate_sets(0, "train", make_sets(["e0", "e1", "e2"]),
                                 questions={e: f"what colour is {e}?" for e in ["e0", "e1", "e2"]})
        yield store


def client(store, run_dir, token=None, **cfg) -> TestClient:
    return TestClient(create_app(store, run_dir, AnnotateConfig(**cfg), token=token), base_url=LOCAL)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(item_id, accepted=(), none_fit=False, **extra):
    return {"item_id": item_id, "accepted": list(accepted), "none_fit": none_fit, "seconds": 2.0,
            "client_token": str(uuid.uuid4()), **extra}


def snapshot(store) -> str:
    """Everything the store holds about judgments, leases aside."""
    rows = [{k: str(v) for k, v in row.items()} for row in store.judgments_table()]
    history = [store.judgment_history(i, name) for i in range(1, 4) for name in ("alice", "bob")]
    return json.dumps([rows, [[{k: str(v) for k, v in h.items()} for h in hs] for hs in history]], sort_keys=True)


# ---------------------------------------------------------------- accounts


def test_only_a_hash_of_the_token_is_stored(store, run_dir):
    token = store.add_account("alice")
    raw = (run_dir / "feedback.db").read_bytes()
    assert token.encode() not in raw
    with sqlite3.connect(run_dir / "feedback.db") as db:
        assert db.execute("select token_hash from accounts").fetchall() == [
            (hashlib.sha256(token.encode()).hexdigest(),)]
    assert store.account_for_token(token).name == "alice"
    assert store.account_for_token(token[:-1]) is None and store.account_for_token("") is None


def test_the_annotator_comes_from_the_token_and_a_person_cannot_reach_anyone_elses_work(store_url, store, run_dir):
    alice, bob = store.add_account("alice"), store.add_account("bob")
    app = client(store, run_dir, annotations_per_item=2)
    me = app.get("/api/config", headers=auth(alice)).json()["me"]
    assert me == {"name": "alice", "role": "annotator"}
    item = app.post("/api/next", json={}, headers=auth(alice)).json()["item"]
    first = item["candidates"][0]["id"]
    assert app.post("/api/judgment", json=body(item["item_id"], [first]), headers=auth(alice)).status_code == 200
    assert store.judgments_table()[0]["annotator"] == "alice"
    before = snapshot(store)

    # Every way bob might read or change alice's judgment: refused, and the store is unchanged.
    attempts = [
        ("POST", "/api/judgment", body(item["item_id"], none_fit=True, annotator="alice")),
        ("PUT", "/api/judgment", body(item["item_id"], none_fit=True, annotator="alice")),
        ("PUT", "/api/judgment", body(item["item_id"], none_fit=True)),   # his own name: he has no judgment
        ("POST", "/api/next", {"annotator": "alice"}),
        ("POST", "/api/lease", {"annotator": "alice", "item_id": item["item_id"]}),
        ("GET", "/api/history?annotator=alice", None),
        ("GET", "/api/admin/summary", None),
        ("GET", f"/api/admin/item/{item['item_id']}", None),
        ("GET", "/api/admin/disagreements", None),
        ("GET", "/admin", None),
    ]
    for method, path, payload in attempts:
        response = app.request(method, path, json=payload, headers=auth(bob))
        assert response.status_code in (403, 404), (method, path, response.status_code, response.text)
    assert snapshot(store) == before
    # What bob may see of his own is his own only.
    assert app.get("/api/history", headers=auth(bob)).json()["items"] == []
    assert [i["item_id"] for i in app.get("/api/history", headers=auth(alice)).json()["items"]] == [item["item_id"]]


def test_no_token_an_unknown_one_the_shared_one_and_a_revoked_one_get_401(store_url, store, run_dir):
    alice = store.add_account("alice")
    app = client(store, run_dir, token="shared-secret")
    for headers in ({}, auth("nope"), auth("shared-secret")):
        assert app.get("/api/config", headers=headers).status_code == 401
        assert app.get("/", headers=headers).status_code == 401
    assert app.get(f"/?token={alice}").status_code == 200
    assert app.post("/api/next", json={}, headers=auth(alice)).status_code == 200
    assert store.revoke_account("alice")
    assert app.post("/api/next", json={}, headers=auth(alice)).status_code == 401   # at once, same server
    assert not store.revoke_account("alice")
    # Revoking everyone does not open the page again.
    assert app.post("/api/next", json={"annotator": "mallory"}).status_code == 401


def test_an_admin_sees_the_team_and_acts_only_as_themselves(store, run_dir):
    carol = store.add_account("carol", role="admin")
    app = client(store, run_dir)
    assert app.get("/api/admin/summary", headers=auth(carol)).status_code == 200
    assert app.get(f"/admin?token={carol}").status_code == 200
    assert app.post("/api/next", json={"annotator": "alice"}, headers=auth(carol)).status_code == 403


def test_without_accounts_on_loopback_the_one_person_flow_is_unchanged(store, run_dir):
    app = client(store, run_dir)
    assert app.get("/api/config").json()["me"] == {"name": None, "role": "admin"}
    item = app.post("/api/next", json={"annotator": "solo"}).json()["item"]
    assert app.post("/api/judgment", json=body(item["item_id"], none_fit=True, annotator="solo")).status_code == 200
    assert app.post("/api/next", json={}).status_code == 422   # nobody named: the page asks for a name
    assert app.get("/api/admin/summary").status_code == 200 and app.get("/admin").status_code == 200


def test_account_rules(store_url, store):
    store.add_account("alice")
    with pytest.raises(ValueError, match="already has an active account"):
        store.add_account("alice")
    with pytest.raises(ValueError, match="role"):
        store.add_account("dave", role="owner")
    with pytest.raises(ValueError, match="printable"):
        store.add_account("bad\nname")
    store.add_judgment(0, "e0", "simulated:x", [], none_fit=True, kind="simulated")
    with pytest.raises(ValueError, match="judged as 'simulated'"):
        store.add_account("simulated:x")
    store.revoke_account("alice")
    new = store.add_account("alice", role="admin")   # a revoked account gets a new link
    assert store.account_for_token(new).role == "admin"
    assert [(a.name, a.role, a.active) for a in store.accounts()] == [("alice", "admin", True)]


def test_cli_annotators_add_list_revoke(run_dir, store, capsys):
    assert main(["annotators", "add", str(run_dir), "alice", "--role", "admin"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"\?token=([\w-]+)", out).group(1)
    assert "/admin?token=" in out and store.account_for_token(token).name == "alice"
    assert main(["annotators", "list", str(run_dir)]) == 0
    assert re.search(r"alice\tadmin\tactive", capsys.readouterr().out)
    assert main(["annotators", "add", str(run_dir), "alice"]) == 2   # already active: a clear error
    assert "already has an active account" in capsys.readouterr().err
    assert main(["annotators", "revoke", str(run_dir), "alice"]) == 0
    assert store.account_for_token(token) is None
    assert main(["annotators", "revoke", str(run_dir), "alice"]) == 2


# ---------------------------------------------------------------- corrections


def test_a_correction_is_stored_with_its_judgment_and_revised_like_one(store_url, store, run_dir):
    app = client(store, run_dir, corrections=True)
    item = app.post("/api/next", json={"annotator": "ann"}).json()["item"]
    text = "the shape is red because <b>it</b> is painted red"
    response = app.post("/api/judgment", json=body(item["item_id"], none_fit=True, correction=text,
                                                   annotator="ann"))
    assert response.status_code == 200, response.text
    [judged] = store.judged_items()
    assert judged.judgments[0].correction == text and judged.judgments[0].none_fit
    history = app.get("/api/history?annotator=ann").json()["items"]
    assert history[0]["correction"] == text
    revised = app.put("/api/judgment", json=body(item["item_id"], none_fit=True, correction="better", annotator="ann"))
    assert revised.status_code == 200
    versions = store.judgment_history(item["item_id"], "ann")
    assert [v["correction"] for v in versions] == [text, "better"]


@pytest.mark.parametrize("extra, corrections, reason", [
    ({"none_fit": False, "accepted": "first", "correction": "mine"}, True, "comes with none_fit"),
    ({"none_fit": True, "correction": "mine"}, False, "corrections are off"),
    ({"none_fit": True, "correction": "   "}, True, "at least 1 character"),
    ({"none_fit": True, "correction": "x" * 2001}, True, "at most 2000 characters"),
])
def test_bad_corrections_get_a_422_with_a_reason(store, run_dir, extra, corrections, reason):
    app = client(store, run_dir, corrections=corrections)
    item = app.post("/api/next", json={"annotator": "ann"}).json()["item"]
    if extra.get("accepted") == "first":
        extra = {**extra, "accepted": [item["candidates"][0]["id"]]}
    payload = {**body(item["item_id"], annotator="ann"), **extra}
    response = app.post("/api/judgment", json=payload)
    assert response.status_code == 422 and reason in response.json()["detail"], response.text
    assert store.num_judgments() == 0


def test_corrections_are_sft_targets_dpo_chosen_and_kto_positives_and_exported(store_url, store):
    ids = store.candidate_ids(0)
    # e0: ann writes a rationale; e1: ann accepts candidate 0 (no correction); e2: none fits, no text.
    store.add_judgment(0, "e0", "ann", [], none_fit=True, correction="it is red all over")
    store.add_judgment(0, "e1", "ann", [ids["e1"][0]])
    store.add_judgment(0, "e2", "ann", [], none_fit=True)
    feedback = read_feedback(store)
    accepted = [(row.example_id, row.text) for row in feedback.accepted()]
    assert accepted == [("e0", "it is red all over"), ("e1", "e1 rationale 0")]
    pairs = [(p.example_id, p.chosen, p.rejected, p.source) for p in feedback.pairs()]
    assert [p for p in pairs if p[0] == "e0"] == [
        ("e0", "it is red all over", f"e0 rationale {k}", "correction") for k in range(3)]
    # Reference pairs are for items with nothing accepted: e0 has its correction, e2 takes the references.
    with_references = feedback.pairs({"e0": ["REF0"], "e2": ["REF2"]})
    assert {p.example_id for p in with_references if p.source == "reference"} == {"e2"}
    labelled = {(row.example_id, row.text): row.accepted for row in feedback.labelled()}
    assert labelled[("e0", "it is red all over")] is True and labelled[("e0", "e0 rationale 1")] is False
    assert [r["completion"].strip() for r in sft_rows(feedback)] == ["it is red all over", "e1 rationale 0"]
    dpo = {(r["chosen"].strip(), r["rejected"].strip()) for r in dpo_rows(feedback)}
    assert ("it is red all over", "e0 rationale 2") in dpo
    assert {r["completion"].strip(): r["label"] for r in kto_rows(feedback)}["it is red all over"] is True
    rows = judgment_rows(store.judged_items())
    assert {r["example_id"]: r["correction"] for r in rows} == {"e0": "it is red all over", "e1": None, "e2": None}
    # People's written rationale wins over nothing, but a correction never turns a rejected candidate accepted.
    assert feedback.status(feedback.items[0], "e0 rationale 0") == "rejected"


def test_the_policies_read_corrections_through_the_feedback_rules(store):
    from illume.data.records import Example
    from policies.data import store_pairs

    ids = store.candidate_ids(0)
    store.add_judgment(0, "e0", "ann", [], none_fit=True, correction="it is red all over")
    store.add_judgment(0, "e1", "ann", [ids["e1"][1]])
    examples = {e: Example(id=e, image=Image.new("RGB", (4, 4)), question="q?", answers=["red"],
                           explanations=["ref"]) for e in ("e0", "e1", "e2")}
    pairs = store_pairs(store, examples)
    assert {(p.example_id, p.chosen) for p in pairs} == {("e0", "it is red all over"), ("e1", "e1 rationale 1")}


# ---------------------------------------------------------------- the admin page's API


def test_admin_summary_agreement_disagreements_and_who_chose_what(store_url, store, run_dir):
    alice, bob = store.add_account("alice"), store.add_account("bob")
    carol = store.add_account("carol", role="admin")
    app = client(store, run_dir, annotations_per_item=2, corrections=True)
    choices = {"alice": [[0], [0, 1], None], "bob": [[0], [2], "my own rationale"]}
    for name, token in (("alice", alice), ("bob", bob)):
        for picks in choices[name]:
            item = app.post("/api/next", json={}, headers=auth(token)).json()["item"]
            by_position = sorted(item["candidates"], key=lambda c: c["id"])
            if picks is None or isinstance(picks, str):
                payload = body(item["item_id"], none_fit=True, **({"correction": picks} if picks else {}))
            else:
                payload = body(item["item_id"], [by_position[k]["id"] for k in picks])
            assert app.post("/api/judgment", json=payload, headers=auth(token)).status_code == 200
    summary = app.get("/api/admin/summary", headers=auth(carol)).json()
    [round0] = summary["team"]["rounds"]
    people = {a["annotator"]: a for a in round0["annotators"]}
    assert {name: a["items_judged"] for name, a in people.items()} == {"alice": 3, "bob": 3}
    assert people["bob"]["corrections"] == 1 and people["alice"]["median_seconds"] == 2.0
    assert summary["progress"] == [{"round_idx": 0, "items": 3, "complete_items": 3, "judgments": 6,
                                    "needed_judgments": 6}]
    # Alpha over the units (item, candidate) with both people's accept/reject, checked against the package.
    items = store.judged_items()
    matrix = [[float(item.judgments[k].decisions[c.id]) for item in items for c in item.candidates]
              for k in range(2)]
    expected = krippendorff.alpha(reliability_data=np.array(matrix), level_of_measurement="nominal")
    assert round0["alpha"] == pytest.approx(expected, abs=1e-9)
    assert summary["reward_vs_people"] is None
    listed = app.get("/api/admin/disagreements", headers=auth(carol)).json()["items"]
    # e0: both accept the first; e1: alice the first two, bob the third; e2: both "none fits" (bob wrote one).
    assert [i["example_id"] for i in listed] == ["e1"] and round0["disagreement_items"] == 1
    detail = app.get(f"/api/admin/item/{listed[0]['item_id']}", headers=auth(carol)).json()
    who = {c["text"]: (c["accepted_by"], c["rejected_by"]) for c in detail["candidates"]}
    assert who == {"e1 rationale 0": (["alice"], ["bob"]), "e1 rationale 1": (["alice"], ["bob"]),
                   "e1 rationale 2": (["bob"], ["alice"])}
    assert app.get("/api/admin/item/999", headers=auth(carol)).status_code == 404


def test_admin_reports_the_reward_models_precision_and_recall_against_people(store, run_dir):
    ids = store.candidate_ids(0)
    for example_id in ("e0", "e1"):
        store.add_judgment(0, example_id, "ann", [ids[example_id][0]])
    store.add_judgment(0, "e0", "reward:hybrid", [ids["e0"][0], ids["e0"][1]], kind="reward")
    store.add_judgment(0, "e1", "reward:hybrid", [], none_fit=True, kind="reward")
    rm = client(store, run_dir).get("/api/admin/summary").json()["reward_vs_people"]
    assert (rm["tp"], rm["fp"], rm["fn"], rm["tn"]) == (1, 1, 1, 3)
    assert rm["precision"] == pytest.approx(0.5) and rm["recall"] == pytest.approx(0.5)


def test_the_queue_hands_a_person_only_their_own_history(store):
    queue = AnnotationQueue(store)
    lease = queue.lease_item(0, "alice", 2, 60.0)
    queue.submit_judgment(lease.item_id, "alice", [], none_fit=True, correction="hers")
    assert queue.judgments_by(0, "bob") == []
    assert queue.judgments_by(0, "alice")[0]["correction"] == "hers"


def test_the_admin_summary_follows_new_judgments_and_revisions(store, run_dir):
    app = client(store, run_dir)
    queue = AnnotationQueue(store)
    rates = lambda: {a["annotator"]: (a["items_judged"], a["none_fit_rate"])  # noqa: E731
                     for a in app.get("/api/admin/summary").json()["team"]["rounds"][0]["annotators"]}
    assert rates() == {}
    lease = queue.lease_item(0, "ann", 1, 60.0)
    queue.submit_judgment(lease.item_id, "ann", [], none_fit=True)
    assert rates() == {"ann": (1, 1.0)}
    first = store.candidate_ids(0)[store.judged_items()[0].example_id][0]
    queue.replace_judgment(lease.item_id, "ann", [first])
    assert rates() == {"ann": (1, 0.0)}
    store.add_candidate_sets(1, "train", make_sets(["n0"]))
    assert [r["round_idx"] for r in app.get("/api/admin/summary").json()["progress"]] == [0, 1]
