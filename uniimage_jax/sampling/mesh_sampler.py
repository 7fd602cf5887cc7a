"""Sampling over a mesh of one process's devices: each device denoises slots of its own.

`uniimage-sample` spreads its slots (a slot is one prompt's group of `images_per_call` samples)
over the devices of a `DeviceLayout`: a call runs `prompts_per_call` slots on every batch shard
of the mesh. The work of a call is the one of the single-device sampler (`sampler.py`), cut the
same way, so an image's bits never depend on the number of devices:

* Weights replicated (a mesh with only a data axis): the three compiled bodies of `sampler.py`
  (`condition_prompts`, `denoise_slots`, `decode_to_uint8`) run under `jax.shard_map`, so every
  device runs exactly the single-device program on its own slots, with nothing exchanged.
  Bitwise the same images on 1 device or many (tested on virtual CPU devices).
* Weights sharded (fsdp or tensor axes larger than 1: weights too large for one device, laid
  out by the training rules): the same bodies compiled by XLA's partitioner over the whole
  mesh, the batch split over the batch axes. Weight gathers and partial sums are XLA's choice
  there, so the images can differ from the replicated ones in the last bits.

A call conditions its prompts in rounds, one prompt per device per round (round s: slot s of
every device), so the conditioning is spread as the denoising is. Each prompt keeps the length
it was padded to alone (what its bits depend on); devices whose prompt has another length run a
copy of one that has it, and each keeps the result of its own prompt. The caller orders the
slots so that a round's prompts mostly share one length (`uniimage_jax.eval.sample_run`).

The compiled functions (`conditioner`, `denoiser`, `decoder`) are built from the layout and the
static settings only, so `uniimage-bench --aot --task sample` lowers the very functions this
module calls, with abstract inputs carrying the same shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uniimage_jax.sampling import sampler


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceLayout:
    """Where sampling runs: `mesh` (one process's devices), the mesh axes the slots are split
    over, and the weights' shardings (None: replicated on every device)."""
    mesh: Mesh
    batch_axes: tuple[str, ...]
    param_shardings: Any = None

    @property
    def replicated(self) -> bool:
        return self.param_shardings is None

    @property
    def shards(self) -> int:
        """Batch shards: devices that denoise slots of their own."""
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    def batch(self, axis: int = 0) -> NamedSharding:
        """Axis `axis` split over the batch axes, the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec(*(None,) * axis, self.batch_axes))

    def everywhere(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def weights(self, params):
        """`params` (host or device arrays) placed as this layout keeps them."""
        if self.replicated:
            return jax.device_put(params, self.everywhere())
        return jax.device_put(params, self.param_shardings)


def compile_over(body, layout: DeviceLayout, batch_axes_in: tuple, batch_axes_out, **static):
    """`body(params, *args, **static)` over `layout`: args whose entry in `batch_axes_in` is an
    axis number are split over the batch shards along that axis (None: replicated); the outputs
    are split along `batch_axes_out` (an axis or a tuple of axes, one per output)."""
    fn = functools.partial(body, **static)
    outs = batch_axes_out if isinstance(batch_axes_out, tuple) else (batch_axes_out,)

    def spec(axis):
        return PartitionSpec() if axis is None else PartitionSpec(*(None,) * axis,
                                                                   layout.batch_axes)
    out_specs = tuple(spec(a) for a in outs)
    out_specs = out_specs if isinstance(batch_axes_out, tuple) else out_specs[0]
    if layout.replicated:
        # The body is a single-device program with no collectives: each device runs it on its
        # own rows (loops may even stop at different steps), so there is nothing to check.
        mapped = jax.shard_map(fn, mesh=layout.mesh,
                               in_specs=(PartitionSpec(),) + tuple(spec(a) for a in batch_axes_in),
                               out_specs=out_specs, check_vma=False)
        return jax.jit(mapped)
    shardings = jax.tree.map(lambda s: NamedSharding(layout.mesh, s), out_specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.jit(fn, out_shardings=shardings)


def conditioner(layout: DeviceLayout, *, model_key, grid):
    """(params, input_ids, attention_mask (P, k, T), position_ids (P, 3, k, T), pixel_values)
    -> contexts (P, n_dit, k, N, C) and masks (P, k, N), one prompt per batch shard."""
    return compile_over(sampler.condition_prompts, layout, (0, 0, 0, 0), (0, 0),
                        model_key=model_key, grid=grid)


def denoiser(layout: DeviceLayout, *, model_key, scheduler, num_steps: int):
    """(params, ctx (S, ...), mask (S, ...), noise (S * n, h, w, c), guidance, image guidance)
    -> latents, `S / shards` slots per batch shard."""
    return compile_over(sampler.denoise_slots, layout, (0, 0, 0, None, None), 0,
                        model_key=model_key, scheduler=scheduler, num_steps=num_steps)


def decoder(layout: DeviceLayout, *, model_key):
    """(params, latents (B, h, w, c)) -> uint8 images (B, H, W, 3), B / shards per shard."""
    return compile_over(sampler.decode_to_uint8, layout, (0,), 0, model_key=model_key)


def _slot_major(rounds):
    """Round s's (D, ...) results -> (D * S, ...): device d's S slots contiguous (axis 0 keeps
    its split over the devices: nothing moves)."""
    stacked = jnp.stack(rounds, axis=1)
    return stacked.reshape(stacked.shape[0] * stacked.shape[1], *stacked.shape[2:])


def _slot_major_over(layout: DeviceLayout, *, model_key):
    """`_slot_major` of every (contexts, masks) output of the rounds, split as the denoiser
    takes them."""
    del model_key
    return jax.jit(lambda rounds: jax.tree.map(lambda *r: _slot_major(r), *rounds),
                   out_shardings=layout.batch())


@jax.jit
def _keep_where(mine, new, old):
    """Per shard: `new` where this shard's prompt is the one just conditioned, else `old`."""
    return jax.tree.map(lambda a, b: jnp.where(mine.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                        new, old)


_SHARED: dict = {}


class MeshSampler:
    """Compiled sampling calls over a `DeviceLayout` (one process's devices).

    `sample(slots)` takes up to `slots_per_call` (EncodedPrompt, group) pairs and returns their
    uint8 images, `images_per_call` per slot in order; sample i of a slot of group g starts from
    the noise of `fold_in(PRNGKey(seed), g * images_per_call + i)`, as in `sampler.py`."""

    def __init__(self, model, params, layout: DeviceLayout, cfg: sampler.SamplingConfig, *,
                 seed: int, height: int | None = None, width: int | None = None):
        self.model, self.layout, self.cfg, self.seed = model, layout, cfg, seed
        self.params = params
        self.shape = sampler.latent_shape(model.config, height, width)
        self.key = sampler.static_model(model)
        self.slots_per_call = layout.shards * cfg.prompts_per_call
        self._functions: dict = {}
        self._noise = np.zeros((0, *self.shape), np.float32)
        self._guidance = (jnp.float32(cfg.guidance_scale), jnp.float32(cfg.image_guidance_scale))

    def _function(self, kind: str, **static):
        name = (kind, self.key, tuple(sorted(static.items())))
        # Replicated layouts share their compiled functions across samplers on the same mesh
        # (a notebook or a test sampling again does not trace again).
        store = self._functions
        if self.layout.replicated:
            store = _SHARED.setdefault((self.layout.mesh, self.layout.batch_axes), {})
        if name not in store:
            build = {"condition": conditioner, "denoise": denoiser, "decode": decoder,
                     "slot_major": _slot_major_over}[kind]
            store[name] = build(self.layout, model_key=self.key, **static)
        return store[name]

    def _group_noise(self, group: int) -> np.ndarray:
        n = self.cfg.images_per_call
        if self._noise.shape[0] < (group + 1) * n:
            self._noise = np.asarray(sampler.initial_noise(self.seed, (group + 1) * n,
                                                           self.shape))
        return self._noise[group * n:(group + 1) * n]

    def _condition(self, prompts: list[sampler.EncodedPrompt]):
        """Contexts and masks of one prompt per batch shard, each padded as it was alone."""
        result, pending = None, list(range(len(prompts)))
        batch = self.layout.batch()
        while pending:
            first = prompts[pending[0]]
            mine = np.array([p.shape_key == first.shape_key for p in prompts])
            # Shards whose prompt has another length run a copy of this one (dropped below).
            rows = [p if m else first for p, m in zip(prompts, mine)]
            args = [jax.device_put(np.stack([getattr(p, f) for p in rows]), batch)
                    for f in ("input_ids", "attention_mask", "position_ids")]
            pixels = None if first.grid is None else jax.device_put(
                np.stack([p.pixel_values for p in rows]), batch)
            out = self._function("condition", grid=first.grid)(self.params, *args, pixels)
            result = out if result is None else _keep_where(jax.device_put(mine, batch), out,
                                                            result)
            pending = [i for i in pending if not mine[i]]
        return result

    def sample(self, slots: list[tuple[sampler.EncodedPrompt, int]]) -> np.ndarray:
        """uint8 images (len(slots) * images_per_call, H, W, 3) of up to `slots_per_call`
        slots; a short call is filled with copies of its last slot (results dropped)."""
        if not 0 < len(slots) <= self.slots_per_call:
            raise ValueError(f"a call takes 1..{self.slots_per_call} slots, got {len(slots)}")
        count = len(slots)
        slots = list(slots) + [slots[-1]] * (self.slots_per_call - count)
        shards, per = self.layout.shards, self.cfg.prompts_per_call
        # Slot d * per + s runs on shard d; round s conditions slot s of every shard.
        rounds = [self._condition([slots[d * per + s][0] for d in range(shards)])
                  for s in range(per)]
        ctx, mask = self._function("slot_major")(rounds)
        noise = jax.device_put(np.concatenate([self._group_noise(g) for _, g in slots]),
                               self.layout.batch())
        latents = self._function("denoise", scheduler=self.cfg.make_scheduler(),
                                 num_steps=self.cfg.num_steps)(
            self.params, ctx, mask, noise, *self._guidance)
        pixels = self._function("decode")(self.params, latents)
        return np.asarray(pixels)[:count * self.cfg.images_per_call]
