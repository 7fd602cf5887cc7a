"""Data-iterator states saved by N processes, dealt again to M processes: a run restarted on
another number of hosts continues with the global batch where the checkpoint left it.

The pipeline (`pipeline.py`) deals consecutive blocks of `b = B / n` elements of ONE global order
to the n processes in turn (B the global batch), so global batch s is elements [s*B, (s+1)*B) of
that order whatever n is. Process i's saved state is `{"parent": {"next_index": m_i}, "skipped":
{example index: [path, reason]}}`: m_i counts the elements of its own block stream it has read,
unreadable ones included, and "skipped" lists the unreadable examples it met. Every global batch
is one "round" of the deal, so the run has consumed ceil(m_i / b) rounds, the same on every
process as long as no example was unreadable; a process that met an unreadable one read a little
further into its next block. The new state of every one of the M processes starts at the round
after the furthest one read, `R * B / M` elements into its own stream, with the union of the
skipped examples: exactly the next global batch when nothing was skipped, and never an example
seen twice when something was (the rest of a partly read round is then not seen).

Grain's `ElasticIterator` keeps one global index for the same purpose, for pipelines without
filters; this pipeline skips unreadable examples, hence the per-process positions here. States of
grain's worker processes (`data.worker_count > 0`) are not dealt again: their layout depends on
the worker count; such a run must resume on the number of processes that saved it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

from uniimage_jax.errors import ConfigError

log = logging.getLogger("uniimage_jax.data")


def _next_index(state, process: int) -> int:
    try:
        return int(state["parent"]["next_index"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"the data iterator state of process {process} has no plain reading position (saved "
            "with data.worker_count > 0?); resume on the number of processes that saved it") \
            from None


def deal_again(states: Sequence[dict], *, global_batch: int, process_index: int,
               process_count: int) -> dict:
    """The state of process `process_index` of `process_count` from the states the
    `len(states)` processes of an earlier run saved (module docstring)."""
    saved_count = len(states)
    for count in (saved_count, process_count):
        if global_batch % count:
            raise ConfigError(f"batch_size={global_batch} does not divide over {count} processes")
    saved_block = global_batch // saved_count
    positions = [_next_index(s, i) for i, s in enumerate(states)]
    rounds = max(math.ceil(m / saved_block) for m in positions)
    if any(m != rounds * saved_block for m in positions):
        log.warning("data: the %d processes that saved had read to different points of their "
                    "shards (unreadable examples skipped): resuming at the next whole global "
                    "batch (%d); examples of a partly read batch are not seen", saved_count,
                    rounds)
    skipped = {}
    for s in states:
        skipped.update(s.get("skipped", {}))
    new = copy.deepcopy(states[0])
    new["parent"]["next_index"] = rounds * (global_batch // process_count)
    new["skipped"] = dict(sorted(skipped.items(), key=lambda kv: int(kv[0])))
    if process_index == 0:
        log.info("data: iterator states of %d processes dealt to %d, after %d global batches",
                 saved_count, process_count, rounds)
    return new
