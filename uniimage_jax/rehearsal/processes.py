"""One attempt of a multi-process training job on this machine: N `uniimage-train` processes on
CPU, M virtual devices each, joined by jax.distributed (gloo collectives, coordinator on
127.0.0.1), as a pod's hosts would run them; their logs, progress, signals and exits.

Progress is read from each process's own log (the progress bar's `k/N`), not from the workdir:
the bucket may be failing on purpose, and a killed process leaves no record there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROGRESS = re.compile(r"\| *(\d+)/(\d+) \[")
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


@dataclasses.dataclass(frozen=True)
class Layout:
    processes: int
    devices: int  # per process

    def __str__(self) -> str:
        return f"{self.processes}x{self.devices}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_path(name: str = "t2i_pretrain") -> str:
    """configs/<name>.py of the source checkout this package runs from."""
    path = os.path.join(ROOT, "configs", f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the rehearsal runs from a source checkout")
    return path


def process_env(layout: Layout, index: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    """The environment of process `index`: the JAX_* recipe of `train/distributed.py`, M CPU
    devices, unbuffered logs, and `extra` (emulator, timeouts, run id)."""
    env = {**os.environ, **extra, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={layout.devices}".strip()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    if layout.processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(layout.processes), JAX_PROCESS_ID=str(index),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return env


class Attempt:
    """N processes of one job, started together; `wait` records when each one ended."""

    def __init__(self, name: str, layout: Layout, command: list[str], log_dir: str,
                 env: dict[str, str]):
        self.name, self.layout, self.command = name, layout, command
        self.log_paths = [os.path.join(log_dir, f"{name}.process_{i}.log")
                          for i in range(layout.processes)]
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.ended: list[float | None] = []
        self.started = 0.0

    def start(self) -> "Attempt":
        port = free_port()
        self.started = time.time()
        for i, log_path in enumerate(self.log_paths):
            with open(log_path, "w") as log:
                self.procs.append(subprocess.Popen(
                    self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                    env=process_env(self.layout, i, port, self.env)))
        self.ended = [None] * len(self.procs)
        return self

    def log(self, index: int = 0) -> str:
        with open(self.log_paths[index], errors="replace") as fh:
            return fh.read()

    def progress(self) -> int:
        """The last step any process's progress bar reported finished (0 before the first)."""
        done = 0
        for i in range(len(self.procs)):
            found = _PROGRESS.findall(self.log(i))
            if found:
                done = max(done, int(found[-1][0]))
        return done

    def _poll(self) -> None:
        now = time.time()
        for i, p in enumerate(self.procs):
            if self.ended[i] is None and p.poll() is not None:
                self.ended[i] = now

    def running(self) -> list[int]:
        self._poll()
        return [i for i, e in enumerate(self.ended) if e is None]

    def wait_progress(self, step: int, timeout: float) -> float:
        """Wait until step `step` is done; the time it was seen. Raises if a process ended first
        or the time ran out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.progress() >= step:
                return time.time()
            if len(self.running()) < len(self.procs):
                raise RuntimeError(f"{self.name}: a process ended before step {step}:\n"
                                   + self.tail())
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: step {step} not reached in {timeout:.0f} s:\n"
                           + self.tail())

    def signal(self, sig: int, indices=None) -> float:
        """Send `sig` to the given processes (default: all); the time it was sent."""
        for i in range(len(self.procs)) if indices is None else indices:
            if self.procs[i].poll() is None:
                self.procs[i].send_signal(sig)
        return time.time()

    def wait(self, timeout: float) -> list[int | None]:
        """Wait for every process, at most `timeout` s; the exit codes, None for a process still
        running then (it is killed: a rehearsal leaves nothing behind)."""
        deadline = time.time() + timeout
        while self.running() and time.time() < deadline:
            time.sleep(0.05)
        codes = [p.poll() for p in self.procs]
        self.kill_all()
        return codes

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self._poll()

    def tail(self, lines: int = 15) -> str:
        out = []
        for i in range(len(self.procs)):
            text = self.log(i).replace("\r", "\n").splitlines()
            out.append(f"--- {self.log_paths[i]} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


def exit_status(code: int | None) -> str:
    """A Popen return code as a shell shows it (a signal N as 128+N)."""
    if code is None:
        return "still running"
    return str(128 - code) if code < 0 else str(code)


def train_command(workdir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "uniimage_jax.cli.train",
            f"--config={config_path()}:tiny", f"--workdir={workdir}", *overrides]


def cache_latents_command(out: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "uniimage_jax.cli.cache_latents",
            f"--config={config_path()}:tiny", f"--out={out}", *flags]
