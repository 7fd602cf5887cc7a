"""The token count of every record's caption, counted once at start-up for length-grouped batches.

The counting function comes from the caller (the trainer's tokenizer; this layer knows no
tokenizer): `count_tokens(captions: list[str]) -> sequence of ints`, with a `key` attribute (a
string that changes when the counts would: the tokenizer's identity) for the cache. A record's
caption is its t2i "caption" or ti2i "instruction" (a latent cache's "caption"), read through the
source's own `caption_text(index)` where it has one (a WebDataset source reads only the text
member, a table only its text column), else from the whole record.

Counting runs in `threads` threads over pieces of records (reading captions is I/O for file and
bucket sources; a fast tokenizer releases the GIL while it encodes a piece). The counts are
cached under `<cache_dir>/caption_lengths/<task>-<source content key>-<count key>/` (cache_dir
is the workdir, local or gs://) in files of `CHUNK` records, each written atomically, like the
image sizes of record_sizes.py. The processes of a run share the work without waiting on each
other: process p first counts chunks p, p + P, ... then any chunk still missing, from the last
one (where the others' own work ends), reading the chunks that appeared meanwhile; with a cache
directory the processes cannot see (a local one per host) each counts everything. A mixture's
counts are its components', each cached as its own source. A source without `content_key()`
or a counter without `key` is counted at every start. A record that cannot be read counts 0
tokens (the pipeline skips and names it when it meets it).
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

CHUNK = 65536   # records per cache file (and per unit of work shared between processes)
_PIECE = 512    # records per call of the counter
_MAX_COUNT = np.iinfo(np.uint16).max  # counts are stored as uint16; longer captions saturate


def record_caption(source, index: int) -> str:
    """Record `index`'s caption (t2i) or instruction (ti2i)."""
    own = getattr(source, "caption_text", None)
    if own is not None:
        return str(own(index))
    record = source[index]
    return str(record["instruction"] if "instruction" in record else record["caption"])


def _count(source, count_tokens, start: int, stop: int, pool) -> np.ndarray:
    def piece(first: int) -> np.ndarray:
        captions = []
        for i in range(first, min(first + _PIECE, stop)):
            try:
                captions.append(record_caption(source, i))
            except UnreadableImageError:
                captions.append("")
        return np.minimum(np.asarray(count_tokens(captions), np.int64), _MAX_COUNT)

    pieces = list(pool.map(piece, range(start, stop, _PIECE)))
    return np.concatenate(pieces).astype(np.uint16) if pieces else np.zeros(0, np.uint16)


def _read_chunk(path: str | None, length: int) -> np.ndarray | None:
    if path is None:
        return None
    try:
        counts = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:  # a damaged cache file: count again
        log.warning("ignoring the unreadable caption count cache %s (%s)", path, e)
        return None
    return counts if counts.shape == (length,) and counts.dtype == np.uint16 else None


def _order(num_chunks: int, process_index: int, process_count: int) -> list[int]:
    own = list(range(process_index, num_chunks, process_count))
    return own + [c for c in reversed(range(num_chunks)) if c % process_count != process_index]


def caption_token_counts(source: Sequence[dict], count_tokens: Callable, *, task: str,
                         cache_dir: str | None = None, threads: int = 8,
                         process_index: int = 0, process_count: int = 1,
                         progress: bool = True) -> np.ndarray:
    """uint16 (N,): the caption token count of every record of `source` (module docstring)."""
    components = getattr(source, "components", None)
    if components is not None:
        return np.concatenate([caption_token_counts(
            c, count_tokens, task=task, cache_dir=cache_dir, threads=threads,
            process_index=process_index, process_count=process_count, progress=progress)
            for c in components])
    from tqdm.auto import tqdm

    key_fn = getattr(source, "content_key", None)
    count_key = getattr(count_tokens, "key", None)
    folder = (storage.join(cache_dir, "caption_lengths", f"{task}-{key_fn()}-{count_key}")
              if cache_dir and key_fn is not None and count_key else None)
    if folder:
        storage.makedirs(folder)
    bounds = list(range(0, len(source), CHUNK)) + [len(source)]
    out = np.zeros(len(source), np.uint16)
    counted = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=len(source), unit="caption", desc="counting caption tokens",
                 disable=not progress) as bar:
        for c in _order(len(bounds) - 1, process_index, process_count):
            start, stop = bounds[c], bounds[c + 1]
            path = storage.join(folder, f"{c:06d}.npy") if folder else None
            counts = _read_chunk(path, stop - start)
            if counts is None:
                counts = _count(source, count_tokens, start, stop, pool)
                counted += stop - start
                if path is not None:
                    buf = io.BytesIO()
                    np.save(buf, counts, allow_pickle=False)
                    storage.write_bytes(path, buf.getvalue())
            out[start:stop] = counts
            bar.update(stop - start)
    log.info("caption token counts of %d records: %d counted now, %d from %s", len(source),
             counted, len(source) - counted, folder or "(no cache)")
    return out
