"""Per-chip bytes of a training step's arguments, by part, from the abstract arrays' shardings
(`uniimage-bench --aot TOPOLOGY --arguments`): what XLA's memory analysis counts as arguments,
without a compile (XLA's own figure adds its tiling padding, a few percent on small arrays).

`before` is the step as it took every frozen weight; `after` is the step's arguments now, with
the frozen weights it never reads left out (`train/step_params.py`).
"""

from __future__ import annotations

import collections
import math

from uniimage_jax.bench import aot, topologies



def _per_chip(x) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def _parts(tree, prefix: str) -> collections.Counter:
    import jax

    out = collections.Counter()
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if keys[0] == "mllm" and keys[2] == "language_model":   # layers, embedding, norm
            name = "/".join(keys[:3] + [keys[3].split("_")[0] if keys[3].startswith("layers_")
                                        else keys[3]])
        else:   # the vision tower, the autoencoder's encoder and decoder, trained parts
            name = "/".join(keys[:{"mllm": 3, "vae": 2}.get(keys[0], 1)])
        out[f"{prefix}/{name}"] += _per_chip(x)
    return out


def argument_bytes(config, topology_name: str, per_chip_batch: int, inputs: aot.StepInputs,
                   prune: bool = True) -> collections.Counter:
    """{part: per-chip bytes} of the step's arguments, and their "total"."""
    import copy

    import jax

    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.optimizer import make_optimizer

    topology = topologies.get(topology_name)
    model = stage_setup.build_model(config)
    mesh = aot._check_layout(config, topology, per_chip_batch)
    if inputs.latents and config.data.source != "latents":
        config = copy.deepcopy(config)
        config.data.source = "latents"
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        state, frozen = aot.abstract_train_state(config, model, mesh,
                                                 make_optimizer(config.optimizer), prune=prune)
        batch, _ = aot.abstract_batch(config, model, per_chip_batch * len(topology.devices),
                                      mesh, inputs)
    out = _parts(state.params, "trained") + _parts(frozen, "frozen")
    out["optimizer state"] = sum(_per_chip(x) for x in jax.tree.leaves(state.opt_state))
    out["batch"] = sum(_per_chip(x) for x in jax.tree.leaves(batch))
    out["step, rng"] = _per_chip(state.step) + _per_chip(state.rng)
    out["total"] = sum(out.values())
    return out


def run_arguments(topology_name: str, *, preset: str, task: str, per_chip_batch=None,
                  mesh=None, overrides=(), config_file=None, prompt_tokens=None,
                  latents=False) -> dict:
    aot.use_host_cpu()
    config = aot.stage_config(preset, task, config_file, overrides, mesh)
    from uniimage_jax.train import stage_setup

    stage_setup.validate(config)   # config errors before anything is traced
    inputs = aot.step_inputs(config, task, prompt_tokens, latents)
    batch = per_chip_batch or aot.DEFAULT_PER_CHIP_BATCH[task]
    before = argument_bytes(config, topology_name, batch, inputs, prune=False)
    after = argument_bytes(config, topology_name, batch, inputs)
    parts = sorted(set(before) - {"total"}, key=lambda k: -before[k])
    return {"topology": topology_name, "preset": preset, "task": task, "per_chip_batch": batch,
            "prompt_tokens": inputs.prompt_tokens, "latents": inputs.latents,
            "rows": [{"part": k, "before_bytes": before[k], "after_bytes": after.get(k, 0)}
                     for k in (*parts, "total")]}


def describe(r: dict) -> list[str]:
    lines = [f"[arguments] {r['preset']} {r['task']} on {r['topology']}, per-chip batch "
             f"{r['per_chip_batch']}" + (", cached latents" if r["latents"] else ""),
             "part | per-chip MiB before | after"]
    for row in r["rows"]:
        lines.append(f"{row['part']} | {row['before_bytes'] / 2 ** 20:.1f} | "
                     f"{row['after_bytes'] / 2 ** 20:.1f}")
    return lines
