"""The reward model learned from people's selections: pairs and labels through illume.feedback.verdicts
(pairs.py), model on the backend's hidden states (model.py), Bradley-Terry training (train.py), evaluation and
threshold calibration (evaluate.py), and the reward / hybrid critics with their per-round fit-or-reuse
(critic.py). Import the submodules; nothing is imported here."""
