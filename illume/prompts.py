"""ILLUME's prompt templates and the per-example sampling seed, shared by the sampler, the trainers and the
backends.

They live apart from `illume.sampling` so that a backend (illume/models/) can use them without importing the
sampler, which itself decodes through the backends: no sampling <-> backend cycle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

ANSWER_PROMPT = "Q: {question} A:"
"""The prompt the model answers (greedily by default; its continuation is its own answer)."""

RATIONALE_PROMPT = "Q: {question} A: {answer}, seeing that"
"""The prompt a rationale continues; `answer` is the reference (train) or the model's own answer."""


def answer_prompt(question: str) -> str:
    return ANSWER_PROMPT.format(question=question)


def rationale_prompt(question: str, answer: str) -> str:
    return RATIONALE_PROMPT.format(question=question, answer=answer)


_ANSWER_HEAD, _ANSWER_TAIL = "Q: ", " A:"
_RATIONALE_TAIL = ", seeing that"


def parse_prompt(prompt: str) -> tuple[str, str | None] | None:
    """(question, answer) of a rationale prompt, (question, None) of an answer prompt, None for any other text
    (the AI judge's prompts): the inverse of `answer_prompt` / `rationale_prompt`.

    Prompts are stored as their plain text (the store is the same whatever the model), and the chat format is
    rendered from it (`ChatStyle.turns`). A question may hold " A: " (the last one splits); an answer that holds
    " A: " is read as part of the question, the one case the split cannot tell apart.
    """
    if not prompt.startswith(_ANSWER_HEAD):
        return None
    if prompt.endswith(_ANSWER_TAIL):
        return prompt[len(_ANSWER_HEAD):-len(_ANSWER_TAIL)], None
    if prompt.endswith(_RATIONALE_TAIL):
        question, found, answer = prompt[len(_ANSWER_HEAD):-len(_RATIONALE_TAIL)].rpartition(" A: ")
        if found:
            return question, answer
    return None


@dataclass(frozen=True)
class ChatTurns:
    """A prompt in the chat format: the user's turn (after the image) and the start of the assistant's turn,
    which the model continues ("" : a fresh assistant turn)."""

    user: str
    reply: str = ""


@dataclass(frozen=True)
class ChatStyle:
    """How ILLUME's prompts read as a conversation (`prompt.*` settings; illume.config.PromptConfig).

    The answer prompt asks `ask` and the assistant answers; the rationale prompt asks `explain` (question, answer
    and an instruction) and the assistant's turn starts with `connective`, which the rationale continues, so
    that "{answer}, seeing that ..." stays ILLUME's form of a rationale. Other prompts (the AI judge's) are the
    user's turn as they are.
    """

    ask: str = "Q: {question} A:"
    explain: str = "Q: {question} A: {answer} Explain why."
    connective: str = "{answer}, seeing that"

    def turns(self, prompt: str) -> ChatTurns:
        parsed = parse_prompt(prompt)
        if parsed is None:
            return ChatTurns(prompt)
        question, answer = parsed
        if answer is None:
            return ChatTurns(self.ask.format(question=question))
        return ChatTurns(self.explain.format(question=question, answer=answer),
                         self.connective.format(answer=answer))


def example_seed(base_seed: int, round_idx: int, example_id: str) -> int:
    """A stable 63-bit seed for one example in one round."""
    digest = hashlib.sha256(f"{base_seed}/{round_idx}/{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def answer_seed(example_seed: int) -> int:
    """The seed of an example's sampled answer (`sample.answer_temperature` > 0): derived from the example's
    seed, so the recorded seed reproduces it, but a stream apart from its rationales' noise."""
    digest = hashlib.sha256(f"{example_seed}/answer".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
