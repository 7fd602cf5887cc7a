"""`uniimage-rehearse`: a pod run rehearsed on this machine, one verdict line per scenario.

    uniimage-rehearse                         # 2 processes x 2 CPU devices, on a local emulator
    uniimage-rehearse --processes 4 --devices 1 --table

Starts a local Cloud Storage emulator, runs the tiny preset as N `uniimage-train` processes with
M virtual CPU devices each (jax.distributed, gloo collectives on 127.0.0.1), the workdir and the
data (a latent cache, encoded first) on the emulator's bucket, and plays: (a) SIGTERM to every
process, (c) the bucket answering 503 / 429 while data is read and checkpoints are written, (b)
kill -9 of one process, (e) a half-written step left on the bucket, (d) the restart on half the
processes. What each checks and how batches are compared:
`uniimage_jax/rehearsal/scenarios.py`. `--table` also prints the README's table "What a pod run
survives". `--local DIR` puts the workdir in a local directory instead, with the synthetic
shapes as data (no bucket faults then).

Each process start compiles the tiny model (a persistent XLA cache under the temporary folder is
used unless JAX_COMPILATION_CACHE_DIR is set): several CPU minutes in all. Exit status 0 when
every scenario passed, 1 otherwise; the processes' logs stay in --logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time

from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax.errors import UserError

PROG = "uniimage-rehearse"
BUCKET = "uniimage-rehearsal"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--processes", type=int, default=2, help="processes of the job (default 2)")
    p.add_argument("--devices", type=int, default=2, help="CPU devices per process (default 2)")
    p.add_argument("--steps", type=int, default=12, help="max_steps of the job (default 12)")
    p.add_argument("--every", type=int, default=2, help="checkpoint.every_steps (default 2)")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="UNIIMAGE_HEARTBEAT_TIMEOUT_S: seconds until a silent process is "
                        "declared lost (default 10)")
    p.add_argument("--fault-seconds", type=float, default=5.0,
                   help="how long the bucket fails each time (default 5)")
    p.add_argument("--local", metavar="DIR", help="workdir in this local directory, not on the "
                   "emulator (scenario (c) is then skipped)")
    p.add_argument("--logs", metavar="DIR", help="where the processes' logs go (default: a new "
                   "temporary folder)")
    p.add_argument("--table", action="store_true", help="also print the README's table")
    add_debug_argument(p)
    return p


def _check(args) -> None:
    if args.processes < 2 or args.devices < 1:
        raise UserError("--processes must be at least 2 and --devices at least 1")
    if 8 % (args.processes * args.devices):
        raise UserError(f"--processes x --devices = {args.processes * args.devices} must divide "
                        "the tiny preset's global batch of 8")
    if args.every < 1 or args.steps < 4 * args.every + 4:
        raise UserError(f"--steps must be at least 4 x --every + 4 = {4 * args.every + 4}, for "
                        "the scenarios to fit")
    if args.heartbeat < 1 or args.fault_seconds <= 0:
        raise UserError("--heartbeat and --fault-seconds must be positive")


def _main(args) -> int:
    _check(args)
    from uniimage_jax.rehearsal.processes import Layout
    from uniimage_jax.rehearsal.scenarios import Rehearsal, Settings, markdown_table

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), "uniimage_rehearsal_xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    log_dir = args.logs or tempfile.mkdtemp(prefix="uniimage_rehearsal_logs_")
    emulator = None
    if args.local:
        root = os.path.abspath(os.path.join(args.local, f"rehearsal-{int(time.time())}"))
    else:
        from uniimage_jax.storage.emulator import GcsEmulator

        emulator = GcsEmulator(buckets=[BUCKET]).start()
        # It logs every 404 (tensorstore's probes for files not written yet) as an error.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        os.environ.update(emulator.client_env())
        root = f"gs://{BUCKET}/rehearsal-{int(time.time())}"
    print(f"{PROG}: {args.processes} processes x {args.devices} devices, workdir {root}, logs "
          f"{log_dir}; load average {os.getloadavg()[0]:.1f}", flush=True)
    started = time.time()
    settings = Settings(root=root, log_dir=log_dir, layout=Layout(args.processes, args.devices),
                        max_steps=args.steps, every_steps=args.every, heartbeat_s=args.heartbeat,
                        fault_s=args.fault_seconds, emulator=emulator)
    try:
        verdicts = Rehearsal(settings).run(report=lambda line: print(line, flush=True))
    finally:
        if emulator is not None:
            emulator.stop()
    if args.table:
        print(markdown_table(verdicts))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{PROG}: {time.time() - started:.0f} s; the training processes used "
          f"{children.ru_utime + children.ru_stime:.0f} CPU s; load average "
          f"{os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0 if all(v.passed for v in verdicts.values()) else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _main(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
