"""The records every stage passes along: examples in, candidate rationales out.

Plain dataclasses, so that the sampler, the critics, the feedback store and the exports agree on one shape
without importing each other.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from illume.data.errors import DatasetError, ImageNotFoundError


@dataclass
class Example:
    """One visual question with its answer(s) and reference explanations.

    `image` is either a path (loaded lazily by `load_image`) or an in-memory PIL image (the shapes world, or an
    image file held as bytes by a `datasets` dataset: `image_from_bytes`).
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
    its processor (illume.models.hf). An in-memory image (the shapes world, `image_from_bytes`) is returned as a
    copy, so a caller never changes the dataset's; one opened from bytes is decoded by that copy (a truncated
    one fails there, naming its row).

    Raises:
        ImageNotFoundError: the file does not exist (the message names the file and the row).
        DatasetError: the file cannot be decoded, has more pixels than the decompression-bomb limit
            (`PIL.Image.MAX_IMAGE_PIXELS`), or its mode cannot become RGB (the same), so the CLI reports a
            `data error:` line, and a `--verify` that passes means every backend can read the image.
    """
    if isinstance(example.image, Image.Image):
        where = f" (row {example.source})" if example.source else ""
        try:
            return example.image.copy()  # an image opened from bytes decodes here: a truncated one fails
        except Exception as error:  # PIL raises several types for corrupt files
            raise DatasetError(f"cannot read the in-memory image{where}: {error}") from error
    path, where = _image_file(example)
    with _open_image(path, where) as image:
        try:
            image.load()  # decode everything now: a truncated file fails here, and the handle can close
            image.crop((0, 0, 1, 1)).convert("RGB")  # a mode PIL cannot make RGB fails here too, not mid-run
            return image.copy()  # a plain image that no longer refers to the (closed) file
        except Exception as error:  # PIL raises several types for corrupt files
            raise DatasetError(f"cannot read image {path}{where}: {error}") from error


def verify_image(example: Example) -> None:
    """Check the example's image file without decoding its pixels, so a run can check thousands before its model
    loads: the header parses, the size is within the decompression-bomb limit, and `Image.verify` passes.

    What `verify` checks depends on the format: for PNG it reads every chunk up to IEND and checks its CRC, which
    finds damaged and truncated files; PIL's JPEG reader checks nothing past the header, so a JPEG damaged in its
    compressed data is found only when decoded (`load_image`). An in-memory image (the shapes world) passes.

    Raises:
        ImageNotFoundError: the file does not exist (the message names the file and the row).
        DatasetError: the file fails one of the checks (the same).
    """
    if isinstance(example.image, Image.Image):
        return
    path, where = _image_file(example)
    with _open_image(path, where) as image:
        try:
            image.verify()
        except Exception as error:  # PIL raises several types for corrupt files
            raise DatasetError(f"cannot read image {path}{where}: {error}") from error


def image_from_bytes(data: bytes, name: str, where: str = "", *, verify: bool = False) -> Image.Image:
    """An image file held in memory (a `datasets` Image feature's bytes) as an `Example.image`, with the checks
    `verify_image` makes of a file on disk: the header parses and the size is within the decompression-bomb
    limit, and with `verify` also `Image.verify`. No pixels are decoded here; `load_image` decodes them.

    Args:
        data: The encoded image file (PNG, JPEG, ...).
        name: What error messages call the image (its file name in the dataset, or the column).
        where: Appended to that name in error messages, e.g. " (row train.parquet:train:3)".

    Raises:
        DatasetError: the bytes fail one of the checks (the message names `name` and `where`).
    """
    if verify:
        with _open_image(io.BytesIO(data), where, name=name) as image:
            try:
                image.verify()  # leaves the image unusable, so the one returned is opened afresh
            except Exception as error:  # PIL raises several types for corrupt files
                raise DatasetError(f"cannot read image {name}{where}: {error}") from error
    return _open_image(io.BytesIO(data), where, name=name)


def _image_file(example: Example) -> tuple[Path, str]:
    """The example's image file and the " (row ...)" that error messages add after it."""
    path = Path(example.image)
    where = f" (row {example.source})" if example.source else ""
    if not path.is_file():
        raise ImageNotFoundError(f"image not found: {path}{where}")
    return path, where


def _open_image(path: Path | io.BytesIO, where: str, name: str | None = None) -> Image.Image:
    """The image file opened (its header read, no pixels decoded), or a DatasetError naming it (`name`, when
    given, instead of `path`: an image file held in memory).

    More pixels than `PIL.Image.MAX_IMAGE_PIXELS` is an error here. PIL itself only warns up to twice that
    limit and raises above it; a warning would scroll past in a run's log while decoding took gigabytes.
    """
    label = name if name is not None else path
    limit = Image.MAX_IMAGE_PIXELS  # None: the user switched PIL's check off, and so this one
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below instead
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DatasetError(f"cannot read image {label}{where}: more pixels than the decompression-bomb limit of "
                           f"{limit} (PIL.Image.MAX_IMAGE_PIXELS): {error}") from error
    except Exception as error:  # PIL raises several types for corrupt files
        raise DatasetError(f"cannot read image {label}{where}: {error}") from error
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise DatasetError(f"cannot read image {label}{where}: {image.width}x{image.height} pixels, more than the "
                           f"decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
    return image


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


def clean_text(text: str) -> str:
    """A drawn text as it is stored: whitespace runs made one space, ends stripped."""
    return " ".join(text.split())


def distinct_candidates(texts: list[str], temperatures: list[float], seed: int,
                        logprobs: list[float]) -> list[Candidate]:
    """An example's K draws (row j: `texts[j]` at `temperatures[j]`) as its candidates: cleaned (`clean_text`),
    empty ones and repeats dropped, in drawing order, each keeping its row as `sample_idx`. Every sampling
    engine (illume.sampling.ENGINES) keeps its draws by this one rule."""
    seen, candidates = set(), []
    for j, raw in enumerate(texts):
        text = clean_text(raw)
        if not text or text in seen:
            continue
        seen.add(text)
        candidates.append(Candidate(text, temperatures[j], seed, j, logprobs[j]))
    return candidates


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


SPLITS = ("train", "val", "test")
"""A dataset's splits: `train` (sampled and judged), `val` (chooses the epoch and the sweep), `test` (reported
once, by the study). The shapes world adds its own `pretrain` split (`illume.data.shapes.WORLD_SPLITS`)."""


ANNOTATOR_KINDS = ("person", "simulated", "reward", "judge")
"""What an annotator is, stored with its name in the feedback store (whether a judgment counts as people's
is decided by this, never by the name):

- `person`: a human, judging in the annotation page or the terminal;
- `simulated`: the simulated critic (ROUGE-L against the references) standing in for people;
- `reward`: the learned reward model acting as the critic;
- `judge`: an AI judge (a critic model asked for its verdict), next.
"""
