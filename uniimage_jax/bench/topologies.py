"""Cloud TPU topologies for ahead-of-time compilation on a host without TPUs.

`libtpu` (the `[aot]` extra) can describe a TPU slice it is not running on: JAX's
`jax.experimental.topologies.get_topology_desc` returns device objects for, e.g., `v5p:2x2x1`, and
`jax.jit(...).lower(...).compile()` on a mesh of those devices produces the executable the slice
would run, whose `memory_analysis()` and `cost_analysis()` can be read here. Nothing executes.

Names are `FAMILY:DIMS` as libtpu spells them: `v5p:2x2x1` (4 chips, a v5p-8), `v5p:2x2x2`,
`v5p:4x4x4`, `v5e:2x2`, `v5e:4x4` (a v5e-16), `v6e:2x2`, `v6e:2x4` (a v6e-8), `v6e:4x4`,
`v4:2x2x1`. Per-chip HBM and dense bf16 peak come from the table below (Cloud TPU's published
figures); a chip that libtpu exposes as several devices (v4's two TensorCores) splits both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re

from uniimage_jax.errors import UserError

GIB = 1024 ** 3

INSTALL_HINT = 'pip install -e ".[aot]"'


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str            # as typed in a topology name
    hbm_bytes: int         # per chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    dims: int              # 3 for the 3-D torus families, 2 for the 2-D ones
    # Whether libtpu's cost model gives this chip a step time (`optimal_seconds`); for v5e and
    # v6e it returns a negative one (libtpu 0.0.42.1), so nothing can be ranked by it there.
    xla_step_time: bool = True


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 3),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 3),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 2, xla_step_time=False),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 2, xla_step_time=False),
}

_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)+)$")


class TopologyError(UserError):
    """A topology that cannot be compiled for (unknown, malformed, libtpu missing)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    chips: int
    devices: tuple        # libtpu's device objects (compile targets, not runnable)

    @property
    def cores_per_chip(self) -> int:
        return max(1, len(self.devices) // self.chips)

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.chip.hbm_bytes // self.cores_per_chip

    @property
    def peak_flops_per_device(self) -> float:
        return self.chip.peak_bf16_flops / self.cores_per_chip


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """(chip, torus dims) of `FAMILY:AxB[xC]`, or a TopologyError saying what is wrong."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise TopologyError(f"--aot {name!r}: expected FAMILY:DIMS such as v5p:2x2x1, v5e:4x4 or "
                            f"v6e:2x4 (families {sorted(CHIPS)})")
    family, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if family not in CHIPS:
        raise TopologyError(f"--aot {name!r}: unknown TPU family {family!r}; known: "
                            f"{sorted(CHIPS)}")
    chip = CHIPS[family]
    if len(dims) != chip.dims or min(dims) < 1:
        raise TopologyError(f"--aot {name!r}: a {family} slice has {chip.dims} torus dimensions "
                            f"(e.g. {'2x2x1' if chip.dims == 3 else '2x2'})")
    return chip, dims


@contextlib.contextmanager
def _quiet_libtpu():
    """libtpu looks for the TPU VM it runs on and logs warnings when it finds none; describing a
    topology needs no host, so tell it which (any valid) one to assume while it loads. The host
    description is taken back afterwards: left in the environment, TPU_WORKER_HOSTNAMES would tell
    this process and its children that they run on a Cloud TPU VM (and so start the JAX
    distributed runtime). libtpu also takes a lock file that would keep a second compiling process
    (a parallel test) out; no chip is claimed here."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    host = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost"}
    saved = {k: os.environ.get(k) for k in host}
    for k, v in host.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def get(name: str) -> Topology:
    """The compile-only devices of topology `name` (needs libtpu, not a TPU)."""
    chip, dims = parse(name)
    if not libtpu_available():
        raise TopologyError(f"--aot {name}: libtpu is not installed; compiling for a TPU "
                            f"topology needs it: {INSTALL_HINT}")
    from jax.experimental import topologies

    canonical = f"{chip.family}:{'x'.join(map(str, dims))}"
    try:
        with _quiet_libtpu():
            desc = topologies.get_topology_desc(canonical, "tpu")
    except Exception as e:  # libtpu's own message names the constraint (e.g. host bounds)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"--aot {name}: libtpu cannot describe this topology: {first}") \
            from None
    return Topology(name=canonical, chip=chip, chips=math.prod(dims), devices=tuple(desc.devices))
