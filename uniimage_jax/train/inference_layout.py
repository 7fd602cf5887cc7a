"""Where inference runs on one process: the mesh of its devices and how the weights lie on it.

`uniimage-sample` (and `uniimage-bench --aot --task sample`, which compiles what it runs) samples
on a mesh of ONE process's devices; several processes (hosts) each take a share of the prompts
and exchange nothing while sampling. A mesh across hosts would only help weights too large for
one host's chips, and the published model (5.7 B parameters, 10.6 GiB in bf16) fits one chip of
every current TPU generation in bf16 and one host's chips in fp32.

The mesh has the trainer's axes (data, fsdp, tensor) and the weights follow the trainer's
logical-axis rules (`sharding.DEFAULT_LOGICAL_RULES`):
* replicated (a mesh with only a data axis: every device holds every weight and samples slots
  of its own) when the weights take at most `FIT_FRACTION` of a device's memory;
* otherwise FSDP over the fewest devices that bring them under it (`fsdp=f, data=D/f`), or the
  mesh the user gives (`--mesh data=A,fsdp=B,tensor=C`, one axis may be -1).
The autoencoder stays replicated in every layout: it is small (0.3 B parameters), and XLA's
partitioner (jax 0.10.2, CPU, both Shardy and GSPMD) computes its grouped convolutions wrongly
when their channels are split over devices, the images coming out visibly different.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.errors import UserError
from uniimage_jax.sampling.mesh_sampler import DeviceLayout
from uniimage_jax.train import sharding

# Weights may take this share of a device's memory and stay replicated; the rest is for the
# activations (the autoencoder's decode of a call's images at full resolution is the largest).
FIT_FRACTION = 0.75
GIB = 1024 ** 3


def parse_mesh(text: str | None, flag: str = "--mesh") -> dict[str, int] | None:
    """`data=A,fsdp=B,tensor=C` (any subset, one size may be -1) -> a mesh config; None or
    'auto' -> None (`choose_mesh` decides)."""
    if text is None or text.strip() == "auto":
        return None
    mesh = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise UserError(f"{flag} {text!r}: expected 'auto' or AXIS=SIZE pairs over "
                            f"{sharding.MESH_AXES}, such as data=2,fsdp=2")
        if axis in mesh:
            raise UserError(f"{flag} {text!r}: axis {axis!r} given twice")
        mesh[axis] = int(size)
    return mesh


def weight_bytes(params, dtype) -> int:
    """Bytes of a tree of weights (arrays or ShapeDtypeStructs) with the floating ones stored in
    `dtype`."""
    size = jnp.dtype(dtype).itemsize
    return sum(math.prod(x.shape) * (size if jnp.issubdtype(x.dtype, jnp.floating)
                                     else jnp.dtype(x.dtype).itemsize)
               for x in jax.tree.leaves(params))


def device_memory(device) -> int | None:
    """What the runtime lets one device hold (None where it does not say, e.g. on CPUs)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (backends without memory statistics)
        return None
    return (stats or {}).get("bytes_limit")


def choose_mesh(requested: dict | None, num_devices: int, weights: int,
                capacity: int | None) -> tuple[dict[str, int], str]:
    """(mesh config, why): `requested` as given, else replicated when `weights` bytes fit
    (`FIT_FRACTION` of `capacity`; always when the capacity is unknown), else FSDP over the
    fewest devices that make them fit."""
    if requested is not None:
        return dict(requested), "as asked (--mesh)"
    budget = None if capacity is None else FIT_FRACTION * capacity
    if budget is None or weights <= budget:
        return {"data": num_devices}, "weights replicated on every device"
    for f in range(2, num_devices + 1):
        if num_devices % f == 0 and weights / f <= budget:
            return ({"data": num_devices // f, "fsdp": f},
                    f"weights ({weights / GIB:.1f} GiB) over {FIT_FRACTION:.0%} of a device's "
                    f"{capacity / GIB:.1f} GiB: FSDP over {f} devices")
    raise UserError(f"the weights ({weights / GIB:.1f} GiB) do not fit this process's "
                    f"{num_devices} device(s) of {capacity / GIB:.1f} GiB even split over all "
                    "of them: store them in bfloat16 (--param-dtype bfloat16) or use more "
                    "devices per host")


def make_layout(model, mesh_config: dict, devices) -> DeviceLayout:
    """The `DeviceLayout` of `model` on a mesh of `devices` shaped by `mesh_config`: replicated
    weights on a data-only mesh, else the training rules' shardings (autoencoder replicated)."""
    from uniimage_jax.train.stage_setup import abstract_params

    try:
        mesh = sharding.make_mesh(mesh_config, list(devices))
    except ValueError as e:
        raise UserError(f"--mesh: {e}") from None
    if mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1:
        return DeviceLayout(mesh, sharding.BATCH_AXES)
    rules = sharding.rules_from_config(())
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh, rules))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings["vae"] = jax.tree.map(lambda _: everywhere, shardings["vae"])
    return DeviceLayout(mesh, sharding.BATCH_AXES, shardings)


def replicated_layout(devices) -> DeviceLayout:
    """Every weight on every one of `devices`, each device working on rows of its own."""
    return DeviceLayout(sharding.make_mesh({"data": -1}, list(devices)), sharding.BATCH_AXES)


def stored(params, dtype):
    """Host copies of `params` with the floating leaves in `dtype` (before placement: a
    converted checkpoint is read into host memory, so no device holds a full fp32 copy)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, params)


def describe(layout: DeviceLayout) -> str:
    mesh = ",".join(f"{a}={n}" for a, n in layout.mesh.shape.items())
    return (f"mesh {mesh} of {layout.mesh.devices.size} {layout.mesh.devices.flat[0].platform} "
            f"device(s), weights {'replicated' if layout.replicated else 'sharded'}")
