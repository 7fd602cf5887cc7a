"""`uniimage-bench`: training and sampling throughput against the PyTorch reference, with FLOPs
and MFU.

    uniimage-bench --preset {micro,small,tbac_3b} [--batch B] [--device cpu|gpu] [--steps N]
                   [--sample-batch B] [--sample-repeats N] [--no-reference]

Both the official-style PyTorch model and ours are built with the same architecture (random
weights) and run in this process on the same device: fp32 on CPU, bf16 on GPU; `--no-reference`
measures ours only. PyTorch runs as the official code does; ours twice: like-for-like (the same
work as torch: fixed prompt length, images encoded in the step, backward through the whole
prompt; sampling with the context work repeated at every step) and recipe (each side at its best
for the same loss: prompt bucket, split prompt, cached latents; the sampler's fused loop).
Progress goes to stderr; each measurement is printed on stdout as a JSON line the moment it is
taken (a run cut short keeps what finished), then each speed-up (ours / torch) as a JSON line,
and the last line is one JSON object with (at least) preset, device,
torch_train_samples_per_s, jax_train_samples_per_s_{like_for_like,recipe},
train_speedup_{like_for_like,recipe}, torch_sample_images_per_s,
jax_sample_images_per_s_{like_for_like,recipe}, sample_speedup_{like_for_like,recipe},
train_tflops_per_sample and mfu (null where the device peak is unknown, e.g. CPUs, and torch
figures null without the reference), plus compile times, FLOPs by part and peak memory. See
`uniimage_jax.bench.run`.

Ahead of time, for a TPU slice this host does not have (needs `pip install -e ".[aot]"`):

    uniimage-bench --aot v5p:2x2x1 --preset tbac_3b --task t2i --per-chip-batch 16
                   [--mesh data=A,fsdp=B,tensor=C] [--config.KEY=VALUE ...] [--find-max-batch]
                   [--prompt-tokens N] [--latents] [--no-cost]

compiles the trainer's step (or, `--task sample`, what `uniimage-sample` runs on one host of
that topology, with GenEval's and DPG-Bench's estimated wall time) for that topology with
abstract parameters and prints per-chip memory and XLA's cost model (compiler estimates, not
measurements); the last line is one JSON object. See `uniimage_jax.bench.aot`.

The input side alone (no model), samples/s per host on generated 640 x 480 JPEGs:

    uniimage-bench --data --preset tbac_3b --task t2i|ti2i [--batch B] [--steps N]
                   [--processor QWEN_DIR] [--config.data.read_threads=8 ...]
                   [--data-layout jsonl|wds|hf|json_images] [--shards 1000]
                   [--samples-per-shard 4]
                   [--gcs-emulator]

reports samples/s per host, the time to the first batch (cold, then with the workdir's caches)
and the host's resident memory; `--gcs-emulator` reads the set through gs:// from a local
Cloud Storage emulator.

See `uniimage_jax.bench.data_rate`.
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
    from uniimage_jax.bench.bench_models import PRESETS
    from uniimage_jax.bench.run import DEVICES

    p = argparse.ArgumentParser(prog="uniimage-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(set(PRESETS) | {"tiny"}),
                   help="micro (tests, seconds), small (about a minute per side on a CPU), "
                        "tbac_3b (the published architecture, random weights; GPU/TPU); "
                        "with --aot: a model preset (tiny, tbac_3b)")
    p.add_argument("--batch", type=int, default=None, help="training batch (preset default)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--steps", type=int, default=None, help="timed training steps after warm-up")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="the larger sampling batch (batch 1 is always measured)")
    p.add_argument("--sample-repeats", type=int, default=None,
                   help="timed sampling calls per batch size after warm-up")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="measure our JAX side only (no PyTorch reference, no diffusers needed)")
    aot = p.add_argument_group("ahead-of-time compilation for a TPU topology (needs libtpu)")
    aot.add_argument("--aot", metavar="TOPOLOGY", default=None,
                     help="e.g. v5p:2x2x1, v5p:2x2x2, v5e:4x4, v6e:2x4")
    aot.add_argument("--task", default="t2i", choices=("t2i", "ti2i", "sample"),
                     help="the stage's training step (configs/<task>_pretrain.py) or the sampler")
    aot.add_argument("--per-chip-batch", type=int, default=None,
                     help="samples per chip (default 16 for t2i, 4 for ti2i and sample; for "
                          "sample: images per chip per call, 4 x --prompts-per-call)")
    aot.add_argument("--mesh", default=None, help="data=A,fsdp=B,tensor=C (default: the "
                     "config's mesh, all devices on data; --task sample: one host's devices, "
                     "default auto as in uniimage-sample)")
    aot.add_argument("--config", dest="config_file", default=None,
                     help="stage config file (default: configs/<stage>.py of this checkout)")
    aot.add_argument("--find-max-batch", action="store_true",
                     help="also find the largest per-chip batch that fits (memory is about "
                          "affine in the batch: predicted from two compiles, then verified)")
    aot.add_argument("--prompt-tokens", type=int, default=None,
                     help="compile for prompts padded to N tokens: one of the stage's "
                          "data.prompt_buckets (default: the largest, or model.max_prompt_tokens "
                          "without buckets)")
    aot.add_argument("--latents", action="store_true",
                     help="feed the step cached latents (data.source=latents) instead of "
                          "images: no autoencoder encode in the step")
    aot.add_argument("--no-cost", dest="cost", action="store_false",
                     help="memory only: skip the unrolled depth probes that give a scanned "
                          "program's flops and step time")
    aot.add_argument("--parts", action="store_true",
                     help="compile the step's parts apart (prompt pass, query pass, connector, "
                          "DiT, optimizer update) and print each one's XLA flops, bytes and "
                          "est. time against the whole step")
    aot.add_argument("--arguments", action="store_true",
                     help="per-chip bytes of the step's arguments by part, with every frozen "
                          "weight and with only those the step reads (no compile)")
    aot.add_argument("--per-bucket", action="store_true",
                     help="the step's estimate at every prompt bucket of the stage (memory at "
                          "the longest), for means over a bucket histogram")
    aot.add_argument("--bucket-histogram", default=None, metavar="TOKENS=SHARE,...",
                     help="with --per-bucket: also the mean step over this histogram, e.g. "
                          "'160=0.2,192=0.5,256=0.3'")
    search = p.add_argument_group("layout search (with --aot; bench/layout_search.py)")
    search.add_argument("--search", action="store_true",
                        help="rank mesh splits x remat policies x frozen_sharding, each at its "
                             "largest per-chip batch, by XLA's est. samples/s per chip")
    search.add_argument("--results", default=None, metavar="FILE",
                        help="JSON-lines file of every compile's figures: a rerun skips what "
                             "it holds (resume)")
    search.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="start no compile after this many minutes; rank what finished")
    search.add_argument("--jobs", type=int, default=None,
                        help="compiles at a time (default: what the host's available memory "
                             "holds, at least 1)")
    search.add_argument("--hbm-budget", type=float, default=None, metavar="GIB",
                        help="per-chip memory a layout may use (default: the chip's HBM)")
    search.add_argument("--min-per-chip-batch", type=int, default=1,
                        help="layouts that cannot hold this per-chip batch are dropped")
    search.add_argument("--max-per-chip-batch", type=int, default=256)
    search.add_argument("--meshes", default=None, metavar="MESH;MESH...",
                        help="only these splits, e.g. 'fsdp=4;data=2,fsdp=2' (default: every "
                             "split whose tensor axis divides the head counts)")
    search.add_argument("--dit-remat", default=None, metavar="P,P...",
                        help="DiT remat policies to try (default: none,dots_saveable,full)")
    search.add_argument("--mllm-remat", default=None, metavar="P,P...",
                        help="MLLM remat policies to try (default: none)")
    search.add_argument("--frozen-sharding", default=None, metavar="S,S...",
                        help="frozen_sharding choices where tensor > 1 (default: "
                             "tensor,replicated)")
    data = p.add_argument_group("input pipeline (no model)")
    data.add_argument("--data", action="store_true",
                      help="samples/s of the host's input side for --task t2i|ti2i")
    data.add_argument("--processor", default=None,
                      help="with --data: the Qwen2.5-VL processor directory (default: the tiny "
                           "stand-in tokenizer)")
    data.add_argument("--data-layout", default="jsonl",
                      choices=("jsonl", "wds", "hf", "json_images"),
                      help="with --data: the generated set's layout (jsonl: 64 JPEGs and a "
                           "manifest; wds: WebDataset tar shards; hf: a save_to_disk directory "
                           "of Arrow shards; json_images: a JSON array beside the images; the "
                           "last three t2i)")
    data.add_argument("--shards", type=int, default=1000,
                      help="with --data-layout wds / hf: shards in the set (default 1000)")
    data.add_argument("--samples-per-shard", type=int, default=4,
                      help="with --data-layout wds / hf / json_images: samples per shard "
                           "(json_images: shards x this many images; default 4)")
    data.add_argument("--gcs-emulator", action="store_true",
                      help="with --data: copy the set to a local Cloud Storage emulator (a "
                           "child process) and read it through gs://")
    add_debug_argument(p)
    return p


def _split_overrides(argv):
    """(other args, ["KEY=VALUE", ...]) from `--config.KEY=VALUE` / `--config.KEY VALUE`."""
    rest, overrides = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            item = a[len("--config."):]
            overrides.append(item if "=" in item else f"{item}={next(it, '')}")
        else:
            rest.append(a)
    return rest, overrides


def main_search(args, overrides) -> int:
    from uniimage_jax.bench import layout_search, search_report

    def log(s):
        print(s, file=sys.stderr, flush=True)
    request, options = search_report.parse_request(
        args.aot, preset=args.preset, task=args.task, config_file=args.config_file,
        overrides=overrides, prompt_tokens=args.prompt_tokens, latents=args.latents,
        per_chip_batch=args.per_chip_batch, mesh=args.mesh, hbm_budget_gib=args.hbm_budget,
        min_batch=args.min_per_chip_batch, max_batch=args.max_per_chip_batch,
        time_budget_min=args.time_budget, jobs=args.jobs, meshes=args.meshes,
        dit_remat=args.dit_remat, mllm_remat=args.mllm_remat,
        frozen_sharding=args.frozen_sharding, cost=args.cost)
    result = layout_search.search(request, options, args.results, log=log)
    for line in search_report.describe(result, request):
        print(line, flush=True)
    print(json.dumps(result), flush=True)
    return 0


def _histogram(text: str) -> dict[int, float]:
    from uniimage_jax.bench.aot import AotError

    out = {}
    for part in text.split(","):
        tokens, sep, share = part.partition("=")
        try:
            out[int(tokens)] = float(share)
        except ValueError:
            raise AotError(f"--bucket-histogram {text!r}: expected TOKENS=SHARE pairs such as "
                           "160=0.2,192=0.8") from None
        if not sep or out[int(tokens)] < 0:
            raise AotError(f"--bucket-histogram {text!r}: shares must be >= 0")
    if not sum(out.values()) > 0:
        raise AotError(f"--bucket-histogram {text!r}: the shares sum to 0")
    return out


def main_buckets(args, overrides) -> int:
    from uniimage_jax.bench import bucket_costs

    histogram = _histogram(args.bucket_histogram) if args.bucket_histogram else None
    r = bucket_costs.run_buckets(args.aot, preset=args.preset, task=args.task,
                                 per_chip_batch=args.per_chip_batch, mesh=args.mesh,
                                 overrides=overrides, config_file=args.config_file,
                                 latents=args.latents,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
    if histogram:
        r["histogram_mean"] = bucket_costs.histogram_mean(r, histogram)
    for line in bucket_costs.describe(r):
        print(line, flush=True)
    if histogram:
        m = r["histogram_mean"]
        print(f"[buckets] over the histogram (mean prompt {m['mean_prompt_tokens']:.0f} "
              f"tokens): est. {m['mean_step_s']:.4g} s/step, "
              f"{m['mean_samples_per_s_per_chip']:.1f} samples/s per chip", flush=True)
    print(json.dumps(r), flush=True)
    return 0


def main_aot(args, overrides) -> int:
    from uniimage_jax.bench import aot

    if args.search:
        return main_search(args, overrides)
    if args.per_bucket:
        return main_buckets(args, overrides)
    if args.arguments:
        from uniimage_jax.bench import step_arguments

        r = step_arguments.run_arguments(args.aot, preset=args.preset, task=args.task,
                                         per_chip_batch=args.per_chip_batch, mesh=args.mesh,
                                         overrides=overrides, config_file=args.config_file,
                                         prompt_tokens=args.prompt_tokens, latents=args.latents)
        for line in step_arguments.describe(r):
            print(line, flush=True)
        print(json.dumps(r), flush=True)
        return 0
    if args.parts:
        from uniimage_jax.bench import step_parts

        r = step_parts.run_parts(args.aot, preset=args.preset, task=args.task,
                                 per_chip_batch=args.per_chip_batch, mesh=args.mesh,
                                 overrides=overrides, config_file=args.config_file,
                                 prompt_tokens=args.prompt_tokens, latents=args.latents,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
        for line in step_parts.describe(r):
            print(line, flush=True)
        print(json.dumps(r), flush=True)
        return 0

    def log(s):
        print(s, file=sys.stderr, flush=True)
    report = aot.run_aot(args.aot, preset=args.preset, task=args.task,
                         per_chip_batch=args.per_chip_batch, mesh=args.mesh,
                         overrides=overrides, config_file=args.config_file,
                         find_max=args.find_max_batch, prompt_tokens=args.prompt_tokens,
                         latents=args.latents, cost=args.cost, log=log)
    for line in aot.describe(report):
        print(line, flush=True)
    if "max_per_chip_batch" in report:
        print(f"[aot] largest per-chip batch that fits: {report['max_per_chip_batch']}")
    print(json.dumps(report), flush=True)
    return 0


def main_data(args, overrides) -> int:
    from uniimage_jax.bench import aot
    from uniimage_jax.bench.data_rate import run_data_benchmark
    from uniimage_jax.errors import ConfigError

    if args.task not in ("t2i", "ti2i"):
        raise ConfigError(f"--data measures a training input pipeline: --task t2i or ti2i, "
                          f"got {args.task}")
    if args.preset not in ("tiny", "tbac_3b"):
        raise ConfigError(f"--data takes a model preset (tiny, tbac_3b), got {args.preset}")
    config = aot.stage_config(args.preset, args.task, args.config_file, overrides)
    if args.batch is not None:
        config.batch_size = args.batch
    if args.shards < 1 or args.samples_per_shard < 1:
        raise ConfigError(f"--shards and --samples-per-shard must be positive, got "
                          f"{args.shards} and {args.samples_per_shard}")
    report = run_data_benchmark(config, steps=args.steps or 20, processor_dir=args.processor,
                                log=lambda s: print(s, file=sys.stderr, flush=True),
                                layout=args.data_layout, shards=args.shards,
                                samples_per_shard=args.samples_per_shard,
                                gcs_emulator=args.gcs_emulator)
    print(json.dumps(report), flush=True)
    return 0


def main(argv=None) -> int:
    argv, overrides = _split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    return run_command("uniimage-bench", lambda: _main(args, overrides), debug=args.debug)


def _main(args, overrides) -> int:
    from uniimage_jax.errors import ConfigError

    if args.aot:
        return main_aot(args, overrides)
    if args.data:
        return main_data(args, overrides)
    if overrides:
        raise ConfigError("--config.KEY=VALUE needs --aot")
    from uniimage_jax.bench.run import run_benchmark

    report = run_benchmark(args.preset, device=args.device, batch=args.batch,
                           steps=args.steps, sample_batch=args.sample_batch,
                           sample_repeats=args.sample_repeats, reference=args.reference,
                           log=lambda s: print(s, file=sys.stderr, flush=True),
                           emit=lambda r: print(json.dumps(r), flush=True))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
