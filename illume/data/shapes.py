"""The shapes world: a procedurally generated VQA-X in miniature, the demo's embedded default.

Each scene shows one to three coloured shapes, one per column (left, middle, right). Questions come in six
types (colour, shape, count, existence, position, size), each with an answer and three reference explanations
in varied wording that state the visual evidence. Captions state the same facts in plain clauses for
pre-training, and a few generic "X, seeing that Y" sentences, never about an image, teach the cue the ILLUME
prompt ends with (../shared/design.md says why each of these is needed).

Everything is deterministic by seed: scene i of a split is drawn from its own `random.Random`, so splits do not
shift when their sizes change.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from illume.data.records import SPLITS, Example

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
NUMBERS = ("zero", "one", "two", "three")
WORLD_SPLITS = (*SPLITS, "pretrain")
"""The shapes world's splits: a dataset's, and `pretrain` (the demo model's pre-training examples)."""

# How captions say where an object is; references use other phrasings too (REF_POSITION).
CAPTION_POSITION = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
REF_POSITION = {
    "left": ("on the left", "on the left side", "at the left"),
    "middle": ("in the middle", "in the center", "in the middle of the picture"),
    "right": ("on the right", "on the right side", "at the right"),
}

# Caption clauses, one fact each. Pre-training sees only these (and the generic sentences below).
OBJECT_CLAUSES = (
    "there is a {size} {color} {shape} {pos}",
    "a {size} {color} {shape} is {pos}",
    "the {shape} {pos} is {color}",
    "the {color} {shape} is {size}",
    "{pos} there is a {color} {shape}",
)
COUNT_CLAUSES = ("there are {n} {shape}s", "i see {n} {shape}s")
SINGLE_COUNT_CLAUSES = ("there is one {shape}", "there is only one {shape}")
TOTAL_CLAUSES = ("there are {n} shapes", "the picture has {n} shapes")
ABSENCE_CLAUSES = ("there is no {color} {shape}", "there are no {shape}s")
RELATION_CLAUSES = ("the {color} {shape} is left of the {color2} {shape2}",)

# Reference explanations per question type; three distinct ones are drawn per question.
REFERENCES = {
    "color": (
        "the {shape} is {color}",
        "the {shape} in the picture is {color}",
        "the {shape} {refpos} is colored {color}",
        "the only {shape} is a {color} one",
        "there is a {color} {shape} {refpos}",
    ),
    "shape": (
        "the {color} object is a {shape}",
        "the {color} thing has the shape of a {shape}",
        "the only {color} object is a {size} {shape}",
        "there is a {color} {shape} {refpos}",
    ),
    "count": (
        "there are {n} {shape}s in the picture",
        "the picture shows {n} {shape}s",
        "i can count {n} {shape}s",
        "exactly {n} of the shapes are {shape}s",
    ),
    "count_one": (
        "there is one {shape} in the picture",
        "the picture shows only one {shape}",
        "there is a single {shape}",
        "only one of the shapes is a {shape}",
    ),
    "exist_yes": (
        "there is a {color} {shape} {refpos}",
        "a {size} {color} {shape} is in the picture",
        "the picture shows a {color} {shape}",
        "one of the shapes is a {color} {shape}",
    ),
    "exist_no": (
        "there is no {color} {shape} in the picture",
        "none of the shapes is a {color} {shape}",
        "the picture shows no {color} {shape}",
    ),
    "position": (
        "the {color} {shape} is {refpos}",
        "there is a {color} {shape} {refpos}",
        "the {color} {shape} is placed {refpos}",
        "the {size} {color} {shape} sits {refpos}",
    ),
    "size": (
        "the {color} {shape} is {size}",
        "there is a {size} {color} {shape} {refpos}",
        "the {color} {shape} looks {size}",
        "the {color} {shape} is a {size} one",
    ),
}

QUESTIONS = {
    "color": "what color is the {shape}?",
    "shape": "what shape is the {color} object?",
    "count": "how many {shape}s are there?",
    "exist": "is there a {color} {shape}?",
    "position": "where is the {color} {shape}?",
    "size": "is the {color} {shape} small or large?",
}

# Generic text, never about an image: it teaches that ", seeing that" is followed by an evidence clause.
# (claim, question, answer, evidence) -> "claim, seeing that evidence" and "Q: question A: answer, seeing that
# evidence"; without them the model echoes the question after "seeing that" (design.md).
GENERIC_RATIONALES = (
    ("the street is wet", "is the street wet?", "yes", "there is a puddle on the road"),
    ("it is winter", "what season is it?", "winter", "there is snow on the roof"),
    ("the room is dark", "is the room dark?", "yes", "the lamp is off"),
    ("the dog is hungry", "is the dog hungry?", "yes", "the bowl is empty"),
    ("the shop is open", "is the shop open?", "yes", "there is a man at the door"),
    ("the party is over", "is the party over?", "yes", "there are empty cups on the table"),
    ("the baby is asleep", "what is the baby doing?", "sleeping", "the baby is in the bed"),
    ("the man is a cook", "what is the man's job?", "cook", "he is wearing a white hat"),
    ("it is late", "is it late?", "yes", "the sky is dark"),
    ("the team won", "did the team win?", "yes", "the players are happy"),
    ("the car is new", "is the car old?", "no", "there is no dirt on the car"),
    ("the bus is full", "is the bus empty?", "no", "there are many people on the bus"),
    ("the garden is dry", "is the garden dry?", "yes", "the grass is brown"),
    ("the cake is ready", "is the cake ready?", "yes", "the cake is on the plate"),
    ("the boat is fast", "is the boat fast?", "yes", "there is a big wave behind the boat"),
    ("the kitchen is clean", "is the kitchen clean?", "yes", "the plates are in the cupboard"),
    ("it is summer", "what season is it?", "summer", "the trees are green"),
    ("the girl is a student", "who is the girl?", "student", "she is holding a book"),
    ("there are two cats", "how many cats are there?", "two", "there is a cat on the sofa and one on the bed"),
    ("the ball is red", "what color is the ball?", "red", "the ball on the grass is red"),
)


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str
    y: float
    """Vertical centre as a fraction of the image height."""


@dataclass
class Scene:
    """One image's content; `render` draws it."""

    id: str
    objects: list[ShapeObject]

    def find(self, **attributes) -> list[ShapeObject]:
        return [o for o in self.objects if all(getattr(o, k) == v for k, v in attributes.items())]


def make_scene(scene_id: str, rng: random.Random, max_objects: int = 3) -> Scene:
    """Draw one to `max_objects` shapes, each in its own column."""
    num_objects = rng.randint(1, min(max_objects, len(POSITIONS)))
    positions = sorted(rng.sample(POSITIONS, num_objects), key=POSITIONS.index)
    objects = [
        ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), position, rng.uniform(0.3, 0.7))
        for position in positions
    ]
    return Scene(scene_id, objects)


def render(scene: Scene, image_size: int = 96) -> Image.Image:
    """Draw the scene on a light background."""
    image = Image.new("RGB", (image_size, image_size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx = (POSITIONS.index(obj.position) + 0.5) / len(POSITIONS) * image_size
        cy = obj.y * image_size
        r = (0.15 if obj.size == "large" else 0.09) * image_size
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def _fill(template: str, obj: ShapeObject | None = None, rng: random.Random | None = None, **extra) -> str:
    values = dict(extra)
    if obj is not None:
        values.update(shape=obj.shape, color=obj.color, size=obj.size, pos=CAPTION_POSITION[obj.position])
        if rng is not None:
            values["refpos"] = rng.choice(REF_POSITION[obj.position])
    return template.format(**values)


def caption_clauses(scene: Scene, rng: random.Random) -> list[str]:
    """Every fact about the scene as a plain clause, in caption wording."""
    clauses = [_fill(rng.choice(OBJECT_CLAUSES), obj) for obj in scene.objects]
    for shape in SHAPES:
        n = len(scene.find(shape=shape))
        if n == 1:
            clauses.append(_fill(rng.choice(SINGLE_COUNT_CLAUSES), shape=shape))
        elif n > 1:
            clauses.append(_fill(rng.choice(COUNT_CLAUSES), n=NUMBERS[n], shape=shape))
    if len(scene.objects) > 1:
        clauses.append(_fill(rng.choice(TOTAL_CLAUSES), n=NUMBERS[len(scene.objects)]))
        left, right = scene.objects[0], scene.objects[-1]
        clauses.append(RELATION_CLAUSES[0].format(color=left.color, shape=left.shape, color2=right.color,
                                                  shape2=right.shape))
    absent_shape = rng.choice(SHAPES)
    absent_color = rng.choice(list(COLORS))
    if not scene.find(shape=absent_shape, color=absent_color):
        template = ABSENCE_CLAUSES[1] if not scene.find(shape=absent_shape) else ABSENCE_CLAUSES[0]
        clauses.append(_fill(template, shape=absent_shape, color=absent_color))
    return clauses


def make_caption(scene: Scene, rng: random.Random) -> str:
    """A short caption: one clause, sometimes two joined by "and" (long run-on captions teach run-on rationales)."""
    clauses = caption_clauses(scene, rng)
    rng.shuffle(clauses)
    num_clauses = 1 if rng.random() < 0.7 else 2
    return " and ".join(clauses[:num_clauses])


def _question_candidates(scene: Scene) -> list[str]:
    kinds = ["count", "exist"]
    if any(len(scene.find(shape=o.shape)) == 1 for o in scene.objects):
        kinds.append("color")
    if any(len(scene.find(color=o.color)) == 1 for o in scene.objects):
        kinds.append("shape")
    if any(len(scene.find(shape=o.shape, color=o.color)) == 1 for o in scene.objects):
        kinds += ["position", "size"]
    return kinds


def make_question(scene: Scene, rng: random.Random) -> tuple[str, str, str, list[str]]:
    """Ask one question about the scene: (type, question, answer, three reference explanations)."""
    kind = rng.choice(_question_candidates(scene))
    if kind == "color":
        obj = rng.choice([o for o in scene.objects if len(scene.find(shape=o.shape)) == 1])
        answer, pool = obj.color, REFERENCES["color"]
    elif kind == "shape":
        obj = rng.choice([o for o in scene.objects if len(scene.find(color=o.color)) == 1])
        answer, pool = obj.shape, REFERENCES["shape"]
    elif kind == "count":
        obj = rng.choice(scene.objects)
        n = len(scene.find(shape=obj.shape))
        answer, pool = NUMBERS[n], REFERENCES["count_one" if n == 1 else "count"]
    elif kind == "exist":
        if rng.random() < 0.5:
            obj, answer, pool = rng.choice(scene.objects), "yes", REFERENCES["exist_yes"]
        else:
            absent = [(s, c) for s in SHAPES for c in COLORS if not scene.find(shape=s, color=c)]
            shape, color = rng.choice(absent)
            obj = ShapeObject(shape, color, "small", "middle", 0.5)
            answer, pool = "no", REFERENCES["exist_no"]
    else:  # position or size: needs an object unique by colour and shape
        obj = rng.choice([o for o in scene.objects if len(scene.find(shape=o.shape, color=o.color)) == 1])
        answer = obj.position if kind == "position" else obj.size
        pool = REFERENCES[kind]
    n_word = NUMBERS[len(scene.find(shape=obj.shape))]
    question = QUESTIONS[kind].format(shape=obj.shape, color=obj.color)
    references = [_fill(t, obj, rng, n=n_word) for t in rng.sample(pool, 3)]
    return kind, question, answer, references


@dataclass
class ShapesWorld:
    """Generator of the shapes world's splits; see `ShapesWorldConfig` for the fields."""

    seed: int = 0
    pretrain_seed: int | None = None
    image_size: int = 96
    num_train_scenes: int = 400
    num_val_scenes: int = 100
    num_test_scenes: int = 100
    num_pretrain_scenes: int = 3000
    questions_per_scene: int = 1
    max_objects: int = 3

    def num_scenes(self, split: str) -> int:
        if split not in WORLD_SPLITS:
            raise ValueError(f"unknown shapes-world split {split!r}; expected one of {WORLD_SPLITS}")
        return getattr(self, f"num_{split}_scenes")

    def rng(self, split: str, index: int, purpose: str) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and machines.
        seed = self.pretrain_seed if split == "pretrain" and self.pretrain_seed is not None else self.seed
        return random.Random(f"{seed}/{split}/{index}/{purpose}")

    def scene(self, split: str, index: int) -> Scene:
        return make_scene(f"{split}-{index:05d}", self.rng(split, index, "scene"), self.max_objects)

    def examples(self, split: str) -> list[Example]:
        """Questions about the split's scenes, `questions_per_scene` each (duplicates skipped)."""
        examples = []
        for index in range(self.num_scenes(split)):
            scene = self.scene(split, index)
            image = render(scene, self.image_size)
            rng = self.rng(split, index, "questions")
            asked = set()
            for q in range(self.questions_per_scene):
                kind, question, answer, references = make_question(scene, rng)
                if question in asked:
                    continue
                asked.add(question)
                examples.append(Example(id=f"shapes-{scene.id}-q{q}", image=image, question=question,
                                        answers=[answer], explanations=references, question_type=kind,
                                        source=f"shapes:{split}:{index}"))
        return examples

    def captions(self, split: str, index: int, num_captions: int) -> list[str]:
        rng = self.rng(split, index, "captions")
        scene = self.scene(split, index)
        return [make_caption(scene, rng) for _ in range(num_captions)]


def generic_sentences() -> list[str]:
    """The generic "X, seeing that Y" sentences (text only), as statements and as question/answer pairs."""
    statements = [f"{claim}, seeing that {evidence}" for claim, _, _, evidence in GENERIC_RATIONALES]
    answers = [f"Q: {question} A: {answer}, seeing that {evidence}"
               for _, question, answer, evidence in GENERIC_RATIONALES]
    return statements + answers


def vocabulary() -> list[str]:
    """Every word and punctuation mark the world can produce, sorted (the demo tokenizer's vocabulary)."""
    texts = [*OBJECT_CLAUSES, *COUNT_CLAUSES, *SINGLE_COUNT_CLAUSES, *TOTAL_CLAUSES, *ABSENCE_CLAUSES,
             *RELATION_CLAUSES, *QUESTIONS.values(), *generic_sentences(), "q: a:, seeing that"]
    texts += [t for pool in REFERENCES.values() for t in pool]
    texts += [p for phrases in REF_POSITION.values() for p in phrases]
    fillers = [*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *POSITIONS, *NUMBERS, "yes", "no"]
    words = set(fillers)
    for text in texts:
        words.update(split_words(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


def split_words(text: str) -> list[str]:
    """The demo tokenizer's pre-tokenisation: lower-case words and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())
