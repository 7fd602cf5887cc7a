"""Nested parameter dicts as flat {path tuple: leaf} maps, and the two layer layouts: one child per
layer (`layers_0`, `layers_1`, ...) and one stacked child (the layout of `nn.scan` over layers)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def target_shapes(abstract_params: Mapping[str, Any]) -> dict[Path, tuple[int, ...]]:
    """{path: shape} of an abstract (eval_shape) or concrete parameter tree, boxes unwrapped."""
    import flax.linen as nn

    return {p: tuple(v.shape) for p, v in flatten(nn.meta.unbox(abstract_params)).items()}


def stack_layers(tree: Mapping[str, Any], name: str, num: int, stacked_name: str | None = None):
    """Replace children `name_0..name_{num-1}` of `tree` by one child whose leaves are stacked
    along a new leading axis (the layout of `nn.scan` over layers). Returns a new dict."""
    out = {k: v for k, v in tree.items() if not re.fullmatch(rf"{re.escape(name)}_\d+", k)}
    layers = [tree[f"{name}_{i}"] for i in range(num)]
    out[stacked_name or name] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return out


def unstack_layers(tree: Mapping[str, Any], name: str, stacked_name: str | None = None):
    """Inverse of `stack_layers`."""
    stacked = tree[stacked_name or name]
    num = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != (stacked_name or name)}
    for i in range(num):
        out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
