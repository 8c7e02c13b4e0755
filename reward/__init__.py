"""The reward model learned from people's selections: pairs (pairs.py), model (model.py), Bradley-Terry training
(train.py), evaluation and threshold calibration (evaluate.py). Import the submodules; nothing is imported here."""
