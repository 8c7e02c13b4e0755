"""A team in real browsers (Debian Chromium through Playwright): two annotators with their own links, one of
them correcting with the keyboard only, the other unable to touch her work, an admin watching, a revoked link."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from illume.feedback.store import FeedbackStore
from tests.live_server import start_server, wait_in_page
from tests.test_annotate_server import make_sets, png_bytes

pytestmark = pytest.mark.slow


def _serve(store_path: Path, run_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    process, port = start_server(["-m", "illume.annotate.server", "--store", str(store_path), "--run-dir",
                                  str(run_dir), "--annotations-per-item", "2", "--corrections"], log_path)
    return process, f"http://127.0.0.1:{port}"


ITEM = "document.getElementById('main').dataset.itemId || null"


def _judge(page, keys: list[str], text: str | None = None) -> int:
    """Judge the item on screen with keys only (typing `text` after the keys, if given); returns its id."""
    item_id = wait_in_page(page, ITEM, lambda v: v is not None)
    for key in keys:
        page.keyboard.press(key)
    if text is not None:
        page.keyboard.type(text)
    page.keyboard.press("Enter")
    wait_in_page(page, f"({ITEM}) + '|' + !document.getElementById('main').hidden",
          lambda v, before=item_id: not v.startswith(f"{before}|") or v.endswith("false"))
    return int(item_id)


@pytest.mark.slow
def test_a_team_in_real_browsers(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "images" / "scene.png").write_bytes(png_bytes((40, 160, 40), size=96))
    ids = ["e0", "e1", "e2"]
    db = run_dir / "feedback.db"
    with FeedbackStore(db) as store:
        store.add_candidate_sets(0, "train", make_sets(ids), image_refs={e: "images/scene.png" for e in ids},
                                 questions={e: f"what colour is {e}?" for e in ids})
        alice, bob = store.add_account("alice"), store.add_account("bob")
        carol = store.add_account("carol", role="admin")
    process, url = _serve(db, run_dir, tmp_path / "server.log")
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])

            def open_page(path: str):
                page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{url}{path}")
                return page

            # Alice: her link names her (no name to type); she accepts one, writes one, edits one.
            page_a = open_page(f"/?token={alice}")
            wait_in_page(page_a, "document.getElementById('annotator-name').textContent", lambda v: v == "alice")
            assert page_a.evaluate("document.getElementById('name-dialog').hidden")
            alice_items = [_judge(page_a, ["1"]),
                           _judge(page_a, ["c"], "it is green all over"),
                           _judge(page_a, ["e", "End"], " and round")]

            # Bob judges the same three items his way.
            page_b = open_page(f"/?token={bob}")
            wait_in_page(page_b, "document.getElementById('annotator-name').textContent", lambda v: v == "bob")
            bob_items = [_judge(page_b, keys) for keys in (["2"], ["n"], ["3"])]
            assert sorted(alice_items) == sorted(bob_items)

            with FeedbackStore(db) as store:
                before = store.judgments_table()
            # From bob's browser, every call that would reach alice's work is refused.
            attempts = [
                ("PUT", "/api/judgment", {"annotator": "alice", "item_id": alice_items[0], "accepted": [],
                                          "none_fit": True}),
                ("POST", "/api/lease", {"annotator": "alice", "item_id": alice_items[0]}),
                ("POST", "/api/next", {"annotator": "alice"}),
                ("POST", "/api/judgment", {"annotator": "alice", "item_id": alice_items[0], "accepted": [],
                                           "none_fit": True}),
                ("GET", "/api/history?annotator=alice", None),
                ("GET", "/api/admin/summary", None),
                ("GET", f"/api/admin/item/{alice_items[0]}", None),
            ]
            statuses = []
            for method, path, payload in attempts:
                response = page_b.request.fetch(f"{url}{path}", method=method, data=payload,
                                                headers={"Authorization": f"Bearer {bob}"})
                statuses.append(response.status)
            assert all(status in (403, 404) for status in statuses), statuses
            with FeedbackStore(db) as store:
                assert store.judgments_table() == before

            # Carol's admin page shows both people's progress and opens their disagreement.
            page_c = open_page(f"/admin?token={carol}")
            people = "Array.from(document.querySelectorAll('#people tbody tr')).map(r => r.cells[0].textContent + ':' + r.cells[2].textContent).join(',')"
            assert wait_in_page(page_c, people, lambda v: v == "alice:3,bob:3")
            wait_in_page(page_c, "document.querySelectorAll('#disagreements button').length", lambda n: n >= 1)
            page_c.locator("#disagreements button").first.click()
            detail = "document.getElementById('detail').hidden ? '' : document.getElementById('detail-table').textContent"
            shown = wait_in_page(page_c, detail, lambda v: "alice" in v and "bob" in v)
            alpha = page_c.evaluate("document.querySelector('#rounds tbody tr').cells[4].textContent")
            page_c.screenshot(path=str(tmp_path / "admin.png"))
            if os.environ.get("ILLUME_SCREENSHOTS"):
                shutil.copy(tmp_path / "admin.png", os.environ["ILLUME_SCREENSHOTS"])

            # Revoked: alice's next request gets 401 and her page says her link does not work.
            with FeedbackStore(db) as store:
                assert store.revoke_account("alice")
            assert httpx.get(f"{url}/api/config", headers={"Authorization": f"Bearer {alice}"},
                             timeout=10).status_code == 401
            # Her open page finds out at its next request (it polls for work every 8 s).
            wait_in_page(page_a, "document.getElementById('empty-title').textContent",
                  lambda v: v == "This link does not work", timeout=20)
            # (a new connection: Playwright may reuse one that uvicorn closed after its 5 s keep-alive)
            assert httpx.get(f"{url}/?token={alice}", timeout=10).status_code == 401
            browser.close()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert errors == [] and "rationale" in shown and alpha not in ("", "–")
    with FeedbackStore(db) as store:
        mine = {item.item_id: next(j for j in item.judgments if j.annotator == "alice") for item in store.judged_items()}
        texts = {item.item_id: {c.id: c.text for c in item.candidates} for item in store.judged_items()}
    first, written, edited = (mine[i] for i in alice_items)
    assert sum(first.decisions.values()) == 1 and first.correction is None
    assert written.none_fit and written.correction == "it is green all over"
    assert edited.none_fit and edited.correction.endswith(" and round")
    assert edited.correction[: -len(" and round")] in texts[alice_items[2]].values()   # an edited candidate
