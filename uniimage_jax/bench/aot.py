"""Ahead-of-time compilation of the training step and the sampler for a TPU topology, on any host.

What is compiled is what runs: the trainer's own pieces (`stage_setup.abstract_params`,
`stage_setup.split_params`, `train_step.jit_train_step`, the stage config from `configs/` with the
user's overrides, the mesh from `sharding.make_mesh`), fed with ShapeDtypeStructs that carry the
shardings the trainer would give the arrays. No parameter, optimiser state or batch is ever
allocated, on the host or on a device, so the published 3B model compiles on a laptop.

The compiled executable reports, per chip (SPMD: every chip runs the same program):
* memory (`memory_analysis()`): arguments, outputs (minus what the donated state aliases),
  temporaries and code. When the program does not fit, XLA refuses to compile it and says by how
  much; that becomes `fits: false` with the size it needed.
* XLA's cost model (`cost_analysis()`): flops, bytes accessed and `optimal_seconds`, XLA's
  idealised bound on the step time for that chip. Everything derived from it (samples/s, MFU) is a
  compiler ESTIMATE, never a measurement. The sampler (`--task sample`) is what `uniimage-sample`
  runs on one host of the slice (`compile_sampler`); its denoising loop's cost is scaled by the
  step count.
* Scanned layers (`model.scan_layers`): XLA counts the body of a while loop once whatever its trip
  count, so the scanned program's flops, bytes and step time cover one MLLM layer and one DiT
  block. Memory is read from the scanned program; the cost figures are those of the same step
  UNROLLED, extrapolated from three small unrolled compiles (`depth_extrapolated_cost`).

The module is a little over the project's usual length because one request reads top to bottom
here: stage config and overrides, abstract inputs, compile, report, batch search.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time

import numpy as np

from uniimage_jax.bench import flops as flops_lib
from uniimage_jax.bench import topologies
from uniimage_jax.errors import UserError
from uniimage_jax.models.layers import compute_dtype
from uniimage_jax.models.uniimage import INPUT_BATCH_AXES
from uniimage_jax.train.compiled_memory import format_bytes, memory_figures

TASKS = ("t2i", "ti2i", "sample")
STAGE_FILES = {"t2i": "t2i_pretrain.py", "ti2i": "ti2i_pretrain.py", "sample": "t2i_pretrain.py"}
# The image processor's pixel bounds of each preset: the official Qwen2.5-VL setting
# (min = max = 256 * 28 * 28: 256 merged tokens per image) and the tiny processor's defaults.
PROCESSOR_PIXELS = {"tbac_3b": (256 * 28 * 28, 256 * 28 * 28), "tiny": (56 * 56, 112 * 112)}
SAMPLE_STEPS = 30
SAMPLE_GUIDANCE_ROWS = 2      # text CFG: [negative, caption]
# XLA's two out-of-memory verdicts: the total it used, or (failing earlier) its temporaries alone;
# either way a lower bound on what the program needs.
_OOM = (re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", re.I),
        re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])?\)", re.I))
_UNITS = {None: 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


class AotError(UserError):
    """A request that cannot be compiled (bad mesh, batch, override ...)."""


# ------------------------------------------------------------------------------------ config


def _default_config_file(task: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "configs", STAGE_FILES[task])


def stage_config(preset: str, task: str, config_file: str | None = None, overrides=(),
                 mesh: str | None = None):
    """The training config the trainer would get for `task` (`configs/<stage>.py:<preset>` or
    `config_file`), with `KEY=VALUE` overrides applied as `--config.KEY=VALUE` would be, and
    the layout of `--mesh` (`data=A,fsdp=B,tensor=C`) when one is given."""
    import importlib.util

    if task not in TASKS:
        raise AotError(f"--task must be one of {TASKS}, got {task!r}")
    path = config_file or _default_config_file(task)
    if not os.path.isfile(path):
        raise AotError(f"stage config {path} not found: pass --config FILE (a configs/*.py file)")
    spec = importlib.util.spec_from_file_location("aot_stage_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.lock()
    for item in overrides:
        apply_override(config, item)
    parsed = parse_mesh(mesh)
    if parsed is not None:
        try:
            config.mesh = parsed
        except (KeyError, TypeError, AttributeError) as e:
            raise AotError(f"--mesh {mesh!r}: {e}") from None
    return config


def apply_override(config, item: str) -> None:
    """`KEY=VALUE` onto a locked ConfigDict; VALUE is a Python literal or a bare string."""
    import ast

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise AotError(f"--config.{item}: expected --config.KEY=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    *parents, leaf = key.split(".")
    node = config
    try:
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(leaf)
        node[leaf] = value
    except (KeyError, AttributeError):
        raise AotError(f"--config.{key}: no such config field") from None
    except TypeError as e:
        raise AotError(f"--config.{key}={raw}: {e}") from None


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """`data=A,fsdp=B,tensor=C` -> {"data": A, ...} (None: the config's mesh)."""
    if not text:
        return None
    mesh = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise AotError(f"--mesh {text!r}: expected AXIS=SIZE pairs such as data=2,fsdp=2")
        mesh[axis.strip()] = int(size)
    return mesh


# ------------------------------------------------------------------------------- abstract inputs


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The shape of what the compiled program is fed: prompts padded to `prompt_tokens`, and
    (training) either images to encode in the step or cached latents (`latents`)."""
    prompt_tokens: int
    latents: bool = False


def step_inputs(config, task: str, prompt_tokens: int | None = None,
                latents: bool = False) -> StepInputs:
    """The inputs a request compiles for. Prompts default to the longest a run of `config` pads
    to (its largest prompt bucket, or `model.max_prompt_tokens` without buckets): the shape every
    run must fit. With buckets, `prompt_tokens` must be one of them (no run pads to another)."""
    from uniimage_jax.processing.prompt_buckets import check_prompt_buckets

    buckets = check_prompt_buckets(config.data.prompt_buckets) if task != "sample" else ()
    longest = buckets[-1] if buckets else int(config.model.max_prompt_tokens)
    if prompt_tokens is None:
        prompt_tokens = longest
    elif buckets and prompt_tokens not in buckets:
        raise AotError(f"--prompt-tokens {prompt_tokens}: not one of config.data.prompt_buckets "
                       f"{buckets} (training pads every batch to one of them)")
    shortest = config.model.num_metaqueries + flops_lib.SUFFIX_TOKENS + 1
    if not shortest <= prompt_tokens <= longest:
        raise AotError(f"--prompt-tokens {prompt_tokens}: must be in {shortest}..{longest} (the "
                       f"metaqueries and suffix, then at most config.model.max_prompt_tokens)")
    if latents and task == "sample":
        raise AotError("--latents feeds the training step from a latent cache: use it with "
                       "--task t2i or ti2i, not sample")
    return StepInputs(int(prompt_tokens), bool(latents))


def _sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def source_image_grid(config, model) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a ti2i source image after the preset's image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    v = model.config.mllm.vision_config
    lo, hi = PROCESSOR_PIXELS[config.model.preset]
    s = config.data.source_image_size
    h, w = smart_resize(s, s, factor=v.patch_size * v.spatial_merge_size, min_pixels=lo,
                        max_pixels=hi)
    return (1, h // v.patch_size, w // v.patch_size)


def abstract_batch(config, model, global_batch: int, mesh, inputs: StepInputs | None = None):
    """(batch, grid): what `batches.prepare_batch` + `shard_host_batch` give the step, as
    ShapeDtypeStructs split over the batch axes; grid is the static image grid (ti2i) or None.
    With `inputs.latents` the batch carries a latent cache's scaled latents instead of images
    (`inputs`: default `step_inputs(config, config.task)`)."""
    from uniimage_jax.train import sharding

    inputs = inputs or step_inputs(config, config.task)
    sh = sharding.batch_sharding(mesh)
    t, s = inputs.prompt_tokens, config.model.image_size
    batch = {"input_ids": _sds((global_batch, t), np.int32, sh),
             "attention_mask": _sds((global_batch, t), np.int32, sh),
             "position_ids": _sds((3, global_batch, t), np.int32,
                                  sharding.batch_sharding(mesh, INPUT_BATCH_AXES["position_ids"]))}
    if inputs.latents:
        c = model.config
        batch["latents"] = _sds((global_batch, c.latent_size, c.latent_size, c.dit.in_channels),
                                np.float32, sh)
    else:
        batch["target"] = _sds((global_batch, s, s, 3), np.float32, sh)
    if config.task != "ti2i":
        return batch, None
    grid = source_image_grid(config, model)
    v = model.config.mllm.vision_config
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    batch["pixel_values"] = _sds((global_batch, math.prod(grid), patch), np.float32, sh)
    return batch, (grid,)  # the grid of one row: the vision tower runs per row


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def abstract_train_state(config, model, mesh, tx, prune: bool = True):
    """(state, frozen) as ShapeDtypeStructs laid out as the trainer lays them out; frozen holds
    what the step reads (`train.step_params`; `prune` False: every frozen weight, as the step
    took them before it left the unread ones out)."""
    import jax
    import jax.numpy as jnp

    from uniimage_jax.train import sharding, stage_setup, step_params
    from uniimage_jax.train import step as train_step

    rules = sharding.rules_from_config(config.logical_rules)
    stage = stage_setup.abstract_params(model, mesh, rules, config)
    if prune:
        stage = step_params.for_stage(stage, config, model)
    trainable, frozen = stage_setup.split_params(stage, config, model)
    if prune:
        frozen = step_params.for_step(frozen, config)
    # The optimiser state laid out by the function `stage_setup.initial_state` uses.
    opt_state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s),
                             jax.eval_shape(tx.init, trainable),
                             stage_setup.opt_state_shardings(tx, trainable, mesh))
    rep = _replicated(mesh)
    rng = jax.eval_shape(jax.random.PRNGKey, 0)
    state = train_step.TrainState(step=_sds((), jnp.int32, rep), params=trainable,
                                  opt_state=opt_state, rng=_sds(rng.shape, rng.dtype, rep))
    return state, frozen


# ------------------------------------------------------------------------------------ compile


@dataclasses.dataclass
class Compiled:
    """What one compiled program reports, per chip."""
    memory: dict[str, int] | None    # bytes by kind and "total"; None when it did not fit
    needed_bytes: int | None         # the total XLA asked for when it did not fit
    cost: dict[str, float] | None    # flops, bytes accessed, optimal_seconds
    compile_s: float
    hlo_text: str | None = None      # the optimized program, when asked for


def compile_and_analyse(lowered, keep_text: bool = False) -> Compiled:
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA's out-of-memory verdict, or a real error (re-raised)
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        m = next((m for m in (p.search(text) for p in _OOM) if m), None)
        needed = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None
        return Compiled(None, needed, None, time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0
    memory = memory_figures(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost = {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}
    return Compiled(memory, None, cost, compile_s, compiled.as_text() if keep_text else None)


def compile_train_step(config, topology, per_chip_batch: int,
                       inputs: StepInputs | None = None) -> tuple[Compiled, dict]:
    """The trainer's step for `config` on `topology`; returns (figures, context)."""
    lowered, context = lower_train_step(config, topology, per_chip_batch, inputs)
    return compile_and_analyse(lowered), context


def lower_train_step(config, topology, per_chip_batch: int, inputs: StepInputs | None = None):
    """(lowered step, context): the trainer's step traced with abstract state and batch
    (`inputs`: default `step_inputs(config, config.task)`)."""
    import jax

    from uniimage_jax.train import step as train_step
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.optimizer import make_optimizer

    model = stage_setup.validate(config)
    mesh = _check_layout(config, topology, per_chip_batch)
    inputs = inputs or step_inputs(config, config.task)
    if inputs.latents and config.data.source != "latents":
        config = copy.deepcopy(config)   # what a run fed from a latent cache is configured with
        config.data.source = "latents"
    global_batch = per_chip_batch * len(topology.devices)
    tx = make_optimizer(config.optimizer)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        state, frozen = abstract_train_state(config, model, mesh, tx)
        batch, grid = abstract_batch(config, model, global_batch, mesh, inputs)
        step = train_step.jit_train_step(model, tx, config,
                                         jax.tree.map(lambda x: x.sharding, state))
        lowered = step.lower(state, frozen, batch, grid)
    return lowered, {"model": model, "mesh": mesh, "global_batch": global_batch,
                     "inputs": inputs}


def host_devices(topology) -> list:
    """The devices of one host of the slice (`uniimage-sample` runs a mesh per process)."""
    return [d for d in topology.devices if getattr(d, "process_index", 0) == 0]


def compile_sampler(config, topology, per_chip_batch: int,
                    inputs: StepInputs | None = None) -> tuple[Compiled, dict]:
    """What `uniimage-sample` runs on one host of `topology` (`sampling.mesh_sampler`): the
    layout `inference_layout` chooses for that host's devices (or the --mesh given,
    `config.sample_mesh`), weights in `config.frozen_dtype`, compute in `config.compute_dtype`; per call and
    chip `per_chip_batch` images, i.e. `per_chip_batch / images_per_call` slots (the CLI's
    --prompts-per-call), each conditioned in a round of one text prompt per chip (2 guidance
    rows), denoised by the SAMPLE_STEPS-step loop and decoded. The cost is rounds x conditioning + SAMPLE_STEPS x the loop program (XLA
    counts a loop body once; the context projection before the loop is counted each time too,
    a fraction of a percent) + the decode."""
    import jax
    import jax.numpy as jnp

    from uniimage_jax.sampling import mesh_sampler, sampler
    from uniimage_jax.train import inference_layout, stage_setup

    model = stage_setup.build_model(config)
    slots = per_chip_batch // sampler.SamplingConfig().images_per_call
    devices = host_devices(topology)
    dtype = compute_dtype(config.frozen_dtype, "config.frozen_dtype")
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    mesh_config, why = inference_layout.choose_mesh(
        inference_layout.parse_mesh(config.get("sample_mesh")), len(devices),
        inference_layout.weight_bytes(abstract, dtype), topology.hbm_bytes_per_device)
    layout = inference_layout.make_layout(model, mesh_config, devices)
    inputs = inputs or step_inputs(config, "sample")
    shards = layout.shards

    def weights(x, s):
        return _sds(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, s)
    params = jax.tree.map(weights, abstract, layout.param_shardings if not layout.replicated
                          else jax.tree.map(lambda _: layout.everywhere(), abstract))
    key = sampler.static_model(model)
    k, t, c = SAMPLE_GUIDANCE_ROWS, inputs.prompt_tokens, model.config
    batch, rows = layout.batch(), layout.batch(0)
    cond = mesh_sampler.conditioner(layout, model_key=key, grid=None).lower(
        params, _sds((shards, k, t), np.int32, batch), _sds((shards, k, t), np.int32, batch),
        _sds((shards, 3, k, t), np.int32, batch), None)
    ctx, mask = (_sds((shards * slots,) + o.shape[1:], o.dtype, rows) for o in cond.out_info)
    latent = (c.latent_size, c.latent_size, c.dit.in_channels)
    images = shards * per_chip_batch
    scalar = _sds((), np.float32, layout.everywhere())
    den = mesh_sampler.denoiser(layout, model_key=key,
                                scheduler=sampler.SamplingConfig().make_scheduler(),
                                num_steps=SAMPLE_STEPS).lower(
        params, ctx, mask, _sds((images,) + latent, np.float32, rows), scalar, scalar)
    dec = mesh_sampler.decoder(layout, model_key=key).lower(
        params, _sds((images,) + latent, np.float32, rows))
    parts = [compile_and_analyse(x) for x in (cond, den, dec)]
    compile_s = sum(p.compile_s for p in parts)
    if any(p.memory is None for p in parts):
        figures = Compiled(None, max(p.needed_bytes or 0 for p in parts) or None, None,
                           compile_s)
    else:
        a, b, d = parts
        memory = resident_memory(params, parts)
        cost = {name: slots * a.cost[name] + SAMPLE_STEPS * b.cost[name] + d.cost[name]
                for name in a.cost}
        figures = Compiled(memory, None, cost, compile_s)
    return figures, {"model": model, "mesh": layout.mesh, "global_batch": images,
                     "inputs": inputs, "layout": inference_layout.describe(layout),
                     "layout_reason": why, "hosts": len(topology.devices) // len(devices),
                     "prompts_per_call": slots}


# ------------------------------------------------------------------------------------ report


def analytic_flops_per_sample(config, model, task: str, inputs: StepInputs) -> float:
    """The project's FLOP model (`bench.flops`) at `inputs`' prompt length: a training sample
    (without the autoencoder encode when fed cached latents), or one sampled image."""
    t = inputs.prompt_tokens
    if task == "sample":
        return flops_lib.sample_flops(model.config, t, num_steps=SAMPLE_STEPS, num_images=1,
                                      guidance_rows=SAMPLE_GUIDANCE_ROWS)["per_image"]
    # ti2i: the model counts the source image's tokens in the prompt but not the vision tower
    # that makes them (frozen, forward only), so XLA's count is the larger there.
    parts = flops_lib.train_flops_per_sample(model.config, t)
    return parts["total"] - (parts["vae_encode"] if inputs.latents else 0.0)


def _check_layout(config, topology, per_chip_batch: int):
    """The mesh fits the topology and the batch splits over it (before anything is traced)."""
    from uniimage_jax.train import sharding

    if per_chip_batch < 1:
        raise AotError(f"--per-chip-batch must be >= 1, got {per_chip_batch}")
    n = len(topology.devices)
    try:
        mesh = sharding.make_mesh(config.mesh, topology.devices)
        sharding.check_batch_divisible(per_chip_batch * n, mesh)
    except ValueError as e:
        raise AotError(f"{topology.name} ({n} devices): {e}") from None
    return mesh


def compile_request(topology, config, task: str, per_chip_batch: int,
                    inputs: StepInputs | None = None) -> tuple[Compiled, dict]:
    if task == "sample":
        return compile_sampler(config, topology, per_chip_batch, inputs)
    return compile_train_step(config, topology, per_chip_batch, inputs)


# (MLLM layers, DiT blocks) of the unrolled compiles that give the per-layer costs under scan.
# The DiT's per-block cost is taken between 2 and 3 blocks: with the TPU's grouped depthwise
# convolution a first block is not typical (the tiny preset's per-block bytes were +25.7 MB from
# 1 to 2 blocks, then +34.4 and +33.1; the tbac_3b stage-1 step's per-block estimate 7.09 ms
# from 1 to 2, 7.17 ms from 2 to 3).
DEPTH_PROBES = ((3, 2), (4, 2), (4, 3))


def depth_extrapolated_cost(topology, config, task: str, per_chip_batch: int,
                            inputs: StepInputs | None = None):
    """XLA's cost figures (flops, bytes accessed, optimal_seconds) of the UNROLLED program at the
    config's full depth, from unrolled compiles at the DEPTH_PROBES depths; None when a probe does
    not fit or the ladder is an explicit index list (its depth cannot change).

    Each figure is a sum over the program's operations, and one more MLLM layer or DiT block adds
    the same operations (the layer's forward and backward; a block's ladder entry through the
    connector), so a figure is affine in the MLLM layer count L and the DiT block count n:
    F(L, n) = F(3, 2) + (L - 3) [F(4, 2) - F(3, 2)] + (n - 2) [F(4, 3) - F(4, 2)]. Exact up to
    XLA fusing the probes differently from the full model (checked on the tiny preset against a
    full unrolled compile). The probes are a few layers deep, so they compile in a fraction of
    the full unrolled program's time; not shallower than 3 MLLM layers: since the step runs only
    the MLLM layers the ladder reads, probes of 2 and 3 layers were 3% low in bytes and time on
    the tiny preset (0.8% from 3 and 4)."""
    if not isinstance(config.model.ladder, str):
        return None
    costs = []
    for layers, blocks in DEPTH_PROBES:
        probe = copy.deepcopy(config)
        for item in ("model.scan_layers=False", f"model.mllm.num_hidden_layers={layers}",
                     f"model.dit.num_layers={blocks}"):
            apply_override(probe, item)
        figures, _ = compile_request(topology, probe, task, per_chip_batch, inputs)
        if figures.cost is None:
            return None
        costs.append(figures.cost)
    a, b, c = costs
    depth = (config.model.mllm.num_hidden_layers, config.model.dit.num_layers)
    return {k: extrapolate_to_depth(a[k], b[k], c[k] - b[k], depth) for k in a}


def extrapolate_to_depth(a: float, b: float, block: float, depth: tuple[int, int]) -> float:
    """F(L, n) at `depth` = (L, n) from F at the first two `DEPTH_PROBES` (a, then b with one
    more MLLM layer) and `block`, what one more DiT block adds (F at the third probe less b)."""
    (l0, n0), _, _ = DEPTH_PROBES
    return a + (depth[0] - l0) * (b - a) + (depth[1] - n0) * block


def full_depth_figures(topology, config, task: str, per_chip_batch: int,
                       figures: Compiled, inputs: StepInputs | None = None) -> tuple[Compiled, str]:
    """(figures, where their cost comes from): under scan, the scanned program's memory with the
    extrapolated unrolled cost (`depth_extrapolated_cost`); otherwise `figures` as compiled."""
    if not config.model.scan_layers or figures.memory is None:
        return figures, "compiled program"
    t0 = time.perf_counter()
    cost = depth_extrapolated_cost(topology, config, task, per_chip_batch, inputs)
    spent = time.perf_counter() - t0
    if cost is None:
        return dataclasses.replace(figures, compile_s=figures.compile_s + spent), \
            "scanned program (UNDERCOUNTED: each scanned body counted once)"
    depths = ", ".join(f"{a}x{b}" for a, b in DEPTH_PROBES)
    return (dataclasses.replace(figures, cost=cost, compile_s=figures.compile_s + spent),
            f"unrolled program, extrapolated from unrolled compiles at MLLM x DiT depths {depths}")


def report(topology, config, task: str, per_chip_batch: int, figures: Compiled,
           context: dict, cost_source: str = "compiled program") -> dict:
    """The per-chip figures as one JSON-ready dict (see the module docstring for what they are)."""
    model, inputs = context["model"], context["inputs"]
    per_sample = analytic_flops_per_sample(config, model, task, inputs)
    analytic = per_sample * per_chip_batch
    capacity = topology.hbm_bytes_per_device
    mesh = {a: int(s) for a, s in context["mesh"].shape.items()}
    out = {
        "topology": topology.name, "devices": len(topology.devices), "preset": config.model.preset,
        "task": task, "per_chip_batch": per_chip_batch, "global_batch": context["global_batch"],
        "mesh": mesh, "compute_dtype": config.compute_dtype, "frozen_dtype": config.frozen_dtype,
        "layers": "scanned" if config.model.scan_layers else "unrolled",
        "prompt_tokens": inputs.prompt_tokens, "latents": inputs.latents,
        "hbm_capacity_bytes": capacity,
        "analytic_flops_per_step": analytic,
        "analytic_tflops_per_sample": per_sample / 1e12,
        "compile_s": figures.compile_s,
    }
    if figures.memory is None:
        out.update(fits=False, hbm_bytes_per_chip=figures.needed_bytes, memory_bytes=None,
                   xla_flops_per_step=None, xla_over_analytic=None, bytes_accessed_per_step=None,
                   estimated_step_s=None, estimated_samples_per_s=None,
                   estimated_samples_per_s_per_chip=None, estimated_mfu=None)
        return out
    cost = figures.cost
    undercounted = cost_source.startswith("scanned")
    # An undercounted cost (one scanned body per loop) would make the step look several times
    # faster than it is: no step time is derived from it.
    step_s = cost["optimal_seconds"] if cost["optimal_seconds"] > 0 and not undercounted \
        else None
    out.update(
        fits=figures.memory["total"] <= capacity, hbm_bytes_per_chip=figures.memory["total"],
        memory_bytes=figures.memory,
        xla_flops_per_step=cost["flops"],
        xla_over_analytic=cost["flops"] / analytic if analytic else None,
        xla_cost_source=cost_source,
        xla_flops_undercounted=undercounted,
        bytes_accessed_per_step=cost["bytes accessed"],
        estimated_step_s=step_s,
        estimated_samples_per_s=context["global_batch"] / step_s if step_s else None,
        estimated_samples_per_s_per_chip=per_chip_batch / step_s if step_s else None,
        estimated_mfu=analytic / step_s / topology.peak_flops_per_device if step_s else None,
    )
    return out


def find_max_batch(topology, config, task: str, start: int, inputs: StepInputs | None = None,
                   log=print, max_batch: int = 4096, tried: dict | None = None,
                   cap: int | None = None,
                   compile_fn=None) -> tuple[int, Compiled | None, dict | None]:
    """The largest per-chip batch whose program fits: (batch, its figures, its context), or
    (0, None, None) when even batch 1 does not fit. `start` is compiled first; `tried` (a dict)
    receives every compiled batch's (figures, context), and batches already in it are not
    compiled again. "Fits": within `cap` bytes per chip (default: the chip's HBM).
    `compile_fn(batch)` -> (figures, context) replaces `compile_request` (e.g. a compile in
    another process).

    Per-chip memory is close to affine in the batch (the state is fixed, the activations grow
    with it), so after two compiled points the line through them predicts the largest batch that
    fits; that prediction is compiled, and the next guess comes from the line through the two
    nearest exact points, always strictly inside the interval still unknown (largest fitting,
    smallest failing). It ends when the two are adjacent, so the answer is exact whatever the
    memory curve; when it is affine the search costs about four compiles. A guess the line got
    wrong is followed by a bisection step, so a curve far from affine still ends in log time."""
    cap = topology.hbm_bytes_per_device if cap is None else cap
    tried = {} if tried is None else tried
    if compile_fn is None:
        def compile_fn(b):
            return compile_request(topology, config, task, b, inputs)

    def total(b: int) -> int | None:  # exact when it compiled, XLA's lower bound when not
        figures = tried[b][0]
        return figures.memory["total"] if figures.memory else figures.needed_bytes

    def fits(b: int) -> bool:
        if b not in tried:
            tried[b] = compile_fn(b)
            ok = tried[b][0].memory is not None and total(b) <= cap
            log(f"[aot] per-chip batch {b}: " + (f"{format_bytes(total(b))} per chip, "
                                                  if total(b) else "") +
                ("fits" if ok else "does not fit"))
        figures = tried[b][0]
        return figures.memory is not None and figures.memory["total"] <= cap

    def predict(lo: int, hi: int | None) -> int | None:
        """The largest batch the line through the two points nearest the boundary keeps under
        the cap (exact totals first, then XLA's lower bounds), or None without two points."""
        points = sorted((b for b in tried if total(b)),
                        key=lambda b: (tried[b][0].memory is None, abs(b - lo)))[:2]
        if len(points) < 2:
            return None
        (b0, b1), (m0, m1) = points, (total(points[0]), total(points[1]))
        slope = (m1 - m0) / (b1 - b0)
        if slope <= 0:
            return None
        return math.floor(b0 + (cap - m0) / slope)

    lo, hi = 0, None                  # largest batch known to fit, smallest known not to
    b, bisect = max(1, start), False
    while True:
        if fits(b):
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if (hi is not None and hi - lo <= 1) or lo >= max_batch:
            break
        # A guess the line placed under the cap that did not fit: bisect once before trusting
        # the line again (it is refitted through the new point meanwhile).
        bisect = len(tried) > 2 and not bisect and b == hi
        if len(tried) == 1 and b > 1:
            # The second point of the line: half the first (exact memory) when it fits, else
            # batch 1 (which also settles whether anything fits).
            b = b // 2 if lo == b else 1
            continue
        guess = None if bisect else predict(lo, hi)
        if guess is None:
            guess = (lo + hi) // 2 if hi is not None else 2 * lo
        b = min(max(guess, lo + 1), hi - 1 if hi is not None else max_batch)
    if lo == 0:
        return 0, None, None
    return lo, *tried[lo]


def _tflop(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def describe(r: dict) -> list[str]:
    """The human-readable lines of a report (the JSON line follows them)."""
    lines = [f"[aot] {r['preset']} {r['task']} on {r['topology']} ({r['devices']} devices), mesh "
             + ",".join(f"{a}={n}" for a, n in r["mesh"].items())
             + f", per-chip batch {r['per_chip_batch']} (global {r['global_batch']}), "
             f"{r['compute_dtype']} compute, {r['layers']} layers; compiled in "
             f"{r['compile_s']:.0f} s"]
    cap = format_bytes(r["hbm_capacity_bytes"])
    if r["memory_bytes"] is None:
        lines.append(f"[aot] DOES NOT FIT: XLA needs at least "
                     f"{format_bytes(r['hbm_bytes_per_chip'])} per chip of {cap}")
        return lines
    m = r["memory_bytes"]
    sample = r["task"] == "sample"  # what stays resident between the sampler's three programs
    lines.append(f"[aot] memory per chip: {'weights' if sample else 'arguments'} "
                 f"{format_bytes(m['argument'])}, outputs {format_bytes(m['output'])} "
                 f"{'(largest program)' if sample else '(beyond the donated state)'}, "
                 f"temporaries {format_bytes(m['temporary'])}, code {format_bytes(m['code'])}"
                 f"{' (3 programs)' if sample else ''}: total "
                 f"{format_bytes(m['total'])} of {cap} HBM "
                 f"({'fits' if r['fits'] else 'DOES NOT FIT'})")
    note = " (UNDERCOUNTED: scanned layers are counted once)" if r["xla_flops_undercounted"] \
        else ""
    if r["xla_cost_source"].startswith("unrolled"):
        lines.append(f"[aot] memory from the scanned program; flops, bytes and step time from "
                     f"the {r['xla_cost_source']}")
    lines.append(f"[aot] flops per chip per step: XLA {_tflop(r['xla_flops_per_step'])}"
                 f"{note}, analytic {_tflop(r['analytic_flops_per_step'])} (XLA / "
                 f"analytic {r['xla_over_analytic']:.3f}); bytes accessed "
                 f"{format_bytes(r['bytes_accessed_per_step'])}")
    if r["estimated_step_s"]:
        lines.append(f"[aot] compiler estimate (XLA's idealised bound, not a measurement): "
                     f"{r['estimated_step_s']:.4g} s per "
                     f"{'call' if r['task'] == 'sample' else 'step'}, "
                     f"{r['estimated_samples_per_s']:.4g} "
                     f"{'images' if r['task'] == 'sample' else 'samples'}/s "
                     f"({r['estimated_samples_per_s_per_chip']:.4g} per chip), MFU "
                     f"{100 * r['estimated_mfu']:.1f}%")
    elif r["xla_flops_undercounted"]:
        lines.append("[aot] no step-time estimate: the scanned program's cost counts each "
                     "layer once (drop --no-cost for the unrolled figures)")
    else:
        lines.append("[aot] XLA's cost model gave no step-time estimate for this chip")
    if r["task"] == "sample":
        lines.extend(_sample_lines(r))
    return lines


def _sample_lines(r: dict) -> list[str]:
    """Per-chip images/s and the benchmarks' wall time, from XLA's step estimate and from the
    roofline of XLA's flop and byte counts (compiler estimates, both)."""
    out = [f"[aot] uniimage-sample on each of {r['hosts']} host(s) of {r['devices_per_host']} "
           f"chips: {r['layout']} ({r['layout_reason']}), {r['prompts_per_call']} prompt(s) x "
           f"4 images per chip per call"]
    for label, call, suffix in (("XLA's step estimate", r.get("estimated_step_s"), "estimated"),
                                ("roofline of XLA's flops and bytes", r.get("roofline_call_s"),
                                 "roofline")):
        if not call:
            continue
        per_chip = r["per_chip_batch"] / call
        out.append(f"[aot] {label}: {call:.4g} s per call, {per_chip:.4g} images/s per chip; "
                   + ", ".join(f"{name} {r[f'{name}_{suffix}_s'] / 60:.1f} min"
                               for name in BENCHMARKS) + " on the whole slice")
    return out


def use_host_cpu() -> None:
    """Nothing runs: the host's own backend is only needed for tracing, and JAX must not look
    for a TPU backend on a host that has libtpu but no TPU."""
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


DEFAULT_PER_CHIP_BATCH = {"t2i": 16, "ti2i": 4, "sample": 4}   # the official per-GPU batches


def run_aot(topology_name: str, *, preset: str, task: str, per_chip_batch: int | None = None,
            mesh: str | None = None, overrides=(), config_file: str | None = None,
            find_max: bool = False, prompt_tokens: int | None = None, latents: bool = False,
            cost: bool = True, log=print) -> dict:
    """Compile for `topology_name` and return the report of `per_chip_batch` (with
    `max_per_chip_batch` when `find_max`). `prompt_tokens` / `latents`: see `step_inputs`;
    `cost` False skips the depth probes of a scanned program (memory only: its cost figures
    stay the undercounted scanned ones). Bad requests raise AotError / TopologyError before
    anything compiles."""
    use_host_cpu()
    topology = topologies.get(topology_name)
    if task == "sample":
        return run_aot_sample(topology, preset=preset, per_chip_batch=per_chip_batch, mesh=mesh,
                              overrides=overrides, config_file=config_file, find_max=find_max,
                              prompt_tokens=prompt_tokens, latents=latents, cost=cost, log=log)
    config = stage_config(preset, task, config_file, overrides, mesh)
    inputs = step_inputs(config, task, prompt_tokens, latents)
    batch = DEFAULT_PER_CHIP_BATCH[task] if per_chip_batch is None else per_chip_batch
    _check_layout(config, topology, batch)
    log(f"[aot] compiling {preset} {task} for {topology.name} ({len(topology.devices)} x "
        f"{topology.devices[0].device_kind}), prompts of {inputs.prompt_tokens} tokens"
        f"{', cached latents' if inputs.latents else ''} ...")
    if find_max:  # the requested batch is the search's first compile: its row is reported
        tried = {}
        best, _, _ = find_max_batch(topology, config, task, batch, inputs, log=log, tried=tried)
        figures, ctx = tried[batch]
    else:
        figures, ctx = compile_request(topology, config, task, batch, inputs)
    source = "scanned program (UNDERCOUNTED: each scanned body counted once; --no-cost)"
    if cost or not config.model.scan_layers:
        figures, source = full_depth_figures(topology, config, task, batch, figures, inputs)
    r = report(topology, config, task, batch, figures, ctx, source)
    if find_max:
        r["max_per_chip_batch"] = best
    return r


# GenEval and DPG-Bench at their official settings: prompts x images per prompt.
BENCHMARKS = {"geneval": (553, 4), "dpg": (1065, 4)}
# HBM bandwidth per chip, bytes/s (Cloud TPU's published figures), for the roofline bound.
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}


def resident_memory(params, parts: list[Compiled]) -> dict[str, int]:
    """A sampling process's memory per chip: every weight stays resident between the calls
    (each program's own arguments count only the weights it reads, e.g. no vision tower for a
    text prompt), the three programs' code, and the largest one's temporaries and outputs."""
    import jax

    def shard_bytes(x):
        shape = x.sharding.shard_shape(x.shape)
        return math.prod(shape) * np.dtype(x.dtype).itemsize
    weights = sum(shard_bytes(x) for x in jax.tree.leaves(params))
    largest = max((p.memory for p in parts), key=lambda m: m["temporary"] + m["output"])
    memory = {"argument": weights, "output": largest["output"],
              "temporary": largest["temporary"], "code": sum(p.memory["code"] for p in parts)}
    memory["total"] = sum(memory.values())
    return memory


def run_aot_sample(topology, *, preset: str, per_chip_batch: int | None, mesh: str | None,
                   overrides, config_file, find_max: bool, prompt_tokens, latents: bool,
                   cost: bool, log) -> dict:
    """`--task sample`: what `uniimage-sample` runs on each host of `topology` (a mesh of that
    host's devices: `compile_sampler`), with the estimated wall time of the benchmarks. The
    published checkpoint converts with its layers apart, so the sampler compiles them unrolled
    unless --config.model.scan_layers=True asks for a scanned training stage's layout."""
    from uniimage_jax.train import inference_layout

    if find_max:
        raise AotError("--find-max-batch searches training batches; for --task sample give "
                       "--per-chip-batch (images per chip per call, a multiple of 4)")
    config = stage_config(preset, "sample", config_file,
                          ("model.scan_layers=False", *overrides))
    from uniimage_jax.sampling.sampler import SamplingConfig
    from uniimage_jax.train import sharding

    devices = host_devices(topology)
    try:  # a bad --mesh fails before anything compiles
        requested = inference_layout.parse_mesh(mesh)
        if requested is not None:
            sharding.make_mesh(requested, devices)
    except (UserError, ValueError) as e:
        raise AotError(f"--mesh {mesh!r} on one host's {len(devices)} chips: {e}") from None
    with config.unlocked():
        config.sample_mesh = mesh or "auto"
    inputs = step_inputs(config, "sample", prompt_tokens, latents)
    batch = DEFAULT_PER_CHIP_BATCH["sample"] if per_chip_batch is None else per_chip_batch
    per_call = SamplingConfig().images_per_call
    if batch < 1 or batch % per_call:
        raise AotError(f"--per-chip-batch {batch}: sampling runs groups of {per_call} images "
                       f"per prompt (images_per_call); give a positive multiple of {per_call} "
                       f"(the CLI's --prompts-per-call x {per_call})")
    log(f"[aot] compiling {preset} sample for one host of {topology.name} "
        f"({len(host_devices(topology))} of {len(topology.devices)} x "
        f"{topology.devices[0].device_kind}), prompts of {inputs.prompt_tokens} tokens ...")
    figures, ctx = compile_sampler(config, topology, batch, inputs)
    source = "scanned program (UNDERCOUNTED: each scanned body counted once; --no-cost)"
    if cost or not config.model.scan_layers:
        figures, source = full_depth_figures(topology, config, "sample", batch, figures, inputs)
    r = report(topology, config, "sample", batch, figures, ctx, source)
    r.update(hosts=ctx["hosts"], devices_per_host=len(host_devices(topology)),
             layout=ctx["layout"], layout_reason=ctx["layout_reason"],
             prompts_per_call=ctx["prompts_per_call"],
             estimated_images_per_s_per_chip=(None if not r["estimated_step_s"] else
                                              batch / r["estimated_step_s"]))
    # XLA's cost model gives no step time for some chips (a negative optimal_seconds on v5e and
    # v6e): the roofline of its own flop and byte counts is the bound reported beside it.
    roofline = None
    if r.get("xla_flops_per_step") and not r["xla_flops_undercounted"]:
        roofline = max(r["xla_flops_per_step"] / topology.peak_flops_per_device,
                       r["bytes_accessed_per_step"] / HBM_BANDWIDTH[topology.chip.family])
    r["roofline_call_s"] = roofline
    r["roofline_images_per_s_per_chip"] = batch / roofline if roofline else None
    for name, (prompts, images) in BENCHMARKS.items():
        r[f"{name}_estimated_s"] = benchmark_seconds(r, prompts, images)
        r[f"{name}_roofline_s"] = benchmark_seconds(r, prompts, images, roofline)
    return r


def benchmark_seconds(r: dict, prompts: int, images_per_prompt: int,
                      call_s: float | None = None) -> float | None:
    """The estimated time to sample a benchmark on the whole slice: prompts dealt to the hosts
    in turn, each host running calls of `prompts_per_call` prompts on each of its devices (the
    last call of a host partly filled), each call taking `call_s` (default: XLA's estimate)."""
    call_s = r.get("estimated_step_s") if call_s is None else call_s
    if not call_s or images_per_prompt % 4:
        return None
    slots_per_prompt = images_per_prompt // 4
    per_host = math.ceil(prompts / r["hosts"]) * slots_per_prompt
    calls = math.ceil(per_host / (r["devices_per_host"] * r["prompts_per_call"]))
    return calls * call_s
