"""Where each sample of a set of WebDataset tar shards lies: a member index built by reading the
tar headers once (never unpacking), in parallel, and cached.

A sample is a run of consecutive regular members sharing a key (WebDataset's rule: the member
name up to the first dot of its last path component; `a/b/0001.seg.png` has key `a/b/0001` and
extension `seg.png`). Names without a dot, and metadata members whose name starts with `__`, are
not samples. The index holds, per sample, the byte range from its first member's header
(extended PAX / GNU long-name headers included) to the end of its last member's data padded to
the 512-byte tar block, and where its `txt` member's data lies within that range (so a caption
alone is one small read): 24 bytes a sample (27M samples: ~650 MB on the host). One ranged read
fetches a whole sample (webdataset_source.py parses its members from those bytes).

Headers are read with the standard library's `tarfile` over a seekable file (on `gs://` the
storage layer's reads fetch ahead in blocks, so members larger than a block are skipped without
being downloaded). A shard that ends inside a member keeps that member's sample (reading it later
finds it short, and it is skipped and counted as truncated); a shard with a corrupt header keeps
the samples before it; a file that is not a tar archive has no samples. Each such shard gets a
note that is logged at every start.

Cache: shards are grouped in fixed chunks of `CHUNK_SHARDS` (in the order given), each chunk
stored as `<cache_dir>/wds_index/<key>.npz` keyed by its shards' paths and sizes (a changed or
resized shard makes a new key), written atomically. Several processes share the work without
waiting on each other: process p first indexes chunks p, p + P, ... then any chunk still
missing, starting from the last (where the other processes' own work ends), skipping chunks
whose file has appeared meanwhile; each process ends with every chunk (read from the cache or
made itself). With a cache directory the processes cannot see (a local directory per host) each
simply indexes everything. A chunk, and so the whole index, does not depend on the number of
processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import tarfile
from typing import Sequence

import numpy as np

from uniimage_jax import storage

log = logging.getLogger("uniimage_jax.data")

FORMAT = 1
CHUNK_SHARDS = 16
BLOCK = 512


def sample_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name, or None for a member that is no part of a
    sample (no dot in its last component, or a `__metadata__` name)."""
    directory, _, base = name.rpartition("/")
    if base.startswith("__") or "." not in base.lstrip("."):
        return None
    stem, ext = base.split(".", 1)
    if not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


@dataclasses.dataclass
class ShardIndex:
    """The samples of one shard: byte offsets and lengths, and a note when it is damaged."""

    offsets: np.ndarray       # int64: byte offset of each sample in the shard
    lengths: np.ndarray       # int64: its byte length
    text_starts: np.ndarray   # int32: its txt member's data, from the sample's start (-1: none)
    text_sizes: np.ndarray    # int32: that member's size in bytes (-1: none)
    note: str = ""


def index_shard(path: str) -> ShardIndex:
    """Read the headers of one tar shard (see the module docstring)."""
    offsets: list[int] = []
    lengths: list[int] = []
    texts: list[tuple[int, int]] = []
    note = ""
    key, start, end, text = None, 0, 0, (-1, -1)
    try:
        with storage.open_file(path, "rb") as fh:
            archive = tarfile.open(fileobj=fh, mode="r:")
            while True:
                try:
                    member = archive.next()
                except tarfile.ReadError as e:
                    note = f"tar headers unreadable after byte {archive.offset} ({e})"
                    break
                if member is None:
                    break
                parts = sample_key(member.name) if member.isreg() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        offsets.append(start)
                        lengths.append(end - start)
                        texts.append(text)
                    key, start, text = parts[0], member.offset, (-1, -1)
                if parts[1] == "txt" and member.size < 2**31:
                    text = (member.offset_data - start, member.size)
                end = member.offset_data + _padded(member.size)
    except tarfile.ReadError as e:
        note = f"not a tar archive ({e})"
    if key is not None:
        offsets.append(start)
        lengths.append(end - start)
        texts.append(text)
    texts_array = np.asarray(texts, np.int32).reshape(-1, 2)
    return ShardIndex(np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
                      texts_array[:, 0].copy(), texts_array[:, 1].copy(), note)


def _chunk_key(shards: Sequence[tuple[str, int]]) -> str:
    text = json.dumps([FORMAT, [[p, int(s)] for p, s in shards]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _encode(chunk: list[ShardIndex]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, counts=np.asarray([len(s.offsets) for s in chunk], np.int64),
             offsets=np.concatenate([s.offsets for s in chunk]),
             lengths=np.concatenate([s.lengths for s in chunk]),
             text_starts=np.concatenate([s.text_starts for s in chunk]),
             text_sizes=np.concatenate([s.text_sizes for s in chunk]),
             notes=np.asarray([s.note for s in chunk], np.str_))
    return buf.getvalue()


def _decode(data: bytes, num_shards: int) -> list[ShardIndex] | None:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        counts, notes = z["counts"], z["notes"]
        arrays = [z[k] for k in ("offsets", "lengths", "text_starts", "text_sizes")]
    if len(counts) != num_shards or any(counts.sum() != len(a) for a in arrays):
        return None
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [ShardIndex(*(x[a:b] for x in arrays), str(n))
            for a, b, n in zip(bounds[:-1], bounds[1:], notes)]


def _read_cached(path: str | None, num_shards: int) -> list[ShardIndex] | None:
    if path is None:
        return None
    try:
        return _decode(storage.read_bytes(path), num_shards)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, OSError) as e:  # a damaged cache file: index again
        log.warning("ignoring the unreadable index cache %s (%s)", path, e)
        return None


def _order(num_chunks: int, process_index: int, process_count: int) -> list[int]:
    own = list(range(process_index, num_chunks, process_count))
    rest = [c for c in reversed(range(num_chunks)) if c % process_count != process_index]
    return own + rest


def build_index(shards: Sequence[tuple[str, int]], *, cache_dir: str | None,
                process_index: int = 0, process_count: int = 1,
                threads: int = 16) -> list[ShardIndex]:
    """The ShardIndex of every shard of `shards` [(path, size), ...], from the cache under
    `cache_dir` where present, else made (and cached when `cache_dir` is given)."""
    chunks = [list(shards[i:i + CHUNK_SHARDS]) for i in range(0, len(shards), CHUNK_SHARDS)]
    folder = storage.join(cache_dir, "wds_index") if cache_dir else None
    files = [storage.join(folder, f"{_chunk_key(c)}.npz") if folder else None for c in chunks]
    if folder:
        storage.makedirs(folder)
    done: dict[int, list[ShardIndex]] = {}
    made = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for c in _order(len(chunks), process_index, process_count):
            cached = _read_cached(files[c], len(chunks[c]))
            if cached is not None:
                done[c] = cached
                continue
            done[c] = list(pool.map(index_shard, [p for p, _ in chunks[c]]))
            made += len(chunks[c])
            if files[c] is not None:
                storage.write_bytes(files[c], _encode(done[c]))
    log.info("tar member index of %d shards: %d read now, %d from %s", len(shards), made,
             len(shards) - made, folder or "(no cache)")
    return [s for c in range(len(chunks)) for s in done[c]]
