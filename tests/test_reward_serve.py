"""`illume reward serve` (reward/serve.py): the reward model over HTTP, and the engines' requests
(scripts/integrations/) answered by a real server.

Most tests talk to one uvicorn server in a thread on 127.0.0.1 (a free port) over a tiny random reward model
built here; what it answers is checked against `reward.model.score` called in-process on the same items."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from illume.config import load_config, save_config
from illume.data.records import Example
from illume.prompts import rationale_prompt
from reward.model import RewardModel, score
from reward.serve import ServeConfig, ServedModel, create_app, openrlhf_rationale, rationale_text
from tests.conftest import REPO, TINY_MODEL
from tests.live_server import ThreadedServer

TOKEN = "serve-s3cret"
LOCAL = "http://127.0.0.1"
BATCH = 4
MAX_ITEMS = 8
MAX_BODY = 60_000
THRESHOLD = 0.0
PLATT = (3.0, -0.2)
HELDOUT = {"target_precision": 0.5, "precision": 0.75, "recall": 0.5, "precision_crossfit": 0.7,
           "recall_crossfit": 0.4, "brier": 0.15, "ece": 0.05, "brier_crossfit": 0.18, "ece_crossfit": 0.08,
           "brier_base_rate": 0.21, "probability_unavailable": None, "roc_auc": 0.8, "pairwise_accuracy": 0.9,
           "num_candidates": 12, "num_examples": 4}
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
RATIONALES = ["the circle is red", "there is a small blue square on the left", "two triangles",
              "the square is on the right of the circle", "it is green", "there are three shapes"]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "integrations" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def picture(k: int) -> Image.Image:
    """A 32x32 RGB image, different for each k."""
    image = Image.new("RGB", (32, 32), COLOURS[k % len(COLOURS)])
    image.putpixel((k % 32, (k // 32) % 32), (k % 256, 7, 99))
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def item(k: int, rationale: str, question: str = "what colour is the circle?", answer: str = "red") -> dict:
    return {"image": b64(picture(k)), "question": question, "answer": answer, "rationale": rationale}


def sigmoid_of(scores: list[float], platt: tuple[float, float] = PLATT) -> list[float]:
    """P(accept) as the service must give it: 1 / (1 + exp(-(a * score + b)))."""
    return [1 / (1 + math.exp(-(platt[0] * s + platt[1]))) for s in scores]


def in_process(rm, k: int, question: str, answer: str, rationales: list[str]) -> list[float]:
    """`reward.model.score` of rationales for picture k, as the loop's critic calls it."""
    example = Example(f"e{k}", picture(k), question, [answer])
    return score(rm, [(example, rationale_prompt(question, answer), rationales)], batch_size=BATCH)[0]


@pytest.fixture(scope="module")
def served() -> ServedModel:
    """A tiny random MAGMA reward model, with a threshold, Platt's (a, b) and a held-out report as a fit would
    leave them."""
    from illume.demo.tiny_models import build_demo_vlm

    vlm = build_demo_vlm(load_config(REPO / "configs" / "demo.yaml", TINY_MODEL).model, seed=0)
    rm = RewardModel(vlm, seed=0).eval()
    rm.threshold, rm.target_precision, rm.platt, rm.backbone_id = THRESHOLD, 0.5, PLATT, "tiny"
    return ServedModel(rm, "reward/round_01", 1, HELDOUT)


@pytest.fixture(scope="module")
def live(served):
    server = ThreadedServer(create_app(served, ServeConfig(token=TOKEN, max_items=MAX_ITEMS, max_body_bytes=MAX_BODY,
                                                       batch_size=BATCH)))
    yield server
    server.stop()


def _post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return httpx.post(url, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


# ------------------------------------------------------------------------------------------- the route itself

def test_health_needs_no_token_and_names_the_model(live):
    response = httpx.get(f"{live.url}/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model"] == {"reward_dir": "reward/round_01", "round": 1, "pooling": "mean",
                             "threshold": THRESHOLD, "target_precision": 0.5, "platt": {"a": 3.0, "b": -0.2},
                             "heldout": HELDOUT}
    assert "threshold" in body["accept"] and "sigmoid(a * score + b)" in body["probability"]
    assert body["limits"] == {"max_items": MAX_ITEMS, "max_body_bytes": MAX_BODY, "max_text_chars": 4096,
                              "max_request_pixels": 1 << 26, "batch_size": BATCH, "image_paths": False}
    assert httpx.post(f"{live.url}/score", json={"items": [item(0, "red")]}, timeout=10).status_code == 401


def test_a_request_is_scored_as_reward_model_scores_it_in_process(live, served):
    """Items of two images, interleaved, one written as a chat model writes it ("red, seeing that ..."): each
    gets the reward `reward.model.score` gives its rationale (connective dropped, whitespace normalised)."""
    items = [item(0, RATIONALES[0]), item(1, RATIONALES[1]), item(0, "red, seeing that  the circle\n is red"),
             item(1, RATIONALES[2]), item(0, RATIONALES[3])]
    response = _post(f"{live.url}/score", {"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    question = items[0]["question"]
    expected_0 = in_process(served.rm, 0, question, "red", [RATIONALES[0], "the circle is red", RATIONALES[3]])
    expected_1 = in_process(served.rm, 1, question, "red", [RATIONALES[1], RATIONALES[2]])
    expected = [expected_0[0], expected_1[0], expected_0[1], expected_1[1], expected_0[2]]
    assert body["scores"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert body["scores"][0] == pytest.approx(body["scores"][2], rel=1e-6)  # the same rationale, once with the connective
    assert body["accept"] == [value >= THRESHOLD for value in body["scores"]] and body["threshold"] == THRESHOLD
    assert body["probability"] == pytest.approx(sigmoid_of(body["scores"]), rel=1e-12)
    by_score = sorted(zip(body["scores"], body["probability"]))
    assert [p for _, p in by_score] == sorted(body["probability"])  # a higher score, a higher probability
    assert 0 < min(body["probability"]) < max(body["probability"]) < 1


def test_twenty_concurrent_clients_with_bad_requests_mixed_in(live, served):
    """20 clients at once, 60 requests: good ones (each its own image and rationales) scored exactly as
    in-process, bad ones refused with their status and the field named; nothing mis-scored."""
    question = "what colour is the square?"
    good = {}
    for k in range(30):  # expectations first: the model is not thread-safe, in-process scoring included
        rationales = [f"{RATIONALES[(k + j) % len(RATIONALES)]} {'and ' * (k % 3)}it is" for j in range(1 + k % 5)]
        good[k] = (rationales, in_process(served.rm, k, question, "blue", rationales))
    oversized = json.dumps({"items": [item(0, "x" * 4000)] * 20}).encode()
    assert len(oversized) > MAX_BODY
    bad = {
        "wrong token": (lambda: _post(f"{live.url}/score", {"items": [item(1, "red")]}, token="wrong"), 401, None),
        "no token": (lambda: _post(f"{live.url}/score", {"items": [item(1, "red")]}, token=None), 401, None),
        "oversized body": (lambda: _post(f"{live.url}/score", None, raw=oversized), 413, None),
        "bad base64": (lambda: _post(f"{live.url}/score", {"items": [{**item(2, "red"), "image": "%%not base64"}]}),
                       422, "items.0.image"),
        "not an image": (lambda: _post(f"{live.url}/score", {"items": [
            item(2, "red"), {**item(3, "red"), "image": base64.b64encode(b"plain text").decode()}]}),
            422, "items.1.image"),
        "missing field": (lambda: _post(f"{live.url}/score", {"items": [
            {key: value for key, value in item(4, "red").items() if key != "rationale"}]}), 422, "items.0.rationale"),
        "too many items": (lambda: _post(f"{live.url}/score", {"items": [item(5, "red")] * (MAX_ITEMS + 1)}),
                           413, "items"),
    }

    def send(n: int):
        if n % 2 == 0:  # a good one
            k = n // 2
            response = _post(f"{live.url}/score", {"items": [item(k, r, question, "blue") for r in good[k][0]]})
            return "good", k, response
        name = list(bad)[n % len(bad)]
        return name, None, bad[name][0]()

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(send, range(60)))
    assert sum(kind == "good" for kind, _, _ in results) == 30
    for kind, k, response in results:
        if kind == "good":
            assert response.status_code == 200, response.text
            assert response.json()["scores"] == pytest.approx(good[k][1], rel=1e-5, abs=1e-6), k
            continue
        _, status, field = bad[kind]
        assert response.status_code == status, (kind, response.text)
        detail = response.json()["detail"]
        if field is not None:
            assert detail.startswith(f"{field}:") or f"; {field}:" in detail, (kind, detail)
    too_many = next(r for kind, _, r in results if kind == "too many items").json()["detail"]
    assert f"at most {MAX_ITEMS} items" in too_many
    assert "--max-body-bytes" in next(r for kind, _, r in results if kind == "oversized body").json()["detail"]


def test_scoring_is_serialised(served, monkeypatch):
    """The model is not thread-safe: concurrent requests reach `reward.model.score` one at a time (a wrapper
    that lingers in it counts how many are inside at once)."""
    import reward.model

    original, inside, most = reward.model.score, [0], [0]
    guard = threading.Lock()

    def lingering_score(*args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(reward.model, "score", lingering_score)
    server = ThreadedServer(create_app(served, ServeConfig(token=TOKEN)))
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(lambda k: _post(f"{server.url}/score", {"items": [item(k, "red")]}), range(8)))
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * 8 and most[0] == 1


def test_errors_name_the_field_and_what_is_allowed(served):
    client = TestClient(create_app(served, ServeConfig()), base_url=LOCAL)
    unknown = client.post("/score", json={"items": [{**item(0, "red"), "colour": "red"}]})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "items.0.colour"
    assert "image, image_path, question, answer, rationale" in unknown.json()["detail"]
    both = client.post("/score", json={"items": [{**item(0, "red"), "image_path": "a.png"}]})
    assert both.status_code == 422 and "exactly one of `image` (base64) or `image_path`" in both.json()["detail"]
    paths = client.post("/score", json={"items": [{**{k: v for k, v in item(0, "red").items() if k != "image"},
                                                   "image_path": "a.png"}]})
    assert paths.status_code == 422 and "--image-root" in paths.json()["detail"]
    assert client.post("/score", json={"items": []}).status_code == 422
    assert client.post("/score", json=[item(0, "red")]).json()["detail"].startswith('the body is {"items"')
    assert client.post("/score", content=b"{not json").json()["detail"] == "the body is not JSON"
    wrong_type = client.post("/score", json={"items": [{**item(0, "red"), "question": 7}]})
    assert wrong_type.json()["errors"][0]["field"] == "items.0.question"


def test_the_images_of_a_request_have_a_pixel_budget(served, monkeypatch):
    """Checked from the headers before anything is decoded; an image sent twice counts once."""
    monkeypatch.setattr("reward.serve.MAX_REQUEST_PIXELS", 32 * 32 * 2)
    client = TestClient(create_app(served, ServeConfig()), base_url=LOCAL)
    assert client.post("/score", json={"items": [item(0, "a"), item(1, "b"), item(0, "c")]}).status_code == 200
    over = client.post("/score", json={"items": [item(0, "a"), item(1, "b"), item(2, "c")]})
    assert over.status_code == 413 and over.json()["errors"][0]["field"] == "items"
    assert f"more than {32 * 32 * 2} pixels" in over.json()["detail"]


def test_images_are_read_from_the_image_root_only(served, tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    picture(3).save(root / "sub" / "three.png")
    picture(4).save(tmp_path / "outside.png")
    (root / "notes.txt").write_text("not an image")
    client = TestClient(create_app(served, ServeConfig(image_root=root)), base_url=LOCAL)
    fields = {"question": "what colour is the circle?", "answer": "red", "rationale": "the circle is red"}
    scored = client.post("/score", json={"items": [{**fields, "image_path": "sub/three.png"}]})
    assert scored.status_code == 200, scored.text
    assert scored.json()["scores"] == pytest.approx(
        in_process(served.rm, 3, fields["question"], "red", [fields["rationale"]]), rel=1e-5, abs=1e-6)
    for ref in ("../outside.png", str(tmp_path / "outside.png"), "notes.txt", "missing.png"):
        refused = client.post("/score", json={"items": [{**fields, "image_path": ref}]})
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "items.0.image_path", ref


def test_a_model_without_threshold_or_platt_gives_no_accept_and_no_probability(served):
    unthresholded = ServedModel(served.rm, "reward", None, None)  # create_app reads threshold and (a, b) once
    saved, (served.rm.threshold, served.rm.platt) = (served.rm.threshold, served.rm.platt), (None, None)
    try:
        client = TestClient(create_app(unthresholded, ServeConfig()), base_url=LOCAL)
    finally:
        served.rm.threshold, served.rm.platt = saved
    body = client.post("/score", json={"items": [item(0, "red")]}).json()
    assert body["accept"] is None and body["threshold"] is None and len(body["scores"]) == 1
    assert body["probability"] is None
    health = client.get("/health").json()
    assert health["accept"] is None and health["model"]["round"] is None and health["model"]["heldout"] is None
    assert health["probability"] is None and health["model"]["platt"] is None
    openrlhf = client.post("/openrlhf", json={"query": ["Q: a A: red, seeing that it is red"],
                                              "prompts": ["Q: a A: red, seeing that"],
                                              "labels": [{"image": b64(picture(0)), "question": "a", "answer": "red"}]})
    assert openrlhf.json()["extra_logs"] == {}


def test_the_rationale_is_normalised_as_the_sampler_stores_it():
    assert rationale_text("red", "  red, seeing that   the circle is\tred ") == "the circle is red"
    assert rationale_text("red", "the circle is red") == "the circle is red"
    assert rationale_text("blue", "red, seeing that x") == "red, seeing that x"  # another answer's: kept


def test_the_openrlhf_query_is_read_after_its_prompt():
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q: what? A: red<|im_end|>\n" \
             "<|im_start|>assistant\n"
    expanded = prompt.replace("<|image_pad|>", "<|image_pad|>" * 64)  # as the processor expands it
    assert openrlhf_rationale(prompt + "red, seeing that it is red<|im_end|>", prompt) == "red, seeing that it is red"
    assert openrlhf_rationale(expanded + " it is red <|im_end|><|endoftext|>", prompt) == " it is red"
    assert openrlhf_rationale("something else entirely", prompt) is None


# ------------------------------------------------------------------------------------------- the command

def test_the_command_binds_loopback_by_default_and_a_wider_bind_needs_a_token(served, monkeypatch, capsys):
    from illume.cli import main

    served_calls, serve_calls = [], []
    monkeypatch.setattr("reward.serve.load_served_model",
                        lambda run_dir, round_idx=None: served_calls.append((run_dir, round_idx)) or served)
    monkeypatch.setattr("illume.http_guard.serve",
                        lambda app, host, port, log_level="warning": serve_calls.append((app, host, port)))
    assert main(["reward", "serve", "runs/x", "--round", "1"]) == 0
    app, host, port = serve_calls[-1]
    assert (host, port) == ("127.0.0.1", ServeConfig.port) and served_calls[-1][1] == 1
    local = TestClient(app, base_url=LOCAL)
    assert local.post("/score", json={"items": [item(0, "red")]}).status_code == 200  # no token on loopback
    assert TestClient(app, base_url="http://evil.example").get("/health").status_code == 400

    assert main(["reward", "serve", "runs/x", "--host", "0.0.0.0", "--port", "9999"]) == 0
    token = re.search(r"generated a token: (\S+)", capsys.readouterr().out).group(1)
    app, host, port = serve_calls[-1]
    assert (host, port) == ("0.0.0.0", 9999)
    wide = TestClient(app, base_url=LOCAL)
    assert wide.post("/score", json={"items": [item(0, "red")]}).status_code == 401
    assert wide.get("/health").status_code == 200
    assert wide.post(f"/score?token={token}", json={"items": [item(0, "red")]}).status_code == 200

    # The token from the environment (kept out of the process list), for a wide bind: none is generated.
    monkeypatch.setenv("ILLUME_REWARD_TOKEN", "from-the-environment")
    assert main(["reward", "serve", "runs/x", "--host", "0.0.0.0"]) == 0
    assert "generated a token" not in capsys.readouterr().out
    by_env = TestClient(serve_calls[-1][0], base_url=LOCAL)
    assert by_env.post(f"/score?token={token}", json={"items": [item(0, "red")]}).status_code == 401
    assert by_env.post("/score", json={"items": [item(0, "red")]},
                       headers={"Authorization": "Bearer from-the-environment"}).status_code == 200
    monkeypatch.delenv("ILLUME_REWARD_TOKEN")

    assert main(["reward", "train", "runs/x", "--port", "1"]) == 2
    assert "--port is for `illume reward serve`" in capsys.readouterr().err
    assert main(["reward", "serve", "runs/x", "--max-items", "0"]) == 2
    assert main(["reward", "serve", "runs/x", "--allowed-host", "lab.*.org"]) == 2
    assert "--allowed-host: 'lab.*.org'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_serves_a_runs_reward_model(tmp_path):
    """`illume reward serve RUN_DIR` in its own process over a run's saved reward model (reward/round_01,
    chosen as the latest): /health says so, /score answers as the model loaded in-process scores."""
    from illume.demo.tiny_models import build_demo_vlm
    from illume.loading import load_vlm, model_identity

    vlm = build_demo_vlm(load_config(REPO / "configs" / "demo.yaml", TINY_MODEL).model, seed=0)
    vlm.save(tmp_path / "base")
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY_MODEL + [
        f"model.path={tmp_path / 'base'}", f"output_dir={tmp_path}", "name=run"])
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    rm = RewardModel(vlm, seed=1)
    rm.threshold, rm.target_precision, rm.platt, rm.backbone_id = 0.01, 0.5, PLATT, model_identity(cfg)
    rm.save(run_dir / "reward" / "round_01")
    (run_dir / "reward" / "round_01" / "reward_eval.json").write_text(json.dumps(HELDOUT))
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "illume.cli", "reward", "serve", str(run_dir), "--port",
                                str(port), "--token", TOKEN], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the service did not start"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json()["model"]["reward_dir"] == "reward/round_01" and health.json()["model"]["round"] == 1
        assert health.json()["model"]["heldout"]["precision"] == HELDOUT["precision"]
        items = [item(0, RATIONALES[0]), item(0, RATIONALES[1])]
        response = _post(f"http://127.0.0.1:{port}/score", {"items": items})
        assert response.status_code == 200, response.text
        loaded = RewardModel.load(run_dir / "reward" / "round_01", load_vlm(cfg))
        assert response.json()["scores"] == pytest.approx(
            in_process(loaded, 0, items[0]["question"], "red", RATIONALES[:2]), rel=1e-5, abs=1e-6)
        assert response.json()["threshold"] == 0.01
        scores = response.json()["scores"]
        assert response.json()["probability"] == pytest.approx(sigmoid_of(scores), rel=1e-12)
    finally:
        process.kill()
        process.wait(timeout=30)
        log.close()


# ------------------------------------------------------------------------------------------- the engines

def test_trl_grpo_calls_the_reward_function_and_gets_the_services_scores(live, served):
    """TRL's own `GRPOTrainer._calculate_rewards` (TRL 1.16) drives the reward function, on a trainer stand-in
    holding what that method reads: the dataset rows (prompt, image, question, answer) with each prompt's G=3
    generations, conversational prompts and completions, as TRL builds them for a VLM."""
    import trl

    reward = _module("trl_reward").IllumeReward(live.url, token=TOKEN)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "image": picture(k), "question": q, "answer": a, "example_id": f"e{k}"}
            for k, q, a in ((0, "what colour is the circle?", "red"), (1, "how many shapes?", "two"))]
    inputs = [dict(row, image=row["image"].copy()) for row in rows for _ in range(3)]  # a `datasets` row per draw
    texts = ["red, seeing that the circle is red", "the circle is red", "there are three shapes",
             "two, seeing that there are two", "two triangles", "it is green"]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", is_main_process=True), args=SimpleNamespace(report_to=[]),
        state=SimpleNamespace(global_step=0), reward_funcs=[reward], reward_processing_classes=[None],
        reward_func_names=[reward.__name__], environments=None, _log_completion_extra=lambda *a, **k: None,
        _log_metric=lambda *a, **k: None)
    rewards = trl.GRPOTrainer._calculate_rewards(trainer, inputs, [x["prompt"] for x in inputs], completions,
                                                 [[1, 2, 3]] * len(texts))
    expected = (in_process(served.rm, 0, rows[0]["question"], "red", [rationale_text("red", t) for t in texts[:3]])
                + in_process(served.rm, 1, rows[1]["question"], "two",
                             [rationale_text("two", t) for t in texts[3:]]))
    assert rewards.shape == (6, 1)
    assert rewards[:, 0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    accept = _module("trl_reward").IllumeReward(live.url, token=TOKEN, reward="accept", max_items=4)
    assert accept(prompts=[x["prompt"] for x in inputs], completions=completions, image=[x["image"] for x in inputs],
                  question=[x["question"] for x in inputs], answer=[x["answer"] for x in inputs]) == [
        float(value >= THRESHOLD) for value in expected]
    probability = _module("trl_reward").IllumeReward(live.url, token=TOKEN, reward="probability")
    assert probability(prompts=[x["prompt"] for x in inputs], completions=completions,
                       image=[x["image"] for x in inputs], question=[x["question"] for x in inputs],
                       answer=[x["answer"] for x in inputs]) == pytest.approx(sigmoid_of(expected), rel=1e-4)


def test_verl_calls_compute_score_as_its_reward_managers_do(live, served):
    """verl's naive manager: one call per response with keyword arguments, its extra_info grown by num_turns
    and rollout_reward_scores, the reward_kwargs merged in; the batch manager: one call with numpy columns."""
    import numpy as np

    verl = _module("verl_reward")
    png = base64.b64decode(b64(picture(2)))
    extra_infos = [{"split": "train", "index": 0, "question": "where is the square?", "answer": "left",
                    "image": {"bytes": png, "path": None}},
                   {"split": "train", "index": 1, "question": "where is the square?", "answer": "left",
                    "image": b64(picture(2))}]
    responses = ["the square is on the left", "left, seeing that it is on the left"]
    reward_kwargs = {"url": live.url, "token": TOKEN}
    singles = []
    for response, extra_info in zip(responses, extra_infos):
        extra_info = {**extra_info, "num_turns": None, "rollout_reward_scores": {}}
        singles.append(verl.compute_score(**{"data_source": "illume", "solution_str": response,
                                             "ground_truth": "left", "extra_info": extra_info, **reward_kwargs}))
    expected = in_process(served.rm, 2, "where is the square?", "left",
                          ["the square is on the left", "it is on the left"])
    assert singles == pytest.approx(expected, rel=1e-5, abs=1e-6)
    batch = verl.compute_score_batch(data_sources=np.array(["illume"] * 2, dtype=object), solution_strs=responses,
                                     ground_truths=["left", "left"],
                                     extra_infos=np.array(extra_infos, dtype=object), **reward_kwargs, max_items=1)
    assert batch == pytest.approx(expected, rel=1e-5, abs=1e-6)
    probabilities = verl.compute_score_batch(data_sources=["illume"] * 2, solution_strs=responses,
                                             ground_truths=["left", "left"], extra_infos=extra_infos,
                                             **reward_kwargs, reward="probability")
    assert probabilities == pytest.approx(sigmoid_of(expected), rel=1e-4)
    with pytest.raises(RuntimeError, match="401"):
        verl.compute_score("illume", "x", "left", extra_infos[1], url=live.url, token="wrong")


def test_openrlhf_remote_reward_request_is_answered(live, served):
    """The POST OpenRLHF's SingleTurnAgentExecutor makes (aiohttp, json=payload, no headers of its own: the token
    rides in the URL), with labels made by scripts/integrations/openrlhf_labels.py."""
    import aiohttp

    make_label = _module("openrlhf_labels").make_label
    prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour is the circle?<|im_end|>\n"
              "<|im_start|>assistant\n")
    query = prompt.replace("<|image_pad|>", "<|image_pad|>" * 16) + "red, seeing that the circle is red<|im_end|>"
    payload = {"query": [query], "prompts": [prompt], "labels": [make_label(picture(5), "what colour is the circle?",
                                                                         "red")]}

    async def post(url: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(url, json=payload) as response:
                return response.status, await response.json()

    status, body = asyncio.run(post(f"{live.url}/openrlhf?token={TOKEN}"))
    assert status == 200, body
    expected = in_process(served.rm, 5, "what colour is the circle?", "red", ["the circle is red"])
    assert body["rewards"] == pytest.approx(expected, rel=1e-5, abs=1e-6) and body["scores"] == body["rewards"]
    assert body["extra_logs"]["accept"] == [float(expected[0] >= THRESHOLD)]
    assert body["extra_logs"]["probability"] == pytest.approx(sigmoid_of(expected), rel=1e-4)
    assert set(body["extra_logs"]) == {"accept", "probability"}
    assert asyncio.run(post(f"{live.url}/openrlhf"))[0] == 401
    bad = _post(f"{live.url}/openrlhf", {**payload, "labels": ["not json"]}).json()["detail"]
    assert bad.startswith("labels.0:")
    assert _post(f"{live.url}/openrlhf", {**payload, "prompts": []}).status_code == 422
