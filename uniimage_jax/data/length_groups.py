"""Length-grouped batches: prompts of similar token length share a global batch, so that each
batch is padded to the prompt bucket of its own prompts rather than nearly always the largest.

Why: a batch is padded to the smallest prompt bucket that holds its LONGEST prompt. With long
captions (the published sets' ~100-250 tokens) one long caption among 64 is almost certain, so
nearly every batch of a random order lands in the largest bucket.

How (`LengthGroupedOrder`, a grain MapDataset over the global order of example indices): the
global order is cut, epoch by epoch, into windows of `window` global batches. Within a window the
examples are sorted by caption token count (an example whose caption CFG dropout will empty
counts 0: the pipeline's own dropout draw, `dropped`), cut into global batches, and the batches
put in an order drawn from (seed, epoch, window). An epoch's last window may be shorter; its
remainder of less than a batch stays at its end. With aspect buckets (`groups`: each example's
bucket) the order is made of whole same-bucket global batches and windows start at batch
boundaries, so sorting by (bucket, length) keeps every batch in one bucket.

The grouped order is a permutation of each window of the order it regroups: every example of an
epoch is still seen exactly once in it; a position still maps to an example through arithmetic
on the position alone (the window's permutation is recomputed on demand and a few are kept), so
per-host blocks, exact resume and the independence from the process count carry over. The
window trades padding against order: larger windows pack tighter (the packing limit is the
sorted whole epoch) but keep similar lengths together over more steps.

No library groups a random-access global order like this (Hugging Face's `LengthGroupedSampler`
sorts mega-batches of one process's sampler, torch's bucketing samplers are iterators), so it is
written here.
"""

from __future__ import annotations

import threading
from typing import Callable

import grain
import numpy as np

_ORDER_STREAM = 0x1E9C  # the batch order within a window, apart from other uses of the seed
_KEPT_WINDOWS = 4       # read threads straddle a window boundary; a few windows are kept


class LengthGroupedOrder(grain.MapDataset):
    """`parent` (position -> example index, infinite) with each window of `window` global
    batches regrouped by length (see the module docstring).

    Args:
      parent: the global order, epochs of `epoch_length` positions.
      global_batch: examples per step over ALL processes.
      lengths: caption token count of every example index (uint16 array).
      seed: the batch order within each window.
      groups: optional int array per example index that a batch must not mix (aspect buckets).
      dropped: optional (epoch, example indices) -> bool array: the captions CFG dropout empties.
    """

    def __init__(self, parent: grain.MapDataset, *, epoch_length: int, global_batch: int,
                 window: int, lengths: np.ndarray, seed: int, groups: np.ndarray | None = None,
                 dropped: Callable[[int, np.ndarray], np.ndarray] | None = None):
        super().__init__(parent)
        if epoch_length < 1 or global_batch < 1 or window < 1:
            raise ValueError(f"epoch_length={epoch_length}, global_batch={global_batch} and "
                             f"window={window} must be positive")
        self._epoch_length, self._batch = int(epoch_length), int(global_batch)
        self._span = int(window) * int(global_batch)
        self._lengths, self._groups, self._dropped = lengths, groups, dropped
        self._seed = int(seed)
        self._init_cache()

    def _init_cache(self) -> None:
        self._windows: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_windows", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.slice(position)
        position = int(position)
        epoch, offset = divmod(position, self._epoch_length)
        window, within = divmod(offset, self._span)
        permutation = self.window_permutation(epoch, window)
        return self._parent[position - within + int(permutation[within])]

    def window_permutation(self, epoch: int, window: int) -> np.ndarray:
        """Offsets within window `window` of `epoch`, in grouped order."""
        key = (epoch, window)
        kept = self._windows.get(key)
        if kept is not None:
            return kept
        start = epoch * self._epoch_length + window * self._span
        n = min(self._span, self._epoch_length - window * self._span)
        examples = np.fromiter((self._parent[start + i] for i in range(n)), np.int64, n)
        keys = self._lengths[examples].astype(np.int64)
        if self._dropped is not None:
            keys[np.asarray(self._dropped(epoch, examples), bool)] = 0
        groups = (np.zeros(n, np.int64) if self._groups is None
                  else np.asarray(self._groups)[examples])
        order = np.lexsort((keys, groups))  # by group, then length; ties keep their order
        whole = n // self._batch
        rng = np.random.default_rng([self._seed, _ORDER_STREAM, epoch, window])
        batches = order[:whole * self._batch].reshape(whole, self._batch)[rng.permutation(whole)]
        permutation = np.concatenate([batches.reshape(-1), order[whole * self._batch:]])
        with self._lock:
            if len(self._windows) >= _KEPT_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            self._windows[key] = permutation
        return permutation

    def __str__(self) -> str:
        return (f"LengthGroupedOrder(window={self._span // self._batch} global batches of "
                f"{self._batch})")
