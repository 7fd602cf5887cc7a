"""`config.profile`: a JAX profiler trace of a few training steps, written into the stage directory.

The trace (`<stage_dir>/profile/plugins/profile/<run>/<host>.xplane.pb`, one file per process)
is what TensorBoard's profile plugin and XProf read: device and host timelines, per-op time, memory
(`tensorboard --logdir <stage_dir>/profile` with `tensorboard-plugin-profile` installed, or
`xprof --logdir ...`). It works on CPU, GPU and TPU alike. Steps are traced after the first
compiled ones so the trace shows the steady state rather than compilation.

On a `gs://` stage directory the trace is written to a local temporary directory and uploaded
when it stops: the profiler writes through TensorFlow's file system layer (TSL), which reaches
Cloud Storage only with real credentials and cannot be pointed at a local emulator; uploading
through the project's storage layer is the same code path everywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from uniimage_jax import storage
from uniimage_jax.errors import UserError


def check_config(profile) -> None:
    for name in ("start_step", "num_steps"):
        value = profile[name]
        if not isinstance(value, int) or value < 0:
            raise UserError(f"config.profile.{name} must be an int >= 0, got {value!r}")


class StepTrace:
    """Traces the steps start_step+1 .. start_step+num_steps (num_steps 0: never)."""

    def __init__(self, profile, stage_dir: str):
        check_config(profile)
        self.start, self.num = profile.start_step, profile.num_steps
        self.log_dir = storage.join(stage_dir, "profile")
        self.active = False
        self._local_dir = None  # where a trace for a bucket is written first

    def before_step(self, done: int) -> None:
        """Call with the number of steps done, before running the next one."""
        if self.num and not self.active and done == self.start:
            if storage.is_remote(self.log_dir):
                self._local_dir = tempfile.mkdtemp(prefix="uniimage_profile_")
            jax.profiler.start_trace(self._local_dir or self.log_dir)
            self.active = True

    def after_step(self, done: int, outputs) -> None:
        if self.active and done >= self.start + self.num:
            jax.block_until_ready(outputs)  # the traced steps' device work ends inside the trace
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self._local_dir is not None:
                storage.upload_dir(self._local_dir, self.log_dir)
                shutil.rmtree(self._local_dir, ignore_errors=True)
                self._local_dir = None
