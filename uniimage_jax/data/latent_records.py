"""The latent cache on disk: a dataset's target images encoded once by the frozen autoencoder.

The official target crop is deterministic and the autoencoder frozen, so a target's latents are
the same at every step; `uniimage-cache-latents` (train/latent_cache.py) encodes them once and
`data.source = "latents"` trains from them. A cache directory holds:

    latents.json                 the metadata (below), rewritten atomically as shards complete
    shard-00000.array_record     ArrayRecord shards (group size 1, random access), one record per
    shard-00000.json             readable example; the JSON beside a shard marks it complete
    ...

Shard k holds the readable examples of source indices [k * shard_size, (k + 1) * shard_size), in
source order; the cache's order is shard by shard. A shard is written under a temporary name and
renamed, then its JSON is written (also renamed into place): a shard without its JSON is from an
interrupted run and is written again. Shards do not depend on how many processes encoded them.

A record is a msgpack map (no pickle: reading a cache runs no code):
    "latents":      {"shape": [h, w, c], "dtype": "float32", "data": raw bytes} - the scaled
                    latents (`UniImage.encode_images`: the encoder's output x scaling factor)
    "caption":      the raw caption (t2i) or instruction (ti2i); CFG dropout happens in training
    "name":         the source record's name in messages (a manifest's file:line)
    "index":        its index in the source
    "source_image": ti2i only: PNG bytes of the first source image after the pipeline's fixed
                    resize + centre crop to source_image_size (lossless, ~3x smaller than raw)

latents.json: format, task, image_size, source_image_size (ti2i, else null), latent_shape,
latent_dtype, scaling_factor, model (preset, weights, dtypes), source (what was encoded and its
length), shard_size, num_shards, shards (the complete ones: file, start, stop, examples,
skipped), num_examples, num_skipped, complete.

A cache may live on Cloud Storage (`gs://`). ArrayRecord's reader and writer open local files
only (its C++ file layer has no Cloud Storage driver that could be pointed elsewhere), so there:
- each shard is written to a local temporary file and uploaded when it is complete (an object
  appears only once its upload has finished, so a shard is never seen half-written), then its
  JSON is written beside it: the same order, and the same resumability, as on a local disk;
- a reader copies each shard into the local cache (`storage.local_copy`: $UNIIMAGE_CACHE, else
  ~/.cache/uniimage_jax) the first time it reads a record of it, and reads it there: a training
  run needs local disk for the shards it touches (with a global shuffle, eventually all of
  them). Range reads straight from the bucket are not possible: a shard's records are riegeli
  chunks found through its footer index, which only the C++ reader parses. For a cache larger
  than the local disk, mount the bucket (gcsfuse) and give the mounted path instead.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from uniimage_jax import storage
from uniimage_jax.errors import ConfigError

FORMAT = "uniimage_latents/1"
METADATA_FILE = "latents.json"
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one record


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.array_record"


def shard_info_file(k: int) -> str:
    return f"shard-{k:05d}.json"


# ------------------------------------------------------------------------------------- records


def encode_record(latents: np.ndarray, caption: str, name: str, index: int,
                  source_image: np.ndarray | None = None) -> bytes:
    """One example as record bytes (the module docstring's layout)."""
    latents = np.ascontiguousarray(latents, np.float32)
    record: dict[str, Any] = {
        "latents": {"shape": list(latents.shape), "dtype": "float32", "data": latents.tobytes()},
        "caption": str(caption), "name": str(name), "index": int(index)}
    if source_image is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(source_image, np.uint8)).save(buf, format="PNG")
        record["source_image"] = buf.getvalue()
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """Record bytes -> {"latents": float32 (h, w, c), "caption", "name", "index",
    ["source_image": uint8 (s, s, 3)]}."""
    record = msgpack.unpackb(data, raw=False)
    lat = record["latents"]
    out = {"latents": np.frombuffer(lat["data"], np.dtype(lat["dtype"])).reshape(lat["shape"]),
           "caption": record["caption"], "name": record["name"], "index": int(record["index"])}
    if "source_image" in record:
        from PIL import Image

        with Image.open(io.BytesIO(record["source_image"])) as img:
            out["source_image"] = np.asarray(img.convert("RGB"), np.uint8)
    return out


def write_shard(directory: str, k: int, records: Iterable[bytes]) -> int:
    """Shard `k` from `records` (consumed as they come, so a shard never sits in memory whole),
    under a temporary name renamed into place (on a bucket: a local file uploaded once
    complete); returns the number of records. The shard counts as complete only once
    `mark_complete` has written its JSON."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = storage.join(directory, shard_file(k))
    remote = storage.is_remote(path)
    if remote:
        fd, tmp = tempfile.mkstemp(prefix=f"{shard_file(k)}.", suffix=".tmp")
        os.close(fd)
    else:
        tmp = f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    count = 0
    try:
        try:
            for record in records:
                writer.write(record)
                count += 1
        finally:
            writer.close()
        if remote:
            storage.upload(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if remote and os.path.exists(tmp):
            os.unlink(tmp)
    return count


def mark_complete(directory: str, k: int, info: dict) -> None:
    """Shard `k`'s JSON (its range, examples, skipped records), written atomically."""
    write_json(storage.join(directory, shard_info_file(k)), info)


# ------------------------------------------------------------------------------------ metadata


def write_json(path: str, value: dict) -> None:
    storage.write_text(path, json.dumps(value, indent=1))


def read_metadata(directory: str) -> dict | None:
    """The cache's metadata, or None when `directory` holds no cache."""
    path = storage.join(directory, METADATA_FILE)
    if not storage.exists(path):
        return None
    try:
        meta = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable latent cache metadata file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a latent cache of this version (format "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {FORMAT!r})")
    return meta


def completed_shards(directory: str, num_shards: int) -> dict[int, dict]:
    """{shard: its JSON} of the shards whose JSON is in place (so complete)."""
    present = set(storage.listdir(directory))  # one listing, not two lookups per shard
    done = {}
    for k in range(num_shards):
        if shard_info_file(k) in present and shard_file(k) in present:
            done[k] = json.loads(storage.read_text(storage.join(directory, shard_info_file(k))))
    return done


# -------------------------------------------------------------------------------------- reader


class LatentRecordSource:
    """A complete latent cache as a random-access source (grain's protocol): records as
    `decode_record` returns them, shard by shard. The expected task / image sizes, when given,
    are checked against the metadata with one-line errors naming the config field."""

    def __init__(self, path: str | os.PathLike, *, task: str | None = None,
                 image_size: int | None = None, source_image_size: int | None = None):
        self.path = os.fspath(path)
        if not storage.is_dir(self.path):
            raise ConfigError(f"data.path={self.path!r}: no such latent cache directory "
                              "(write one with uniimage-cache-latents)")
        meta = read_metadata(self.path)
        if meta is None:
            raise ConfigError(f"data.path={self.path!r} holds no {METADATA_FILE}: not a latent "
                              "cache (write one with uniimage-cache-latents)")
        self.metadata = meta
        if task is not None and meta["task"] != task:
            raise ConfigError(f"data.path={self.path!r} caches {meta['task']} data; this stage "
                              f"trains on {task} data")
        if image_size is not None and int(meta["image_size"]) != int(image_size):
            raise ConfigError(f"data.image_size={image_size}, but the latent cache "
                              f"{self.path!r} was encoded at image_size={meta['image_size']}")
        if (source_image_size is not None and meta["task"] == "ti2i"
                and int(meta["source_image_size"]) != int(source_image_size)):
            raise ConfigError(f"data.source_image_size={source_image_size}, but the latent "
                              f"cache {self.path!r} holds source images of "
                              f"{meta['source_image_size']}")
        if not meta.get("complete"):
            raise ConfigError(f"data.path={self.path!r}: the latent cache is incomplete "
                              f"({len(meta['shards'])} of {meta['num_shards']} shards); rerun "
                              "the same uniimage-cache-latents command to finish it")
        self.task = meta["task"]
        shards = [s for s in meta["shards"] if s["examples"]]
        if not shards:
            raise ConfigError(f"data.path={self.path!r}: the latent cache holds no example")
        if storage.is_remote(self.path):
            self._source = _ShardsCopiedOnUse(
                [(storage.join(self.path, s["file"]), s["examples"]) for s in shards])
        else:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            # "file[start:stop]" spares the reader opening every shard to count its records.
            self._source = ArrayRecordDataSource(
                [f"{os.path.join(self.path, s['file'])}[0:{s['examples']}]" for s in shards])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._source[int(index)])

    def __repr__(self) -> str:
        return f"LatentRecordSource({self.path!r}, task={self.task!r}, len={len(self)})"


class _ShardsCopiedOnUse:
    """Records of shards on a bucket by global index: a shard is copied into the local cache
    when one of its records is first read (module docstring), then read with ArrayRecord.
    Picklable for grain's worker processes (each opens its own readers)."""

    def __init__(self, shards: list[tuple[str, int]]):
        self.shards = list(shards)
        self._starts = np.cumsum([0] + [n for _, n in self.shards]).tolist()
        self._open_state()

    def _open_state(self) -> None:
        self._readers: list[Any] = [None] * len(self.shards)
        self._locks = [threading.Lock() for _ in self.shards]  # one download per shard

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "_starts": self._starts}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_state()

    def __len__(self) -> int:
        return self._starts[-1]

    def _reader(self, k: int):
        with self._locks[k]:
            if self._readers[k] is None:
                from array_record.python.array_record_data_source import ArrayRecordDataSource

                url, n = self.shards[k]
                self._readers[k] = ArrayRecordDataSource([f"{storage.local_copy(url)}[0:{n}]"])
            return self._readers[k]

    def __getitem__(self, index: int) -> bytes:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        k = bisect.bisect_right(self._starts, index) - 1
        return self._reader(k)[index - self._starts[k]]
