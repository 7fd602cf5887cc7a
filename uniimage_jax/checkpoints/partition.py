"""Trainable vs frozen: a parameter tree split by path regex into two pruned trees, and joined back.

The train state keeps the two apart and the optimiser is initialised on the trainable tree only.
We chose this over `optax.masked` because masked transforms still carry a (placeholder) entry for
every frozen leaf and the gradient would be taken through all parameters; with two trees the
frozen MLLM/VAE weights have no Adam moments at all, no gradient buffers (differentiate with
respect to the trainable tree only) and can be sharded / donated independently. A stage's
checkpoint holds the trainable tree; loading a stage joins it with the frozen towers again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from uniimage_jax.errors import ConfigError

PyTree = Any


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _as_dict(tree) -> dict:
    """Nested plain dicts (FrozenDict and other Mappings are converted)."""
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def trainable_mask(params: PyTree, trainable_patterns: Sequence[str]) -> PyTree:
    """Boolean tree: True where the '/'-joined parameter path fully matches one of the regexes.

    Paths look like `sana/transformer_blocks_3/attn1/to_q/kernel` (relative to the tree given).
    A pattern that matches no parameter is an error: it is almost always a typo or a renamed module,
    and silently freezing what should train would waste a run.
    """
    if isinstance(trainable_patterns, str):
        raise TypeError("trainable_patterns must be a sequence of regex strings, not one string")
    compiled = []
    for p in trainable_patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"invalid trainable-parameter pattern {p!r}: {e}") from None
    used = [False] * len(compiled)

    def leaf_mask(path, _):
        name = _path_str(path)
        hit = False
        for i, rx in enumerate(compiled):
            if rx.fullmatch(name):
                used[i] = hit = True
        return hit

    mask = jax.tree_util.tree_map_with_path(leaf_mask, params)
    unused = [p for p, u in zip(trainable_patterns, used) if not u]
    if unused:
        paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        sample = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise ConfigError(f"trainable-parameter pattern(s) {unused} match no parameter "
                          f"(patterns are re.fullmatch'ed against paths such as: {sample})")
    return mask


def _prune(tree, mask, keep: bool):
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            sub = _prune(v, mask[k], keep)
            if sub is not None:
                out[k] = sub
        return out or None
    return tree if bool(mask) == keep else None


def partition_params(params: PyTree, trainable_patterns: Sequence[str]) -> tuple[dict, dict]:
    """Split a nested-dict parameter tree into (trainable, frozen) pruned nested dicts.

    Each leaf goes to exactly one side; subtrees left empty are dropped, so `tx.init(trainable)`
    allocates optimiser state only for trainable leaves. Undo with `merge_params`.
    """
    params = _as_dict(params)
    if not isinstance(params, dict):
        raise TypeError(f"partition_params expects a nested dict of parameters, got {type(params)}")
    mask = trainable_mask(params, trainable_patterns)
    return _prune(params, mask, True) or {}, _prune(params, mask, False) or {}


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of `partition_params`: deep-merge two disjoint nested dicts."""
    trainable, frozen = _as_dict(trainable), _as_dict(frozen)

    def merge(a, b, path):
        out = dict(a)
        for k, v in b.items():
            if k not in out:
                out[k] = v
            elif isinstance(out[k], dict) and isinstance(v, dict):
                out[k] = merge(out[k], v, path + (k,))
            else:
                raise ValueError(f"parameter {'/'.join(map(str, path + (k,)))} is in both the "
                                 "trainable and the frozen tree")
        return out

    return merge(trainable, frozen, ())
