"""CRITICS: critic.kind -> the critic it names, each built from the run config (`(RunConfig) -> Critic`).

The one place a critic kind is chosen. Adding a critic is one module with a class that has
`review(CritiqueContext) -> bool` (illume.critics.Critic) plus one entry here. The dict sits above both
`illume.critics` (simulated, people) and `reward.critic` (reward, hybrid) / `reward.judge` (judge), so neither imports the other's
layer the wrong way and nothing registers itself at import time.
"""

from __future__ import annotations

from collections.abc import Callable

from illume.config import RunConfig
from illume.critics import Critic, human_critic, simulated_critic
from reward.critic import HybridCritic, RewardCritic
from reward.judge import JudgeCritic

CRITICS: dict[str, Callable[[RunConfig], Critic]] = {
    "simulated": simulated_critic,
    "human": human_critic,
    "reward": RewardCritic,
    "hybrid": HybridCritic,
    "judge": JudgeCritic,
}
