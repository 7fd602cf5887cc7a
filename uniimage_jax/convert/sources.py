"""Checkpoint sources for conversion: safetensors files opened lazily (one tensor read at a time),
views of them under new names, and the errors a conversion reports.

Every failure to read a file names it (and its shard): safetensors' own `SafetensorError` says
neither. Pickled checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping

import numpy as np

from uniimage_jax.errors import ConversionError, UserError


class UnreadableCheckpointError(UserError):
    """A weights file that is not a readable safetensors file (truncated download, garbage
    header, ...); the message names the file and, for sharded checkpoints, the shard."""


# ----------------------------------------------------------------------------------------------
# Sources: lazily opened safetensors files.
# ----------------------------------------------------------------------------------------------


class SafetensorsSource:
    """Tensors of one checkpoint spread over one or many safetensors files.

    Only headers are read on construction; `get` reads one tensor. Files are found from a
    `*.safetensors.index.json` weight map when there is one, else every `*.safetensors` file in
    the directory. A key present in two files is an error. Pickled checkpoints (`*.bin`, `*.pt`)
    are refused: they can run arbitrary code when loaded.
    """

    def __init__(self, path: str, prefix: str = ""):
        from safetensors import safe_open

        self.path = path
        files = _safetensors_files(path)
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._shard_of = {f: (f"shard {i + 1} of {len(files)}, " if len(files) > 1 else "")
                          for i, f in enumerate(files)}
        duplicates = []
        for f in files:
            with self._reading(f):
                h = safe_open(f, framework="numpy")
            self._handles[f] = h
            for k in h.keys():
                if not k.startswith(prefix):
                    continue
                if k in self._file_of:
                    duplicates.append(f"{k} (in {self._file_of[k]} and {f})")
                self._file_of[k] = f
        if duplicates:
            raise ConversionError(path, other=["tensor stored twice: " + d for d in duplicates])

    @contextlib.contextmanager
    def _reading(self, file: str, key: str | None = None):
        """safetensors' own errors (SafetensorError, no file name) -> one that names the file."""
        from safetensors import SafetensorError

        try:
            yield
        except (SafetensorError, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, EOFError) and e.errno is None:
                raise
            what = f"tensor {key} of " if key else ""
            detail = " ".join(str(e).split()) or type(e).__name__
            raise UnreadableCheckpointError(
                f"cannot read {what}{file} ({self._shard_of.get(file, '')}checkpoint "
                f"{self.path}): not a valid safetensors file ({detail}); it may be truncated or "
                "corrupt: download it again") from None

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._file_of[key]
        with self._reading(f, key):
            return tuple(self._handles[f].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        f = self._file_of[key]
        with self._reading(f, key):
            return self._handles[f].get_slice(key).get_dtype()

    def metadata(self) -> dict[str, str] | None:
        """The header's `__metadata__` (e.g. {"format": "pt"}); of the first shard, as the
        writers of sharded checkpoints (transformers, diffusers) give every shard the same."""
        first = next(iter(self._handles))
        with self._reading(first):
            return self._handles[first].metadata()

    def get(self, key: str) -> np.ndarray:
        """One tensor as a float32 (or integer / bool) numpy array (bf16 / fp8 via ml_dtypes)."""
        f = self._file_of[key]
        with self._reading(f, key):
            x = self._handles[f].get_tensor(key)
        return x.astype(np.float32) if self.dtype(key).startswith(("F", "BF")) else x


class SourceView:
    """Part of a source under new names: `entries` maps a view key to (source key, row slice or
    None). Used to split one checkpoint into its components (strip a key prefix) and to split one
    tensor by rows (a resized embedding table)."""

    def __init__(self, base, entries: Mapping[str, tuple[str, slice | None]], path: str = "",
                 prefix: str = ""):
        self.base = base
        self.entries = dict(entries)
        self.path = path or getattr(base, "path", "checkpoint")
        self.prefix = prefix  # view key k is base key prefix + k (with_prefix views)

    @classmethod
    def with_prefix(cls, base, prefix: str) -> "SourceView":
        return cls(base, {k[len(prefix):]: (k, None) for k in base.keys() if k.startswith(prefix)},
                   path=f"{getattr(base, 'path', 'checkpoint')} [{prefix}*]", prefix=prefix)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        base_key, rows = self.entries[key]
        shape = self.base.shape(base_key)
        if rows is None:
            return shape
        return (len(range(*rows.indices(shape[0]))), *shape[1:])

    def dtype(self, key: str) -> str:
        return self.base.dtype(self.entries[key][0])

    def get(self, key: str) -> np.ndarray:
        base_key, rows = self.entries[key]
        x = self.base.get(base_key)
        return x if rows is None else x[rows]


def _safetensors_files(path: str) -> list[str]:
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ConversionError(path, other=[f"{path} is not a .safetensors file; only "
                                               "safetensors weights are loaded (never pickles)"])
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if indexes:
        files = set()
        for idx in indexes:
            index_file = os.path.join(path, idx)
            try:
                with open(index_file, "rb") as fh:
                    weight_map = json.loads(fh.read().decode("utf-8"))["weight_map"]
                files.update(str(f) for f in weight_map.values())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UnreadableCheckpointError(
                    f"cannot read the shard index {index_file}: not a JSON object with a "
                    f"'weight_map' of tensor name -> shard file ({type(e).__name__}: "
                    f"{' '.join(str(e).split())})") from None
        missing = sorted(f for f in files if not os.path.exists(os.path.join(path, f)))
        if missing:
            raise ConversionError(path, other=[f"shard named in the index is absent: {m}"
                                               for m in missing])
        return [os.path.join(path, f) for f in sorted(files)]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (f" (found {', '.join(pickles)}: pickled checkpoints are not loaded; re-save them "
                "with safetensors.torch.save_file)") if pickles else ""
        raise ConversionError(path, other=[f"no *.safetensors file in {path}{hint}"])
    return [os.path.join(path, f) for f in files]
