"""Aspect-ratio buckets: the (height, width) a training image is cropped to, and an epoch order
made of whole same-bucket global batches.

Bucket sets. `sana_512` is diffusers' `ASPECT_RATIO_512_BIN` (pipelines/pixart_alpha), the bins
SANA's 512 px pipeline snaps resolutions to, copied here as data: diffusers is a test dependency
only (the tests compare this table with it). Keys are aspect ratios h / w, values (h, w) in pixels
of about 512 x 512 area.

Scaling to a model of image size S: each side becomes max(m, floor(side * S / 512 / m + 0.5) * m)
where m = the autoencoder's downsampling factor x the DiT's patch size (`UniImageConfig.
pixel_multiple`), so every bucket has whole latent patches. At S = 512, m = 32 (DC-AE f32, SANA
patch 1) this is the table itself; the tiny preset (S = 32, pixel autoencoder f4, m = 4) gets 22
distinct shapes from 16 x 64 to 64 x 16. Several ratios may share a shape after scaling: a bucket
is a shape.

Assignment needs an image's size only: it goes to the table entry whose ratio is nearest to
h / w, the first in table order on a tie, exactly as diffusers'
`PixArtImageProcessor.classify_height_width_bin` (used by the SANA pipeline).

Order (`BucketPlan.epoch_order`): the examples of each bucket, shuffled with (seed, epoch), are cut
into chunks of one GLOBAL batch (a bucket's remainder sits out that epoch; a different remainder
each epoch), then the chunks are shuffled. Every epoch has the same length, so a position in the
infinite order maps to (epoch, offset) by division, and the pipeline deals the order to the hosts
in per-host blocks as for square crops: a global batch is one bucket and one shape, and does not
depend on the number of processes. A weighted mixture of sources (mixture.py) gives each bucket
the same number of examples every epoch, drawn afresh from each (source, bucket) stratum, so the
epoch length stays fixed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from uniimage_jax.errors import UserError

# diffusers 0.42 `ASPECT_RATIO_512_BIN`: "h / w" -> (h, w) pixels.
SANA_512_BINS: dict[str, tuple[int, int]] = {
    "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864),
    "0.35": (288, 832), "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736),
    "0.5": (352, 704), "0.52": (352, 672), "0.57": (384, 672), "0.6": (384, 640),
    "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576), "0.82": (448, 544),
    "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
    "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416),
    "1.46": (608, 416), "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352),
    "2.09": (736, 352), "2.4": (768, 320), "2.5": (800, 320), "3.0": (864, 288),
    "4.0": (1024, 256),
}
# name -> (table, the image size the table is drawn for)
BUCKET_SETS: dict[str, tuple[dict[str, tuple[int, int]], int]] = {"sana_512": (SANA_512_BINS, 512)}

_ORDER_STREAM = 0xB0C4  # keeps the bucket order's randomness apart from other uses of the seed


def check_bucket_set_name(name: str, field: str = "data.aspect_buckets") -> str:
    if name not in BUCKET_SETS:
        raise UserError(f"{field}={name!r}: expected '' (square centre crops) or one of "
                         f"{sorted(BUCKET_SETS)}")
    return name


@dataclasses.dataclass(frozen=True)
class BucketSet:
    """A bucket table scaled to one model: `entry_shape[k]` is table entry k's (h, w), and
    `shapes` the distinct shapes (the buckets) in table order; `entry_bucket[k]` indexes them."""

    name: str
    ratios: tuple[float, ...]
    entry_shape: tuple[tuple[int, int], ...]
    shapes: tuple[tuple[int, int], ...]
    entry_bucket: tuple[int, ...]

    def nearest_entry(self, height: int, width: int) -> int:
        """The table entry nearest in aspect ratio (`classify_height_width_bin`'s rule)."""
        ar = float(height / width)
        return min(range(len(self.ratios)), key=lambda k: abs(self.ratios[k] - ar))

    def snap(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the bin nearest in aspect ratio to height x width."""
        return self.entry_shape[self.nearest_entry(height, width)]

    def buckets_of(self, sizes: np.ndarray) -> np.ndarray:
        """Bucket index of each (h, w) row of `sizes` (int, N x 2); -1 where a size is unknown
        (a row with h < 1). Vectorised, with the same float arithmetic and tie rule as
        `nearest_entry`."""
        sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
        known = (sizes[:, 0] > 0) & (sizes[:, 1] > 0)
        ar = sizes[:, 0].astype(np.float64) / np.where(known, sizes[:, 1], 1).astype(np.float64)
        entry = np.argmin(np.abs(np.asarray(self.ratios)[None, :] - ar[:, None]), axis=1)
        return np.where(known, np.asarray(self.entry_bucket)[entry], -1)

    def label(self, bucket: int) -> str:
        h, w = self.shapes[bucket]
        return f"{h}x{w}"


def make_bucket_set(name: str, image_size: int, multiple: int) -> BucketSet:
    """Bucket set `name` scaled to `image_size` pixels with sides multiples of `multiple`."""
    check_bucket_set_name(name)
    if image_size < 1 or multiple < 1:
        raise UserError(f"image_size={image_size} and multiple={multiple} must be positive")
    table, base = BUCKET_SETS[name]

    def side(x: float) -> int:
        return max(multiple, math.floor(x * image_size / base / multiple + 0.5) * multiple)

    entry_shape = tuple((side(h), side(w)) for h, w in table.values())
    shapes = tuple(dict.fromkeys(entry_shape))
    return BucketSet(name=name, ratios=tuple(float(k) for k in table),
                     entry_shape=entry_shape, shapes=shapes,
                     entry_bucket=tuple(shapes.index(s) for s in entry_shape))


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Every example's bucket and the per-epoch global order; picklable for grain workers.

    `bucket_of[i]` is example i's bucket, -1 when its size could not be read (it never enters
    the order). `global_batch` is the batch of ALL processes together. `weighted` (a weighted
    mixture's `mixture.StratifiedDraws`, optional) gives each epoch's examples of every bucket,
    the same number each epoch, instead of every member once."""

    buckets: BucketSet
    bucket_of: np.ndarray
    global_batch: int
    weighted: Any = None

    def __post_init__(self):
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")
        members = tuple(np.flatnonzero(self.bucket_of == b)
                        for b in range(len(self.buckets.shapes)))
        object.__setattr__(self, "members", members)

    def _epoch_counts(self) -> tuple[int, ...]:
        if self.weighted is not None:
            return self.weighted.label_counts
        return tuple(len(m) for m in self.members)

    @property
    def epoch_length(self) -> int:
        g = self.global_batch
        return sum(n // g * g for n in self._epoch_counts())

    def histogram(self) -> dict[str, int]:
        """{"HxW": number of examples} for every bucket that holds any."""
        return {self.buckets.label(b): len(m) for b, m in enumerate(self.members) if len(m)}

    def shape_of(self, index: int) -> tuple[int, int]:
        return self.buckets.shapes[int(self.bucket_of[index])]

    def epoch_order(self, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
        """Example indices of `epoch` (length `epoch_length`): whole same-bucket global batches."""
        g = self.global_batch
        rng = np.random.default_rng([seed, epoch, _ORDER_STREAM])
        chunks = []
        population = (self.members if self.weighted is None
                      else self.weighted.members(epoch, seed, shuffle))
        for members in population:
            if len(members) >= g:
                order = rng.permutation(members) if shuffle else members
                chunks.append(order[:len(order) // g * g].reshape(-1, g))
        if not chunks:
            raise UserError(f"no bucket holds a whole global batch of {g} examples; "
                             f"buckets: {self.histogram()}")
        chunks = np.concatenate(chunks)
        if shuffle:
            chunks = chunks[rng.permutation(len(chunks))]
        return chunks.reshape(-1)

    def substitute(self, index: int, seed: int, epoch: int, position: int, attempt: int) -> int:
        """A deterministic other example of `index`'s bucket, to stand in for it when it turns out
        unreadable, so that its batch keeps one shape (a function of its arguments only, so a
        resumed or re-sharded run draws the same one)."""
        members = self.members[int(self.bucket_of[index])]
        rng = np.random.default_rng([seed, epoch, position, attempt, _ORDER_STREAM + 1])
        return int(members[rng.integers(len(members))])

    def describe(self) -> str:
        g = self.global_batch
        per_epoch = self._epoch_counts()
        rows = [f"{self.buckets.label(b)}: {len(m)} examples"
                + (f", {n} per epoch" if self.weighted is not None else "")
                + (f" ({n % g} sit out each epoch)" if n % g and n >= g else "")
                + (" (fewer than a global batch: never used)" if 0 < n < g else "")
                for b, (m, n) in enumerate(zip(self.members, per_epoch)) if len(m)]
        return (f"aspect buckets {self.buckets.name}, global batch {g}, "
                f"{self.epoch_length} examples per epoch:\n  " + "\n  ".join(rows))


class EpochOrder:
    """position -> example index of the infinite bucketed order (a grain map function). Keeps the
    last epoch's order, since consecutive positions almost always share an epoch."""

    def __init__(self, plan: BucketPlan, seed: int, shuffle: bool):
        self.plan, self.seed, self.shuffle = plan, int(seed), bool(shuffle)
        self.length = plan.epoch_length
        self._cached: tuple[int, np.ndarray] | None = None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.length)
        cached = self._cached
        if cached is None or cached[0] != epoch:
            cached = (epoch, self.plan.epoch_order(epoch, self.seed, self.shuffle))
            self._cached = cached   # one assignment: safe under grain's reader threads
        return int(cached[1][offset])

    def __getstate__(self):
        return {**self.__dict__, "_cached": None}


def plan_buckets(source, task: str, *, name: str, image_size: int, multiple: int,
                 global_batch: int, cache_dir: str | None, threads: int, is_first_process: bool,
                 weighted_draws=None):
    """(BucketPlan, {index: (path, reason)} of records whose size could not be read) for
    `source`, logging the bucket histogram. `weighted_draws(bucket_of, num_buckets)`: a weighted
    mixture's per-epoch members (`mixture.stratified_draws`), optional."""
    import logging

    from uniimage_jax.data.record_sizes import target_sizes

    buckets = make_bucket_set(name, image_size, multiple)
    sizes, unreadable = target_sizes(source, task, cache_dir=cache_dir, threads=threads,
                                     write_cache=is_first_process, progress=is_first_process)
    bucket_of = buckets.buckets_of(sizes).astype(np.int32)
    plan = BucketPlan(buckets=buckets, bucket_of=bucket_of, global_batch=int(global_batch),
                      weighted=(None if weighted_draws is None
                                else weighted_draws(bucket_of, len(buckets.shapes))))
    if plan.epoch_length == 0:
        raise UserError(f"data.aspect_buckets={name!r}: no bucket holds a whole global batch of "
                         f"{global_batch} examples; buckets: {plan.histogram()}")
    logging.getLogger("uniimage_jax.data").info(
        "%s%s", plan.describe(),
        f"\n  {len(unreadable)} examples left out (image size unreadable)" if unreadable else "")
    return plan, unreadable
