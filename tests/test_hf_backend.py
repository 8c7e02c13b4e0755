"""The `hf` backend on tiny random LLaVA and Qwen2-VL models built from configs (CPU, offline)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from illume.config import SampleConfig
from illume.data.records import Example
from illume.demo.tiny_models import build_tiny_hf_vlm
from illume.models.hf import HFVLM, banned_token_ids, load_hf_vlm
from illume.models.vlm import VLM
from illume.prompts import example_seed
from illume.sampling import sample

PROMPT = "Q: what color is the circle ? A: red, seeing that"
COMPLETION = " the circle is red"
SAMPLE_CFG = SampleConfig(temperatures=[0.3, 0.8], samples_per_temperature=2, max_new_tokens=6,
                          answer_max_new_tokens=3, batch_size=2, seed=0)


@pytest.fixture(params=["llava", "qwen2_vl"])
def vlm(request) -> HFVLM:
    return build_tiny_hf_vlm(request.param)


def _image(i: int) -> Image.Image:
    # Different sizes: Qwen2-VL then gives each image its own number of image tokens.
    return Image.new("RGB", (40 + 8 * i, 56), (60 * i, 120, 30))


def _num_image_tokens(vlm: HFVLM, row: dict) -> int:
    return row["input_ids"].count(vlm.image_token_id)


def _expected_image_tokens(vlm: HFVLM, row: dict) -> int:
    if "image_grid_thw" in row:  # Qwen2-VL: one token per 2 x 2 merged patches
        return int(row["image_grid_thw"].prod()) // 4
    return 16  # tiny LLaVA: (32 / 8)^2 patches, CLS dropped


def test_encode_row_prompt_is_prefix_of_full_row(vlm):
    prompt_row = vlm.encode_row(_image(1), PROMPT)
    full_row = vlm.encode_row(_image(1), PROMPT, COMPLETION)
    n = len(prompt_row["input_ids"])
    assert full_row["input_ids"][:n] == prompt_row["input_ids"]
    assert prompt_row["labels"] == [-100] * n
    assert full_row["labels"][:n] == [-100] * n
    assert full_row["labels"][n:] == full_row["input_ids"][n:]
    assert full_row["input_ids"][-1] == vlm.eos_token_id
    assert vlm.tokenizer.decode(full_row["input_ids"][n:-1]) == COMPLETION.strip()
    assert _num_image_tokens(vlm, prompt_row) == _expected_image_tokens(vlm, prompt_row) > 0
    for key, value in prompt_row.items():  # the same image tensors; per-token lists extended with text types
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, full_row[key])
        else:
            assert len(full_row[key]) == len(full_row["input_ids"])


def test_collate_pads_and_concatenates_images(vlm):
    rows = [vlm.encode_row(_image(0), PROMPT, COMPLETION), vlm.encode_row(_image(1), PROMPT),
            vlm.encode_row(_image(2), "Q: is there a square ? A: no, seeing that", " there is no square")]
    lengths = [len(row["input_ids"]) for row in rows]
    batch = vlm.collate(rows)
    shape = (3, max(lengths))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == shape
    assert batch["attention_mask"].sum(1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == vlm.pad_token_id).all()
    assert (batch["labels"][padding] == -100).all()
    assert batch["attention_mask"][:, 0].all()  # right padding
    if "image_grid_thw" in batch:  # Qwen2-VL: all images' patches in one (sum of patches, C*T*P*P) tensor
        assert batch["image_grid_thw"].shape == (3, 3)
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(1).sum())
        assert batch["mm_token_type_ids"].shape == (3, max(lengths))
        assert int(batch["mm_token_type_ids"].sum()) == sum(_num_image_tokens(vlm, row) for row in rows)
    else:
        assert batch["pixel_values"].shape == (3, 3, 32, 32)
    left = vlm.collate(rows, padding_side="left")
    assert left["attention_mask"][:, -1].all() and left["attention_mask"].sum(1).tolist() == lengths


def test_forward_loss_is_the_mean_completion_cross_entropy(vlm):
    """loss = mean over labelled positions t of -log p(label_t | tokens < t), the usual shifted LM loss."""
    rows = [vlm.encode_row(_image(i), PROMPT, COMPLETION) for i in range(2)]
    with torch.no_grad():
        out = vlm.model(**vlm.collate(rows))
    batch = vlm.collate(rows)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected)


def test_one_sft_step_changes_lora_weights_only(vlm):
    rows = [vlm.encode_row(_image(i % 2), PROMPT, c) for i, c in enumerate([COMPLETION, " it is red"] * 2)]
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in vlm.model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    vlm.model.train()
    loss = vlm.model(**vlm.collate(rows)).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # The projector trains only on request; the vision tower never.
    vlm.set_trainable(adapters=False, prefix=True)
    names = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert names and all("multi_modal_projector" in n or "visual.merger" in n for n in names)


def _sample(vlm: HFVLM, examples: list[Example], cfg: SampleConfig, **kwargs) -> list:
    """`illume.sampling.sample` as on the train split (reference answers in the prompts) unless told."""
    return sample(vlm, examples, cfg, **{"use_reference_answer": True, "progress": False, **kwargs})


def test_both_backends_implement_the_whole_vlm_protocol(vlm, tiny_vlm):
    members = [name for name in dir(VLM) if not name.startswith("_")] + list(VLM.__annotations__)
    for backend in (vlm, tiny_vlm):
        missing = [name for name in members if not hasattr(backend, name)]
        assert not missing, (type(backend).__name__, missing)


def _examples() -> list[Example]:
    return [Example(f"ex{i}", _image(i), q, [a]) for i, (q, a) in
            enumerate([("what color is the circle ?", "red"), ("is there a square ?", "no"),
                       ("how many shapes are there ?", "two")])]


def test_sampling_draws_reproducible_candidates(vlm):
    examples = _examples()
    sets = _sample(vlm, examples, SAMPLE_CFG)
    k = len(SAMPLE_CFG.temperatures) * SAMPLE_CFG.samples_per_temperature
    for example, candidate_set in zip(examples, sets):
        assert candidate_set.example_id == example.id and candidate_set.answer == example.answer
        assert candidate_set.prompt == f"Q: {example.question} A: {example.answer}, seeing that"
        assert candidate_set.seed == example_seed(SAMPLE_CFG.seed, 0, example.id)
        texts = [c.text for c in candidate_set.candidates]
        assert 1 <= len(texts) <= k and len(set(texts)) == len(texts) and all(texts)
        for c in candidate_set.candidates:
            assert c.temperature == [0.3, 0.3, 0.8, 0.8][c.sample_idx] and c.seed == candidate_set.seed
            assert c.logprob < 0 and math.isfinite(c.logprob)
    assert _sample(vlm, examples, SAMPLE_CFG) == sets
    # Recorded seeds reproduce the candidates in another round.
    recorded = {s.example_id: s.seed for s in sets}
    assert _sample(vlm, examples, SAMPLE_CFG, round_idx=3, seeds=recorded) == sets
    own = _sample(vlm, examples, SAMPLE_CFG, use_reference_answer=False)
    assert all(s.answer == s.predicted_answer and f"A: {s.answer}, seeing that" in s.prompt for s in own)


def test_candidate_logprob_matches_teacher_forcing(vlm):
    """logprob = sum over the rationale's tokens and EOS of log p(token | prefix) at T = 1, special tokens
    other than EOS excluded from the softmax (they are never drawn); no EOS term when cut at
    max_new_tokens."""
    # A bias on EOS's logit, so that some rationales end with EOS and others are cut at max_new_tokens.
    base = vlm.model.get_base_model()
    head = torch.nn.Linear(base.lm_head.in_features, base.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(base.lm_head.weight)
        head.bias.zero_()
        head.bias[vlm.eos_token_id] = 2.0
    base.lm_head = head
    cfg = SampleConfig(temperatures=[0.3, 0.8], samples_per_temperature=2, max_new_tokens=16, batch_size=2)
    examples = _examples()
    ended = []
    for example, candidate_set in zip(examples, _sample(vlm, examples, cfg)):
        for candidate in candidate_set.candidates:
            row = vlm.encode_row(example.image, candidate_set.prompt, " " + candidate.text)
            with torch.no_grad():
                logits = vlm.model(**vlm.collate([row])).logits[0, :-1].double()  # (T - 1, V)
            logits[:, banned_token_ids(vlm)] = float("-inf")
            labels = torch.tensor(row["labels"][1:])
            scored = (labels != -100).nonzero().squeeze(1)  # the rationale's tokens, then EOS
            token_logprobs = torch.log_softmax(logits, -1)[scored, labels[scored]]
            ended.append(len(scored) - 1 < cfg.max_new_tokens)
            if not ended[-1]:
                token_logprobs = token_logprobs[:-1]
            assert candidate.logprob == pytest.approx(float(token_logprobs.sum()), abs=1e-4)
    assert any(ended) and not all(ended)


def test_save_load_round_trip_gives_identical_logits(vlm, tmp_path):
    # Non-zero adapters and a changed projector, so both must survive the round trip.
    with torch.no_grad():
        for name, parameter in vlm.model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name or "visual.merger" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    batch = vlm.collate([vlm.encode_row(_image(i), PROMPT, COMPLETION) for i in range(2)])
    with torch.no_grad():
        logits = vlm.model(**batch).logits
        with vlm.model.disable_adapter():
            base_logits = vlm.model(**batch).logits
    vlm.save(tmp_path)
    # Built in the plain format; the saved processor has a chat template, which `load` would otherwise choose.
    loaded = HFVLM.load(tmp_path, prompt_format="plain")
    assert type(loaded.processor).__name__ == type(vlm.processor).__name__
    assert loaded.collate([loaded.encode_row(_image(0), PROMPT)])["input_ids"].tolist() == \
        vlm.collate([vlm.encode_row(_image(0), PROMPT)])["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, logits)
    assert all("lora_" in n for n, p in loaded.model.named_parameters() if p.requires_grad)
    # The saved directory is also a plain base checkpoint: fresh LoRA (B = 0) leaves the saved base's output.
    fresh = load_hf_vlm(tmp_path, lora={"r": 2})
    with torch.no_grad():
        assert torch.equal(fresh.model(**batch).logits, base_logits)
    assert all("lora_" in n for n, p in fresh.model.named_parameters() if p.requires_grad)


def test_fresh_lora_is_seeded_and_leaves_the_global_generator(tmp_path):
    # PEFT draws lora_A from torch's global generator: unseeded, two runs of one config trained from different
    # adapters (the HF demo's round-0 CIDEr differed run to run). Seeded, they start alike.
    build_tiny_hf_vlm("qwen2_vl").save(tmp_path)

    def lora_a(seed: int) -> list[torch.Tensor]:
        vlm = load_hf_vlm(tmp_path, lora={"r": 2}, seed=seed)
        return [p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_A" in n]

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, again, other = lora_a(0), lora_a(0), lora_a(1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's draws are not disturbed
    assert first and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
