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

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Re-exported: the converters and tests use them as common.X.
from uniimage_jax.convert.sources import (ConversionError, SafetensorsSource,  # noqa: F401
                                         SourceView, UnreadableCheckpointError)

Path = tuple[str, ...]
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


# ----------------------------------------------------------------------------------------------
# Layer stacking (scan_layers layout <-> per-layer layout).
# ----------------------------------------------------------------------------------------------


def stack_layers(tree: Mapping[str, Any], name: str, num: int, stacked_name: str | None = None):
    """Replace children `name_0..name_{num-1}` of `tree` by one child whose leaves are stacked
    along a new leading axis (the layout of `nn.scan` over layers). Returns a new dict."""
    out = {k: v for k, v in tree.items() if not re.fullmatch(rf"{re.escape(name)}_\d+", k)}
    layers = [tree[f"{name}_{i}"] for i in range(num)]
    import jax

    out[stacked_name or name] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return out


def unstack_layers(tree: Mapping[str, Any], name: str, stacked_name: str | None = None):
    """Inverse of `stack_layers`."""
    import jax

    stacked = tree[stacked_name or name]
    num = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != (stacked_name or name)}
    for i in range(num):
        out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoint directories: an Orbax parameter tree + the model config, written atomically.
# ----------------------------------------------------------------------------------------------

CONFIG_FILE = "uniimage_config.json"
PARAMS_DIR = "params"


SOURCE_KEYS_FILE = "source_keys.json"


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


def save_converted(dst: str, params: Mapping[str, Any], config: Mapping[str, Any],
                   overwrite: bool = False, keys: list[dict[str, Any]] | None = None) -> str:
    """Write `params` (Orbax), `config` (JSON) and optionally the source key record to `dst`
    atomically.

    Everything is written to a temporary sibling directory first and renamed into place at the
    end, so an interrupted or failed conversion never leaves a half-written `dst`.
    """
    import orbax.checkpoint as ocp

    with atomic_directory(dst, overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
            json.dump(dict(config), fh, indent=2, sort_keys=True)
        if keys is not None:
            with open(os.path.join(tmp, SOURCE_KEYS_FILE), "w") as fh:
                json.dump(keys, fh)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), dict(params))
        ckptr.wait_until_finished()
    return os.path.abspath(dst)


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = False):
    """Yield a temporary sibling directory of `dst`; on success it replaces `dst` in one rename,
    on any error it is removed, so `dst` is never left half-written."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_converted(src: str, abstract_params=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, params) from a directory written by `save_converted`.

    With `abstract_params` (e.g. `jax.eval_shape` of an init, possibly carrying shardings), the
    restore is checked against it and placed accordingly.
    """
    import orbax.checkpoint as ocp

    src = os.path.abspath(src)
    cfg_path = os.path.join(src, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{src} is not a converted checkpoint: {CONFIG_FILE} is missing")
    with open(cfg_path) as fh:
        config = json.load(fh)
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(os.path.join(src, PARAMS_DIR), abstract_params)
    return config, params


def load_kind(src: str, kind: str, abstract_params=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `kind` part of the config, params) of a converted directory; an error names the kind
    found when it is not `kind` ('mllm', 'dit', 'vae', 'tbac')."""
    meta, params = load_converted(src, abstract_params)
    if meta.get("kind") != kind:
        raise ValueError(f"{src} holds a {meta.get('kind')!r} checkpoint, not {kind!r}")
    return meta[kind], params


def add_src_dst_arguments(parser, src_help: str) -> None:
    """The arguments every converter subcommand takes."""
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help="output directory (Orbax params + config)")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")


def refuse_existing(dst: str, overwrite: bool) -> None:
    """Fail before a (long) conversion rather than after it."""
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
