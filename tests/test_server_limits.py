"""The annotation server's guards (issue 24, part 6), most against a live server (uvicorn in a subprocess):
a body over `annotate.max_body_bytes` is refused before it is read, the token is checked before the body is
parsed, a `Host` the server was not bound under gets 400 (DNS rebinding), and a resubmission that differs
from the stored judgment gets 409 with the stored one (the page offers to revise it)."""

from __future__ import annotations

import json
import select
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from illume.annotate.server import create_app
from illume.config import AnnotateConfig
from illume.feedback.queue import AnnotationQueue, JudgmentConflict
from illume.feedback.store import FeedbackStore
from illume.http_guard import LOOPBACK_NAMES, allowed_hosts
from tests.live_server import start_server, wait_in_page
from tests.test_annotate_server import LOCAL, make_sets

TOKEN = "s3cret-token"
LIMIT = AnnotateConfig.max_body_bytes
MiB = 1 << 20


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with a token (`python -m illume.annotate.server --token`): (process, port, store path)."""
    tmp = tmp_path_factory.mktemp("guarded")
    db = tmp / "feedback.db"
    with FeedbackStore(db) as store:
        store.add_candidate_sets(0, "train", make_sets([f"g{i}" for i in range(6)]))
    process, port = start_server(["-m", "illume.annotate.server", "--store", str(db), "--token", TOKEN],
                           tmp / "server.log")
    yield process, port, db
    _stop(process)


@pytest.fixture(scope="module")
def open_page(tmp_path_factory):
    """`illume annotate RUN_DIR` on loopback without a token, with annotate.allowed_hosts set in the run's
    config: (process, port, store path)."""
    run_dir = tmp_path_factory.mktemp("open") / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"annotate": {"allowed_hosts": ["annotate.example.org", "*.lab.example.org"]}}))
    db = run_dir / "feedback.db"
    with FeedbackStore(db) as store:
        store.add_candidate_sets(0, "train", make_sets([f"o{i}" for i in range(8)]))
    process, port = start_server(["-m", "illume.cli", "annotate", str(run_dir)], run_dir.parent / "server.log")
    yield process, port, db
    _stop(process)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _send_big(port: int, path: str, total: int, headers: tuple[str, ...] = (), chunked: bool = False
              ) -> tuple[int | None, float]:
    """POST `total` bytes to `path` in 1 MiB pieces (declared with Content-Length, or chunked), stopping as
    soon as the server answers or closes; returns (status, seconds until the answer)."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json", *headers,
            "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"]
    piece = b"x" * MiB
    frame = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent, pending = 0, memoryview(b"")
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [sock], [], 60)
                if readable:  # answered (or closed) before the body was all sent
                    break
                pending = pending or memoryview(frame)
                pending = pending[sock.send(pending):]
                sent += 0 if pending else len(piece)
            else:
                sock.sendall(b"0\r\n\r\n" if chunked else b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while b"\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    seconds = time.perf_counter() - start
    return (int(answer.split()[1]) if answer.startswith(b"HTTP/") else None), seconds


def _client(port: int, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)


def _judgment(item: dict, accepted: list[int] | None = None, none_fit: bool = False, **extra) -> dict:
    return {"annotator": extra.pop("annotator", "ann"), "item_id": item["item_id"], "accepted": accepted or [],
            "none_fit": none_fit, "client_token": extra.pop("client_token", str(uuid.uuid4())), **extra}


# ---------------------------------------------------------------- body size and token, live


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(guarded):
    """100 MB bodies without a token: 413 (declared) or 401 (streamed) in moments, and the server does not
    grow (today's main reads and parses each before checking the token: ~1 GB)."""
    process, port, _ = guarded
    before = _rss_mb(process.pid)
    declared, declared_s = _send_big(port, "/api/judgment", 100 * MiB)
    streamed, streamed_s = _send_big(port, "/api/judgment", 100 * MiB, chunked=True)
    after = _rss_mb(process.pid)
    print(f"\nRSS {before:.0f} -> {after:.0f} MB; declared 100 MB: {declared} in {declared_s:.3f} s, "
          f"streamed 100 MB: {streamed} in {streamed_s:.3f} s")
    assert declared == 413 and declared_s < 5
    assert streamed in (401, 413) and streamed_s < 5
    assert after - before < 30
    with _client(port, TOKEN) as client:  # still serving
        assert client.get("/api/config").status_code == 200


def test_a_body_over_the_limit_is_refused_even_with_a_token_and_a_normal_one_is_stored(guarded):
    process, port, db = guarded
    with _client(port, TOKEN) as client:
        item = client.post("/api/next", json={"annotator": "limits"}).json()["item"]
        body = _judgment(item, [item["candidates"][0]["id"]], annotator="limits")
        padded = json.dumps(body).encode()
        padded = padded[:-1] + b" " * (LIMIT + 1 - len(padded)) + b"}"  # valid JSON, one byte over
        assert len(padded) == LIMIT + 1
        too_big = client.post("/api/judgment", content=padded, headers={"Content-Type": "application/json"})
        assert too_big.status_code == 413 and "max_body_bytes" in too_big.json()["detail"]
        before = _rss_mb(process.pid)
        streamed, _ = _send_big(port, "/api/judgment", 20 * MiB, (f"Authorization: Bearer {TOKEN}",),
                                chunked=True)
        assert streamed == 413 and _rss_mb(process.pid) - before < 30
        fits = client.post("/api/judgment", content=padded[:-2] + b"}",
                           headers={"Content-Type": "application/json"})
        assert fits.status_code == 200 and fits.json()["duplicate"] is False
    with FeedbackStore(db) as store:
        assert [j["accepted"] for j in AnnotationQueue(store).judgments_by(0, "limits")] == [body["accepted"]]


def test_the_token_is_checked_before_the_body_is_parsed(guarded):
    _, port, _ = guarded
    json_type = {"Content-Type": "application/json"}
    with _client(port) as anyone:
        refused = anyone.post("/api/judgment", content=b"{not json", headers=json_type)
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
        assert refused.headers["www-authenticate"] == "Bearer"
        assert anyone.post("/api/judgment", content=b"{not json", headers={
            **json_type, "Authorization": "Bearer wrong"}).status_code == 401
    with _client(port, TOKEN) as holder:
        assert holder.post("/api/judgment", content=b"{not json", headers=json_type).status_code == 422


# ---------------------------------------------------------------- Host, live


@pytest.mark.parametrize("method, path", [("GET", "/api/config"), ("GET", "/api/history?annotator=ann"),
                                          ("GET", "/api/admin/summary"), ("POST", "/api/judgment"),
                                          ("GET", "/")])
def test_a_loopback_server_answers_no_other_host(open_page, method, path):
    """A page elsewhere that rebinds its name to 127.0.0.1 reaches nothing; nothing is stored."""
    _, port, db = open_page
    with FeedbackStore(db) as store:
        item = AnnotationQueue(store).item(1)
    body = _judgment({"item_id": 1}, [item["candidates"][0][0]], annotator="mallory") if method == "POST" else None
    with _client(port) as client:
        for host in ("evil.example", f"evil.example:{port}", "lab.example.org", "127.0.0.1.evil.example"):
            response = client.request(method, path, json=body, headers={"Host": host})
            assert response.status_code == 400, (host, response.text)
    with FeedbackStore(db) as store:
        assert AnnotationQueue(store).judgments_by(0, "mallory") == []


def test_a_loopback_server_answers_its_own_names_and_the_allowed_hosts(open_page):
    _, port, _ = open_page
    with _client(port) as client:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "annotate.example.org",
                     f"Annotate.Example.org:{port}", "page.lab.example.org"):
            response = client.get("/api/config", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)


# ---------------------------------------------------------------- a resubmission that differs, live


def test_a_different_resubmission_gets_409_with_the_stored_judgment_and_put_revises_it(guarded):
    """Today's main answers the different one 200 `duplicate: true` and keeps the first choice."""
    _, port, db = guarded
    with _client(port, TOKEN) as client:
        item = client.post("/api/next", json={"annotator": "rita"}).json()["item"]
        first_id, second_id = (c["id"] for c in item["candidates"][:2])
        first = _judgment(item, [first_id], annotator="rita", client_token="tab-1")
        assert client.post("/api/judgment", json=first).json()["duplicate"] is False
        for same in (first, {**first, "client_token": "tab-2", "seconds": 3.0}):  # a retry; another tab
            again = client.post("/api/judgment", json=same)
            assert again.status_code == 200 and again.json()["duplicate"] is True
        stored = {"accepted": [first_id], "none_fit": False, "correction": None}
        for other in (_judgment(item, [second_id], annotator="rita", client_token="tab-2"),
                      _judgment(item, [first_id, second_id], annotator="rita"),
                      _judgment(item, none_fit=True, annotator="rita"),
                      {**first, "accepted": [second_id]}):  # even under the first one's client_token
            conflict = client.post("/api/judgment", json=other)
            assert conflict.status_code == 409, conflict.text
            assert conflict.json()["stored"] == stored and "differently" in conflict.json()["detail"]
        revised = client.put("/api/judgment", json=_judgment(item, [second_id], annotator="rita"))
        assert revised.status_code == 200 and revised.json()["duplicate"] is False
    with FeedbackStore(db) as store:
        assert [v["accepted"] for v in store.judgment_history(item["item_id"], "rita")] == [[first_id],
                                                                                           [second_id]]


# ---------------------------------------------------------------- unit level (TestClient, the queue)


def test_the_allowed_hosts_follow_the_bound_host():
    assert set(LOOPBACK_NAMES) <= set(allowed_hosts("127.0.0.1")) == set(allowed_hosts("localhost"))
    wildcard = allowed_hosts("0.0.0.0", ["Proxy.example.org"])
    assert {socket.gethostname().lower(), "proxy.example.org", *LOOPBACK_NAMES} <= set(wildcard)
    assert allowed_hosts("10.1.2.3") == ["10.1.2.3"] and allowed_hosts("fe80::1") == ["[fe80::1]"]
    assert allowed_hosts("annotate.lab", ["*.example.org"]) == ["*.example.org", "annotate.lab"]
    with pytest.raises(ValueError, match="allowed_hosts"):
        allowed_hosts("127.0.0.1", ["lab.*.org"])


def test_the_default_app_refuses_a_foreign_host_and_a_streamed_body_over_its_limit(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets(["e0"]))
        app = create_app(store, None, AnnotateConfig(max_body_bytes=2048), token=TOKEN)
        assert TestClient(app).get("/static/app.js").status_code == 400  # TestClient's Host: "testserver"
        client = TestClient(app, base_url=LOCAL, headers={"Authorization": f"Bearer {TOKEN}"})
        assert client.get("/static/app.js").status_code == 200
        streamed = client.post("/api/next", content=iter([b" " * 1024] * 3),
                               headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and "2048" in streamed.json()["detail"]
        assert client.post("/api/next", content=b"{}" + b" " * 1000,
                           headers={"Content-Type": "application/json"}).status_code == 422  # names no one


def test_the_queue_keeps_an_identical_resubmission_and_refuses_a_different_one(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", make_sets(["e0"]))
        queue = AnnotationQueue(store)
        item = queue.item(1)
        first, second = (candidate_id for candidate_id, _ in item["candidates"][:2])
        assert queue.submit_judgment(1, "ann", [], none_fit=True, correction="mine", client_token="a")
        assert not queue.submit_judgment(1, "ann", [], none_fit=True, correction="mine", client_token="b")
        for accepted, none_fit, correction in (([first], False, None), ([], True, None), ([], True, "other")):
            with pytest.raises(JudgmentConflict, match="differently") as conflict:
                queue.submit_judgment(1, "ann", accepted, none_fit=none_fit, correction=correction)
            assert conflict.value.stored == {"accepted": [], "none_fit": True, "correction": "mine"}
        assert queue.replace_judgment(1, "ann", [first, second])
        assert not queue.submit_judgment(1, "ann", [second, first])  # the order ticked does not matter
        assert store.num_judgments() == 1


# ---------------------------------------------------------------- the page, in a browser


@pytest.mark.slow
def test_the_page_offers_to_replace_a_different_saved_answer(open_page):
    """Two tabs of one person show the same item; the first saves rationale 1, the second answers 2: the
    second tab says what is saved, and Enter replaces it through the revision path."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    _, port, db = open_page
    item_js = "document.getElementById('main').dataset.itemId || null"
    conflict_js = "document.getElementById('conflict').hidden ? null : document.getElementById('conflict-stored').textContent"

    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        tab_1 = context.new_page()
        tab_1.on("pageerror", lambda error: errors.append(str(error)))
        tab_1.goto(f"http://127.0.0.1:{port}/")
        tab_1.wait_for_selector("#name-input", state="visible")
        tab_1.keyboard.type("pat")
        tab_1.keyboard.press("Enter")
        item_id = wait_in_page(tab_1, item_js, lambda v: v is not None)
        tab_2 = context.new_page()  # the same person (the name is remembered): their leased item again
        tab_2.on("pageerror", lambda error: errors.append(str(error)))
        tab_2.goto(f"http://127.0.0.1:{port}/")
        assert wait_in_page(tab_2, item_js, lambda v: v is not None) == item_id
        tab_1.keyboard.press("1")
        tab_1.keyboard.press("Enter")
        wait_in_page(tab_1, item_js, lambda v: v != item_id)
        tab_2.keyboard.press("2")
        tab_2.keyboard.press("Enter")
        assert wait_in_page(tab_2, conflict_js, lambda v: v is not None) == "rationale 1 ticked"
        assert "Replace" in tab_2.locator("#submit-label").text_content()
        tab_2.keyboard.press("Enter")
        wait_in_page(tab_2, item_js, lambda v: v != item_id)
        assert tab_2.evaluate(conflict_js) is None and "Replaced" in tab_2.locator("#status").text_content()
        browser.close()
    assert errors == []
    with FeedbackStore(db) as store:
        shown = {j["item_id"]: j for j in AnnotationQueue(store).judgments_by(0, "pat")}[int(item_id)]
        history = store.judgment_history(int(item_id), "pat")
    assert [version["accepted"] for version in history] == [shown["shown_order"][:1], shown["shown_order"][1:2]]
