"""Mixtures: one training stage reading several sources, each with a share of the examples.

Config (`data.mixture`): () reads the one source `data.source` names; otherwise a tuple of
dicts, one per component, each the data config with these fields replaced, plus an optional
"weight":

    c.data.source = "wds"
    c.data.mixture = ({"path": "gs://b/long-caption/{00000..01023}.tar"},
                      {"path": "gs://b/journeydb/*.tar"})
    --config.data.mixture="({'source': 'jsonl', 'path': 'a.jsonl'}, {'path': 'b.jsonl'})"

A component may set any field that chooses or reads a source (source, path, tfds_name, ...), not
one that shapes the whole pipeline (image_size, caption_dropout, shuffle, buckets, threads, ...:
`PIPELINE_FIELDS`), which the mixture shares.

Weights: none given = proportional to size: an epoch is the concatenation of the components,
every example once, in one global shuffle (the official code concatenates its stage 1 sets).
Given (to every component): relative shares. An epoch then still has L = sum of the sizes
examples, of which component k gives n_k = L * w_k / sum(w) (rounded by largest remainder, so
the n_k add up to L): when n_k < size_k, a different subset each epoch (the first n_k of a fresh
permutation of the component); when n_k > size_k, every example floor(n_k / size_k) or one more
times (each pass over the component its own permutation).

Order: the L slots of an epoch are the components' n_k slots in turn; the pipeline's global
shuffle permutes the slots, and a slot resolves to its example by arithmetic and grain's index
shuffle (`MixturePlan.resolve`), so nothing of an epoch's length is held in memory and a position
in the infinite order is still a function of the position alone: per-host blocks, exact resume
and independence from the process count hold as for one source. With aspect buckets the order is
made per epoch anyway (buckets.py): each (component, bucket) stratum then gives its share of
n_k per epoch (`stratified_draws`), so every epoch has the same length and bucket sizes.

Records keep their source's fields; the example index (skip log, CFG dropout draw, the batch's
"index") is the index in the concatenation. A mixture of latent caches (every component one)
trains from them; each cache's record "index" (in the source it encoded) is offset by the encoded
sizes of the components before it, so a mixture of caches gives the batches of the mixture of
the sources they encoded when no example was skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import numpy as np

from uniimage_jax.errors import ConfigError, UserError

# Fields of the data config that the whole mixture shares; a component sets only the others.
PIPELINE_FIELDS = frozenset({
    "mixture", "image_size", "source_image_size", "aspect_buckets", "prompt_buckets",
    "caption_dropout", "image_dropout_low", "image_dropout_high", "shuffle", "shuffle_seed",
    "read_threads", "prefetch_buffer_size", "worker_count", "worker_buffer_size",
    "group_by_length", "length_group_window"})
WEIGHT = "weight"
_STREAM = 0x313C  # keeps the mixture's draws apart from other uses of the shuffle seed


def check_mixture_fields(data_cfg) -> tuple[dict, ...]:
    """`data.mixture` as a tuple of dicts, each field checked by name (not yet the sources
    themselves); ConfigError naming `data.mixture[i].field` otherwise."""
    mixture = data_cfg.mixture
    if isinstance(mixture, (str, bytes, dict)) or not isinstance(mixture, Sequence):
        raise ConfigError(f"data.mixture must be a tuple of dicts (one per source), e.g. "
                          f"({{'path': 'a.jsonl'}}, {{'path': 'b.jsonl', 'weight': 2}}), "
                          f"got {mixture!r}")
    components = tuple(mixture)
    for i, component in enumerate(components):
        if not isinstance(component, dict) or not component:
            raise ConfigError(f"data.mixture[{i}] must be a non-empty dict of data fields, e.g. "
                              f"{{'path': 'a.jsonl'}}, got {component!r}")
    if len(components) == 1:
        raise ConfigError("data.mixture has one component: set its fields on data directly "
                          "(a mixture needs two or more sources)")
    weighted = []
    for i, component in enumerate(components):
        for key in component:
            if key == WEIGHT:
                continue
            if not isinstance(key, str) or key not in data_cfg:
                raise ConfigError(f"data.mixture[{i}].{key}: no such data field; a component "
                                  "sets the fields of its source (source, path, ...)")
            if key in PIPELINE_FIELDS:
                raise ConfigError(f"data.mixture[{i}].{key}: set for the whole mixture "
                                  f"(data.{key}), not per component")
        if WEIGHT in component:
            w = component[WEIGHT]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
                raise ConfigError(f"data.mixture[{i}].weight must be a positive number, got "
                                  f"{w!r}")
            weighted.append(i)
    if weighted and len(weighted) != len(components):
        missing = sorted(set(range(len(components))) - set(weighted))
        raise ConfigError(f"data.mixture[{missing[0]}].weight: give a weight to every component "
                          "or to none (none: proportional to size)")
    return components


def component_config(data_cfg, i: int, component: dict):
    """The data config of component `i`: `data_cfg` with the component's fields replaced."""
    node = data_cfg.copy_and_resolve_references()
    node.mixture = ()
    for key, value in component.items():
        if key == WEIGHT:
            continue
        try:
            node[key] = value
        except TypeError as e:
            raise ConfigError(f"data.mixture[{i}].{key}={value!r}: {e}") from None
    return node


def make_training_source(data_cfg, task: str, image_size: int, **options) -> Sequence[dict]:
    """The source a data config names: a `MixtureSource` when `data.mixture` lists components
    (each built by `sources.make_source` with `options`, errors prefixed with the component),
    else the one source."""
    from uniimage_jax.data.sources import make_source

    components = check_mixture_fields(data_cfg)
    if not components:
        return make_source(data_cfg, task, image_size, **options)
    built = []
    for i, component in enumerate(components):
        with _named_component(i):
            built.append(make_source(component_config(data_cfg, i, component), task,
                                     image_size, **options))
        if len(built[-1]) == 0:
            raise ConfigError(f"data.mixture[{i}]: the source holds no example")
    weights = ([float(c[WEIGHT]) for c in components] if WEIGHT in components[0] else None)
    return MixtureSource(built, weights)


def check_training_source(data_cfg, task: str, image_size: int) -> None:
    """The errors of the source(s) a data config names that can be found in seconds
    (`sources.check_source` of each), each named with its component."""
    from uniimage_jax.data.sources import check_source

    components = check_mixture_fields(data_cfg)
    if not components:
        check_source(data_cfg, task, image_size)
        return
    for i, component in enumerate(components):
        with _named_component(i):
            check_source(component_config(data_cfg, i, component), task, image_size)


class _named_component:
    """Re-raises a component's user error (or missing file) prefixed with `data.mixture[i]`,
    as the same kind of error."""

    def __init__(self, i: int):
        self.i = i

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, (UserError, FileNotFoundError)):
            cls = FileNotFoundError if isinstance(error, FileNotFoundError) else ConfigError
            raise cls(f"data.mixture[{self.i}]: {error}") from None
        return False


def _is_latent_cache(source) -> bool:
    from uniimage_jax.data.latent_records import LatentRecordSource

    return isinstance(source, LatentRecordSource)


def _encoded_size(source) -> int:
    """How many source indices a latent cache's records span (its readable and skipped
    examples), else the source's length."""
    meta = getattr(source, "metadata", None) if _is_latent_cache(source) else None
    if meta is not None:
        return max(len(source), int(meta.get("num_examples", 0)) + int(meta.get("num_skipped", 0)))
    return len(source)


def largest_remainder(total: int, shares: Sequence[float]) -> np.ndarray:
    """Integers proportional to `shares` that add up to `total` (ties: the earlier first)."""
    shares = np.asarray(shares, np.float64)
    exact = total * shares / shares.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:total - int(out.sum())]] += 1
    return out


class MixtureSource:
    """The concatenation of several sources (random access), with each component's count of
    examples per epoch (`counts`: the sizes, or shares of their sum by weight)."""

    def __init__(self, components: Sequence[Sequence[dict]],
                 weights: Sequence[float] | None = None):
        self.components = tuple(components)
        if len(self.components) < 2:
            raise ValueError("a mixture needs two or more sources")
        self.sizes = np.array([len(c) for c in self.components], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        latents = [_is_latent_cache(c) for c in self.components]
        if any(latents) and not all(latents):
            raise ConfigError("data.mixture mixes latent caches with image sources: a batch "
                              "holds either latents or images; cache every component or none")
        self.from_latents = all(latents)
        encoded = [_encoded_size(c) for c in self.components]
        self._index_offsets = np.concatenate([[0], np.cumsum(encoded)])
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        total = int(self.offsets[-1])
        self.counts = (self.sizes.copy() if self.weights is None
                       else largest_remainder(total, self.weights))
        for k, n in enumerate(self.counts):
            if n == 0:
                raise ConfigError(f"data.mixture[{k}].weight={self.weights[k]} gives the "
                                  f"component no example in an epoch of {total}")

    @property
    def weighted(self) -> bool:
        """Whether the epoch differs from the plain concatenation."""
        return not np.array_equal(self.counts, self.sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(component, index in it) of concatenated index `index`."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)}")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return k, index - int(self.offsets[k])

    def __getitem__(self, index: int) -> dict:
        k, local = self.locate(index)
        record = self.components[k][local]
        if self.from_latents:
            record = {**record, "index": int(record["index"]) + int(self._index_offsets[k])}
        return record

    def plan(self, seed: int, shuffle: bool) -> "MixturePlan":
        return MixturePlan(self.sizes, self.counts, self.offsets, int(seed), bool(shuffle))

    def __repr__(self) -> str:
        share = ("sizes" if self.weights is None
                 else "weights " + ", ".join(f"{w:g}" for w in self.weights))
        parts = ", ".join(f"{c!r}: {n} per epoch" for c, n in zip(self.components, self.counts))
        return f"MixtureSource({share}; {parts})"


def _seed32(*values: int) -> int:
    digest = hashlib.blake2b(np.asarray(values, np.int64).tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@dataclasses.dataclass(frozen=True)
class MixturePlan:
    """Slot -> example of a weighted mixture's epochs (see the module docstring); picklable, a
    grain `map_with_index` function over (position in the infinite order, slot of the epoch)."""

    sizes: np.ndarray      # examples of each component
    counts: np.ndarray     # its slots per epoch
    offsets: np.ndarray    # its first index in the concatenation
    seed: int
    shuffle: bool

    def __post_init__(self):
        object.__setattr__(self, "slot_starts", np.concatenate([[0], np.cumsum(self.counts)]))

    @property
    def epoch_length(self) -> int:
        return int(self.slot_starts[-1])

    def resolve(self, epoch: int, slot: int) -> int:
        """The concatenated index of `slot` in epoch `epoch`."""
        from grain.experimental import index_shuffle

        k = int(np.searchsorted(self.slot_starts, slot, side="right")) - 1
        size = int(self.sizes[k])
        repeat, local = divmod(int(slot) - int(self.slot_starts[k]), size)
        if self.shuffle and size > 1:
            local = index_shuffle(local, max_index=size - 1,
                                  seed=_seed32(self.seed, _STREAM, epoch, k, repeat), rounds=4)
        return int(self.offsets[k]) + int(local)

    def __call__(self, position: int, slot: int) -> int:
        return self.resolve(int(position) // self.epoch_length, int(slot))


@dataclasses.dataclass(frozen=True)
class StratifiedDraws:
    """The examples of each label (aspect bucket) in one epoch of a weighted mixture: component
    k's n_k split over its labels in proportion to their sizes, every epoch the same counts
    (`label_counts`), drawn afresh from each stratum each epoch (the members protocol of
    `buckets.BucketPlan`)."""

    pools: tuple[tuple[np.ndarray, ...], ...]   # [label][component]: the stratum's examples
    draws: tuple[tuple[int, ...], ...]          # [label][component]: how many per epoch

    @property
    def label_counts(self) -> tuple[int, ...]:
        return tuple(int(sum(d)) for d in self.draws)

    def members(self, epoch: int, seed: int, shuffle: bool) -> tuple[np.ndarray, ...]:
        out = []
        for label, (pools, draws) in enumerate(zip(self.pools, self.draws)):
            parts = []
            for k, (pool, n) in enumerate(zip(pools, draws)):
                if n == 0:
                    continue
                repeats, rest = divmod(n, len(pool))
                parts += [pool] * repeats
                if rest:
                    rng = np.random.default_rng([seed, _STREAM, epoch, label, k])
                    parts.append(rng.permutation(pool)[:rest] if shuffle else pool[:rest])
            out.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return tuple(out)


def stratified_draws(source: MixtureSource, labels: np.ndarray,
                     num_labels: int) -> StratifiedDraws:
    """`StratifiedDraws` of a weighted mixture whose examples carry `labels` (-1: left out)."""
    labels = np.asarray(labels)
    pools = [[None] * len(source.components) for _ in range(num_labels)]
    draws = [[0] * len(source.components) for _ in range(num_labels)]
    for k in range(len(source.components)):
        start, stop = int(source.offsets[k]), int(source.offsets[k + 1])
        own = labels[start:stop]
        sizes = np.array([np.count_nonzero(own == b) for b in range(num_labels)]
                         + [np.count_nonzero(own < 0)], np.float64)
        shares = largest_remainder(int(source.counts[k]), sizes) if sizes.sum() else sizes
        for b in range(num_labels):
            pools[b][k] = start + np.flatnonzero(own == b)
            draws[b][k] = int(shares[b]) if len(pools[b][k]) else 0
    return StratifiedDraws(tuple(tuple(p) for p in pools), tuple(tuple(d) for d in draws))
