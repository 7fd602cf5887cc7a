"""Strict, streaming conversion of PyTorch safetensors checkpoints into Flax parameter trees.

A conversion is data plus a naming convention:

* **Naming convention** shared by every port in this package: a Flax submodule has the name of the
  PyTorch attribute it ports, and list entries are suffixed with their index
  (`model.layers.3.self_attn.q_proj` -> `model/layers_3/self_attn/q_proj`). The leaf is found in
  the target tree: a PyTorch `weight` becomes whichever of `kernel`, `scale` or `embedding` the
  Flax module has; `bias` stays `bias`; any other leaf (an `nn.Parameter` such as
  `scale_shift_table`) keeps its name.
* **Data** per source format (a `KeyMap`): ordered regex rewrites of the PyTorch key before the
  convention applies (e.g. legacy `model.layers.` -> `language_model.layers.`), regexes of PyTorch
  keys that are deliberately dropped (non-persistent buffers), and transform overrides for the
  few tensors whose layout is not the default one.

Default layout transforms (PyTorch -> Flax, NHWC): Linear (out, in) -> (in, out); Conv1d
(O, I, k) -> (k, I, O); Conv2d (O, I, kh, kw) -> (kh, kw, I, O); Conv3d (O, I, t, h, w) ->
(t, h, w, I, O). Grouped convolutions keep I = C_in / groups (Flax `feature_group_count`).

Strictness: every PyTorch key must land on a Flax leaf of the same shape and every Flax leaf must
be produced exactly once. All problems are collected and reported together (missing, unexpected,
mis-shaped), *before* any tensor data is read, and nothing is written. Tensors are then read one
at a time (only shapes are inspected up front), so host memory holds the Flax tree and one source
tensor, never a second full copy.

This module is our own: no library converts arbitrary PyTorch modules to Flax trees strictly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from uniimage_jax.convert.sources import SourceView
from uniimage_jax.errors import ConversionError
from uniimage_jax.models.param_tree import Path, target_shapes, unflatten
Transform = Callable[[np.ndarray], np.ndarray]

# Flax leaf names a PyTorch `weight` may become, in order of preference.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


# ----------------------------------------------------------------------------------------------
# Mapping: PyTorch key -> Flax path.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How one source format's keys become Flax paths (see the module docstring).

    rewrites: (regex, replacement) pairs applied in order with `re.sub` to the PyTorch key.
      A rewrite producing the empty string drops the key (same as `ignore`).
    ignore: regexes (fullmatch) of PyTorch keys that are deliberately not converted.
    transforms: (regex over the '/'-joined Flax path, fn) overriding the default layout transform
      for matching leaves; the first match wins.
    """

    rewrites: Sequence[tuple[str, str]] = ()
    ignore: Sequence[str] = ()
    transforms: Sequence[tuple[str, Transform]] = ()

    def torch_to_flax(self, key: str, target: Mapping[Path, Any]) -> Path | None:
        """The Flax path of a PyTorch key, or None if the key is ignored.

        Raises KeyError when no leaf of `target` corresponds (an unexpected key).
        """
        if any(re.fullmatch(p, key) for p in self.ignore):
            return None
        for pattern, repl in self.rewrites:
            key = re.sub(pattern, repl, key)
        if not key:
            return None
        parts = key.split(".")
        module: list[str] = []
        for p in parts[:-1]:
            if p.isdigit() and module:
                module[-1] = f"{module[-1]}_{p}"
            else:
                module.append(p)
        leaf = parts[-1]
        candidates = _WEIGHT_LEAVES if leaf == "weight" else (leaf,)
        for c in candidates:
            path = (*module, c)
            if path in target:
                return path
        raise KeyError(key)

    def transform_for(self, path: Path) -> Transform | None:
        joined = "/".join(path)
        for pattern, fn in self.transforms:
            if re.fullmatch(pattern, joined):
                return fn
        return None


def torch_module_name(flax_module: Path, keymap: KeyMap, target: Mapping[Path, Any],
                      list_modules: Sequence[str]) -> str:
    """The PyTorch name of a Flax Dense module: the naming convention backwards
    (`transformer_blocks_0/attn1/to_out_0` -> `transformer_blocks.0.attn1.to_out.0`, splitting
    an index only off the names in `list_modules`, the torch ModuleLists), checked by mapping the
    name forward again with the converter's own `keymap` onto `target` (Flax paths)."""
    parts: list[str] = []
    for p in flax_module:
        head, _, index = p.rpartition("_")
        parts += [head, index] if head in list_modules and index.isdigit() else [p]
    name = ".".join(parts)
    try:
        back = keymap.torch_to_flax(name + ".weight", target)
    except KeyError:
        back = None
    if back != (*flax_module, "kernel"):
        raise ValueError(f"{'/'.join(flax_module)}: its PyTorch name {name!r} does not convert "
                         "back to it")
    return name


def default_transform(path: Path, x: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout by leaf name and rank (module docstring)."""
    if path[-1] != "kernel":
        return x
    if x.ndim == 2:
        return x.T
    if x.ndim >= 3:  # conv: (O, I, *spatial) -> (*spatial, I, O)
        return np.transpose(x, (*range(2, x.ndim), 1, 0))
    return x


def _transformed_shape(fn: Transform | None, path: Path, shape: tuple[int, ...]):
    probe = np.lib.stride_tricks.as_strided(np.zeros((), np.float32), shape, [0] * len(shape))
    out = fn(probe) if fn is not None else default_transform(path, probe)
    return tuple(out.shape)


@dataclasses.dataclass
class Plan:
    """The validated correspondence source key -> (flax path, transform)."""

    entries: list[tuple[str, Path, Transform | None]]


def plan_conversion(source, keymap: KeyMap, target: Mapping[Path, tuple[int, ...]],
                    *, name: str | None = None, optional: Iterable[Path] = (),
                    param_prefix: str = "") -> Plan:
    """Check every key and shape (no tensor data read); raise ConversionError listing all problems.

    optional: Flax paths that may legitimately have no source tensor (e.g. a tied lm_head).
    param_prefix: put before our parameter paths in messages (e.g. "mllm/").
    A missing tensor is named by the SOURCE key the user can look for in the checkpoint (in the
    key layout the checkpoint itself uses), followed by our parameter path.
    """
    name = name or getattr(source, "path", "checkpoint")
    unexpected, mismatched, entries = [], [], []
    produced: dict[Path, str] = {}
    duplicates = []
    for key in source.keys():
        try:
            path = keymap.torch_to_flax(key, target)
        except KeyError:
            unexpected.append(f"{key} {list(source.shape(key))}")
            continue
        if path is None:
            continue
        if path in produced:
            duplicates.append(f"{key} and {produced[path]} both map to {'/'.join(path)}")
            continue
        produced[path] = key
        fn = keymap.transform_for(path)
        got = _transformed_shape(fn, path, source.shape(key))
        if got != target[path]:
            mismatched.append(f"{key} {list(source.shape(key))} -> {'/'.join(path)} expects "
                              f"{list(target[path])} (after layout change: {list(got)})")
            continue
        entries.append((key, path, fn))
    optional = set(optional)
    absent = [p for p in target if p not in produced and p not in optional]
    name_of = _source_key_namer(source, keymap, target) if absent else None
    missing = [f"{name_of(p)} (our parameter {param_prefix}{'/'.join(p)} {list(target[p])})"
               for p in absent]
    if missing or unexpected or mismatched or duplicates:
        raise ConversionError(name, missing, unexpected, mismatched, duplicates)
    return Plan(entries)


def _module_splits(part: str) -> list[list[str]]:
    """The PyTorch names a Flax module name may come from: `blocks_0_1` <- `blocks.0.1`,
    `blocks_0.1`, `blocks.0_1` or `blocks_0_1` (the convention joins list indices with '_')."""
    m = re.fullmatch(r"(.+)_(\d+)", part)
    if not m:
        return [[part]]
    return [head + [m.group(2)] for head in _module_splits(m.group(1))] + [[part]]


def _source_key_namer(source, keymap: KeyMap, target) -> Callable[[Path], str]:
    """Path -> the source key that would have produced it (our own inverse of the naming
    convention and of the key map's rewrites; no library does this). The rewrites are undone by
    example: each present key and its rewritten form give a prefix translation (e.g.
    `model.language_model.` -> `model.` for a legacy Qwen2.5-VL checkpoint), applied to the
    missing key so that it is named as the checkpoint's other keys are. Falls back to our path
    when no candidate maps back onto it."""
    digits = re.compile(r"\d+")
    shapes, back = set(), {}

    def rewrite(key: str) -> str:
        for pattern, repl in keymap.rewrites:
            key = re.sub(pattern, repl, key)
        return key

    for key in source.keys():
        rewritten = rewrite(key)
        if not rewritten:
            continue
        shapes.add(digits.sub("#", rewritten))
        if rewritten != key:
            k, r = key.split("."), rewritten.split(".")
            n = 0
            while n < min(len(k), len(r)) and k[-1 - n] == r[-1 - n]:
                n += 1
            back.setdefault(".".join(r[:len(r) - n]), ".".join(k[:len(k) - n]))
    prefix = getattr(source, "prefix", "")

    def name_of(path: Path) -> str:
        import itertools

        leaf = "weight" if path[-1] in _WEIGHT_LEAVES else path[-1]
        options = [".".join(p for parts in combo for p in parts) + f".{leaf}"
                   for combo in itertools.islice(
                       itertools.product(*map(_module_splits, path[:-1])), 64)]
        candidates = []
        for c in options:
            try:
                if keymap.torch_to_flax(c, target) == path:
                    candidates.append(c)
            except KeyError:
                pass
        if not candidates:
            return "/".join(path)
        # Prefer the spelling the checkpoint's other keys have (layers.3 vs layers_3).
        best = next((c for c in candidates if digits.sub("#", c) in shapes), candidates[0])
        for r in sorted(back, key=len, reverse=True):
            if r and not (best == r or best.startswith(r + ".")):
                continue
            rest = best[len(r):] if r else "." + best
            original = back[r] + rest if back[r] else rest.lstrip(".")
            if rewrite(original) == best:  # the translation is right only if it maps back
                best = original
                break
        return prefix + best

    return name_of


def execute(source, plan: Plan, dtype=np.float32, progress: bool = False) -> dict[Path, np.ndarray]:
    """Read each planned tensor once, transform it and return the flat Flax tree."""
    items = plan.entries
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="converting", unit="tensor")
    out = {}
    for key, path, fn in items:
        x = source.get(key)
        x = fn(x) if fn is not None else default_transform(path, x)
        out[path] = np.ascontiguousarray(x, dtype=dtype if np.issubdtype(x.dtype, np.floating)
                                         else x.dtype)
    return out


def convert(source, keymap: KeyMap, abstract_params, **kw) -> dict[str, Any]:
    """Plan (strict) then execute; returns a nested dict of numpy arrays."""
    progress = kw.pop("progress", False)
    plan = plan_conversion(source, keymap, target_shapes(abstract_params), **kw)
    return unflatten(execute(source, plan, progress=progress))


def source_keys(source, plan: Plan, prefix: Path = ()) -> list[dict[str, Any]]:
    """The record of a conversion that lets `uniimage-convert export-*` write the source layout
    back: per Flax leaf, the source key, its shape and dtype, and the rows it came from."""
    out = []
    for key, path, fn in plan.entries:
        if fn is not None:
            raise ValueError(f"{key}: a custom transform cannot be recorded for export")
        base_key, rows = key, None
        if isinstance(source, SourceView):
            base_key, rows = source.entries[key]
            base = source.base
        else:
            base = source
        out.append({"key": base_key, "path": "/".join(prefix + path),
                    "shape": list(base.shape(base_key)), "dtype": base.dtype(base_key),
                    "rows": None if rows is None else [rows.start, rows.stop]})
    return out


