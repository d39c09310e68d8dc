"""Generated scenes of colored shapes, with captions and VQA pairs, for the tiny trained BLIP-2.

Each scene is drawn with Pillow from its own integer seed, so scene `s` is the same picture on
every machine and the training and held-out sets are disjoint seed ranges (`TRAIN_SEED`,
`HELDOUT_SEED`). Everything a question asks about is a pure function of the scene:

- objects never share a (color, shape) pair and their horizontal extents do not overlap, so
  "left to right" is a strict order and every object is named unambiguously by color + shape;
- the caption lists the objects left to right: "a red circle", "a red circle and a blue square",
  "a red circle, a blue square and a green triangle";
- questions use BLIP-2's VQA prompt format, "Question: {q} Answer:", with one-word answers.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

# Object colors: saturated, far apart in RGB, and never close to any background color.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# Backgrounds are low-saturation, so an object's hue is always the most saturated thing in view.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (245, 245, 245), (200, 200, 200), (150, 150, 150), (90, 90, 90), (40, 40, 40),
    (235, 225, 205), (205, 215, 225), (60, 60, 75), (215, 225, 210),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
MAX_OBJECTS = 3
QA_KINDS = ("color", "shape", "count", "position")
VQA_TEMPLATE = "Question: {question} Answer:"

TRAIN_SEED = 0
# Held-out scenes start here; training never draws seeds this large.
HELDOUT_SEED = 1_000_000

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # drawn at 4x and downsampled, for anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    """One shape; `x`, `y` are its center and `size` its bounding-box side, in output pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def with_article(self) -> str:
        return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.name}"

    @property
    def left(self) -> float:
        return self.x - self.size / 2

    @property
    def right(self) -> float:
        return self.x + self.size / 2


@dataclass(frozen=True)
class QA:
    """One question in BLIP-2's VQA format; `prompt` is what the model is given."""

    kind: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return VQA_TEMPLATE.format(question=self.question)


@dataclass
class Scene:
    """A rendered scene: RGB `image` (IMAGE_SIZE x IMAGE_SIZE), objects sorted left to right."""

    seed: int
    image: Image.Image
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    caption: str
    qa: list[QA] = field(default_factory=list)


def caption_for(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    """The caption rule: objects left to right, "a X", "a X and an Y", "a X, a Y and a Z"."""
    ordered = sorted(objects, key=lambda o: o.x)
    names = [o.with_article for o in ordered]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def questions_for(objects: tuple[SceneObject, ...], rng: random.Random) -> list[QA]:
    """At most one question per kind in `QA_KINDS`, each with a single correct one-word answer.

    A kind is skipped when the scene cannot pose it unambiguously (e.g. no shape occurs exactly
    once for a color question, or a single object for a position question).
    """
    qa: list[QA] = []
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objects) for c in OBJECT_COLORS}

    unique_shape = [o for o in objects if shape_counts[o.shape] == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        qa.append(QA("color", f"what color is the {o.shape}?", o.color))

    unique_color = [o for o in objects if color_counts[o.color] == 1]
    if unique_color:
        o = rng.choice(unique_color)
        qa.append(QA("shape", f"what shape is the {o.color} object?", o.shape))

    if rng.random() < 0.4:
        qa.append(QA("count", "how many shapes are there?", NUMBER_WORDS[len(objects)]))
    else:
        s = rng.choice(SHAPES)
        qa.append(QA("count", f"how many {s}s are there?", NUMBER_WORDS[shape_counts[s]]))

    if len(objects) >= 2:
        a, b = rng.sample(list(objects), 2)
        answer = "left" if a.x < b.x else "right"
        qa.append(QA("position", f"is the {a.name} left or right of the {b.name}?", answer))
    return qa


def _place_objects(rng: random.Random, n: int) -> tuple[SceneObject, ...]:
    """`n` objects with distinct (color, shape) and disjoint horizontal extents (gap >= 2 px)."""
    kinds = rng.sample([(c, s) for c in OBJECT_COLORS for s in SHAPES], n)
    max_size = {1: 30, 2: 24, 3: 17}[n]
    margin, gap = 2.0, 2.0
    while True:  # rejection sampling; the size bounds make acceptance likely
        sizes = [rng.uniform(12, max_size) for _ in range(n)]
        xs = [rng.uniform(margin + s / 2, IMAGE_SIZE - margin - s / 2) for s in sizes]
        spans = sorted((x - s / 2, x + s / 2) for x, s in zip(xs, sizes))
        if all(spans[i][1] + gap <= spans[i + 1][0] for i in range(n - 1)):
            break
    ys = [rng.uniform(margin + s / 2, IMAGE_SIZE - margin - s / 2) for s in sizes]
    objects = [SceneObject(s, c, x, y, size) for (c, s), x, y, size in zip(kinds, xs, ys, sizes)]
    return tuple(sorted(objects, key=lambda o: o.x))


def _draw(objects: tuple[SceneObject, ...], background: tuple[int, int, int]) -> Image.Image:
    k = _SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), background)
    draw = ImageDraw.Draw(big)
    for o in objects:
        cx, cy, h = o.x * k, o.y * k, o.size * k / 2
        fill = OBJECT_COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "square":
            # Squares are drawn a little smaller so their area is comparable to the circle's.
            s = h * math.sqrt(math.pi) / 2
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:  # upward equilateral-ish triangle filling the bounding box
            draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def make_scene(seed: int) -> Scene:
    """Draw the scene for one integer seed (the same picture and text on every machine)."""
    rng = random.Random(seed)
    n = rng.randint(1, MAX_OBJECTS)
    objects = _place_objects(rng, n)
    background = rng.choice(BACKGROUNDS)
    image = _draw(objects, background)
    return Scene(seed, image, objects, background, caption_for(objects), questions_for(objects, rng))


def generate_scenes(n: int, seed: int = TRAIN_SEED) -> list[Scene]:
    """Scenes for seeds `seed, seed + 1, ..., seed + n - 1`."""
    return [make_scene(seed + i) for i in range(n)]


def scene_sentences() -> list[str]:
    """Every caption and prompt/answer pattern the scenes can produce, for tokenizer training."""
    lines: list[str] = []
    colors = list(OBJECT_COLORS)
    for c in colors:
        for s in SHAPES:
            lines.append(f"a {c} {s} and an {c} {s}, a {c} {s} and a {c} {s}")
            lines.append(VQA_TEMPLATE.format(question=f"what color is the {s}?") + f" {c}")
            lines.append(VQA_TEMPLATE.format(question=f"what shape is the {c} object?") + f" {s}")
            lines.append(VQA_TEMPLATE.format(question=f"is the {c} {s} left or right of the {c} {s}?") + " left")
            lines.append(VQA_TEMPLATE.format(question=f"is the {c} {s} left or right of the {c} {s}?") + " right")
    for word in NUMBER_WORDS[: MAX_OBJECTS + 1]:
        lines.append(VQA_TEMPLATE.format(question="how many shapes are there?") + f" {word}")
        for s in SHAPES:
            lines.append(VQA_TEMPLATE.format(question=f"how many {s}s are there?") + f" {word}")
    return lines


def sample_seeds(count: int = 4, start: int = HELDOUT_SEED) -> list[tuple[int, str]]:
    """(seed, question kind) of the bundled samples: a deterministic rule, not cherry-picked.

    Sample i is the next held-out scene with (1, 2, 3, 3)[i % 4] objects that can pose question
    kind QA_KINDS[i % 4], so four samples cover every object count and every question kind.
    """
    picked: list[tuple[int, str]] = []
    seed = start
    while len(picked) < count:
        i = len(picked)
        wanted, kind = (1, 2, 3, 3)[i % 4], QA_KINDS[i % len(QA_KINDS)]
        scene = make_scene(seed)
        if len(scene.objects) == wanted and any(qa.kind == kind for qa in scene.qa):
            picked.append((seed, kind))
        seed += 1
    return picked


def write_samples(directory, count: int = 4) -> list[dict]:
    """Write `count` held-out scenes as PNGs plus `samples.json` (caption, one question each)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for seed, kind in sample_seeds(count):
        scene = make_scene(seed)
        qa = next(qa for qa in scene.qa if qa.kind == kind)
        name = f"scene_{seed}.png"
        scene.image.save(directory / name, optimize=True)
        entries.append({"file": name, "seed": seed, "caption": scene.caption,
                        "question": {"kind": qa.kind, "prompt": qa.prompt, "answer": qa.answer}})
    doc = {"about": "Held-out scenes written by blip2_triton.toy.scenes.write_samples; captions list objects left to right.",
           "samples": entries}
    (directory / "samples.json").write_text(json.dumps(doc, indent=2) + "\n")
    return entries
