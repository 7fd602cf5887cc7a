"""The token count of every record's caption, counted once at start-up for length-grouped batches.

The counting function comes from the caller (the trainer's tokenizer; this layer knows no
tokenizer): `count_tokens(captions: list[str]) -> sequence of ints`, with a `key` attribute (a
string that changes when the counts would: the tokenizer's identity) for the cache. A record's
caption is its t2i "caption" or ti2i "instruction" (a latent cache's "caption"), read through the
source's own `caption(index)` where it has one (the synthetic source draws a caption without
rendering its image), else from the record.

Counting runs in `threads` threads over chunks of records (reading captions is I/O for file and
bucket sources; a fast tokenizer releases the GIL while it encodes a chunk). The counts are
cached under `<cache_dir>/caption_lengths/<task>-<source content key>-<count key>.npy` (cache_dir
is the workdir, local or gs://; written atomically by the first process), like the image sizes of
record_sizes.py; a mixture's counts are its components', each cached as its own source. A
source without `content_key()` or a counter without `key` is counted at every start. A record
that cannot be read counts 0 tokens (the pipeline skips and names it when it meets it).
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
from typing import Callable, Sequence

import numpy as np

from uniimage_jax import storage
from uniimage_jax.data.images import UnreadableImageError

log = logging.getLogger("uniimage_jax.data")

_CHUNK = 512
_MAX_COUNT = np.iinfo(np.uint16).max  # counts are stored as uint16; longer captions saturate


def record_caption(source, index: int) -> str:
    """Record `index`'s caption (t2i) or instruction (ti2i)."""
    own = getattr(source, "caption", None)
    if own is not None:
        return str(own(index))
    record = source[index]
    return str(record["instruction"] if "instruction" in record else record["caption"])


def _count(source, count_tokens, threads: int, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    def chunk(start: int) -> np.ndarray:
        captions = []
        for i in range(start, min(start + _CHUNK, len(source))):
            try:
                captions.append(record_caption(source, i))
            except UnreadableImageError:
                captions.append("")
        return np.minimum(np.asarray(count_tokens(captions), np.int64), _MAX_COUNT)

    out = np.zeros(len(source), np.uint16)
    starts = range(0, len(source), _CHUNK)
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=len(source), unit="caption", desc="counting caption tokens",
                 disable=not progress) as bar:
        for start, counts in zip(starts, pool.map(chunk, starts)):
            out[start:start + len(counts)] = counts
            bar.update(len(counts))
    return out


def caption_token_counts(source: Sequence[dict], count_tokens: Callable, *, task: str,
                         cache_dir: str | None = None, threads: int = 8,
                         write_cache: bool = True, progress: bool = True) -> np.ndarray:
    """uint16 (N,): the caption token count of every record of `source` (module docstring)."""
    components = getattr(source, "components", None)
    if components is not None:
        return np.concatenate([caption_token_counts(c, count_tokens, task=task,
                                                    cache_dir=cache_dir, threads=threads,
                                                    write_cache=write_cache, progress=progress)
                               for c in components])
    key_fn = getattr(source, "content_key", None)
    count_key = getattr(count_tokens, "key", None)
    path = (storage.join(cache_dir, "caption_lengths", f"{task}-{key_fn()}-{count_key}.npy")
            if cache_dir and key_fn is not None and count_key else None)
    if path is not None and storage.exists(path):
        counts = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
        if counts.shape == (len(source),) and counts.dtype == np.uint16:
            log.info("caption token counts of %d records from %s", len(source), path)
            return counts
    counts = _count(source, count_tokens, threads, progress)
    if path is not None and write_cache:
        buf = io.BytesIO()
        np.save(buf, counts, allow_pickle=False)
        storage.makedirs(storage.join(cache_dir, "caption_lengths"))
        storage.write_bytes(path, buf.getvalue())
        log.info("cached the caption token counts of %d records in %s", len(source), path)
    return counts
