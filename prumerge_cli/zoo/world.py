"""A procedural visual-QA world: coloured shapes on a 3x3 layout over a cluttered background, with a
caption per image and questions that need spatial detail. Everything is a pure function of a seed."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("northwest", "north", "northeast", "west", "center", "east", "southwest", "south", "southeast")
"""One word per cell (raster order): a question that ends with it lets the LM look the cell up in one step."""
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
"""Each spatial relation as a step (rows, columns) on the 3x3 layout."""
QUESTION_TYPES = ("color", "shape", "size", "count", "relation", "presence")
QUESTION_FORMS = ("what color is the object at center", "what shape is the object at northwest",
                  "what size is the object at south", "how many objects are there",
                  "what color is left of the object at center", "is there a red circle at east")  # fmt: skip
"""One question of each type, as the embedded model was trained to read them (lower case, no question mark)."""
READ_AS = {"an": "a"}
"""Spellings the embedded model reads as another word: the article before a vowel ("an orange cross") is its "a".
The tokenizer folds them, so a grammatical question reads as the one the model was trained on."""


@dataclass(frozen=True)
class Thing:
    """One object: colour, shape, size and grid cell (0..8, raster order)."""

    colour: str
    shape: str
    size: str
    cell: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class QA:
    """A question, its answer, its type and the `steps` said before the answer (what the model looks up on the
    way, e.g. "blue circle" before "no"). Questions end with their last word, no "?": the reply starts there."""

    question: str
    answer: str
    kind: str
    steps: str = ""

    @property
    def reply(self) -> str:
        """What the model is trained to say: the steps, then the answer."""
        return f"{self.steps} {self.answer}".strip()


def sample_scene(rng: random.Random) -> list[Thing]:
    """2-4 objects in distinct cells with distinct colour-shape pairs, in raster order."""
    count = rng.randint(2, 4)
    cells = sorted(rng.sample(range(9), count))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    return [Thing(c, s, rng.choice(SIZES), cell) for (c, s), cell in zip(pairs, cells, strict=True)]


Box = tuple[float, float, float, float]
"""An object's bounding box in pixels: x0, y0, x1, y1."""


def render(scene: list[Thing], rng: random.Random) -> tuple[Image.Image, tuple[Box, ...]]:
    """The scene over grey clutter (noise, lines, specks), objects jittered inside their cells; with each
    object's bounding box."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    base = rng.randint(70, 170)
    pixels = base + nrng.normal(0, 18, (IMAGE_SIZE, IMAGE_SIZE, 1)) + nrng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(10, 25)):
        tone = rng.randint(40, 210)
        xy = [rng.randint(0, IMAGE_SIZE) for _ in range(4)]
        if rng.random() < 0.6:
            draw.line(xy, fill=(tone, tone, tone + rng.randint(-10, 10)), width=rng.randint(1, 3))
        else:
            x, y = xy[:2]
            r = rng.randint(2, 6)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(tone, tone, tone))
    cell = IMAGE_SIZE / 3
    boxes = []
    for thing in scene:
        row, col = divmod(thing.cell, 3)
        radius = rng.randint(22, 28) if thing.size == "large" else rng.randint(13, 16)
        slack = int(cell / 2 - radius - 2)
        cx = (col + 0.5) * cell + rng.randint(-slack, slack)
        cy = (row + 0.5) * cell + rng.randint(-slack, slack)
        _draw_shape(draw, thing.shape, cx, cy, radius, COLOURS[thing.colour])
        boxes.append((cx - radius, cy - radius, cx + radius, cy + radius))
    return image, tuple(boxes)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def cell_of(x: float, y: float) -> int:
    """The 3x3 cell (raster order) of pixel coordinates."""
    third = IMAGE_SIZE / 3
    return int(y // third) * 3 + int(x // third)


def caption(scene: list[Thing]) -> str:
    """'large red circle at northwest and small blue cross at center'."""
    return " and ".join(f"{t.size} {t.colour} {t.shape} at {POSITIONS[t.cell]}" for t in scene)


def ask_about(thing: Thing, kind: str) -> QA:
    """The colour, shape or size of the object at a position; the question ends with the position word (see
    `POSITIONS`)."""
    answer = {"color": thing.colour, "shape": thing.shape, "size": thing.size}[kind]
    return QA(f"what {kind} is the object at {POSITIONS[thing.cell]}", answer, kind)


def ask(scene: list[Thing], kind: str, rng: random.Random) -> QA:
    """One question of type `kind` about the scene, with balanced answers where it applies."""
    if kind in ("color", "shape", "size"):
        return ask_about(rng.choice(scene), kind)
    if kind == "count":
        return QA("how many objects are there", NUMBERS[len(scene)], kind)
    if kind == "presence":
        return ask_presence(scene, rng)
    if kind == "relation":
        return ask_relation(scene, rng)
    raise ValueError(f"unknown question type {kind!r}")


def ask_relation(scene: list[Thing], rng: random.Random) -> QA:
    """'what color is left of the object at center', answered in two steps: the cell there ('west'), then the colour
    of what is in it ('blue', or 'nothing'). Three in four name an object where the scene allows (about half do): a
    reply that is mostly 'nothing' is learned as 'nothing' first, and the lookup then hardly at all. One attribute
    is read out, as in a colour question: a whole name ('blue square') read after a cell the model said itself
    stayed near chance in the lesson probe while the colour alone followed the colour questions (issue #19)."""
    asked = []
    for thing in scene:
        row, col = divmod(thing.cell, 3)
        for relation, (dr, dc) in RELATIONS.items():
            if 0 <= row + dr < 3 and 0 <= col + dc < 3:
                cell = (row + dr) * 3 + col + dc
                there = next((t.colour for t in scene if t.cell == cell), "nothing")
                asked.append(QA(f"what color is {relation} the object at {POSITIONS[thing.cell]}", there, "relation",
                                POSITIONS[cell]))  # fmt: skip
    wanted = rng.random() < 0.75
    return rng.choice([qa for qa in asked if (qa.answer != "nothing") == wanted] or asked)


def ask_presence(scene: list[Thing], rng: random.Random) -> QA:
    """'is there a red circle at northwest', answered in two steps: what is there ('blue circle', or 'nothing'),
    then yes or no. Half are yes; a no asks about a near miss at an object's cell (other colour, or other shape)
    or about any object at an empty cell."""
    thing = rng.choice(scene)
    empty = [c for c in range(9) if c not in {t.cell for t in scene}]
    miss = "yes" if rng.random() < 0.5 else rng.choice(("colour", "shape", "empty"))
    if miss == "empty":
        asked = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), thing.size, rng.choice(empty))
    else:
        colour = rng.choice([c for c in COLOURS if c != thing.colour]) if miss == "colour" else thing.colour
        shape = rng.choice([s for s in SHAPES if s != thing.shape]) if miss == "shape" else thing.shape
        asked = Thing(colour, shape, thing.size, thing.cell)
    there = next((t.name for t in scene if t.cell == asked.cell), "nothing")
    return QA(f"is there {indefinite(asked.name)} at {POSITIONS[asked.cell]}", "yes" if there == asked.name else "no",
              "presence", there)  # fmt: skip


def indefinite(name: str) -> str:
    """'a red circle', 'an orange cross'."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def as_read(text: str) -> str:
    """`text` as the embedded model reads it, with `READ_AS`'s spellings folded ('is there a orange cross')."""
    return " ".join(READ_AS.get(word, word) for word in text.split())


DESCRIBE = "describe the image ."


def lesson(scene: list[Thing], rng: random.Random) -> tuple[QA, ...]:
    """The training conversation of an image: colour, shape and size of every object, the count, three
    relations and four presence questions in a random order, then the description (a long final answer)."""
    qas = [ask_about(thing, kind) for thing in scene for kind in ("color", "shape", "size")]
    qas += [ask(scene, "count", rng), *(ask(scene, "relation", rng) for _ in range(3))]
    qas += [ask(scene, "presence", rng) for _ in range(4)]
    rng.shuffle(qas)
    return (*qas, QA(DESCRIBE, caption(scene), "describe"))


def near_miss(scene: list[Thing], rng: random.Random) -> list[Thing]:
    """The scene with one attribute of one object changed (shape, colour, size or cell): a hard negative."""
    i = rng.randrange(len(scene))
    t = scene[i]
    taken = {(s.colour, s.shape) for s in scene}
    kind = rng.choice(("shape", "shape", "colour", "size", "cell"))
    shapes = [s for s in SHAPES if (t.colour, s) not in taken]
    colours = [c for c in COLOURS if (c, t.shape) not in taken]
    if kind == "shape" and shapes:
        new = Thing(t.colour, rng.choice(shapes), t.size, t.cell)
    elif kind == "colour" and colours:
        new = Thing(rng.choice(colours), t.shape, t.size, t.cell)
    elif kind == "cell":
        new = Thing(t.colour, t.shape, t.size, rng.choice([c for c in range(9) if c not in {s.cell for s in scene}]))
    else:
        new = Thing(t.colour, t.shape, "small" if t.size == "large" else "large", t.cell)
    return sorted([*scene[:i], new, *scene[i + 1 :]], key=lambda s: s.cell)


@dataclass(frozen=True)
class Sample:
    """An image with its scene and caption, one question per type (evaluation), the training conversation
    (`lesson`) and a near-miss caption (a hard negative for contrastive training); `boxes` bound the objects of
    `scene`, in its order."""

    image: Image.Image
    scene: tuple[Thing, ...]
    boxes: tuple[Box, ...]
    caption: str
    qas: tuple[QA, ...]
    lesson: tuple[QA, ...]
    near_miss: str


def make_sample(seed: int) -> Sample:
    """The sample a seed determines."""
    rng = random.Random(seed)
    scene = sample_scene(rng)
    image, boxes = render(scene, rng)
    qas = tuple(ask(scene, kind, rng) for kind in QUESTION_TYPES)
    miss = caption(near_miss(scene, random.Random(f"near-miss-{seed}")))  # apart: new questions, same CLIP data
    return Sample(image, tuple(scene), boxes, caption(scene), qas, lesson(scene, random.Random(f"lesson-{seed}")), miss)


SPLITS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
"""Seed offsets: the splits never share a seed."""


def split_seed(split: str, index: int) -> int:
    """Seed of sample `index` of a split."""
    return SPLITS[split] + index


def samples_of(split: str, start: int, count: int) -> list[Sample]:
    """Samples start..start+count of a split."""
    return [make_sample(split_seed(split, i)) for i in range(start, start + count)]


def vocabulary() -> list[str]:
    """Every word a caption, question or answer can use."""
    words: set[str] = {"?", ".", "and", "at", "what", "color", "is", "the", "object", "shape", "size", "small", "large"}
    words |= {"describe", "image", "nothing"}
    words |= {"how", "many", "objects", "are", "there", "a", *COLOURS, *SHAPES, *SIZES, *NUMBERS, "yes", "no"}
    for phrase in (*POSITIONS, *RELATIONS):
        words.update(phrase.split())
    return sorted(words)


def fingerprint(lessons: bool, count: int = 16) -> str:
    """sha256 of the vocabulary and the first `count` training samples' images, captions and near misses (and
    their training conversations with `lessons`, as the model reads them): what a stage trained on the world depends
    on, so that a change to the world makes the stage stale."""
    digest = hashlib.sha256(" ".join(vocabulary()).encode())
    for sample in samples_of("train", 0, count):
        digest.update(np.asarray(sample.image).tobytes())
        digest.update(f"{sample.caption}|{sample.near_miss}".encode())
        if lessons:
            digest.update("|".join(f"{as_read(qa.question)}>{qa.reply}" for qa in sample.lesson).encode())
    return digest.hexdigest()
