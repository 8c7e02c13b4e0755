"""A reward function for TRL's `GRPOTrainer` that asks an illume reward service (`illume reward serve RUN_DIR`).

    from trl_reward import IllumeReward            # this file, copied or on sys.path; stdlib only
    reward = IllumeReward("http://127.0.0.1:8770", token=os.environ.get("ILLUME_REWARD_TOKEN"))
    trainer = trl.GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset, args=trl.GRPOConfig(...))

What TRL passes (TRL 1.16, trl/trainer/grpo_trainer.py, `GRPOTrainer._calculate_rewards`): a plain reward
function is called as `reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids_list,
**reward_kwargs)`, where `reward_kwargs` holds every dataset column but "prompt", "completion" and
"completion_ids" (one value per completion: a prompt's row repeated for each of its generations), plus
`trainer_state`, `log_extra` and `log_metric` (and `environments` with environments). It must return one float
per completion (None becomes NaN).

So the dataset carries, besides its conversational `prompt` (TRL needs one for images): `image` (a PIL image;
or `images`, a list whose first image is used), `question` and `answer`. A completion is text, or a
conversation whose assistant messages hold the text. The reward is the service's raw score (`reward="score"`,
default), its calibrated probability that people accept the rationale (`reward="probability"`: Platt scaling
fitted on held-out judgments, in [0, 1]), or its accept decision as 1.0 / 0.0 (`reward="accept"`: score >= the
threshold calibrated on held-out judgments). Each distinct image is encoded (PNG, base64) once per call (TRL
hands a prompt's row to each of its generations, as separate image objects when they come from a `datasets`
column), and the completions go in requests of at most `max_items`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
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


def image_base64(image) -> str:
    """A PIL image (or an image file's bytes) as base64 text (PNG for a PIL image: lossless)."""
    if isinstance(image, (bytes, bytearray)):
        return base64.b64encode(image).decode()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image_key(image) -> tuple:
    """What tells images apart: their pixels (a hash), size and mode; bytes by their hash."""
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", hashlib.sha1(image).hexdigest())
    return (image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest())


def completion_text(completion) -> str:
    """A TRL completion as text: a string, or the assistant messages' text of a conversation."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts += [part.get("text", "") for part in content if part.get("type") == "text"]
    return "".join(parts)


class IllumeReward:
    """TRL's reward function over the service's POST /score.

    Args:
        url: The service (http://HOST:PORT).
        token: Its token (None: an open loopback service).
        reward: "score" (the raw reward), "probability" (the service's calibrated accept probability) or
            "accept" (1.0 / 0.0 from the service's calibrated threshold).
        max_items: Items per request (the service's --max-items or fewer).
        timeout: Seconds per request.
    """

    __name__ = "illume_reward"  # TRL names its logged columns after a reward function's __name__

    def __init__(self, url: str, token: str | None = None, reward: str = "score", max_items: int = 256,
                 timeout: float = 300.0):
        if reward not in ("score", "probability", "accept"):
            raise ValueError(f"reward must be 'score', 'probability' or 'accept', got {reward!r}")
        self.url, self.token, self.reward = url.rstrip("/") + "/score", token, reward
        self.max_items, self.timeout = max_items, timeout

    def __call__(self, prompts, completions, completion_ids=None, image=None, images=None, question=None,
                 answer=None, **kwargs) -> list[float]:
        if question is None or answer is None:
            raise ValueError("illume_reward needs `question` and `answer` columns in the dataset")
        if image is None and images is None:
            raise ValueError("illume_reward needs an `image` (or `images`) column in the dataset")
        pictures = image if image is not None else [row[0] for row in images]
        encoded: dict[tuple, str] = {}
        items = []
        for picture, q, a, completion in zip(pictures, question, answer, completions, strict=True):
            key = _image_key(picture)
            if key not in encoded:
                encoded[key] = image_base64(picture)
            items.append({"image": encoded[key], "question": q, "answer": a,
                          "rationale": completion_text(completion)})
        rewards: list[float] = []
        for start in range(0, len(items), self.max_items):
            answer_ = post_json(self.url, {"items": items[start:start + self.max_items]}, self.token, self.timeout)
            if self.reward == "accept":
                if answer_["accept"] is None:
                    raise RuntimeError("the reward model has no accept threshold: use reward='score'")
                rewards += [float(accepted) for accepted in answer_["accept"]]
            elif self.reward == "probability":
                if answer_["probability"] is None:
                    raise RuntimeError("the reward model has no calibrated accept probability (see the "
                                       "service's /health): use reward='score'")
                rewards += answer_["probability"]
            else:
                rewards += answer_["scores"]
        return rewards
