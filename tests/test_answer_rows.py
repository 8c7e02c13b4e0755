"""DPO and KTO keep training the answer (policy.dpo.answer_weight, policy.kto.answer_weight), as selection-SFT's answer-only rows do."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace

import pytest
import torch

from illume.collate import RowEncoder
from illume.config import DPOPolicyConfig, KTOPolicyConfig, PolicyConfig
from illume.prompts import ANSWER_PROMPT
from policies.data import UnpairedRow
from policies.dpo import train_dpo
from policies.kto import train_kto
from policies.reference import reference_logps
from policies.trainer import answer_rows
from tests.test_policies import _toy_pairs, _train_cfg
from tests.test_reward import example


def test_answer_rows_cycle_through_every_question_equally():
    examples = {k: example(k) for k in ("a", "b", "c", "d")}
    examples["e"] = replace(example("e"), answers=[])

    def encode(example_id, prompt, completion):
        return (example_id, prompt, completion)

    rows = answer_rows(encode, examples, 10, seed=0)
    counts = Counter(example_id for example_id, _, _ in rows)
    assert set(counts) == {"a", "b", "c", "d"}  # e has no answer: no row
    assert sorted(counts.values()) == [2, 2, 3, 3]  # 10 rows over 4 questions: as even as it gets
    assert len({example_id for example_id, _, _ in rows[:4]}) == 4  # every question before any repeats
    assert all(p == ANSWER_PROMPT.format(question=examples[i].question) and c == "red" for i, p, c in rows)
    assert answer_rows(encode, examples, 10, seed=0) == rows  # seeded
    assert answer_rows(encode, examples, 0, seed=0) == []


def _answer_logps(vlm, examples) -> torch.Tensor:
    encode = RowEncoder(vlm, examples)
    rows = [encode(e.id, ANSWER_PROMPT.format(question=e.question), e.answer) for e in examples.values()]
    return reference_logps(vlm.model, rows, vlm.collate, 8, torch.device("cpu"))


def _train(kind: str, vlm, answer_weight: float, out_dir):
    pairs, examples = _toy_pairs()
    cfg, train_cfg = _train_cfg(learning_rate=1e-2)
    policy = PolicyConfig(kind=kind, dpo=DPOPolicyConfig(beta=0.5, answer_weight=answer_weight),
                          kto=KTOPolicyConfig(beta=0.5, answer_weight=answer_weight))
    if kind == "dpo":
        return train_dpo(vlm, pairs, examples, policy, train_cfg, out_dir)
    rows = [UnpairedRow(p.example_id, p.prompt, p.chosen, True) for p in pairs[::2]]
    rows += [UnpairedRow(p.example_id, p.prompt, p.rejected, False) for p in pairs]
    return train_kto(vlm, rows, examples, policy, train_cfg, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_the_answer_rows_train_the_answer(kind, tiny_vlm, tmp_path):
    _, examples = _toy_pairs()
    without = copy.deepcopy(tiny_vlm)
    before = _answer_logps(tiny_vlm, examples)
    result = _train(kind, tiny_vlm, 1.0, tmp_path / "with")
    _train(kind, without, 0.0, tmp_path / "without")
    gained = (_answer_logps(tiny_vlm, examples) - before).mean()
    gained_without = (_answer_logps(without, examples) - before).mean()
    # The answer's log-prob rises with the answer rows, and by more than the preference loss alone moves it.
    assert gained > 0.5 and gained > gained_without + 0.5, (gained, gained_without)
    assert any("answer_nll" in entry for entry in result.trained.log_history)
