"""A layout's estimated step at every prompt bucket (`uniimage-bench --aot TOPOLOGY
--per-bucket`), so that the mean over any histogram of buckets can be formed.

Training pads every global batch to one of `config.data.prompt_buckets`, so a run's mean step
time is the mean of the buckets' step times weighted by how often each bucket occurs (its
histogram: the trainer logs it, `flops.bucket_probabilities` models it). Per bucket: XLA's cost
figures at full depth by the depth probes (`aot.depth_extrapolated_cost`); the DiT block's share
of them does not depend on the prompt (the prompt only reaches the MLLM), so it is compiled at
the longest bucket only and reused (two probe compiles per further bucket instead of three).
No memory is compiled: the longest bucket is the shape every run must fit, and that is the
layout's own `--aot` / `--search` figure.
"""

from __future__ import annotations

import copy

from uniimage_jax.bench import aot, topologies


def _probe_cost(config, topology, task, batch, inputs, depth):
    layers, blocks = depth
    probe = copy.deepcopy(config)
    for item in ("model.scan_layers=False", f"model.mllm.num_hidden_layers={layers}",
                 f"model.dit.num_layers={blocks}"):
        aot.apply_override(probe, item)
    figures, _ = aot.compile_request(topology, probe, task, batch, inputs)
    if figures.cost is None:
        raise aot.AotError(f"the depth probe {layers}x{blocks} does not fit at per-chip batch "
                           f"{batch}")
    return figures.cost


def bucket_costs(config, topology, task: str, batch: int, buckets, latents: bool,
                 log=print) -> dict[int, dict]:
    """{bucket: full-depth cost figures} (see the module docstring)."""
    first, second, third = aot.DEPTH_PROBES
    depth = (config.model.mllm.num_hidden_layers, config.model.dit.num_layers)
    block = None
    out = {}
    for tokens in sorted(buckets, reverse=True):
        inputs = aot.StepInputs(int(tokens), latents)
        a = _probe_cost(config, topology, task, batch, inputs, first)
        b = _probe_cost(config, topology, task, batch, inputs, second)
        if block is None:
            c = _probe_cost(config, topology, task, batch, inputs, third)
            block = {k: c[k] - b[k] for k in c}
        out[int(tokens)] = {k: aot.extrapolate_to_depth(a[k], b[k], block[k], depth) for k in a}
        log(f"[buckets] {tokens} tokens: est. {out[int(tokens)]['optimal_seconds']:.4g} s")
    return out


def run_buckets(topology_name: str, *, preset: str, task: str, per_chip_batch: int | None,
                mesh: str | None, overrides=(), config_file=None, latents=False,
                log=print) -> dict:
    aot.use_host_cpu()
    config = aot.stage_config(preset, task, config_file, overrides, mesh)
    from uniimage_jax.processing.prompt_buckets import check_prompt_buckets

    buckets = check_prompt_buckets(config.data.prompt_buckets)
    if not buckets:
        raise aot.AotError("--per-bucket needs config.data.prompt_buckets (this stage pads "
                           "every prompt to config.model.max_prompt_tokens)")
    if not isinstance(config.model.ladder, str):
        raise aot.AotError("--per-bucket extrapolates over depth: it needs a named ladder")
    topology = topologies.get(topology_name)
    batch = per_chip_batch or aot.DEFAULT_PER_CHIP_BATCH[task]
    aot._check_layout(config, topology, batch)
    from uniimage_jax.train import stage_setup

    model = stage_setup.validate(config)
    mesh_shape = aot._check_layout(config, topology, batch).shape
    costs = bucket_costs(config, topology, task, batch, buckets, latents, log)
    rows = []
    for tokens in buckets:
        cost = costs[tokens]
        step_s = cost["optimal_seconds"] if cost["optimal_seconds"] > 0 else None
        per_sample = aot.analytic_flops_per_sample(config, model, task,
                                                   aot.StepInputs(tokens, latents))
        rows.append({"prompt_tokens": tokens, "estimated_step_s": step_s,
                     "estimated_samples_per_s_per_chip": batch / step_s if step_s else None,
                     "estimated_mfu": (per_sample * batch / step_s
                                       / topology.peak_flops_per_device if step_s else None),
                     "xla_tflops_per_sample": cost["flops"] / batch / 1e12,
                     "analytic_tflops_per_sample": per_sample / 1e12})
    return {"topology": topology.name, "preset": preset, "task": task, "per_chip_batch": batch,
            "latents": latents, "mesh": {a: int(s) for a, s in mesh_shape.items()},
            "buckets": rows}


def histogram_mean(result: dict, histogram: dict[int, float]) -> dict:
    """Mean step time and samples/s per chip over a bucket histogram (counts or shares): the
    mean of the step times, weighted (a run spends each bucket's share of steps at its time)."""
    rows = {r["prompt_tokens"]: r for r in result["buckets"]}
    unknown = sorted(set(histogram) - set(rows))
    if unknown:
        raise aot.AotError(f"histogram buckets {unknown} are not this stage's buckets "
                           f"{sorted(rows)}")
    total = sum(histogram.values())
    step_s = sum(w * rows[b]["estimated_step_s"] for b, w in histogram.items()) / total
    return {"mean_step_s": step_s,
            "mean_samples_per_s_per_chip": result["per_chip_batch"] / step_s,
            "mean_prompt_tokens": sum(w * b for b, w in histogram.items()) / total}


def describe(r: dict) -> list[str]:
    lines = [f"[buckets] {r['preset']} {r['task']} on {r['topology']}, mesh "
             + ",".join(f"{a}={s}" for a, s in r["mesh"].items())
             + f", per-chip batch {r['per_chip_batch']}"
             + (", cached latents" if r["latents"] else ""),
             "prompt tokens | est. s/step | est. samples/s per chip | est. MFU | "
             "XLA / analytic TFLOP per sample"]
    for row in r["buckets"]:
        s = row["estimated_step_s"]
        lines.append(f"{row['prompt_tokens']} | "
                     + (f"{s:.4g} | {row['estimated_samples_per_s_per_chip']:.1f} | "
                        f"{100 * row['estimated_mfu']:.1f}%" if s else "- | - | -")
                     + f" | {row['xla_tflops_per_sample']:.2f} / "
                       f"{row['analytic_tflops_per_sample']:.2f}")
    return lines
