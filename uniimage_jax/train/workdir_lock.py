"""One run per stage directory: a lock file that names the run holding it.

Two runs in the same `<workdir>/<stage>/` would interleave checkpoints and `metrics.jsonl`. So a
run writes `<stage dir>/RUN_LOCK.json` before it touches anything there,

    {"host": ..., "pid": ..., "started": "2026-12-02 14:30:01 UTC", "heartbeat": <unix time>,
     "token": <random>, "run_id": <the job, or "">}

refreshes `heartbeat` from a background thread every `heartbeat_s` seconds (also while the main
thread compiles or saves), and deletes the file when it ends, however it ends short of SIGKILL.
A second run finds the file and stops with a message naming the first (host, pid, start time).

A lock left by a run that was killed is stale and is taken over with a warning:
- on the same host: its pid is no longer running (or it is this very process's pid, left by an
  earlier incarnation, e.g. a restarted container), or it has not beaten for `stale_after_s`
  (the pid was reused by something else);
- from another host, or on `gs://` (where a pid cannot be checked): it has not beaten for
  `stale_after_s` seconds (default 10 minutes, ten missed heartbeats);
- anywhere: it names the same job as this run, `UNIIMAGE_RUN_ID` (set by the launchers from the
  scheduler's job: SLURM's job id, the xpk workload), so it was left by an earlier attempt of
  this job, which a scheduler restarts only once all of that attempt's processes are gone.
An unreadable lock file (a write cut short) is stale too.

Atomicity: a local lock is created with O_EXCL, so of two runs starting together exactly one
wins. Object stores have no exclusive create through the file API this project uses for them
(`etils.epath`, as Orbax), so there the run writes its record, waits a moment and reads it back:
of two writers, the one whose token is not in the file backs off.

Several processes (hosts) of one run: only process 0 takes the lock; the others learn the outcome
from it, so every process stops when the directory is in use.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time

from etils import epath

from uniimage_jax.errors import UserError
from uniimage_jax.paths import is_url

log = logging.getLogger("uniimage_jax.train")

LOCK_FILE = "RUN_LOCK.json"
ENV_RUN_ID = "UNIIMAGE_RUN_ID"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
_REMOTE_SETTLE_S = 2.0  # object stores: wait before reading our record back

_HELD_HERE: set[str] = set()  # lock files this process holds (a second acquire is refused)


class LockHeldError(UserError):
    """The stage directory is in use by another run; the message names it."""


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('started')} (last heartbeat {age:.0f} s ago)")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class StageLock:
    """The lock of one stage directory (local or `gs://`). Use `acquire` / `release`, or `with`."""

    def __init__(self, stage_dir: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.path = epath.Path(stage_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading and judging a holder --------------------------------------------------------
    def _read(self) -> dict | None:
        """The holder's record; None if there is no lock; {} if the file is unreadable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            return {}
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder`'s lock is stale, or None while its run may be alive."""
        if not holder or not {"host", "pid", "heartbeat"} <= set(holder):
            return "the lock file is unreadable"
        run_id = os.environ.get(ENV_RUN_ID, "")
        if run_id and holder.get("run_id") == run_id and holder.get("token") != self.token:
            return f"left by an earlier attempt of this job ({ENV_RUN_ID}={run_id})"
        age = time.time() - float(holder["heartbeat"])
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s)"
        if holder["host"] == self.host and not is_url(os.fspath(self.path)):
            pid = int(holder["pid"])
            if pid == self.pid and os.fspath(self.path) not in _HELD_HERE:
                return "left by an earlier process with this pid"
            if pid != self.pid and not _pid_running(pid):
                return f"pid {pid} is no longer running on this host"
        return None

    # -- acquire / release -------------------------------------------------------------------
    def _record(self) -> dict:
        now = time.time()
        started = getattr(self, "_started", None) or datetime.datetime.fromtimestamp(
            now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self._started = started
        return {"host": self.host, "pid": self.pid, "started": started, "heartbeat": now,
                "token": self.token, "run_id": os.environ.get(ENV_RUN_ID, "")}

    def _create(self) -> bool:
        """Write our record if there is no lock file; whether we now hold the lock."""
        text = json.dumps(self._record())
        if not is_url(os.fspath(self.path)):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            return True
        if self.path.exists():
            return False
        self.path.write_text(text)
        time.sleep(_REMOTE_SETTLE_S)
        return (self._read() or {}).get("token") == self.token

    def acquire(self) -> None:
        """Take the lock or raise LockHeldError naming the run that holds it."""
        if os.fspath(self.path) in _HELD_HERE:
            raise LockHeldError(f"{self.path.parent} is already in use by this process")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            holder = self._read()
            if holder is not None:
                reason = self.stale_reason(holder)
                if reason is None:
                    raise LockHeldError(
                        f"{self.path.parent} is in use by another run: {describe(holder)}. "
                        "Wait for it to end or stop it, or choose another --workdir (the lock "
                        f"{self.path} of a killed run is taken over by itself once its pid is "
                        f"gone on this host, or after {self.stale_after_s:.0f} s without a "
                        "heartbeat)")
                log.warning("taking over %s from a run that is gone (%s): %s", self.path,
                            reason, describe(holder) if holder else "no record")
                self.path.unlink(missing_ok=True)
            if self._create():
                _HELD_HERE.add(os.fspath(self.path))
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="stage-lock-heartbeat")
                self._thread.start()
                return
        holder = self._read() or {}
        raise LockHeldError(f"{self.path.parent} is in use by another run that started at the "
                            f"same moment: {describe(holder) if holder else 'unknown'}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()
                if (holder or {}).get("token") != self.token:
                    log.error("%s was taken over by another run (%s); this run no longer holds "
                              "its stage directory", self.path,
                              describe(holder) if holder else "the file is gone")
                    return
                if is_url(os.fspath(self.path)):  # an object is replaced whole when written
                    self.path.write_text(json.dumps(self._record()))
                    continue
                tmp = self.path.parent / f".{LOCK_FILE}.{self.token}"
                tmp.write_text(json.dumps(self._record()))
                tmp.replace(self.path)
            except OSError as e:  # a transient storage error must not kill training
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _HELD_HERE.discard(os.fspath(self.path))
        try:
            if (self._read() or {}).get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove %s: %s", self.path, e)

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(stage_dir: str):
    """Hold the lock of `stage_dir` for the duration of a run (process 0 takes it; every
    process raises LockHeldError when the directory is in use)."""
    import jax

    lock = StageLock(stage_dir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except LockHeldError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = LockHeldError(f"{stage_dir} is in use by another run (process 0 names it)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
