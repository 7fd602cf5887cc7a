"""The JSONL manifest of a user's data set: one JSON object a line, image paths relative to the
manifest's directory, checked line by line (a malformed line raises `ManifestError` naming
file:line).

    t2i:  {"image": path, "caption": str}
    ti2i: {"source_image": path | [paths], "instruction": str (or "caption"), "target_image": path}

A line may also give the (target) image's "width" and "height" in pixels, which aspect buckets
then use instead of reading the file's header. Image files are not opened here.
"""

from __future__ import annotations

import os

from uniimage_jax.data.jsonl import read_json_objects
from uniimage_jax.errors import ConfigError, UserError

TASKS = ("t2i", "ti2i")


def check_task(task: str) -> str:
    """The task if it is one of TASKS; ConfigError otherwise."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    return task


def data_task(training_task: str) -> str:
    """The data a training task reads: a caption stage learns to describe the (image, caption)
    pairs of text-to-image data, so it reads 't2i'; 't2i' and 'ti2i' read their own (any other
    name is returned as is, for the caller to reject)."""
    return "t2i" if training_task == "caption" else training_task


class ManifestError(UserError):
    """A malformed JSONL manifest line; the message names file:line."""


def _resolve(base_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _string_field(obj: dict, key: str, where: str, allow_empty: bool) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ManifestError(f"{where}: field {key!r} must be a string, got {value!r}")
    if not allow_empty and not value:
        raise ManifestError(f"{where}: field {key!r} is empty")
    return value


_SIZE_FIELDS = {"width", "height"}


def _size_fields(obj: dict, where: str) -> dict:
    """The optional target image size of a manifest line (both fields or neither)."""
    given = _SIZE_FIELDS & set(obj)
    if not given:
        return {}
    if given != _SIZE_FIELDS:
        raise ManifestError(f"{where}: give both 'width' and 'height' or neither")
    for key in ("width", "height"):
        value = obj[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ManifestError(f"{where}: field {key!r} must be a positive integer, got "
                                f"{value!r}")
    return {"height": obj["height"], "width": obj["width"]}


def _parse_t2i(obj: dict, where: str, base_dir: str) -> dict:
    _reject_unknown(obj, {"image", "caption"} | _SIZE_FIELDS, where)
    if "caption" not in obj:
        raise ManifestError(f"{where}: missing field 'caption' (use \"\" for an unconditional "
                            "example)")
    return {"image": _resolve(base_dir, _string_field(obj, "image", where, False)),
            # An empty caption is valid: it is the unconditional prompt.
            "caption": _string_field(obj, "caption", where, True), **_size_fields(obj, where)}


def _parse_ti2i(obj: dict, where: str, base_dir: str) -> dict:
    _reject_unknown(obj, {"source_image", "instruction", "caption", "target_image"} | _SIZE_FIELDS,
                    where)
    if "instruction" in obj and "caption" in obj:
        raise ManifestError(f"{where}: give 'instruction' or 'caption', not both")
    key = "instruction" if "instruction" in obj else "caption"
    if key not in obj:
        raise ManifestError(f"{where}: missing field 'instruction' (or 'caption')")
    sources = obj.get("source_image")
    if isinstance(sources, str):
        sources = [sources]
    if (not isinstance(sources, list) or not sources
            or not all(isinstance(s, str) and s for s in sources)):
        raise ManifestError(f"{where}: 'source_image' must be a path or a non-empty list of "
                            f"paths, got {obj.get('source_image')!r}")
    return {"source_images": [_resolve(base_dir, s) for s in sources],
            "instruction": _string_field(obj, key, where, True),
            "target_image": _resolve(base_dir, _string_field(obj, "target_image", where, False)),
            **_size_fields(obj, where)}


def _reject_unknown(obj: dict, known: set, where: str) -> None:
    unknown = set(obj) - known
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(known)}")


def read_manifest(path: str | os.PathLike, task: str) -> list[dict]:
    """All records of a JSONL manifest (blank lines ignored), paths made absolute."""
    check_task(task)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ManifestError(f"data.path={path} is a directory: give the JSONL manifest file "
                            "inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base_dir = os.path.dirname(os.path.abspath(path))
    parse = _parse_t2i if task == "t2i" else _parse_ti2i
    # "name" (file:line) is how warnings about the record (e.g. a cut caption) point at it.
    records = [{**parse(obj, f"{path}:{lineno}", base_dir), "name": f"{path}:{lineno}"}
               for lineno, _, obj in read_json_objects(path, error=ManifestError)]
    if not records:
        raise ManifestError(f"{path}: the manifest has no records")
    return records
