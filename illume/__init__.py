"""illume: tuning vision-language models with human feedback on their rationales (after ILLUME, Brack et al.,
ICML 2023). The layers, top to bottom (checked by import-linter, pyproject.toml): cli; loop; annotate and
policies (independent of each other); reward; loading and demo; training; feedback (store, verdicts, queue,
exports, status), critics and sampling; models (the VLM protocol and its backends); prompts, metrics; data;
config. Import the submodules; nothing is imported here."""
