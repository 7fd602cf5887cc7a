"""Multi-process (multi-host) start-up and process-0-only logging.

One JAX process runs per host (or per GPU task); they must all call `jax.distributed.initialize`
before touching any device. `maybe_initialize_distributed` decides from the environment:

1. Explicit recipe (any launcher, including several processes on one machine):
   JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i.
   JAX_NUM_PROCESSES=1 means single process (also a way to switch auto-detection off).
2. Otherwise a cluster JAX detects by itself: SLURM with more than one task, or a Cloud TPU VM /
   GKE TPU slice (JAX reads the worker list from the TPU metadata / environment).
3. Otherwise nothing: a single process.

On CPU, cross-process collectives need an implementation: we select gloo before initialising
(unless the user chose one, e.g. mpi), which is harmless on GPU/TPU hosts.
"""

from __future__ import annotations

import logging
import os

import jax

from uniimage_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _select_cpu_collectives() -> None:
    if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _slurm_multi_task() -> bool:
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    return bool(os.environ.get("SLURM_JOB_ID")) and tasks is not None and tasks.isdigit() \
        and int(tasks) > 1


def _cloud_tpu_vm() -> bool:
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") \
            or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:  # JAX's own check (libtpu present and the GCE TPU metadata), private but stable
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def maybe_initialize_distributed() -> None:
    """Initialise the JAX distributed runtime when several processes are configured (see module
    docstring); a no-op for a single process or when already initialised. Call it first."""
    if jax.distributed.is_initialized():
        return
    explicit = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if os.environ.get(n)]
    if explicit:
        if ENV_NUM_PROCESSES in explicit and _int_env(ENV_NUM_PROCESSES) == 1:
            return
        missing = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
                   if n not in explicit]
        if missing:
            raise ConfigError(f"multi-process start-up needs {ENV_COORDINATOR}, "
                              f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}; "
                              f"{', '.join(missing)} not set")
        num, pid = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
        if num < 1 or not 0 <= pid < num:
            raise ConfigError(f"{ENV_PROCESS_ID}={pid} is not in [0, {ENV_NUM_PROCESSES}={num})")
        _select_cpu_collectives()
        jax.distributed.initialize(os.environ[ENV_COORDINATOR], num_processes=num, process_id=pid)
    elif _slurm_multi_task() or _cloud_tpu_vm():
        _select_cpu_collectives()
        jax.distributed.initialize()
    else:
        return
    log_main("JAX distributed: %d processes, %d devices (%d local)", jax.process_count(),
             jax.device_count(), jax.local_device_count())


def is_main_process() -> bool:
    """True on process 0 (the one that logs, writes summaries and sample grids)."""
    return jax.process_index() == 0


def log_main(msg: str, *args, level: int = logging.INFO, logger: logging.Logger | None = None):
    """`logger.log(level, msg, *args)` on process 0 only."""
    if is_main_process():
        (logger or log).log(level, msg, *args)


def sync(name: str) -> None:
    """Barrier across processes (e.g. after process 0 wrote a file the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_max(value: int) -> int:
    """The largest `value` over all processes (itself on one process). A blocking collective:
    every process must call it at the same point of the same step."""
    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.array([value], dtype=np.int32))
    return int(np.max(np.asarray(gathered)))


def any_process(mask) -> "np.ndarray":
    """The element-wise OR of a boolean array over all processes (itself on one process): e.g.
    which outputs exist on any host, when each host sees only its own disk. A blocking
    collective, as `process_max`."""
    import numpy as np

    mask = np.asarray(mask, dtype=bool)
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(mask.astype(np.int32))
    return np.asarray(gathered).reshape(jax.process_count(), *mask.shape).any(axis=0)


def from_main(values) -> list[int]:
    """Process 0's int32 `values` on every process (e.g. a run's start time, taken once)."""
    import numpy as np

    values = np.asarray(values, dtype=np.int32)
    if jax.process_count() == 1:
        return values.tolist()
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values)).astype(int).tolist()
