"""Random-access sources of RAW training records (grain's `RandomAccessDataSource` protocol:
`__len__` + `__getitem__`). Decoding, resizing and CFG dropout happen later, in `pipeline.py`.

Every source returns one of two record layouts; an image is a file path, encoded bytes, or an
already decoded uint8 (H, W, 3) array:

    t2i:  {"image": image, "caption": str}
    ti2i: {"source_images": [image, ...] (>= 1), "instruction": str, "target_image": image}

Sources:
- `JsonlSource`: a JSONL manifest (its layout: `manifest.py`), parsed and checked at
  construction: a malformed line raises an error naming file:line. Image files are NOT opened
  here; unreadable ones are skipped and counted by the pipeline.
- `SyntheticSource`: adapts `uniimage_jax.data.synthetic` (procedural shapes, no files); with
  `aspect_ratios`, each scene is padded with its plain background to a per-index aspect ratio.
- `TfdsSource`: a dataset written by `tfds_builder.py` (array_record), read through
  `tfds.builder(...).as_data_source`. TensorFlow / TFDS are imported only when one is built.
- `LatentRecordSource` (latent_records.py, `data.source = "latents"`): a latent cache, whose
  records carry encoded targets instead of images: {"latents", "caption", "name", "index"
  (in the encoded source), ti2i also "source_image"} (already resized and cropped).
- The published layouts, local or gs:// (each in its own module; which member / column / field
  holds what: record_fields.py): `WebDatasetSource` (`"wds"`, tar shards by a cached member
  index), `HfSource` (`"hf"`, Hugging Face Arrow / parquet tables), `JsonImagesSource`
  (`"json_images"`, JSON metadata beside image folders). Their records carry a "name"
  (`shard.tar:key`, `table[row]`, `meta.jsonl:line`) by which a bad sample is named.

`make_source` builds any of them from a config node (its `source` kind and fields), so a
mixture can build one per component.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

from uniimage_jax.data.manifest import check_task, read_manifest
from uniimage_jax.data.record_fields import Fields, config_value
from uniimage_jax.errors import ConfigError, UserError

_ASPECT_STREAM = 0xA5EC  # the synthetic aspect-ratio draw, apart from the scene's own stream


class JsonlSource:
    """Records of a JSONL manifest (see the module docstring), checked at construction."""

    def __init__(self, path: str | os.PathLike, task: str):
        self.path, self.task = os.fspath(path), check_task(task)
        self._records = read_manifest(self.path, task)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return dict(self._records[index])

    def content_key(self) -> str:
        """Changes when the manifest's bytes or its directory (which the paths are relative to)
        change: the key of the cached image sizes."""
        digest = hashlib.sha256(os.path.dirname(os.path.abspath(self.path)).encode() + b"\0")
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:32]

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, task={self.task!r}, len={len(self)})"


class SyntheticSource:
    """The built-in synthetic datasets as raw records (images already decoded).

    t2i: `SyntheticCompositionalDataset` (image, caption); ti2i: `SyntheticEditDataset`
    (source image, edit instruction, target image).

    Aspect ratios (h / w, e.g. (0.5, 1.0, 2.0)): sample i is padded with the background colour,
    symmetrically, from S x S to the ratio picked for it by a hash of (seed, i), so the longer
    side grows and the scene (and so its caption, positions included) is unchanged;
    `target_sizes` knows every size without drawing. Empty: square S x S, as before.
    """

    def __init__(self, task: str, num_samples: int, image_size: int, seed: int = 0,
                 aspect_ratios: Sequence[float] = ()):
        from uniimage_jax.data import synthetic

        self.task = check_task(task)
        cls = (synthetic.SyntheticCompositionalDataset if task == "t2i"
               else synthetic.SyntheticEditDataset)
        self.dataset = cls(num_samples=num_samples, image_size=image_size, seed=seed)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        if not all(0 < r < float("inf") for r in self.aspect_ratios):
            raise UserError(f"aspect ratios must be positive and finite, got {aspect_ratios}")
        self._seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def target_sizes(self, indices=None) -> np.ndarray:
        """(height, width) int64 rows of samples `indices` (default: all), without drawing them.
        The ratio of sample i is a hash of (seed, i) (splitmix64, vectorised: a start-up scan of
        millions of samples takes a moment, where one generator per sample would take minutes)."""
        s = self.dataset.image_size
        idx = np.arange(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        if not self.aspect_ratios:
            return np.full((len(idx), 2), s, np.int64)
        # The seed is hashed into a 64-bit offset, so that streams of different seeds never
        # line up (seed * K + i would repeat seed 0's draws at seed 1 shifted by K).
        offset = _splitmix64(np.array([(self._seed << 16 | _ASPECT_STREAM) % 2**64], np.uint64))
        with np.errstate(over="ignore"):
            keys = idx.astype(np.uint64) + offset[0]
        ratios = np.asarray(self.aspect_ratios)[_splitmix64(keys)
                                                % np.uint64(len(self.aspect_ratios))]
        tall = ratios >= 1
        long_side = np.maximum(s, np.round(s * np.where(tall, ratios, 1 / ratios))).astype(np.int64)
        return np.stack([np.where(tall, long_side, s), np.where(tall, s, long_side)], axis=1)

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index`, without drawing it."""
        h, w = self.target_sizes([index])[0]
        return int(h), int(w)

    def _pad(self, image: np.ndarray, index: int) -> np.ndarray:
        from uniimage_jax.data.synthetic_scenes import BACKGROUND

        h, w = self.target_size(index)
        s = self.dataset.image_size
        if (h, w) == (s, s):
            return image
        out = np.empty((h, w, 3), np.uint8)
        out[...] = BACKGROUND
        top, left = (h - s) // 2, (w - s) // 2
        out[top:top + s, left:left + s] = image
        return out

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if self.task == "t2i":
            return {"image": self._pad(sample["image"], index), "caption": sample["caption"]}
        return {"source_images": [self._pad(sample["source_image"], index)],
                "instruction": sample["instruction"],
                "target_image": self._pad(sample["target_image"], index)}

    def __repr__(self) -> str:
        ratios = f", aspect_ratios={self.aspect_ratios}" if self.aspect_ratios else ""
        return f"SyntheticSource(task={self.task!r}, {self.dataset!r}{ratios})"


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
        self._version = str(builder.info.version)

    def content_key(self) -> str:
        """The key of the cached image sizes: builder, version, split, data_dir and length (a
        written TFDS version is not rewritten in place)."""
        text = f"{self.name}|{self._version}|{self.split}|{self.data_dir}|{len(self)}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over a uint64 array (wrapping arithmetic): a well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def parse_aspect_ratios(text: str, field: str = "data.synthetic_aspect_ratios") -> tuple:
    """'0.5,1,2' -> (0.5, 1.0, 2.0) (h / w ratios); '' -> ()."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        ratios = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{field}={text!r}: expected comma-separated h/w ratios such as "
                         "'0.5,1,2'") from None
    if not all(0.0 < r < float("inf") for r in ratios):
        raise UserError(f"{field}={text!r}: every ratio must be positive and finite")
    return ratios


SOURCE_KINDS = ("synthetic", "jsonl", "tfds", "latents", "wds", "hf", "json_images")


def make_source(data_cfg, task: str, image_size: int, *, cache_dir: str | None = None,
                process_index: int = 0, process_count: int = 1) -> Sequence[dict]:
    """The raw-record source that a data config node names: `data_cfg.source` is its kind, the
    node's other fields its settings (`pipeline.default_data_config` lists them; a node may
    leave out the fields its kind does not read). `cache_dir` (the workdir) keeps what a source
    computes once at start-up (a WebDataset set's member index); `process_index` /
    `process_count` let the processes of one run share that work."""
    kind = data_cfg.source
    path = str(config_value(data_cfg, "path") or "")
    if kind in ("wds", "hf", "json_images") and not path:
        raise ConfigError(f"data.source={kind!r} needs data.path ({_PATH_HELP[kind]})")
    if kind == "wds":
        from uniimage_jax.data.webdataset_source import WebDatasetSource

        return WebDatasetSource(path, task, Fields.from_config(data_cfg), cache_dir=cache_dir,
                                process_index=process_index, process_count=process_count)
    if kind == "hf":
        from uniimage_jax.data.hf_source import HfSource

        return HfSource(path, task, Fields.from_config(data_cfg),
                        split=str(config_value(data_cfg, "hf_split") or "train"),
                        image_root=str(config_value(data_cfg, "image_root") or ""))
    if kind == "json_images":
        from uniimage_jax.data.json_images import JsonImagesSource

        return JsonImagesSource(path, task, Fields.from_config(data_cfg),
                                image_root=str(config_value(data_cfg, "image_root") or ""))
    if kind == "jsonl":
        if not data_cfg.path:
            raise ConfigError("data.source='jsonl' needs data.path (the JSONL manifest)")
        return JsonlSource(data_cfg.path, task)
    if kind == "synthetic":
        size = int(data_cfg.synthetic_image_size or image_size)
        return SyntheticSource(task, int(data_cfg.synthetic_num_samples), size,
                               int(data_cfg.synthetic_seed),
                               parse_aspect_ratios(data_cfg.synthetic_aspect_ratios))
    if kind == "tfds":
        if not data_cfg.tfds_name:
            raise ConfigError("data.source='tfds' needs data.tfds_name "
                              "(e.g. 'uniimage_user_data/t2i')")
        return TfdsSource(data_cfg.tfds_name, data_cfg.tfds_data_dir or None, task,
                          data_cfg.tfds_split)
    if kind == "latents":
        if not data_cfg.path:
            raise ConfigError("data.source='latents' needs data.path (the directory "
                              "uniimage-cache-latents wrote)")
        from uniimage_jax.data.latent_records import LatentRecordSource

        return LatentRecordSource(data_cfg.path, task=task, image_size=image_size,
                                  source_image_size=int(data_cfg.source_image_size))
    raise ConfigError(f"data.source must be one of {', '.join(map(repr, SOURCE_KINDS))}, "
                      f"got {kind!r}")


_PATH_HELP = {
    "wds": "the tar shards: a directory, a brace pattern such as "
           "'shards/{00000..00099}.tar', a glob or a list file",
    "hf": "a directory written by save_to_disk, or parquet files",
    "json_images": "the .json / .jsonl metadata beside the images",
}


def check_source(data_cfg, task: str, image_size: int) -> None:
    """The errors of a data config node that can be found in seconds, before any model is built:
    a WebDataset set's shards are listed (not indexed: that is the start-up's slow part), the
    other sources are opened as training opens them (a manifest or metadata file is read and
    checked, a table's columns are checked)."""
    if data_cfg.source == "wds":
        from uniimage_jax.data.shard_lists import resolve_shards

        if not config_value(data_cfg, "path"):
            raise ConfigError(f"data.source='wds' needs data.path ({_PATH_HELP['wds']})")
        resolve_shards(str(data_cfg.path))
        Fields.from_config(data_cfg)
        return
    make_source(data_cfg, task, image_size)
