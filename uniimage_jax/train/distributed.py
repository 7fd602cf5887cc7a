"""Multi-process (multi-host) behaviour, decided here and nowhere else: start-up, stopping
together on SIGTERM, barriers with timeouts, who writes what, and the exit codes.

Start-up (`maybe_initialize_distributed`). One JAX process runs per host (or per GPU task); they
all call `jax.distributed.initialize` before touching any device. Which processes form the job:
1. Explicit recipe (any launcher, including several processes on one machine):
   JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i.
   JAX_NUM_PROCESSES=1 means single process (also a way to switch auto-detection off).
2. Otherwise a cluster JAX detects by itself: SLURM with more than one task, or a Cloud TPU VM /
   GKE TPU slice (JAX reads the worker list from the TPU metadata / environment).
3. Otherwise nothing: a single process.
On CPU, cross-process collectives need an implementation: gloo is selected (unless the user chose
one, e.g. mpi), which is harmless on GPU/TPU hosts. JAX's coordination service (run by process 0)
takes its timeouts from the environment, in seconds:
  UNIIMAGE_HEARTBEAT_TIMEOUT_S  (default 100, JAX's) a process silent this long is declared lost
  UNIIMAGE_INIT_TIMEOUT_S       (300) how long start-up waits for every process to join
  UNIIMAGE_SHUTDOWN_TIMEOUT_S   (300) how long a process that ends waits for the others at exit
  UNIIMAGE_BARRIER_TIMEOUT_S    (600) how long a barrier of this module waits (below)

A lost process (killed, out of memory, its host gone). The others are blocked in the step's
collectives, which have no timeout of their own (gloo on CPU, ICI on TPU). The bound is the
coordination service: when a process's heartbeats stop for UNIIMAGE_HEARTBEAT_TIMEOUT_S, JAX
terminates every other process (abort: exit status 134, SIGABRT) after logging "The following
tasks are unhealthy (stopped sending heartbeats): <process ids>". A lost process 0 takes the
service with it, which the others notice at once. Nothing half-written is ever resumed: a
checkpoint step counts only once process 0 has committed it after every process wrote its part.
JAX's `missed_heartbeat_callback` could replace the abort with a message of ours, but the
installed jaxlib cannot hand the callback its argument (it aborts with std::bad_cast).

Stopping together on SIGTERM (a preemption notice on Cloud TPU and GKE, SLURM's time limit).
`watch_sigterm` makes SIGTERM set a flag, for the whole stage, start-up included, and
`stop_requested` tells the train loop when to save and stop. One process reads its own flag every
step. Several processes must stop at the same step, having saved the same checkpoint: every
`every` steps each one posts its flag to the coordination service's key-value store and waits at
a barrier; then all read every flag. That is host-side only (the devices keep working on queued
steps) and bounded by the barrier timeout. JAX's own preemption service is switched off: its
SIGTERM handler, installed by `jax.distributed.initialize`, would swallow a SIGTERM until the
loop installs this one, i.e. for the minutes of start-up, and its sync point has no timeout.

Barriers (`barrier`) run on the coordination service with UNIIMAGE_BARRIER_TIMEOUT_S: a process
that does not arrive (stuck on storage, say, its heartbeats going on) stops every process with an
error naming the barrier, instead of a wait without end. The train loop also passes one before
each step that compiles, so no process enters the step's first collective long after another
(gloo gives up after 30 s when the others are late).

Who writes what. Process 0: the stage lock, `metrics.jsonl` and TensorBoard events, lineage, sample
sheets, the checkpoint's config item and commit, shared caches (bucket plan, record sizes, tiny
processor). Every process: its shards of the train state and its own data-iterator JSON in each
checkpoint, its own log. A process reads what process 0 wrote only after a barrier.

Exit codes of `uniimage-train` (the launchers in launch/ and the README rely on them):
  0    the stage (or the whole chain) reached max_steps
  42   stopped early on SIGTERM after saving a checkpoint: rerun the same command to resume
       (xpk's default restart policy restarts on 42 and on 127-255, and fails the job otherwise)
  2    bad input (command line, config, data files, a stage directory in use): nothing to retry
  1    any other error, with its traceback
  134  terminated by JAX after another process was lost (above)
A failing process of several leaves at once (`fail_fast`), skipping JAX's shutdown barrier, so
that the others end within the heartbeat timeout rather than after the shutdown timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading

import jax

from uniimage_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "UNIIMAGE_HEARTBEAT_TIMEOUT_S"
ENV_INIT_TIMEOUT = "UNIIMAGE_INIT_TIMEOUT_S"
ENV_SHUTDOWN_TIMEOUT = "UNIIMAGE_SHUTDOWN_TIMEOUT_S"
ENV_BARRIER_TIMEOUT = "UNIIMAGE_BARRIER_TIMEOUT_S"
DEFAULT_TIMEOUTS = {ENV_HEARTBEAT_TIMEOUT: 100, ENV_INIT_TIMEOUT: 300, ENV_SHUTDOWN_TIMEOUT: 300,
                    ENV_BARRIER_TIMEOUT: 600}

EXIT_FINISHED = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 42
EXIT_PEER_LOST = 134  # 128 + SIGABRT: JAX's coordination service ends the survivors


# --------------------------------------------------------------------------------------------
# Start-up.
# --------------------------------------------------------------------------------------------
def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_s(name: str) -> int:
    """One of the coordination timeouts (module docstring), from the environment or default."""
    if not os.environ.get(name):
        return DEFAULT_TIMEOUTS[name]
    value = _int_env(name)
    if value < 1:
        raise ConfigError(f"environment variable {name}={value} must be at least 1 (seconds)")
    return value


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


def _initialize(**explicit) -> None:
    timeouts = {name: timeout_s(name) for name in DEFAULT_TIMEOUTS}  # bad values fail first
    _select_cpu_collectives()
    jax.config.update("jax_enable_preemption_service", False)  # see the module docstring
    jax.distributed.initialize(
        **explicit, initialization_timeout=timeouts[ENV_INIT_TIMEOUT],
        heartbeat_timeout_seconds=timeouts[ENV_HEARTBEAT_TIMEOUT],
        shutdown_timeout_seconds=timeouts[ENV_SHUTDOWN_TIMEOUT])


def maybe_initialize_distributed() -> None:
    """Initialise the JAX distributed runtime when several processes are configured (module
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
        _initialize(coordinator_address=os.environ[ENV_COORDINATOR], num_processes=num,
                    process_id=pid)
    elif _slurm_multi_task() or _cloud_tpu_vm():
        _initialize()
    else:
        return
    log_main("JAX distributed: %d processes, %d devices (%d local); a process silent for %d s "
             "is declared lost", jax.process_count(), jax.device_count(),
             jax.local_device_count(), timeout_s(ENV_HEARTBEAT_TIMEOUT))


def fail_fast(code: int, message: str = "") -> None:
    """End a failing process of a multi-process job at once, with `code` (after printing
    `message`, e.g. its traceback). Otherwise JAX's shutdown barrier would hold it for up to
    UNIIMAGE_SHUTDOWN_TIMEOUT_S while the others wait in a collective; gone, its heartbeats stop
    and the others end within UNIIMAGE_HEARTBEAT_TIMEOUT_S. A single process, or a stop on
    SIGTERM (every process saved and leaves together), returns and exits as usual."""
    if code in (EXIT_FINISHED, EXIT_PREEMPTED) or not jax.distributed.is_initialized() \
            or jax.process_count() == 1:
        return
    import sys

    if message:
        print(message, file=sys.stderr)
    log.error("process %d of %d: exit status %d, leaving at once; the others end within %d s",
              jax.process_index(), jax.process_count(), code, timeout_s(ENV_HEARTBEAT_TIMEOUT))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------
# Who writes what.
# --------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    """True on process 0 (the one that logs, writes summaries and sample grids)."""
    return jax.process_index() == 0


def log_main(msg: str, *args, level: int = logging.INFO, logger: logging.Logger | None = None):
    """`logger.log(level, msg, *args)` on process 0 only."""
    if is_main_process():
        (logger or log).log(level, msg, *args)


# --------------------------------------------------------------------------------------------
# Barriers and agreement, on the coordination service.
# --------------------------------------------------------------------------------------------
class PeerTimeoutError(RuntimeError):
    """A process did not reach a barrier within UNIIMAGE_BARRIER_TIMEOUT_S."""


_barrier_uses: dict[str, int] = {}  # every process passes the same barriers in the same order


def _client():
    from jax._src import distributed as jax_distributed  # the client Orbax uses too

    return jax_distributed.global_state.client


def barrier(name: str) -> None:
    """Wait until every process got here, at most UNIIMAGE_BARRIER_TIMEOUT_S (then raise
    PeerTimeoutError). Every process must pass the same barriers in the same order."""
    if jax.process_count() == 1:
        return
    _barrier_uses[name] = _barrier_uses.get(name, 0) + 1
    seconds = timeout_s(ENV_BARRIER_TIMEOUT)
    try:
        _client().wait_at_barrier(f"uniimage/{name}/{_barrier_uses[name]}", seconds * 1000)
    except Exception as e:  # noqa: BLE001: jaxlib's error type is not public
        late = re.search(r"timed out task names:\s*([\d,\s]+)", str(e))
        who = (f"process(es) {', '.join(late[1].split())}" if late else "not every process")
        raise PeerTimeoutError(
            f"process {jax.process_index()}: {who} of {jax.process_count()} did not reach "
            f"'{name}' within {seconds} s ({ENV_BARRIER_TIMEOUT}): stuck or gone; "
            f"{str(e).splitlines()[0]}") from None


def sync(name: str) -> None:
    """Barrier across processes (e.g. after process 0 wrote a file the others read)."""
    barrier(name)


def any_process(name: str, value: bool) -> bool:
    """Whether `value` is true on any process: posted to the coordination service's key-value
    store, a barrier, then every process's value read back. Host-side only (no device work)."""
    if jax.process_count() == 1:
        return bool(value)
    client = _client()
    use = _barrier_uses.get(name, 0) + 1
    key = f"uniimage/{name}/{use}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if value else "0")
    barrier(name)
    values = [v for _, v in client.key_value_dir_get(f"{key}/")]
    # Everyone has read round use-2 once it passed the barrier of round use-1.
    if use > 2:
        client.key_value_delete(f"uniimage/{name}/{use - 2}/{jax.process_index()}")
    return "1" in values


def process_max(value: int) -> int:
    """The largest `value` over all processes (itself on one process). A blocking collective:
    every process must call it at the same point of the same step."""
    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.array([value], dtype=np.int32))
    return int(np.max(np.asarray(gathered)))


def any_process_mask(mask) -> "np.ndarray":
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


# --------------------------------------------------------------------------------------------
# SIGTERM: save and stop, all processes at the same step.
# --------------------------------------------------------------------------------------------
class SigtermFlag:
    """Set by SIGTERM; the train loop polls it and saves + exits outside the signal handler."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        # Only flip the flag: saving from inside a signal handler could deadlock on locks held by
        # the interrupted code (async checkpoint threads, JAX runtime).
        self.requested = True


_flag = SigtermFlag()


@contextlib.contextmanager
def watch_sigterm():
    """SIGTERM sets the flag `stop_requested` reads, inside the block (the handler active before
    comes back after it). Python delivers signals to the main thread only: entered from another
    thread it changes nothing (SIGTERM keeps its effect there)."""
    _flag.requested = False
    if threading.current_thread() is not threading.main_thread():
        yield _flag
        return
    previous = signal.signal(signal.SIGTERM, _flag._handle)
    try:
        yield _flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_received() -> bool:
    """Whether this process got SIGTERM inside the current `watch_sigterm` block."""
    return _flag.requested


def stop_requested(step: int, every: int) -> bool:
    """Whether to save and stop after `step`. One process: its own flag, every step. Several:
    every `every` steps, all processes at the same steps, whether any got SIGTERM (a barrier
    within UNIIMAGE_BARRIER_TIMEOUT_S); a SIGTERM is honoured within `every` steps, so keep
    `every` steps well inside the platform's grace period."""
    if jax.process_count() == 1:
        return _flag.requested
    return step % every == 0 and any_process("stop", _flag.requested)
