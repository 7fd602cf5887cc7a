"""A built-in synthetic compositional dataset: flat coloured shapes on a plain background, with
GenEval-style captions and metadata, for smoke training and for a cheap, deterministic benchmark.

Everything is drawn procedurally (no files) and is deterministic by index: sample `i` of a dataset
with seed `s` comes from `numpy.random.default_rng([s, i, stream])`, so any worker can draw any
sample in any order (the class is a grain `RandomAccessDataSource`: `__len__` + `__getitem__`).

Categories mirror GenEval's (metadata `tag`):
  single_object  "a photo of a red circle"                    include [{class, count 1, color}]
  two_object     "a photo of a red circle and a red square"   two classes, each colour drawn alone
  counting       "a photo of three green triangles"           count n (2..4) with its colour,
                                                              exclude n + 1
  colors         "a photo of a square that is yellow"         include [{class, count 1, color}]
  position       "a photo of a red circle to the left of a blue square"
                 include [{blue square}, {red circle, position: ["left of", 0]}]
  color_attr     "a photo of a red circle and a blue square"  two classes, two distinct colours
The metadata is what `uniimage_jax.eval.synthetic_scorer` checks (GenEval's rules). It claims
every colour, count and relation the caption states, in every category: both are made by one
caption template (`synthetic_captions`). (GenEval's own metadata checks colours only in its
colour categories; its prompts name no colour elsewhere, ours do.) Each sample also carries
`objects`, the full drawn scene.

Records hold ragged fields (metadata lists, objects); a grain pipeline keeps what it trains on
before batching, e.g. `grain.MapDataset.source(ds).map(lambda s: {"image": s["image"],
"caption": s["caption"]}).batch(b)`.

`SyntheticEditDataset` gives image+text-to-image pairs (recolour, move, add, remove) whose target
metadata the scorer verifies on the target image and rejects on the source image.

The shapes, their rendering and their placement are in `synthetic_scenes`; the words of the
captions and the parser that reads a caption back (`caption_metadata`) in `synthetic_captions`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from uniimage_jax.data.synthetic_captions import (MOVE_DIRECTIONS, count_caption,
                                                  objects_caption, relation_caption,
                                                  scene_caption, with_article)
from uniimage_jax.data.synthetic_scenes import (COLORS, MAX_TRIES, RELATIONS, SHAPES, SceneObject,
                                                check_image_size, fits, place, place_along,
                                                render, scatter, unambiguous)

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                               "color_attr")
EDITS: tuple[str, ...] = ("recolor", "move", "add", "remove")

_STREAM_DATASET, _STREAM_EDIT, _STREAM_PROMPTS = 0, 1, 2


def _pick(rng, options, k=1, exclude=()):
    pool = [o for o in options if o not in exclude]
    chosen = rng.choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in chosen]


def sample_scene(rng: np.random.Generator, category: str) -> tuple[list[SceneObject], str, dict]:
    """(objects, caption, metadata) of one scene of `category`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    for _ in range(MAX_TRIES):
        drawn = _sample_scene_once(rng, category)
        if drawn is not None:
            objects, caption, metadata = drawn
            metadata = {"tag": category, **metadata, "prompt": caption}
            return objects, caption, metadata
    raise RuntimeError(f"could not place a {category} scene")  # not reached with these sizes


def _sample_scene_once(rng, category):
    """(objects, caption, claims) or None when the objects did not fit; the caption and its claims
    come from one template of `synthetic_captions`, so the metadata checks every word of it."""
    if category in ("single_object", "colors"):
        (shape,), (color,) = _pick(rng, SHAPES), _pick(rng, COLORS)
        objects = scatter(rng, [(shape, color)])
        if objects is None:
            return None
        return (objects, *objects_caption([(shape, color)],
                                          color_after=category == "colors"))
    if category in ("two_object", "color_attr"):
        shapes = _pick(rng, SHAPES, 2)
        colors = (_pick(rng, COLORS, 2) if category == "color_attr"
                  else [_pick(rng, COLORS)[0], _pick(rng, COLORS)[0]])
        objects = scatter(rng, list(zip(shapes, colors)))
        if objects is None:
            return None
        return (objects, *objects_caption(list(zip(shapes, colors))))
    if category == "counting":
        count = int(rng.integers(2, 5))
        (shape,), (color,) = _pick(rng, SHAPES), _pick(rng, COLORS)
        objects = scatter(rng, [(shape, color)] * count)
        if objects is None:
            return None
        return (objects, *count_caption(shape, color, count))
    # position: object a stands in `relation` to the reference b.
    shape_a, shape_b = _pick(rng, SHAPES, 2)
    color_a, color_b = _pick(rng, COLORS)[0], _pick(rng, COLORS)[0]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    objects = scatter(rng, [(shape_b, color_b), (shape_a, color_a)])
    if objects is None or not unambiguous(objects[1], objects[0], relation):
        return None
    return (objects, *relation_caption((shape_a, color_a), relation, (shape_b, color_b)))


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
        check_image_size(image_size)
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


# ---------------------------------------------------------------------------------------------
# Edit pairs
# ---------------------------------------------------------------------------------------------


def _describe(objects: Sequence[SceneObject]) -> list[dict]:
    """Metadata include list that pins every object's class and colour (classes are distinct)."""
    return [{"class": o.shape, "count": 1, "color": o.color} for o in objects]


def _sample_edit_once(rng, edit):
    n_source = {"recolor": (1, 3), "move": (2, 3), "add": (1, 2), "remove": (2, 3)}[edit]
    n = int(rng.integers(n_source[0], n_source[1] + 1))
    shapes = _pick(rng, SHAPES, n)
    colors = [_pick(rng, COLORS)[0] for _ in range(n)]
    source = scatter(rng, list(zip(shapes, colors)))
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
        new = place(rng, shape, color, source, n + 1)
        if new is None:
            return None
        target = source + [new]
        instruction = f"add {with_article(f'{color} {shape}')}"
        return source, target, instruction, {"include": _describe(target)}
    # move: obj goes from one side of a reference object to the opposite side, along one axis.
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    # The reference sits near the middle of the moving axis so there is room on both sides.
    axis = "cx" if relation in ("left of", "right of") else "cy"
    j = (k + 1) % n
    source[j] = dataclasses.replace(source[j], **{axis: float(rng.uniform(0.42, 0.58))})
    ref = source[j]
    if not fits(ref, [o for i, o in enumerate(source) if i not in (j, k)]):
        return None
    others = [o for i, o in enumerate(source) if i != k]
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    start = place_along(rng, obj, ref, opposite[relation], others, keep_other_axis=False)
    if start is None:
        return None
    source = source[:k] + [start] + source[k + 1:]
    moved = place_along(rng, start, ref, relation, others, keep_other_axis=True)
    if moved is None:
        return None
    target = source[:k] + [moved] + source[k + 1:]
    include = _describe([ref]) + [{**_describe([moved])[0], "position": [relation, 0]}]
    include += _describe([o for o in others if o is not ref])
    return source, target, f"move the {obj.shape} {MOVE_DIRECTIONS[relation]}", {"include": include}


def sample_edit(rng: np.random.Generator, edit: str):
    """(source objects, target objects, instruction, target metadata) of one edit of kind `edit`."""
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")
    for _ in range(MAX_TRIES):
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
        check_image_size(image_size)
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
                "instruction": instruction, "source_caption": scene_caption(source),
                "target_caption": scene_caption(target), "metadata": metadata, "edit": edit,
                "index": index}

    def __repr__(self) -> str:
        return (f"SyntheticEditDataset(num_samples={self.num_samples}, "
                f"image_size={self.image_size}, seed={self.seed})")
