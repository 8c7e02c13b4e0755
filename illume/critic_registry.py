"""CRITICS: critic.kind -> the critic it names, each built from the run config (`(RunConfig) -> Critic`).

The one place a critic kind is chosen. Adding a critic is one module with a class that has
`review(CritiqueContext) -> bool` (illume.critics.Critic) plus one entry here. The dict sits above both
`illume.critics` (simulated, people) and `reward.critic` (reward, hybrid) / `reward.judge` (judge), so neither imports the other's
layer the wrong way and nothing registers itself at import time.
"""

from __future__ import annotations

from collections.abc import Callable

from illume.config import ConfigError, RunConfig
from illume.critics import Critic, person_critic, simulated_critic
from reward.critic import HybridCritic, RewardCritic, check_critique_order, check_first_round
from reward.fitted import check_reward_checkpoint
from reward.judge import JudgeCritic

CRITICS: dict[str, Callable[[RunConfig], Critic]] = {
    "simulated": simulated_critic,
    "person": person_critic,
    "reward": RewardCritic,
    "hybrid": HybridCritic,
    "judge": JudgeCritic,
}

CONFIG_CHECKS: tuple[Callable[[RunConfig], None], ...] = (
    check_reward_checkpoint,  # a saved reward model fitted on another base model fails now, not rounds later
    check_critique_order,  # annotate.order / budget_per_round where the critic kind gives them a meaning
    check_first_round,  # reward.people_rounds=0: round 0 needs a reward model (a checkpoint, or a budget)
)
"""Checks of the critique's settings, each owned by the module the setting belongs to, raising ConfigError."""


def check_critic_config(cfg: RunConfig) -> None:
    """The critic kind and the critique's settings, before any work (the loop's pre-flight)."""
    if cfg.critic.kind not in CRITICS:
        raise ConfigError(f"critic.kind={cfg.critic.kind!r} is not one of {', '.join(CRITICS)}")
    for check in CONFIG_CHECKS:
        check(cfg)
