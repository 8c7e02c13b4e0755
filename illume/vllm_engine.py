"""The `vllm` sampling engine: candidates drawn by a vLLM server through its OpenAI-compatible API.

`sample.engine: vllm` (illume.sampling.ENGINES) sends, for each example, chat-completions requests to a vLLM
server: first the model's own answer (greedy, or at `sample.answer_temperature`), then one request per
temperature with `n = sample.samples_per_temperature`, `logprobs: true`, the config's top-k / top-p and a seed
derived from the example's (`illume.prompts.example_seed`). What comes back is stored as the `generate` engine
stores its draws (`illume.data.records.distinct_candidates`): text, temperature, seed, row, log-prob.

Assumptions, up front:
- model.kind=hf only (the config refuses MAGMA, a trained projector and pool entries with another base model):
  the server serves the base model the run loaded (the folder or hub name it came from) and the tuned weights
  reach it as a PEFT LoRA folder, loaded at run time (`POST /v1/load_lora_adapter`; the server needs
  `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Which adapter a request names follows the
  weights the VLM holds when `sample` is called: none while every `lora_B` is zero (PEFT's start: the base
  model, requested by its own name), else a folder RUN_DIR/vllm/adapters/illume-<digest> written from them. So
  round r samples with round r - 1's kept adapters, a pool entry with its swapped-in ones and the evaluate step
  with each epoch's, without any caller saying so. One adapter is loaded at a time (the last one is unloaded
  and its folder removed when another is needed).
- Prompts: the chat format sends the user's turn (the image as a `data:image/png;base64` `image_url` part, then
  the text) and, for a rationale, the assistant's turn "{answer}, seeing that" continued
  (`continue_final_message: true, add_generation_prompt: false`); the answer prompt ends with the generation
  prompt (`add_generation_prompt: true`), which for most templates is the open assistant turn the `generate`
  engine continues (not for LLaVA-OneVision's: illume.models.hf.HFVLM._apply_template). The plain format
  sends one user message rendered by a per-request `chat_template` (`PLAIN_TEMPLATE`) as the plain layout:
  the backend's image placeholder, then ILLUME's prompt, with the tokenizer's special tokens (BOS) added as the
  processor adds them; vLLM accepts a request's template only from a server started with
  `--trust-request-chat-template` (illume passes it when it starts the server for a plain-format model).
- Draws differ from the `generate` engine's (vLLM's sampler and kernels): a run keeps one engine. Within vLLM a
  draw is reproducible: the request for temperature t carries seed + t * n, and vLLM gives the i-th of its n
  samples the seed (request seed + i), so row j of an example was drawn with seed (example seed + j).
- Log-prob: the sum over the returned tokens (the stop token included, as the `generate` engine counts it) of
  vLLM's log-probabilities, which are of the raw model output (`--logprobs-mode raw_logprobs`, vLLM's
  default), i.e. at temperature 1 before top-k / top-p, as ours. Special tokens other than the end token are
  banned with `logit_bias` -100, as the `generate` engine bans them.
- Several processes: only rank 0 talks to the server (and starts it); every rank passes its share, rank 0 draws
  them all and each rank gets its share back through `illume.distributed.broadcast_object`.
- Verified here against tests/vllm_stand_in.py only, a stand-in that checks each request against the fields
  vLLM's API documents and samples with our tiny HF model; nothing here has run against real vLLM (the
  `gpu`-marked tests do, where vLLM is installed). docs/scaling.md, "Sampling with vLLM".
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import io
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from PIL import Image
from tqdm.auto import tqdm

from illume import distributed
from illume.config import ConfigError, RunConfig, SampleConfig, VLLMConfig
from illume.data.records import CandidateSet, Example, clean_text, distinct_candidates, load_image
from illume.models.hf import HFVLM, banned_token_ids
from illume.models.sharding import whole
from illume.prompts import answer_prompt, answer_seed, example_seed, rationale_prompt

logger = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""What `python -m` runs: vLLM's OpenAI-compatible server."""
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's `--max-lora-rank` accepts (vllm/config/lora.py, `MaxLoRARanks`)."""
VLLM_FOLDER = "vllm"
"""RUN_DIR/vllm: the started server's log (`LOG_FILE`) and the LoRA folders it loads (adapters/)."""
LOG_FILE = "server.log"
ADAPTER_PREFIX = "illume-"
"""LoRA names are `illume-` + the first 16 hex digits of the weights' sha256."""
SEED_MODULUS = 2**63
"""vLLM's `seed` is an int64; the example seeds are below 2**63 and a request's is taken modulo it."""
LOGIT_BAN = -100.0
"""vLLM clamps `logit_bias` to [-100, 100]: -100 takes a token out of every draw."""

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- else -%}{{ image_placeholder }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}")
"""The plain format as a chat template: each content part in order, the image as the backend's placeholder
(`chat_template_kwargs.image_placeholder`, e.g. "<image>\\n"), the text as it is; no role markers. It loops
over `message['content']`, so vLLM hands it the parts (its "openai" content format) rather than a string."""


class VLLMError(RuntimeError):
    """A vLLM server that cannot be started, reached or used; the message names its URL."""


# --------------------------------------------------------------------------- requests


def image_url(image: Image.Image) -> str:
    """The image as an OpenAI `image_url`: a PNG data URL (lossless, RGB as the processor gets it)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def prompt_request(vlm: HFVLM, prompt: str, image: str) -> dict:
    """The request fields that carry one of ILLUME's prompts (illume.prompts) with its image (`image_url`):
    `messages` and the template switches, for the VLM's prompt format (see the module's assumptions)."""
    image_part = {"type": "image_url", "image_url": {"url": image}}
    if vlm.chat is None:
        user = {"role": "user", "content": [image_part, {"type": "text", "text": prompt}]}
        return {"messages": [user], "chat_template": PLAIN_TEMPLATE,
                "chat_template_kwargs": {"image_placeholder": vlm.image_placeholder},
                "add_generation_prompt": False, "add_special_tokens": True}
    turns = vlm.chat.turns(prompt)
    user = {"role": "user", "content": [image_part, {"type": "text", "text": turns.user}]}
    if not turns.reply:
        return {"messages": [user], "add_generation_prompt": True}
    return {"messages": [user, {"role": "assistant", "content": turns.reply}],
            "add_generation_prompt": False, "continue_final_message": True}


def _filters(cfg: SampleConfig) -> dict:
    """top_k / top_p when they filter (vLLM's own defaults leave them off, as our 0 / None and 1.0 do)."""
    out = {}
    if cfg.top_k:
        out["top_k"] = cfg.top_k
    if cfg.top_p < 1.0:
        out["top_p"] = cfg.top_p
    return out


@dataclass
class Choice:
    """One returned sample: its text and summed log-probability (None when not asked for)."""

    text: str
    logprob: float | None


class VLLMClient:
    """HTTP to one server: JSON requests with retries, errors that name the URL."""

    def __init__(self, url: str, cfg: VLLMConfig):
        self.url = url.rstrip("/")
        self.cfg = cfg

    def request(self, method: str, route: str, payload: dict | None = None) -> requests.Response:
        """`method route` with a JSON body; connection failures and 5xx are tried `cfg.retries` times.

        Raises:
            VLLMError: naming the URL, the route and the server's answer (a 4xx at once).
        """
        where = f"{self.url}{route}"
        delay, last = 1.0, ""
        for attempt in range(1, self.cfg.retries + 1):
            try:
                response = requests.request(method, where, json=payload, timeout=self.cfg.request_timeout)
            except requests.RequestException as error:
                last = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response
                last = f"HTTP {response.status_code}: {response.text[:1000]}"
                if response.status_code < 500:
                    raise VLLMError(f"the vLLM server at {self.url} refused {method} {route}: {last}")
            if attempt < self.cfg.retries:
                time.sleep(delay)
                delay *= 2
        raise VLLMError(f"no answer from the vLLM server at {self.url} to {method} {route} after "
                        f"{self.cfg.retries} tries: {last} (is it running? sample.vllm.url / sample.vllm.python)")

    def base_model(self) -> str:
        """The name the server serves its base model by (`GET /v1/models`: the model without a parent)."""
        models = self.request("GET", "/v1/models").json().get("data", [])
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise VLLMError(f"the vLLM server at {self.url} lists no base model in /v1/models: {models}")
        return bases[0]

    def chat(self, payload: dict) -> list[Choice]:
        """`POST /v1/chat/completions`; the choices in `index` order."""
        body = self.request("POST", "/v1/chat/completions", payload).json()
        choices = sorted(body.get("choices", []), key=lambda c: c["index"])
        if len(choices) != payload.get("n", 1):
            raise VLLMError(f"the vLLM server at {self.url} returned {len(choices)} choices for n="
                            f"{payload.get('n', 1)}")
        out = []
        for choice in choices:
            logprob = None
            if payload.get("logprobs"):
                tokens = (choice.get("logprobs") or {}).get("content")
                if tokens is None:
                    raise VLLMError(f"the vLLM server at {self.url} returned no logprobs although asked")
                logprob = float(sum(token["logprob"] for token in tokens))
            out.append(Choice(choice["message"].get("content") or "", logprob))
        return out


# --------------------------------------------------------------------------- the LoRA the server draws with


def _lora_parameters(vlm: HFVLM) -> list[tuple[str, torch.Tensor]]:
    return [(name, p) for name, p in vlm.model.named_parameters() if "lora_" in name]


def adapter_digest(vlm: HFVLM) -> str | None:
    """sha256 of the VLM's LoRA weights (names and bytes), or None while they change nothing (every
    `lora_B` zero, as PEFT starts them): then the server's base model draws."""
    lora = _lora_parameters(vlm)
    if not any(bool(p.detach().any()) for name, p in lora if "lora_B" in name):
        return None
    digest = hashlib.sha256()
    for name, p in lora:
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds LoRA of rank `rank`."""
    for allowed in MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"model.lora.r={rank}: vLLM serves LoRA up to rank {MAX_LORA_RANKS[-1]}")


def base_model_path(vlm: HFVLM) -> str:
    """What the VLM's base model was loaded from (a folder, made absolute, or a hub name): what the server serves."""
    name = vlm.model.get_base_model().config.name_or_path
    return str(Path(name).resolve()) if name and Path(name).exists() else name


# --------------------------------------------------------------------------- the session: server + adapters


@dataclass
class VLLMSession:
    """A server the run draws from (`serving`): its client, the base model's name and the LoRA loaded now."""

    client: VLLMClient
    base_name: str
    adapters_dir: Path
    serves: str
    """`base_model_path` of the VLM the server was started for: a VLM with another base is refused."""
    cfg: VLLMConfig
    loaded: tuple[str, Path] | None = None
    """(lora_name, folder) of the adapter loaded now, if any."""
    lora_loads: list[str] = field(default_factory=list)
    """Every lora_name loaded, in order (a record for logs and tests)."""

    def model_for(self, vlm: HFVLM) -> str:
        """The `model` a request names to draw with `vlm`'s current weights: the base model's name, or the
        adapter written from them (loaded now when it is not the one loaded)."""
        digest = adapter_digest(vlm)
        if digest is None:
            return self.base_name
        name = ADAPTER_PREFIX + digest[:16]
        if self.loaded is not None and self.loaded[0] == name:
            return name
        self.unload()
        folder = self.adapters_dir / name
        shutil.rmtree(folder, ignore_errors=True)
        # PEFT's own adapter folder (adapter_config.json + adapter_model.safetensors), as `illume export-model`
        # writes for hf runs (illume.models.export.export_hf), here without processor or model card.
        vlm.model.save_pretrained(str(folder))
        self.client.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        self.loaded = (name, folder)
        self.lora_loads.append(name)
        logger.info("vLLM server at %s: loaded LoRA %s from %s", self.client.url, name, folder)
        return name

    def unload(self) -> None:
        """Unload the adapter loaded now (if any) and remove its folder."""
        if self.loaded is None:
            return
        name, folder = self.loaded
        self.loaded = None
        self.client.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        shutil.rmtree(folder, ignore_errors=True)

    def draw(self, vlm: HFVLM, examples: Sequence[Example], cfg: SampleConfig, round_idx: int,
             use_reference_answer: bool, seeds: dict[str, int], progress: bool) -> list[CandidateSet]:
        """Every example's answer and K rationales, `cfg.vllm.max_concurrency` examples in flight."""
        if base_model_path(vlm) != self.serves:
            raise VLLMError(f"the vLLM server at {self.client.url} serves {self.serves}, not "
                            f"{base_model_path(vlm)}: one server draws for one base model")
        model = self.model_for(vlm)
        banned = {str(token): LOGIT_BAN for token in banned_token_ids(vlm)}
        example_seeds = [seeds.get(e.id, example_seed(cfg.seed, round_idx, e.id)) for e in examples]
        bar = tqdm(total=len(examples), desc="sampling (vLLM)", unit="ex", disable=not progress)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            futures = [pool.submit(self._draw_one, vlm, e, s, cfg, model, banned, use_reference_answer)
                       for e, s in zip(examples, example_seeds)]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()  # the first failure stops the draw
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()
        return [future.result() for future in futures]

    def _draw_one(self, vlm: HFVLM, example: Example, seed: int, cfg: SampleConfig, model: str,
                  banned: dict[str, float], use_reference_answer: bool) -> CandidateSet:
        image = image_url(load_image(example))
        common = {"model": model, "stop_token_ids": [vlm.eos_token_id], "logit_bias": banned}
        # 1. The model's own answer: greedy (temperature 0, vLLM's greedy) or a draw with its own seed.
        answer_request = {**prompt_request(vlm, answer_prompt(example.question), image), **common, "n": 1,
                          "max_completion_tokens": cfg.answer_max_new_tokens, "stop": list(vlm.answer_stops),
                          "temperature": cfg.answer_temperature}
        if cfg.answer_temperature > 0:
            answer_request.update(seed=answer_seed(seed), **_filters(cfg))
        text = self.client.chat(answer_request)[0].text
        for stop in vlm.answer_stops:  # vLLM ends at a stop string already; a server that did not is cut here
            text = text.split(stop)[0]
        predicted = clean_text(text)
        answer = example.answer if use_reference_answer else predicted
        # 2. K rationales: n per temperature; request t's i-th sample is row t * n + i, drawn with seed + row.
        prompt = rationale_prompt(example.question, answer)
        n = cfg.samples_per_temperature
        texts, temperatures, logprobs = [], [], []
        for t, temperature in enumerate(cfg.temperatures):
            request = {**prompt_request(vlm, prompt, image), **common, "n": n, "temperature": temperature,
                       "seed": (seed + t * n) % SEED_MODULUS, "logprobs": True,
                       "max_completion_tokens": cfg.max_new_tokens, **_filters(cfg)}
            for choice in self.client.chat(request):
                texts.append(choice.text)
                temperatures.append(temperature)
                logprobs.append(choice.logprob)
        return CandidateSet(example.id, answer, predicted, prompt, seed,
                            distinct_candidates(texts, temperatures, seed, logprobs))


# --------------------------------------------------------------------------- the server's lifetime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


@contextlib.contextmanager
def started_server(cfg: VLLMConfig, model_path: str, lora_rank: int, folder: Path,
                   trust_request_template: bool) -> Iterator[str]:
    """`cfg.python -m vllm.entrypoints.openai.api_server` serving `model_path` on 127.0.0.1, with runtime LoRA
    loading on; yields its URL once `GET /health` answers, stops it on leaving. Its output goes to
    folder/server.log.

    Raises:
        VLLMError: the server exited or did not answer within `cfg.startup_timeout` (with its log's tail).
    """
    port = cfg.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [cfg.python, "-m", SERVER_MODULE, "--model", model_path, "--host", "127.0.0.1", "--port", str(port),
               "--enable-lora", "--max-lora-rank", str(max_lora_rank(lora_rank)),
               *(["--trust-request-chat-template"] if trust_request_template else []), *cfg.server_args]
    # vLLM's environment is its own: none of ours leaks in through PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / LOG_FILE
    with open(log_path, "ab") as log:  # the child writes to its own copy of the descriptor
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + cfg.startup_timeout
        while True:
            if process.poll() is not None:
                raise VLLMError(f"the vLLM server for {url} exited with {process.returncode} before it served "
                                f"(log: {log_path}):\n{_log_tail(log_path)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise VLLMError(f"the vLLM server at {url} did not answer /health within "
                                f"{cfg.startup_timeout:.0f} s (sample.vllm.startup_timeout; log: {log_path}):\n"
                                f"{_log_tail(log_path)}")
            time.sleep(1.0)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_SESSIONS: list[VLLMSession] = []
"""The sessions open now, innermost last (`serving`); `draw_candidates` draws with the innermost."""


@contextlib.contextmanager
def serving(cfg: SampleConfig, vlm: HFVLM, run_dir: Path) -> Iterator[VLLMSession | None]:
    """The vLLM server a run draws from, for the duration: `cfg.vllm.url`'s, or one started here (its log in
    RUN_DIR/vllm/server.log, stopped on leaving); the adapters it loads are written to RUN_DIR/vllm/adapters
    and removed on leaving. Other ranks than 0 open nothing (they never talk to the server)."""
    if not distributed.is_main():
        yield None
        return
    folder = Path(run_dir) / VLLM_FOLDER
    with contextlib.ExitStack() as stack:
        if cfg.vllm.url:
            url = cfg.vllm.url
        else:
            url = stack.enter_context(started_server(cfg.vllm, base_model_path(vlm),
                                                     vlm.model.peft_config["default"].r, folder,
                                                     trust_request_template=vlm.chat is None))
        client = VLLMClient(url, cfg.vllm)
        session = VLLMSession(client, client.base_model(), folder / "adapters", base_model_path(vlm), cfg.vllm)
        _SESSIONS.append(session)
        try:
            yield session
        finally:
            _SESSIONS.remove(session)
            with contextlib.suppress(VLLMError):  # a server already gone has nothing loaded
                session.unload()
            shutil.rmtree(session.adapters_dir, ignore_errors=True)


@contextlib.contextmanager
def _session_for(cfg: SampleConfig, vlm: HFVLM) -> Iterator[VLLMSession]:
    """The run's open session, or one for this call only (a command outside `illume run`), its files in a
    temporary folder."""
    if _SESSIONS:
        yield _SESSIONS[-1]
        return
    folder = Path(tempfile.mkdtemp(prefix="illume-vllm-"))
    logger.warning("sample.engine=vllm outside a run: a server session for this call only (files in %s)", folder)
    with serving(cfg, vlm, folder) as session:
        yield session


def draw_candidates(vlm: HFVLM, examples: Sequence[Example], cfg: SampleConfig, round_idx: int = 0,
                    use_reference_answer: bool = False, seeds: dict[str, int] | None = None,
                    progress: bool = True) -> list[CandidateSet]:
    """`illume.sampling.sample` by a vLLM server: arguments and result as the `generate` engine's
    (illume.sampling.decode_candidates). Called by every rank with its share; rank 0 draws all of them."""
    examples = list(examples)
    sizes = distributed.gather_objects([len(examples)])
    everything = distributed.gather_objects(examples)
    all_seeds: dict[str, int] = {}
    for part in distributed.gather_objects([seeds or {}]):
        all_seeds.update(part)
    sets = None
    # ZeRO-3: rank 0 reads the LoRA weights it hands the server, so every rank gathers them with it.
    with whole(vlm.model, [p for _, p in _lora_parameters(vlm)]):
        if distributed.is_main():
            with _session_for(cfg, vlm) as session:
                sets = session.draw(vlm, everything, cfg, round_idx, use_reference_answer, all_seeds, progress)
    sets = distributed.broadcast_object(sets)
    start = sum(sizes[:distributed.rank()])
    return sets[start:start + len(examples)]


def check_vllm_settings(cfg: RunConfig) -> None:
    """`sample.vllm`, before any model loads (`sample.engine: vllm` only).

    Raises:
        ConfigError: neither or both of url and python, or a python that is not an executable file.
    """
    if cfg.sample.engine != "vllm":
        return
    vllm = cfg.sample.vllm
    if (vllm.url is None) == (vllm.python is None):
        raise ConfigError("sample.engine=vllm needs exactly one of sample.vllm.url (a running server) and "
                          "sample.vllm.python (the Python of an environment with vLLM, which illume starts; "
                          "scripts/vllm_env.sh makes one)")
    if vllm.python is not None and not (Path(vllm.python).is_file() and os.access(vllm.python, os.X_OK)):
        raise ConfigError(f"sample.vllm.python={vllm.python}: no such executable (scripts/vllm_env.sh makes an "
                          "environment with vLLM; give its bin/python)")
