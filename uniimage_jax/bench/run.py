"""Training and sampling throughput of our JAX model against the official-style PyTorch model.

Both sides are built from one `BenchPreset` (the same architecture, each with its own random
weights: throughput does not depend on the values) and run in the same process on the same
device with the same shapes:

* training: our jitted `make_train_step` (split prompt, AdamW + clipping + spike skipping, the
  state donated) against `OfficialTBAC.loss` + backward through the whole prompt + torch AdamW
  (the official hyperparameters, grad clip 0.5) over the official trainable set (SANA, the
  connector, the resized embedding table whose original rows get zero gradients). fp32 on CPU,
  bf16 (our compute dtype / torch autocast) on GPU. Fresh noise and timesteps every step.
* sampling: 30 DPM-Solver++ steps with text CFG (2 guidance rows), the compiled conditioning and
  denoising loop of `uniimage_jax.sampling.sampler` against `OfficialTBAC.sample_latents`
  (diffusers' scheduler), for one image and for a batch.

Each measurement is a warm-up (for JAX: the compilation, reported apart), then the median of
several timed calls that block on their results. The PyTorch side runs first and releases its
device memory before the JAX side starts (JAX's allocator keeps what it takes); `reference=False`
skips it. Every measurement is handed to `emit` the moment it is taken (the CLI prints it as a
JSON line), so a run cut short keeps what finished. The JAX side of `tbac_3b` scans its layers
(compile time flat in depth); XLA's flop count of a scanned step counts one layer per stack, so
it is reported only for unrolled presets. Only JAX, flax, optax, orbax, transformers and numpy
are imported on the JAX side: it runs on an image without diffusers, grain or ml_collections.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable

import numpy as np

from uniimage_jax.bench import flops as flops_lib
from uniimage_jax.errors import ConfigError

DEVICES = ("cpu", "gpu")
SAMPLE_STEPS = 30
GUIDANCE = 4.5
TRAINABLE = ("dit/.*", "connector/.*", "metaquery/.*")


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    """A model size and its default benchmark shapes.

    mllm: keyword arguments of `processing.tiny.tiny_qwen_hf_config`, or "qwen2_5_vl_3b".
    sana: diffusers `SanaTransformer2DModel` kwargs. vae: diffusers `AutoencoderDC` kwargs or
    {"type": "pixel", "patch_size": p}.
    """

    name: str
    mllm: dict | str
    sana: dict
    vae: dict
    num_metaqueries: int
    image_size: int
    prompt_tokens: int       # padded prompt length (static shapes), queries and suffix included
    batch: int               # training batch
    sample_batch: int        # the larger sampling batch (the other is 1)
    steps: int               # timed training steps
    sample_repeats: int      # timed sampling calls per batch size
    scan_layers: bool = False  # the JAX side scans MLLM and DiT layers (flat compile time)


def _sana(width_heads: int, head_dim: int, layers: int, caption: int, channels: int,
          latent: int) -> dict:
    d = width_heads * head_dim
    return dict(in_channels=channels, out_channels=channels, num_attention_heads=width_heads,
                attention_head_dim=head_dim, num_layers=layers,
                num_cross_attention_heads=width_heads, cross_attention_head_dim=head_dim,
                cross_attention_dim=d, caption_channels=caption, mlp_ratio=2.5,
                attention_bias=False, sample_size=latent, patch_size=1,
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)


def _tiny_dc_ae(widths, latent_channels: int) -> dict:
    n = len(widths)
    types = ["ResBlock"] + ["EfficientViTBlock"] * (n - 1)
    scales = [[]] + [[5]] * (n - 1)
    return dict(in_channels=3, latent_channels=latent_channels, attention_head_dim=16,
                encoder_block_types=types, decoder_block_types=types,
                encoder_block_out_channels=list(widths), decoder_block_out_channels=list(widths),
                encoder_layers_per_block=[1] * n, decoder_layers_per_block=[1] * n,
                encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
                downsample_block_type="conv", upsample_block_type="interpolate",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)


PRESETS: dict[str, BenchPreset] = {
    # Seconds on a CPU: the tests' end-to-end run.
    "micro": BenchPreset(
        name="micro", mllm=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=48, vision_depth=1,
                                vision_hidden_size=16, vision_heads=1,
                                vision_intermediate_size=16, fullatt_block_indexes=(0,)),
        sana=_sana(2, 8, 2, 24, 12, 4), vae={"type": "pixel", "patch_size": 2},
        num_metaqueries=4, image_size=8, prompt_tokens=16, batch=2, sample_batch=2, steps=2,
        sample_repeats=1),
    # Between tiny and real, about a minute per side on a 2-core CPU: a 4-layer 256-wide MLLM,
    # a 4-block 256-wide ladder SANA on 16x16 latents of a small DC-AE (128 px, f8).
    "small": BenchPreset(
        name="small", mllm=dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=704),
        sana=_sana(8, 32, 4, 256, 16, 16), vae=_tiny_dc_ae((32, 64, 64, 128), 16),
        num_metaqueries=16, image_size=128, prompt_tokens=96, batch=4, sample_batch=4, steps=3,
        sample_repeats=1),
    # The published architecture with random weights (GPUs / TPUs): Qwen2.5-VL-3B, SANA-1600M,
    # DC-AE f32c32; the training config's 640-token prompt, the official 16 samples per GPU.
    "tbac_3b": BenchPreset(
        name="tbac_3b", mllm="qwen2_5_vl_3b", sana="sana_1600m_512", vae="dc_ae_f32c32",
        num_metaqueries=64, image_size=512, prompt_tokens=640, batch=16, sample_batch=8,
        steps=10, sample_repeats=3, scan_layers=True),
}


# ------------------------------------------------------------------------------ the models


def hf_qwen_config(c):
    """A transformers `Qwen2_5_VLConfig` for our `Qwen2_5_VLConfig` (round trip checked)."""
    from transformers import Qwen2_5_VLConfig as HFConfig

    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    v = c.vision_config
    hf = HFConfig(
        text_config=dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            max_position_embeddings=32768, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                             "mrope_section": list(c.mrope_section)},
            tie_word_embeddings=c.tie_word_embeddings),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, hidden_act="silu",
            intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            in_channels=v.in_channels, patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size, out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second),
        image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
        tie_word_embeddings=c.tie_word_embeddings)
    back = Qwen2_5_VLConfig.from_hf(hf.to_dict())
    ours = dataclasses.replace(c, scan_layers=False, remat=False)
    if back != ours:
        raise ValueError(f"the PyTorch Qwen2.5-VL config does not reproduce ours:\n{back}\n{ours}")
    return hf


@dataclasses.dataclass
class Built:
    preset: BenchPreset
    config: Any                    # UniImageConfig
    sana: dict                     # diffusers kwargs
    vae: dict                      # diffusers kwargs or pixel


def build(preset: BenchPreset) -> Built:
    """The JAX model config and the PyTorch constructor arguments of one preset."""
    from uniimage_jax.models.dc_ae import DCAEConfig
    from uniimage_jax.models.pixel_ae import PixelAEConfig
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from uniimage_jax.models.sana import SanaConfig
    from uniimage_jax.models.uniimage import UniImageConfig
    from uniimage_jax.processing import tiny

    if preset.mllm == "qwen2_5_vl_3b":
        mllm = Qwen2_5_VLConfig.qwen2_5_vl_3b()
    else:
        mllm = Qwen2_5_VLConfig.from_hf(tiny.tiny_qwen_hf_config(**preset.mllm).to_dict())
    if preset.sana == "sana_1600m_512":
        dit = SanaConfig.sana_1600m_512()
        sana = dit.to_diffusers()
    else:
        sana = dict(preset.sana)
        dit = SanaConfig.from_diffusers(sana)
    if preset.vae == "dc_ae_f32c32":
        vae = DCAEConfig.dc_ae_f32c32_sana_1_0()
        vae_kw = vae.to_dict()
    elif preset.vae.get("type") == "pixel":
        vae, vae_kw = PixelAEConfig.from_dict(preset.vae), dict(preset.vae)
    else:
        vae, vae_kw = DCAEConfig.from_diffusers(preset.vae), dict(preset.vae)
    if preset.scan_layers:
        mllm = dataclasses.replace(mllm, scan_layers=True)
        dit = dataclasses.replace(dit, scan_layers=True)
    config = UniImageConfig(mllm=mllm, dit=dit, vae=vae, num_metaqueries=preset.num_metaqueries,
                            ladder="official", image_size=preset.image_size, system_prompt=None)
    flops_lib.train_flops_per_sample(config, preset.prompt_tokens)  # validates the prompt length
    return Built(preset=preset, config=config, sana=sana, vae=vae_kw)


def synthetic_prompts(config, rows: int, prompt_tokens: int, seed: int):
    """(input_ids, attention_mask) int32 (rows, T): random prompt tokens, then
    <|vision_start|> metaqueries <|vision_end|> and one more token, no padding."""
    m = config.mllm
    n = config.num_metaqueries
    g = np.random.default_rng(seed)
    body = g.integers(0, min(m.vocab_size, m.vision_start_token_id), (rows, prompt_tokens - n - 3))
    tail = np.array([m.vision_start_token_id, *config.metaquery_token_ids,
                     m.vision_end_token_id, 0])
    ids = np.concatenate([body, np.broadcast_to(tail, (rows, n + 3))], axis=1).astype(np.int32)
    return ids, np.ones_like(ids)


def torch_model(built: Built, device: str, seed: int = 0):
    import torch

    from uniimage_jax.torch_reference import OfficialTBAC

    tm = OfficialTBAC(hf_qwen_config(built.config.mllm), built.sana, built.vae,
                      built.config.num_metaqueries, seed=seed)
    return tm.to("cuda" if device == "gpu" else "cpu")


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
    """The official-style PyTorch training step and sampling loop."""
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
    measured("torch", "train", batch, step_s, first_step_s=first)
    del opt, trainable
    tm.requires_grad_(False)
    s_ids, s_mask = synthetic_prompts(c, 2, p.prompt_tokens, seed=2)
    s_cond = {"input_ids": torch.from_numpy(s_ids).long().to(dev),
              "attention_mask": torch.from_numpy(s_mask).long().to(dev)}
    out["sample"] = {}
    for n in sample_batches:
        noise = torch.randn(n, ch, ls, ls, generator=g, device=dev)

        def sample():
            with autocast:
                return tm.sample_latents(s_cond, token_ids, noise, num_steps=SAMPLE_STEPS,
                                         guidance=GUIDANCE, image_guidance=1.0, k=2)
        _, latency, _ = _timed(sample, sync, warmup=1, repeats=repeats)
        out["sample"][n] = latency
        measured("torch", "sample", n, latency)
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "gpu" else None
    del tm
    gc.collect()
    if device == "gpu":
        torch.cuda.empty_cache()
    return out


def bench_jax(built: Built, device: str, batch: int, steps: int, sample_batches, repeats: int,
              measured=lambda *a, **k: None):
    """Our jitted training step and sampling loop."""
    import types

    import jax
    import jax.numpy as jnp

    from uniimage_jax.models.uniimage import UniImage, rope_positions
    from uniimage_jax.train.optimizer import (default_optimizer_config, make_optimizer,
                                              merge_params, partition_params)
    from uniimage_jax.train.trainer import TrainState, make_train_step

    c, p = built.config, built.preset
    dev = jax.devices(device)[0]
    dtype = jnp.bfloat16 if device == "gpu" else jnp.float32
    model = UniImage(c, dtype=dtype)
    block = jax.block_until_ready
    with jax.default_device(dev):
        params = jax.jit(model.init)(jax.random.PRNGKey(0))
        trainable, frozen = partition_params(params, TRAINABLE)
        # Frozen towers stored in the compute dtype (config.frozen_dtype), as the trainer does.
        frozen = jax.tree.map(lambda x: x.astype(dtype), frozen)
        tx = make_optimizer(default_optimizer_config(_AttrDict))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=jax.jit(tx.init)(trainable), rng=jax.random.PRNGKey(1))
        ids, mask = synthetic_prompts(c, batch, p.prompt_tokens, seed=1)
        pos = np.transpose(rope_positions(c, ids, mask), (1, 0, 2))  # prepare_batch layout
        g = np.random.default_rng(0)
        target = g.uniform(-1, 1, (batch, c.image_size, c.image_size, 3)).astype(np.float32)
        batch_arrays = jax.device_put({"input_ids": ids, "attention_mask": mask,
                                       "position_ids": pos.astype(np.int32), "target": target},
                                      dev)
        step_cfg = types.SimpleNamespace(task="t2i", split_prompt=True,
                                         timestep_sampling="uniform")
        t0 = time.perf_counter()
        compiled = jax.jit(make_train_step(model, tx, step_cfg), donate_argnums=(0,)).lower(
            state, frozen, batch_arrays).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        # XLA counts a scanned stack's body once: only an unrolled step's count is comparable.
        xla_flops = float(cost.get("flops", 0.0)) if cost and not p.scan_layers else None
        holder = {"state": state}
        del state

        def train_step():
            holder["state"], metrics = compiled(holder["state"], frozen, batch_arrays)
            return metrics

        _, step_s, metrics = _timed(train_step, block, warmup=1, repeats=steps)
        out = {"train_step_s": step_s, "train_compile_s": compile_s,
               "train_loss_finite": bool(np.isfinite(float(metrics["loss"]))),
               "xla_train_flops_per_step": xla_flops}
        measured("jax", "train", batch, step_s, compile_s=compile_s)
        params = merge_params(holder.pop("state").params, frozen)
        s_ids, s_mask = synthetic_prompts(c, 2, p.prompt_tokens, seed=2)
        s_pos = rope_positions(c, s_ids, s_mask)
        s_batch = jax.device_put({"input_ids": s_ids, "attention_mask": s_mask,
                                  "position_ids": s_pos}, dev)
        sample_fn = text_cfg_sampler(model)
        out["sample"], out["sample_compile_s"] = {}, {}
        for n in sample_batches:
            noise = jax.random.normal(jax.random.PRNGKey(n), (n, c.latent_size, c.latent_size,
                                                              c.dit.in_channels))

            def sample():
                return sample_fn(params, s_batch, noise)
            first, latency, _ = _timed(sample, block, warmup=1, repeats=repeats)
            out["sample"][n] = latency
            out["sample_compile_s"][n] = max(first - latency, 0.0)
            measured("jax", "sample", n, latency, compile_s=out["sample_compile_s"][n])
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        out["peak_bytes"] = (stats or {}).get("peak_bytes_in_use")
    return out


class _AttrDict(dict):
    """A mapping read by attribute, standing in for a ConfigDict where ml_collections is absent."""
    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def text_cfg_sampler(model):
    """What `uniimage_jax.sampling.sampler` runs for a text prompt: the compiled conditioning of
    the 2 guidance rows, then the compiled SAMPLE_STEPS DPM-Solver++ loop over the whole batch.
    (params, batch, noise) -> latents."""
    from uniimage_jax.sampling import sampler, schedulers

    key = sampler.static_model(model)
    scheduler = schedulers.DPMSolverMultistepScheduler.sana()

    def sample(params, batch, noise):
        ctx, mask = sampler.condition_rows(params, batch["input_ids"], batch["attention_mask"],
                                           batch["position_ids"], None, model_key=key, grid=None)
        return sampler.denoise(params, ctx, mask, noise, GUIDANCE, 1.0, model_key=key,
                               scheduler=scheduler, num_steps=SAMPLE_STEPS)

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

    log(f"[bench] preset {preset}: batch {batch}, prompt {p.prompt_tokens} tokens, "
        f"{c.image_size}px -> {c.latent_size}x{c.latent_size}x{c.dit.in_channels} latents, "
        f"device {jdev.device_kind}")
    train = flops_lib.train_flops_per_sample(c, p.prompt_tokens)
    peak = flops_lib.peak_flops(jdev.device_kind)

    def measured(side: str, what: str, n: int, seconds: float, **extra):
        if what == "train":
            rate, work = {"samples_per_s": n / seconds}, n * train["total"]
        else:
            work = flops_lib.sample_flops(c, p.prompt_tokens, num_steps=SAMPLE_STEPS,
                                          num_images=n)["total"]
            rate = {"images_per_s": n / seconds}
        emit({"preset": preset, "device": device, "device_kind": jdev.device_kind, "side": side,
              "measure": what, "batch": n, "seconds": seconds, **rate,
              "mfu": flops_lib.mfu(work / seconds, peak), **extra})

    ref = None
    if reference:
        log("[bench] PyTorch reference ...")
        ref = bench_torch(built, device, batch, steps, sample_batches, repeats, measured)
        log(f"[bench]   train step {ref['train_step_s']:.3f} s, sampling {ref['sample']}")
    log("[bench] JAX ...")
    ours = bench_jax(built, device, batch, steps, sample_batches, repeats, measured)
    log(f"[bench]   train step {ours['train_step_s']:.3f} s (compile {ours['train_compile_s']:.1f}"
        f" s), sampling {ours['sample']}")
    if ref is None:  # every reference figure (and ratio) reads as null
        ref = {"train_step_s": None, "train_first_step_s": None, "train_loss_finite": True,
               "sample": dict.fromkeys(sample_batches), "peak_bytes": None}

    def per_s(n, seconds):
        return None if seconds is None else n / seconds

    def ratio(a, b):
        return None if a is None or b is None else a / b

    jax_sps = batch / ours["train_step_s"]
    torch_sps = per_s(batch, ref["train_step_s"])
    big = sample_batches[-1]
    sampling = {}
    for n in sample_batches:
        f = flops_lib.sample_flops(c, p.prompt_tokens, num_steps=SAMPLE_STEPS, num_images=n)
        sampling[f"batch_{n}"] = {
            "jax_latency_s": ours["sample"][n], "torch_latency_s": ref["sample"][n],
            "jax_images_per_s": n / ours["sample"][n],
            "torch_images_per_s": per_s(n, ref["sample"][n]),
            "speedup": ratio(ref["sample"][n], ours["sample"][n]),
            "jax_compile_s": ours["sample_compile_s"][n], "tflops_per_call": f["total"] / 1e12,
            "jax_mfu": flops_lib.mfu(f["total"] / ours["sample"][n], peak)}
    sample_f = flops_lib.sample_flops(c, p.prompt_tokens, num_steps=SAMPLE_STEPS, num_images=big)
    xla = ours["xla_train_flops_per_step"]
    return {
        "preset": preset, "device": device, "device_kind": jdev.device_kind,
        "reference": reference, "layers": "scanned" if p.scan_layers else "unrolled",
        "batch": batch, "prompt_tokens": p.prompt_tokens, "image_size": c.image_size,
        "compute_dtype": "bfloat16" if device == "gpu" else "float32",
        "jax_train_samples_per_s": jax_sps, "torch_train_samples_per_s": torch_sps,
        "train_speedup": ratio(jax_sps, torch_sps),
        "jax_train_step_s": ours["train_step_s"], "torch_train_step_s": ref["train_step_s"],
        "jax_train_compile_s": ours["train_compile_s"],
        "torch_train_first_step_s": ref["train_first_step_s"],
        "sample_steps": SAMPLE_STEPS, "sample_batch": big,
        "jax_sample_images_per_s": sampling[f"batch_{big}"]["jax_images_per_s"],
        "torch_sample_images_per_s": sampling[f"batch_{big}"]["torch_images_per_s"],
        "sample_speedup": sampling[f"batch_{big}"]["speedup"],
        "jax_sample_compile_s": ours["sample_compile_s"][big],
        "sampling": sampling,
        "train_tflops_per_sample": train["total"] / 1e12,
        "train_dit_tflops_per_sample": train["dit_only"] / 1e12,
        "train_tflops_per_sample_by_part": {k: v / 1e12 for k, v in train.items()},
        "sample_tflops_per_image": sample_f["per_image"] / 1e12,
        "sample_tflops_by_part": {k: v / 1e12 for k, v in sample_f.items()},
        "xla_train_tflops_per_sample": None if not xla else xla / batch / 1e12,
        "jax_train_tflops_per_s": jax_sps * train["total"] / 1e12,
        "torch_train_tflops_per_s": None if torch_sps is None else torch_sps * train["total"] / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": flops_lib.mfu(jax_sps * train["total"], peak),
        "dit_mfu": flops_lib.mfu(jax_sps * train["dit_only"], peak),
        "torch_mfu": None if torch_sps is None else flops_lib.mfu(torch_sps * train["total"], peak),
        "sample_mfu": sampling[f"batch_{big}"]["jax_mfu"],
        "memory": {"jax_peak_bytes": ours["peak_bytes"], "torch_peak_bytes": ref["peak_bytes"]},
        "train_loss_finite": ours["train_loss_finite"] and ref["train_loss_finite"],
    }
