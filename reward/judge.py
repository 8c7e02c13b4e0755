"""An AI judge as the critic: critic.kind=judge (VLM-RLAIF's and Silkie's AI feedback).

A VLM (`judge.model`, or the run's own base model) scores every candidate rationale of a round:

- `judge.method=yes_no`: the judge prompt (`judge.prompt`, slots {question}, {answer}, {rationale},
  {context}) is followed by the question whether the reason explains the answer from what is visible; the
  score is P(" yes") / (P(" yes") + P(" no")) of the next token, in [0, 1].
- `judge.method=likelihood`: the mean per-token log-probability of the rationale (and EOS) after the prompt's
  text before {rationale}; with `judge.context=references` the example's reference explanations fill
  {context} (VLM-RLAIF's context-aware scoring).

A candidate is accepted when its score reaches the threshold: calibrated on people's judgments of earlier
rounds when there are any (the kinds in `feedback.people`, the judge's own left out; the lowest score whose
precision reaches `judge.target_precision`, as the reward model's), else `judge.threshold`. The verdicts are
stored under the annotator "judge:<method>" of kind "judge": they count as people's only where
`feedback.people` lists "judge", and the reward model learns from them where `reward.learn_from` (or
`feedback.people`) does. Rounds before `judge.people_rounds` are judged by `critic.people_kind`.

The judge runs on rank 0 (nothing it does is collective); the round's row of results.json gets
`judge_threshold`, `judge_threshold_from` ("people" or "config"), `judge_judged_items`,
`judge_accepted_candidates`, and where the references are known (the demo) `judge_precision_vs_simulated`,
`judge_recall_vs_simulated` and `judge_alpha_vs_simulated` (Krippendorff's alpha, nominal, per candidate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from illume import distributed
from illume.config import RunConfig
from illume.critics import PEOPLE_CRITICS, Critique, CritiqueContext, SimulatedCritic
from illume.data.records import CandidateSet, Example, load_image
from illume.feedback.verdicts import read_feedback
from illume.feedback.writes import NewJudgment
from illume.status import krippendorff_alpha_nominal
from illume.training import check_zero_stage

JUDGE_KIND = "judge"
RATIONALE_SLOT = "{rationale}"


def judge_prompt(template: str, example: Example, answer: str, rationale: str, context: str) -> str:
    """The template filled for one candidate (surrounding whitespace stripped)."""
    refs = example.explanations if context == "references" else []
    context_text = " ".join(r.strip().rstrip(".") + "." for r in refs)
    return template.format(question=example.question, answer=answer, rationale=rationale,
                           context=context_text).strip()


def calibration_kinds(cfg: RunConfig) -> set[str]:
    """Annotator kinds the judge's threshold is calibrated on: people's, never the judge's own."""
    return set(cfg.feedback.people) - {JUDGE_KIND}


class Judge:
    """Scores candidate rationales with a VLM by `judge.method` (see the module doc)."""

    def __init__(self, vlm, judge_cfg):
        self.vlm, self.cfg = vlm, judge_cfg
        self.template = judge_cfg.template()

    def _batches(self, rows: list[dict]):
        model, device = self.vlm.model, self.vlm.device
        for start in range(0, len(rows), self.cfg.batch_size):
            batch = self.vlm.collate(rows[start:start + self.cfg.batch_size])
            labels = batch.get("labels")
            inputs = {k: v.to(device) for k, v in batch.items()
                      if k != "labels" and isinstance(v, torch.Tensor)}
            yield model(**inputs, use_cache=False).logits, inputs["attention_mask"], labels

    def _word_id(self, word: str, prompt: str) -> int:
        ids = self.vlm.completion_ids(word, prompt)[:-1]  # without EOS
        unk = getattr(self.vlm.tokenizer, "unk_token_id", None)
        if len(ids) != 1 or ids[0] == unk:
            raise ValueError(f"judge.method=yes_no needs {word!r} to be one known token of the judge's "
                             f"tokenizer after the prompt; it encodes as {ids}")
        return ids[0]

    @torch.no_grad()
    def score(self, items: Sequence[tuple[Example, str, Sequence[str]]]) -> list[list[float]]:
        """Scores of (example, answer, candidate texts) items, one list per item in candidate order."""
        model = self.vlm.model
        was_training = model.training
        model.eval()
        try:
            flat = self._score_flat(items)
        finally:
            model.train(was_training)
        out, i = [], 0
        for _, _, texts in items:
            out.append(flat[i:i + len(texts)])
            i += len(texts)
        return out

    def _score_flat(self, items) -> list[float]:
        method, rows, prompts = self.cfg.method, [], []
        for example, answer, texts in items:
            image = load_image(example)
            for text in texts:
                if method == "yes_no":
                    prompt = judge_prompt(self.template, example, answer, text, self.cfg.context)
                    rows.append(self.vlm.encode_row(image, prompt))
                    prompts.append(prompt)
                else:  # likelihood: the text before {rationale} is the prompt, the rationale the completion
                    head = self.template[:-len(RATIONALE_SLOT)]
                    prompt = judge_prompt(head, example, answer, "", self.cfg.context)
                    rows.append(self.vlm.encode_row(image, prompt, text))
        if not rows:
            return []
        scores: list[float] = []
        if method == "yes_no":
            yes, no = self._word_id("yes", prompts[0]), self._word_id("no", prompts[0])
            for logits, mask, _ in self._batches(rows):
                last = mask.sum(-1) - 1
                logps = torch.log_softmax(logits[torch.arange(len(last)), last].float(), dim=-1)
                scores += torch.sigmoid(logps[:, yes] - logps[:, no]).cpu().tolist()
            return scores
        for logits, _, labels in self._batches(rows):
            targets = labels[:, 1:].to(logits.device)
            token_mask = targets != -100
            # -cross_entropy is the token log-prob, without a second (B, T, V) log-softmax tensor.
            token_logps = -torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets.masked_fill(~token_mask, 0), reduction="none")
            means = (token_logps * token_mask).sum(-1) / token_mask.sum(-1).clamp(min=1)
            scores += means.cpu().tolist()
        return scores


def load_judge_vlm(cfg: RunConfig):
    """The judge's VLM: `judge.model` when set, else the run's own `model`, on the GPU when there is one."""
    from illume.loading import load_vlm

    judge_cfg = cfg if cfg.judge.model is None else dataclasses.replace(cfg, model=cfg.judge.model)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return load_vlm(judge_cfg, device)


def agreement(judge_judgments: Sequence[NewJudgment], oracle_judgments: Sequence[NewJudgment],
              sets: dict[str, CandidateSet]) -> dict:
    """Precision and recall of the judge's accepts against the oracle's, and Krippendorff's alpha, per
    candidate (alpha None when undefined: every candidate got the same verdict)."""
    by_id = {j.example_id: set(j.accepted) for j in judge_judgments}
    pairs = [(c.text in by_id[o.example_id], c.text in set(o.accepted))
             for o in oracle_judgments for c in sets[o.example_id].candidates]
    true_pos = sum(j and ref for j, ref in pairs)
    return {"judge_precision_vs_simulated": true_pos / max(1, sum(j for j, _ in pairs)),
            "judge_recall_vs_simulated": true_pos / max(1, sum(ref for _, ref in pairs)),
            "judge_alpha_vs_simulated": krippendorff_alpha_nominal([int(j), int(ref)] for j, ref in pairs)}


class JudgeCritic:
    """critic.kind=judge: an AI judge decides every item from round `judge.people_rounds` on; people
    (`critic.people_kind`) judge the rounds before."""

    kind = JUDGE_KIND

    def __init__(self, cfg: RunConfig):
        # Loaded and run on rank 0 alone, which a model built partitioned (ZeRO-3) cannot be: its build and
        # every gather involve all ranks.
        check_zero_stage(cfg.train.deepspeed, "the AI judge critic (critic.kind=judge, loaded on rank 0 alone)")
        self.cfg = cfg
        self.annotator = f"judge:{cfg.judge.method}"
        self.people = PEOPLE_CRITICS[cfg.critic.people_kind](cfg)
        self._judge: Judge | None = None

    @property
    def judge(self) -> Judge:
        if self._judge is None:  # loaded on first use: a run whose rounds are all judged never loads it
            self._judge = Judge(load_judge_vlm(self.cfg), self.cfg.judge)
        return self._judge

    def threshold(self, context: CritiqueContext) -> tuple[float, str]:
        """The accept threshold and where it came from: "people" (calibrated on their judgments of earlier
        rounds) or "config" (`judge.threshold`)."""
        judge_cfg = self.cfg.judge
        if context.round_idx == 0:
            return judge_cfg.default_threshold(), "config"
        from reward.evaluate import calibrate_threshold
        from reward.pairs import labelled_candidates

        feedback = read_feedback(context.store, upto_round=context.round_idx - 1,
                                 aggregate=self.cfg.feedback.aggregate, kinds=calibration_kinds(self.cfg))
        labelled = labelled_candidates(feedback)
        labelled = [row for row in labelled if row[0] in context.train_by_id]
        if not labelled or not any(label for *_, label in labelled):
            return judge_cfg.default_threshold(), "config"
        answers = {(item.example_id, item.prompt): item.answer for item in feedback.items}
        by_item: dict[tuple[str, str], list[str]] = {}
        for example_id, prompt, text, _ in labelled:
            by_item.setdefault((example_id, prompt), []).append(text)
        keys = list(by_item)
        items = [(context.train_by_id[e], answers[e, p], by_item[e, p]) for e, p in keys]
        scored = {}
        for (e, p), scores in zip(keys, self.judge.score(items)):
            scored.update({(e, p, t): s for t, s in zip(by_item[e, p], scores)})
        scores = [scored[(e, p, t)] for e, p, t, _ in labelled]
        labels = [label for *_, label in labelled]
        return calibrate_threshold(scores, labels, judge_cfg.target_precision), "people"

    def decide(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example],
               threshold: float) -> list[NewJudgment]:
        items = [(examples_by_id[cs.example_id], cs.answer, [c.text for c in cs.candidates])
                 for cs in candidate_sets]
        judgments = []
        for cs, scores in zip(candidate_sets, self.judge.score(items)):
            accepted = [c.text for c, s in zip(cs.candidates, scores) if s >= threshold]
            judgments.append(NewJudgment(cs.example_id, accepted, none_fit=not accepted))
        return judgments

    def review(self, context: CritiqueContext) -> Critique:
        if context.round_idx < self.cfg.judge.people_rounds:
            return self.people.review(context)
        if not distributed.is_main():
            return Critique()  # rank 0's counts: the loop broadcasts its critique
        store, round_idx, sets = context.store, context.round_idx, context.sets
        threshold, source = self.threshold(context)
        judged = {item.example_id for item in store.judged_items("train", round_idx=round_idx)}
        todo = [cs for example_id, cs in sets.items() if example_id not in judged]
        judgments = self.decide(todo, context.train_by_id, threshold) if todo else []
        store.add_judgments(round_idx, judgments, self.annotator, kind=self.kind)
        report = {"judge_threshold": threshold, "judge_threshold_from": source,
                  "judge_judged_items": len(judgments),
                  "judge_accepted_candidates": sum(len(j.accepted) for j in judgments)}
        decided = [cs for cs in todo if context.train_by_id[cs.example_id].explanations]
        if decided and len(decided) == len(todo):
            oracle = SimulatedCritic(self.cfg.critic).decide(decided, context.train_by_id)
            report.update(agreement(judgments, oracle, sets))
        return Critique(report=report)

