"""`sample.engine: vllm` (illume.vllm_engine) against tests/vllm_stand_in.py, a stand-in for vLLM's
OpenAI-compatible server that checks the requests against vLLM's documented fields and samples with our tiny HF
demo model. None of this is "tested with vLLM": the tests that need real vLLM are marked `gpu` and skip where
no vLLM environment is given (ILLUME_VLLM_PYTHON)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import requests
import torch

from illume.cli import main
from illume.config import ConfigError, load_config
from illume.data.datasets import load_split
from illume.data.records import load_image
from illume.feedback.store import FeedbackStore
from illume.loading import load_vlm
from illume.models.weights import load_trainable_weights
from illume.prompts import answer_prompt, example_seed, rationale_prompt
from illume.sampling import engine_session, sample
from illume.vllm_engine import VLLMError, adapter_digest, base_model_path, check_vllm_settings, max_lora_rank
from tests.conftest import REPO
from tests.live_server import ThreadedServer
from tests.vllm_stand_in import StandInServer, make_app

DEMO_HF = REPO / "configs" / "demo_hf.yaml"
# Leaves the shipped HF demo model's settings as they are (tests/test_demo_hf.py's SHORT_RUN).
SMALL = ["data.shapes.num_train_scenes=12", "data.shapes.num_val_scenes=8", "data.max_train_examples=6",
         "data.max_val_examples=4"]
SAMPLING = ["sample.temperatures=[0.7,1.5]", "sample.samples_per_temperature=3", "sample.max_new_tokens=6",
            "sample.top_k=20", "sample.top_p=0.9", "sample.vllm.retries=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO_HF, [*SMALL, *SAMPLING, "sample.engine=vllm", "sample.vllm.url=http://unused"])


@pytest.fixture(scope="module")
def vlm(cfg):
    return load_vlm(cfg)


@pytest.fixture(scope="module")
def examples(cfg):
    return load_split(cfg.data, "train")[:3]


@pytest.fixture(scope="module")
def served(vlm):
    stand_in = StandInServer(base_model_path(vlm), trust_request_chat_template=True)
    threaded = ThreadedServer(make_app(stand_in))
    yield stand_in, threaded.url
    threaded.stop()


@pytest.fixture
def server(served):
    stand_in, url = served
    stand_in.requests.clear()
    stand_in.lora_loads.clear()
    return stand_in, url


def _with_url(cfg, url):
    return dataclasses.replace(cfg.sample, vllm=dataclasses.replace(cfg.sample.vllm, url=url))


def _teacher_forced_logprob(vlm, example, prompt: str, text: str) -> float:
    """log p(text + end token | image, prompt) under the model, token by token (our own forward)."""
    row = vlm.encode_row(load_image(example), prompt, text)
    batch = vlm.collate([row])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = vlm.model(**batch).logits[0, :-1].float()
    m = len(vlm.completion_ids(text, prompt))  # the rationale's tokens and the end token, the row's last m
    targets = labels[0, 1:][-m:]
    chosen = torch.log_softmax(logits[-m:], -1).gather(1, targets.unsqueeze(1))
    return float(chosen.sum())


def test_candidates_carry_the_stored_fields_and_requests_the_documented_ones(cfg, vlm, examples, server, tmp_path):
    stand_in, url = server
    sample_cfg = _with_url(cfg, url)
    with engine_session(sample_cfg, vlm, tmp_path):
        sets = sample(vlm, examples, sample_cfg, round_idx=1, use_reference_answer=True, progress=False)
    n, temperatures = sample_cfg.samples_per_temperature, sample_cfg.temperatures
    assert [cs.example_id for cs in sets] == [e.id for e in examples]
    for example, cs in zip(examples, sets):
        seed = example_seed(sample_cfg.seed, 1, example.id)
        assert cs.seed == seed and cs.answer == example.answer
        assert cs.prompt == rationale_prompt(example.question, example.answer)
        texts = [c.text for c in cs.candidates]
        assert cs.candidates and len(set(texts)) == len(texts) and all(texts)
        for c in cs.candidates:
            assert c.seed == seed and 0 <= c.sample_idx < n * len(temperatures)
            assert c.temperature == temperatures[c.sample_idx // n]
            assert isinstance(c.logprob, float) and c.logprob < 0
        # The stored log-prob is the model's own for that text and its end token (raw logits, T = 1).
        first = cs.candidates[0]
        assert first.logprob == pytest.approx(_teacher_forced_logprob(vlm, example, cs.prompt, first.text),
                                              abs=1e-3)
    # Per example: the answer, then one request per temperature with n draws and seed + t * n.
    recorded = stand_in.requests
    assert len(recorded) == len(examples) * (1 + len(temperatures))
    base = stand_in.models()["data"][0]["id"]
    for example, cs in zip(examples, sets):
        mine = [r for r in recorded if example.question in r.rendered]
        answer = [r for r in mine if not r.payload.get("logprobs")]
        rationale = [r for r in mine if r.payload.get("logprobs")]
        assert len(answer) == 1 and len(rationale) == len(temperatures)
        a = answer[0].payload
        assert a["temperature"] == 0 and a["n"] == 1 and a["stop"] == list(vlm.answer_stops)
        assert a["max_completion_tokens"] == sample_cfg.answer_max_new_tokens and a["add_generation_prompt"]
        assert answer[0].rendered == vlm.render(answer_prompt(example.question))
        for t, record in enumerate(sorted(rationale, key=lambda r: r.payload["temperature"])):
            p = record.payload
            assert p["model"] == base  # round 0's weights: the base model
            assert p["n"] == n and p["temperature"] == temperatures[t] and p["seed"] == cs.seed + t * n
            assert p["top_k"] == 20 and p["top_p"] == 0.9 and p["max_completion_tokens"] == 6
            assert p["continue_final_message"] and not p["add_generation_prompt"]
            assert p["stop_token_ids"] == [vlm.eos_token_id]
            # The prompt vLLM's renderer builds is the one the generate engine continues.
            assert record.rendered == vlm.render(cs.prompt)
            image = p["messages"][0]["content"][0]
            assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")


def test_the_same_seeds_draw_the_same_candidates(cfg, vlm, examples, server, tmp_path):
    _, url = server
    sample_cfg = _with_url(cfg, url)
    with engine_session(sample_cfg, vlm, tmp_path):
        first = sample(vlm, examples, sample_cfg, round_idx=2, progress=False)
        again = sample(vlm, examples[1:2], dataclasses.replace(sample_cfg, seed=999, vllm=dataclasses.replace(
            sample_cfg.vllm, max_concurrency=1)), seeds={first[1].example_id: first[1].seed}, progress=False)
    assert again[0] == first[1]


def test_the_plain_format_is_rendered_by_a_request_template(cfg, vlm, examples, server, tmp_path):
    stand_in, url = server
    plain = dataclasses.replace(vlm, chat=None)
    sample_cfg = _with_url(cfg, url)
    with engine_session(sample_cfg, plain, tmp_path):
        sets = sample(plain, examples[:1], sample_cfg, use_reference_answer=True, progress=False)
    for record in stand_in.requests:
        assert record.payload["chat_template"] and record.payload["add_special_tokens"]
        assert not record.payload["add_generation_prompt"] and "continue_final_message" not in record.payload
    rendered = {r.rendered for r in stand_in.requests}
    assert rendered == {plain.render(answer_prompt(examples[0].question)), plain.render(sets[0].prompt)}
    assert all(r.startswith(plain.image_placeholder) for r in rendered)


def test_a_request_template_needs_the_server_flag(vlm, examples, tmp_path):
    stand_in = StandInServer(base_model_path(vlm), trust_request_chat_template=False)
    threaded = ThreadedServer(make_app(stand_in))
    try:
        cfg = load_config(DEMO_HF, [*SMALL, *SAMPLING, "prompt.format=plain", "sample.engine=vllm",
                                    f"sample.vllm.url={threaded.url}"])
        plain = dataclasses.replace(vlm, chat=None)
        with engine_session(cfg.sample, plain, tmp_path), pytest.raises(VLLMError, match="trust-request-chat"):
            sample(plain, examples[:1], cfg.sample, progress=False)
    finally:
        threaded.stop()


def test_each_weights_are_loaded_as_a_lora_and_named_by_the_requests(cfg, vlm, examples, server, tmp_path):
    stand_in, url = server
    sample_cfg = _with_url(cfg, url)
    lora_b = [p for name, p in vlm.model.named_parameters() if "lora_B" in name]
    try:
        with engine_session(sample_cfg, vlm, tmp_path) as session:
            sample(vlm, examples[:1], sample_cfg, progress=False)
            assert stand_in.lora_loads == []  # PEFT's zero lora_B: the base model
            with torch.no_grad():
                for p in lora_b:
                    p.normal_(0, 0.5)
            first = "illume-" + adapter_digest(vlm)[:16]
            sample(vlm, examples[:1], sample_cfg, progress=False)
            sample(vlm, examples[1:2], sample_cfg, progress=False)  # same weights: loaded once
            (folder,) = [path for name, path in stand_in.lora_loads]
            assert [name for name, _ in stand_in.lora_loads] == [first]
            assert {p.name for p in Path(folder).iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
            assert json.loads((Path(folder) / "adapter_config.json").read_text())["r"] == 8
            assert {r.payload["model"] for r in stand_in.requests[-6:]} == {first}
            with torch.no_grad():
                lora_b[0].add_(1.0)
            second = "illume-" + adapter_digest(vlm)[:16]
            sample(vlm, examples[:1], sample_cfg, progress=False)
            assert [name for name, _ in stand_in.lora_loads] == [first, second]
            assert set(stand_in.loras) == {second} and not Path(folder).exists()  # one at a time
            assert session.lora_loads == [first, second]
        assert stand_in.loras == {} and not (tmp_path / "vllm" / "adapters").exists()
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()


def test_a_server_that_is_down_is_named(cfg, vlm, examples, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(VLLMError, match=f"no answer from the vLLM server at {url}"):
        with engine_session(_with_url(cfg, url), vlm, tmp_path):
            pass


def test_the_test_server_refuses_fields_vllm_does_not_document(server):
    _, url = server
    response = requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "top_kk": 5}, timeout=30)
    assert response.status_code == 400 and "top_kk" in response.text


def test_vllm_is_refused_for_magma_and_needs_a_server():
    with pytest.raises(ConfigError, match="sample.engine=vllm needs model.kind=hf"):
        load_config(REPO / "configs" / "demo.yaml", ["sample.engine=vllm"])
    with pytest.raises(ConfigError, match="train.train_prefix"):
        load_config(DEMO_HF, ["sample.engine=vllm", "train.train_prefix=true"])
    with pytest.raises(ConfigError, match="exactly one of sample.vllm.url"):
        check_vllm_settings(load_config(DEMO_HF, ["sample.engine=vllm"]))
    with pytest.raises(ConfigError, match="no such executable"):
        check_vllm_settings(load_config(DEMO_HF, ["sample.engine=vllm", "sample.vllm.python=/no/python"]))
    with pytest.raises(ConfigError, match="sample.vllm.max_concurrency"):
        load_config(DEMO_HF, ["sample.vllm.max_concurrency=0"])
    assert load_config(DEMO_HF).sample.engine == "generate"
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]


@pytest.mark.slow
def test_illume_starts_the_server_waits_for_health_and_stops_it(cfg, vlm, examples, tmp_path):
    """The server illume starts from `sample.vllm.python` (here a script that runs the test server the way
    vLLM's would be run): its arguments, its log in RUN_DIR/vllm/server.log, stopped on leaving."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} {REPO / 'tests' / 'vllm_stand_in.py'}"
                      ' "$@"\n')
    python.chmod(0o755)
    sample_cfg = dataclasses.replace(cfg.sample, vllm=dataclasses.replace(
        cfg.sample.vllm, url=None, python=str(python), startup_timeout=120))
    with engine_session(sample_cfg, vlm, tmp_path) as session:
        url = session.client.url
        sets = sample(vlm, examples[:1], sample_cfg, progress=False)
        assert sets[0].candidates
    log = (tmp_path / "vllm" / "server.log").read_text()
    assert "-m vllm.entrypoints.openai.api_server --model" in log and "--enable-lora --max-lora-rank 8" in log
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


@pytest.mark.slow
def test_a_run_samples_through_vllm_with_each_rounds_lora(served, tmp_path):
    """`illume run` with sample.engine=vllm: round 1's candidates (and round 0's evaluation) are drawn with the
    adapters round 0 kept, round 1's evaluation with round 1's; the base model draws before any training."""
    stand_in, url = served
    stand_in.requests.clear()
    stand_in.lora_loads.clear()
    overrides = [*SMALL, "sample.samples_per_temperature=2", "sample.max_new_tokens=6", "loop.num_rounds=2",
                 "loop.stop_when_nothing_new=false", "train.num_epochs=1", "critic.threshold=0.1",
                 "sample.engine=vllm", f"sample.vllm.url={url}", f"output_dir={tmp_path}", "name=vllm"]
    assert main(["run", str(DEMO_HF), *overrides]) in (0, None)
    run_dir = tmp_path / "vllm"
    cfg = load_config(run_dir / "config.yaml")
    expected = []
    reader = load_vlm(cfg)
    for round_idx in (0, 1):
        load_trainable_weights(reader.model, run_dir / f"round_{round_idx:02d}" / "adapters.safetensors")
        expected.append("illume-" + adapter_digest(reader)[:16])
    assert [name for name, _ in stand_in.lora_loads] == expected
    num_requests = 1 + len(cfg.sample.temperatures)
    num_train, num_val = 6, 4
    by_model = {}
    for record in stand_in.requests:
        by_model[record.payload["model"]] = by_model.get(record.payload["model"], 0) + 1
    base = stand_in.models()["data"][0]["id"]
    # base: val scored before round 0 (greedy, 1 rationale request each) and round 0's train sampling;
    # round 0's LoRA: round 0's evaluation (val) and round 1's train sampling; round 1's: round 1's evaluation.
    assert by_model == {base: num_val * 2 + num_train * num_requests,
                        expected[0]: num_val * 2 + num_train * num_requests, expected[1]: num_val * 2}
    store = FeedbackStore(run_dir / "feedback.db")
    for cs in store.candidate_sets(1, "train"):
        assert cs.candidates and all(c.logprob < 0 for c in cs.candidates)
    assert not (run_dir / "vllm" / "adapters").exists()


# --------------------------------------------------------------------------- real vLLM (GPU)

VLLM_PYTHON = os.environ.get("ILLUME_VLLM_PYTHON")


@pytest.mark.gpu
@pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM environment: set ILLUME_VLLM_PYTHON to its bin/python "
                                            "(scripts/vllm_env.sh makes one)")
def test_real_vllm_draws_the_demo_models_candidates(cfg, vlm, examples, tmp_path):
    """With real vLLM on a GPU: illume starts it, draws, loads a LoRA, stops it. The one test of the engine
    itself; it has not run on the machine this was written on."""
    sample_cfg = dataclasses.replace(cfg.sample, vllm=dataclasses.replace(
        cfg.sample.vllm, url=None, python=VLLM_PYTHON, startup_timeout=900,
        server_args=["--dtype", "float32", "--gpu-memory-utilization", "0.3"]))
    lora_b = [p for name, p in vlm.model.named_parameters() if "lora_B" in name]
    try:
        with engine_session(sample_cfg, vlm, tmp_path) as session:
            base_sets = sample(vlm, examples, sample_cfg, use_reference_answer=True, progress=False)
            with torch.no_grad():
                for p in lora_b:
                    p.normal_(0, 0.5)
            tuned_sets = sample(vlm, examples, sample_cfg, use_reference_answer=True, progress=False)
            assert len(session.lora_loads) == 1
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
    for sets in (base_sets, tuned_sets):
        assert all(cs.candidates for cs in sets)
        assert all(c.logprob < 0 for cs in sets for c in cs.candidates)
