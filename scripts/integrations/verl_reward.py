"""A custom reward function for verl that asks an illume reward service (`illume reward serve RUN_DIR`).

verl's config (stdlib only: the file is loaded by path in verl's reward workers):

    custom_reward_function:
      path: scripts/integrations/verl_reward.py
      name: compute_score            # compute_score_batch with reward_model.reward_manager=batch
      reward_kwargs:                 # passed to every call (else ILLUME_REWARD_URL / ILLUME_REWARD_TOKEN)
        url: http://127.0.0.1:8770
        token: ...
        reward: score                # or probability (calibrated P(accept)), or accept: 1.0 / 0.0 from the
                                     # service's calibrated threshold

What verl calls (volcengine/verl at b178a3c, 2026-01; docs/preparation/reward_function.rst):
- the naive reward manager (verl/workers/reward_manager/naive.py, and the reward loop's
  verl/experimental/reward_loop/reward_manager/naive.py), once per response:
  `compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`, with the
  `reward_kwargs` merged in (verl/trainer/ppo/reward.py, `get_custom_reward_fn`: `_call_with_kwargs`); the
  reward loop may add `reward_router_address` and `reward_model_tokenizer`. `solution_str` is the response
  decoded with skip_special_tokens=True, `ground_truth` the row's reward_model.ground_truth, `extra_info` its
  extra_info column (plus num_turns, rollout_reward_scores). A float back (or a dict with "score").
- the batch reward manager (verl/workers/reward_manager/batch.py): `compute_score(data_sources=...,
  solution_strs=..., ground_truths=..., extra_infos=..., **reward_kwargs)`, a list back: `compute_score_batch`.

verl does not pass the images column to reward functions, so each row's extra_info carries the item:
`question`, `answer` (verl's examples/data_preprocess/geo3k.py already puts both there; the ground truth stands
in for a missing answer) and the image as `image` (base64 text, the file's bytes, or {"bytes": ...} as
`datasets` and verl's parquet files hold images) or `image_path` (for a service started with --image-root).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request


def post_json(url: str, payload: dict, token: str | None, timeout: float) -> dict:
    """POST `payload` as JSON, return the JSON answer; an HTTP error raises with the service's `detail`."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url}: {error.code} {error.read().decode(errors='replace')}") from None


def item_of(solution_str: str, ground_truth, extra_info: dict | None) -> dict:
    """The service's item for one verl row: the response as the rationale, the rest from extra_info."""
    info = extra_info or {}
    item = {"question": info.get("question"), "answer": info.get("answer", ground_truth),
            "rationale": solution_str}
    if info.get("image_path") is not None:
        item["image_path"] = str(info["image_path"])
    else:
        image = info.get("image")
        if isinstance(image, dict):  # {"bytes": ..., "path": ...}: a `datasets` Image as verl stores it
            image = image.get("bytes")
        if isinstance(image, (bytes, bytearray)):
            image = base64.b64encode(image).decode()
        item["image"] = image
    missing = [key for key in ("question", "answer") if item[key] is None]
    if missing or item.get("image", "") is None:
        raise ValueError(f"verl row without {', '.join(missing) or 'image'} in extra_info: the illume reward "
                         "service needs question, answer and image (or image_path) per row")
    return item


def _settings(url: str | None, token: str | None, reward: str) -> tuple[str, str | None]:
    url = url or os.environ.get("ILLUME_REWARD_URL")
    if not url:
        raise ValueError("no reward service: set custom_reward_function.reward_kwargs.url (or ILLUME_REWARD_URL)")
    if reward not in ("score", "probability", "accept"):
        raise ValueError(f"reward must be 'score', 'probability' or 'accept', got {reward!r}")
    return url.rstrip("/") + "/score", token if token is not None else os.environ.get("ILLUME_REWARD_TOKEN")


def _rewards(answer: dict, reward: str) -> list[float]:
    if reward == "score":
        return answer["scores"]
    if reward == "probability":
        if answer["probability"] is None:
            raise RuntimeError("the reward model has no calibrated accept probability (see the service's "
                               "/health): use reward: score")
        return answer["probability"]
    if answer["accept"] is None:
        raise RuntimeError("the reward model has no accept threshold: use reward: score")
    return [float(accepted) for accepted in answer["accept"]]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, url: str | None = None,
                  token: str | None = None, reward: str = "score", timeout: float = 300.0, **kwargs) -> float:
    """One response's reward (verl's naive reward manager)."""
    endpoint, token = _settings(url, token, reward)
    answer = post_json(endpoint, {"items": [item_of(solution_str, ground_truth, extra_info)]}, token, timeout)
    return _rewards(answer, reward)[0]


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, *, url: str | None = None,
                        token: str | None = None, reward: str = "score", max_items: int = 256,
                        timeout: float = 300.0, **kwargs) -> list[float]:
    """A batch's rewards (verl's batch reward manager), in requests of at most `max_items`."""
    endpoint, token = _settings(url, token, reward)
    items = [item_of(s, g, e) for s, g, e in zip(solution_strs, ground_truths, extra_infos, strict=True)]
    rewards: list[float] = []
    for start in range(0, len(items), max_items):
        answer = post_json(endpoint, {"items": items[start:start + max_items]}, token, timeout)
        rewards += _rewards(answer, reward)
    return rewards
