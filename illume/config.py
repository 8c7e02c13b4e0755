"""Every setting of a run, with its default and a one-line doc, in typed dataclasses.

YAML files in configs/ hold values only; `key.sub=value` arguments override them. `load_config` merges the
three through OmegaConf's structured configs, so an unknown key or a wrong type fails at load time with the
key named, and returns plain dataclasses: code never sees a DictConfig.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: `low` <= value <= `high` (`<` where the end is open); None: no
    bound. Each config class lists its settings' ranges in `RANGES`, checked by `check_ranges`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


COUNT = Range(1)
"""A number of things that must not be 0: rounds, epochs, steps, rows per batch, ..."""
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
"""Rates, times and temperatures that must be above 0."""
FRACTION = Range(0, 1)
"""Probabilities, shares and metric scores."""
PORT = Range(1, 65_535)


def check_ranges(section: Any, at: str) -> None:
    """Check every numeric setting of a config section, and of the sections inside it, against its class's
    `RANGES`, and every float for being finite; None means "not set" and passes.

    Args:
        section: A config dataclass.
        at: Its dotted key with a trailing dot ("sample.", "judge.model."), so that errors name the key.

    Raises:
        ValueError: naming the key, the value and what is allowed.
    """
    ranges = getattr(type(section), "RANGES", {})
    for f in fields(section):
        for key, value in _entries(f"{at}{f.name}", getattr(section, f.name)):
            if is_dataclass(value):
                check_ranges(value, f"{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ValueError(f"{key} must be a finite number, got {value}")
                if f.name in ranges and not ranges[f.name].allows(value):
                    raise ValueError(f"{key} must be {ranges[f.name]}, got {value}")


def _entries(key: str, value: Any) -> list[tuple[str, Any]]:
    """A setting's values by the key an override names them with: a list's items as key[i], a mapping's as
    key.name, anything else as itself."""
    if isinstance(value, list):
        return [(f"{key}[{i}]", item) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return [(f"{key}.{name}", item) for name, item in value.items()]
    return [(key, value)]


@dataclass
class ShapesWorldConfig:
    """The procedurally generated demo world (illume.data.shapes)."""

    seed: int = 0
    """Seed of the generator; the same seed gives the same images, questions and splits."""
    pretrain_seed: int | None = None
    """Seed of the pre-training scenes only (None: `seed`). A study that varies `seed` over train/val/test
    keeps one base model by fixing this, as ILLUME starts every run from the same pre-trained MAGMA."""
    image_size: int = 96
    """Side of the square images in pixels."""
    num_train_scenes: int = 400
    """Scenes whose questions form the ILLUME train split."""
    num_val_scenes: int = 100
    """Scenes whose questions form the val split."""
    num_test_scenes: int = 100
    """Scenes whose questions form the test split."""
    num_pretrain_scenes: int = 3000
    """Scenes used only for pre-training the demo model (captions and answers)."""
    questions_per_scene: int = 1
    """Questions asked about each train/val/test scene."""
    max_objects: int = 3
    """Most shapes in one scene (at least 1); at most 3, one per column."""

    RANGES: ClassVar = {"image_size": Range(16), "num_train_scenes": COUNT, "num_val_scenes": COUNT,
                        "num_test_scenes": AT_LEAST_0, "num_pretrain_scenes": COUNT, "questions_per_scene": COUNT,
                        "max_objects": Range(1, 3)}


@dataclass
class HFColumnsConfig:
    """Which column of a `datasets` dataset holds each field of an example (kind=hf). The optional ones
    (explanations, id, question_type) may be missing from the dataset under their default names; a name set
    here must be there."""

    image: str = "image"
    """The image: an `Image` feature, image file bytes, or a path (relative to `data.image_dir`, else to the
    folder of `data.hf.path`)."""
    question: str = "question"
    """The question (a non-empty string)."""
    answer: str = "answer"
    """The answer: a string, or a list of strings whose first is the canonical answer."""
    explanations: str = "explanations"
    """Reference explanations: a list of strings, or one string (optional)."""
    id: str = "id"
    """Stable example id, a string or an integer (optional; missing: `<dataset split>-<row index>`)."""
    question_type: str = "question_type"
    """Question category for per-type reports (optional)."""


@dataclass
class HFSplitsConfig:
    """The dataset's split each of the run's splits reads (kind=hf), in `datasets`' split syntax: a name, a
    slice or a sum ("train[:90%]", "train[90%:]", "validation+test")."""

    train: str = "train"
    """The split sampled and tuned on."""
    val: str = "validation"
    """The split scored each round."""
    test: str = "test"
    """The held-out split (read only by the commands that score it)."""


@dataclass
class HFDataConfig:
    """A Hugging Face `datasets` dataset on disk (kind=hf; illume.data.hf_datasets)."""

    path: str | None = None
    """A `save_to_disk` folder (a DatasetDict, or one Dataset read as the split `train`), a parquet / JSON(L) /
    CSV file or a folder of them (splits named by the files, as `load_dataset` names them), or an image folder
    with a metadata.jsonl / metadata.csv (`load_dataset("imagefolder")`)."""
    format: Literal["disk", "parquet", "json", "csv", "imagefolder"] | None = None
    """How to read `path`; None: from the path (a folder with dataset_dict.json or state.json: disk; with a
    metadata file: imagefolder; a file or folder of .parquet, .json/.jsonl or .csv files: that format)."""
    columns: HFColumnsConfig = field(default_factory=HFColumnsConfig)
    """The dataset's column for each field of an example."""
    splits: HFSplitsConfig = field(default_factory=HFSplitsConfig)
    """The dataset's split for each of the run's splits."""


@dataclass
class DataConfig:
    """Which examples the run uses."""

    kind: Literal["shapes", "vqax", "vqax_nle", "jsonl", "hf"] = "shapes"
    """Dataset: the built-in shapes world, VQA-X (ILLUME's column JSON or e-ViL/NLX-GPT JSON), JSONL, or a
    Hugging Face `datasets` dataset on disk (`hf`)."""
    shapes: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)
    """Settings of the shapes world (kind=shapes)."""
    hf: HFDataConfig = field(default_factory=HFDataConfig)
    """Where and how a `datasets` dataset is read (kind=hf)."""
    train_path: str | None = None
    """Train annotations file (file-based kinds)."""
    val_path: str | None = None
    """Val annotations file (file-based kinds)."""
    test_path: str | None = None
    """Test annotations file (file-based kinds); optional."""
    image_dir: str | None = None
    """Folder the images are read from (COCO folder for VQA-X; kind=hf: where relative image paths start)."""
    max_train_examples: int | None = None
    """Use only the first N train examples (None: all)."""
    max_val_examples: int | None = None
    """Use only the first N val examples (None: all)."""
    check_images: bool = True
    """Open every image file of the run's splits before any model loads (header, size, the decompression-bomb
    limit; illume.data.datasets), so that a bad one fails in seconds naming its file and row; false skips it
    (each image is still decoded when first used)."""

    RANGES: ClassVar = {"max_train_examples": COUNT, "max_val_examples": COUNT}

    def __post_init__(self) -> None:
        check_ranges(self, "data.")


@dataclass
class VisionConfig:
    """CLIP modified-ResNet image encoder. RN50x16: layers [6, 8, 18, 8], width 96, 384 px."""

    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    """Bottleneck blocks per stage."""
    width: int = 16
    """Stem width; the output has width * 32 features per token."""
    image_size: int = 96
    """Input side in pixels; the prefix has (image_size / 32)^2 tokens (96 px: a 3 x 3 grid)."""

    RANGES: ClassVar = {"layers": COUNT, "width": COUNT, "image_size": Range(32)}


@dataclass
class LMConfig:
    """The causal LM inside MAGMA, built from a config (GPT-J class)."""

    hidden_size: int = 128
    """Model width (GPT-J-6B: 4096)."""
    num_layers: int = 4
    """Decoder blocks (GPT-J-6B: 28)."""
    num_heads: int = 4
    """Attention heads (GPT-J-6B: 16)."""
    rotary_dim: int = 16
    """Dimensions per head with rotary position embedding (GPT-J-6B: 64)."""
    max_positions: int = 128
    """Longest sequence, image prefix included (GPT-J-6B: 2048)."""
    vocab_size: int | None = None
    """Rows of the embedding and the LM head; None: the tokenizer's size (GPT-J-6B: 50400, padded past it)."""
    activation: Literal["gelu", "gelu_new"] = "gelu"
    """MLP activation: exact GELU (demo) or the tanh approximation `gelu_new` (GPT-J-6B)."""

    RANGES: ClassVar = {"hidden_size": COUNT, "num_layers": COUNT, "num_heads": COUNT, "rotary_dim": AT_LEAST_0,
                        "max_positions": COUNT, "vocab_size": COUNT}


@dataclass
class AdapterConfig:
    """MAGMA's bottleneck adapters; a downsample factor of 0 means no adapter at that place."""

    attention_downsample: int = 4
    """Factor d / bottleneck of the adapter after attention (ILLUME/MAGMA v2: 8)."""
    mlp_downsample: int = 4
    """Factor of the adapter after the MLP (MAGMA v1: 4, v2: 8)."""

    RANGES: ClassVar = {"attention_downsample": AT_LEAST_0, "mlp_downsample": AT_LEAST_0}


@dataclass
class LoraSettings:
    """LoRA of the `hf` backend (peft.LoraConfig fields)."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator (lora_alpha); the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | None = None
    """Regex of the modules that get LoRA; None: the language model's attention and MLP projections."""

    RANGES: ClassVar = {"r": COUNT, "alpha": POSITIVE, "dropout": Range(0, 1, high_open=True)}


@dataclass
class ModelConfig:
    """The VLM: our MAGMA (a saved one, or the demo model pre-trained by our code), or any HF VLM with LoRA."""

    kind: Literal["magma", "hf"] = "magma"
    """Backend: our MAGMA implementation, or an `AutoModelForImageTextToText` VLM with LoRA (peft)."""
    path: str | None = None
    """magma: directory of a saved model (save_pretrained + tokenizer; `illume convert-magma` writes one), None:
    the cached demo base model. hf: a hub name or local directory (`HFVLM.save` output keeps its LoRA).
    `illume:demo` (DEMO_MODEL_PATH), either kind: the demo base model of that kind, pre-trained on the shapes
    world for these settings by `illume pretrain` (shipped for configs/demo.yaml and configs/demo_hf.yaml;
    hf: a tiny Qwen2-VL with its chat template, sized by `lm` and `vision`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf: dtype the weights load in ("auto": as stored)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """hf: the LoRA adapters that train (the `adapters` of ILLUME's recipe)."""
    cache_dir: str | None = None
    """Where the pre-trained demo base model is cached (keyed by a hash of its settings); None: the per-user
    cache (`user_cache_dir`), so every working folder finds the same model."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image encoder sizes of a model built from this config (the demo model, `illume plan`); a saved model
    (`path`) brings its own config.json."""
    lm: LMConfig = field(default_factory=LMConfig)
    """Language model sizes (as `vision`)."""
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    """Adapter places and sizes (as `vision`)."""
    prefix_dropout: float = 0.1
    """Dropout on the projected image prefix."""

    RANGES: ClassVar = {"prefix_dropout": Range(0, 1, high_open=True)}

    def names_demo_model(self) -> bool:
        """Whether this is the demo base model: `path: illume:demo`, or a MAGMA without a path."""
        return self.path == DEMO_MODEL_PATH or (self.path is None and self.kind == "magma")


DEMO_MODEL_PATH = "illume:demo"
"""The `model.path` that names the demo base model of `model.kind` (illume.demo.pretrain.ensure_demo_model)."""


@dataclass
class PromptConfig:
    """How prompts are written for the model: ILLUME's plain completion prompt, or the model's own chat
    template (illume.prompts.ChatStyle; the stored prompts are the plain text either way)."""

    format: Literal["plain", "chat"] | None = None
    """plain: `<image> Q: {question} A: {answer}, seeing that` continued as it is (MAGMA, base models); chat: a
    user turn (image, `explain`) and an assistant turn starting with `connective`, rendered by the processor's
    `apply_chat_template`, training labels on the assistant's tokens only. None: chat when the HF processor has
    a chat template, else plain."""
    ask: str = "Q: {question} A:"
    """chat: the user's turn asking for the answer (slot {question})."""
    explain: str = "Q: {question} A: {answer} Explain why."
    """chat: the user's turn asking for a rationale (slots {question}, {answer})."""
    connective: str = "{answer}, seeing that"
    """chat: how the assistant's turn starts; the rationale continues it (slot {answer})."""

    def __post_init__(self) -> None:
        for key, slots in (("ask", {"question"}), ("explain", {"question", "answer"}), ("connective", {"answer"})):
            template = getattr(self, key)
            try:
                template.format(**dict.fromkeys(slots, ""))
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"prompt.{key} may only use the slots {sorted(slots)}: {template!r} ({error})") \
                    from error


@dataclass
class PretrainConfig:
    """Pre-training of the demo base model on shapes-world captions and answers (never rationales)."""

    num_steps: int = 1200
    """Optimizer steps."""
    batch_size: int = 64
    """Rows per step."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    caption_fraction: float = 0.5
    """Share of rows that are captions; the rest are question/answer rows and generic text."""
    generic_fraction: float = 0.1
    """Share of rows that are generic text-only `X, seeing that Y` sentences, never about an image."""
    seed: int = 0
    """Seed of initialisation and data order."""

    RANGES: ClassVar = {"num_steps": COUNT, "batch_size": COUNT, "learning_rate": POSITIVE, "weight_decay": AT_LEAST_0,
                        "warmup_steps": AT_LEAST_0, "caption_fraction": FRACTION, "generic_fraction": FRACTION}

    def __post_init__(self) -> None:
        check_ranges(self, "pretrain.")
        if self.caption_fraction + self.generic_fraction > 1:
            raise ValueError(f"pretrain.caption_fraction + pretrain.generic_fraction must be <= 1 (the rest are "
                             f"question/answer rows), got {self.caption_fraction} + {self.generic_fraction}")


@dataclass
class PoolModelConfig:
    """One more model whose candidates join every train item's list (`sample.pool`, Silkie's pool of models).
    Exactly one of `round`, `adapters` and `model` says which model it is."""

    name: str = ""
    """How the store records its candidates' writer (`Candidate.model`; never shown on the annotation page);
    "" derives one: `round_N`, the adapters file's stem and folder, or `kind:path`."""
    round: int | None = None
    """This run's policy as it was after round N (RUN_DIR/round_NN/adapters.safetensors), from round N+1 on."""
    adapters: str | None = None
    """An adapters.safetensors file (another run's round) for this run's base model."""
    model: ModelConfig | None = None
    """Another VLM (as `model`, e.g. kind: hf, path: ...), loaded for the pool's sampling and then released."""

    RANGES: ClassVar = {"round": AT_LEAST_0}


@dataclass
class VLLMConfig:
    """A vLLM server that draws the candidates (`sample.engine: vllm`, illume.vllm_engine): one that runs
    already (`url`), or one illume starts from another Python environment (`python`) and stops at the end.
    Unverified until it has run on a GPU with real vLLM (docs/scaling.md, "Sampling with vLLM")."""

    url: str | None = None
    """Base URL of a running vLLM OpenAI-compatible server (http://HOST:PORT), started with `--enable-lora` and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, that can read this run's folder (it loads each round's LoRA from
    there); None: illume starts one with `python`."""
    python: str | None = None
    """The Python of a separate environment where vLLM is installed (scripts/vllm_env.sh makes one), so that
    vLLM's pins never meet ours; illume runs `PYTHON -m vllm.entrypoints.openai.api_server` with it."""
    port: int = 0
    """Port of the server illume starts, on 127.0.0.1; 0: a free one."""
    server_args: list[str] = field(default_factory=list)
    """More arguments for the server illume starts (e.g. ["--dtype", "bfloat16", "--gpu-memory-utilization",
    "0.5"]); illume sets --model, --host, --port, --enable-lora and --max-lora-rank itself."""
    startup_timeout: float = 900.0
    """Seconds to wait for the started server's `GET /health` (it loads the model and captures CUDA graphs)."""
    request_timeout: float = 600.0
    """Seconds one request may take."""
    max_concurrency: int = 32
    """Examples whose requests are in flight at once (the server batches them; its prefix cache shares each
    prompt's image among its K rationales)."""
    retries: int = 3
    """Tries of a request that failed on the connection or with a server error (5xx), a second apart and
    doubling; a refused request (4xx) is not tried again."""

    RANGES: ClassVar = {"port": Range(0, 65_535), "startup_timeout": POSITIVE, "request_timeout": POSITIVE,
                        "max_concurrency": COUNT, "retries": COUNT}


@dataclass
class SampleConfig:
    """Sampling the answer and K candidate rationales per example."""

    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.8])
    """Temperatures; `samples_per_temperature` rationales are drawn at each (the paper: 5 x [0.3, 0.8])."""
    samples_per_temperature: int = 5
    """Draws per temperature; K = len(temperatures) * samples_per_temperature."""
    max_new_tokens: int = 24
    """Longest rationale in tokens (the paper: 100 with GPT-J's tokenizer)."""
    answer_max_new_tokens: int = 6
    """Longest answer in tokens."""
    top_k: int | None = None
    """Rationales (and a sampled answer) are drawn from the k most probable tokens of logits / T only
    (illume.models.logits_filters); 0 or None: no top-k filter. ILLUME: int(0.1 x vocabulary), 5040 for
    GPT-J."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of most probable tokens of logits / T whose probability
    reaches top_p (applied after top_k); 1.0: off. MAGMA's default is 0.9, but its filter never cuts
    (README, "Generation recipes")."""
    answer_temperature: float = 0.0
    """Temperature of the model's own answer: 0 greedy; > 0 a draw (top_k / top_p applied) seeded from the
    example's seed. ILLUME answers at 0.01, which in practice equals greedy."""
    batch_size: int = 32
    """Examples per batch (each expands to K rows)."""
    seed: int = 0
    """Base seed; each example's stream is derived from it, the round and the example id."""
    pool: list[PoolModelConfig] = field(default_factory=list)
    """Train rounds only: more models whose K candidates per item join the policy's (duplicates dropped), each
    stored with the model that wrote it (illume.pool). Empty: the policy alone, as the paper."""
    engine: Literal["generate", "vllm"] = "generate"
    """What draws the candidates (illume.sampling.ENGINES): `generate`, the model in this process
    (`VLM.decode`); `vllm`, a vLLM server through its OpenAI-compatible API (`sample.vllm`; model.kind=hf only),
    with each round's LoRA loaded into it. The stored fields are the same; the draws are not (vLLM's own
    sampler and kernels), so a run keeps one engine."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM server (`engine: vllm`)."""

    RANGES: ClassVar = {"temperatures": AT_LEAST_0, "samples_per_temperature": COUNT, "max_new_tokens": COUNT,
                        "answer_max_new_tokens": COUNT, "top_k": AT_LEAST_0, "top_p": Range(0, 1, low_open=True),
                        "answer_temperature": AT_LEAST_0, "batch_size": COUNT}

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ValueError("sample.temperatures is empty: give at least one temperature (0: greedy)")
        check_ranges(self, "sample.")  # the pool's models too


@dataclass
class CriticConfig:
    """Who judges the candidates. `simulated` stands in for people in the paper's experiments."""

    kind: Literal["simulated", "person", "reward", "hybrid", "judge"] = "simulated"
    """Critic (illume.critic_registry.CRITICS): `simulated` accepts a candidate whose metric against any reference reaches the threshold;
    `person`: people judge in the annotation page (or the terminal) and the loop waits for them;
    `reward`: the reward model judges (after `reward.people_rounds` rounds judged by people);
    `hybrid`: the reward model decides the confident items, people the rest;
    `judge`: an AI judge (a VLM, `judge.*`) judges every item (after `judge.people_rounds` rounds by people)."""
    people_kind: Literal["simulated", "person"] = "simulated"
    """Who the people are in reward/hybrid/judge runs, as an annotator kind: `simulated` (the simulated critic
    standing in for them) or `person` (real people, as critic.kind=person: `critic.ui`). Which annotator kinds
    count as people's when judgments are read is another setting, `feedback.people`."""
    ui: Literal["web", "terminal"] = "web"
    """Where people judge (critic.kind=person, or critic.people_kind=person): the annotation page (`illume
    annotate`) or a prompt in this terminal."""
    wait: bool = True
    """critic.kind=person, web: wait until the round is judged (True) or exit and continue on the next run (False)."""
    poll_seconds: float = 5.0
    """critic.kind=person, web: how often the waiting loop checks the store."""
    annotator: str | None = None
    """critic.kind=person, terminal: the person's name (asked once when not set)."""
    metric: Literal["rouge_l", "bleu_1", "bleu_2", "bleu_3", "bleu_4"] = "rouge_l"
    """Per-candidate metric of the simulated critic (pycocoevalcap's, on its tokenisation)."""
    threshold: float = 0.7
    """Accept when the metric against any single reference is >= this (the paper: ROUGE-L >= 0.7)."""

    # The metrics score in [0, 1]: a threshold above 1 accepts nothing and the run would stop after a round.
    RANGES: ClassVar = {"poll_seconds": POSITIVE, "threshold": FRACTION}

    def __post_init__(self) -> None:
        check_ranges(self, "critic.")


JUDGE_SLOTS = ("question", "answer", "rationale", "context")
"""The slots a judge prompt (`judge.prompt`) may have; {answer} and {rationale} are required."""

JUDGE_PROMPTS = {
    "yes_no": "{context} Q: {question} A: {answer}, seeing that {rationale}. Q: does this reason explain the "
              "answer from what is visible? A:",
    "likelihood": "{context} Q: {question} A: {answer}, seeing that {rationale}",
}
"""The default judge prompt of each `judge.method`."""


@dataclass
class JudgeConfig:
    """The AI judge (critic.kind=judge, reward/judge.py): a VLM scores each candidate rationale.

    configs/demo_rlaif.yaml uses `likelihood` with `context: references` (VLM-RLAIF's context-aware scoring;
    its header has the judge's measured agreement): the demo's word-level tokenizer has "yes" and "no", so
    `yes_no` runs too, but the demo model never learnt to judge in words.
    """

    model: ModelConfig | None = None
    """The judge's VLM (a ModelConfig section: an HF VLM such as Qwen2-VL, or a MAGMA); None: the run's own
    `model` as loaded at the start (the base model, not the round's tuned one)."""
    method: Literal["yes_no", "likelihood"] = "likelihood"
    """yes_no: P(" yes") / (P(" yes") + P(" no")) of the token after the prompt; likelihood: the mean
    per-token log-probability of the rationale (and EOS) after the prompt's text before {rationale}."""
    prompt: str | None = None
    """Template with {answer}, {rationale} and optionally {question}, {context}; for likelihood it must end
    with {rationale} (the part scored). None: the method's default (`JUDGE_PROMPTS`)."""
    context: Literal["none", "references"] = "none"
    """What fills {context}: nothing, or the example's reference explanations (the prompt needs the slot)."""
    threshold: float | None = None
    """Accept a candidate whose score is >= this when no people's judgment of earlier rounds exists to
    calibrate on; None: 0.5 for yes_no, -1.0 (mean log-prob) for likelihood."""
    target_precision: float = 0.9
    """With people's judgments of earlier rounds, the threshold is the lowest judge score whose precision
    against them reaches this (reward.evaluate.calibrate_threshold)."""
    people_rounds: int = 0
    """Rounds judged by people (`critic.people_kind`) before the judge takes over (0: the judge judges all)."""
    batch_size: int = 32
    """Candidates scored per forward pass."""

    RANGES: ClassVar = {"target_precision": Range(0, 1, low_open=True), "people_rounds": AT_LEAST_0,
                        "batch_size": COUNT}

    def template(self) -> str:
        """The prompt template in use."""
        return self.prompt if self.prompt is not None else JUDGE_PROMPTS[self.method]

    def default_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.5 if self.method == "yes_no" else -1.0

    def __post_init__(self) -> None:
        import string

        template = self.template()
        try:
            slots = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            raise ValueError(f"judge.prompt is not a valid template ({error}): {template!r}") from error
        unknown = slots - set(JUDGE_SLOTS)
        if unknown:
            raise ValueError(f"judge.prompt has unknown slot(s) {sorted(unknown)}; the slots are "
                             f"{', '.join('{' + s + '}' for s in JUDGE_SLOTS)}: {template!r}")
        for needed in ("answer", "rationale"):
            if needed not in slots:
                raise ValueError(f"judge.prompt has no {{{needed}}} slot: {template!r}")
        if self.method == "likelihood" and not template.endswith("{rationale}"):
            raise ValueError(f"judge.prompt must end with {{rationale}} for judge.method=likelihood (the "
                             f"rationale is the part scored): {template!r}")
        if self.context != "none" and "context" not in slots:
            raise ValueError(f"judge.context={self.context} but judge.prompt has no {{context}} slot: {template!r}")
        check_ranges(self, "judge.")  # judge.model too
        if self.method == "yes_no" and self.threshold is not None and not FRACTION.allows(self.threshold):
            raise ValueError(f"judge.threshold must be in [0, 1] for judge.method=yes_no (a probability), "
                             f"got {self.threshold}")
        if self.method == "likelihood" and self.threshold is not None and self.threshold > 0:
            raise ValueError(f"judge.threshold must be <= 0 for judge.method=likelihood (a mean log-probability), "
                             f"got {self.threshold}")


@dataclass
class FeedbackConfig:
    """How judgments become verdicts (the rules: illume.feedback.verdicts)."""

    aggregate: str = "majority"
    """How several annotators' judgments of one item combine, per candidate: `majority` (accepted if more
    accept than reject, rejected if more reject; a tie is contested and left out), `any` (one accept is
    enough) or `unanimous` (accepted only if nobody rejects). With one annotator per item all three agree."""
    people: list[str] = field(default_factory=lambda: ["person", "simulated"])
    """Annotator kinds whose judgments count as people's: the reward model learns from them (unless
    `reward.learn_from` says otherwise) and results.json's human_judgments counts them (that key keeps its
    name: results.json is read by scripts and older runs). The default is
    `illume.feedback.verdicts.PEOPLE`; adding "judge" counts an AI judge's verdicts as people's."""


@dataclass
class AnnotateConfig:
    """The annotation page people critique in (`illume annotate`)."""

    host: str = "127.0.0.1"
    """Interface to bind; anything but loopback requires an access token."""
    port: int = 8765
    """TCP port of the page."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host names (the `Host` header) the page answers besides the bound host's own (loopback names for a
    loopback bind; this machine's names and addresses for a wildcard bind), e.g. the name of a reverse proxy;
    "*.example.org" allows a domain's hosts. Other hosts get 400 (guards a loopback page against DNS
    rebinding)."""
    max_body_bytes: int = 65_536
    """Largest request body the server reads; a larger one is refused (413) before it is read."""
    annotations_per_item: int = 1
    """Judgments wanted per item, each by a different person."""
    lease_seconds: float = 300.0
    """An item handed to a browser that went away returns to the pool after this many seconds."""
    assist: bool = False
    """Order candidates by the run's latest reward model and pre-check its confident accepts."""
    corrections: bool = False
    """Let a person who finds that none fits write the rationale (or edit a candidate into it): stored with
    their judgment, trained on as accepted (illume/feedback/verdicts.py, rule 8)."""
    guidelines: str = (
        "Tick every rationale that explains the answer with what is visible in the image. "
        "If none does, choose 'none fits'."
    )
    """Guidelines shown on the page."""
    order: Literal["stored", "random", "uncertainty"] = "stored"
    """Which items people get first (`illume.critics.ITEM_ORDERS`): `stored` (the order sampled), `random` (a
    seeded shuffle per round) or `uncertainty` (critic.kind=hybrid: the items whose reward-model decision is
    least certain, by `reward.uncertainty`; rounds before a reward model exists keep the stored order)."""
    budget_per_round: int | None = None
    """critic.kind=hybrid: people judge this many items per round from `reward.people_rounds` on, the first in
    `annotate.order`, and the reward model decides all the others (replaces `reward.hybrid_band`); None: the
    band rule. With `reward.people_rounds: 0`, round 0 too: people judge a seeded draw of N items and a reward
    model fitted on them decides the rest (`reward.critic.budgets_first_round`)."""

    RANGES: ClassVar = {"port": PORT, "annotations_per_item": COUNT, "lease_seconds": POSITIVE,
                        "budget_per_round": AT_LEAST_0, "max_body_bytes": Range(1024)}

    def __post_init__(self) -> None:
        check_ranges(self, "annotate.")


@dataclass
class RewardConfig:
    """The reward model learned from people's selections (reward/)."""

    people_rounds: int = 1
    """critic.kind=reward or hybrid: rounds judged by people (`critic.people_kind`) before the reward model takes
    over. 0 needs a `reward.checkpoint`, or (hybrid) `annotate.budget_per_round`."""
    include_reference_pairs: bool = True
    """Pair the reference explanation (chosen) with the candidates of "none fits" items (rejected)."""
    heldout_fraction: float = 0.2
    """Share of judged examples held out (by example, never by pair) to evaluate and calibrate."""
    margin: float = 0.0
    """Bradley-Terry margin m in -log sigmoid(r_chosen - r_rejected - m)."""
    center_coef: float = 0.01
    """Weight of mean((r_chosen + r_rejected)^2), keeping rewards centred at 0 (0: off)."""
    num_epochs: int = 3
    """Epochs over the pairs."""
    batch_size: int = 16
    """Pairs per step."""
    learning_rate: float = 1e-3
    """Constant AdamW learning rate of adapters and head."""
    target_precision: float = 0.9
    """The accept threshold is the lowest score whose held-out precision reaches this."""
    below_target: Literal["threshold", "reject"] = "threshold"
    """What the reward or hybrid critic accepts when no threshold reached `target_precision` on the held-out
    judgments (few of them, early rounds of a small budget): `threshold`, at the best threshold found (its
    held-out precision is in the round's row); `reject`, nothing (the items it decides are none-fits, so only
    people's accepts train; a model without held-out figures counts as below)."""
    hybrid_band: float = 1.0
    """critic.kind=hybrid: items with a candidate scored within this distance of the threshold go to people."""
    learn_from: list[str] | None = None
    """Annotator kinds whose judgments the reward model learns from; None: `feedback.people`. ["judge"]: from
    the AI judge's verdicts (RLAIF, configs/demo_rlaif.yaml) without counting them as people's."""
    checkpoint: str | None = None
    """A saved reward model (a folder with reward_model.json: another run's RUN_DIR/reward/round_NN, or
    `illume reward train`'s RUN_DIR/reward) to use instead of fitting one on this run's judgments. It must have
    been fitted on this run's base model: checked before any model loads."""
    seed: int = 0
    """Seed of the split, initialisation and data order."""
    uncertainty: str = "ensemble"
    """How uncertain the reward model's decision on an item is, for annotate.order=uncertainty (a key of
    `reward.uncertainty.UNCERTAINTY`): `ensemble` (the share of `ensemble_size` bootstrap heads that disagree
    with its decision) or `margin` (closeness to the threshold: the band rule's own ranking)."""
    ensemble_size: int = 8
    """reward.uncertainty=ensemble: heads fitted on bootstrap resamples of the training pairs."""

    RANGES: ClassVar = {"people_rounds": AT_LEAST_0, "heldout_fraction": Range(0, 1, low_open=True, high_open=True),
                        "margin": AT_LEAST_0, "center_coef": AT_LEAST_0, "num_epochs": COUNT, "batch_size": COUNT,
                        "learning_rate": POSITIVE, "target_precision": Range(0, 1, low_open=True),
                        "hybrid_band": AT_LEAST_0, "ensemble_size": COUNT}

    def __post_init__(self) -> None:
        check_ranges(self, "reward.")


@dataclass
class TrainConfig:
    """Selection fine-tuning on the accepted rationales (adapters only, HF Trainer)."""

    num_epochs: int = 3
    """Epochs per round; the epoch with the best val score is kept (the paper: 5)."""
    batch_size: int = 32
    """Rows per device per step."""
    gradient_accumulation_steps: int = 1
    """Steps accumulated per optimizer update."""
    learning_rate: float = 1e-3
    """Constant AdamW learning rate (the paper: 1.12e-3 at batch 256)."""
    weight_decay: float = 0.2
    """AdamW weight decay (the paper: 0.2)."""
    adam_beta2: float = 0.99
    """AdamW beta2 (the paper: betas (0.9, 0.99))."""
    rationale_weight: float | None = None
    """w in loss = answer CE + w * rationale CE; None: #answer-only rows / #rationale rows, as the paper."""
    num_answer_only_rows: int | None = None
    """Answer-only rows for examples without an accepted rationale; None: one for each such example."""
    train_prefix: bool = False
    """Also train the image prefix projection (MAGMA's `image_prefix.proj`/`ln`)."""
    select_metric: Literal["cider", "rouge_l", "bleu_4", "meteor", "answer_accuracy"] = "cider"
    """Val score that picks the best epoch (and detects a plateau)."""
    deepspeed: str | None = None
    """Path of a DeepSpeed JSON config; set it to train with ZeRO (e.g. configs/deepspeed/zero2.json)."""
    bf16: bool = False
    """bfloat16 mixed precision (GPUs)."""
    fp16: bool = False
    """float16 mixed precision (GPUs; the paper trained in fp16)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 0
    """Seed of data order and dropout."""
    report_to: list[str] | str = "none"
    """Experiment trackers every trainer (SFT, DPO, KTO, GRPO, reward model, pre-training) and the loop's round
    table report to: the HF Trainer's integration names (tensorboard, wandb, mlflow, trackio, ...), a list of
    them, "none" or "all" (those installed); TensorBoard files go to RUN_DIR/tracking (illume.tracking)."""

    RANGES: ClassVar = {"num_epochs": COUNT, "batch_size": COUNT, "gradient_accumulation_steps": COUNT,
                        "learning_rate": POSITIVE, "weight_decay": AT_LEAST_0, "adam_beta2": Range(0, 1, high_open=True),
                        "rationale_weight": AT_LEAST_0, "num_answer_only_rows": AT_LEAST_0}

    def __post_init__(self) -> None:
        check_ranges(self, "train.")
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16 are both true: choose one mixed precision")


@dataclass
class DPOPolicyConfig:
    """policy.kind=dpo: accepted vs rejected rationales of one item as pairs (policies/dpo.py; TRL's names)."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """DPO loss, by TRL's names (DPOConfig.loss_type)."""
    beta: float = 0.1
    """Strength of the pull towards the reference model (TRL's beta; for ipo the regulariser tau)."""
    label_smoothing: float = 0.0
    """Probability that a preference label is wrong: cDPO for sigmoid, robust DPO for robust (in [0, 0.5))."""
    sft_weight: float = 0.0
    """Weight of an added NLL loss on the chosen rationale (TRL's loss_type=[..., "sft"]; RPO); 0: none."""
    answer_weight: float = 1.0
    """Weight of an NLL term on answer-only rows (`Q: q A: a<eos>`, one attached to each pair, cycling through
    the train questions) that keeps answer accuracy from drifting, as selection-SFT's answer rows do; 0: none."""
    reference_as_chosen: bool = False
    """For items where nothing was accepted, pair a reference explanation (chosen) with each candidate."""

    RANGES: ClassVar = {"beta": POSITIVE, "label_smoothing": Range(0, 0.5, high_open=True),
                        "sft_weight": AT_LEAST_0, "answer_weight": AT_LEAST_0}


@dataclass
class KTOPolicyConfig:
    """policy.kind=kto: each judged rationale on its own, accepted (desirable) or rejected (policies/kto.py)."""

    beta: float = 0.1
    """Strength of the pull towards the reference model (TRL's beta)."""
    desirable_weight: float = 1.0
    """Weight of the accepted rationales' losses."""
    undesirable_weight: float | None = None
    """Weight of the rejected ones; None: #accepted / #rejected, so both sides weigh the same in total."""
    answer_weight: float = 1.0
    """Weight of an NLL term on answer-only rows (one attached to each labelled row), as `dpo.answer_weight`."""

    RANGES: ClassVar = {"beta": POSITIVE, "desirable_weight": AT_LEAST_0, "undesirable_weight": AT_LEAST_0,
                        "answer_weight": AT_LEAST_0}


@dataclass
class GRPOPolicyConfig:
    """policy.kind=grpo: online RL on G rationales sampled per train question, scored by `reward_sources`
    (policies/grpo.py; TRL's GRPOTrainer for model.kind=hf, policies/grpo_trl.py)."""

    num_generations: int = 8
    """Rationales drawn per train question each round (G; TRL's num_generations), before duplicates are merged."""
    temperature: float = 0.8
    """The temperature the G rationales are drawn at."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "dr_grpo"
    """Loss normalisation, by TRL's names: grpo (each sequence's token mean, then the batch mean: a length bias),
    bnpo (token mean over the batch), dr_grpo (token sum / (sequences x max completion length): Dr. GRPO, no
    length bias and independent of how many answer rows share the batch; the default)."""
    beta: float = 0.1
    """Weight of the k3 KL term towards the round's starting weights (TRL's beta; its default is 0)."""
    epsilon: float = 0.2
    """Clipping range of the probability ratio (TRL's epsilon, low and high alike)."""
    iterations: int = 2
    """Passes over the round's samples (TRL's num_iterations; epochs, the best on val is kept)."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by its std (TRL's scale_rewards="group"; False: "none")."""
    baseline: Literal["group", "rloo"] = "group"
    """The advantage baseline: the group's mean ("group", then `scale_rewards`), or RLOO's leave-one-out mean of
    the other samples of the question ("rloo", never scaled)."""
    answer_weight: float = 1.0
    """Weight of the NLL term on answer-only rows (`Q: q A: a<eos>`, one per train question) that keeps answer
    accuracy from drifting; 0: none."""
    accepted_weight: float = 0.0
    """Weight of an NLL term on every rationale accepted so far (selection-SFT's rows, an anchor as RPO adds to
    DPO); 0: none."""
    trainer: Literal["auto", "illume", "trl"] = "auto"
    """Who samples and optimises (policies.grpo.GRPO_TRAINERS): `illume`, our sampler once per round and our
    loss (policies/grpo.py), for every backend; `trl`, TRL's GRPOTrainer, online (policies/grpo_trl.py),
    model.kind=hf only; `auto`, TRL's for model.kind=hf and ours for the others. Both on one HF model show
    whether a difference is the method or our implementation (scripts/compare.py's hf-grpo and hf-grpo-trl)."""
    reward_sources: dict[str, float] = field(default_factory=lambda: {"reward_model": 1.0})
    """reward = sum of weight x source (keys of `policies.grpo.REWARDS`: reward_model, the reward model fitted
    on people's judgments of this round and earlier; simulated, ROUGE-L against the references). Set a weight
    to 0 to switch a source off (overrides merge into this mapping)."""

    RANGES: ClassVar = {"num_generations": Range(2),  # a group needs two samples
                        "temperature": POSITIVE, "beta": AT_LEAST_0,
                        "epsilon": Range(0, 1, low_open=True, high_open=True), "iterations": COUNT,
                        "answer_weight": AT_LEAST_0, "accepted_weight": AT_LEAST_0}


@dataclass
class PolicyConfig:
    """How the accepted/rejected feedback tunes the model each round (policies/; sft = ILLUME's selection-SFT).
    Each preference algorithm's settings are in its own section: `policy.dpo.*`, `policy.kto.*`, `policy.grpo.*`.

    dpo/kto use train.* for epochs, batch size, weight decay, precision, DeepSpeed and the kept epoch; the
    reference model is the model as it was before the round (its log-probabilities are computed once,
    before the round's training, as TRL's `precompute_ref_log_probs=True` does).
    """

    kind: Literal["sft", "dpo", "kto", "grpo"] = "sft"
    """The policy (policies.registry.POLICIES): sft: selection fine-tuning on accepted rationales; dpo: accepted
    vs rejected pairs; kto: unpaired labels; grpo: online RL on G sampled rationales per question scored by
    `grpo.reward_sources` (policies/grpo.py)."""
    learning_rate: float | None = None
    """Learning rate of dpo/kto/grpo; None: train.learning_rate."""
    rounds: Literal["all", "latest"] = "latest"
    """DPO/KTO: train on the judgments of the round just judged (on-policy iterative DPO/KTO) or of every round
    so far, as ILLUME's SFT does; on the demo "all" drifts over rounds (docs/results.md)."""
    seed: int = 0
    """Seed of the order in which answer-only rows ride along (DPO/KTO) and of KTO's mismatched (KL) completions."""
    dpo: DPOPolicyConfig = field(default_factory=DPOPolicyConfig)
    kto: KTOPolicyConfig = field(default_factory=KTOPolicyConfig)
    grpo: GRPOPolicyConfig = field(default_factory=GRPOPolicyConfig)

    RANGES: ClassVar = {"learning_rate": POSITIVE}

    def __post_init__(self) -> None:
        check_ranges(self, "policy.")
        if self.kind == "grpo" and not any(self.grpo.reward_sources.values()):
            raise ValueError("policy.kind=grpo needs a reward: policy.grpo.reward_sources has no source with a "
                             f"non-zero weight ({dict(self.grpo.reward_sources)}); e.g. policy.grpo.reward_sources."
                             "reward_model=1.0 or policy.grpo.reward_sources.simulated=1.0")


@dataclass
class LoopConfig:
    """When the ILLUME loop stops."""

    num_rounds: int = 4
    """Most rounds (sample -> critique -> tune -> evaluate)."""
    stop_when_nothing_new: bool = True
    """Stop after a round whose critique accepted no rationale that was not in the training set already."""
    patience: int | None = None
    """Stop when the val `train.select_metric` has not improved for this many rounds (None: never)."""
    min_improvement: float = 0.0
    """Smallest rise of the val score that counts as an improvement."""
    allow_changed_settings: bool = False
    """Continue an existing run although settings that change results differ from its config.yaml (refused
    otherwise, listing them); config.yaml then takes the new settings and RUN_DIR/settings_changes.jsonl
    records the change and the round it applies from (illume.resume)."""

    RANGES: ClassVar = {"num_rounds": COUNT, "patience": COUNT, "min_improvement": AT_LEAST_0}

    def __post_init__(self) -> None:
        check_ranges(self, "loop.")


@dataclass
class RunConfig:
    """A whole run: where it writes and every component's settings."""

    name: str = "demo"
    """Run name; the run directory is output_dir/name."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Global seed."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    store_url: str | None = None
    """SQLAlchemy URL of the feedback store; None: a SQLite file feedback.db in the run directory."""

    def __post_init__(self) -> None:
        # Every section with one place checked itself when it was made; the model settings (which appear in
        # several places: model, judge.model, sample.pool[i].model) are checked where they sit.
        check_ranges(self.model, "model.")
        if self.model.kind == "magma" and self.prompt.format == "chat":
            raise ValueError("prompt.format=chat needs a chat template: model.kind=magma has none (use plain)")
        if self.sample.engine == "vllm":
            # vLLM serves HF checkpoints and loads PEFT LoRA; our MAGMA is neither, and a trained projector or a
            # pool entry's other base model is not something one server with per-round LoRA can draw from.
            if self.model.kind != "hf":
                raise ValueError(f"sample.engine=vllm needs model.kind=hf (vLLM serves Hugging Face models), got "
                                 f"model.kind={self.model.kind}; use sample.engine=generate")
            if self.train.train_prefix:
                raise ValueError("sample.engine=vllm cannot draw with a trained multimodal projector "
                                 "(train.train_prefix=true): vLLM loads LoRA only; use sample.engine=generate")
            others = [i for i, entry in enumerate(self.sample.pool) if entry.model is not None]
            if others:
                raise ValueError(f"sample.engine=vllm serves the run's own base model: sample.pool[{others[0]}]"
                                 ".model names another; use sample.engine=generate, or pool rounds/adapters")
        if not self.name.strip() or self.name.strip() in (".", ".."):
            raise ValueError(f"name must name the run's folder inside output_dir, got {self.name!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def user_cache_dir() -> Path:
    """The per-user cache folder, read from the environment when called (as Hugging Face finds its cache):
    $ILLUME_CACHE, else $XDG_CACHE_HOME/illume, else ~/.cache/illume."""
    if os.environ.get("ILLUME_CACHE"):
        return Path(os.environ["ILLUME_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "illume"
    return Path.home() / ".cache" / "illume"


def cache_root(model: ModelConfig) -> Path:
    """The folder models are cached in: `model.cache_dir` when set, else the per-user cache. Resolved here, at
    use time, so that a saved config.yaml holds no machine's path unless the user chose one."""
    return Path(model.cache_dir).expanduser() if model.cache_dir is not None else user_cache_dir()


def dotted_keys(values: dict, prefix: str = "") -> dict:
    """A nested config dict by dotted key, as overrides name them: {"sample": {"seed": 0}} -> {"sample.seed":
    0}; lists stay values."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


BASE_KEY = "base"
"""A YAML file's `base: other.yaml` (relative to the file) names the config it varies: the base's values are
merged first, then the file's own, so a variant states only what differs (configs/demo_*.yaml)."""


def _file_layers(path: Path, chain: tuple[Path, ...]) -> list:
    """The YAML layers of `path`, its base's (recursively) first; `chain` holds the files that named it."""
    if not path.is_file():
        named = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{named}")
    if path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: the '{BASE_KEY}' keys form a cycle: {' -> '.join(map(str, (*chain, path)))}")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return [(path, loaded)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be the path of another config file, not {base!r}")
    return [*_file_layers(path.parent / base, (*chain, path)), (path, loaded)]


RENAMED_POLICY_KEYS: dict[str, dict[str, str]] = {
    "loss_type": {"dpo": "dpo.loss_type"},
    "beta": {"dpo": "dpo.beta", "kto": "kto.beta", "grpo": "grpo.beta"},
    "label_smoothing": {"dpo": "dpo.label_smoothing"},
    "sft_weight": {"dpo": "dpo.sft_weight", "grpo": "grpo.accepted_weight"},
    "answer_weight": {"dpo": "dpo.answer_weight", "kto": "kto.answer_weight"},
    "reference_as_chosen": {"dpo": "dpo.reference_as_chosen"},
    "desirable_weight": {"kto": "kto.desirable_weight"},
    "undesirable_weight": {"kto": "kto.undesirable_weight"},
    "num_generations": {"grpo": "grpo.num_generations"},
    "grpo_temperature": {"grpo": "grpo.temperature"},
    "grpo_loss_type": {"grpo": "grpo.loss_type"},
    "epsilon": {"grpo": "grpo.epsilon"},
    "grpo_iterations": {"grpo": "grpo.iterations"},
    "grpo_scale_rewards": {"grpo": "grpo.scale_rewards"},
    "grpo_baseline": {"grpo": "grpo.baseline"},
    "grpo_answer_weight": {"grpo": "grpo.answer_weight"},
    "reward_sources": {"grpo": "grpo.reward_sources"},
}
"""The flat `policy.*` keys of configs before the per-algorithm sections: old key -> {policy.kind: new key under
`policy.`}. Refused in a config file or an override (with what to write instead); moved in a run folder's
config.yaml that illume wrote before (`load_run_config`), into the section of that run's policy.kind."""


RENAMED_KEYS: dict[str, str] = {
    "critic.people": "critic.people_kind",
    "reward.human_rounds": "reward.people_rounds",
    "judge.human_rounds": "judge.people_rounds",
}
"""Keys renamed so that one word names one thing (issue 26: people are `person`, and `feedback.people` is the
only `people` list): old dotted key -> new. Refused in a config file or an override (with the new name); moved
in a run folder's config.yaml that illume wrote before (`load_run_config`)."""

RENAMED_VALUES: dict[str, dict[str, str]] = {
    "critic.kind": {"human": "person"},
    "critic.people_kind": {"human": "person"},
}
"""Values renamed (issue 26: people judging are annotator kind `person` everywhere): dotted key (new name) ->
{old value: new value}. Refused and moved as RENAMED_KEYS are."""


def _section_of(layer: DictConfig, dotted: str) -> tuple[DictConfig | None, str]:
    """The mapping holding the dotted key in `layer` (None if the layer has no such section), and the key's name."""
    section, _, name = dotted.rpartition(".")
    parent = OmegaConf.select(layer, section, default=None) if section else layer
    return (parent if isinstance(parent, DictConfig) else None), name


def _renamed_value(layer: DictConfig, dotted: str) -> str | None:
    """The old value (RENAMED_VALUES) that `layer` sets `dotted` to, else None."""
    parent, name = _section_of(layer, dotted)
    if parent is None or name not in parent or OmegaConf.is_interpolation(parent, name):
        return None
    value = parent[name]
    return value if isinstance(value, str) and value in RENAMED_VALUES[dotted] else None


def _refuse_renamed(layer: DictConfig, where: str) -> None:
    policy = layer.get("policy")
    renamed = [key for key in policy if key in RENAMED_POLICY_KEYS] if isinstance(policy, DictConfig) else []
    if renamed:
        key = renamed[0]
        instead = " or ".join(f"policy.{new}" for new in RENAMED_POLICY_KEYS[key].values())
        raise ConfigError(f"{where}: key 'policy.{key}' was renamed (each algorithm has its own section): "
                          f"did you mean {instead}?")
    for old, new in RENAMED_KEYS.items():
        parent, name = _section_of(layer, old)
        if parent is not None and name in parent:
            raise ConfigError(f"{where}: key '{old}' was renamed: did you mean {new}?")
    for key, values in RENAMED_VALUES.items():
        value = _renamed_value(layer, key)
        if value is not None:
            raise ConfigError(f"{where}: key '{key}': the value '{value}' was renamed: did you mean "
                              f"{key}={values[value]}?")


def _upgrade_renamed(layer: DictConfig) -> None:
    """Move a run's renamed keys (RENAMED_KEYS) and values (RENAMED_VALUES) to their new names, and its flat
    policy keys into the section of its policy.kind (the other kinds never read them; a key that none of the
    run's kind reads goes to the first section that has it)."""
    for old, new in RENAMED_KEYS.items():
        parent, name = _section_of(layer, old)
        if parent is not None and name in parent:
            new_parent, new_name = _section_of(layer, new)
            value = parent.pop(name)
            if new_parent is None or new_name not in new_parent:  # a config with both: the new name's value
                OmegaConf.update(layer, new, value, merge=False)
    for key, values in RENAMED_VALUES.items():
        value = _renamed_value(layer, key)
        if value is not None:
            OmegaConf.update(layer, key, values[value], merge=False)
    policy = layer.get("policy")
    if not isinstance(policy, DictConfig):
        return
    kind = policy.get("kind", "sft")
    for key in [key for key in policy if key in RENAMED_POLICY_KEYS]:
        targets = RENAMED_POLICY_KEYS[key]
        section, name = targets.get(kind, next(iter(targets.values()))).split(".")
        value = policy.pop(key)
        if section not in policy:
            policy[section] = {}
        policy[section][name] = value


def _unknown_key_hint(key: str) -> str:
    """" (did you mean ...?)" for an unknown dotted key that is close to a known one, else ""."""
    known = dotted_keys(asdict(RunConfig()))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Merge defaults, a YAML file (after the file its `base` key names, if any) and `key.sub=value`
    overrides into a `RunConfig`.

    Raises:
        ConfigError: naming the file and the key for an unknown key (with the known keys it is close to, and
            for a renamed key what it is called now), a wrong type or a malformed override.
    """
    return _load(path, overrides, upgrade=False)


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """`load_config` of a run folder's config.yaml (what `save_config` wrote): a config that an earlier illume
    wrote with keys or values renamed since is read with them moved to their new place (RENAMED_POLICY_KEYS,
    RENAMED_KEYS, RENAMED_VALUES: `critic.kind: human` is read as `person`), so a run started before a rename
    continues and exports."""
    return _load(path, overrides, upgrade=True)


def _load(path: str | Path | None, overrides: list[str] | tuple[str, ...], upgrade: bool) -> RunConfig:
    schema = OmegaConf.structured(RunConfig)
    where = str(path) if path is not None else "defaults"
    try:
        layers = [schema]
        for file, layer in _file_layers(Path(path), ()) if path is not None else ():
            if upgrade:
                _upgrade_renamed(layer)
            else:
                _refuse_renamed(layer, str(file))
            layers.append(layer)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        if overrides:
            where = f"{where} + overrides {list(overrides)}"
            layers.append(OmegaConf.from_dotlist(list(overrides)))
            _refuse_renamed(layers[-1], f"overrides {list(overrides)}")
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        reason = str(error).splitlines()[0]
        if key and isinstance(error, ConfigKeyError) and "did you mean" not in reason.lower():
            reason += _unknown_key_hint(key)
        raise ConfigError(f"{where}: key '{key}': {reason}" if key else f"{where}: {reason}") from error
    except ValueError as error:  # a dataclass's __post_init__ check; its message names the key
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where}: {error}") from error


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (the first thing a run writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
