"""The chat format (`prompt.format: chat`): ILLUME's prompts as a conversation in the model's own chat template."""

from __future__ import annotations

import pytest

from illume.config import ConfigError, load_config
from illume.prompts import ChatStyle, ChatTurns, answer_prompt, parse_prompt, rationale_prompt


@pytest.mark.parametrize("question, answer", [
    ("what colour is the circle?", "red"),
    ("is A: the left one bigger? A: no", "yes"),  # " A: " inside the question: the last one splits
    ("how many?", "two, maybe three"),
])
def test_parse_prompt_inverts_the_templates(question, answer):
    assert parse_prompt(rationale_prompt(question, answer)) == (question, answer)
    assert parse_prompt(answer_prompt(question)) == (question, None)


@pytest.mark.parametrize("text", ["Is the explanation correct? yes or no:", "Q: no ending", ""])
def test_other_prompts_are_the_users_turn_as_they_are(text):
    assert parse_prompt(text) is None
    assert ChatStyle().turns(text) == ChatTurns(text)


def test_chat_turns_word_the_prompts_by_the_style():
    style = ChatStyle(ask="{question}", explain="{question} It is {answer}. Why?", connective="{answer} because")
    assert style.turns(answer_prompt("what colour?")) == ChatTurns("what colour?")
    assert style.turns(rationale_prompt("what colour?", "red")) == ChatTurns("what colour? It is red. Why?",
                                                                             "red because")


def test_prompt_settings_are_checked():
    with pytest.raises(ConfigError, match="model.kind=magma has none"):
        load_config(None, ["prompt.format=chat"])
    with pytest.raises(ConfigError, match="prompt.connective may only use the slots"):
        load_config(None, ["prompt.connective='{question}, seeing that'"])
    assert load_config(None, []).prompt.format is None  # decided by the model: plain for MAGMA


def test_trls_completions_are_read_after_the_connective_the_model_wrote():
    from policies.grpo_trl import _rationale_of

    prompt = rationale_prompt("what colour is the circle?", "red")
    assert _rationale_of(ChatStyle(), prompt, "red, seeing that the circle is red") == "the circle is red"
    assert _rationale_of(ChatStyle(), prompt, "blue, seeing that it is") == "blue, seeing that it is"  # another
    assert _rationale_of(None, prompt, "the circle is red") == "the circle is red"  # plain: as it is
