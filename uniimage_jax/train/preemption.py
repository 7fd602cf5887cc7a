"""SIGTERM (a preemption notice on Cloud TPU and most schedulers) as a flag the train loop polls."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionFlag:
    """Set by SIGTERM; the train loop polls it and saves + exits outside the signal handler."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        # Only flip the flag: saving from inside a signal handler could deadlock on locks held by
        # the interrupted code (async checkpoint threads, JAX runtime).
        self.requested = True

    def any_host_requested(self) -> bool:
        """Whether any process got SIGTERM. A collective on multi-host runs: call it from every
        process at the same step (e.g. every N steps) so all hosts stop at the same step."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested], dtype=np.int32))
        return bool(np.asarray(flags).any())

    def uninstall(self):
        """Put back the SIGTERM handler that was active before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def install_sigterm_handler() -> PreemptionFlag:
    """Catch SIGTERM (preemption notice on Cloud TPU / spot VMs, SLURM's scancel / time limit).

    Must be called from the main thread (Python only delivers signals there).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_sigterm_handler must be called from the main thread")
    flag = PreemptionFlag()
    flag._previous = signal.signal(signal.SIGTERM, flag._handle)
    return flag
