"""The compositional demo benchmark: two coloured shapes and a caption about their relation.

Images are 64x64 RGB on white with two objects that do not overlap and have different colours.
Captions read "a {colour} {shape} {relation} a {colour} {shape}", the relation ("left of",
"right of", "above", "below") true of the object centres, the first-named object the subject.
The task: does the caption match the image? Negatives, as many as positives, of two kinds:

* ``swapped``: the two objects exchanged in the caption (same words, wrong relation);
* ``attribute``: one colour or shape changed to one not in the image.

Everything is drawn with numpy from a seed: the same seed gives the same data everywhere.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

SIZE = 64
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (230, 200, 20), "purple": (140, 40, 170), "orange": (250, 130, 10),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("positive", "swapped", "attribute")
MIN_RADIUS, MAX_RADIUS = 9, 13
MARGIN = 6  # a relation is only used when the centres differ by at least this many pixels on its axis

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


def object_mask(obj: Obj) -> np.ndarray:
    dx, dy = _XX - obj.cx, _YY - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= obj.r * obj.r
    if obj.shape == "square":
        half = obj.r * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # triangle pointing up, inscribed in the circle of radius r
    top, bottom = -obj.r, obj.r * 0.75
    t = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * obj.r * 0.95)


def render(objects: list[Obj]) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    for obj in objects:
        image[object_mask(obj)] = COLOURS[obj.colour]
    return image


def true_relations(a: Obj, b: Obj) -> list[str]:
    out = []
    if b.cx - a.cx >= MARGIN:
        out.append("left of")
    if a.cx - b.cx >= MARGIN:
        out.append("right of")
    if b.cy - a.cy >= MARGIN:
        out.append("above")
    if a.cy - b.cy >= MARGIN:
        out.append("below")
    return out


def caption(a: Obj, relation: str, b: Obj) -> str:
    return f"{a.phrase()} {relation} {b.phrase()}"


@dataclass
class Example:
    image: np.ndarray  # uint8 [64, 64, 3]
    caption: str
    label: int  # 1 = the caption matches
    kind: str  # positive | swapped | attribute
    objects: tuple[Obj, Obj]


def _place(rng: np.random.Generator) -> tuple[Obj, Obj]:
    colours = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
    while True:
        objs = []
        for k in range(2):
            r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
            objs.append(Obj(COLOUR_NAMES[colours[k]], SHAPES[rng.integers(3)], float(cx), float(cy), r))
        a, b = objs
        gap = np.hypot(a.cx - b.cx, a.cy - b.cy) - (a.r + b.r)
        if gap >= 2 and true_relations(a, b):
            return a, b


def _attribute_negative(rng: np.random.Generator, a: Obj, relation: str, b: Obj) -> str:
    used_colours = {a.colour, b.colour}
    used_shapes = {a.shape, b.shape}
    which = rng.integers(2)  # subject or object
    target = (a, b)[which]
    if rng.random() < 0.5:
        new = Obj(str(rng.choice([c for c in COLOUR_NAMES if c not in used_colours])), target.shape, 0, 0, 0)
    else:
        new = Obj(target.colour, str(rng.choice([s for s in SHAPES if s not in used_shapes])), 0, 0, 0)
    return caption(new, relation, b) if which == 0 else caption(a, relation, new)


def make_example(rng: np.random.Generator, kind: str) -> Example:
    a, b = _place(rng)
    relation = str(rng.choice(true_relations(a, b)))
    image = render([a, b])
    if kind == "positive":
        text, label = caption(a, relation, b), 1
    elif kind == "swapped":
        text, label = caption(b, relation, a), 0
    elif kind == "attribute":
        text, label = _attribute_negative(rng, a, relation, b), 0
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return Example(image, text, label, kind, (a, b))


def generate(n: int, seed: int, kinds: tuple[str, ...] = KINDS, weights: tuple[float, ...] | None = None):
    """n examples; by default half positives, a quarter of each negative kind."""
    rng = np.random.default_rng(seed)
    if weights is None:
        weights = tuple(0.5 if k == "positive" else 0.5 / max(1, len(kinds) - 1) for k in kinds)
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return [make_example(rng, kinds[int(rng.choice(len(kinds), p=p))]) for _ in range(n)]


def balanced(n_per_kind: int, seed: int) -> list[Example]:
    """Exactly n_per_kind examples of each kind (for evaluation)."""
    rng = np.random.default_rng(seed)
    return [make_example(rng, kind) for kind in KINDS for _ in range(n_per_kind)]


def cell_labels(objects: tuple[Obj, Obj], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (grid x grid): colour index+1 and shape index+1 of the object covering its centre (0 = none)."""
    step = SIZE / grid
    centres = (np.arange(grid) + 0.5) * step
    colour = np.zeros((grid, grid), dtype=np.int64)
    shape = np.zeros((grid, grid), dtype=np.int64)
    for obj in objects:
        dx = centres[None, :] - obj.cx
        dy = centres[:, None] - obj.cy
        inside = dx * dx + dy * dy <= (obj.r + step * 0.35) ** 2
        colour[inside] = COLOUR_NAMES.index(obj.colour) + 1
        shape[inside] = SHAPES.index(obj.shape) + 1
    return colour, shape


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()
