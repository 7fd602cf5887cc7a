"""Device mesh, logical-axis rules and sharded placement of parameters and batches.

The approach is MaxText's: model code names the axes of every parameter with logical names
(`uniimage_jax/models/layers.py`: "embed", "mlp", "heads", ...), and one table of rules maps those
names to the mesh axes ("data", "fsdp", "tensor"). The mesh shape and extra rules come from the
config, so changing the parallelism never touches model code.

- "data": pure data parallelism (parameters replicated).
- "fsdp": data parallelism with parameters (and optimiser state) sharded along their "embed"
  dimension; the batch is split over data x fsdp.
- "tensor": tensor parallelism over the "mlp" / "heads" / "kv" / "vocab" dimensions.

Non-dividing dimensions: when a parameter dimension is not a multiple of the mesh axes its rule
maps it to (e.g. a 3-channel RGB conv, a depthwise kernel with one input channel), that dimension
is REPLICATED instead and one aggregated warning lists the affected parameters. We chose this over
raising because such small tensors occur throughout the VAE and the vision tower and replicating
them costs little; the warning keeps it visible. Unknown logical names, by contrast, raise: they
are typos or a missing rule, and a silent fallback would replicate a large weight.

Frozen towers (the MLLM and the autoencoder in the official recipe) get their own rules
(`frozen_rules`, `config.frozen_sharding`): 'replicated', or 'tensor' (the tensor-parallel part of
the rules only). FSDP pays an all-gather of every weight in every step to save optimiser and
parameter memory; a frozen tower has no optimiser state, so under FSDP rules it would be gathered
each step for nothing.

Parameters are created directly on their shards (`sharded_init`: `jax.eval_shape` -> shardings ->
`jax.jit(init, out_shardings=...)`), so no full copy of the model lands on one device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uniimage_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes the global batch is split over

# (logical name, mesh axes): a mesh axis name, a tuple of them, or None (replicated). A tuple of
# pairs so that it is also valid for `nn.logical_axis_rules` (activation constraints in models).
DEFAULT_LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("length", None),
    ("norm", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


# ----------------------------------------------------------------------------------------- mesh


def _mesh_sizes(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    if not isinstance(mesh_cfg, Mapping) and not hasattr(mesh_cfg, "items"):
        raise TypeError(f"mesh config must map {MESH_AXES} to sizes, got {mesh_cfg!r}")
    cfg = dict(mesh_cfg.items())
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"unknown mesh axes {unknown} in mesh config {cfg} (axes: {MESH_AXES})")
    sizes = []
    for axis in MESH_AXES:
        size = cfg.get(axis, 1)
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ConfigError(f"mesh axis {axis!r} size must be a positive int or -1, got {size!r}")
        sizes.append(int(size))
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1 (fill), got {cfg}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh {cfg}: the fixed axes multiply to {fixed}, which does not "
                              f"divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh {cfg} has {fixed} devices but {num_devices} are available "
                          "(use -1 for one axis to fill the rest)")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") sized by `mesh_cfg` (a mapping; missing axes are
    1, one axis may be -1 to take the remaining devices). Uses all global devices by default and
    `mesh_utils.create_device_mesh` so that on TPU the tensor axis follows the fast interconnect.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _mesh_sizes(mesh_cfg, len(devices))
    device_array = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())


# ---------------------------------------------------------------------------------------- rules


def _normalise_target(target) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def rules_from_config(extra: Rules | Mapping | None = (),
                      base: Rules = DEFAULT_LOGICAL_RULES) -> tuple[tuple[str, Any], ...]:
    """`base` rules with `extra` (pairs or a mapping) overriding same-named entries / adding new.

    Returns a tuple of (name, mesh axes) pairs usable here and with `nn.logical_axis_rules`.
    """
    if extra is None:
        extra = ()
    items = list(extra.items()) if hasattr(extra, "items") else list(extra)
    merged: dict[str, Any] = {}
    for source, pairs in (("base", base), ("config", items)):
        seen = set()
        for pair in pairs:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ConfigError(f"logical rule {pair!r} in {source} rules is not a "
                                  "(logical name, mesh axes) pair")
            name, target = pair
            if name in seen:
                raise ConfigError(f"logical axis {name!r} appears twice in the {source} rules")
            seen.add(name)
            target = _normalise_target(target)
            bad = [a for a in target if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"logical rule {name!r} -> {bad}: not mesh axes {MESH_AXES}")
            merged[name] = target[0] if len(target) == 1 else (target or None)
    return tuple(merged.items())


FROZEN_SHARDING = ("replicated", "tensor")


def frozen_rules(rules: Rules, mode: str) -> tuple[tuple[str, Any], ...]:
    """The rules for frozen parameters: 'replicated' maps every logical name to no mesh axis;
    'tensor' keeps only the "tensor" mesh axis of each rule (so nothing is split over the batch
    axes data / fsdp, and a mesh with tensor=1 replicates them too)."""
    if mode not in FROZEN_SHARDING:
        raise ConfigError(f"config.frozen_sharding={mode!r}: expected one of {FROZEN_SHARDING}")
    out = []
    for name, target in rules:
        kept = tuple(a for a in _normalise_target(target) if mode == "tensor" and a == "tensor")
        out.append((name, kept[0] if kept else None))
    return tuple(out)


def logical_to_partition_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                              rules: Rules) -> tuple[PartitionSpec, list[int]]:
    """PartitionSpec for an array with logical axis `names`, and the dims that fell back to
    replicated because they do not divide their mesh axes.

    A mesh axis already used by an earlier dimension is not used again (e.g. a ("mlp", "mlp")
    kernel is sharded on its first dimension only), as in flax's rule resolution.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match array rank {len(shape)}")
    table = {name: _normalise_target(t) for name, t in rules}
    used: set[str] = set()
    spec, fallbacks = [], []
    for dim, (name, size) in enumerate(zip(names, shape)):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(f"logical axis {name!r} has no sharding rule (rules cover "
                              f"{sorted(table)}); add it to config.logical_rules")
        axes = tuple(a for a in table[name] if a not in used)
        for a in axes:
            if a not in mesh.shape:
                raise ConfigError(f"rule {name!r} -> {a!r}: mesh has axes {tuple(mesh.shape)}")
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or n == 1:
            spec.append(None)
        elif size % n:
            spec.append(None)
            fallbacks.append(dim)
        else:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec), fallbacks


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def logical_to_shardings(abstract_tree, mesh: Mesh, rules: Rules = DEFAULT_LOGICAL_RULES,
                         used: set[str] | None = None):
    """NamedShardings for a tree that may hold `nn.LogicallyPartitioned` / `nn.Partitioned` boxes
    (e.g. `jax.eval_shape` of an init). The result has the structure of the UNBOXED tree.

    Unannotated leaves are replicated; dims that do not divide their mesh axes are replicated with
    one warning listing them (only those whose `jax.tree_util.keystr` path is in `used`, when
    given: the parameters a run will hold). Plain `nn.Partitioned` boxes already name mesh axes.
    """
    fallbacks = []

    def one(path, leaf):
        if not _is_box(leaf):
            return NamedSharding(mesh, PartitionSpec())
        shape = leaf.value.shape
        if isinstance(leaf, nn.LogicallyPartitioned):
            try:
                spec, bad = logical_to_partition_spec(leaf.names, shape, mesh, rules)
            except ValueError as e:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)}: {e}") from None
            if bad and (used is None or jax.tree_util.keystr(path) in used):
                fallbacks.append(f"{jax.tree_util.keystr(path)} {tuple(shape)} "
                                 f"{tuple(leaf.names)} dims {bad}")
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec(*leaf.names))

    out = jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=_is_box)
    if fallbacks:
        log.warning("%d parameter(s) have dimensions that do not divide mesh %s and are "
                    "replicated along them: %s", len(fallbacks), _describe(mesh),
                    "; ".join(fallbacks[:20]) + (" ..." if len(fallbacks) > 20 else ""))
    return out


def sharded_init(init_fn: Callable, mesh: Mesh, rules: Rules = DEFAULT_LOGICAL_RULES, *args,
                 shardings=None):
    """Run `init_fn(*args)` (returning a tree with logical-axis boxes) directly into its shards.

    Returns (unboxed params, shardings). Activation constraints inside `init_fn` see the mesh and
    the rules. `shardings`: the layout when the caller has already derived it from the same
    rules (it is then not derived, nor its fallback warning logged, a second time).
    """
    if shardings is None:
        shardings = logical_to_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return params, shardings


# ---------------------------------------------------------------------------------------- batch


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Axis `batch_axis` (the leading one by default) split over data x fsdp, the others
    replicated."""
    return NamedSharding(mesh, PartitionSpec(*(None,) * batch_axis, BATCH_AXES))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raise if the global batch cannot be split evenly over the batch shards of `mesh`."""
    shards = num_batch_shards(mesh)
    if global_batch < 1 or global_batch % shards:
        raise ConfigError(f"global batch size {global_batch} is not divisible by the {shards} "
                          f"batch shards (data x fsdp) of mesh {_describe(mesh)}")


def shard_host_batch(batch, mesh: Mesh, sharding: NamedSharding | None = None, *,
                     batch_axes: Mapping[str, int] | None = None):
    """Global jax.Arrays from this process's numpy shard of the batch (a tree or one array).

    Every process passes its own rows (the global batch is the concatenation over processes, in
    process order). The batch axis is the first one `sharding` splits (default `batch_sharding`:
    the leading axis); for a dict batch, `batch_axes` names the entries whose batch axis is
    another (e.g. {"position_ids": 1}: M-RoPE positions are (3, B, T)), each then split by
    `batch_sharding(mesh, axis)`.
    """
    if batch_axes:
        return {k: shard_host_batch(v, mesh, batch_sharding(mesh, batch_axes[k])
                                    if k in batch_axes else sharding)
                for k, v in batch.items()}
    sharding = batch_sharding(mesh) if sharding is None else sharding
    n_proc = jax.process_count()
    axis = next((i for i, s in enumerate(sharding.spec) if s is not None), 0)
    lead = sharding.spec[axis] if len(sharding.spec) else None
    shards = math.prod(mesh.shape[a] for a in _normalise_target(lead))

    def one(x):
        x = np.asarray(x)
        if x.ndim <= axis:
            raise ValueError(f"shard_host_batch needs arrays with a batch axis {axis}, got shape "
                             f"{x.shape}")
        rows = x.shape[axis] * n_proc
        if rows % shards:
            raise ValueError(f"global batch size {rows} ({x.shape[axis]} rows on each of "
                             f"{n_proc} process(es)) is not divisible by the {shards} batch shards "
                             f"of mesh {_describe(mesh)}")
        global_shape = x.shape[:axis] + (rows,) + x.shape[axis + 1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)
