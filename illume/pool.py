"""A candidate pool from several models (`sample.pool`, as Silkie pools the answers of several VLMs).

Each train round, after the policy drew its K candidates per item, every pool entry that exists by then
draws K more with the same sampler and sampling settings:
- `round: N`: this run's policy as it was after round N (its RUN_DIR/round_NN adapters), from round N + 1 on
  (an entry whose round has not finished yet sits the round out, and the run says so);
- `adapters: FILE`: another set of adapters for this run's base model, swapped in for the pool's sampling;
- `model: {...}`: another VLM (as the run's `model` section), loaded for the pool's sampling and released.

Swapped adapters are swapped back before anything else happens, so the policy trains on exactly the weights
it had. The candidates join the item's list after the policy's, a text already in it dropped; each keeps the
name of the model that wrote it (`Candidate.model`, stored in the feedback store and the jsonl export). The
annotation page never shows it (it sends a candidate's id and text only), so people judge the texts blind.
Each entry draws from seeds of its own (the example's stream keyed by the entry's name), recorded with its
candidates as the policy's are.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from illume import distributed
from illume.config import ConfigError, PoolModelConfig, RunConfig
from illume.data.records import POLICY_MODEL, Candidate, CandidateSet, Example
from illume.loading import load_vlm
from illume.models.vlm import VLM
from illume.models.weights import load_trainable_weights, read_safetensors
from illume.prompts import example_seed
from illume.sampling import sample
from illume.training import ADAPTERS_FILE


def pool_name(entry: PoolModelConfig) -> str:
    """The entry's `name`, or one derived from what it is."""
    if entry.name:
        return entry.name
    if entry.round is not None:
        return f"round_{entry.round}"
    if entry.adapters is not None:
        path = Path(entry.adapters)
        return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return f"{entry.model.kind}:{entry.model.path or 'demo base model'}"


def check_pool(cfg: RunConfig) -> None:
    """`sample.pool`, checked before any model loads.

    Raises:
        ConfigError: an entry that is not exactly one of round / adapters / model, a missing adapters file, a
            negative round, or two entries (or an entry and the policy) with one name.
    """
    names = {POLICY_MODEL}
    for i, entry in enumerate(cfg.sample.pool):
        where = f"sample.pool[{i}]"
        given = [key for key in ("round", "adapters", "model") if getattr(entry, key) is not None]
        if len(given) != 1:
            raise ConfigError(f"{where}: set exactly one of round, adapters and model (it has "
                              f"{', '.join(given) or 'none'})")
        if entry.adapters is not None and not Path(entry.adapters).is_file():
            raise ConfigError(f"{where}.adapters={entry.adapters}: no such file")
        name = pool_name(entry)
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is taken (by the policy or another entry); set "
                              f"{where}.name")
        names.add(name)


@contextlib.contextmanager
def swapped_adapters(vlm: VLM, path: Path) -> Iterator[None]:
    """`vlm` with the weights stored in `path` for the duration, its own restored after (also on an error)."""
    # The policy's weights are copied before the pool's load: a bad file changes nothing.
    parameters = dict(vlm.model.named_parameters())
    state = read_safetensors(path, "give sample.pool an adapters file written by a round")
    saved = {name: parameters[name].detach().clone() for name in state if name in parameters}
    try:
        load_trainable_weights(vlm.model, path, "give sample.pool an adapters file written by a round")
        yield
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                parameters[name].copy_(tensor)


def pool_candidate_sets(vlm: VLM, examples: Sequence[Example], cfg: RunConfig, round_idx: int,
                        name: str) -> list[CandidateSet]:
    """One pool entry's candidate sets (`cfg.sample`, the entry's own seeds), each candidate named `name`."""
    seeds = {e.id: example_seed(cfg.sample.seed, round_idx, f"{e.id}|pool:{name}") for e in examples}
    sets = distributed.gather_objects(sample(
        vlm, distributed.shard(list(examples), cfg.sample.batch_size), cfg.sample, round_idx=round_idx,
        use_reference_answer=True, seeds=seeds, progress=distributed.is_main()))
    for cs in sets:
        cs.candidates = [replace(c, model=name) for c in cs.candidates]
    return sets


def sample_pool(cfg: RunConfig, vlm: VLM, examples: Sequence[Example], round_idx: int, run_dir: Path,
                say: Callable[[str], None] = print) -> dict[str, list[CandidateSet]]:
    """Pool entry name -> its candidate sets (one per example, in order) for round `round_idx`; entries
    whose round has not finished yet are left out (and named)."""
    out: dict[str, list[CandidateSet]] = {}
    for entry in cfg.sample.pool:
        name = pool_name(entry)
        if entry.model is not None:
            say(f"round {round_idx}: sampling the pool's {name}")
            other = load_vlm(replace(cfg, model=entry.model))
            try:
                out[name] = pool_candidate_sets(other, examples, cfg, round_idx, name)
            finally:
                del other
                gc.collect()
            continue
        path = (Path(entry.adapters) if entry.adapters is not None
                else run_dir / f"round_{entry.round:02d}" / ADAPTERS_FILE)
        if entry.round is not None and (entry.round >= round_idx or not path.is_file()):
            say(f"round {round_idx}: the pool's {name} sits this round out (round {entry.round} has not "
                "finished training yet)")
            continue
        say(f"round {round_idx}: sampling the pool's {name} ({path})")
        with swapped_adapters(vlm, path):
            out[name] = pool_candidate_sets(vlm, examples, cfg, round_idx, name)
    return out


def merge_pool(sets: Sequence[CandidateSet], pooled: dict[str, list[CandidateSet]]) -> list[CandidateSet]:
    """The policy's sets with every pool entry's candidates appended in entry order, texts already in the
    item's list dropped (the first writer keeps it)."""
    merged = []
    for i, cs in enumerate(sets):
        candidates: list[Candidate] = list(cs.candidates)
        seen = {c.text for c in candidates}
        for name, pool_sets in pooled.items():
            other = pool_sets[i]
            if other.example_id != cs.example_id:
                raise RuntimeError(f"pool {name}: item {i} is {other.example_id}, the policy's {cs.example_id}")
            for candidate in other.candidates:
                if candidate.text not in seen:
                    seen.add(candidate.text)
                    candidates.append(candidate)
        merged.append(replace(cs, candidates=candidates))
    return merged
