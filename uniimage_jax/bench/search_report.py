"""The layout search as the command line shows it (`uniimage-bench --aot TOPOLOGY --search`):
its flags checked into a `layout_search.Request` and `Options`, and its ranked table with the
winner as a `uniimage-train` command line."""

from __future__ import annotations

import math

from uniimage_jax.bench import aot, topologies
from uniimage_jax.bench.layout_search import (DEFAULT_DIT_REMAT, DEFAULT_MLLM_REMAT, GIB, Options,
                                              Request)
from uniimage_jax.train.compiled_memory import format_bytes


def _choices(text: str | None, default: tuple, allowed, flag: str) -> tuple:
    if text is None:
        return default
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise aot.AotError(f"{flag} {text!r}: expected a comma-separated list of "
                           f"{sorted(allowed)}")
    return items


def parse_request(topology_name: str, *, preset: str, task: str, config_file=None,
                  overrides=(), prompt_tokens=None, latents=False, per_chip_batch=None,
                  mesh=None, hbm_budget_gib=None, min_batch=1, max_batch=256,
                  time_budget_min=None, jobs=None, meshes=None, dit_remat=None,
                  mllm_remat=None, frozen_sharding=None, cost=True) -> tuple[Request, Options]:
    """(Request, Options) of `uniimage-bench --aot TOPOLOGY --search ...`; every flag checked
    before anything compiles (AotError / TopologyError naming it)."""
    from uniimage_jax.models import remat
    from uniimage_jax.train.sharding import FROZEN_SHARDING

    if task not in ("t2i", "ti2i"):
        raise aot.AotError(f"--search ranks training-step layouts: --task t2i or ti2i, not "
                           f"{task}")
    if per_chip_batch is not None or mesh is not None:
        raise aot.AotError("--search chooses the mesh and the per-chip batch: use --meshes and "
                           "--min-per-chip-batch / --max-per-chip-batch instead of --mesh / "
                           "--per-chip-batch")
    if not 1 <= min_batch <= max_batch:
        raise aot.AotError(f"--min-per-chip-batch {min_batch} and --max-per-chip-batch "
                           f"{max_batch}: need 1 <= min <= max")
    for flag, value in (("--hbm-budget", hbm_budget_gib), ("--time-budget", time_budget_min),
                        ("--jobs", jobs)):
        if value is not None and value <= 0:
            raise aot.AotError(f"{flag} must be > 0, got {value}")
    topology = topologies.get(topology_name)
    config = aot.stage_config(preset, task, config_file, overrides)
    inputs = aot.step_inputs(config, task, prompt_tokens, latents)
    parsed_meshes = None
    if meshes is not None:
        parsed_meshes = []
        for text in meshes.split(";"):
            m = aot.parse_mesh(text.strip()) or {}
            if set(m) - {"data", "fsdp", "tensor"} or any(v < 1 for v in m.values()):
                raise aot.AotError(f"--meshes {text!r}: axes data, fsdp, tensor with sizes >= 1")
            split = (m.get("data", 1), m.get("fsdp", 1), m.get("tensor", 1))
            if math.prod(split) != len(topology.devices):
                raise aot.AotError(f"--meshes {text!r}: {math.prod(split)} devices, "
                                   f"{topology.name} has {len(topology.devices)}")
            parsed_meshes.append(split)
    policies = tuple(remat.POLICIES)
    options = Options(
        budget_bytes=None if hbm_budget_gib is None else int(hbm_budget_gib * GIB),
        min_batch=min_batch, max_batch=max_batch,
        time_budget_s=None if time_budget_min is None else 60.0 * time_budget_min,
        jobs=jobs, meshes=tuple(parsed_meshes) if parsed_meshes else None,
        dit_remat=_choices(dit_remat, DEFAULT_DIT_REMAT, policies, "--dit-remat"),
        mllm_remat=_choices(mllm_remat, DEFAULT_MLLM_REMAT, policies, "--mllm-remat"),
        frozen_sharding=_choices(frozen_sharding, ("tensor", "replicated"), FROZEN_SHARDING,
                                 "--frozen-sharding"),
        cost=cost)
    request = Request(topology.name, preset, task, config_file, tuple(overrides),
                      inputs.prompt_tokens, inputs.latents)
    return request, options


def train_command(result: dict, row: dict, request: Request) -> str:
    """The winner as a `uniimage-train` command line (the user's own overrides kept)."""
    m = row["mesh"]
    flags = [f"--config.mesh.data={m['data']}", f"--config.mesh.fsdp={m['fsdp']}",
             f"--config.mesh.tensor={m['tensor']}", f"--config.model.dit_remat={row['dit_remat']}",
             f"--config.model.mllm_remat={row['mllm_remat']}",
             f"--config.frozen_sharding={row['frozen_sharding']}",
             f"--config.batch_size={row['per_chip_batch'] * result['devices']}"]
    flags += [f"--config.{o}" for o in request.overrides]
    if request.latents:
        flags.append("--config.data.source=latents")
    config = request.config_file or f"configs/{aot.STAGE_FILES[request.task]}"
    return f"uniimage-train --config {config}:{request.preset} --workdir WORKDIR " + \
        " ".join(flags)


def describe(result: dict, request: Request) -> list[str]:
    """The ranked table, the layouts that do not fit, and the winner's command line."""
    lines = [f"[search] {result['preset']} {result['task']} on {result['topology']}, prompts of "
             f"{result['prompt_tokens']} tokens{', cached latents' if result['latents'] else ''}"
             f", per-chip budget {format_bytes(result['budget_bytes'])}; "
             f"{result['compiled_now']} compile(s) run now",
             "rank | layout | per-chip batch | GiB per chip | est. s/step | "
             "est. samples/s per chip | est. MFU"]
    for i, r in enumerate(result["ranked"], 1):
        s = r["estimated_step_s"]
        batch = str(r["per_chip_batch"])
        if r["largest_per_chip_batch"] != r["per_chip_batch"]:
            batch += f" (largest {r['largest_per_chip_batch']}: est. slower per chip)"
        lines.append(f"{i} | {r['layout']} | {batch} | "
                     f"{r['hbm_bytes_per_chip'] / GIB:.1f} | "
                     + (f"{s:.4g} | {r['estimated_samples_per_s_per_chip']:.1f} | "
                        f"{100 * r['estimated_mfu']:.1f}%" if s else
                        f"- | - | - ({r['cost_status']}; ranked by batch, then recompute)"))
    for r in result["not_fitting"]:
        lines.append(f"- | {r['layout']} | {r['status']}")
    if result["ranked"]:
        lines.append("[search] best: " + train_command(result, result["ranked"][0], request))
    else:
        lines.append("[search] no layout fits")
    return lines
