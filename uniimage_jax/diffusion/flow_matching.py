"""The flow-matching objective of TBAC-UniImage (rectified flow on scaled latents).

Official procedure (models/tbacuniimage.py, `loss_type="flow"`): the training noise scheduler is
diffusers' `FlowMatchEulerDiscreteScheduler` with 1000 train timesteps and shift 1, whose tables
are `timesteps = linspace(1, 1000, 1000)[::-1]` (float32) and `sigmas = timesteps / 1000`. Per
sample: u ~ U(0, 1), index = floor(1000 u), t = timesteps[index], sigma = sigmas[index],
x_t = (1 - sigma) x0 + sigma eps, target = eps - x0, loss = mean over samples of the per-sample
mean squared error, in fp32, weight 1 ("uniform" weighting).

`timestep_sampling="logit_normal"` draws u = sigmoid(N(mean, std)) instead (SD3's option), then
the same discretisation.

The loss is computed here from end to end (`training_loss`, or `loss_given_noise` for chosen noise
and timesteps); the model only supplies its velocity prediction as a function of (x_t, t).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def train_timestep_table(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 1.0):
    """(timesteps, sigmas) float32 tables of FlowMatchEulerDiscreteScheduler at construction."""
    timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    sigmas = timesteps / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * num_train_timesteps).astype(np.float32), sigmas.astype(np.float32)


def sample_timesteps(rng: jax.Array, batch: int, *, scheme: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """(timesteps (B,), sigmas (B,)) float32, drawn as the official trainer does."""
    if scheme == "uniform":
        u = jax.random.uniform(rng, (batch,), jnp.float32)
    elif scheme == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    else:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r} "
                         "(expected 'uniform' or 'logit_normal')")
    index = jnp.clip((u * num_train_timesteps).astype(jnp.int32), 0, num_train_timesteps - 1)
    timesteps, sigmas = train_timestep_table(num_train_timesteps)
    return jnp.asarray(timesteps)[index], jnp.asarray(sigmas)[index]


def noisy_latents_and_target(latents, noise, sigmas):
    """x_t and the velocity target for latents (B, ...) and per-sample sigmas (B,)."""
    s = sigmas.reshape((-1,) + (1,) * (latents.ndim - 1)).astype(latents.dtype)
    return (1.0 - s) * latents + s * noise, noise - latents


def per_sample_loss(prediction, target):
    """(B,) mean_(everything but the batch) (pred - target)^2, computed in fp32."""
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def flow_matching_loss(prediction, target):
    """mean_b mean_(everything else) (pred - target)^2, computed in fp32."""
    return jnp.mean(per_sample_loss(prediction, target))


def evaluation_timesteps(num: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """(timesteps (num,), sigmas (num,)) float32: a fixed grid of noise levels for measuring the
    loss, sigma_j nearest to (j + 0.5) / num (ascending, j = 0..num-1), taken from the training
    table so that every grid point is a level training draws."""
    timesteps, sigmas = train_timestep_table(num_train_timesteps)
    wanted = (np.arange(num, dtype=np.float64) + 0.5) / num
    # The table runs from sigma 1 (index 0) down to 1 / num_train_timesteps.
    index = np.clip(num_train_timesteps - np.rint(wanted * num_train_timesteps).astype(np.int64),
                    0, num_train_timesteps - 1)
    return timesteps[index], sigmas[index]


# (x_t (B, ...), timesteps (B,) in 0..1000) -> predicted velocity, shaped like x_t.
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def training_loss(predict_velocity: VelocityFn, latents, rng: jax.Array, *,
                  scheme: str = "uniform"):
    """The official loss with timesteps and noise drawn from `rng` (its first split for the
    timesteps, the second for the noise). The latents are data: no gradient flows into them, and
    they are taken in fp32. Returns (loss, {"timesteps", "prediction"})."""
    latents = jax.lax.stop_gradient(latents).astype(jnp.float32)
    k_t, k_n = jax.random.split(rng)
    timesteps, sigmas = sample_timesteps(k_t, latents.shape[0], scheme=scheme)
    noise = jax.random.normal(k_n, latents.shape, jnp.float32)
    return loss_given_noise(predict_velocity, latents, noise, timesteps, sigmas)


def loss_given_noise(predict_velocity: VelocityFn, latents, noise, timesteps, sigmas):
    """The loss for given latents, noise, timesteps (B,) and sigmas (B,): x_t and the target are
    formed here and `predict_velocity(x_t, timesteps)` is called once.
    Returns (loss, {"timesteps", "prediction"})."""
    noisy, target = noisy_latents_and_target(latents, noise, sigmas)
    prediction = predict_velocity(noisy, timesteps)
    return flow_matching_loss(prediction, target), {"timesteps": timesteps,
                                                    "prediction": prediction}
