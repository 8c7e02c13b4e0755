"""`POLICIES`: policy.kind -> the policy (policies.base). Adding a policy is one module plus one entry here
(and, if its settings need checking before any model loads, one entry in CONFIG_CHECKS)."""

from __future__ import annotations

from collections.abc import Callable

from illume.config import ConfigError, RunConfig
from policies.base import Policy
from policies.dpo import dpo_round
from policies.grpo import check_config as check_grpo_config
from policies.grpo import grpo_round
from policies.kto import kto_round
from policies.sft import sft_round

POLICIES: dict[str, Policy] = {
    "sft": sft_round,  # ILLUME's selection-SFT
    "dpo": dpo_round,  # DPO on accepted vs rejected pairs (policies/dpo.py)
    "kto": kto_round,  # KTO on accept/reject labels (policies/kto.py)
    "grpo": grpo_round,  # online GRPO on sampled rationales scored by policy.grpo.reward_sources (policies/grpo.py)
}

CONFIG_CHECKS: dict[str, Callable[[RunConfig], None]] = {"grpo": check_grpo_config}
"""policy.kind -> a check of the settings it needs, raising ConfigError; run by the loop before any work."""


def check_policy_config(cfg: RunConfig) -> None:
    """The policy kind and the configured policy's own settings check (nothing for a policy without one)."""
    if cfg.policy.kind not in POLICIES:
        raise ConfigError(f"policy.kind={cfg.policy.kind!r} is not one of {', '.join(POLICIES)}")
    CONFIG_CHECKS.get(cfg.policy.kind, lambda _: None)(cfg)
