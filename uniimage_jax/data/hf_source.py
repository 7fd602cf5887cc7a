"""`data.source = "hf"`: a Hugging Face table, read by row through the `datasets` library.

`data.path` is either
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (Arrow; the
  official recipe loads GPT-Image-Edit-1.5M and its stage-3 set this way, with
  `load_from_disk`); for a DatasetDict `data.hf_split` picks the split; or
- parquet: one `.parquet` file, a directory of them or a glob. `datasets` converts parquet once
  into Arrow files in its cache (on local disk: `$UNIIMAGE_CACHE` or ~/.cache/uniimage_jax), and
  reuses them while the parquet files are unchanged.

Either way the rows are memory-mapped Arrow: random access, nothing copied into host memory.
Rows are read as raw Arrow values (`with_format("arrow")`), so `datasets` never decodes an image
itself: the pipeline does, skipping and counting what does not decode (`datasets` would raise,
and the official loader substitutes a black image). Columns (record_fields.py): the image
columns (`data.image_field`, or `data.source_image_field` / `data.target_image_field`) hold
encoded bytes, image cells `{"bytes", "path"}` or paths (relative to `data.image_root`, default
the dataset's directory); the text columns (`data.caption_field`, `data.instruction_field`) a
string or a list of strings (the last is used). Only the columns used are read.

On `gs://`: memory-mapping needs local files, so the Arrow directory (or the parquet files) is
copied once into the local cache and reused while the objects are unchanged
(`storage.local_mirror` / `local_copy`). `datasets`' own `load_from_disk` of a remote directory
would copy it into a temporary directory again at every start, and streaming from the bucket
would lose random access.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

from uniimage_jax import storage
from uniimage_jax.data.manifest import check_task
from uniimage_jax.data.record_fields import Fields, image_list, image_value, text_value
from uniimage_jax.errors import ConfigError
from uniimage_jax.paths import is_url

_ARROW_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source='hf' needs the `datasets` package: "
                          "pip install 'uniimage_jax[hf]'") from None
    return datasets


def _parent(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def _cache_dir() -> str:
    return os.path.join(os.path.dirname(storage.default_cache_dir()), "hf_datasets")


def _parquet_files(spec: str) -> list[str]:
    """The parquet files `spec` names, or [] when it names a saved (Arrow) directory."""
    if any(ch in spec.split("://", 1)[-1] for ch in "*?["):
        found = [p for p in storage.glob_files(spec) if p.endswith(".parquet")]
        if not found:
            raise ConfigError(f"data.path={spec!r}: no .parquet file matches the glob")
        return found
    if spec.endswith(".parquet"):
        if not storage.exists(spec):
            raise ConfigError(f"data.path={spec!r} does not exist")
        return [spec]
    if not storage.path(spec).is_dir():
        raise ConfigError(f"data.path={spec!r}: expected a directory written by "
                          "save_to_disk, a .parquet file, a directory of them or a glob")
    files = storage.list_files(spec)
    names = {f.rstrip("/").rsplit("/", 1)[-1] for f in files}
    if names & set(_ARROW_MARKERS):
        return []
    parquet = [p for p in files if p.endswith(".parquet")]
    if not parquet:
        raise ConfigError(f"data.path={spec!r}: neither a save_to_disk directory (no "
                          f"{' / '.join(_ARROW_MARKERS)}) nor a directory of .parquet files")
    return parquet


def open_table(spec: str, split: str = "train"):
    """(the `datasets.Dataset` that `spec` names, the directory its relative image paths
    start from by default); see the module docstring."""
    datasets = _datasets()
    parquet = _parquet_files(spec)
    if parquet:
        local = [storage.local_copy(p) for p in parquet]
        table = datasets.Dataset.from_parquet(local, cache_dir=_cache_dir())
        return table, (spec if storage.path(spec).is_dir() else _parent(parquet[0]))
    table = datasets.load_from_disk(storage.local_mirror(spec))
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise ConfigError(f"data.hf_split={split!r}: {spec} has the splits "
                              f"{sorted(table)}")
        table = table[split]
    return table, spec


class HfSource:
    """Rows of a Hugging Face table as raw records (see the module docstring)."""

    def __init__(self, path: str, task: str, fields: Fields = Fields(), *, split: str = "train",
                 image_root: str = ""):
        self.path, self.task, self.split = str(path).rstrip("/"), check_task(task), str(split)
        table, default_root = open_table(self.path, self.split)
        columns = list(table.column_names)
        self._root = image_root or default_root
        if self.task == "t2i":
            self._columns = {"image": fields.image or "image",
                             "caption": fields.caption or "caption"}
        else:
            instruction = fields.instruction or ("instruction" if "instruction" in columns
                                                 else "caption")
            self._columns = {"source_images": fields.source_images[0]
                             if len(fields.source_images) == 1 else None,
                             "instruction": instruction, "target_image": fields.target_image}
            if self._columns["source_images"] is None:
                raise ConfigError("data.source_image_field: an hf table gives the source "
                                  "images as one column (a path, an image or a list of them), "
                                  f"got {','.join(fields.source_images)!r}")
        for role, column in self._columns.items():
            if column not in columns:
                field = {"image": "image_field", "caption": "caption_field",
                         "source_images": "source_image_field",
                         "instruction": "instruction_field",
                         "target_image": "target_image_field"}[role]
                raise ConfigError(f"data.{field}={column!r}: {self.path} has no such column; "
                                  f"its columns are {columns}")
        self._fingerprint = getattr(table, "_fingerprint", "")
        self._table = table.select_columns(sorted(set(self._columns.values()))) \
            .with_format("arrow")
        self._text_column = self._columns["caption" if self.task == "t2i" else "instruction"]
        self._texts = table.select_columns([self._text_column]).with_format("arrow")

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index: int) -> dict:
        row = self._table[int(index)].to_pylist()[0]
        name = f"{self.path}[{int(index)}]"
        c = self._columns
        if self.task == "t2i":
            return {"image": image_value(row[c["image"]], self._root, name, "image"),
                    "caption": text_value(row[c["caption"]], name, "caption"), "name": name}
        return {"source_images": image_list(row[c["source_images"]], self._root, name,
                                            "source image"),
                "instruction": text_value(row[c["instruction"]], name, "instruction"),
                "target_image": image_value(row[c["target_image"]], self._root, name,
                                            "target image"),
                "name": name}

    def caption_text(self, index: int) -> str:
        """The caption (t2i) or instruction (ti2i) of row `index`, reading its text column only."""
        value = self._texts[int(index)].to_pylist()[0][self._text_column]
        return text_value(value, f"{self.path}[{int(index)}]",
                          "caption" if self.task == "t2i" else "instruction")

    def content_key(self) -> str:
        """Changes with the table's content (its `datasets` fingerprint) and the columns read."""
        text = repr((self.path, self.split, self._fingerprint, self._columns, self._root))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"HfSource({self.path!r}, split={self.split!r}, task={self.task!r}, len={len(self)})"

