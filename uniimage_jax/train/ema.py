"""Exponential moving average (EMA) of the trainable parameters, kept in the train state.

`config.ema` (off by default; see `default_ema_config`):

    enabled      keep an EMA (another fp32 copy of the trainable tree, sharded like it)
    decay        ema <- decay * ema + (1 - decay) * params
    start_step   until this optimiser step (inclusive) the EMA is a copy of the parameters
    every_steps  afterwards, update on steps that are multiples of this (others leave it as is)

Off by default because the official recipe has none: turning it on changes neither the loss nor
the parameters, but it costs one more fp32 copy of the trainable tree (6.4 GB for the 1.6B DiT,
sharded like the parameters) and a read-modify-write of it every step.

Step semantics. `step` is the optimiser step just taken (1 after the first update; the count
includes skipped steps, as `TrainState.step` does). A step that spike skipping skipped leaves
the EMA bitwise unchanged (`jnp.where` selects the old values, so -0.0 and NaN payloads stay too),
as it leaves the parameters and the optimiser state. The update is
`decay * ema + (1 - decay) * params` in fp32, both factors rounded to fp32 once and each product
rounded before the sum: XLA would otherwise fuse one product and the sum into a fused
multiply-add where it sees fit (it does on CPU), and the EMA would then depend on fusion choices
(backend, sharding) rather than on the parameters alone. Rounded this way it is reproducible, and
the test recomputes it in numpy bit for bit. The trainer runs it as its own jitted call right
after the train step (`make_state_update`).

Checkpoints. The EMA is the train state's `ema` entry, saved and restored with the rest (strict).
A stage whose checkpoints hold no EMA (saved with `enabled=False`) resumed with `enabled=True`
starts its EMA from the current parameters, and says so in the log: the alternative, refusing,
would strand every run that started before the EMA existed. The reverse (a checkpoint with an
EMA resumed with `enabled=False`) drops it with a warning. Which weights samplers use is decided
by `uniimage_jax.checkpoints.loader` (the EMA when a stage has one, unless raw weights are asked for).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from uniimage_jax.checkpoints.stage import EMA_KEY
from uniimage_jax.errors import UserError

log = logging.getLogger("uniimage_jax.train")


def default_ema_config():
    """The `config.ema` group (an `ml_collections.ConfigDict`, imported here: the trainer is also
    imported by the benchmark on hosts without ml_collections)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.enabled = False       # off: the official recipe has no EMA (module docstring)
    c.decay = 0.9999        # per update (a common choice for diffusion transformers)
    c.start_step = 0        # the EMA copies the parameters up to this step
    c.every_steps = 1       # update on multiples of this step afterwards
    return c


def check_config(c) -> None:
    if not c.enabled:
        return
    if not 0.0 <= c.decay < 1.0:
        raise UserError(f"config.ema.decay must be in [0, 1), got {c.decay}")
    if c.start_step < 0:
        raise UserError(f"config.ema.start_step must be >= 0, got {c.start_step}")
    if c.every_steps < 1:
        raise UserError(f"config.ema.every_steps must be >= 1, got {c.every_steps}")


def init(params) -> Any:
    """A fresh fp32 copy of `params` (jax arrays): new buffers with the same shardings."""
    copy = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(x.astype(jnp.float32)), p),
                   out_shardings=jax.tree.map(lambda x: x.sharding, params))
    return copy(params)


def update(ema, params, step, skipped, c, opaque_zero) -> Any:
    """The EMA after optimiser step `step` (traced int) produced `params`; `skipped` (traced
    bool) is whether spike skipping skipped that step. `opaque_zero`: a uint32 zero passed in as
    an operand (`jnp.zeros((), jnp.uint32)`), which the compiler therefore cannot fold: each
    product's bits go through an integer xor with it, so the add that follows cannot be fused
    with the multiplies into a fused multiply-add (module docstring). A zero derived from `step`
    would not do: once the loop is specialised on the step's conditions, the compiler can prove
    it zero."""
    decay = jnp.float32(c.decay)
    rest = jnp.float32(1.0 - c.decay)
    copy = step <= c.start_step
    due = (step % c.every_steps) == 0

    def rounded(x):
        bits = lax.bitcast_convert_type(x, jnp.uint32) ^ opaque_zero
        return lax.bitcast_convert_type(bits, jnp.float32)

    def one(e, p):
        p = p.astype(jnp.float32)
        averaged = rounded(decay * e) + rounded(rest * p)
        new = jnp.where(copy, p, jnp.where(due, averaged, e))
        return jnp.where(skipped, e, new)

    return jax.tree.map(one, ema, params)


def make_state_update(c):
    """`fn(state, opaque_zero) -> state` applying `update` to a train state just returned by the
    train step (its `step` is the step taken, its optimiser state says whether that step was
    skipped). Call it with `opaque_zero=jnp.zeros((), jnp.uint32)` (see `update`).

    Jitted on its own, after the train step, rather than inside it: inside, XLA may recompute the
    new parameters within the EMA's fusion instead of reading them, and a recomputation may round
    differently (a fused multiply-add in one place and not in the other), so the EMA would not be
    an average of exactly the parameters the step returned."""
    from uniimage_jax.train.optimizer import skipped_step

    def state_update(state, opaque_zero):
        return state.replace(ema=update(state.ema, state.params, state.step,
                                        skipped_step(state.opt_state), c, opaque_zero))
    return state_update


def resume(state, stored_keys, c, restore):
    """Restore a train state whose checkpoint may or may not hold an EMA (module docstring).

    `state`: the freshly initialised state (with `ema` set iff `c.enabled`); `stored_keys`: the
    top-level keys of the checkpoint's state; `restore(abstract_state)` restores a state shaped
    like its argument. Returns (state, data_state).
    """
    stored = EMA_KEY in stored_keys
    if stored == bool(c.enabled):
        restored, data_state, _ = restore(state)
        return restored, data_state
    if c.enabled:  # no EMA in the checkpoint: restore without, then start one
        restored, data_state, _ = restore(state.replace(ema=None))
        log.info("config.ema.enabled: the checkpoint at step %d has no EMA; it starts from the "
                 "current parameters", int(restored.step))
        return restored.replace(ema=init(restored.params)), data_state
    restored, data_state, _ = restore(state.replace(ema=state.params))
    log.warning("the checkpoint at step %d holds an EMA but config.ema.enabled is False: the EMA "
                "is dropped and later checkpoints have none", int(restored.step))
    return restored.replace(ema=None), data_state
