"""ILLUME's prompt templates and the per-example sampling seed, shared by the sampler, the trainers and the
backends.

They live apart from `illume.sampling` so that a backend (illume/models/) can use them without importing the
sampler, which itself decodes through the backends: no sampling <-> backend cycle.
"""

from __future__ import annotations

import hashlib

ANSWER_PROMPT = "Q: {question} A:"
"""The prompt the model answers (greedily by default; its continuation is its own answer)."""

RATIONALE_PROMPT = "Q: {question} A: {answer}, seeing that"
"""The prompt a rationale continues; `answer` is the reference (train) or the model's own answer."""


def rationale_prompt(question: str, answer: str) -> str:
    return RATIONALE_PROMPT.format(question=question, answer=answer)


def example_seed(base_seed: int, round_idx: int, example_id: str) -> int:
    """A stable 63-bit seed for one example in one round."""
    digest = hashlib.sha256(f"{base_seed}/{round_idx}/{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def answer_seed(example_seed: int) -> int:
    """The seed of an example's sampled answer (`sample.answer_temperature` > 0): derived from the example's
    seed, so the recorded seed reproduces it, but a stream apart from its rationales' noise."""
    digest = hashlib.sha256(f"{example_seed}/answer".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
