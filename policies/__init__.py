"""Policies: one round's optimisation of the VLM on the feedback, chosen by `registry.POLICIES[policy.kind]`
(sft, dpo, kto), each `(RoundContext) -> PolicyResult` (base.py). Data from the store comes through
illume.feedback.verdicts (data.py). Import the submodules; nothing is imported here."""
