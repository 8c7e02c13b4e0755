"""Continuing a run only with the settings it was started with, unless a change is allowed and recorded.

`illume run` on an existing run continues it (illume.loop). Were a setting that changes what a round computes
different now (how many candidates are drawn, the critic's threshold, the learning rate, ...), the store would
mix rounds made with different settings and nothing would tell which. So a resumed run whose resolved settings
differ from RUN_DIR/config.yaml in such a key refuses, listing each key with its old and new value.

`loop.allow_changed_settings=true` lets it continue: RUN_DIR/config.yaml then takes the new settings (it
always shows the settings the run goes on with), and RUN_DIR/settings_changes.jsonl gets one line per allowed
change:
`from_round` (the first round not finished then, which runs with the new settings; what the store already
holds of it, e.g. its candidates, was made with the old ones) and each changed key's old and new value.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from illume.config import ConfigError, RunConfig, dotted_keys, load_run_config

CHANGES_FILE = "settings_changes.jsonl"

# The settings a resumed run may change freely, because they do not change what any round computes; every
# other key must equal the run's config.yaml. The one list of them, with why:
RESULT_NEUTRAL = frozenset({
    "name", "output_dir",  # where the run folder is, not what the run does
    "model.cache_dir",  # where the base model is cached; the cache is keyed by every setting that changes it
    "sample.batch_size",  # candidates are the same in any batch (per-example seeds; tests/test_sampling.py)
    "train.gradient_checkpointing",  # recomputes activations in the backward pass: the same gradients
    "train.report_to",  # where figures are reported (illume.tracking), not what is computed
    "critic.wait", "critic.poll_seconds",  # whether and how often the loop waits for people, not what they do
    "annotate.host", "annotate.port", "annotate.lease_seconds",  # where the page is served; when a lease ends
    "annotate.allowed_hosts", "annotate.max_body_bytes",  # who may reach the page, how much it reads
    "data.check_images",  # whether images are checked before the model loads, not what they are
    # Where the vLLM server is and how it is talked to; which engine draws (sample.engine) and the server's own
    # arguments (sample.vllm.server_args: dtype, ...) do change the draws.
    "sample.vllm.url", "sample.vllm.python", "sample.vllm.port", "sample.vllm.startup_timeout",
    "sample.vllm.request_timeout", "sample.vllm.max_concurrency", "sample.vllm.retries",
    # When to stop, like loop.num_rounds (checked below): they decide how many rounds run, not what one does.
    "loop.stop_when_nothing_new", "loop.patience", "loop.min_improvement",
    "loop.allow_changed_settings",  # the opt-in itself
})


def loop_started(run_dir: Path) -> bool:
    """Whether the loop has results in `run_dir`: it writes base_metrics.json before it samples anything."""
    return (run_dir / "base_metrics.json").is_file() or any(run_dir.glob("round_*"))


def finished_rounds(run_dir: Path) -> int:
    """Rounds of the run that wrote their metrics.json (the last file a round writes)."""
    return sum(1 for _ in run_dir.glob("round_*/metrics.json"))


def setting_changes(old: RunConfig, new: RunConfig, finished_rounds: int) -> dict[str, tuple[Any, Any]]:
    """The settings that differ and change results: {dotted key: (old value, new value)}, in config order.

    `loop.num_rounds` may grow, and shrink down to the rounds already finished: fewer would drop finished
    rounds from results.json.
    """
    before, after = dotted_keys(asdict(old)), dotted_keys(asdict(new))
    changes = {}
    for key, value in after.items():
        if key in RESULT_NEUTRAL or before.get(key) == value:
            continue
        if key == "loop.num_rounds" and value >= finished_rounds:
            continue
        changes[key] = (before.get(key), value)
    return changes


def check_resumed_settings(cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Compare the settings of a run being continued with its config.yaml, before anything is written.

    Returns:
        The changes that `loop.allow_changed_settings` lets through ({} for a new run or the same settings).

    Raises:
        ConfigError: the settings changed and the change is not allowed; the message lists every changed key
            with its old and new value.
    """
    stored = cfg.run_dir / "config.yaml"
    if not loop_started(cfg.run_dir) or not stored.is_file():
        return {}
    changes = setting_changes(load_run_config(stored), cfg, finished_rounds(cfg.run_dir))
    if changes and not cfg.loop.allow_changed_settings:
        raise ConfigError(f"{cfg.run_dir} was started with other settings: {describe(changes)}; continue it "
                          f"with the settings of {stored}, or pass loop.allow_changed_settings=true to "
                          f"continue anyway (the change is then recorded in {CHANGES_FILE})")
    return changes


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """`sample.samples_per_temperature 5 -> 2; critic.metric "rouge_l" -> "bleu_4"` (values as JSON)."""
    return "; ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items())


def record_setting_changes(cfg: RunConfig, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append an allowed change to RUN_DIR/settings_changes.jsonl, with the round it takes effect from."""
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "from_round": finished_rounds(cfg.run_dir),
             "changes": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}}
    with (cfg.run_dir / CHANGES_FILE).open("a") as file:
        file.write(json.dumps(entry) + "\n")
