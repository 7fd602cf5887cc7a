"""The pod rehearsal: a multi-process training job on this machine (tiny preset, CPU processes
with virtual devices), its workdir on Cloud Storage (a local emulator) or a local directory,
through the failures a pod meets; one verdict per scenario.

On the emulator the job's data is on the bucket too: a latent cache of the tiny preset's
synthetic shapes, written first by `uniimage-cache-latents`, whose shards every attempt copies as
its shuffled order reaches them (each attempt with a local cache of its own, as a fresh host).
The scenarios play in this order on one workdir, each on the state the one before left:
  reference         the same job uninterrupted: the losses and data positions to compare with
  (a) preemption    SIGTERM to every process mid-step: all save the same step and exit 42; the
                    restart resumes there, and its losses equal the reference's bit for bit
  (c) bucket        during that restart the bucket fails every request for T seconds three
                    times: 503 from its first shard read, 503 and 429 from the first upload of
                    two saves; retried, the run goes on, nothing skipped, every save committed
  (b) lost process  kill -9 of the last process mid-step: the others end within the coordination
                    service's heartbeat timeout, naming it, and no partial step is ever restored
  (e) half-written  a step directory without its commit, planted where the next save goes: never
                    restored from, and saved over
  (d) resize        the restart on half the processes (twice the devices each, the same mesh):
                    the global batches continue where they stopped, up to max_steps
Batches are judged identical when every step's loss equals the reference's (bitwise on the same
layout; within 1e-5 relative on another, whose reductions add in another order) and the final
data-iterator positions are those of the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time

from uniimage_jax import storage
from uniimage_jax.rehearsal.processes import (Attempt, Layout, cache_latents_command,
                                              exit_status, train_command)
from uniimage_jax.train.distributed import ENV_HEARTBEAT_TIMEOUT, EXIT_PREEMPTED
from uniimage_jax.train.workdir_lock import ENV_RUN_ID

STAGE = "t2i_pretrain"
GLOBAL_BATCH = 8  # the tiny preset's
ORDER = ("a", "c", "b", "e", "d")
TITLES = {"a": "(a) SIGTERM to every process", "c": "(c) bucket 503/429 during a save",
          "b": "(b) kill -9 of one process", "e": "(e) half-written step on the bucket",
          "d": "(d) restart on fewer processes"}


@dataclasses.dataclass
class Verdict:
    key: str
    layout: str
    happened: str = "not run"
    detect_s: float | None = None
    resume_s: float | None = None
    steps_lost: int | None = None
    identical: str = "n/a"
    problems: list[str] = dataclasses.field(default_factory=list)
    facts: dict = dataclasses.field(default_factory=dict)  # figures the tests assert on

    @property
    def passed(self) -> bool:
        return self.happened != "not run" and not self.problems

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def line(self) -> str:
        def s(x):
            return "-" if x is None else f"{x:.1f} s"
        head = (f"{'PASS' if self.passed else 'FAIL'}  {TITLES[self.key]:<37} {self.layout:<9} "
                f"detect {s(self.detect_s):>7}  resume {s(self.resume_s):>7}  lost "
                f"{'-' if self.steps_lost is None else self.steps_lost}  identical "
                f"{self.identical}: {self.happened}")
        return head + "".join(f"\n      problem: {p}" for p in self.problems)


@dataclasses.dataclass
class Settings:
    root: str                 # the rehearsal's directory: gs://bucket/prefix or a local path
    log_dir: str              # local: the processes' logs
    layout: Layout = Layout(2, 2)
    max_steps: int = 12
    every_steps: int = 2      # checkpoint.every_steps
    heartbeat_s: int = 10     # UNIIMAGE_HEARTBEAT_TIMEOUT_S of every process
    fault_s: float = 5.0      # how long the bucket fails, each time
    start_timeout_s: float = 900.0  # start-up + first steps on a loaded machine
    emulator: object = None   # GcsEmulator whose faults the bucket scenario sets (None: skipped)
    env: dict = dataclasses.field(default_factory=dict)  # extra environment of every process


class Rehearsal:
    def __init__(self, settings: Settings):
        self.s = settings
        self.verdicts = {k: Verdict(k, str(settings.layout)) for k in ORDER}
        self.verdicts["d"].layout = f"{settings.layout}->{self._resized()}"
        os.makedirs(settings.log_dir, exist_ok=True)
        # On the emulator the job also reads its data from the bucket: a latent cache, shard by
        # shard as the shuffled order reaches each (locally: the synthetic shapes, read nowhere).
        self.data_on_bucket = settings.emulator is not None and storage.is_remote(settings.root)
        self.data_args: list[str] = []
        self._attempts: list[Attempt] = []

    # -- plumbing --------------------------------------------------------------------------------
    def _resized(self) -> Layout:
        n, m = self.s.layout.processes, self.s.layout.devices
        return Layout(max(1, n // 2), m * n // max(1, n // 2))

    def _workdir(self, name: str) -> str:
        return storage.join(self.s.root, name)

    def _stage(self, name: str) -> str:
        return storage.join(self._workdir(name), STAGE)

    def _attempt(self, name: str, workdir: str, layout: Layout) -> Attempt:
        # Each attempt its own local copies of the bucket's shards, as a fresh host has.
        env = {**self.s.env, ENV_HEARTBEAT_TIMEOUT: str(self.s.heartbeat_s),
               ENV_RUN_ID: f"rehearsal-{workdir}",
               "UNIIMAGE_CACHE": os.path.join(self.s.log_dir, f"{name}.cache")}
        command = train_command(workdir, f"--config.max_steps={self.s.max_steps}",
                                "--config.log_every=1", "--config.stop_check_every=1",
                                f"--config.checkpoint.every_steps={self.s.every_steps}",
                                "--config.checkpoint.keep=100", *self.data_args)
        attempt = Attempt(name, layout, command, self.s.log_dir, env)
        self._attempts.append(attempt)
        return attempt.start()

    def _cache_latents(self) -> list[str]:
        """The job's data on the bucket: the tiny preset's synthetic shapes encoded once (64
        examples, 8 per shard); the training overrides that read it."""
        out = storage.join(self.s.root, "latents")
        cache = Attempt("cache_latents", Layout(1, 1), cache_latents_command(
            out, "--shard_size=8", "--config.data.synthetic_num_samples=64"), self.s.log_dir,
            dict(self.s.env)).start()
        if cache.wait(self.s.start_timeout_s) != [0]:
            raise RuntimeError(f"uniimage-cache-latents failed:\n{cache.tail()}")
        return ["--config.data.source=latents", f"--config.data.path={out}"]

    def _losses(self, name: str) -> dict[int, float]:
        """{step: loss} of a workdir's metrics.jsonl (the last record of a step wins)."""
        path = storage.join(self._stage(name), "metrics.jsonl")
        if not storage.exists(path):
            return {}
        out = {}
        for line in storage.read_text(path).splitlines():
            if line.strip():
                record = json.loads(line)
                out[int(record["step"])] = record["loss"]
        return out

    def _steps(self, name: str) -> list[int]:
        """The committed (restorable) steps of a workdir's stage, as Orbax sees them."""
        from orbax.checkpoint import utils

        stage = self._stage(name)
        return sorted(utils.checkpoint_steps(stage)) if storage.exists(stage) else []

    def _data_positions(self, name: str, step: int) -> list[int]:
        folder = storage.path(storage.join(self._stage(name), str(step), "data"))
        files = sorted((p for p in folder.iterdir() if p.name.startswith("process_")),
                       key=lambda p: int(re.match(r"process_(\d+)", p.name)[1]))
        return [json.loads(p.read_text())["parent"]["next_index"] for p in files]

    @staticmethod
    def _compare(got: dict, ref: dict, steps, bitwise: bool) -> tuple[bool, str]:
        steps = list(steps)
        if not steps:
            return False, "no step to compare was recorded"
        missing = [s for s in steps if s not in got or s not in ref]
        if missing:
            return False, f"no loss recorded for steps {missing}"
        off = [s for s in steps if (got[s] != ref[s] if bitwise else
                                    abs(got[s] - ref[s]) > 1e-5 * abs(ref[s]))]
        if off:
            return False, f"steps {off} differ from the reference: " + ", ".join(
                f"{s}: {got[s]!r} vs {ref[s]!r}" for s in off[:3])
        return True, "yes (bitwise)" if bitwise else "yes (within 1e-5)"

    # -- the rehearsal ---------------------------------------------------------------------------
    def run(self, report=print) -> dict[str, Verdict]:
        """Play every scenario; `report` gets each verdict's line as soon as it is known. No
        process of the rehearsal outlives it."""
        try:
            return self._play(report)
        finally:
            for attempt in self._attempts:
                attempt.kill_all()

    def _play(self, report) -> dict[str, Verdict]:
        s = self.s
        if self.data_on_bucket:
            self.data_args = self._cache_latents()
        ref = self._attempt("reference", self._workdir("reference"), s.layout)
        codes = ref.wait(s.start_timeout_s + 60 * s.max_steps)
        if codes != [0] * s.layout.processes:
            raise RuntimeError(f"the uninterrupted reference run failed "
                               f"({[exit_status(c) for c in codes]}):\n{ref.tail()}")
        self.reference = self._losses("reference")
        self.reference_positions = self._data_positions("reference", s.max_steps)
        for phase, keys in ((self._preemption, ("a", "c", "b")), (self._resize, ("e", "d"))):
            try:
                phase()
            except Exception as e:  # noqa: BLE001: said by the verdict; later phases need it
                self.verdicts[self._playing].problems.append(f"{type(e).__name__}: {e}")
                for key in keys:
                    report(self.verdicts[key].line())
                break
            for key in keys:
                report(self.verdicts[key].line())
        return self.verdicts

    def _preemption(self) -> None:
        """(a), then the restart that (c) and (b) play on."""
        s, v = self.s, self.verdicts["a"]
        self._playing = "a"
        first = self._attempt("preempt", self._workdir("run"), s.layout)
        first.wait_progress(2, s.start_timeout_s)
        sent = first.signal(signal.SIGTERM)
        codes = first.wait(120)
        v.detect_s = max(first.ended) - sent
        logs = [first.log(i) for i in range(s.layout.processes)]
        saved = {int(m) for text in logs for m in re.findall(r"SIGTERM: saving step (\d+)", text)}
        v.check(codes == [EXIT_PREEMPTED] * s.layout.processes,
                f"exit statuses {[exit_status(c) for c in codes]}, not all {EXIT_PREEMPTED}")
        v.check(len(saved) == 1 and all("SIGTERM: saving step" in t for t in logs),
                f"the processes saved steps {sorted(saved)} (every one must save one, the same)")
        stopped = min(saved) if saved else 0
        v.check(self._steps("run")[-1:] == [stopped],
                f"committed steps {self._steps('run')}, the last should be {stopped}")
        v.facts.update(stopped=stopped, codes=codes)
        # The restart (same layout), through a failing bucket, until one process is killed.
        second = self._attempt("restart", self._workdir("run"), s.layout)
        self._data_outage(second)
        self._playing = "a"
        first_step = second.wait_progress(stopped + 1, s.start_timeout_s)
        v.resume_s = first_step - second.started
        v.check(f"resumed {self._stage('run')} at step {stopped}" in second.log(0),
                f"the restart did not say it resumed at step {stopped}")
        self._save_outages(second, stopped)
        self._kill_one(second)
        losses = self._losses("run")
        resumed = [k for k in range(stopped + 1, self.verdicts["b"].facts["last_logged"] + 1)]
        ok, v.identical = self._compare(losses, self.reference, resumed, bitwise=True)
        v.check(ok, v.identical)
        if self.data_on_bucket:  # the same restart rode out the bucket's faults
            self.verdicts["c"].identical = v.identical
        v.steps_lost = 0
        v.happened = (f"all {s.layout.processes} processes saved step {stopped} and exited "
                      f"{exit_status(codes[0])}; the restart resumed there")

    def _grid_after(self, step: int) -> int:
        e = self.s.every_steps
        return (step // e + 1) * e

    def _outage(self, attempt: Attempt, status: int, trigger: str) -> int:
        """The bucket answers `status` to every request for fault_s seconds, from the first
        request whose path matches `trigger` on; the number of requests it failed."""
        s = self.s
        before = s.emulator.faults_served
        s.emulator.fail(status, seconds=s.start_timeout_s, match=trigger)
        deadline = time.time() + s.start_timeout_s
        while s.emulator.faults_served == before:
            if time.time() > deadline or len(attempt.running()) < len(attempt.procs):
                s.emulator.fail(status, seconds=0)
                raise RuntimeError(f"no request matching {trigger!r} came:\n{attempt.tail()}")
            time.sleep(0.01)
        s.emulator.fail(status, seconds=s.fault_s)
        time.sleep(s.fault_s)
        return s.emulator.faults_served - before

    def _data_outage(self, attempt: Attempt) -> None:
        """(c), first part: 503 from the restart's first read of a latent-cache shard."""
        v = self.verdicts["c"]
        self._playing = "c"
        if not self.data_on_bucket:
            v.problems.append("not run: the workdir and the data are not on the emulator")
            return
        v.facts["data_faults"] = self._outage(attempt, 503, r"\.array_record")

    def _save_outages(self, attempt: Attempt, resumed_at: int) -> None:
        """(c), second part: 503, then 429, from the first upload after a step that is saved."""
        s, v = self.s, self.verdicts["c"]
        self._playing = "c"
        if not self.data_on_bucket:
            return
        saves, served = [], []
        for status, save in ((503, self._grid_after(resumed_at)),
                             (429, self._grid_after(resumed_at) + s.every_steps)):
            attempt.wait_progress(save - 1, s.start_timeout_s)
            served.append(self._outage(attempt, status, "^/upload/"))
            saves.append(save)
        v.facts.update(faulted_saves=saves, save_faults=served)
        v.check(all(served) and v.facts["data_faults"] > 0, "a fault window failed no request")
        v.happened = (f"the bucket failed every request for {s.fault_s:.0f} s three times: 503 "
                      f"from the restart's first shard read ({v.facts['data_faults']} requests), "
                      f"503 and 429 during the saves of steps {saves} ({served[0]} and "
                      f"{served[1]}); retried, the run went on")
        v.steps_lost = 0

    def _kill_one(self, attempt: Attempt) -> None:
        """(b): kill -9 of the last process once the faulted saves are behind."""
        s, v = self.s, self.verdicts["b"]
        self._playing = "b"
        victim = s.layout.processes - 1
        faulted = self.verdicts["c"].facts.get("faulted_saves") or [attempt.progress()]
        attempt.wait_progress(max(faulted) + s.every_steps + 1, s.start_timeout_s)
        killed = attempt.signal(signal.SIGKILL, [victim])
        bound = s.heartbeat_s + 30
        codes = attempt.wait(bound)
        survivors = [i for i in range(s.layout.processes) if i != victim]
        ended = [attempt.ended[i] for i in survivors]
        v.detect_s = max(ended) - killed if None not in ended and ended else None
        last_done = attempt.progress()
        v.check(all(codes[i] is not None for i in survivors),
                f"survivors still running {bound} s after the kill (killed by the rehearsal)")
        v.check(all(codes[i] not in (None, 0) for i in survivors),
                f"survivors' exit statuses {[exit_status(codes[i]) for i in survivors]}")
        named = [i for i in survivors if re.search(
            rf"unhealthy \(stopped sending heartbeats\):\s*{victim}\b", attempt.log(i))]
        v.check(len(named) == len(survivors) or 0 in named,
                f"no survivor's log names process {victim} as lost")
        committed = self._steps("run")
        v.steps_lost = last_done - committed[-1] if committed else None
        v.check(committed and committed[-1] % s.every_steps == 0 and v.steps_lost is not None
                and v.steps_lost <= s.every_steps + 1,
                f"committed steps {committed} after the kill at step {last_done}")
        self.verdicts["c"].check(
            all(g in committed for g in self.verdicts["c"].facts.get("faulted_saves", [])),
            f"a save made while the bucket failed is not committed ({committed})")
        losses = self._losses("run")
        v.facts.update(last_logged=max(losses) if losses else 0, victim=victim,
                       codes=codes, last_done=last_done, committed=committed)
        v.happened = (f"process {victim} killed at step ~{last_done}; survivors exited "
                      f"{'/'.join(exit_status(codes[i]) for i in survivors)}, "
                      f"{'naming it' if named else 'not naming it'}; last committed step "
                      f"{committed[-1] if committed else None}")

    def _plant_half_written(self, after: int) -> int:
        """(e): a copy of a committed step, without its commit, where the next save goes."""
        step = self._grid_after(after)
        source = storage.path(storage.join(self._stage("run"), str(after)))
        if storage.is_remote(self.s.root):  # Orbax's commit on a bucket: commit_success.txt
            target = storage.path(storage.join(self._stage("run"), str(step)))
        else:  # locally a step is committed by renaming its temporary directory
            target = storage.path(storage.join(self._stage("run"),
                                               f"{step}.orbax-checkpoint-tmp-1"))
        # Cut short: the small items and the state's metadata, none of its array data.
        def copy(folder, dest, in_state):
            for f in folder.iterdir():
                if f.is_dir():
                    copy(f, dest / f.name, in_state or f.name == "state")
                elif f.name != "commit_success.txt" and (not in_state or f.name.startswith("_")):
                    dest.mkdir(parents=True, exist_ok=True)
                    (dest / f.name).write_bytes(f.read_bytes())
        copy(source, target, False)
        return step

    def _resize(self) -> None:
        """(e) planted, then (d): the restart on half the processes, up to max_steps."""
        s, d, e = self.s, self.verdicts["d"], self.verdicts["e"]
        self._playing = "e"
        b = self.verdicts["b"].facts
        resume_from = b["committed"][-1]
        planted = self._plant_half_written(resume_from)
        e.facts["planted"] = planted
        layout = self._resized()
        self._playing = "d"
        attempt = self._attempt("resize", self._workdir("run"), layout)
        first_step = attempt.wait_progress(resume_from + 1, s.start_timeout_s)
        d.resume_s = first_step - attempt.started
        codes = attempt.wait(s.start_timeout_s + 60 * s.max_steps)
        log = attempt.log(0)
        e.check(f"resumed {self._stage('run')} at step {resume_from}" in log,
                f"the restart did not resume from the last committed step {resume_from}")
        d.check(codes == [0] * layout.processes,
                f"exit statuses {[exit_status(c) for c in codes]}:\n{attempt.tail()}")
        committed = self._steps("run")
        e.check(planted in committed and s.max_steps in committed,
                f"the planted step {planted} was not saved over (committed: {committed})")
        e.happened = (f"step {planted} planted without its commit; the restart resumed from "
                      f"{resume_from} and saved {planted} over it")
        e.steps_lost = 0
        self.verdicts["b"].resume_s = d.resume_s
        losses = self._losses("run")
        ok, d.identical = self._compare(losses, self.reference,
                                        range(resume_from + 1, s.max_steps + 1), bitwise=False)
        d.check(ok, d.identical)
        e.identical = d.identical
        positions = self._data_positions("run", s.max_steps) if codes[0] == 0 else []
        per_process = s.max_steps * GLOBAL_BATCH // layout.processes
        d.check(positions == [per_process] * layout.processes,
                f"data positions {positions} at step {s.max_steps}, expected {per_process} "
                f"on each of {layout.processes} processes")
        d.facts.update(positions=positions, resume_from=resume_from, codes=codes)
        self.verdicts["b"].identical = d.identical
        d.steps_lost = 0
        d.happened = (f"{s.layout.processes} -> {layout.processes} processes: resumed at step "
                      f"{resume_from}, trained to {s.max_steps}; data positions "
                      f"{positions} (reference {self.reference_positions})")


def markdown_table(verdicts: dict[str, Verdict]) -> str:
    """The README's table "What a pod run survives"."""
    def s(x):
        return "-" if x is None else f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"
    rows = ["| scenario | processes x devices | what happened | time to detect | time to resume"
            " | steps lost | batches identical to an uninterrupted run |",
            "|---|---|---|---|---|---|---|"]
    for k in ORDER:
        v = verdicts[k]
        identical = {"yes (bitwise)": "yes (bitwise)", "yes (within 1e-5)": "yes (losses "
                     "within 1e-5)", "n/a": "n/a"}.get(v.identical, "no")
        rows.append(f"| {TITLES[k]} | {v.layout} | {v.happened} | {s(v.detect_s)} | "
                    f"{s(v.resume_s)} | {'-' if v.steps_lost is None else v.steps_lost} | "
                    f"{identical} |")
    return "\n".join(rows)

