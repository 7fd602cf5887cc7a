"""`uniimage-bench`: training and sampling throughput against the PyTorch reference, with FLOPs
and MFU.

    uniimage-bench --preset {micro,small,tbac_3b} [--batch B] [--device cpu|gpu] [--steps N]
                   [--sample-batch B] [--sample-repeats N]

Both the official-style PyTorch model and ours are built with the same architecture (random
weights) and run in this process on the same device and shapes: fp32 on CPU, bf16 on GPU.
Progress goes to stderr; the last line on stdout is one JSON object with (at least) preset,
device, jax/torch_train_samples_per_s, train_speedup, jax/torch_sample_images_per_s,
sample_speedup, train_tflops_per_sample and mfu (null where the device peak is unknown, e.g.
CPUs), plus compile times, FLOPs by part and peak memory. See `uniimage_jax.bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from uniimage_jax.cli.errors import add_debug_argument, run_command

# JAX must not grab most of the GPU up front: the PyTorch reference shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def build_parser() -> argparse.ArgumentParser:
    from uniimage_jax.bench.run import DEVICES, PRESETS

    p = argparse.ArgumentParser(prog="uniimage-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="micro (tests, seconds), small (about a minute per side on a CPU), "
                        "tbac_3b (the published architecture, random weights; GPU/TPU)")
    p.add_argument("--batch", type=int, default=None, help="training batch (preset default)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--steps", type=int, default=None, help="timed training steps after warm-up")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="the larger sampling batch (batch 1 is always measured)")
    p.add_argument("--sample-repeats", type=int, default=None,
                   help="timed sampling calls per batch size after warm-up")
    add_debug_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("uniimage-bench", lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    from uniimage_jax.bench.run import run_benchmark

    report = run_benchmark(args.preset, device=args.device, batch=args.batch,
                           steps=args.steps, sample_batch=args.sample_batch,
                           sample_repeats=args.sample_repeats,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
