"""What one log record says about the steps since the previous one (and how the console shows
skipped steps: `report_skips`).

- `loss` and `grad_norm` are means over every step of the window (`log_every` steps), not the
  value of its last step: one step's loss is mostly the noise of its timesteps.
- `samples_per_s` counts only steps timed after the first step of this start: that step compiles
  the program (seconds to minutes), which is not training throughput. A record whose window holds
  no timed step (e.g. `log_every=1`, the first step) has no `samples_per_s`.
- `skipped_steps`: steps of the window skipped as spikes (parameters unchanged); the cumulative
  `spike/num_skipped` of the stage is logged as before.

Step values stay on the device until the record is written, so the loop does not wait for each
step to finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger("uniimage_jax.train")

MEANS = ("loss", "grad_norm")


class MetricWindow:
    def __init__(self, global_batch: int, clock: Callable[[], float] = time.perf_counter):
        self.global_batch = global_batch
        self.clock = clock
        self._values: dict[str, list] = {k: [] for k in MEANS}
        self._skipped: list = []
        self._t0: float | None = None   # end of the first step of this start
        self._timed = 0                  # steps finished since _t0 in this window

    def add(self, metrics: dict) -> None:
        """Record one finished step's metrics (device arrays are fine)."""
        for k in MEANS:
            if k in metrics:
                self._values[k].append(metrics[k])
        if "spike/skipped" in metrics:
            self._skipped.append(metrics["spike/skipped"])
        if self._t0 is None:
            # The first step of this start: wait for it (compilation) and start timing after it.
            jax.block_until_ready(metrics)
            self._t0 = self.clock()
        else:
            self._timed += 1

    def record(self, last: dict) -> dict[str, float]:
        """The log record of the window ending with the step whose metrics are `last`; resets."""
        values = jax.device_get({"means": self._values, "skipped": self._skipped,
                                 "last": last})
        now = self.clock()
        out = {k: float(np.asarray(v)) for k, v in values["last"].items()}
        for k, vs in values["means"].items():
            if vs:
                out[k] = float(np.mean(np.asarray(vs, np.float64)))
        if values["skipped"]:
            out["skipped_steps"] = float(np.sum(values["skipped"]))
        if self._timed:
            out["samples_per_s"] = self._timed * self.global_batch / max(now - self._t0, 1e-9)
        self._values = {k: [] for k in MEANS}
        self._skipped = []
        self._t0, self._timed = now, 0
        return out


def report_skips(progress, m: dict, step: int, skipped_before: int) -> int:
    """Show the window's loss on the progress bar, and steps skipped as spikes there and in a
    warning: a run whose steps are all skipped must not look like it trained. Returns the
    stage's skipped-step count."""
    skipped = int(m.get("spike/num_skipped", 0))
    postfix = {"loss": f"{m['loss']:.4f}"}
    if skipped:
        postfix["skipped"] = skipped
    progress.set_postfix(postfix)
    if skipped > skipped_before:
        log.warning("step %d: %d step(s) skipped as loss/gradient spikes since the last record "
                    "(%d in this stage, parameters unchanged); window loss %.4g, last grad "
                    "norm %.4g", step, skipped - skipped_before, skipped, m["loss"],
                    m.get("spike/grad_norm", float("nan")))
    return skipped
