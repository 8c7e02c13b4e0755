"""Reward-model help in the annotation page (`annotate.assist`): scores for an item's candidates."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from illume.annotate.server import question_shown
from illume.config import RunConfig
from illume.data.records import Example


def reward_assist(run_dir: Path, cfg: RunConfig):
    """A scorer over the run's latest reward model, or None when the run has none yet.

    Returns:
        item dict -> ({candidate id: score}, accept threshold), cached per item.
    """
    fitted = sorted((run_dir / "reward").glob("round_*/reward_critic.json"))
    if not fitted:
        return None
    from illume.loading import load_vlm
    from reward.model import RewardModel, score

    info = json.loads(fitted[-1].read_text())
    reward_model = RewardModel.load(fitted[-1].parent, load_vlm(cfg))

    @lru_cache(maxsize=4096)
    def _scores(item_id: int, example_id: str, question: str, prompt: str, answer: str, image: str,
                candidates: tuple[tuple[int, str], ...]) -> dict[int, float]:
        example = Example(example_id, Path(image), question, [answer])
        values = score(reward_model, [(example, prompt, [text for _, text in candidates])])[0]
        return {candidate_id: value for (candidate_id, _), value in zip(candidates, values)}

    def assist(item: dict[str, Any]) -> tuple[dict[int, float], float]:
        image = Path(item["image_ref"] or "")
        image = image if image.is_absolute() else run_dir / image
        candidates = tuple((int(cid), text) for cid, text in item["candidates"])
        return _scores(item["item_id"], item["example_id"], question_shown(item), item["prompt"],
                       item["answer"], str(image), candidates), info["threshold"]

    return assist
