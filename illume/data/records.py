"""The records every stage passes along: examples in, candidate rationales out.

Plain dataclasses, so that the sampler, the critics, the feedback store and the exports agree on one shape
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from illume.data.errors import DatasetError, ImageNotFoundError


@dataclass
class Example:
    """One visual question with its answer(s) and reference explanations.

    `image` is either a path (loaded lazily by `load_image`) or an in-memory PIL image (the shapes world).
    """

    id: str
    """Stable identifier, unique within a dataset (used as the key in the feedback store)."""
    image: Path | Image.Image
    """Image file path, or the image itself."""
    question: str
    """The question, as asked."""
    answers: list[str]
    """Ground-truth answers; the first one is the canonical answer put into training prompts."""
    explanations: list[str] = field(default_factory=list)
    """Reference explanations (0..n) stating the visual evidence for the answer."""
    question_type: str = ""
    """Optional category (e.g. colour, count) for per-type reports."""
    source: str = ""
    """Where the example came from, e.g. `val.json:17`, for error messages."""

    @property
    def answer(self) -> str:
        """The canonical answer (the first one)."""
        return self.answers[0]


def load_image(example: Example) -> Image.Image:
    """Return the example's image in its own mode (RGB, L, P, RGBA, CMYK, ...), decoded, file closed.

    The mode is kept because converting to RGB is each backend's step, at the point its pipeline does it:
    MAGMA (CLIP's transform) resizes and crops first and converts after (illume.models.image_processing), which
    gives other pixels than converting first for palette, RGBA and CMYK images; the HF backend converts before
    its processor (illume.models.hf). An in-memory image (the shapes world) is returned as a copy, so a caller
    never changes the dataset's.

    Raises:
        ImageNotFoundError: the file does not exist (the message names the file and the row).
        DatasetError: the file cannot be decoded, or its mode cannot become RGB (the same), so the CLI reports a
            `data error:` line, and a `--verify` that passes means every backend can read the image.
    """
    if isinstance(example.image, Image.Image):
        return example.image.copy()
    path = Path(example.image)
    where = f" (row {example.source})" if example.source else ""
    if not path.is_file():
        raise ImageNotFoundError(f"image not found: {path}{where}")
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: a truncated file fails here, and the handle can close
            image.crop((0, 0, 1, 1)).convert("RGB")  # a mode PIL cannot make RGB fails here too, not mid-run
            return image.copy()  # a plain image that no longer refers to the (closed) file
    except Exception as error:  # PIL raises several types for corrupt files
        raise DatasetError(f"cannot read image {path}{where}: {error}") from error


@dataclass
class Candidate:
    """One sampled rationale for an example."""

    text: str
    """The rationale, without the prompt and without the end-of-sequence token."""
    temperature: float
    """Sampling temperature it was drawn at."""
    seed: int
    """Seed of the example's random stream; with `sample_idx` it reproduces this candidate."""
    sample_idx: int
    """Row of the example's K draws (0..K-1) this candidate came from."""
    logprob: float
    """Sum of the token log-probabilities (at temperature 1) of the rationale and its end token, under the model
    that wrote it."""
    model: str = "policy"
    """Which model wrote it: `POLICY_MODEL` (the model being tuned, as the round found it) or the name of a
    `sample.pool` entry (illume.pool). Stored with the candidate; never shown to the people judging."""


POLICY_MODEL = "policy"
"""`Candidate.model` of the candidates the model being tuned wrote (every candidate of a run without a pool)."""


@dataclass
class CandidateSet:
    """What the sampler produced for one example: the answer in the prompt and its distinct rationales."""

    example_id: str
    answer: str
    """The answer used in the prompt: the reference on train, the model's own near-greedy answer on val/test."""
    predicted_answer: str
    """The model's own near-greedy answer (equal to `answer` on val/test)."""
    prompt: str
    """The text prompt the rationales continue (without the image tokens)."""
    seed: int
    """Seed of this example's random stream."""
    candidates: list[Candidate]
    """Distinct rationales, in the order they were drawn; duplicates dropped."""


ANNOTATOR_KINDS = ("person", "simulated", "reward", "judge")
"""What an annotator is, stored with its name in the feedback store (whether a judgment counts as people's
is decided by this, never by the name):

- `person`: a human, judging in the annotation page or the terminal;
- `simulated`: the simulated critic (ROUGE-L against the references) standing in for people;
- `reward`: the learned reward model acting as the critic;
- `judge`: an AI judge (a critic model asked for its verdict), next.
"""
