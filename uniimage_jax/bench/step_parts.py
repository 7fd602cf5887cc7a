"""Where a training step's time goes: its parts compiled apart for a TPU topology
(`uniimage-bench --aot TOPOLOGY --parts`).

The split-prompt step (`train/step.py`, `UniImage.loss`) is a chain of five parts, each compiled
here as its own program with the arrays the step hands it, laid out as the step lays them out
(parameters by the mesh rules, activations split over the batch axes):

  prompt     the prompt before the metaqueries, forward only, into the MLLM's KV cache
             (`UniImage.prompt_cache`; ti2i: the vision tower too)
  queries    the metaqueries against that cache, forward and backward to their embeddings
             (`UniImage.query_features` under `jax.vjp`)
  connector  the shared connector over every ladder entry, forward and backward
  dit        SANA's flow-matching loss from the ladder context, forward and backward to its
             parameters and the context (the noise and timesteps drawn in it, as in the step)
  optimizer  clipping, AdamW, spike skipping and the gradient norm (`tx.update`,
             `apply_updates_or_skip`)

and the whole step beside them. Each program's XLA cost figures (flops, bytes accessed,
`optimal_seconds`) are read as `aot` reads the step's: at full depth, extrapolated from
unrolled compiles at the `aot.DEPTH_PROBES` depths (affine in MLLM layers and DiT blocks). The
parts' sum differs from the whole by what XLA fuses or overlaps across their boundaries. Within
each part, the operation groups (the model code that made them, `hlo_traffic`) with the largest
share of the TPU compiler's per-operation time estimates, and the non-matmul groups with the
most bytes, say where its time goes.
"""

from __future__ import annotations

import collections
import copy
import re
import time

import numpy as np

from uniimage_jax.bench import aot, hlo_traffic, topologies

PARTS = ("prompt", "queries", "connector", "dit", "optimizer")
TOP_GROUPS = 6   # non-matmul operation groups listed per part


def _lower_parts(config, topology, per_chip_batch: int, inputs: aot.StepInputs) -> dict:
    """{part: lowered program} (and "whole": the step itself) for `config` on `topology`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from uniimage_jax.diffusion import flow_matching
    from uniimage_jax.train import sharding
    from uniimage_jax.train.optimizer import apply_updates_or_skip, make_optimizer

    lowered, ctx = aot.lower_train_step(config, topology, per_chip_batch, inputs)
    out = {"whole": lowered}
    model, mesh = ctx["model"], ctx["mesh"]
    if inputs.latents and config.data.source != "latents":
        config = copy.deepcopy(config)
        config.data.source = "latents"
    rules = sharding.rules_from_config(config.logical_rules)
    tx = make_optimizer(config.optimizer)
    c = model.config
    b = ctx["global_batch"]
    n, t = c.num_metaqueries, inputs.prompt_tokens
    dtype = model.dtype

    def on_rows(shape, dt, axis):
        return aot._sds(shape, dt, sharding.batch_sharding(mesh, axis))

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        state, frozen = aot.abstract_train_state(config, model, mesh, tx)
        batch, grid = aot.abstract_batch(config, model, b, mesh, inputs)
        mllm_cfg = model._conditioning_mllm(frozen["mllm"])[0].config
        cache = {k: on_rows((mllm_cfg.num_hidden_layers, b, t - 2, mllm_cfg.num_key_value_heads,
                             mllm_cfg.head_dim), dtype, 1) for k in ("k", "v")}
        n_dit = c.dit.num_layers
        feats = on_rows((n_dit, b, n, c.mllm.hidden_size), dtype, 1)
        context = on_rows((n_dit, b, n, c.dit.caption_channels), dtype, 1)
        mask = on_rows((b, n), np.int32, 0)
        rng = aot._sds((2,), np.uint32, aot._replicated(mesh))
        scheme = config.timestep_sampling

        def traced(fn):
            """`fn` traced on the mesh under the axis rules, as the step is."""
            def run(*args):
                with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                        nn.logical_axis_rules(rules):
                    return fn(*args)
            return jax.jit(run)

        def with_grid(x):
            return {**x, "image_grid_thw": grid[0]} if grid is not None else x

        def prompt(frozen, metaquery, x):
            return model.prompt_cache({**frozen, "metaquery": metaquery}, with_grid(x))

        def queries(frozen, metaquery, x, kv, cotangent):
            def features(embedding):
                params = {**frozen, "metaquery": {"embedding": embedding}}
                return model.query_features(params, x, kv)
            value, vjp = jax.vjp(features, metaquery["embedding"])
            return value, vjp(cotangent)

        def connector(params, x, cotangent):
            value, vjp = jax.vjp(lambda p, y: model.connector.apply({"params": p}, y), params, x)
            return value, vjp(cotangent)

        def dit(params, ctx_, mask_, latents, key):
            def loss(p, y):
                def predict(noisy, timesteps):
                    return model.velocity({"dit": p}, noisy, timesteps, y, mask_)
                return flow_matching.training_loss(predict, latents, key, scheme=scheme)[0]
            return jax.value_and_grad(loss, argnums=(0, 1))(params, ctx_)

        def optimizer(st, grads, loss):
            updates, opt_state = tx.update(grads, st.opt_state, st.params, loss=loss)
            params = apply_updates_or_skip(st.params, updates, opt_state)
            return st.replace(params=params, opt_state=opt_state), optax.tree.norm(grads)

        p = state.params
        out["prompt"] = traced(prompt).lower(frozen, p["metaquery"], batch)
        out["queries"] = traced(queries).lower(frozen, p["metaquery"], batch, cache, feats)
        out["connector"] = traced(connector).lower(p["connector"], feats, context)
        latents = batch.get("latents")
        if latents is None:   # images encoded in the step: the DiT sees their latents
            latents = on_rows((b, c.latent_size, c.latent_size, c.dit.in_channels),
                              jnp.float32, 0)
        out["dit"] = traced(dit).lower(p["dit"], context, mask, latents, rng)
        out["optimizer"] = traced(optimizer).lower(
            state, p, aot._sds((), jnp.float32, aot._replicated(mesh)))
    return out


def part_costs(config, topology, per_chip_batch: int, inputs: aot.StepInputs,
               log=print) -> dict:
    """{part or "whole": full-depth XLA cost figures} by the depth probes (a scanned config is
    compiled unrolled at each probe depth; an unrolled one also at its own depth would need
    no probes, but the probes are cheaper to compile)."""
    probes = []
    for layers, blocks in aot.DEPTH_PROBES:
        probe = copy.deepcopy(config)
        for item in ("model.scan_layers=False", f"model.mllm.num_hidden_layers={layers}",
                     f"model.dit.num_layers={blocks}"):
            aot.apply_override(probe, item)
        costs = {}
        for name, lowered in _lower_parts(probe, topology, per_chip_batch, inputs).items():
            t0 = time.perf_counter()
            figures = aot.compile_and_analyse(lowered, keep_text=True)
            if figures.cost is None:
                raise aot.AotError(f"{name} at MLLM x DiT depth {layers}x{blocks} does not fit "
                                   f"in {topology.name}'s HBM at per-chip batch {per_chip_batch}")
            groups, cycles = collections.Counter(), collections.Counter()
            for r in hlo_traffic.traffic(figures.hlo_text):
                # per layer kind, not per layer: extrapolated below
                group = (r["kind"], re.sub(r"_\d+\b", "_*", r["group"]))
                if r["kind"] != "matmul":
                    groups[group] += r["bytes"]
                cycles[group] += r["cycles"] or 0
            costs[name] = {**figures.cost, "traffic": groups, "cycles": cycles}
            log(f"[parts] {name} at depth {layers}x{blocks}: {time.perf_counter() - t0:.0f} s")
        probes.append(costs)
    depth = (config.model.mllm.num_hidden_layers, config.model.dit.num_layers)
    return {name: {**{k: _extrapolate([p[name][k] for p in probes], depth)
                      for k in ("flops", "bytes accessed", "optimal_seconds")},
                   **{key: {g: _extrapolate([p[name][key].get(g, 0) for p in probes], depth)
                            for g in set().union(*(p[name][key] for p in probes))}
                      for key in ("traffic", "cycles")}}
            for name in probes[0]}


def _time_shares(cycles: dict) -> list[dict]:
    """The `TOP_GROUPS` operation groups (any kind) with the largest share of the part's
    per-operation time estimates (the TPU compiler's `estimated_cycles`); [] where the
    compiled program carries none (other backends)."""
    total = sum(cycles.values())
    if total <= 0:
        return []
    ranked = sorted(cycles.items(), key=lambda kv: -kv[1])[:TOP_GROUPS]
    return [{"kind": k, "group": g, "share": v / total} for (k, g), v in ranked]


def _extrapolate(values, depth) -> float:
    """F(L, n) from F at the `aot.DEPTH_PROBES` depths (see `aot.depth_extrapolated_cost`)."""
    a, b, c = values
    return aot.extrapolate_to_depth(a, b, c - b, depth)


def run_parts(topology_name: str, *, preset: str, task: str, per_chip_batch: int | None = None,
              mesh: str | None = None, overrides=(), config_file: str | None = None,
              prompt_tokens: int | None = None, latents: bool = False, log=print) -> dict:
    """The part table of one layout: each part's flops, bytes and est. seconds per step, and
    its share of the whole step's est. seconds."""
    config = aot.stage_config(preset, task, config_file, overrides, mesh)
    if task not in ("t2i", "ti2i") or not config.split_prompt:
        raise aot.AotError("--parts splits the split-prompt training step: --task t2i or ti2i "
                           "with config.split_prompt=True")
    if not isinstance(config.model.ladder, str):
        raise aot.AotError("--parts extrapolates over depth: it needs a named ladder "
                           "(config.model.ladder), not an index list")
    aot.use_host_cpu()
    topology = topologies.get(topology_name)
    inputs = aot.step_inputs(config, task, prompt_tokens, latents)
    batch = per_chip_batch or aot.DEFAULT_PER_CHIP_BATCH[task]
    aot._check_layout(config, topology, batch)
    costs = part_costs(config, topology, batch, inputs, log)
    whole = costs["whole"]["optimal_seconds"]
    bandwidth = hlo_traffic.HBM_BYTES_PER_S[topology.chip.family]
    rows = []
    for name in (*PARTS, "whole"):
        cost = costs[name]
        traffic = sorted(cost["traffic"].items(), key=lambda kv: -kv[1])
        rows.append({"part": name, "xla_flops": cost["flops"],
                     "bytes_accessed": cost["bytes accessed"],
                     "estimated_s": cost["optimal_seconds"] if cost["optimal_seconds"] > 0
                     else None,
                     "share_of_whole": cost["optimal_seconds"] / whole if whole > 0 else None,
                     "non_matmul_bytes": sum(v for _, v in traffic),
                     "top_non_matmul": [{"kind": k, "group": g, "bytes": v,
                                         "floor_s": v / bandwidth}
                                        for (k, g), v in traffic[:TOP_GROUPS]],
                     "top_by_time": _time_shares(cost["cycles"])})
    return {"topology": topology.name, "preset": preset, "task": task,
            "per_chip_batch": batch, "prompt_tokens": inputs.prompt_tokens,
            "latents": inputs.latents, "mesh": {a: int(s) for a, s in config.mesh.items()},
            "parts": rows}


def describe(r: dict) -> list[str]:
    lines = [f"[parts] {r['preset']} {r['task']} on {r['topology']}, mesh "
             + ",".join(f"{a}={s}" for a, s in r["mesh"].items())
             + f", per-chip batch {r['per_chip_batch']}, prompts of {r['prompt_tokens']} tokens"
             + (", cached latents" if r["latents"] else ""),
             "part | XLA TFLOP per chip | GB accessed | est. ms | share of the whole"]
    for row in r["parts"]:
        s, share = row["estimated_s"], row["share_of_whole"]
        lines.append(f"{row['part']} | {row['xla_flops'] / 1e12:.3f} | "
                     f"{row['bytes_accessed'] / 1e9:.2f} | "
                     + (f"{1e3 * s:.1f} | {100 * share:.1f}%" if s and share else "- | -"))
    for row in r["parts"]:
        for g in row.get("top_by_time", []):
            lines.append(f"[parts] {row['part']}: {100 * g['share']:.1f}% of XLA's "
                         f"per-operation time estimates: {g['kind']} {g['group']}")
    for row in r["parts"]:
        for g in row["top_non_matmul"]:
            lines.append(f"[parts] {row['part']}: {g['kind']} {g['group']}: "
                         f"{g['bytes'] / 1e9:.2f} GB (>= {1e3 * g['floor_s']:.1f} ms)")
    parts = sum((row["estimated_s"] or 0.0) for row in r["parts"] if row["part"] != "whole")
    whole = r["parts"][-1]["estimated_s"]
    if whole:
        lines.append(f"[parts] sum of the parts {1e3 * parts:.1f} ms, the whole step "
                     f"{1e3 * whole:.1f} ms")
    return lines
