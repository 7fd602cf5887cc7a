"""Keep JAX off the TPU backend on a host that has `libtpu` (the `[aot]` extra) but no TPU.

With libtpu installed JAX tries the TPU backend first; on a host without TPU chips libtpu then
logs several lines of warnings about the TPU VM it cannot find before JAX falls back to the CPU.
Compiling for a TPU topology ahead of time needs no TPU backend (`uniimage_jax.bench.topologies`),
so on such a host every command runs on the CPU. A TPU VM exposes its chips as /dev/accel* (v4,
v5e) or /dev/vfio/<n> (v5p, v6e); a GPU host is left alone, and so is an explicit JAX_PLATFORMS.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def _has_accelerator_nodes() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or glob.glob("/dev/nvidia[0-9]*"))


def cpu_unless_accelerator() -> None:
    if "JAX_PLATFORMS" in os.environ or _has_accelerator_nodes():
        return
    if importlib.util.find_spec("libtpu") is not None:
        os.environ["JAX_PLATFORMS"] = "cpu"
