"""A deterministic scorer for the synthetic compositional benchmark (no learned model).

It plays the part of GenEval's detector for `uniimage_jax.data.synthetic` images:
  1. each pixel takes the nearest palette colour (or background), or none when it is far from all;
     the most common label on the image border is treated as background as well;
  2. 4-connected components of one colour are candidate objects; specks (< 0.2% of the image),
     huge regions (> 45%) and ragged blobs (low box fill, elongated boxes) are dropped;
  3. each object is classified by its box fill ratio and the height of its centroid in its box:
     square ~1, circle ~pi/4, diamond ~1/2 centred, triangle ~1/2 with the centroid 2/3 down;
  4. the metadata is checked with GenEval's rules: for every `include` entry, at least `count`
     objects of that class (largest first), the first `count` of them with the requested `color`,
     and each of them in the requested relative `position` to every object matched by the
     referenced entry; for every `exclude` entry, fewer than `count` objects of that class. (An
     entry whose class an earlier entry named takes the next objects of that class.)
The synthetic prompts' metadata claims every colour, count and relation their words state
(`uniimage_jax.data.synthetic_captions`), so a sample is correct only when all of them hold.

`score_images` reports accuracy per category (`tag`) and `overall`, the mean over categories, as
GenEval does. `main(argv)` scores a folder in GenEval's layout:
`OUT/<5-digit index>/metadata.jsonl` + `OUT/<index>/samples/*.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Mapping, Sequence

import numpy as np

from uniimage_jax.data.synthetic_scenes import BACKGROUND, PALETTE, SHAPES, relative_position

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
_REFERENCE = np.array([PALETTE[c] for c in COLOR_NAMES] + [BACKGROUND], np.float32)
_BACKGROUND_LABEL = len(COLOR_NAMES)
_UNLABELLED = -1
MAX_COLOR_DISTANCE = 90.0  # RGB distance beyond which a pixel belongs to no palette colour
MIN_AREA_FRACTION = 0.002
MIN_AREA_PIXELS = 8
MAX_AREA_FRACTION = 0.45
MIN_FILL = 0.35  # below this box fill a component is a ragged blob, not a shape
MAX_ASPECT = 1.6


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image is too small to score: {image.shape[:2]}")
    return image[..., :3]


def color_labels(image) -> np.ndarray:
    """(H, W) int: palette index, len(palette) for background, -1 for no colour."""
    rgb = _as_rgb(image)
    h, w, _ = rgb.shape
    # Classify each distinct colour once (flat-shaded images have only a handful).
    rgb32 = rgb.astype(np.int32)
    packed = (rgb32[..., 0] << 16) | (rgb32[..., 1] << 8) | rgb32[..., 2]
    colors, inverse = np.unique(packed.ravel(), return_inverse=True)
    unique_rgb = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], -1).astype(np.float32)
    dist = np.linalg.norm(unique_rgb[:, None, :] - _REFERENCE[None], axis=-1)
    unique_labels = np.argmin(dist, axis=-1)
    unique_labels[np.min(dist, axis=-1) > MAX_COLOR_DISTANCE] = _UNLABELLED
    labels = unique_labels[inverse].reshape(h, w)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    if border.size:  # a uniform frame of a palette colour is background, not an object
        values, counts = np.unique(border, return_counts=True)
        dominant = values[np.argmax(counts)]
        if counts.max() > border.size // 2:
            labels[labels == dominant] = _BACKGROUND_LABEL
    return labels


def connected_components(labels: np.ndarray, ignore: Sequence[int] = ()) -> np.ndarray:
    """4-connected components of equal labels, as (H, W) int ids (-1 where ignored).

    Vectorised min-label propagation with pointer jumping (no scipy dependency): every pixel takes
    the smallest pixel id among same-label neighbours, then follows its id's own id until stable.
    """
    h, w = labels.shape
    active = ~np.isin(labels, list(ignore))
    big = h * w
    ids = np.where(active, np.arange(big).reshape(h, w), big)
    same_h = (labels[:, 1:] == labels[:, :-1]) & active[:, 1:] & active[:, :-1]
    same_v = (labels[1:] == labels[:-1]) & active[1:] & active[:-1]
    while True:
        new = ids.copy()
        np.minimum(new[:, 1:], np.where(same_h, ids[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_h, ids[:, 1:], big), out=new[:, :-1])
        np.minimum(new[1:], np.where(same_v, ids[:-1], big), out=new[1:])
        np.minimum(new[:-1], np.where(same_v, ids[1:], big), out=new[:-1])
        flat = new.ravel()
        for _ in range(4):  # pointer jumping: a pixel's id is a pixel whose id is at least as small
            jumped = np.where(flat < big, np.append(flat, big)[np.minimum(flat, big)], big)
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat.reshape(h, w)
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(active, ids, -1)


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape class of one component's boolean mask (cropped or not), or None if no shape."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if max(height, width) / min(height, width) > MAX_ASPECT:
        return None
    fill = ys.size / float(height * width)
    if fill < MIN_FILL:
        return None
    centroid_depth = (ys.mean() + 0.5 - ys.min()) / height  # 0 top .. 1 bottom
    if centroid_depth > 0.58 and fill < 0.75:
        return "triangle"
    if fill > 0.92:
        return "square"
    if fill > 0.68:
        return "circle"
    return "diamond"


def detect_objects(image) -> list[dict]:
    """Objects in the image, largest first: {class, color, box (x0, y0, x1, y1), area}."""
    labels = color_labels(image)
    h, w = labels.shape
    comps = connected_components(labels, ignore=(_UNLABELLED, _BACKGROUND_LABEL))
    ids, counts = np.unique(comps[comps >= 0], return_counts=True)
    min_area = max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * h * w)
    objects = []
    for cid, area in zip(ids, counts):
        if area < min_area or area > MAX_AREA_FRACTION * h * w:
            continue
        ys, xs = np.nonzero(comps == cid)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape = classify_shape(comps[y0:y1, x0:x1] == cid)
        if shape is None:
            continue
        objects.append({"class": shape, "color": COLOR_NAMES[labels[ys[0], xs[0]]],
                        "box": (float(x0), float(y0), float(x1), float(y1)), "area": int(area)})
    objects.sort(key=lambda o: -o["area"])
    return objects


def check_metadata(metadata: Mapping) -> None:
    """Raises ValueError naming the first field of GenEval-style metadata the scorer cannot use."""
    if not isinstance(metadata, Mapping) or "include" not in metadata:
        raise ValueError("metadata must be a dict with an 'include' list (GenEval format)")
    for req in list(metadata["include"]) + list(metadata.get("exclude", [])):
        if req.get("class") not in SHAPES:
            raise ValueError(f"metadata class {req.get('class')!r} is not one of {SHAPES}")
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"metadata count must be a positive integer, got {req.get('count')!r}")
        if "color" in req and req["color"] not in COLOR_NAMES:
            raise ValueError(f"metadata colour {req['color']!r} is not one of {COLOR_NAMES}")


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _claim(req: Mapping, include: Sequence[Mapping]) -> str:
    """An include entry in words: "1 red circle left of the square"."""
    words = [str(req["count"])] + ([req["color"]] if "color" in req else [])
    words.append(_plural(req["class"], req["count"]))
    if "position" in req:
        relation, group = req["position"]
        words.append(f"{relation} the {include[group]['class']}" if group < len(include)
                     else relation)
    return " ".join(words)


def _include_failure(req: Mapping, found: Sequence[Mapping], matched_groups: list) -> str | None:
    """Why the objects `found` for one include entry fail it (None: they satisfy it)."""
    if len(found) < req["count"]:
        return f"found {len(found)}"
    if "color" in req and sum(o["color"] == req["color"] for o in found) < req["count"]:
        return "found " + ", ".join(o["color"] for o in found)
    if "position" in req:
        relation, group = req["position"]
        if group >= len(matched_groups):
            raise ValueError(f"position refers to include entry {group}, which comes later")
        targets = matched_groups[group]
        if targets is None:
            return "the object it is placed against was not found"
        for o in found:
            for t in targets:
                relations = relative_position(o["box"], t["box"])
                if relation not in relations:
                    where = " and ".join(sorted(relations)) or "on no clear side of"
                    return f"found it {where} the {t['class']}"
    return None


def failed_claims(objects: Sequence[Mapping], metadata: Mapping) -> list[str]:
    """GenEval's rules applied to detected objects (as from `detect_objects`): each claim of the
    metadata that does not hold, in order, as "<claim>: <what was found>" (empty: all hold)."""
    check_metadata(metadata)
    by_class: dict[str, list] = {}
    for obj in objects:
        by_class.setdefault(obj["class"], []).append(obj)
    failures, matched_groups, taken = [], [], {}
    for req in metadata["include"]:
        # A class named again (a caption's "a purple square and a red square"; GenEval's
        # metadata never does it) takes the objects of that class the earlier entries left.
        start = taken.get(req["class"], 0)
        found = by_class.get(req["class"], [])[start: start + req["count"]]
        taken[req["class"]] = start + req["count"]
        why = _include_failure(req, found, matched_groups)
        if why is not None:
            failures.append(f"{_claim(req, metadata['include'])}: {why}")
        matched_groups.append(found if why is None else None)
    for req in metadata.get("exclude", []):
        present = len(by_class.get(req["class"], []))
        if present >= req["count"]:
            failures.append(f"fewer than {req['count']} {_plural(req['class'], req['count'])}: "
                            f"found {present}")
    return failures


def evaluate_objects(objects: Sequence[Mapping], metadata: Mapping) -> bool:
    """GenEval's rules applied to detected objects (as from `detect_objects`)."""
    return not failed_claims(objects, metadata)


def _place_words(box: Sequence[float], height: int, width: int) -> str:
    """Where a box's centre lies, by thirds of the image: "top left", "bottom", "centre"."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def describe_objects(objects: Sequence[Mapping], height: int, width: int) -> str:
    """Detected objects in words, largest first: "red circle (top left), blue square (centre)"."""
    if not objects:
        return "nothing"
    return ", ".join(f"{o['color']} {o['class']} ({_place_words(o['box'], height, width)})"
                     for o in objects)


def judge_image(image, metadata: Mapping) -> dict:
    """The scorer's verdict on one image with its reasons: {"correct": bool, "detected": the
    objects found in words, "failed": the first claim of the metadata that does not hold, or
    None}."""
    rgb = _as_rgb(image)
    objects = detect_objects(rgb)
    failures = failed_claims(objects, metadata)
    return {"correct": not failures, "detected": describe_objects(objects, *rgb.shape[:2]),
            "failed": failures[0] if failures else None}


def score_image(image, metadata: Mapping) -> bool:
    """Whether the image satisfies the GenEval-style metadata."""
    return evaluate_objects(detect_objects(image), metadata)


def score_images(pairs: Iterable[tuple[np.ndarray, Mapping]]) -> dict[str, float]:
    """Accuracy per metadata `tag` and `overall` (the mean over tags, as GenEval reports)."""
    return accuracy_by_tag((metadata.get("tag", "untagged"), score_image(image, metadata))
                           for image, metadata in pairs)


def accuracy_by_tag(verdicts: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """(tag, correct) pairs -> {tag: accuracy} sorted by tag, and `overall`: the mean over tags."""
    results: dict[str, list[bool]] = {}
    for tag, correct in verdicts:
        results.setdefault(tag, []).append(bool(correct))
    if not results:
        raise ValueError("nothing to score")
    scores = {tag: float(np.mean(v)) for tag, v in sorted(results.items())}
    scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def iter_geneval_folder(folder: str):
    """(image uint8, metadata) for every sample of a GenEval-layout output folder."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    prompt_dirs = sorted(d for d in os.listdir(folder) if d.isdigit())
    if not prompt_dirs:
        raise ValueError(f"{folder} holds no <index>/ prompt folders (GenEval layout)")
    for d in prompt_dirs:
        meta_path = os.path.join(folder, d, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"missing {meta_path}")
        with open(meta_path) as f:
            metadata = json.loads(f.readline())
        sample_dir = os.path.join(folder, d, "samples")
        names = sorted(n for n in os.listdir(sample_dir) if n.endswith(".png")) \
            if os.path.isdir(sample_dir) else []
        if not names:
            raise FileNotFoundError(f"no samples/*.png under {os.path.join(folder, d)}")
        for name in names:
            with Image.open(os.path.join(sample_dir, name)) as im:
                yield np.asarray(im.convert("RGB")), metadata


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Score a GenEval-layout folder of synthetic-"
                                     "benchmark generations with the deterministic scorer.")
    parser.add_argument("folder", help="OUT with OUT/<00000>/metadata.jsonl and samples/*.png")
    parser.add_argument("--json", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    scores = score_images(iter_geneval_folder(args.folder))
    for tag, value in scores.items():
        print(f"{tag:>16s}: {value:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
