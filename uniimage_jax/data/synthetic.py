"""A built-in synthetic compositional dataset: flat coloured shapes on a plain background, with
GenEval-style captions and metadata, for smoke training and for a cheap, deterministic benchmark.

Everything is drawn procedurally (no files) and is deterministic by index: sample `i` of a dataset
with seed `s` comes from `numpy.random.default_rng([s, i, stream])`, so any worker can draw any
sample in any order (the class is a grain `RandomAccessDataSource`: `__len__` + `__getitem__`).

Scenes are sampled in normalised [0, 1] coordinates and rasterised at pixel centres without
anti-aliasing, so every pixel has exactly a palette colour and a scene looks the same (up to
rasterisation) at any `image_size` from 32 to 512.

Categories mirror GenEval (metadata `tag`):
  single_object  "a photo of a red circle"                    include [{class, count 1}]
  two_object     "a photo of a red circle and a blue square"  two different classes
  counting       "a photo of three green triangles"           count n (2..4), exclude n + 1
  colors         "a photo of a square that is yellow"         include [{class, count 1, color}]
  position       "a photo of a red circle to the left of a blue square"
                 include [{square}, {circle, position: ["left of", 0]}]
  color_attr     "a photo of a red circle and a blue square"  two classes, two colours, both checked
The metadata is what `uniimage_jax.eval.synthetic_scorer` checks (GenEval's rules); each sample
also carries `objects`, the full drawn scene.

Records hold ragged fields (metadata lists, objects); a grain pipeline keeps what it trains on
before batching, e.g. `grain.MapDataset.source(ds).map(lambda s: {"image": s["image"],
"caption": s["caption"]}).batch(b)`.

`SyntheticEditDataset` gives image+text-to-image pairs (recolour, move, add, remove) whose target
metadata the scorer verifies on the target image and rejects on the source image.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

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
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                               "color_attr")
EDITS: tuple[str, ...] = ("recolor", "move", "add", "remove")

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of",
                    "above": "above", "below": "below"}
MOVE_DIRECTIONS = {"left of": "to the left", "right of": "to the right", "above": "up",
                   "below": "down"}

# GenEval's relative-position rule: the centre offset minus this fraction of the summed box sizes.
POSITION_THRESHOLD = 0.1
# Scenes are generated with a stricter margin so that rasterisation never flips a relation.
_GENERATION_POSITION_THRESHOLD = 0.2
_MARGIN = 0.04  # normalised distance kept free at the image border
_GAP = 0.05  # normalised gap between object boxes, so objects never touch
_MAX_TRIES = 200

_STREAM_DATASET, _STREAM_EDIT, _STREAM_PROMPTS = 0, 1, 2


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
    _check_image_size(image_size)
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


def _check_image_size(image_size) -> None:
    if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be an integer in [32, 512], got {image_size!r}")


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------

# Box side (normalised) by number of objects in the scene: smaller when more must fit.
_SIZE_RANGE = {1: (0.3, 0.5), 2: (0.22, 0.34), 3: (0.17, 0.25), 4: (0.16, 0.22), 5: (0.16, 0.2)}


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return (ax1 + _GAP <= bx0 or bx1 + _GAP <= ax0 or ay1 + _GAP <= by0 or by1 + _GAP <= ay0)


def _fits(obj: SceneObject, others: Sequence[SceneObject]) -> bool:
    x0, y0, x1, y1 = obj.box
    inside = x0 >= _MARGIN and y0 >= _MARGIN and x1 <= 1 - _MARGIN and y1 <= 1 - _MARGIN
    return inside and all(_boxes_apart(obj, o) for o in others)


def _place(rng: np.random.Generator, shape: str, color: str, others: Sequence[SceneObject],
           n_objects: int) -> SceneObject | None:
    """A random non-overlapping placement, or None after too many tries."""
    lo, hi = _SIZE_RANGE[min(max(n_objects, 1), 5)]
    for _ in range(_MAX_TRIES):
        size = float(rng.uniform(lo, hi))
        half = size / 2
        cx = float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))
        cy = float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))
        obj = SceneObject(shape, color, cx, cy, size)
        if _fits(obj, others):
            return obj
    return None


def _scatter(rng, specs: Sequence[tuple[str, str]]) -> list[SceneObject] | None:
    objects: list[SceneObject] = []
    for shape, color in specs:
        obj = _place(rng, shape, color, objects, len(specs))
        if obj is None:
            return None
        objects.append(obj)
    return objects


def _unambiguous(a: SceneObject, b: SceneObject, relation: str) -> bool:
    return relative_position(a.box, b.box, _GENERATION_POSITION_THRESHOLD) == {relation}


def _pick(rng, options, k=1, exclude=()):
    pool = [o for o in options if o not in exclude]
    chosen = rng.choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in chosen]


def _a(word: str) -> str:
    """The word with its indefinite article ("a red circle", "an orange square")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def sample_scene(rng: np.random.Generator, category: str) -> tuple[list[SceneObject], str, dict]:
    """(objects, caption, metadata) of one scene of `category`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    for _ in range(_MAX_TRIES):
        drawn = _sample_scene_once(rng, category)
        if drawn is not None:
            objects, caption, metadata = drawn
            metadata = {"tag": category, **metadata, "prompt": caption}
            return objects, caption, metadata
    raise RuntimeError(f"could not place a {category} scene")  # not reached with these sizes


def _sample_scene_once(rng, category):
    if category in ("single_object", "colors"):
        (shape,), (color,) = _pick(rng, SHAPES), _pick(rng, COLORS)
        objects = _scatter(rng, [(shape, color)])
        if objects is None:
            return None
        if category == "single_object":
            caption = f"a photo of {_a(f'{color} {shape}')}"
            include = [{"class": shape, "count": 1}]
        else:
            caption = f"a photo of {_a(shape)} that is {color}"
            include = [{"class": shape, "count": 1, "color": color}]
        return objects, caption, {"include": include}
    if category in ("two_object", "color_attr"):
        shapes = _pick(rng, SHAPES, 2)
        colors = (_pick(rng, COLORS, 2) if category == "color_attr"
                  else [_pick(rng, COLORS)[0], _pick(rng, COLORS)[0]])
        objects = _scatter(rng, list(zip(shapes, colors)))
        if objects is None:
            return None
        caption = (f"a photo of {_a(f'{colors[0]} {shapes[0]}')} and "
                   f"{_a(f'{colors[1]} {shapes[1]}')}")
        include = [{"class": s, "count": 1} for s in shapes]
        if category == "color_attr":
            for req, color in zip(include, colors):
                req["color"] = color
        return objects, caption, {"include": include}
    if category == "counting":
        count = int(rng.integers(2, 5))
        (shape,), (color,) = _pick(rng, SHAPES), _pick(rng, COLORS)
        objects = _scatter(rng, [(shape, color)] * count)
        if objects is None:
            return None
        caption = f"a photo of {NUMBER_WORDS[count]} {color} {shape}s"
        return objects, caption, {"include": [{"class": shape, "count": count}],
                                  "exclude": [{"class": shape, "count": count + 1}]}
    # position: object a (second in include) stands in `relation` to reference b (first).
    shape_a, shape_b = _pick(rng, SHAPES, 2)
    color_a, color_b = _pick(rng, COLORS)[0], _pick(rng, COLORS)[0]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    objects = _scatter(rng, [(shape_b, color_b), (shape_a, color_a)])
    if objects is None or not _unambiguous(objects[1], objects[0], relation):
        return None
    caption = (f"a photo of {_a(f'{color_a} {shape_a}')} {RELATION_PHRASES[relation]} "
               f"{_a(f'{color_b} {shape_b}')}")
    include = [{"class": shape_b, "count": 1},
               {"class": shape_a, "count": 1, "position": [relation, 0]}]
    return objects, caption, {"include": include}


def _normalise_mix(mix: Mapping[str, float] | None, names: Sequence[str], what: str) -> np.ndarray:
    if mix is None:
        return np.full(len(names), 1.0 / len(names))
    unknown = set(mix) - set(names)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; expected some of {list(names)}")
    weights = np.array([float(mix.get(n, 0.0)) for n in names])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"{what} weights must be non-negative with a positive sum, "
                         f"got {dict(mix)}")
    return weights / weights.sum()


def _check_length(num_samples) -> None:
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")


def _check_index(index, length: int) -> int:
    if not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an integer, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    return index


class SyntheticCompositionalDataset:
    """Text-to-image samples: {"image": uint8 (S, S, 3), "caption", "metadata", "objects", "index"}.

    Args:
      num_samples: the dataset length (samples are drawn on demand; any length is cheap).
      image_size: side in pixels, 32..512.
      seed: samples are a function of (seed, index) only.
      category_mix: optional {category: weight}; default uniform over CATEGORIES.
    """

    def __init__(self, num_samples: int = 100_000, image_size: int = 64, seed: int = 0,
                 category_mix: Mapping[str, float] | None = None):
        _check_length(num_samples)
        _check_image_size(image_size)
        self.num_samples, self.image_size, self.seed = int(num_samples), int(image_size), int(seed)
        self._weights = _normalise_mix(category_mix, CATEGORIES, "categories")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, self.num_samples)
        rng = np.random.default_rng([self.seed, index, _STREAM_DATASET])
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=self._weights))]
        objects, caption, metadata = sample_scene(rng, category)
        return {"image": render(objects, self.image_size), "caption": caption,
                "metadata": metadata, "objects": [o.to_dict() for o in objects], "index": index}

    def __repr__(self) -> str:
        return (f"SyntheticCompositionalDataset(num_samples={self.num_samples}, "
                f"image_size={self.image_size}, seed={self.seed})")


def prompts(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """n evaluation prompts (caption, GenEval-style metadata line), categories in turn."""
    _check_length(n)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, _STREAM_PROMPTS])
        _, caption, metadata = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        out.append((caption, metadata))
    return out


# What may join two object phrases of a caption: (relation or "and", its words).
_CAPTION_LINKS = [("and", ["and"])] + [(r, p.split()) for r, p in RELATION_PHRASES.items()]


def caption_metadata(caption: str) -> dict | None:
    """The claims of a caption in this dataset's grammar, as GenEval-style metadata with every
    stated colour (and relation, and for counts the exclusion of one more), or None when the
    caption is not in the grammar. The inverse of the caption templates above, for scoring what an
    MLLM says about an image (`uniimage_jax.eval.caption_scorer`):

      "a photo of a red circle" | "a photo of a circle that is red"
      "a photo of a red circle and a blue square" (classes distinct)
      "a photo of three red circles"
      "a photo of a red circle to the left of a blue square"
    """
    words = caption.strip().rstrip(".").lower().split()
    if words[:3] != ["a", "photo", "of"]:
        return None
    words = words[3:]
    counts = {w: n for n, w in NUMBER_WORDS.items() if n > 1}
    if len(words) == 3 and words[0] in counts and words[1] in PALETTE and \
            words[2].endswith("s") and words[2][:-1] in SHAPES:
        n, shape = counts[words[0]], words[2][:-1]
        return {"include": [{"class": shape, "count": n, "color": words[1]}],
                "exclude": [{"class": shape, "count": n + 1}]}
    phrases, links, i = [], [], 0
    while True:
        parsed = _parse_object_phrase(words, i)
        if parsed is None:
            return None
        (shape, color), i = parsed
        phrases.append({"class": shape, "count": 1, "color": color})
        if i == len(words):
            break
        for link, phrase in _CAPTION_LINKS:
            if words[i:i + len(phrase)] == phrase:
                break
        else:
            return None
        links.append(link)
        i += len(phrase)
    if len({p["class"] for p in phrases}) != len(phrases):
        return None  # the grammar never names a class twice
    if links == [] or all(link == "and" for link in links):
        return {"include": phrases}
    if len(links) == 1:  # "A <relation> B": B is the reference, A stands in the relation to it
        return {"include": [phrases[1], {**phrases[0], "position": [links[0], 0]}]}
    return None


def _parse_object_phrase(words: Sequence[str], i: int):
    """((shape, colour), next index) for "a/an COLOUR SHAPE" or "a/an SHAPE that is COLOUR"."""
    if i >= len(words) or words[i] not in ("a", "an"):
        return None
    rest = words[i + 1:]
    if len(rest) >= 2 and rest[0] in PALETTE and rest[1] in SHAPES:
        return (rest[1], rest[0]), i + 3
    if len(rest) >= 4 and rest[0] in SHAPES and rest[1:3] == ["that", "is"] and \
            rest[3] in PALETTE:
        return (rest[0], rest[3]), i + 5
    return None


# ---------------------------------------------------------------------------------------------
# Edit pairs
# ---------------------------------------------------------------------------------------------


def _describe(objects: Sequence[SceneObject]) -> list[dict]:
    """Metadata include list that pins every object's class and colour (classes are distinct)."""
    return [{"class": o.shape, "count": 1, "color": o.color} for o in objects]


def _caption(objects: Sequence[SceneObject]) -> str:
    parts = [_a(f"{o.color} {o.shape}") for o in objects]
    return "a photo of " + (" and ".join(parts) if parts else "nothing")


def _sample_edit_once(rng, edit):
    n_source = {"recolor": (1, 3), "move": (2, 3), "add": (1, 2), "remove": (2, 3)}[edit]
    n = int(rng.integers(n_source[0], n_source[1] + 1))
    shapes = _pick(rng, SHAPES, n)
    colors = [_pick(rng, COLORS)[0] for _ in range(n)]
    source = _scatter(rng, list(zip(shapes, colors)))
    if source is None:
        return None
    k = int(rng.integers(n))
    obj = source[k]
    if edit == "recolor":
        (color,) = _pick(rng, COLORS, exclude=(obj.color,))
        target = list(source)
        target[k] = dataclasses.replace(obj, color=color)
        return source, target, f"make the {obj.shape} {color}", {"include": _describe(target)}
    if edit == "remove":
        target = source[:k] + source[k + 1:]
        return source, target, f"remove the {obj.shape}", {
            "include": _describe(target), "exclude": [{"class": obj.shape, "count": 1}]}
    if edit == "add":
        (shape,), (color,) = _pick(rng, SHAPES, exclude=shapes), _pick(rng, COLORS)
        new = _place(rng, shape, color, source, n + 1)
        if new is None:
            return None
        target = source + [new]
        return source, target, f"add {_a(f'{color} {shape}')}", {"include": _describe(target)}
    # move: obj goes from one side of a reference object to the opposite side, along one axis.
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    # The reference sits near the middle of the moving axis so there is room on both sides.
    axis = "cx" if relation in ("left of", "right of") else "cy"
    j = (k + 1) % n
    source[j] = dataclasses.replace(source[j], **{axis: float(rng.uniform(0.42, 0.58))})
    ref = source[j]
    if not _fits(ref, [o for i, o in enumerate(source) if i not in (j, k)]):
        return None
    others = [o for i, o in enumerate(source) if i != k]
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    start = _place_along(rng, obj, ref, opposite[relation], others, keep_other_axis=False)
    if start is None:
        return None
    source = source[:k] + [start] + source[k + 1:]
    moved = _place_along(rng, start, ref, relation, others, keep_other_axis=True)
    if moved is None:
        return None
    target = source[:k] + [moved] + source[k + 1:]
    include = _describe([ref]) + [{**_describe([moved])[0], "position": [relation, 0]}]
    include += _describe([o for o in others if o is not ref])
    return source, target, f"move the {obj.shape} {MOVE_DIRECTIONS[relation]}", {"include": include}


def _place_along(rng, obj: SceneObject, ref: SceneObject, relation: str,
                 others: Sequence[SceneObject], keep_other_axis: bool) -> SceneObject | None:
    """obj placed so that it stands unambiguously in `relation` to ref: a random position on the
    relation's axis, and on the other axis either its current position or one close to ref's."""
    horizontal = relation in ("left of", "right of")
    axis, other_axis = ("cx", "cy") if horizontal else ("cy", "cx")
    half = obj.size / 2
    for _ in range(_MAX_TRIES):
        change = {axis: float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))}
        if not keep_other_axis:
            jitter = float(rng.uniform(-0.25, 0.25)) * ref.size
            change[other_axis] = getattr(ref, other_axis) + jitter
        candidate = dataclasses.replace(obj, **change)
        if _fits(candidate, others) and _unambiguous(candidate, ref, relation):
            return candidate
    return None


def sample_edit(rng: np.random.Generator, edit: str):
    """(source objects, target objects, instruction, target metadata) of one edit of kind `edit`."""
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")
    for _ in range(_MAX_TRIES):
        drawn = _sample_edit_once(rng, edit)
        if drawn is not None:
            source, target, instruction, metadata = drawn
            return source, target, instruction, {"tag": f"edit_{edit}", **metadata,
                                                 "prompt": instruction}
    raise RuntimeError(f"could not build a {edit} edit")  # not reached with these sizes


class SyntheticEditDataset:
    """Image+text-to-image samples: {"source_image", "target_image" (uint8 (S, S, 3)),
    "instruction", "source_caption", "target_caption", "metadata" (the target's, GenEval-style),
    "edit", "index"}. Deterministic by (seed, index), like SyntheticCompositionalDataset."""

    def __init__(self, num_samples: int = 100_000, image_size: int = 64, seed: int = 0,
                 edit_mix: Mapping[str, float] | None = None):
        _check_length(num_samples)
        _check_image_size(image_size)
        self.num_samples, self.image_size, self.seed = int(num_samples), int(image_size), int(seed)
        self._weights = _normalise_mix(edit_mix, EDITS, "edits")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, self.num_samples)
        rng = np.random.default_rng([self.seed, index, _STREAM_EDIT])
        edit = EDITS[int(rng.choice(len(EDITS), p=self._weights))]
        source, target, instruction, metadata = sample_edit(rng, edit)
        return {"source_image": render(source, self.image_size),
                "target_image": render(target, self.image_size),
                "instruction": instruction, "source_caption": _caption(source),
                "target_caption": _caption(target), "metadata": metadata, "edit": edit,
                "index": index}

    def __repr__(self) -> str:
        return (f"SyntheticEditDataset(num_samples={self.num_samples}, "
                f"image_size={self.image_size}, seed={self.seed})")
