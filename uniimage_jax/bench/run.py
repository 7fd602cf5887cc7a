"""Training and sampling throughput of our JAX model against the official-style PyTorch model.

Both sides are built from one `BenchPreset` (the same architecture, each with its own random
weights: throughput does not depend on the values) and run in the same process on the same
device. fp32 on CPU, bf16 (our compute dtype / torch autocast) on GPU. The PyTorch side always
runs as the official code does; ours is timed twice, for two ratios:

* like-for-like (`like_for_like`): both sides do the same work. Training: the preset's fixed
  prompt length, the target images encoded by the autoencoder at every step, and one forward
  and backward pass through the whole prompt (ours with `split_prompt=False`, the official
  path). Sampling: the guidance rows conditioned once, then one compiled DiT call per
  denoising step with the ladder contexts repeated per sample, so the caption projection and
  every block's cross-attention keys and values are recomputed at every step as torch does,
  then one decode of the batch to uint8 pixels.
* recipe (`recipe`): each side at its best for the same loss. Training: ours pads the prompt
  to the bucket of a typical caption (`recipe_prompt_tokens`), runs the prompt forward once
  and differentiates only the metaquery positions (`split_prompt=True`), and reads cached
  latents (the batch carries "latents", encoded once before timing, as a latent cache does).
  Sampling: what `uniimage_jax.sampling.sampler` runs: the conditioning, the whole denoising
  loop as one compiled call with the cross-attention keys and values computed once before it,
  and the batched decode (`decode_batch`, one prompt's `images_per_call` samples).
* the PyTorch side: `OfficialTBAC.loss` at the fixed prompt length (images encoded every step,
  backward through the whole prompt) + torch AdamW (the official hyperparameters, grad clip
  0.5) over the official trainable set; sampling: diffusers' DPM-Solver++ loop of
  `OfficialTBAC.sample_latents` and the decode of the batch to uint8 pixels.

With several devices of the kind (a multi-GPU host, or virtual CPU devices), ours also times
one call of what `uniimage-sample` runs over all of them (`bench_all_devices`: weights
replicated, each device sampling its own prompt's images): `sample_all_devices` in the report,
images/s in all and per device.

Training draws fresh noise and timesteps every step; sampling runs SAMPLE_STEPS DPM-Solver++
steps with text CFG (2 guidance rows), for one image and for a batch of one prompt's images.
Each measurement is a warm-up (for JAX: the compilation, reported apart), then the median of
several timed calls that block on their results. The PyTorch side runs first and releases its
device memory before the JAX side starts (JAX's allocator keeps what it takes); `reference=False`
skips it. Every measurement is handed to `emit` the moment it is taken (the CLI prints it as a
JSON line), then the speed-ups (ours / torch, samples or images per second) once both sides are
in, so a run cut short keeps what finished. Ours measures the recipe first; a variant that
runs out of device memory (the like-for-like step differentiates the whole prompt) is a line
with `"error": "out of memory"` and the rest is still measured. The JAX side of `tbac_3b` scans its layers (compile
time flat in depth); XLA's flop count of a scanned step counts one layer per stack, so it is
reported only for unrolled presets. Only JAX, flax, optax, orbax, transformers and numpy are
imported on the JAX side: it runs on an image without diffusers, grain or ml_collections.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from typing import Any, Callable

import numpy as np

from uniimage_jax.bench import flops as flops_lib
from uniimage_jax.bench.bench_models import PRESETS, Built, build, synthetic_prompts, torch_model
from uniimage_jax.errors import ConfigError

DEVICES = ("cpu", "gpu")
SAMPLE_STEPS = 30
GUIDANCE = 4.5
TRAINABLE = ("dit/.*", "connector/.*", "metaquery/.*")
# The recipe first: on a device where the like-for-like step (backward through the whole
# prompt) runs out of memory, the recipe's figures are already printed.
VARIANTS = ("recipe", "like_for_like")


def per_s(n, seconds):
    return None if seconds is None else n / seconds


def out_of_memory(e: BaseException) -> bool:
    """XLA's out-of-memory verdict (at compile or run time); anything else is a real error."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ------------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any], block: Callable[[Any], Any], warmup: int, repeats: int):
    """(first warm-up call seconds, median of `repeats` timed calls, last result)."""
    out = None
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        out = block(fn())
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def _torch_sync(device: str):
    import torch

    def block(x):
        if device == "gpu":
            torch.cuda.synchronize()
        return x
    return block


def bench_torch(built: Built, device: str, batch: int, steps: int, sample_batches, repeats: int,
                measured=lambda *a, **k: None):
    """The official-style PyTorch training step and sampling loop (with the decode)."""
    import torch

    c, p = built.config, built.preset
    dev = "cuda" if device == "gpu" else "cpu"
    tm = torch_model(built, device)
    m = c.mllm
    token_ids = dict(vision_start=m.vision_start_token_id, vision_end=m.vision_end_token_id,
                     image_token=m.image_token_id)
    ids, mask = synthetic_prompts(c, batch, p.prompt_tokens, seed=1)
    cond = {"input_ids": torch.from_numpy(ids).long().to(dev),
            "attention_mask": torch.from_numpy(mask).long().to(dev)}
    g = torch.Generator(device=dev).manual_seed(0)
    target = torch.rand(batch, 3, c.image_size, c.image_size, generator=g, device=dev) * 2 - 1
    ls, ch = c.latent_size, c.dit.in_channels
    trainable = [q for q in tm.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "gpu")
    sync = _torch_sync(device)
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        noise = torch.randn(batch, ch, ls, ls, generator=g, device=dev)
        timesteps = torch.randint(1, 1001, (batch,), generator=g, device=dev).float()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = tm.loss(target, noise, timesteps, cond, token_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.5)
        opt.step()
        return loss

    first, step_s, loss = _timed(train_step, sync, warmup=1, repeats=steps)
    out = {"train_step_s": step_s, "train_first_step_s": first,
           "train_loss_finite": bool(torch.isfinite(loss).item())}
    measured("torch", "train", batch, step_s, variant="official", first_step_s=first)
    opt = trainable = None  # releases the optimiser state (the closure shares these cells)
    tm.requires_grad_(False)
    s_ids, s_mask = synthetic_prompts(c, 2, p.prompt_tokens, seed=2)
    s_cond = {"input_ids": torch.from_numpy(s_ids).long().to(dev),
              "attention_mask": torch.from_numpy(s_mask).long().to(dev)}
    out["sample"] = {}
    for n in sample_batches:
        noise = torch.randn(n, ch, ls, ls, generator=g, device=dev)

        def sample(noise=noise):
            with torch.no_grad(), autocast:
                latents = tm.sample_latents(s_cond, token_ids, noise, num_steps=SAMPLE_STEPS,
                                            guidance=GUIDANCE, image_guidance=1.0, k=2)
                images = tm.decode(latents)
            # The official decode_latents: [-1, 1] -> [0, 1], clamped; then 8-bit pixels.
            return (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        _, latency, _ = _timed(sample, sync, warmup=1, repeats=repeats)
        out["sample"][n] = latency
        measured("torch", "sample", n, latency, variant="official")
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "gpu" else None
    tm = None
    gc.collect()
    if device == "gpu":
        torch.cuda.empty_cache()
    return out


def bench_jax(built: Built, device: str, batch: int, steps: int, sample_batches, repeats: int,
              measured=lambda *a, **k: None):
    """Our jitted training step and sampler, each as like-for-like and as recipe (module
    docstring)."""
    import jax
    import jax.numpy as jnp

    from uniimage_jax.checkpoints.partition import merge_params, partition_params
    from uniimage_jax.models.uniimage import UniImage
    from uniimage_jax.train.optimizer import default_optimizer_config, make_optimizer
    from uniimage_jax.train.step import TrainState

    c, p = built.config, built.preset
    dev = jax.devices(device)[0]
    dtype = jnp.bfloat16 if device == "gpu" else jnp.float32
    model = UniImage(c, dtype=dtype)
    block = jax.block_until_ready
    out = {"train_step_s": {}, "train_compile_s": {}, "train_loss_finite": True,
           "xla_train_flops_per_step": {}, "sample": {v: {} for v in VARIANTS},
           "sample_compile_s": {v: {} for v in VARIANTS}}
    with jax.default_device(dev):
        params = jax.jit(model.init)(jax.random.PRNGKey(0))
        trainable, frozen = partition_params(params, TRAINABLE)
        # Frozen towers stored in the compute dtype (config.frozen_dtype), as the trainer does.
        frozen = jax.tree.map(lambda x: x.astype(dtype), frozen)
        tx = make_optimizer(default_optimizer_config(_AttrDict))

        def new_state(trainable):
            return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                              opt_state=jax.jit(tx.init)(trainable), rng=jax.random.PRNGKey(1))

        holder = {"state": new_state(trainable)}
        g = np.random.default_rng(0)
        target = g.uniform(-1, 1, (batch, c.image_size, c.image_size, 3)).astype(np.float32)
        for variant in VARIANTS:
            arrays = jax.device_put(train_inputs(model, built, variant, target, params), dev)
            try:
                compiled, compile_s, xla_flops = _compile_train_step(
                    model, tx, variant, holder["state"], frozen, arrays,
                    count_flops=not p.scan_layers)

                def train_step(compiled=compiled, arrays=arrays):
                    holder["state"], metrics = compiled(holder["state"], frozen, arrays)
                    return metrics

                _, step_s, metrics = _timed(train_step, block, warmup=1, repeats=steps)
            except Exception as e:  # noqa: BLE001 (only XLA's out-of-memory verdict is kept)
                if not out_of_memory(e):
                    raise
                for name in ("train_step_s", "train_compile_s", "xla_train_flops_per_step"):
                    out[name][variant] = None
                # The donated state survives a failed compile, not a failed run: then a fresh
                # one serves the measurements that follow.
                if any(x.is_deleted() for x in jax.tree.leaves(holder["state"])):
                    holder["state"] = new_state(partition_params(
                        jax.jit(model.init)(jax.random.PRNGKey(0)), TRAINABLE)[0])
                measured("jax", "train", batch, None, variant=variant, error="out of memory")
                continue
            out["train_step_s"][variant] = step_s
            out["train_compile_s"][variant] = compile_s
            out["xla_train_flops_per_step"][variant] = xla_flops
            out["train_loss_finite"] &= bool(np.isfinite(float(metrics["loss"])))
            measured("jax", "train", batch, step_s, variant=variant, compile_s=compile_s)
        params = merge_params(holder.pop("state").params, frozen)
        s_batch = jax.device_put(sample_rows(built), dev)
        samplers = {"like_for_like": stepwise_sampler(model), "recipe": recipe_sampler(model)}
        for n in sample_batches:
            noise = jax.random.normal(jax.random.PRNGKey(n), (n, c.latent_size, c.latent_size,
                                                              c.dit.in_channels))
            for variant in VARIANTS:
                try:
                    first, latency, _ = _timed(
                        functools.partial(samplers[variant], params, s_batch, noise), block,
                        warmup=1, repeats=repeats)
                except Exception as e:  # noqa: BLE001 (only out-of-memory is kept)
                    if not out_of_memory(e):
                        raise
                    out["sample"][variant][n] = out["sample_compile_s"][variant][n] = None
                    measured("jax", "sample", n, None, variant=variant, error="out of memory")
                    continue
                compile_s = max(first - latency, 0.0)
                out["sample"][variant][n] = latency
                out["sample_compile_s"][variant][n] = compile_s
                measured("jax", "sample", n, latency, variant=variant, compile_s=compile_s)
        out["sample_all_devices"] = bench_all_devices(model, params, built, device,
                                                      sample_batches[-1], repeats, measured)
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        out["peak_bytes"] = (stats or {}).get("peak_bytes_in_use")
    return out


def bench_all_devices(model, params, built: Built, device: str, n: int, repeats: int,
                      measured=lambda *a, **k: None) -> dict | None:
    """What `uniimage-sample` runs when this machine has several devices of the kind (e.g. 8
    GPUs): one call of the mesh sampler (`sampling.mesh_sampler`, weights replicated), each
    device conditioning, denoising (SAMPLE_STEPS steps) and decoding its own prompt's `n`
    images. None on one device."""
    import jax

    from uniimage_jax.sampling import mesh_sampler, sampler
    from uniimage_jax.train.inference_layout import replicated_layout

    devices = jax.devices(device)
    if len(devices) < 2:
        return None
    layout = replicated_layout(devices)
    rows = sample_rows(built)
    prompt = sampler.EncodedPrompt(np.asarray(rows["input_ids"], np.int32),
                                   np.asarray(rows["attention_mask"], np.int32),
                                   np.asarray(rows["position_ids"], np.int32), None, None)
    cfg = sampler.SamplingConfig(num_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                                 images_per_call=n, prompts_per_call=1)
    run = mesh_sampler.MeshSampler(model, layout.weights(params), layout, cfg, seed=0)
    slots = [(prompt, 0)] * run.slots_per_call
    images = run.slots_per_call * n
    try:
        first, latency, _ = _timed(lambda: run.sample(slots), lambda x: x, warmup=1,
                                   repeats=repeats)
    except Exception as e:  # noqa: BLE001 (only out-of-memory is kept)
        if not out_of_memory(e):
            raise
        measured("jax", "sample_all_devices", images, None, variant="recipe",
                 devices=len(devices), error="out of memory")
        return {"devices": len(devices), "images": images, "seconds": None}
    measured("jax", "sample_all_devices", images, latency, variant="recipe",
             devices=len(devices), compile_s=max(first - latency, 0.0))
    return {"devices": len(devices), "images": images, "seconds": latency}


def train_inputs(model, built: Built, variant: str, target, params) -> dict:
    """The training batch of one variant: prompts at the preset's fixed length with the target
    images (like-for-like), or at the recipe's prompt bucket with the images' latents, encoded
    here once as a latent cache holds them (recipe)."""
    import jax

    from uniimage_jax.models.uniimage import rope_positions

    c, p = built.config, built.preset
    tokens = p.prompt_tokens if variant == "like_for_like" else p.recipe_prompt_tokens
    ids, mask = synthetic_prompts(c, target.shape[0], tokens, seed=1)
    arrays = {"input_ids": ids, "attention_mask": mask,
              "position_ids": rope_positions(c, ids, mask).astype(np.int32)}
    if variant == "like_for_like":
        arrays["target"] = target
    else:
        arrays["latents"] = np.asarray(jax.jit(model.encode_images)(params, target))
    return arrays


def _compile_train_step(model, tx, variant: str, state, frozen, arrays, *, count_flops: bool):
    """(the trainer's step compiled for this variant, compile seconds, XLA's flops or None)."""
    import types

    import jax

    from uniimage_jax.train.step import make_train_step

    step_cfg = types.SimpleNamespace(task="t2i", split_prompt=variant == "recipe",
                                     timestep_sampling="uniform")
    t0 = time.perf_counter()
    compiled = jax.jit(make_train_step(model, tx, step_cfg), donate_argnums=(0,)).lower(
        state, frozen, arrays).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA counts a scanned stack's body once: only an unrolled step's count is comparable.
    xla_flops = float(cost.get("flops", 0.0)) if cost and count_flops else None
    return compiled, compile_s, xla_flops


def sample_rows(built: Built) -> dict:
    """The 2 guidance rows of one synthetic prompt, at the preset's fixed length (as torch's)."""
    from uniimage_jax.models.uniimage import rope_positions

    c = built.config
    ids, mask = synthetic_prompts(c, 2, built.preset.prompt_tokens, seed=2)
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": rope_positions(c, ids, mask)}


class _AttrDict(dict):
    """A mapping read by attribute, standing in for a ConfigDict where ml_collections is absent."""
    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def recipe_sampler(model):
    """What `uniimage_jax.sampling.sampler` runs for a text prompt: the compiled conditioning of
    the 2 guidance rows, the compiled SAMPLE_STEPS DPM-Solver++ loop over the whole batch (the
    cross-attention keys and values computed once, before the loop), then the batch decoded in
    one compiled call to uint8 pixels. (params, batch, noise) -> pixels."""
    from uniimage_jax.diffusion import schedulers
    from uniimage_jax.sampling import sampler

    key = sampler.static_model(model)
    scheduler = schedulers.DPMSolverMultistepScheduler.sana()

    def sample(params, batch, noise):
        ctx, mask = sampler.condition_rows(params, batch["input_ids"], batch["attention_mask"],
                                           batch["position_ids"], None, model_key=key, grid=None)
        # One slot: the prompt's whole batch shares its context (as `sample_latents` with
        # images_per_call = the batch and prompts_per_call = 1).
        latents = sampler.denoise(params, ctx[None], mask[None], noise, GUIDANCE, 1.0,
                                  model_key=key, scheduler=scheduler, num_steps=SAMPLE_STEPS)
        return sampler.latents_to_uint8(model, params, latents, batch=noise.shape[0])

    return sample


def stepwise_sampler(model):
    """The like-for-like sampler: the work of the official loop (`OfficialTBAC.sample_latents`)
    in JAX. The conditioning of the 2 guidance rows, compiled; their ladder contexts repeated
    per sample (torch's repeat_interleave); then SAMPLE_STEPS calls of one compiled function
    that runs the DiT on the raw contexts (the caption projection and every block's
    cross-attention keys and values recomputed at every step, as the torch loop does) and the
    DPM-Solver++ step; then the batch decoded to uint8 pixels. (params, batch, noise) -> pixels.

    The steps are separate calls rather than one loop so that XLA cannot hoist the
    step-invariant context work out of it (it moves loop-invariant code out of while loops)."""
    import jax
    import jax.numpy as jnp

    from uniimage_jax.diffusion import schedulers
    from uniimage_jax.sampling import sampler

    key = sampler.static_model(model)
    scheduler = schedulers.DPMSolverMultistepScheduler.sana()
    schedule = scheduler.make_schedule(SAMPLE_STEPS)

    @jax.jit
    def step(params, x, state, i, ctx, mask):
        k = ctx.shape[1] // x.shape[0]
        t = schedulers.model_timestep(schedule, i, ctx.shape[1])
        v = model.velocity(params, jnp.concatenate([x] * k, 0), t, ctx, mask)
        v = sampler.combine_guidance(v.astype(jnp.float32), k, GUIDANCE, 1.0)
        return scheduler.step(schedule, state, v, x, i)

    def sample(params, batch, noise):
        ctx, mask = sampler.condition_rows(params, batch["input_ids"], batch["attention_mask"],
                                           batch["position_ids"], None, model_key=key, grid=None)
        n = noise.shape[0]
        ctx, mask = jnp.repeat(ctx, n, axis=1), jnp.repeat(mask, n, axis=0)
        x, state = noise, scheduler.init_state(noise)
        for i in range(SAMPLE_STEPS):
            x, state = step(params, x, state, i, ctx, mask)
        return sampler.latents_to_uint8(model, params, x, batch=n)

    return sample


# ------------------------------------------------------------------------------- report


def run_benchmark(preset: str, *, device: str = "cpu", batch: int | None = None,
                  steps: int | None = None, sample_batch: int | None = None,
                  sample_repeats: int | None = None, reference: bool = True, log=print,
                  emit=lambda record: None) -> dict:
    """Run both sides (ours only without `reference`) and return the report (see
    `uniimage_jax.cli.bench`); `emit` receives each measurement as a dict when it is taken."""
    import jax

    if preset not in PRESETS:
        raise ConfigError(f"unknown benchmark preset {preset!r}; choose one of {sorted(PRESETS)}")
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, got {device!r}")
    p = PRESETS[preset]
    batch = p.batch if batch is None else batch
    steps = p.steps if steps is None else steps
    sample_batch = p.sample_batch if sample_batch is None else sample_batch
    repeats = p.sample_repeats if sample_repeats is None else sample_repeats
    for name, v in (("batch", batch), ("steps", steps), ("sample batch", sample_batch),
                    ("sample repeats", repeats)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    try:
        jdev = jax.devices(device)[0]
    except RuntimeError as e:
        raise ConfigError(f"--device {device}: JAX has no such backend here ({e})") from None
    if device == "gpu" and reference:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device gpu: PyTorch sees no CUDA device")
    built = build(p)
    c = built.config
    sample_batches = sorted({1, sample_batch})

    log(f"[bench] preset {preset}: batch {batch}, prompt {p.prompt_tokens} tokens (ours in "
        f"the recipe: {p.recipe_prompt_tokens}), {c.image_size}px -> "
        f"{c.latent_size}x{c.latent_size}x{c.dit.in_channels} latents, device {jdev.device_kind}")
    # Model FLOPs credited per training sample: the fixed-length prompt with the images encoded
    # (torch and like-for-like), or what the recipe computes (its bucket, cached latents).
    train = {"official": flops_lib.train_flops_per_sample(c, p.prompt_tokens),
             "recipe": recipe_train_flops_per_sample(c, p.recipe_prompt_tokens)}
    train["like_for_like"] = train["official"]
    peak = flops_lib.peak_flops(jdev.device_kind)

    def measured(side: str, what: str, n: int, seconds: float | None, variant: str, **extra):
        """One measurement as a JSON line; seconds None: it failed (`extra` says why)."""
        if what == "train":
            work = n * train[variant]["total"]
        else:
            work = flops_lib.sample_flops(c, p.prompt_tokens, num_steps=SAMPLE_STEPS,
                                          num_images=n)["total"]
        rate = per_s(n, seconds)
        emit({"preset": preset, "device": device, "device_kind": jdev.device_kind, "side": side,
              "variant": variant, "measure": what, "batch": n, "seconds": seconds,
              "samples_per_s" if what == "train" else "images_per_s": rate,
              "mfu": None if rate is None else flops_lib.mfu(work / seconds, peak), **extra})

    ref = None
    if reference:
        log("[bench] PyTorch reference (the official recipe) ...")
        ref = bench_torch(built, device, batch, steps, sample_batches, repeats, measured)
        log(f"[bench]   train step {ref['train_step_s']:.3f} s, sampling {ref['sample']}")
    log("[bench] JAX (recipe, then like-for-like) ...")
    ours = bench_jax(built, device, batch, steps, sample_batches, repeats, measured)
    log(f"[bench]   train step {ours['train_step_s']} s (compile {ours['train_compile_s']} s), "
        f"sampling {ours['sample']}")
    if ref is None:  # every reference figure (and ratio) reads as null
        ref = {"train_step_s": None, "train_first_step_s": None, "train_loss_finite": True,
               "sample": dict.fromkeys(sample_batches), "peak_bytes": None}

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def times(a, b):
        return None if a is None or b is None else a * b

    big = sample_batches[-1]
    torch_sps = per_s(batch, ref["train_step_s"])
    jax_sps = {v: per_s(batch, ours["train_step_s"][v]) for v in VARIANTS}
    train_speedup = {v: ratio(jax_sps[v], torch_sps) for v in VARIANTS}
    sampling = {}
    for n in sample_batches:
        f = flops_lib.sample_flops(c, p.prompt_tokens, num_steps=SAMPLE_STEPS, num_images=n)
        jax_s = {v: ours["sample"][v][n] for v in VARIANTS}
        sampling[f"batch_{n}"] = {
            "jax_latency_s": jax_s, "torch_latency_s": ref["sample"][n],
            "jax_images_per_s": {v: per_s(n, jax_s[v]) for v in VARIANTS},
            "torch_images_per_s": per_s(n, ref["sample"][n]),
            "speedup": {v: ratio(ref["sample"][n], jax_s[v]) for v in VARIANTS},
            "jax_compile_s": {v: ours["sample_compile_s"][v][n] for v in VARIANTS},
            "tflops_per_call": f["total"] / 1e12,
            "jax_mfu": {v: flops_lib.mfu(times(f["total"], per_s(1, jax_s[v])), peak)
                        for v in VARIANTS}}
    big_sampling = sampling[f"batch_{big}"]
    if reference:
        for v in VARIANTS:
            emit({"preset": preset, "device": device, "measure": "speedup", "what": "train",
                  "variant": v, "batch": batch, "jax_per_s": jax_sps[v], "torch_per_s": torch_sps,
                  "speedup": train_speedup[v]})
        for n in sample_batches:
            for v in VARIANTS:
                emit({"preset": preset, "device": device, "measure": "speedup", "what": "sample",
                      "variant": v, "batch": n,
                      "jax_per_s": sampling[f"batch_{n}"]["jax_images_per_s"][v],
                      "torch_per_s": sampling[f"batch_{n}"]["torch_images_per_s"],
                      "speedup": sampling[f"batch_{n}"]["speedup"][v]})
        def x(r):
            return "n/a" if r is None else f"{r:.2f}x"

        log(f"[bench] ours / torch: train like-for-like {x(train_speedup['like_for_like'])}, "
            f"recipe {x(train_speedup['recipe'])}; sampling batch {big} like-for-like "
            f"{x(big_sampling['speedup']['like_for_like'])}, recipe "
            f"{x(big_sampling['speedup']['recipe'])}")
    sample_f = flops_lib.sample_flops(c, p.prompt_tokens, num_steps=SAMPLE_STEPS, num_images=big)
    xla = ours["xla_train_flops_per_step"]
    lfl = "like_for_like"
    return {
        "preset": preset, "device": device, "device_kind": jdev.device_kind,
        "reference": reference, "layers": "scanned" if p.scan_layers else "unrolled",
        "batch": batch, "prompt_tokens": p.prompt_tokens,
        "recipe_prompt_tokens": p.recipe_prompt_tokens, "image_size": c.image_size,
        "compute_dtype": "bfloat16" if device == "gpu" else "float32",
        "torch_train_samples_per_s": torch_sps,
        "jax_train_samples_per_s_like_for_like": jax_sps[lfl],
        "jax_train_samples_per_s_recipe": jax_sps["recipe"],
        "train_speedup_like_for_like": train_speedup[lfl],
        "train_speedup_recipe": train_speedup["recipe"],
        "torch_train_step_s": ref["train_step_s"], "jax_train_step_s": ours["train_step_s"],
        "jax_train_compile_s": ours["train_compile_s"],
        "torch_train_first_step_s": ref["train_first_step_s"],
        "sample_steps": SAMPLE_STEPS, "sample_batch": big,
        "torch_sample_images_per_s": big_sampling["torch_images_per_s"],
        "jax_sample_images_per_s_like_for_like": big_sampling["jax_images_per_s"][lfl],
        "jax_sample_images_per_s_recipe": big_sampling["jax_images_per_s"]["recipe"],
        "sample_speedup_like_for_like": big_sampling["speedup"][lfl],
        "sample_speedup_recipe": big_sampling["speedup"]["recipe"],
        "jax_sample_compile_s": big_sampling["jax_compile_s"],
        "sampling": sampling,
        "sample_all_devices": _all_devices_summary(ours["sample_all_devices"]),
        "train_tflops_per_sample": train["official"]["total"] / 1e12,
        "train_tflops_per_sample_recipe": train["recipe"]["total"] / 1e12,
        "train_dit_tflops_per_sample": train["official"]["dit_only"] / 1e12,
        "train_tflops_per_sample_by_part": {k: v / 1e12 for k, v in train["official"].items()},
        "train_tflops_per_sample_by_part_recipe": {k: v / 1e12
                                                   for k, v in train["recipe"].items()},
        "sample_tflops_per_image": sample_f["per_image"] / 1e12,
        "sample_tflops_by_part": {k: v / 1e12 for k, v in sample_f.items()},
        "xla_train_tflops_per_sample": {v: None if not xla[v] else xla[v] / batch / 1e12
                                        for v in VARIANTS},
        "jax_train_tflops_per_s": {v: times(jax_sps[v], train[v]["total"] / 1e12)
                                   for v in VARIANTS},
        "torch_train_tflops_per_s": (None if torch_sps is None
                                     else torch_sps * train["official"]["total"] / 1e12),
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": flops_lib.mfu(times(jax_sps[lfl], train[lfl]["total"]), peak),
        "mfu_recipe": flops_lib.mfu(times(jax_sps["recipe"], train["recipe"]["total"]), peak),
        "dit_mfu": flops_lib.mfu(times(jax_sps[lfl], train[lfl]["dit_only"]), peak),
        "torch_mfu": (None if torch_sps is None
                      else flops_lib.mfu(torch_sps * train["official"]["total"], peak)),
        "sample_mfu": big_sampling["jax_mfu"],
        "memory": {"jax_peak_bytes": ours["peak_bytes"], "torch_peak_bytes": ref["peak_bytes"]},
        "train_loss_finite": ours["train_loss_finite"] and ref["train_loss_finite"],
    }


def _all_devices_summary(timed: dict | None) -> dict | None:
    """Images/s over all local devices and per device (None with one device)."""
    if timed is None:
        return None
    rate = per_s(timed["images"], timed["seconds"])
    return {**timed, "images_per_s": rate,
            "images_per_s_per_device": None if rate is None else rate / timed["devices"]}


def recipe_train_flops_per_sample(config, prompt_tokens: int) -> dict:
    """`flops.train_flops_per_sample` at `prompt_tokens` with the latents read from a cache (no
    autoencoder encode)."""
    parts = dict(flops_lib.train_flops_per_sample(config, prompt_tokens))
    parts["total"] -= parts["vae_encode"]
    parts["vae_encode"] = 0.0
    return parts
