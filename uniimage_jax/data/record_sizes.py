"""The (height, width) of every record's target image, read once at start-up for aspect buckets.

Where a size comes from, cheapest first:
1. the source's own `target_sizes()` (the synthetic source knows its sizes without drawing);
2. a record's "height" / "width" fields (a JSONL manifest may carry them, see sources.py);
3. an already decoded array's shape (TFDS records);
4. the image file's header (`PIL.Image.open` without decoding the pixels).

A scan of files is cached, keyed by the source's `content_key()` (a JSONL manifest: the SHA-256 of
its bytes and its directory), under `<cache_dir>/bucket_cache/<key>.json` (cache_dir may be a
gs:// workdir). A record whose header cannot be read gets size (-1, -1) and its reason; the
pipeline leaves it out and counts it with the other unreadable examples.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from typing import Sequence

import numpy as np

from uniimage_jax import storage
from uniimage_jax.data.images import UnreadableImageError, read_image_size

log = logging.getLogger("uniimage_jax.data")

_CACHE_FORMAT = 1


def _target(record: dict, task: str):
    return record["image"] if task == "t2i" else record["target_image"]


def record_target_size(record: dict, task: str, name: str) -> tuple[int, int]:
    """(height, width) of one raw record's target image (see the module docstring)."""
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    image = _target(record, task)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise UnreadableImageError(name, f"not an (H, W, 3) image: shape {image.shape}")
        return int(image.shape[0]), int(image.shape[1])
    label = name if isinstance(image, (bytes, bytearray, memoryview)) else str(image)
    return read_image_size(image, name=label)


def _scan(source: Sequence[dict], task: str, threads: int, progress: bool):
    from tqdm.auto import tqdm

    def one(i: int):
        try:
            record = source[i]
            return record_target_size(record, task, record.get("name", f"example {i}")), None
        except UnreadableImageError as e:
            return (-1, -1), (e.path, e.reason)

    sizes = np.full((len(source), 2), -1, np.int64)
    unreadable: dict[int, tuple[str, str]] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(one, range(len(source)), chunksize=256)
        for i, (size, bad) in enumerate(tqdm(results, total=len(source), unit="image",
                                             desc="reading image sizes", disable=not progress)):
            sizes[i] = size
            if bad is not None:
                unreadable[i] = bad
    return sizes, unreadable


def _cache_path(cache_dir: str, key: str):
    return storage.path(storage.join(cache_dir, "bucket_cache", f"{key}.json"))


def target_sizes(source: Sequence[dict], task: str, *, cache_dir: str | None = None,
                 threads: int = 8, write_cache: bool = True, progress: bool = True):
    """(sizes int64 (N, 2) of (h, w), -1 where unreadable; {index: (path, reason)}). A
    mixture's sizes are its components', each read (and cached) as its own source."""
    components = getattr(source, "components", None)
    if components is not None:
        parts = [target_sizes(c, task, cache_dir=cache_dir, threads=threads,
                              write_cache=write_cache, progress=progress) for c in components]
        unreadable = {int(offset) + i: bad for offset, (_, part) in zip(source.offsets, parts)
                      for i, bad in part.items()}
        return np.concatenate([sizes for sizes, _ in parts]), unreadable
    own = getattr(source, "target_sizes", None)
    if own is not None:
        return np.asarray(own(), np.int64).reshape(-1, 2), {}
    key_fn = getattr(source, "content_key", None)
    key = key_fn() if key_fn is not None else None
    path = _cache_path(cache_dir, f"{task}-{key}") if cache_dir and key else None
    if path is not None and path.exists():
        cached = json.loads(path.read_text())
        if cached.get("format") == _CACHE_FORMAT and len(cached["sizes"]) == len(source):
            log.info("image sizes of %d records from %s", len(source), path)
            return (np.asarray(cached["sizes"], np.int64).reshape(-1, 2),
                    {int(i): tuple(v) for i, v in cached["unreadable"].items()})
    sizes, unreadable = _scan(source, task, threads, progress)
    if path is not None and write_cache:
        # readers never see a half-written cache (a temporary name locally, a whole object on
        # a bucket)
        storage.write_text(path, json.dumps({"format": _CACHE_FORMAT, "source": repr(source),
                                             "sizes": sizes.tolist(),
                                             "unreadable": {str(i): list(v)
                                                            for i, v in unreadable.items()}}))
        log.info("cached the image sizes of %d records in %s", len(source), path)
    return sizes, unreadable
