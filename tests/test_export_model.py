"""`illume export-model`: a tiny run's model (MAGMA, an HF LLaVA with a trained projector) and its reward model,
exported, then loaded in a fresh process by stock transformers / PEFT alone (for MAGMA plus
`register_magma`, which the architecture needs: `MagmaForCausalLM` is illume's class), giving the run's own
greedy tokens and logits on val examples; which round; what it refuses to overwrite."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from illume.cli import main
from illume.config import load_config
from illume.data.datasets import load_split
from illume.data.records import load_image
from illume.export_model import MARKER_FILE
from illume.loading import load_vlm
from illume.models.weights import load_trainable_weights
from illume.prompts import answer_prompt, rationale_prompt
from illume.training import ADAPTERS_FILE
from tests.conftest import REPO, TINY_DATA

GENERATE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}  # EOS held off: 5 tokens compared

# Loads an export in a fresh interpreter with stock libraries and writes, per input row, the greedy tokens and
# the next-token logits at the prompt's end (or, for the reward model, the reward).
LOADER = r"""
import json, sys
import torch

job = json.loads(sys.argv[1])
if job["kind"] != "magma" and job["kind"] != "reward":
    for name in ("illume", "reward", "policies"):  # an HF export loads without illume: importing it fails here
        sys.modules[name] = None
else:
    from illume.models.magma import register_magma  # the architecture is illume's: only its registration
    register_magma()
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

out = job["out"]
if job["kind"] == "peft":
    from peft import PeftModel
    base = json.load(open(f"{out}/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), out)
    processor = AutoProcessor.from_pretrained(out)
elif job["kind"] == "merged":
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
elif job["kind"] == "magma":
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
else:
    from safetensors.torch import load_file
    model = AutoModelForCausalLM.from_pretrained(f"{out}/backbone")
    head = load_file(f"{out}/head.safetensors")
    threshold = json.load(open(f"{out}/reward_config.json"))["threshold"]
model.eval()
results = []
with torch.no_grad():
    for inputs in torch.load(job["inputs"], weights_only=True):
        if job["kind"] == "reward":
            start = int(inputs.pop("start"))
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
            pooled = hidden[:, start:].mean(1)
            results.append(float(pooled @ head["weight"].T + head["bias"]))
            continue
        logits = model(**inputs).logits[0, -1].tolist()
        tokens = model.generate(**inputs, **job["generate"])[0, inputs["input_ids"].shape[1]:].tolist()
        results.append({"tokens": tokens, "logits": logits})
json.dump({"results": results, "modules": sorted(m for m, module in sys.modules.items()
                                                 if module is not None and m.split(".")[0] == "illume")},
          open(job["results"], "w"))
"""


def _load_in_fresh_process(tmp_path, kind: str, out, inputs: list[dict]) -> dict:
    inputs_path, results_path = tmp_path / f"{kind}-inputs.pt", tmp_path / f"{kind}-results.json"
    torch.save(inputs, inputs_path)
    job = {"kind": kind, "out": str(out), "inputs": str(inputs_path), "results": str(results_path),
           "generate": GENERATE}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(job)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results_path.read_text())


def _run_model(run_dir, round_idx: int):
    """The run's own model after a round: its base model with the round's kept weights."""
    cfg = load_config(run_dir / "config.yaml")
    vlm = load_vlm(cfg)
    load_trainable_weights(vlm.model, run_dir / f"round_{round_idx:02d}" / ADAPTERS_FILE)
    vlm.model.eval()
    return cfg, vlm


def _inputs_and_expected(run_dir, round_idx: int, num_examples: int = 3) -> tuple[list[dict], list[dict]]:
    """Generation inputs of answer and rationale prompts of val examples (`encode_row`, one row each) and the
    run's own model's greedy tokens and logits for them."""
    cfg, vlm = _run_model(run_dir, round_idx)
    inputs, expected = [], []
    for example in load_split(cfg.data, "val")[:num_examples]:
        for prompt in (answer_prompt(example.question), rationale_prompt(example.question, example.answer)):
            batch = vlm.collate([vlm.encode_row(load_image(example), prompt)])
            row = {k: v for k, v in batch.items() if k != "labels" and v is not None}
            with torch.no_grad():
                logits = vlm.model(**row).logits[0, -1].tolist()
                tokens = vlm.model.generate(**row, **GENERATE)[0, row["input_ids"].shape[1]:].tolist()
            inputs.append(row)
            expected.append({"tokens": tokens, "logits": logits})
    return inputs, expected


def _assert_same_model(results: dict, expected: list[dict]) -> None:
    assert len(results["results"]) == len(expected)
    for got, want in zip(results["results"], expected):
        assert got["tokens"] == want["tokens"]
        assert got["logits"] == pytest.approx(want["logits"], abs=1e-4)


# ------------------------------------------------------------------ MAGMA (the demo model)


@pytest.fixture
def magma_run(finished_run_copy):
    """A tiny demo run: 2 rounds on the pre-trained tiny demo model, simulated critic, both rounds trained; with
    reward settings `illume reward train` fits with (tests/conftest.py: `finished_run`). This test's own copy."""
    return finished_run_copy.run_dir


@pytest.mark.slow
def test_a_magma_export_loads_with_transformers_and_gives_the_runs_greedy_tokens(magma_run, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export-model", str(magma_run), str(out)]) == 0
    assert "exported round 1" in capsys.readouterr().out  # the last round that trained
    for name in ("config.json", "model.safetensors", "model.safetensors.sha256", "tokenizer.json", "README.md",
                 MARKER_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / MARKER_FILE).read_text())["exported"] == "round 1"
    card = (out / "README.md").read_text()
    results = json.loads((magma_run / "results.json").read_text())
    assert "| round | accepted % | new | total | judgments | by people | B-4 |" in card  # the loop's table
    assert f"| 1 | {results[2]['accepted_pct']:.1f} | {results[2]['new_rationales']} |" in card
    assert f"- judgments: {results[2]['judgments']} " in card  # from the store, rounds <= 1
    assert "- train: 12 questions" in card and "- val: 8 questions" in card
    assert f"illume export-model {magma_run} {out}\n" in card and "register_magma()" in card

    inputs, expected = _inputs_and_expected(magma_run, 1)
    results = _load_in_fresh_process(tmp_path, "magma", out, inputs)
    _assert_same_model(results, expected)
    assert set(results["modules"]) <= {"illume", "illume.models", "illume.models.magma", "illume.models.adapters",
                                       "illume.models.clip_resnet"}, results["modules"]


def test_round_chooses_the_rounds_weights(magma_run, tmp_path):
    out = tmp_path / "round0"
    assert main(["export-model", str(magma_run), "--round", "0", str(out)]) == 0
    exported = load_file(str(out / "model.safetensors"))
    rounds = [load_file(str(magma_run / f"round_{r:02d}" / ADAPTERS_FILE)) for r in (0, 1)]
    assert rounds[0].keys() <= exported.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in rounds[0].items())
    assert any(not torch.equal(exported[name], tensor) for name, tensor in rounds[1].items())
    assert json.loads((out / MARKER_FILE).read_text())["exported"] == "round 0"
    assert f"# {magma_run.name}, round 0:" in (out / "README.md").read_text()


def test_a_round_that_is_not_there_is_refused_naming_the_rounds_there(magma_run, tmp_path, capsys):
    out = tmp_path / "round7"
    assert main(["export-model", str(magma_run), str(out), "--round", "7"]) == 2
    err = capsys.readouterr().err
    assert "no trained round 7" in err and "the finished rounds that trained are 0, 1" in err
    assert not out.exists()


def test_out_is_replaced_only_when_it_is_an_earlier_export_and_force_is_given(magma_run, tmp_path, capsys):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        assert main(["export-model", str(magma_run), str(foreign), *force]) == 2
        assert "did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert main(["export-model", str(magma_run), str(magma_run)]) == 2  # the run folder itself, never
    assert (magma_run / "config.yaml").is_file() and not (magma_run / MARKER_FILE).exists()

    out = tmp_path / "model"
    assert main(["export-model", str(magma_run), str(out), "--round", "0"]) == 0
    capsys.readouterr()
    assert main(["export-model", str(magma_run), str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert json.loads((out / MARKER_FILE).read_text())["exported"] == "round 0"  # untouched
    assert main(["export-model", str(magma_run), str(out), "--force"]) == 0
    assert json.loads((out / MARKER_FILE).read_text())["exported"] == "round 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "theirs"]  # no temporary folder left


@pytest.mark.slow
def test_the_reward_model_exports_with_its_head_and_threshold(magma_run, tmp_path, capsys):
    from reward.model import RewardModel, score

    assert main(["export-model", str(magma_run), str(tmp_path / "none"), "--reward"]) == 2
    assert "has no reward model: fit one with `illume reward train" in capsys.readouterr().err
    assert main(["reward", "train", str(magma_run), "--round", "0"]) == 0
    out = tmp_path / "reward"
    assert main(["export-model", str(magma_run), str(out), "--reward"]) == 0
    for name in ("backbone/config.json", "backbone/model.safetensors", "backbone/tokenizer.json",
                 "head.safetensors", "head.safetensors.sha256", "reward_config.json", "README.md", MARKER_FILE):
        assert (out / name).is_file(), name
    saved = json.loads((magma_run / "reward" / "reward_model.json").read_text())
    config = json.loads((out / "reward_config.json").read_text())
    assert config["threshold"] == saved["threshold"] and config["pooling"] == saved["pooling"] == "mean"
    assert config["platt"] == saved["platt"]  # the accept probability's (a, b), or None for both
    assert config["base_model_identity"] == saved["backbone"] and config["fitted_on_rounds_upto"] == 0
    assert f"reward >= {saved['threshold']:.4f}" in (out / "README.md").read_text()

    assert main(["export-model", str(magma_run), str(tmp_path / "r5"), "--reward", "--round", "5"]) == 2
    assert "has reward/ (illume reward train)" in capsys.readouterr().err

    cfg = load_config(magma_run / "config.yaml")
    rm = RewardModel.load(magma_run / "reward", load_vlm(cfg))
    examples = load_split(cfg.data, "train")[:3]
    texts = ["the circle is red", "there is a blue square on the left"]
    items = [(e, rationale_prompt(e.question, e.answer), texts) for e in examples]
    expected = [reward for rewards in score(rm, items) for reward in rewards]
    inputs = []
    for example, prompt, rationales in items:
        scored = rm.vlm.encode_scored([(load_image(example), prompt, rationales)])[0]  # what `score` reads
        for text, scored_row in zip(rationales, scored):
            row = rm.vlm.encode_row(load_image(example), prompt, text)  # the same ids, with the image's pixels
            assert row["input_ids"] == scored_row["input_ids"]
            batch = rm.vlm.collate([row])
            inputs.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                           "pixel_values": batch["pixel_values"],
                           "start": torch.tensor(scored_row["rationale_start"])})
    results = _load_in_fresh_process(tmp_path, "reward", out, inputs)
    assert results["results"] == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------ an HF VLM (tiny LLaVA, projector trained)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A one-round run of a tiny LLaVA saved by HFVLM.save, LoRA and the multimodal projector trained."""
    from illume.demo.tiny_models import build_tiny_hf_vlm

    tmp_path = tmp_path_factory.mktemp("hf")
    build_tiny_hf_vlm("llava").save(tmp_path / "base")
    args = [str(REPO / "configs" / "demo.yaml"), *TINY_DATA, "model.kind=hf", f"model.path={tmp_path / 'base'}",
            f"output_dir={tmp_path / 'runs'}", "name=run", "loop.num_rounds=1", "critic.threshold=0.0",
            "train.num_epochs=1", "train.batch_size=8", "train.learning_rate=1e-2", "train.train_prefix=true",
            "sample.max_new_tokens=4", "sample.samples_per_temperature=1"]
    assert main(["run", *args]) == 0
    return tmp_path / "runs" / "run"


@pytest.mark.slow
def test_an_hf_export_is_a_peft_adapter_that_peft_loads_alone_with_the_trained_projector(hf_run, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export-model", str(hf_run), str(out)]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((hf_run.parent.parent / "base").resolve())
    # The run trained the projector (a base weight): it travels as modules_to_save.
    assert any("multi_modal_projector" in name for name in load_file(str(hf_run / "round_00" / ADAPTERS_FILE)))
    assert adapter["modules_to_save"] == ["multi_modal_projector"]
    assert (out / "adapter_model.safetensors.sha256").is_file() and not (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained(base" in card

    inputs, expected = _inputs_and_expected(hf_run, 0)
    results = _load_in_fresh_process(tmp_path, "peft", out, inputs)
    _assert_same_model(results, expected)
    assert results["modules"] == []  # illume was never imported


@pytest.mark.slow
def test_merge_writes_a_standalone_model_with_its_processor(hf_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["export-model", str(hf_run), str(out), "--merge"]) == 0
    assert (out / "config.json").is_file() and (out / "processor_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert not any("lora_" in name for name in load_file(str(out / "model.safetensors")))
    inputs, expected = _inputs_and_expected(hf_run, 0)
    results = _load_in_fresh_process(tmp_path, "merged", out, inputs)
    _assert_same_model(results, expected)
