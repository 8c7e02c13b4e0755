"""`POLICIES`: policy.kind -> the policy (policies.base). Adding a policy is one module plus one entry here."""

from __future__ import annotations

from policies.base import Policy
from policies.optimize import preference_round
from policies.sft import sft_round

POLICIES: dict[str, Policy] = {
    "sft": sft_round,  # ILLUME's selection-SFT
    "dpo": preference_round,  # DPO on accepted vs rejected pairs (policies/dpo.py)
    "kto": preference_round,  # KTO on accept/reject labels (policies/kto.py)
}
