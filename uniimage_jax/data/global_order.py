"""The global order of a training run: position in the infinite stream -> example index, the
same on every process, one epoch after another (the pipeline deals it to the processes and
decodes its examples; pipeline.py).

Built from, in turn:
- the source's epoch: every example once, shuffled by grain's index shuffle with a new seed each
  epoch; with aspect buckets, whole same-bucket global batches (buckets.py); for a weighted
  mixture, each epoch's slots resolved to the components' examples (mixture.py);
- length grouping (length_groups.py), with `data.group_by_length` and prompt buckets: windows of
  the order regrouped by caption token count, the counts read once at start-up
  (caption_lengths.py) with the caller's counter. Off for the synthetic source, whose captions
  are drawn with their scene (about 1 ms each, too slow to count ahead over a whole set, and a
  few to 30 tokens: its batches fit the smallest buckets anyway).

Each stage maps a position to an example through arithmetic on the position (no iterator
state), so a position means the same example whatever the number of processes and after a
resume.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable, Sequence

import grain
import numpy as np

from uniimage_jax.data.buckets import BucketPlan, EpochOrder, plan_buckets
from uniimage_jax.data.caption_lengths import caption_token_counts
from uniimage_jax.data.length_groups import LengthGroupedOrder
from uniimage_jax.data.mixture import MixtureSource, stratified_draws
from uniimage_jax.data.sources import SyntheticSource

log = logging.getLogger("uniimage_jax.data")


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
    dataset: grain.MapDataset          # position -> example index
    epoch_length: int                  # positions per epoch
    bucket_plan: BucketPlan | None     # aspect buckets (None: square crops)
    unreadable: dict[int, tuple[str, str]]  # examples left out before any is read (size unread)
    length_grouped: bool


def _draws_captions(source) -> bool:
    components = getattr(source, "components", None)
    if components is not None:
        return any(_draws_captions(c) for c in components)
    return isinstance(source, SyntheticSource)


def global_order(source: Sequence[dict], data_cfg, *, task: str, image_size: int,
                 size_multiple: int, global_batch: int, shuffle_seed: int,
                 cache_dir: str | None, process_index: int = 0, process_count: int = 1,
                 count_caption_tokens: Callable | None = None,
                 dropped: Callable[[int, np.ndarray], np.ndarray] | None = None) -> GlobalOrder:
    """The global order of `source` for the data config `data_cfg` (see the module docstring).
    `dropped(epoch, examples)`: which captions CFG dropout empties (they group as 0 tokens)."""
    shuffle = bool(data_cfg.shuffle)
    threads = max(1, int(data_cfg.read_threads))
    weighted = isinstance(source, MixtureSource) and source.weighted
    plan, unreadable = None, {}
    if data_cfg.aspect_buckets:
        plan, unreadable = plan_buckets(
            source, task, name=data_cfg.aspect_buckets, image_size=image_size,
            multiple=size_multiple, global_batch=global_batch, cache_dir=cache_dir,
            threads=threads, is_first_process=process_index == 0,
            weighted_draws=(lambda labels, n: stratified_draws(source, labels, n)) if weighted
            else None)
        epoch_length = plan.epoch_length
        ds = grain.MapDataset.range(sys.maxsize).map(EpochOrder(plan, shuffle_seed, shuffle))
    else:
        epoch_length = len(source)
        ds = grain.MapDataset.range(epoch_length)
        ds = ds.shuffle(seed=shuffle_seed) if shuffle else ds
        ds = ds.repeat(None)
        if weighted:  # the shuffled slots of each epoch -> the mixture's examples
            ds = ds.map_with_index(source.plan(shuffle_seed, shuffle))
    grouped = bool(data_cfg.group_by_length and tuple(data_cfg.prompt_buckets)
                   and count_caption_tokens is not None)
    if grouped and _draws_captions(source):
        log.info("data: no length grouping: the synthetic source's captions are drawn with "
                 "their scenes")
        grouped = False
    if grouped:
        window = int(data_cfg.length_group_window)
        lengths = caption_token_counts(source, count_caption_tokens, task=task,
                                       cache_dir=cache_dir, threads=threads,
                                       process_index=process_index,
                                       process_count=process_count,
                                       progress=process_index == 0)
        ds = LengthGroupedOrder(ds, epoch_length=epoch_length, global_batch=global_batch,
                                window=window, lengths=lengths, seed=shuffle_seed,
                                groups=None if plan is None else plan.bucket_of,
                                dropped=dropped)
        log.info("data: global batches grouped by caption length in windows of %d",
                 window)
    return GlobalOrder(ds, epoch_length, plan, unreadable, grouped)
