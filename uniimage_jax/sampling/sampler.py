"""Jit-compiled sampling with classifier-free guidance, as the official `sample_images`.

Three compiled functions do the work: the MLLM conditioning of a prompt's guidance rows (once
per prompt), the whole denoising loop as one `lax.fori_loop` (once per call of
`prompts_per_call` slots, a slot being one prompt's group of `images_per_call` samples), and the
autoencoder's decoding of a call's worth of images (`decode_batch`). Inside a call, the DiT's
caption projection and norm and every block's cross-attention keys and values are computed
once, before the loop (they depend on the prompt only), and the samples of a slot share them.
Their bodies (`condition_prompts`, `denoise_slots`, `decode_to_uint8`) are also what
`mesh_sampler` runs on every device of a mesh; everything in them is slot-major (a slot's rows
are contiguous and never mix with another slot's), so a call's slots split over devices with
nothing to exchange.

Compute dtype (`default_compute_dtype`): bfloat16 on GPUs and TPUs, float32 on CPUs; parameters
stay float32 and the parity tests run in float32.

Guidance rows (official order):
* text only: [negative prompt, caption]; v = u + s (c - u)
* text + image: [(negative, black image), (negative, image), (caption, image)];
  v = u + s_img (u_img - u) + s (c - u_img)
* text + image with image guidance exactly 1, where the black-image row cancels out:
  [(negative, image), (caption, image)]; v = u_img + s (c - u_img), one row fewer to run

Seeds: the initial noise of sample i of a prompt is drawn from `fold_in(PRNGKey(seed), i)`, and
sample i is always denoised in group i // images_per_call at place i % images_per_call (a short
last group is filled with the noise of the following indices, whose results are dropped), so its
arithmetic is bitwise the same for any number of images. Rows of different slots never mix
(every op is per row or per slot), and a call always has `prompts_per_call` slots (a short last
one filled with copies of its last slot), so a slot's images are bitwise the same whichever call
and place it lands in: alone or among other prompts (tested). Decoding likewise runs fixed-size
chunks (`latents_to_uint8` says why). Each prompt is conditioned on its own,
left-padded to a length that depends on that prompt only (`max_prompt_tokens`, or its own length
rounded up to a multiple of `prompt_bucket`), so an image is bitwise the same whether its prompt
came alone or in a file of many, and a file of prompts compiles once per length bucket. An image
therefore depends on (prompt, input image, seed, sample index) only, for given settings
(steps, guidance, dtype, images_per_call, prompts_per_call).

Size: square `image_size` by default; any (height, width) that are multiples of the model's
`pixel_multiple` otherwise (the latents are (height, width) / the autoencoder's factor). With
resolution binning (`binned_size`, the CLI's default) a requested size is snapped to the nearest
aspect-ratio bin of the model's size and the decoded images resized and centre-cropped back to
the size asked for, as diffusers' SANA pipeline does (`use_resolution_binning`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from uniimage_jax.errors import ConfigError, UserError
from uniimage_jax.models.uniimage import UniImage, rope_positions
from uniimage_jax.processing.prompts import build_generation_inputs, left_pad, prompt_name
from uniimage_jax.diffusion import schedulers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = 30
    guidance_scale: float = 4.5          # official: 3.0 (training eval), 7.5 (pipeline), 4.5 (demo)
    image_guidance_scale: float = 1.5
    scheduler: str = "dpm_solver"       # or "euler"
    negative_prompt: str = ""
    # Pad every prompt to this length (None: bucketed); a longer caption is cut to fit, with a
    # warning, exactly as in training (processing/prompts.py).
    max_prompt_tokens: int | None = None
    prompt_bucket: int = 64              # without max_prompt_tokens: round lengths up to this
    # Samples denoised together. Fixed (not the number asked for) so that sample i never depends
    # on how many were sampled with it; 4 = GenEval's and DPG-Bench's count per prompt.
    images_per_call: int = 4
    # Groups of images_per_call samples (of one prompt or several) denoised by one compiled call:
    # more rows per call keep an accelerator busy; on a CPU 1 does no filler work.
    prompts_per_call: int = 1

    def __post_init__(self):
        # Every caller (CLI, trainer's sample grids, demo, library users) gets these checks: a NaN
        # guidance scale would silently write black images, a negative one inverts guidance.
        for name in ("num_steps", "images_per_call", "prompts_per_call", "prompt_bucket"):
            _check_positive_int(name, getattr(self, name))
        if self.max_prompt_tokens is not None:
            _check_positive_int("max_prompt_tokens", self.max_prompt_tokens)
        for name in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating,
                                                                  np.integer))
                    or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        self.make_scheduler()  # rejects an unknown scheduler name now, not after loading

    def prompt_length(self, length: int) -> int:
        """The padded length of a prompt of `length` tokens (depends on that prompt only)."""
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens
        return -(-length // self.prompt_bucket) * self.prompt_bucket

    @property
    def decode_batch(self) -> int:
        """Images decoded together: a denoising call's worth."""
        return self.images_per_call * self.prompts_per_call

    def make_scheduler(self):
        if self.scheduler == "dpm_solver":
            return schedulers.DPMSolverMultistepScheduler.sana()
        if self.scheduler == "euler":
            return schedulers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        raise ConfigError(f"unknown scheduler {self.scheduler!r}: expected 'dpm_solver' or 'euler'")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be >= 1 (an integer), got {value!r}")


def guidance_rows(caption: str, image, cfg: SamplingConfig):
    """(captions, per-row image lists or None, number of rows k) in the official order."""
    neg = cfg.negative_prompt
    if image is None:
        return [neg, caption], None, 2
    if cfg.image_guidance_scale != 1.0:
        black = Image.new("RGB", image.size)
        return [neg, neg, caption], [[black], [image], [image]], 3
    return [neg, caption], [[image], [image]], 2


def combine_guidance(v, k: int, guidance: float, image_guidance: float):
    """v: (k * n, ...) velocities of the k guidance rows (row-major: row r is v[r*n:(r+1)*n])."""
    return guided(jnp.split(v, k, axis=0), guidance, image_guidance)


def guided(parts, guidance: float, image_guidance: float):
    """The guided velocity from the velocities of the k guidance rows, in the official order."""
    if len(parts) == 2:
        u, c = parts
        return u + guidance * (c - u)
    u, u_img, c = parts
    return u + image_guidance * (u_img - u) + guidance * (c - u_img)


def initial_noise(seed: int, num_images: int, shape) -> jax.Array:
    """(num_images, *shape) float32; sample i from fold_in(PRNGKey(seed), i)."""
    key = jax.random.PRNGKey(seed)
    return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                      for i in range(num_images)])


def default_compute_dtype() -> str:
    """'bfloat16' on accelerators (GPU, TPU), 'float32' on CPUs: where the published weights were
    trained in bf16 and the chips are built for it; CPUs have no fast bf16 matmul, and fp32 is
    what the parity tests compare."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def static_model(model: UniImage):
    """(config, dtype): what the compiled functions are keyed on, so that loading the same
    checkpoint twice (a CLI run per test, a reloaded notebook) reuses the compilation."""
    return model.config, jnp.dtype(model.dtype).name


def _model(model_key) -> UniImage:
    config, dtype = model_key
    return UniImage(config, dtype=jnp.dtype(dtype))


def condition_prompts(params, input_ids, attention_mask, position_ids, pixel_values, *,
                      model_key, grid):
    """Ladder contexts (P, n_dit, k, N, C) and masks (P, k, N) of P prompts' k guidance rows each,
    from input_ids and attention_mask (P, k, T), position_ids (P, 3, k, T) and, with an input
    image, pixel_values (P, k * patches, D) and `grid` the k rows' image grids: the body that
    `condition_rows` compiles for one prompt and `mesh_sampler` for one prompt per device."""
    prompts, k, t = input_ids.shape
    batch = {"input_ids": input_ids.reshape(prompts * k, t),
             "attention_mask": attention_mask.reshape(prompts * k, t),
             "position_ids": position_ids.transpose(1, 0, 2, 3).reshape(3, prompts * k, t)}
    if grid is not None:
        batch.update(pixel_values=pixel_values.reshape(-1, pixel_values.shape[-1]),
                     image_grid_thw=tuple(grid) * prompts)
    ctx, mask = _model(model_key).condition(params, batch, split_prompt=False)
    n_dit, _, tokens, channels = ctx.shape
    return (ctx.reshape(n_dit, prompts, k, tokens, channels).transpose(1, 0, 2, 3, 4),
            mask.reshape(prompts, k, tokens))


@functools.partial(jax.jit, static_argnames=("model_key", "grid"))
def condition_rows(params, input_ids, attention_mask, position_ids, pixel_values, *, model_key,
                   grid):
    """Ladder context (n_dit, k, N, C) and mask (k, N) of one prompt's k guidance rows (compiled
    once per prompt length and image grid). `model_key` is `static_model(model)`."""
    ctx, mask = condition_prompts(
        params, input_ids[None], attention_mask[None], position_ids[None],
        None if pixel_values is None else pixel_values[None], model_key=model_key, grid=grid)
    return ctx[0], mask[0]


def denoise_slots(params, ctx, mask, noise, guidance, image_guidance, *, model_key, scheduler,
                  num_steps: int):
    """The whole denoising loop for one call of S slots, noise (S * n, h, w, c) -> latents:
    slot s (samples s*n .. s*n + n - 1) is guided by its k rows ctx[s] (S, n_dit, k, N, C) and
    mask[s] (S, k, N) from `condition_prompts`. Everything is slot-major (the slot is the leading
    axis of every input, output and intermediate batch), so S slots split over devices are S / D
    independent slots on each, with nothing to exchange."""
    model = _model(model_key)
    slots, n_dit, k, tokens, channels = ctx.shape
    n = noise.shape[0] // slots
    # Velocity rows are ordered (slot s, guidance row r, sample i): the n samples of context
    # s * k + r are consecutive, so the DiT shares that context's keys and values among them
    # (row r of a slot is guidance row r, as torch's repeat_interleave officially). The
    # contexts' projections and keys/values are computed here, once, not at every step.
    context = model.precompute_context(
        params, ctx.transpose(1, 0, 2, 3, 4).reshape(n_dit, slots * k, tokens, channels),
        mask.reshape(slots * k, tokens))
    schedule = scheduler.make_schedule(num_steps)
    state = scheduler.init_state(noise)
    latent = noise.shape[1:]

    def body(i, carry):
        x, st = carry
        t = schedulers.model_timestep(schedule, i, slots * k * n)
        rows = jnp.broadcast_to(x.reshape(slots, 1, n, *latent), (slots, k, n, *latent))
        v = model.velocity(params, rows.reshape(slots * k * n, *latent), t, context)
        v = v.astype(jnp.float32).reshape(slots, k, n, *latent)
        v = guided([v[:, r] for r in range(k)], guidance, image_guidance)
        return scheduler.step(schedule, st, v.reshape(slots * n, *latent), x, i)

    latents, _ = jax.lax.fori_loop(0, num_steps, body, (noise, state))
    return latents


denoise = jax.jit(denoise_slots, static_argnames=("model_key", "scheduler", "num_steps"))


def latent_shape(config, height: int | None = None, width: int | None = None):
    """(h, w, c) latents of a (height, width) image (default: square image_size); an error
    naming the multiple when the size does not divide into whole latent patches."""
    height = config.image_size if height is None else int(height)
    width = config.image_size if width is None else int(width)
    m = config.pixel_multiple
    if height < 1 or width < 1 or height % m or width % m:
        raise UserError(f"image size {height}x{width} (height x width) must be positive "
                         f"multiples of {m} (this model's autoencoder factor x DiT patch size)")
    f = config.vae_downsample
    return height // f, width // f, config.dit.in_channels


def binned_size(config, height: int, width: int, bins: str = "sana_512") -> tuple[int, int]:
    """The (height, width) of the aspect-ratio bin nearest to height x width, the bins scaled to
    the model's image size (`uniimage_jax.data.buckets`)."""
    from uniimage_jax.data.buckets import make_bucket_set

    return make_bucket_set(bins, config.image_size, config.pixel_multiple).snap(height, width)


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's k guidance rows as the conditioning takes them (host arrays): input_ids and
    attention_mask (k, T), M-RoPE position_ids (3, k, T), and with an input image its
    pixel_values (k * patches, D) and the rows' image grids (static: part of the compiled
    shape, with T)."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    pixel_values: np.ndarray | None
    grid: tuple | None

    @property
    def shape_key(self) -> tuple:
        """What the compiled conditioning depends on: prompts sharing it run in one call."""
        return self.input_ids.shape, self.grid


def encode_prompt(model: UniImage, processor, caption: str, image,
                  cfg: SamplingConfig) -> EncodedPrompt:
    """One prompt's guidance rows, encoded and padded on their own (so they never depend on the
    other prompts of a file)."""
    c = model.config
    captions, images, k = guidance_rows(caption, image, cfg)
    # Prompt length as in training: a caption longer than max_caption_tokens, or than what fits
    # in max_prompt_tokens, is cut, with a warning naming it (never silently).
    names = ["the negative prompt"] * (k - 1) + [prompt_name(caption)]  # caption row last
    enc = build_generation_inputs(processor, captions, images, num_metaqueries=c.num_metaqueries,
                                  system_prompt=c.system_prompt,
                                  max_caption_tokens=c.max_caption_tokens,
                                  pad_to=cfg.max_prompt_tokens, names=names)
    enc.update(left_pad(enc["input_ids"], enc["attention_mask"],
                        cfg.prompt_length(enc["input_ids"].shape[1]),
                        processor.tokenizer.pad_token_id))
    grid = enc.get("image_grid_thw")
    pos = rope_positions(c, enc["input_ids"], enc["attention_mask"], grid)
    pixels = enc.get("pixel_values")
    return EncodedPrompt(np.asarray(enc["input_ids"], np.int32),
                         np.asarray(enc["attention_mask"], np.int32), np.asarray(pos, np.int32),
                         None if pixels is None else np.asarray(pixels, np.float32),
                         None if grid is None else tuple(tuple(int(v) for v in g) for g in grid))


def condition_prompt(model: UniImage, params, processor, caption: str, image,
                     cfg: SamplingConfig):
    """Ladder contexts (n_dit, k, N, C) and mask (k, N) of one prompt's k guidance rows."""
    e = encode_prompt(model, processor, caption, image, cfg)
    return condition_rows(params, e.input_ids, e.attention_mask, e.position_ids, e.pixel_values,
                          model_key=static_model(model), grid=e.grid)


def _group_noise(noise, num_images: int, seed: int, group: int, shape):
    """(noise for whole groups of `group` samples, number of images asked for)."""
    if noise is None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        # Noise for whole groups; the extra samples of a short last group are dropped.
        return initial_noise(seed, -(-num_images // group) * group, shape), num_images
    if noise.ndim != 4 or tuple(noise.shape[1:]) != shape:
        raise ValueError(f"noise must have shape (n, {shape[0]}, {shape[1]}, {shape[2]}) "
                         f"(NHWC latents), got {tuple(noise.shape)}")
    fill = -noise.shape[0] % group
    return jnp.concatenate([jnp.asarray(noise, jnp.float32),
                            jnp.zeros((fill, *shape), jnp.float32)]), noise.shape[0]


def sample_prompts_latents(model: UniImage, params, processor, captions, image=None, *,
                           num_images: int = 1, seed: int = 0,
                           cfg: SamplingConfig = SamplingConfig(), noise=None,
                           height: int | None = None, width: int | None = None) -> list:
    """Latents (num_images, h, w, c) for each caption (with the optional PIL input image) of an
    image of height x width pixels (default: square image_size); with `noise` (n, h, w, c)
    given, n images from it instead of from `seed`.

    The work is cut into slots, one per (prompt, group of `images_per_call` samples), and each
    compiled call denoises `prompts_per_call` slots; a short last call is filled with copies of
    its last slot, whose results are dropped. A slot's rows never mix with another's, so its
    images are bitwise the same in any slot of any call (tested)."""
    shape = latent_shape(model.config, height, width)
    group, per_call = cfg.images_per_call, cfg.prompts_per_call
    noise, num_images = _group_noise(noise, num_images, seed, group, shape)
    groups = noise.shape[0] // group
    conditions = [condition_prompt(model, params, processor, caption, image, cfg)
                  for caption in captions]
    guidance = (jnp.float32(cfg.guidance_scale), jnp.float32(cfg.image_guidance_scale))
    slots = [(p, g) for p in range(len(captions)) for g in range(groups)]
    done = {}
    for start in range(0, len(slots), per_call):
        call = slots[start:start + per_call]
        filled = call + call[-1:] * (per_call - len(call))
        ctx = jnp.stack([conditions[p][0] for p, _ in filled])
        mask = jnp.stack([conditions[p][1] for p, _ in filled])
        x = jnp.concatenate([noise[g * group:(g + 1) * group] for _, g in filled])
        latents = denoise(params, ctx, mask, x, *guidance, model_key=static_model(model),
                          scheduler=cfg.make_scheduler(), num_steps=cfg.num_steps)
        for j, slot in enumerate(call):
            done[slot] = latents[j * group:(j + 1) * group]
    return [jnp.concatenate([done[p, g] for g in range(groups)])[:num_images]
            for p in range(len(captions))]


def sample_latents(model: UniImage, params, processor, caption: str, image=None,
                   **kw) -> jax.Array:
    """Latents (num_images, h, w, c) for one prompt (`sample_prompts_latents`' arguments)."""
    return sample_prompts_latents(model, params, processor, [caption], image, **kw)[0]


def latents_to_uint8(model: UniImage, params, latents, *, batch: int = 1) -> np.ndarray:
    """Decode and map [-1, 1] -> uint8 as the official `decode_latents` (x/2 + 0.5, clamp).

    `batch` images per compiled call (`SamplingConfig.decode_batch`: a sampling call's worth),
    a short last chunk filled with copies of its last latent. The chunk size is fixed because
    XLA's convolutions give bits that depend on the batch size (last-place differences, seen on
    CPU) though not on an image's place in the batch: so an image's pixels never depend on how
    many were decoded with it, and one compilation serves every count."""
    key = static_model(model)
    out = []
    for i in range(0, latents.shape[0], batch):
        chunk = latents[i:i + batch]
        count = chunk.shape[0]
        chunk = jnp.concatenate([chunk] + [chunk[-1:]] * (batch - count))
        out.append(np.asarray(_decode(params, chunk, model_key=key))[:count])
    return np.concatenate(out)


def decode_to_uint8(params, latents, *, model_key):
    """(B, H, W, 3) uint8 images of B latents: the body `latents_to_uint8` compiles for a chunk
    and `mesh_sampler` for each device's chunk (the pixels leave the device as bytes)."""
    x = _model(model_key).decode_latents(params, latents)
    return jnp.round(jnp.clip(x / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


_decode = jax.jit(decode_to_uint8, static_argnames=("model_key",))


def generate_prompts(model: UniImage, params, processor, captions, image=None, *,
                     output_size: tuple[int, int] | None = None,
                     cfg: SamplingConfig = SamplingConfig(), **kw) -> list[list[Any]]:
    """PIL images for each caption (`sample_prompts_latents`' arguments); with `output_size`
    (height, width), each decoded image is resized to cover it and centre-cropped (the way back
    from a binned size)."""
    from uniimage_jax.data.images import resize_cover_crop

    latents = sample_prompts_latents(model, params, processor, captions, image, cfg=cfg, **kw)
    pixels = latents_to_uint8(model, params, jnp.concatenate(latents), batch=cfg.decode_batch)
    if output_size is not None and tuple(output_size) != pixels.shape[1:3]:
        pixels = [resize_cover_crop(a, *output_size) for a in pixels]
    images = [Image.fromarray(a) for a in pixels]
    starts = np.cumsum([0] + [x.shape[0] for x in latents])
    return [images[a:b] for a, b in zip(starts[:-1], starts[1:])]


def generate(model: UniImage, params, processor, caption: str, image=None, **kw) -> list[Any]:
    """PIL images for one prompt (`generate_prompts`' arguments)."""
    return generate_prompts(model, params, processor, [caption], image, **kw)[0]
