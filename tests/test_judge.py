"""The AI judge (critic.kind=judge, reward/judge.py): its scores, its config checks, how its judgments are
stored and counted, its calibration on people's judgments, and a loop run with it."""

import dataclasses
import json

import pytest
import torch

from illume.cli import main
from illume.config import ConfigError, FeedbackConfig, load_config
from illume.critics import CritiqueContext, SimulatedCritic
from illume.data.datasets import load_split
from illume.data.records import Candidate, CandidateSet, load_image
from illume.data.shapes import vocabulary
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import PEOPLE
from reward.evaluate import calibrate_threshold
from reward.fitted import learn_from
from reward.judge import Judge, JudgeCritic, judge_prompt
from tests.conftest import REPO, tiny_overrides
from tests.test_loop import _config


def _cfg(tmp_path, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", [*tiny_overrides(tmp_path), *overrides])


def _items(cfg, n=3):
    examples = load_split(cfg.data, "train")[:n]
    return [(e, e.answers[0], [e.explanations[0], "the sky is blue and big"]) for e in examples]


def test_yes_no_scores_are_probabilities_of_yes_against_no(tiny_vlm, tmp_path):
    cfg = _cfg(tmp_path, "judge.method=yes_no", "judge.batch_size=4")
    judge = Judge(tiny_vlm, cfg.judge)
    items = _items(cfg)
    scores = judge.score(items)
    assert [len(s) for s in scores] == [2, 2, 2]
    assert all(0.0 <= s <= 1.0 for row in scores for s in row)
    # By hand, one row at a time (no padding): P(yes) / (P(yes) + P(no)) of the next token.
    example, answer, texts = items[1]
    prompt = judge_prompt(cfg.judge.template(), example, answer, texts[1], "none")
    row = tiny_vlm.collate([tiny_vlm.encode_row(load_image(example), prompt)])
    with torch.no_grad():
        logits = tiny_vlm.model(input_ids=row["input_ids"], attention_mask=row["attention_mask"],
                                pixel_values=row["pixel_values"], use_cache=False).logits[0, -1]
    yes, no = (tiny_vlm.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    probs = torch.softmax(logits.float(), -1)
    assert scores[1][1] == pytest.approx((probs[yes] / (probs[yes] + probs[no])).item(), abs=1e-5)


def test_likelihood_is_the_mean_token_log_prob_of_the_rationale(tiny_vlm, tmp_path):
    cfg = _cfg(tmp_path, "judge.method=likelihood", "judge.context=references", "judge.batch_size=5")
    items = _items(cfg)
    scores = Judge(tiny_vlm, cfg.judge).score(items)
    example, answer, texts = items[2]
    head = judge_prompt(cfg.judge.template()[:-len("{rationale}")], example, answer, "", "references")
    assert example.explanations[0] in head  # the context-aware prompt shows the references
    row = tiny_vlm.collate([tiny_vlm.encode_row(load_image(example), head, texts[0])])
    with torch.no_grad():
        logits = tiny_vlm.model(input_ids=row["input_ids"], attention_mask=row["attention_mask"],
                                pixel_values=row["pixel_values"], use_cache=False).logits[0].float()
    labels = row["labels"][0]
    positions = (labels != -100).nonzero().flatten()
    logps = torch.log_softmax(logits[positions - 1], -1)[torch.arange(len(positions)), labels[positions]]
    assert scores[2][0] == pytest.approx(logps.mean().item(), abs=1e-5)
    assert all(s <= 0 for row in scores for s in row)


def test_the_demo_tokenizer_has_yes_and_no(tiny_vlm):
    assert {"yes", "no"} <= set(vocabulary())
    assert len(tiny_vlm.text_ids(" yes")) == 1 and len(tiny_vlm.text_ids(" no")) == 1


@pytest.mark.parametrize("prompt, message", [
    ("Q: {question} A: {answer}, seeing that", "no {rationale} slot"),
    ("Q: {question} seeing that {rationale}", "no {answer} slot"),
    ("{answer} {rationale} {scene}", "unknown slot"),
    ("{answer}, seeing that {rationale}. right?", "must end with {rationale}"),
])
def test_a_bad_judge_prompt_fails_at_config_load_naming_the_key(tmp_path, prompt, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\ncritic:\n  kind: judge\njudge:\n"
                    f"  prompt: {json.dumps(prompt)}\n")
    with pytest.raises(ConfigError, match="judge.prompt") as error:
        load_config(path)
    assert message in str(error.value)


def test_context_references_needs_the_context_slot():
    with pytest.raises(ConfigError, match=r"judge.context=references .*\{context\}"):
        load_config(REPO / "configs" / "demo.yaml",
                    ["judge.context=references", "judge.prompt='Q: {question} A: {answer}, seeing that {rationale}'"])


def test_people_default_is_verdicts_people_and_the_reward_model_learns_from_them():
    assert set(FeedbackConfig().people) == PEOPLE
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert set(learn_from(cfg)) == PEOPLE
    rlaif = load_config(REPO / "configs" / "demo_rlaif.yaml")
    assert rlaif.critic.kind == "judge" and learn_from(rlaif) == ["judge"]
    assert "judge" not in rlaif.feedback.people  # the judge's verdicts are not people's in RLAIF


class _FakeJudge:
    """Scores a candidate by a fixed table (the judge's model is tested above)."""

    def __init__(self, table):
        self.table = table

    def score(self, items):
        return [[self.table[text] for text in texts] for _, _, texts in items]


def _store_round(store, round_idx, examples):
    sets = [CandidateSet(e.id, e.answers[0], e.answers[0], f"Q: {e.question} A: {e.answers[0]}, seeing that", 0,
                         [Candidate(e.explanations[0], 0.3, 0, 0, -1.0), Candidate("the sky is blue", 0.8, 0, 1, -5.0)])
            for e in examples]
    store.add_candidate_sets(round_idx, "train", sets, questions={e.id: e.question for e in examples})
    return {cs.example_id: cs for cs in store.candidate_sets(round_idx, "train")}


def test_judge_verdicts_are_the_judges_and_count_as_people_only_if_configured(tmp_path):
    cfg = _cfg(tmp_path, "critic.kind=judge")  # the threshold comes from people (round 0), not the config
    examples = load_split(cfg.data, "train")[:4]
    by_id = {e.id: e for e in examples}
    table = {e.explanations[0]: 0.9 for e in examples} | {"the sky is blue": 0.1}
    with FeedbackStore(tmp_path / "feedback.db") as store:
        # Round 0 judged by people (the simulated critic): the threshold of round 1 is calibrated on them.
        sets0 = _store_round(store, 0, examples)
        store.add_judgments(0, SimulatedCritic(cfg.critic).decide(list(sets0.values()), by_id),
                            "simulated:rouge_l>=0.7", kind="simulated")
        critic = JudgeCritic(cfg)
        critic._judge = _FakeJudge(table)
        sets1 = _store_round(store, 1, examples)
        context = CritiqueContext(cfg, store, 1, sets1, by_id, say=lambda _: None)
        critique = critic.review(context)
        assert critique.done
        kinds = store.annotator_kinds()
        assert kinds == {"simulated:rouge_l>=0.7": "simulated", "judge:likelihood": "judge"}
        # The judge judged round 1 only; its judgments never count as people's by default.
        assert store.num_judgments(upto_round=1, kinds=cfg.feedback.people) == 4
        assert store.num_judgments(kinds=["judge"]) == 4
        with_judge = dataclasses.replace(cfg.feedback, people=["person", "simulated", "judge"])
        assert store.num_judgments(kinds=with_judge.people) == 8
    report = critique.report
    assert report["judge_threshold_from"] == "people"
    assert report["judge_threshold"] == calibrate_threshold([0.9] * 4 + [0.1] * 4, [True] * 4 + [False] * 4, 0.9)
    assert report["judge_judged_items"] == 4 and report["judge_accepted_candidates"] == 4
    assert report["judge_precision_vs_simulated"] == 1.0 and report["judge_recall_vs_simulated"] == 1.0
    assert report["judge_alpha_vs_simulated"] == pytest.approx(1.0)


def test_the_judge_uses_the_configured_threshold_without_people(tmp_path):
    cfg = _cfg(tmp_path, "critic.kind=judge", "judge.method=yes_no", "judge.threshold=0.5")
    examples = load_split(cfg.data, "train")[:2]
    by_id = {e.id: e for e in examples}
    with FeedbackStore(tmp_path / "feedback.db") as store:
        critic = JudgeCritic(cfg)
        critic._judge = _FakeJudge({e.explanations[0]: 0.4 for e in examples} | {"the sky is blue": 0.6})
        for round_idx in (0, 1):
            context = CritiqueContext(cfg, store, round_idx, _store_round(store, round_idx, examples), by_id,
                                      say=lambda _: None)
            report = critic.review(context).report
            assert report["judge_threshold"] == 0.5 and report["judge_threshold_from"] == "config"
            # It accepts the wrong one: the simulated critic disagrees on every candidate.
            assert report["judge_precision_vs_simulated"] == 0.0
            assert report["judge_alpha_vs_simulated"] < 0
        assert store.annotator_kinds() == {"judge:yes_no": "judge"}
        assert store.num_judgments(kinds=cfg.feedback.people) == 0


@pytest.mark.slow
def test_judge_critic_in_the_loop_with_zero_human_judgments(tmp_path):
    args = ["run", *_config(tmp_path, "judge", 2), "critic.kind=judge", "judge.method=likelihood",
            "judge.context=references", "judge.threshold=-100", "reward.learn_from=[judge]"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "judge"
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1]
    for row in results[1:]:
        assert row["trained"] and row["human_judgments"] == 0 and row["judgments"] > 0
        assert row["judge_threshold"] == -100 and row["judge_threshold_from"] == "config"
        assert row["judge_judged_items"] == 12 and row["judge_recall_vs_simulated"] == 1.0
        assert {"judge_precision_vs_simulated", "judge_alpha_vs_simulated"} <= set(row)
    with FeedbackStore(run_dir / "feedback.db") as store:
        assert store.annotator_kinds() == {"judge:likelihood": "judge"}
        assert store.num_judgments(kinds=PEOPLE) == 0

