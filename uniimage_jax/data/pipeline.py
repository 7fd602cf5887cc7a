"""Grain training pipelines: text-to-image (t2i) and image+text-to-image (ti2i) batches.

    source (raw records, sources.py; several sources with weights: mixture.py)
      -> MapDataset.range(N) -> shuffle(seed) -> repeat()      ONE global order, new every epoch
         (aspect buckets: whole same-bucket global batches, buckets.py)
         (weighted mixture: each epoch's slots -> examples, mixture.py)
      [-> LengthGroupedOrder]                                   similar prompt lengths per global
                                                                batch (length_groups.py)
      -> map_with_index(_ExampleTransform)                      decode, resize/crop, CFG dropout
      [-> map(_EncodeExample)]                                  the caller's example encoder
      -> _ProcessBlocks                                         this host's blocks of that order
      -> to_iter_dataset (threads) [-> mp_prefetch (processes)]
      -> _SkipUnreadable                                        drop + count + log bad examples
      -> batch(drop_remainder)                                  numpy batch dict
      -> TrainIterator                                          get_state()/set_state(), JSON-able

Per-host sharding deals consecutive blocks of `batch_size` elements of the global order to the
processes in turn, so the global batch of step s is elements [s*B, (s+1)*B) of the same global
order whatever the number of processes: a run on 2 hosts sees the batches of a run on 1 host
(and resumes across topologies) as long as no example is unreadable.

CFG dropout follows the official dataset.py, but its random number comes from
`default_rng([seed, epoch, example_index])` instead of a global RNG, so a resumed (or re-sharded)
run sees exactly the same batches:
- t2i: caption -> "" if r < caption_dropout (official 0.1).
- ti2i: caption -> "" if r < caption_dropout (0.2); the source image -> black if
  image_dropout_low <= r < image_dropout_high (0.1, 0.3): both for 0.1 <= r < 0.2.

Aspect buckets (`data.aspect_buckets`, default '' = the official square crop): every record's
target size is read once at start-up (record_sizes.py), each record goes to the bucket nearest in
aspect ratio, and the order is made of whole global batches of one bucket (buckets.py), so every
batch has one shape (h, w), and the step compiles once per bucket shape. An example that turns out
unreadable when decoded is logged and counted as below, and a deterministic other example of the
same bucket takes its place, so that its batch keeps its shape and size.

The example encoder (`make_train_iterator(example_encoder=...)`, optional) is the trainer's
model-input work per example (tokenisation, M-RoPE positions, ti2i image patches; built in the
train layer, which this layer must not import): it runs where the example is decoded, in the
read threads or, with worker_count > 0, in the worker processes, instead of on the main thread
between steps. Its arrays come back stacked under "model_inputs".

Batches (B = per-process batch, S = image_size, s = source_image_size):
    "target": float32 (B, S, S, 3) in [-1, 1]   resize shorter side + centre crop (images.py);
                                                 with buckets (B, h, w, 3): resize to cover
                                                 the batch's bucket + centre crop
    or "latents": float32 (B, h, w, c)           from a latent cache (data.source='latents',
                                                 latent_records.py): the scaled latents of the
                                                 same crop, encoded once; no image is decoded
    "caption": str array (B,)                    after dropout ("" = unconditional prompt)
    "index": int64 (B,)                          example index in the source
    "name": str array (B,)                       the record in messages (a manifest's file:line,
                                                 a tar shard's shard.tar:key)
    "num_skipped": int                           distinct unreadable examples met so far (cumulative)
    "num_empty_captions": int                    empty captions in this batch (dropped or given)
    ti2i also: "source_image": uint8 (B, s, s, 3)  ONE source image (the first), resized + cropped
    to a fixed size so shapes stay static (448 = 16 x 16 merged Qwen2.5-VL tokens); black if
    dropped.
    with an example encoder also: "model_inputs": {name: array with a leading B axis}.

Host memory of the reader, per process: about prefetch_buffer_size (64) finished examples
(S*S*3 float32 each, 3 MiB at S = 512, plus s*s*3 bytes for ti2i and, with the trainer's example
encoder, the 448 px source image's patches, 4.6 MiB: ~230 MiB t2i, ~530 MiB ti2i), plus one
image being decoded per read thread (read_threads, 4) or per worker process (worker_count, each
with worker_buffer_size batches buffered). A decode holds the encoded file and its decoded pixels: a
JPEG far larger than S is decoded at 1/2..1/8 scale (images.py), so a 100-megapixel camera photo
costs ~5 MB of pixels instead of ~300 MB; other formats are decoded in full, up to the
decompression-bomb limit (~179 megapixels, ~0.7 GB in RGBA) beyond which a file is skipped as
unreadable. Lower read_threads / prefetch_buffer_size to trade speed for memory.

Unreadable examples (missing / empty / truncated / non-image files, see images.py) are never
replaced by placeholders: they are skipped, counted once per example, and logged once, naming the
file, on the "uniimage_jax.data" logger; `TrainIterator.skipped_files()` lists them. A source
image is decoded even when dropout will black it out, so which examples are skipped does not
depend on the dropout draw. A whole epoch of a shard without one readable example is an error.

The module is a little over the project's usual ~450 lines because the pipeline above reads top to
bottom here, stage by stage, with the checks that run before any model is built.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from uniimage_jax.data.batch_keys import MODEL_INPUTS, target_key
from uniimage_jax.data.buckets import BucketPlan, check_bucket_set_name
from uniimage_jax.data.global_order import global_order
from uniimage_jax.data.images import (UnreadableImageError, check_rgb_uint8, load_image,
                                      resize_center_crop, resize_cover_crop, to_model_range)
from uniimage_jax.data.latent_records import LatentRecordSource
from uniimage_jax.data.manifest import check_task, data_task
from uniimage_jax.data.mixture import (check_mixture_fields, check_training_source,
                                       make_training_source)
from uniimage_jax.data.sources import parse_aspect_ratios
from uniimage_jax.errors import ConfigError

log = logging.getLogger("uniimage_jax.data")


# Official probabilities (dataset.py of TBAC-UniImage).
T2I_CAPTION_DROPOUT = 0.1
TI2I_CAPTION_DROPOUT = 0.2
TI2I_IMAGE_DROPOUT = (0.1, 0.3)
_DROPOUT_STREAM = 0x5EED  # keeps the dropout stream apart from any other use of the run seed
_MAX_SUBSTITUTES = 16     # draws from a bucket before an unreadable example stops the run


def default_data_config(task: str) -> ml_collections.ConfigDict:
    """The data part of a training config, with the official values for `task`."""
    check_task(task)
    c = ml_collections.ConfigDict()
    # 'synthetic' | 'jsonl' | 'tfds' | 'latents' | 'wds' | 'hf' | 'json_images' (sources.py)
    c.source = "synthetic"
    c.path = ""                     # jsonl: the manifest (image paths relative to it);
    #                                 latents: the directory uniimage-cache-latents wrote;
    #                                 wds / hf / json_images: the published set (below)
    c.tfds_name = ""                # tfds: '<builder>/<config>', e.g. 'uniimage_user_data/t2i'
    c.tfds_data_dir = ""            # tfds: where build_tfds_dataset wrote it ('' = TFDS default)
    c.tfds_split = "train"
    c.synthetic_num_samples = 100_000  # synthetic: dataset length (drawn on demand)
    c.synthetic_seed = 0            # synthetic: scene seed (independent of the data order)
    c.synthetic_image_size = 0      # synthetic: render size in pixels (0 = image_size, max 512)
    # synthetic: '' = square scenes; else comma-separated h/w ratios (e.g. '0.5,1,2'): each scene
    # is padded with its background to one of them, drawn by index (mixed shapes for buckets)
    c.synthetic_aspect_ratios = ""
    c.image_size = 512              # target side S (official 512 -> 16 x 16 DC-AE latents)
    c.source_image_size = 448       # ti2i source side s (448 = 16 x 16 merged Qwen tokens)
    # Aspect-ratio buckets for the target: '' = square centre crop of image_size (official);
    # 'sana_512' = SANA's 512 px aspect-ratio bins scaled to image_size (data/buckets.py): each
    # global batch is one bucket shape, images resized to cover it and centre-cropped
    c.aspect_buckets = ""
    # Prompt length buckets (processing/prompt_buckets.py): each batch is padded to the smallest
    # of these that holds its longest prompt (one compile per bucket); () = every prompt padded
    # to model.max_prompt_tokens. The trainer's example encoder tokenizes each prompt to the
    # largest bucket where grain reads it; the main thread cuts each batch to its bucket.
    c.prompt_buckets = ()
    # Length-grouped batches (length_groups.py), with prompt buckets only: within each window of
    # length_group_window global batches of the global order, prompts of similar token length
    # share a batch, so each batch is padded to the bucket of its own prompts. Caption token
    # counts are read once at start-up (cached under the workdir, caption_lengths.py).
    c.group_by_length = True
    c.length_group_window = 32
    # Several sources in one stage (mixture.py): () = the one source above; else a tuple of
    # dicts, each this data config's source fields replaced, plus an optional "weight" (none:
    # proportional to size, the concatenation), e.g. ({'path': 'a.jsonl'}, {'path': 'b.jsonl'})
    c.mixture = ()
    c.caption_dropout = T2I_CAPTION_DROPOUT if task == "t2i" else TI2I_CAPTION_DROPOUT
    # ti2i: the source image is blacked out when image_dropout_low <= r < image_dropout_high,
    # with the same r as the caption (r < caption_dropout). Unused by t2i.
    c.image_dropout_low = TI2I_IMAGE_DROPOUT[0] if task == "ti2i" else 0.0
    c.image_dropout_high = TI2I_IMAGE_DROPOUT[1] if task == "ti2i" else 0.0
    c.shuffle = True                # global per-epoch shuffle (grain index shuffle: no buffer)
    c.shuffle_seed = -1             # -1: use the run seed
    c.read_threads = 4              # threads decoding in each process (grain ReadOptions)
    c.prefetch_buffer_size = 64     # examples read ahead per process
    # Where examples are decoded and (trainer) tokenised / image-processed: 0 = in read_threads
    # threads of the training process; > 0 = in this many grain worker processes (each with
    # read_threads threads), out of the training process's GIL: for hosts with cores to spare.
    # Each example then crosses to the training process in shared memory (3 MiB of target, plus
    # 4.6 MiB of image patches for ti2i): on a busy 2-core host threads were ~2x faster.
    c.worker_count = 0
    c.worker_buffer_size = 2        # elements buffered per worker process
    # Published sets as shipped (local or gs://). data.path: wds = tar shards (a directory, a
    # brace pattern 'shards/{00000..01023}.tar', a glob or a list file; webdataset_source.py);
    # hf = a save_to_disk directory or parquet files (hf_source.py); json_images = JSON / JSONL
    # metadata beside image folders (json_images.py). Which member / column / field holds what
    # (record_fields.py), '' = the layout's default:
    c.image_field = ""              # t2i image: wds member ('' = first of jpg/jpeg/png/webp);
    #                                 hf / json_images ('' = 'image')
    c.caption_field = ""            # t2i caption: wds ('' = the txt member, NAME = that field
    #                                 of the json member); hf / json_images ('' = 'caption')
    c.source_image_field = ""       # ti2i source image(s), comma-separated ('' = 'source_image')
    c.instruction_field = ""        # ti2i instruction: wds as caption_field; hf / json_images
    #                                 ('' = 'instruction', else 'caption')
    c.target_image_field = ""       # ti2i target image ('' = 'target_image')
    c.image_root = ""               # hf / json_images: where relative image paths start
    #                                 ('' = the table's / metadata file's directory)
    c.hf_split = "train"            # hf: the split of a saved DatasetDict
    return c


def check_training_data(config) -> None:
    """The data errors of a training config (`uniimage_jax.train.config`), in seconds and before
    any model is built: the data fields, `batch_size`, and the source itself (a JSONL manifest is
    read and checked line by line, a TFDS dataset must be built, a WebDataset set's shards must
    exist, a table must have the columns named; `sources.check_source`). Image files are not opened:
    unreadable ones are skipped and counted during training. The manifest is read again when the
    iterator is made (a second parse costs far less than a late error)."""
    batch = config.batch_size
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ConfigError(f"config.batch_size must be a positive integer (the global batch), "
                          f"got {batch!r}")
    task = data_task(config.task)
    if task not in ("t2i", "ti2i"):
        return  # the trainer names the bad config.task
    data = config.data
    if config.task == "caption" and data.source == "latents":
        raise ConfigError("data.source='latents': a caption stage reads the target images, "
                          "which a latent cache does not hold; use the images' source")
    _check_config(data, task, int(data.image_size), int(data.source_image_size))
    check_training_source(data, task, int(data.image_size))


def _check_config(cfg, task: str, image_size: int, source_image_size: int) -> None:
    def prob(name):
        value = float(cfg[name])
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1], got {value}")
        return value

    prob("caption_dropout")
    lo, hi = prob("image_dropout_low"), prob("image_dropout_high")
    if lo > hi:
        raise ConfigError(f"data.image_dropout_low={lo} must be <= data.image_dropout_high={hi}")
    for name, value in (("image_size", image_size), ("source_image_size", source_image_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if int(cfg.worker_count) < 0 or int(cfg.read_threads) < 0:
        raise ConfigError("data.worker_count and data.read_threads must be >= 0")
    window = cfg.length_group_window
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"data.length_group_window must be a positive integer (global "
                          f"batches), got {window!r}")
    if not isinstance(cfg.group_by_length, (bool, np.bool_)):
        raise ConfigError(f"data.group_by_length must be true or false, got "
                          f"{cfg.group_by_length!r}")
    kinds = {cfg.source} | {c.get("source", cfg.source) for c in check_mixture_fields(cfg)}
    if cfg.aspect_buckets:
        if "latents" in kinds:
            raise ConfigError(f"data.aspect_buckets={cfg.aspect_buckets!r}: aspect buckets with "
                              "a latent cache (data.source='latents') are not supported; the "
                              "cache holds square crops of data.image_size (set "
                              "data.aspect_buckets='')")
        check_bucket_set_name(cfg.aspect_buckets)
    parse_aspect_ratios(cfg.synthetic_aspect_ratios)


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Marker for an unreadable example: travels down the pipeline in place of the example."""

    index: int
    path: str
    reason: str


def _as_image(image: Any, name: str, min_size: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return check_rgb_uint8(image, name)
    return load_image(image, name=name, min_size=min_size)  # a huge photo is decoded reduced


def dropout_draw(seed: int, epoch: int, index: int) -> float:
    """The uniform number r of example `index` in `epoch` that decides its CFG dropout."""
    return float(np.random.default_rng([seed, epoch, index, _DROPOUT_STREAM]).random())


def _label(image: Any, fallback: str) -> str:
    """How a bad image is named: its path, or for an array or encoded bytes (a tar member, a
    table cell) the record's name (e.g. `shard.tar:key`)."""
    return str(image) if isinstance(image, (str, os.PathLike)) else fallback


@dataclasses.dataclass(frozen=True)
class _ExampleTransform:
    """Raw record -> training example (or _Skipped); picklable for grain worker processes."""

    source: Sequence[dict]
    task: str
    shard_length: int
    seed: int
    image_size: int
    source_image_size: int
    caption_dropout: float
    image_dropout_low: float
    image_dropout_high: float

    bucket_plan: BucketPlan | None = None
    from_latents: bool = False  # the source is a latent cache (records carry "latents")

    def _read(self, example_index: int):
        """(target, caption, first source image or None, record name), decoded; may raise
        UnreadableImageError. A huge photo is decoded reduced, to no less than its crop needs."""
        record = self.source[example_index]
        name = record.get("name", f"example {example_index}")
        if self.task == "t2i":
            target_raw, caption = record["image"], record["caption"]
        else:
            target_raw, caption = record["target_image"], record["instruction"]
        target_size = (self.image_size if self.bucket_plan is None
                       else max(self.bucket_plan.shape_of(example_index)))
        target = _as_image(target_raw, _label(target_raw, name), target_size)
        source_image = None
        if self.task == "ti2i":
            first = record["source_images"][0]
            source_image = _as_image(first, _label(first, name), self.source_image_size)
        return target, caption, source_image, name

    def _read_or_substitute(self, position: int, epoch: int, example_index: int):
        """(example index actually used, its decoded parts, [_Skipped, ...]); with buckets an
        unreadable example is replaced by another of its bucket (its batch keeps its shape)."""
        skipped = []
        index = example_index
        for attempt in range(_MAX_SUBSTITUTES + 1):
            try:
                return index, self._read(index), skipped
            except UnreadableImageError as e:
                skipped.append(_Skipped(index, e.path, e.reason))
                if self.bucket_plan is None:
                    return index, None, skipped
                index = self.bucket_plan.substitute(example_index, self.seed, epoch, position,
                                                    attempt)
        h, w = self.bucket_plan.shape_of(example_index)
        raise RuntimeError(f"no readable example in {len(skipped)} draws from aspect bucket "
                           f"{h}x{w}; unreadable: {sorted({s.path for s in skipped})[:10]}")

    def __call__(self, position: int, example_index: int):
        epoch = int(position) // self.shard_length
        if self.from_latents:
            return self._cached(epoch, int(example_index))
        example_index, parts, skipped = self._read_or_substitute(int(position), epoch,
                                                                 int(example_index))
        if parts is None:
            return skipped[0]
        target, caption, source_image, name = parts

        r = dropout_draw(self.seed, epoch, example_index)
        if self.bucket_plan is None:
            target = resize_center_crop(target, self.image_size)
        else:
            target = resize_cover_crop(target, *self.bucket_plan.shape_of(example_index))
        example = {"target": to_model_range(target),
                   "caption": "" if r < self.caption_dropout else str(caption),
                   "index": np.int64(example_index), "name": str(name)}
        if skipped:
            example["replaced"] = skipped
        if self.task == "ti2i":
            s = self.source_image_size
            if self.image_dropout_low <= r < self.image_dropout_high:
                example["source_image"] = np.zeros((s, s, 3), np.uint8)
            else:
                example["source_image"] = resize_center_crop(source_image, s)
        return example

    def _cached(self, epoch: int, cache_index: int) -> dict:
        """A latent cache's record -> training example. Dropout draws with the record's index
        in the encoded source, so a cache without skipped examples gives the batches of its
        source, and the cache's unreadable examples were skipped (and counted) when it was
        written."""
        record = self.source[cache_index]
        index = int(record["index"])
        r = dropout_draw(self.seed, epoch, index)
        example = {"latents": np.asarray(record["latents"], np.float32),
                   "caption": "" if r < self.caption_dropout else str(record["caption"]),
                   "index": np.int64(index), "name": str(record["name"])}
        if self.task == "ti2i":
            image = record["source_image"]
            example["source_image"] = (np.zeros_like(image)
                                       if self.image_dropout_low <= r < self.image_dropout_high
                                       else image)
        return example


@dataclasses.dataclass(frozen=True)
class _CaptionDropout:
    """(epoch, example indices) -> which captions CFG dropout empties: the draw of
    `_ExampleTransform`, for length grouping (a latent cache draws with the index in the source
    it encoded, the same one when the cache skipped nothing; a mismatch costs padding only)."""

    seed: int
    caption_dropout: float

    def __call__(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        return np.array([dropout_draw(self.seed, epoch, int(i)) < self.caption_dropout
                         for i in indices], bool)


def example_reader(source: Sequence[dict], task: str, image_size: int, source_image_size: int):
    """The pipeline's own transform without CFG dropout, for writing a latent cache: called as
    `reader(i, i)` it gives record i decoded, resized and cropped exactly as training does it,
    caption and source image as the record has them (dropout happens when training from the
    cache), or, for an unreadable record, a marker with .index, .path and .reason that
    `SkipLog.add` takes. Square crops only (no aspect buckets)."""
    return _ExampleTransform(source=source, task=check_task(task),
                             shard_length=max(1, len(source)), seed=0, image_size=int(image_size),
                             source_image_size=int(source_image_size), caption_dropout=0.0,
                             image_dropout_low=0.0, image_dropout_high=0.0)


@dataclasses.dataclass(frozen=True)
class _EncodeExample:
    """Applies the caller's per-example encoder (model inputs: tokens, positions, image patches;
    the trainer builds it) to examples, where grain reads them; unreadable markers pass by."""

    encoder: Any

    def __call__(self, example):
        return example if isinstance(example, _Skipped) else self.encoder(example)


class SkipLog:
    """Unreadable examples met so far: {example index: (path, reason)}; logs each one once."""

    def __init__(self):
        self.entries: dict[int, tuple[str, str]] = {}

    def add(self, skipped: _Skipped) -> None:
        if skipped.index not in self.entries:
            self.entries[skipped.index] = (skipped.path, skipped.reason)
            log.warning("skipping unreadable example %d: %s (%s); %d skipped so far",
                        skipped.index, skipped.path, skipped.reason, len(self.entries))

    def files(self) -> list[str]:
        return [self.entries[i][0] for i in sorted(self.entries)]

    def get_state(self) -> dict:
        return {str(i): list(v) for i, v in sorted(self.entries.items())}

    def set_state(self, state: dict) -> None:
        self.entries = {int(i): (str(v[0]), str(v[1])) for i, v in state.items()}


class _SkipUnreadableIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, skip_log: SkipLog, shard_length: int):
        super().__init__(parent)
        self._skip_log = skip_log
        self._shard_length = shard_length

    def __next__(self):
        run = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, _Skipped):
                for replaced in element.pop("replaced", ()):
                    self._skip_log.add(replaced)
                element["num_skipped"] = len(self._skip_log.entries)
                return element
            self._skip_log.add(element)
            run += 1
            if run >= self._shard_length:
                raise RuntimeError(
                    f"no readable example in {run} consecutive examples (a whole epoch of this "
                    f"process's shard); unreadable: {self._skip_log.files()[:10]}")

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self._skip_log.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._skip_log.set_state(state["skipped"])


class _SkipUnreadable(grain.IterDataset):
    """Drops `_Skipped` markers, recording them in a SkipLog that is part of the iterator state."""

    def __init__(self, parent: grain.IterDataset, skip_log: SkipLog, shard_length: int):
        super().__init__(parent)
        self._skip_log = skip_log
        self._shard_length = shard_length

    def __iter__(self):
        return _SkipUnreadableIterator(self._parent.__iter__(), self._skip_log, self._shard_length)


class _ProcessBlocks(grain.MapDataset):
    """Process `index`'s share of a global order: consecutive blocks of `block` elements dealt to
    the `count` processes in turn (element m of this process is global element
    (m // block) * block * count + index * block + m % block)."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, index, count

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, m):
        if isinstance(m, slice):
            return self.slice(m)
        b = self._block
        return self._parent[(m // b) * b * self._count + self._index * b + m % b]

    def __str__(self) -> str:
        return f"ProcessBlocks(block={self._block}, process={self._index}/{self._count})"


def _collate(examples: Sequence[dict]) -> dict:
    key = target_key(examples[0])
    batch = {key: np.stack([e[key] for e in examples]),
             "caption": np.array([e["caption"] for e in examples], dtype=np.str_),
             "index": np.array([e["index"] for e in examples], dtype=np.int64),
             "name": np.array([e["name"] for e in examples], dtype=np.str_),
             "num_skipped": int(examples[-1]["num_skipped"]),
             "num_empty_captions": int(sum(e["caption"] == "" for e in examples))}
    if "source_image" in examples[0]:
        batch["source_image"] = np.stack([e["source_image"] for e in examples])
    if MODEL_INPUTS in examples[0]:  # the example encoder's arrays, whatever they are
        batch[MODEL_INPUTS] = {k: np.stack([e[MODEL_INPUTS][k] for e in examples])
                               for k in examples[0][MODEL_INPUTS]}
    return batch


class TrainIterator:
    """Infinite iterator of numpy batches; `get_state()` is a JSON-able dict for checkpoints."""

    def __init__(self, dataset: grain.IterDataset, skip_log: SkipLog, description: str,
                 bucket_plan: BucketPlan | None = None):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self._skip_log = skip_log
        self.description = description
        self.bucket_plan = bucket_plan

    @property
    def bucket_histogram(self) -> dict[str, int] | None:
        """{"HxW": examples} of the aspect buckets (None for square crops)."""
        return None if self.bucket_plan is None else self.bucket_plan.histogram()

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        return copy.deepcopy(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"data iterator state must be a dict, got {type(state).__name__}")
        self._iterator.set_state(copy.deepcopy(state))

    def close(self) -> None:
        """Stop grain's prefetch threads / worker processes (also done on garbage collection)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def skipped_files(self) -> list[str]:
        """Files of the unreadable examples met so far (one per skipped example)."""
        return self._skip_log.files()

    @property
    def num_skipped(self) -> int:
        return len(self._skip_log.entries)

    def __repr__(self) -> str:
        return f"TrainIterator({self.description})"


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside `absl.app.run` nobody has parsed them,
    so accept their defaults (what a plain Python entry point wants)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, task: str, batch_size: int,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        image_size: int | None = None, source_image_size: int | None = None,
                        source: Sequence[dict] | None = None, size_multiple: int = 1,
                        cache_dir: str | None = None,
                        example_encoder: Callable[[dict], dict] | None = None,
                        count_caption_tokens: Callable[[list[str]], Sequence[int]] | None = None
                        ) -> TrainIterator:
    """The training batches of this process (see the module docstring).

    Args:
      data_cfg: `default_data_config(task)` with overrides.
      task: 't2i' or 'ti2i'.
      batch_size: PER-PROCESS batch (global batch = batch_size x process_count).
      seed: run seed: shuffle order (unless data_cfg.shuffle_seed >= 0) and CFG dropout.
      process_index, process_count: this host's blocks of the global order.
      image_size, source_image_size: override data_cfg.image_size / source_image_size.
      source: optional raw-record source to use instead of the one data_cfg names.
      size_multiple: aspect buckets: every bucket side is a multiple of this (the model's
        autoencoder downsampling x DiT patch size).
      cache_dir: where what is read once at start-up is cached (the workdir; None: not cached):
        aspect buckets' image sizes, a WebDataset set's member index.
      example_encoder: optional picklable callable, example dict -> example dict, run on every
        example right after it is decoded, in the read threads (in the worker processes when
        data_cfg.worker_count > 0): the trainer's tokenisation and image processing
        (`uniimage_jax.train.batches.ExampleEncoder`). What it adds under "model_inputs" (a
        dict of arrays) is stacked into the batch's "model_inputs".
      count_caption_tokens: the caption token counter of length-grouped batches
        (caption_lengths.py; the trainer's tokenizer): with data.group_by_length and prompt
        buckets, batches are grouped by length; without it, they are not.
    """
    check_task(task)
    image_size = int(data_cfg.image_size if image_size is None else image_size)
    source_image_size = int(data_cfg.source_image_size if source_image_size is None
                            else source_image_size)
    _check_config(data_cfg, task, image_size, source_image_size)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if not 0 <= int(seed) < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")

    if source is None:
        source = make_training_source(data_cfg, task, image_size, cache_dir=cache_dir,
                                      process_index=process_index,
                                      process_count=process_count)
    from_latents = isinstance(source, LatentRecordSource) or getattr(source, "from_latents", False)
    dropout = float(data_cfg.caption_dropout)
    order = global_order(
        source, data_cfg, task=task, image_size=image_size, size_multiple=int(size_multiple),
        global_batch=int(batch_size) * process_count,
        shuffle_seed=int(seed if data_cfg.shuffle_seed < 0 else data_cfg.shuffle_seed),
        cache_dir=cache_dir, process_index=process_index, process_count=process_count,
        count_caption_tokens=count_caption_tokens,
        dropped=_CaptionDropout(int(seed), dropout) if dropout > 0 else None)
    skip_log = SkipLog()
    for index, (path, reason) in order.unreadable.items():
        skip_log.add(_Skipped(index, path, reason))
    ds, epoch_length, plan = order.dataset, order.epoch_length, order.bucket_plan
    shard_length = epoch_length // process_count
    if shard_length == 0:
        raise ConfigError(f"the source has {len(source)} examples: none left for process "
                         f"{process_index} of {process_count}")
    ds = ds.map_with_index(_ExampleTransform(
        source=source, task=task, shard_length=epoch_length, seed=int(seed),
        image_size=image_size, source_image_size=source_image_size,
        caption_dropout=float(data_cfg.caption_dropout),
        image_dropout_low=float(data_cfg.image_dropout_low) if task == "ti2i" else 0.0,
        image_dropout_high=float(data_cfg.image_dropout_high) if task == "ti2i" else 0.0,
        bucket_plan=plan, from_latents=from_latents))
    if example_encoder is not None:
        ds = ds.map(_EncodeExample(example_encoder))
    ds = _ProcessBlocks(ds, int(batch_size), process_index, process_count)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                                               prefetch_buffer_size=int(
                                                   data_cfg.prefetch_buffer_size)))
    if int(data_cfg.worker_count) > 0:
        _ensure_absl_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data_cfg.worker_count),
            per_worker_buffer_size=int(data_cfg.worker_buffer_size)))
    ids = _SkipUnreadable(ids, skip_log, shard_length)
    ids = ids.batch(int(batch_size), drop_remainder=True, batch_fn=_collate)
    description = (f"task={task}, source={source!r}, process {process_index}/{process_count}, "
                   f"{shard_length} examples, batch {batch_size}"
                   + (", grouped by caption length" if order.length_grouped else ""))
    log.info("data: %s", description)
    return TrainIterator(ids, skip_log, description, plan)
