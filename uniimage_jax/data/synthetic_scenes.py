"""Synthetic scenes: flat coloured shapes on a plain background, their geometry (GenEval's
relative-position rule), their rasterisation and the random placement of objects that never touch.

Scenes are sampled in normalised [0, 1] coordinates and rasterised at pixel centres without
anti-aliasing, so every pixel has exactly a palette colour and a scene looks the same (up to
rasterisation) at any `image_size` from 32 to 512. Captions are in `synthetic_captions`, the
datasets that draw captioned scenes in `synthetic`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

# Saturated colours far apart in RGB (closest pair orange/yellow at 88, the rest >= 108, grey
# background included), so a nearest-palette segmentation separates them even in blurry images.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
COLORS: tuple[str, ...] = tuple(PALETTE)
# Distinguishable by bounding-box fill (square 1, circle pi/4, diamond and triangle 1/2) and by the
# height of the centroid in the box (triangle 2/3 from the top, the others 1/2).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# GenEval's relative-position rule: the centre offset minus this fraction of the summed box sizes.
POSITION_THRESHOLD = 0.1
# Scenes are generated with a stricter margin so that rasterisation never flips a relation.
_GENERATION_POSITION_THRESHOLD = 0.2
_MARGIN = 0.04  # normalised distance kept free at the image border
_GAP = 0.05  # normalised gap between object boxes, so objects never touch
MAX_TRIES = 200


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One flat shape: class, palette colour, box centre and side, in normalised coordinates."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def to_dict(self) -> dict:
        return {"class": self.shape, "color": self.color,
                "box": [round(float(v), 6) for v in self.box]}


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box a to box b (x0, y0, x1, y1; y down), GenEval's rule: the offset between
    box centres, shrunk by `threshold` x (size a + size b) per axis; a relation holds when its
    axis carries more than half of the (unit) offset direction."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if norm < 1e-9 or np.all(np.abs(revised) < 1e-3 * max(norm, 1e-9)):
        return set()
    dx, dy = revised / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float,
                half: float) -> np.ndarray:
    """Pixel-centre membership for one shape (xs, ys in pixels, broadcastable)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":  # apex up, base at the bottom of the box
        depth = dy + half  # 0 at the apex, 2 half at the base
        return (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: Iterable[SceneObject], image_size: int) -> np.ndarray:
    """The scene as uint8 (image_size, image_size, 3), background first, objects in order."""
    check_image_size(image_size)
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in objects:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {COLORS}")
        x0, y0, x1, y1 = (v * image_size for v in obj.box)
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)) + 1, image_size), min(int(np.ceil(y1)) + 1, image_size)
        ys = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        xs = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
        mask = _shape_mask(obj.shape, xs, ys, obj.cx * image_size, obj.cy * image_size,
                           obj.size * image_size / 2)
        image[r0:r1, c0:c1][mask] = PALETTE[obj.color]
    return image


def check_image_size(image_size) -> None:
    """Raises ValueError unless image_size is an integer side the scenes are drawn at."""
    if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be an integer in [32, 512], got {image_size!r}")


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------

# Box side (normalised) by number of objects in the scene: smaller when more must fit.
_SIZE_RANGE = {1: (0.3, 0.5), 2: (0.22, 0.34), 3: (0.17, 0.25), 4: (0.16, 0.22), 5: (0.16, 0.2)}


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return (ax1 + _GAP <= bx0 or bx1 + _GAP <= ax0 or ay1 + _GAP <= by0 or by1 + _GAP <= ay0)


def fits(obj: SceneObject, others: Sequence[SceneObject]) -> bool:
    x0, y0, x1, y1 = obj.box
    inside = x0 >= _MARGIN and y0 >= _MARGIN and x1 <= 1 - _MARGIN and y1 <= 1 - _MARGIN
    return inside and all(_boxes_apart(obj, o) for o in others)


def place(rng: np.random.Generator, shape: str, color: str, others: Sequence[SceneObject],
          n_objects: int) -> SceneObject | None:
    """A random non-overlapping placement, or None after too many tries."""
    lo, hi = _SIZE_RANGE[min(max(n_objects, 1), 5)]
    for _ in range(MAX_TRIES):
        size = float(rng.uniform(lo, hi))
        half = size / 2
        cx = float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))
        cy = float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))
        obj = SceneObject(shape, color, cx, cy, size)
        if fits(obj, others):
            return obj
    return None


def scatter(rng, specs: Sequence[tuple[str, str]]) -> list[SceneObject] | None:
    """One placed object per (shape, colour), none touching, or None when one did not fit."""
    objects: list[SceneObject] = []
    for shape, color in specs:
        obj = place(rng, shape, color, objects, len(specs))
        if obj is None:
            return None
        objects.append(obj)
    return objects


def unambiguous(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """a stands in `relation` to b, and in no other, even with a stricter margin than GenEval's
    (so that rasterisation never flips it)."""
    return relative_position(a.box, b.box, _GENERATION_POSITION_THRESHOLD) == {relation}


def place_along(rng, obj: SceneObject, ref: SceneObject, relation: str,
                others: Sequence[SceneObject], keep_other_axis: bool) -> SceneObject | None:
    """obj placed so that it stands unambiguously in `relation` to ref: a random position on the
    relation's axis, and on the other axis either its current position or one close to ref's."""
    horizontal = relation in ("left of", "right of")
    axis, other_axis = ("cx", "cy") if horizontal else ("cy", "cx")
    half = obj.size / 2
    for _ in range(MAX_TRIES):
        change = {axis: float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))}
        if not keep_other_axis:
            jitter = float(rng.uniform(-0.25, 0.25)) * ref.size
            change[other_axis] = getattr(ref, other_axis) + jitter
        candidate = dataclasses.replace(obj, **change)
        if fits(candidate, others) and unambiguous(candidate, ref, relation):
            return candidate
    return None

