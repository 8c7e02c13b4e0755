"""A small OpenAI-compatible TEST server standing in for vLLM's, so that illume's vLLM client
(illume.vllm_engine) can be tested on a CPU. It is not vLLM, and nothing tested against it counts as "tested
with vLLM".

What it checks, from vLLM's documented API (vllm/entrypoints/openai/chat_completion/protocol.py,
`ChatCompletionRequest`; the LoRA routes of docs "LoRA Adapters", "Dynamically serving LoRA adapters"):
- every chat-completions field is one vLLM's request documents (`VLLM_CHAT_FIELDS`). vLLM itself ignores an
  unknown field with a logged warning ("present in the request but ignored"); this server refuses it with 400,
  so that a misspelt sampling parameter cannot pass unnoticed here;
- the values illume sends: `n` >= 1, `seed` an int64, `temperature` >= 0, `top_p` in (0, 1], `logit_bias`
  token ids in the vocabulary with values in [-100, 100], not both `add_generation_prompt` and
  `continue_final_message` (vLLM refuses the pair), a final assistant message to continue, a request's
  `chat_template` only when started with --trust-request-chat-template (vLLM refuses it otherwise);
- every image part is a `data:image/png;base64,` URL that decodes to an image;
- `model` is the base model's name or a LoRA loaded through `POST /v1/load_lora_adapter`, a route that exists
  only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in the environment, as in vLLM, and that refuses a name
  already loaded and a rank above --max-lora-rank.

What it answers is real: the messages are rendered by the tokenizer's chat template (the request's template
when given), as vLLM's HF renderer does, encoded with the image by the model's processor and sampled by our
tiny HF model (`generate`, a LoRA loaded by PEFT from the folder the client wrote), each of the `n` samples
seeded with seed + i (vLLM's parallel sampling), its log-probabilities those of the raw logits (vLLM's default
`raw_logprobs`), in vLLM's response shape. Every request and its rendered prompt is recorded (`StandInServer`).

Run it as a process the way illume starts vLLM (`PYTHON -m vllm.entrypoints.openai.api_server --model PATH
--host H --port P --enable-lora --max-lora-rank R ...`): `python tests/vllm_stand_in.py -m ANYTHING --model
PATH ...`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, GenerationConfig, LogitsProcessor, LogitsProcessorList

from illume.models.hf import load_processor

VLLM_CHAT_FIELDS = frozenset({
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream",
    "stream_options", "temperature", "top_p", "tools", "tool_choice", "reasoning_effort", "thinking_token_budget",
    "include_reasoning", "parallel_tool_calls", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty",
    "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
    "allowed_token_ids", "bad_words", "echo", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs",
    "priority", "request_id", "return_tokens_as_token_ids",
})
"""Fields of vLLM's `ChatCompletionRequest` (its OpenAI fields, sampling params and extra params)."""
IMPLEMENTED = frozenset({
    "messages", "model", "logit_bias", "logprobs", "max_tokens", "max_completion_tokens", "n", "seed", "stop",
    "temperature", "top_p", "top_k", "stop_token_ids", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "chat_template", "chat_template_kwargs",
})
"""The fields this server acts on; another documented field is refused as not implemented here (so a test
notices the client sending something this server would silently not honour)."""
LOAD_LORA_FIELDS = frozenset({"lora_name", "lora_path", "load_inplace"})
UNLOAD_LORA_FIELDS = frozenset({"lora_name", "lora_int_id"})
INT64 = (-(2**63), 2**63 - 1)
PNG_DATA_URL = "data:image/png;base64,"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _LogitBias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, input_ids, scores):
        for token, value in self.bias.items():
            scores[:, token] += value
        return scores


@dataclass
class Recorded:
    """One chat request as received, with the prompt text its messages rendered to."""

    payload: dict
    rendered: str


@dataclass
class StandInServer:
    """The model and what the server has seen."""

    model_path: str
    trust_request_chat_template: bool = False
    allow_runtime_lora: bool = True
    max_lora_rank: int = 16
    requests: list[Recorded] = field(default_factory=list)
    lora_loads: list[tuple[str, str]] = field(default_factory=list)
    """(lora_name, lora_path) of every load, in order."""
    loras: dict[str, str] = field(default_factory=dict)
    """The LoRA loaded now: name -> path."""

    def __post_init__(self):
        self.processor = load_processor(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.base = AutoModelForImageTextToText.from_pretrained(self.model_path).eval()
        self.peft: PeftModel | None = None
        self.lock = threading.Lock()

    # --- LoRA

    def load_lora(self, body: dict) -> str:
        _only(body, LOAD_LORA_FIELDS, "load_lora_adapter")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise BadRequest("lora_name and lora_path are required strings")
        if name in self.loras:
            raise BadRequest(f"The lora adapter '{name}' has already been loaded.")
        config_path = Path(path) / "adapter_config.json"
        if not config_path.is_file() or not (Path(path) / "adapter_model.safetensors").is_file():
            raise BadRequest(f"no PEFT adapter folder at {path}", 404)
        rank = json.loads(config_path.read_text())["r"]
        if rank > self.max_lora_rank:
            raise BadRequest(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")
        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            else:
                self.peft.load_adapter(path, adapter_name=name)
        self.loras[name] = path
        self.lora_loads.append((name, path))
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora(self, body: dict) -> str:
        _only(body, UNLOAD_LORA_FIELDS, "unload_lora_adapter")
        name = body.get("lora_name")
        if name not in self.loras:
            raise BadRequest(f"The lora adapter '{name}' cannot be found.", 404)
        with self.lock:
            if len(self.loras) == 1:  # PEFT keeps no model without an adapter: back to the bare base model
                self.base, self.peft = self.peft.unload(), None
            else:
                self.peft.delete_adapter(name)
        del self.loras[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def models(self) -> dict:
        data = [{"id": self.model_path, "object": "model", "owned_by": "vllm", "root": self.model_path,
                 "parent": None}]
        data += [{"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": self.model_path}
                 for name, path in self.loras.items()]
        return {"object": "list", "data": data}

    # --- chat completions

    def check(self, body: dict) -> tuple[list[dict], list[Image.Image]]:
        """The request's checks (module docstring); returns the conversation as the template gets it (image
        parts as {"type": "image"}) and the decoded images."""
        unknown = set(body) - VLLM_CHAT_FIELDS
        if unknown:
            raise BadRequest(f"fields vLLM's ChatCompletionRequest does not have: {sorted(unknown)}")
        unimplemented = set(body) - IMPLEMENTED
        if unimplemented:
            raise BadRequest(f"fields this test server does not implement: {sorted(unimplemented)}")
        model = body.get("model")
        if model != self.model_path and model not in self.loras:
            raise BadRequest(f"The model `{model}` does not exist.", 404)
        n = body.get("n", 1)
        if not isinstance(n, int) or n < 1:
            raise BadRequest(f"n must be at least 1, got {n}")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or not INT64[0] <= seed <= INT64[1]):
            raise BadRequest(f"seed must be an int64, got {seed}")
        if body.get("temperature", 1.0) < 0:
            raise BadRequest("temperature must be non-negative")
        if "top_p" in body and not 0 < body["top_p"] <= 1:
            raise BadRequest("top_p must be in (0, 1]")
        if "top_k" in body and (not isinstance(body["top_k"], int) or body["top_k"] < -1):
            raise BadRequest("top_k must be -1 (disable), or at least 1")
        for token, value in (body.get("logit_bias") or {}).items():
            if not 0 <= int(token) < len(self.tokenizer) or not -100 <= value <= 100:
                raise BadRequest(f"logit_bias {token}: {value} is out of range")
        continue_final = body.get("continue_final_message", False)
        if continue_final and body.get("add_generation_prompt", True):
            raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        if body.get("chat_template") is not None and not self.trust_request_chat_template:
            raise BadRequest("Request chat templates require --trust-request-chat-template.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        if continue_final and messages[-1].get("role") != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message")
        conversation, images = [], []
        for message in messages:
            if set(message) - {"role", "content", "name"} or message.get("role") not in ("user", "assistant",
                                                                                         "system"):
                raise BadRequest(f"malformed message {message}")
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "text":
                        parts.append({"type": "text", "text": part["text"]})
                    elif part.get("type") == "image_url":
                        images.append(_decode_image(part["image_url"]["url"]))
                        parts.append({"type": "image"})
                    else:
                        raise BadRequest(f"content part type {part.get('type')!r} is not supported here")
                content = parts
            elif not isinstance(content, str):
                raise BadRequest(f"malformed content {content!r}")
            conversation.append({"role": message["role"], "content": content})
        return conversation, images

    def chat(self, body: dict) -> dict:
        conversation, images = self.check(body)
        template = body.get("chat_template") or self.processor.chat_template
        rendered = self.tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False,
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            **(body.get("chat_template_kwargs") or {}))
        self.requests.append(Recorded(body, rendered))
        inputs = self.processor(images=images or None, text=[rendered], return_tensors="pt",
                                add_special_tokens=body.get("add_special_tokens", False))
        temperature = body.get("temperature", 1.0)
        top_k = body.get("top_k", -1)
        stop_ids = list(body.get("stop_token_ids") or []) + [self.tokenizer.eos_token_id]
        config = GenerationConfig(
            max_new_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 16,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            top_k=top_k if top_k > 0 else 0, top_p=body.get("top_p", 1.0), num_beams=1, repetition_penalty=1.0,
            eos_token_id=stop_ids, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            output_logits=True, return_dict_in_generate=True)
        bias = {int(k): v for k, v in (body.get("logit_bias") or {}).items()}
        processors = LogitsProcessorList([_LogitBias(bias)] if bias else [])
        choices = []
        with self.lock:
            model = self.base
            context = _null()
            if self.peft is not None:
                model = self.peft
                if body["model"] in self.loras:
                    self.peft.set_adapter(body["model"])
                else:
                    context = self.peft.disable_adapter()
            with context, torch.no_grad():
                for i in range(body.get("n", 1)):
                    with torch.random.fork_rng():
                        if body.get("seed") is not None:  # vLLM: the i-th of n samples gets seed + i
                            torch.manual_seed((body["seed"] + i) % 2**64)
                        out = model.generate(**inputs, generation_config=config, logits_processor=processors)
                    choices.append(self._choice(i, out, inputs["input_ids"].shape[1], stop_ids, body))
        prompt_tokens = int(inputs["input_ids"].shape[1])
        completion_tokens = sum(c.pop("_tokens") for c in choices)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _choice(self, index: int, out, prompt_length: int, stop_ids: list[int], body: dict) -> dict:
        tokens = out.sequences[0, prompt_length:].tolist()
        end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))  # the stop token kept
        tokens = tokens[:end]
        finish = "stop" if tokens and tokens[-1] in stop_ids else "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in body.get("stop") or []:
            if stop in text:
                text, finish = text.split(stop)[0], "stop"
        logprobs = None
        if body.get("logprobs"):
            content = []
            for step, token in enumerate(tokens):
                raw = torch.log_softmax(out.logits[step][0].float(), -1)  # vLLM's raw_logprobs: before processing
                piece = self.tokenizer.decode([token])
                content.append({"token": piece, "logprob": float(raw[token]), "bytes": list(piece.encode()),
                                "top_logprobs": []})
            logprobs = {"content": content}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish, "stop_reason": None, "_tokens": len(tokens)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _only(body: dict, allowed: frozenset, route: str) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"{route}: unknown fields {sorted(unknown)}")


def _decode_image(url: str) -> Image.Image:
    if not isinstance(url, str) or not url.startswith(PNG_DATA_URL):
        raise BadRequest(f"image_url must be a {PNG_DATA_URL} URL here, got {str(url)[:40]!r}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url[len(PNG_DATA_URL):], validate=True)))
        image.load()
    except Exception as error:  # noqa: BLE001  (any decoding failure is the client's)
        raise BadRequest(f"image_url does not decode to an image: {error}") from error
    return image.convert("RGB")


def make_app(server: StandInServer) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(BadRequest)
    def _bad(request: Request, error: BadRequest):
        return JSONResponse({"error": {"message": str(error), "type": "BadRequestError", "code": error.status}},
                            status_code=error.status)

    @app.get("/health")
    def health():
        return PlainTextResponse("")

    @app.get("/v1/models")
    def models():
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        return await _in_thread(server.chat, body)

    if server.allow_runtime_lora:  # vLLM registers these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            return PlainTextResponse(await _in_thread(server.load_lora, await request.json()))

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            return PlainTextResponse(await _in_thread(server.unload_lora, await request.json()))

    return app


async def _in_thread(function, *args):
    import anyio

    return await anyio.to_thread.run_sync(function, *args)


def main(argv: list[str] | None = None) -> None:
    """As vLLM's server is started: `-m MODULE` (ignored) and the arguments illume passes."""
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("-m", dest="module")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--trust-request-chat-template", action="store_true")
    args = parser.parse_args(argv)
    if args.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        parser.error(f"--max-lora-rank {args.max_lora_rank} is not one vLLM accepts")
    server = StandInServer(args.model, args.trust_request_chat_template,
                        allow_runtime_lora=args.enable_lora
                        and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1"),
                        max_lora_rank=args.max_lora_rank)
    uvicorn.run(make_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
