"""Random-access sources of RAW training records (grain's `RandomAccessDataSource` protocol:
`__len__` + `__getitem__`). Decoding, resizing and CFG dropout happen later, in `pipeline.py`.

Every source returns one of two record layouts; an image is a file path, encoded bytes, or an
already decoded uint8 (H, W, 3) array:

    t2i:  {"image": image, "caption": str}
    ti2i: {"source_images": [image, ...] (>= 1), "instruction": str, "target_image": image}

Sources:
- `JsonlSource`: a JSONL manifest; image paths are relative to the manifest's directory. t2i lines
  are {"image": path, "caption": str}; ti2i lines {"source_image": path | [paths],
  "instruction": str (or "caption"), "target_image": path}. The manifest is parsed and checked at
  construction: a malformed line raises an error naming file:line. Image files are NOT opened
  here; unreadable ones are skipped and counted by the pipeline.
- `SyntheticSource`: adapts `uniimage_jax.data.synthetic` (procedural shapes, no files).
- `TfdsSource`: a dataset written by `tfds_builder.py` (array_record), read through
  `tfds.builder(...).as_data_source`. TensorFlow / TFDS are imported only when one is built.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from uniimage_jax.data.jsonl import read_json_objects
from uniimage_jax.errors import ConfigError, UserError

TASKS = ("t2i", "ti2i")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    return task


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


def _parse_t2i(obj: dict, where: str, base_dir: str) -> dict:
    _reject_unknown(obj, {"image", "caption"}, where)
    if "caption" not in obj:
        raise ManifestError(f"{where}: missing field 'caption' (use \"\" for an unconditional "
                            "example)")
    return {"image": _resolve(base_dir, _string_field(obj, "image", where, False)),
            # An empty caption is valid: it is the unconditional prompt.
            "caption": _string_field(obj, "caption", where, True)}


def _parse_ti2i(obj: dict, where: str, base_dir: str) -> dict:
    _reject_unknown(obj, {"source_image", "instruction", "caption", "target_image"}, where)
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
            "target_image": _resolve(base_dir, _string_field(obj, "target_image", where, False))}


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


class JsonlSource:
    """Records of a JSONL manifest (see the module docstring), checked at construction."""

    def __init__(self, path: str | os.PathLike, task: str):
        self.path, self.task = os.fspath(path), check_task(task)
        self._records = read_manifest(self.path, task)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return dict(self._records[index])

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, task={self.task!r}, len={len(self)})"


class SyntheticSource:
    """The built-in synthetic datasets as raw records (images already decoded).

    t2i: `SyntheticCompositionalDataset` (image, caption); ti2i: `SyntheticEditDataset`
    (source image, edit instruction, target image).
    """

    def __init__(self, task: str, num_samples: int, image_size: int, seed: int = 0):
        from uniimage_jax.data import synthetic

        self.task = check_task(task)
        cls = (synthetic.SyntheticCompositionalDataset if task == "t2i"
               else synthetic.SyntheticEditDataset)
        self.dataset = cls(num_samples=num_samples, image_size=image_size, seed=seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if self.task == "t2i":
            return {"image": sample["image"], "caption": sample["caption"]}
        return {"source_images": [sample["source_image"]], "instruction": sample["instruction"],
                "target_image": sample["target_image"]}

    def __repr__(self) -> str:
        return f"SyntheticSource(task={self.task!r}, {self.dataset!r})"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # 0-d numpy array of bytes / str
        return _text(value.item())
    return str(value)


class TfdsSource:
    """A dataset written by `tfds_builder.build_tfds_dataset` (array_record), random access.

    `name` is "<builder>/<config>" (e.g. "uniimage_user_data/t2i"); the record layout follows the
    config. Decoding errors of a stored record surface as `UnreadableImageError` naming the record.
    """

    def __init__(self, name: str, data_dir: str | None, task: str, split: str = "train"):
        import tensorflow_datasets as tfds

        from uniimage_jax.data import tfds_builder  # registers the builder  # noqa: F401

        self.name, self.data_dir, self.split = name, data_dir, split
        self.task = check_task(task)
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not built under data_dir={data_dir!r}; build it with "
                "uniimage_jax.data.tfds_builder.build_tfds_dataset(manifest, data_dir, kind)")
        splits = builder.info.splits
        if split not in splits:
            raise ConfigError(f"TFDS dataset {name!r} has no split {split!r}; "
                              f"it has {sorted(splits)}")
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        from uniimage_jax.data.images import UnreadableImageError

        label = f"tfds:{self.name}[{self.split}][{index}]"
        try:
            record = self._source[index]
        except Exception as e:  # any decode failure of one stored record: skip it, name it
            raise UnreadableImageError(label, f"record decode failed ({e})") from None
        file_name = _text(record.get("file_name", label)) or label
        if self.task == "t2i":
            return {"image": record["image"], "caption": _text(record["caption"]),
                    "name": file_name}
        return {"source_images": [record["source_image"]],
                "instruction": _text(record["instruction"]),
                "target_image": record["target_image"], "name": file_name}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, data_dir={self.data_dir!r}, split={self.split!r})"


def make_source(data_cfg, task: str, image_size: int) -> Sequence[dict]:
    """The raw-record source that `data_cfg.source` names."""
    kind = data_cfg.source
    if kind == "jsonl":
        if not data_cfg.path:
            raise ConfigError("data.source='jsonl' needs data.path (the JSONL manifest)")
        return JsonlSource(data_cfg.path, task)
    if kind == "synthetic":
        size = int(data_cfg.synthetic_image_size or image_size)
        return SyntheticSource(task, int(data_cfg.synthetic_num_samples), size,
                               int(data_cfg.synthetic_seed))
    if kind == "tfds":
        if not data_cfg.tfds_name:
            raise ConfigError("data.source='tfds' needs data.tfds_name "
                              "(e.g. 'uniimage_user_data/t2i')")
        return TfdsSource(data_cfg.tfds_name, data_cfg.tfds_data_dir or None, task,
                          data_cfg.tfds_split)
    raise ConfigError(f"data.source must be 'synthetic', 'jsonl' or 'tfds', got {kind!r}")
