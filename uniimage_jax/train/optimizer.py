"""The optimiser of TBAC-UniImage training: clipped AdamW on a warm-up + cosine schedule, and loss /
gradient spike skipping. It is initialised on the trainable tree only
(`uniimage_jax.checkpoints.partition`).

Official recipe (TBAC-UniImage's training scripts): AdamW lr 1e-4, weight decay 0.05 (decoupled,
as torch.AdamW and optax.adamw do it), betas (0.9, 0.999), eps 1e-8, global-norm clipping at 0.5,
5000 linear warm-up steps then cosine decay to 1e-5.

Spike skipping. The official trainer keeps EMAs of the loss and of the gradient norm and is
meant to skip the step on a spike, but under DeepSpeed the step has already happened when the
check runs, so it skips nothing. Ours is an optax `GradientTransformationExtraArgs` wrapped around
the whole inner chain (taking `loss=` as an extra argument), decided on device: the inner update
is computed and then selected against the unchanged state, so that a skipped step leaves the
inner optimiser state bitwise unchanged. (A `lax.cond` would skip the arithmetic of a rare
skipped step, but it materialises the whole new state and update trees at the branch boundary:
for the tbac_3b stage-1 step on v5p-8, XLA estimates the update at 66 GB moved and 28 ms per
step with the branch, 37 GB and 16 ms with the selection.) Because
`params + 0.0` turns -0.0 into +0.0, a skipped step must not be applied as a zero update: use
`apply_updates_or_skip`, which selects the old parameters when the step was skipped.

Typical use in a train step::

    tx = make_optimizer(cfg.optimizer)
    opt_state = tx.init(trainable)
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable, loss=loss)
    trainable = apply_updates_or_skip(trainable, updates, opt_state)
    metrics = {"loss": loss, **spike_metrics(opt_state)}
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from uniimage_jax.errors import ConfigError

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Config and schedule


def default_optimizer_config(config_dict=None):
    """The official optimiser settings; `total_steps` must be set by the training stage.

    Built as an `ml_collections.ConfigDict`, or with `config_dict` (any attribute mapping: the
    GPU benchmark runs where ml_collections is not installed)."""
    if config_dict is None:
        from ml_collections import ConfigDict as config_dict
    cfg = config_dict()
    cfg.lr = 1e-4  # peak learning rate, reached at the end of warm-up
    cfg.min_lr = 1e-5  # learning rate at `total_steps` (end of the cosine)
    cfg.warmup_steps = 5000  # linear warm-up from 0 to `lr`
    cfg.total_steps = 150_000  # stage length in optimiser steps (stage 1: 150k)
    cfg.weight_decay = 0.05  # decoupled (AdamW) weight decay, applied to every trainable leaf
    cfg.b1 = 0.9
    cfg.b2 = 0.999
    cfg.eps = 1e-8
    cfg.grad_clip = 0.5  # global-norm clipping threshold; <= 0 disables clipping
    cfg.spike = config_dict()
    cfg.spike.enabled = True
    cfg.spike.ema_decay = 0.99  # EMA of loss and raw (pre-clip) gradient norm
    cfg.spike.loss_factor = 20.0  # skip if loss > loss_factor * loss EMA
    cfg.spike.grad_factor = 25.0  # skip if grad norm > grad_factor * grad-norm EMA ...
    cfg.spike.grad_min = 1.0  # ... and grad norm > grad_min
    cfg.spike.grad_max = 1e6  # skip if grad norm > grad_max (or non-finite)
    return cfg


def _check_config(cfg) -> None:
    if cfg.total_steps <= cfg.warmup_steps:
        raise ConfigError(f"optimizer total_steps ({cfg.total_steps}) must exceed warmup_steps "
                          f"({cfg.warmup_steps})")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"optimizer warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr <= cfg.lr:
        raise ConfigError(f"optimizer needs 0 <= min_lr <= lr, got min_lr={cfg.min_lr}, "
                          f"lr={cfg.lr}")
    if cfg.spike.enabled and not 0.0 < cfg.spike.ema_decay < 1.0:
        raise ConfigError(f"spike.ema_decay must be in (0, 1), got {cfg.spike.ema_decay}")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warm-up 0 -> lr over `warmup_steps`, then cosine from lr to min_lr at `total_steps`.

    Constant at min_lr after `total_steps` (optax semantics).
    """
    _check_config(cfg)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,  # optax counts the warm-up inside decay_steps
        end_value=cfg.min_lr,
    )


def make_optimizer(cfg) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping + AdamW(schedule), wrapped in spike skipping when `cfg.spike.enabled`.

    The result always accepts `loss=` in `update` (ignored when spike skipping is off).
    """
    _check_config(cfg)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    inner = optax.chain(*parts)
    if not cfg.spike.enabled:
        return optax.with_extra_args_support(inner)
    return spike_skipping(inner, ema_decay=cfg.spike.ema_decay, loss_factor=cfg.spike.loss_factor,
                          grad_factor=cfg.spike.grad_factor, grad_min=cfg.spike.grad_min,
                          grad_max=cfg.spike.grad_max)


# ----------------------------------------------------------------------------------------------
# Trainable / frozen partitioning


# ----------------------------------------------------------------------------------------------
# Spike skipping


class SpikeSkipState(NamedTuple):
    """State of `spike_skipping`.

    loss_ema / grad_norm_ema are NaN until their first finite observation (so the first finite
    value initialises the EMA even if earlier steps were non-finite).
    """
    inner_state: optax.OptState
    loss_ema: jax.Array  # float32 scalar
    grad_norm_ema: jax.Array  # float32 scalar, EMA of the raw (pre-clip) global gradient norm
    count: jax.Array  # int32: update calls seen (skipped or not)
    num_skipped: jax.Array  # int32: how many of them were skipped
    last_skipped: jax.Array  # bool: whether the latest call was skipped
    last_grad_norm: jax.Array  # float32: raw global gradient norm of the latest call


def _ema_update(ema, value, decay):
    """EMA with the first finite observation as initial value; non-finite values are ignored."""
    value = value.astype(jnp.float32)
    updated = jnp.where(jnp.isnan(ema), value, decay * ema + (1.0 - decay) * value)
    return jnp.where(jnp.isfinite(value), updated, ema)


def spike_skipping(inner: optax.GradientTransformation, *, ema_decay: float = 0.99,
                   loss_factor: float = 20.0, grad_factor: float = 25.0, grad_min: float = 1.0,
                   grad_max: float = 1e6) -> optax.GradientTransformationExtraArgs:
    """Wrap `inner` so that loss / gradient-norm spikes skip the whole step.

    `update(grads, state, params, *, loss, **extra)`. The EMAs are updated first (with finite
    values only), then the step is skipped when any of:
      loss is non-finite, or loss > loss_factor * loss_ema;
      grad norm is non-finite, or > grad_max;
      grad norm > grad_factor * grad_norm_ema and grad norm > grad_min.
    On a skipped step the inner state is returned unchanged and the updates are zeros; apply them
    with `apply_updates_or_skip` so the parameters stay bitwise unchanged too.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        nan = jnp.full((), jnp.nan, jnp.float32)
        return SpikeSkipState(inner_state=inner.init(params), loss_ema=nan, grad_norm_ema=nan,
                              count=jnp.zeros((), jnp.int32), num_skipped=jnp.zeros((), jnp.int32),
                              last_skipped=jnp.zeros((), jnp.bool_),
                              last_grad_norm=jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        if loss is None:
            raise ValueError("spike_skipping needs the step's loss: call tx.update(grads, state, "
                             "params, loss=loss)")
        loss = jnp.asarray(loss, jnp.float32)
        if loss.shape != ():
            raise ValueError(f"spike_skipping expects a scalar loss, got shape {loss.shape}")
        grad_norm = optax.tree.norm(updates).astype(jnp.float32)

        loss_ema = _ema_update(state.loss_ema, loss, ema_decay)
        grad_norm_ema = _ema_update(state.grad_norm_ema, grad_norm, ema_decay)

        loss_spike = jnp.logical_or(~jnp.isfinite(loss), loss > loss_factor * loss_ema)
        grad_spike = (~jnp.isfinite(grad_norm)) | (grad_norm > grad_max) | (
            (grad_norm > grad_factor * grad_norm_ema) & (grad_norm > grad_min))
        skip = loss_spike | grad_spike

        # The update of a taken step, computed whatever `skip` says and then selected (see the
        # module docstring): a skipped step gets zeros (in the inner updates' dtypes, which may
        # differ from the gradients') and the inner state unchanged.
        taken_updates, taken_state = inner.update(updates, state.inner_state, params,
                                                  **extra_args)
        new_updates = jax.tree_util.tree_map(
            lambda u: jnp.where(skip, jnp.zeros_like(u), u), taken_updates)
        inner_state = jax.tree_util.tree_map(lambda old, new: jnp.where(skip, old, new),
                                             state.inner_state, taken_state)
        new_state = SpikeSkipState(
            inner_state=inner_state, loss_ema=loss_ema, grad_norm_ema=grad_norm_ema,
            count=state.count + 1, num_skipped=state.num_skipped + skip.astype(jnp.int32),
            last_skipped=skip, last_grad_norm=grad_norm)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_spike_state(opt_state) -> SpikeSkipState | None:
    if isinstance(opt_state, SpikeSkipState):
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            found = _find_spike_state(s)
            if found is not None:
                return found
    return None


def apply_updates_or_skip(params: PyTree, updates: PyTree, opt_state: optax.OptState) -> PyTree:
    """`optax.apply_updates`, except that a step skipped by `spike_skipping` returns `params`
    bitwise (jnp.where keeps -0.0 and NaN payloads that `p + 0.0` would not)."""
    new_params = optax.apply_updates(params, updates)
    spike = _find_spike_state(opt_state)
    if spike is None:
        return new_params
    return jax.tree_util.tree_map(lambda old, new: jnp.where(spike.last_skipped, old, new),
                                  params, new_params)


def skipped_step(opt_state: optax.OptState) -> jax.Array:
    """Whether spike skipping skipped the latest update (False when the optimiser has none)."""
    spike = _find_spike_state(opt_state)
    return jnp.zeros((), jnp.bool_) if spike is None else spike.last_skipped


def spike_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """Spike-skipping counters for logging; {} when the optimiser has no spike skipping."""
    spike = _find_spike_state(opt_state)
    if spike is None:
        return {}
    return {
        "spike/skipped": spike.last_skipped.astype(jnp.int32),
        "spike/num_skipped": spike.num_skipped,
        "spike/loss_ema": spike.loss_ema,
        "spike/grad_norm_ema": spike.grad_norm_ema,
        "spike/grad_norm": spike.last_grad_norm,
    }
