"""Flow-matching samplers: diffusers' `FlowMatchEulerDiscreteScheduler` and the SANA configuration
of `DPMSolverMultistepScheduler`, as pure functions that a jitted denoising loop can call.

Our own port: no JAX implementation of these schedulers exists (diffusers' Flax schedulers cover
neither flow sigmas nor flow prediction). The behaviour matches diffusers 0.42.1:

* The tables (timesteps, sigmas) are built on the host in numpy with the same float64 arithmetic
  and the same float32/int64 casts as diffusers' `set_timesteps`, so they agree bit for bit. They
  are static for a given step count.
* A step is `step(schedule, state, model_output, sample, step_index) -> (prev_sample, new_state)`;
  `step_index` may be traced, so a whole denoising loop can be one `lax.fori_loop` / `lax.scan`.
  The solver order used at each step (diffusers decides it from `lower_order_nums`, the step index
  and `lower_order_final`) is chosen with `lax.switch`, so every branch is traced but only the
  selected one runs (the higher-order branches would divide by an infinite log-SNR step at the
  final zero sigma).
* Scalar coefficients are computed in float32 in the same order of operations as diffusers, so
  results agree to float32 rounding.

Usage (SANA / TBAC-UniImage sampling)::

    sched = DPMSolverMultistepScheduler.sana()
    schedule = sched.make_schedule(30)
    state = sched.init_state(latents)
    def body(i, carry):
        x, state = carry
        v = model(x, model_timestep(schedule, i, x.shape[0]))
        return sched.step(schedule, state, v, x, i)
    latents, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (latents, state))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
    """The static tables of one sampling run.

    timesteps: (num_steps,) the value diffusers hands the model at step i (float32 for flow-match
        Euler; integral values stored as int32 for DPM-Solver, which uses int64 in diffusers).
    sigmas: (num_steps + 1,) float32 noise levels, the last one the terminal sigma (0).
    """

    timesteps: Any
    sigmas: Any

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def model_timestep(schedule: Schedule, step_index, batch_size: int | None = None,
                   dtype=jnp.float32) -> jax.Array:
    """The timestep the denoiser sees at step `step_index` (traced or not), as `dtype`;
    broadcast to (batch_size,) when given, as diffusers pipelines do with `t.expand(B)`."""
    t = jnp.asarray(schedule.timesteps)[step_index].astype(dtype)
    return t if batch_size is None else jnp.broadcast_to(t, (batch_size,))


def model_timesteps(schedule: Schedule, dtype=jnp.float32) -> jax.Array:
    """All model timesteps of the run, (num_steps,), as `dtype`."""
    return jnp.asarray(schedule.timesteps).astype(dtype)


def _check_steps(num_inference_steps: int) -> None:
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError("num_inference_steps must be a positive integer, "
                         f"got {num_inference_steps!r}")


def _shifted(sigmas, shift):
    """The flow time shift sigma' = s sigma / (1 + (s - 1) sigma) (SD3 / SANA)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# ---------------------------------------------------------------------------------------------
# Flow-match Euler
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class EulerState:
    """Flow-match Euler keeps no history; the state exists so both schedulers share one API."""


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerDiscreteScheduler:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i, diffusers' default (deterministic) configuration
    with a static time shift (no dynamic shifting, no Karras/exponential/beta sigmas)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self):
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def _train_sigma_range(self) -> tuple[float, float]:
        """(sigma_max, sigma_min) of the float32 training table built in diffusers' __init__."""
        n = self.num_train_timesteps
        t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        sigmas = _shifted(t / np.float32(n), np.float32(self.shift)).astype(np.float32)
        return float(sigmas[0]), float(sigmas[-1])

    def make_schedule(self, num_inference_steps: int) -> Schedule:
        """Tables of `set_timesteps(num_inference_steps)`. Note diffusers shifts the already-shifted
        training sigma_min again here; we reproduce that."""
        _check_steps(num_inference_steps)
        n = self.num_train_timesteps
        sigma_max, sigma_min = self._train_sigma_range()
        timesteps = np.linspace(sigma_max * n, sigma_min * n, num_inference_steps)
        sigmas = _shifted(timesteps / n, self.shift).astype(np.float32)
        timesteps = (sigmas * np.float32(n)).astype(np.float32)
        sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        return Schedule(timesteps=timesteps, sigmas=sigmas)

    def init_state(self, sample: jax.Array) -> EulerState:
        del sample
        return EulerState()

    def step(self, schedule: Schedule, state: EulerState, model_output: jax.Array,
             sample: jax.Array, step_index) -> tuple[jax.Array, EulerState]:
        sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
        dt = sigmas[step_index + 1] - sigmas[step_index]
        prev_sample = sample.astype(jnp.float32) + dt * model_output
        return prev_sample.astype(model_output.dtype), state


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep) with flow sigmas
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class DPMSolverState:
    """model_outputs: (solver_order, *sample.shape) the last data predictions x0, newest last.
    lower_order_nums: int32 scalar, how many steps have run (saturating at solver_order)."""

    model_outputs: jax.Array
    lower_order_nums: jax.Array


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler:
    """`DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
    flow_shift=...)`, algorithm dpmsolver++, final sigma zero. Other diffusers options (epsilon /
    v prediction, beta schedules, SDE variants, thresholding) are not ported."""

    num_train_timesteps: int = 1000
    flow_shift: float = 3.0
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    algorithm_type: str = "dpmsolver++"
    prediction_type: str = "flow_prediction"
    use_flow_sigmas: bool = True
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        if self.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {self.solver_order}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")
        if self.algorithm_type != "dpmsolver++":
            raise ValueError("only algorithm_type='dpmsolver++' is ported, "
                             f"got {self.algorithm_type!r}")
        if self.prediction_type != "flow_prediction":
            raise ValueError("only prediction_type='flow_prediction' is ported, "
                             f"got {self.prediction_type!r}")
        if not self.use_flow_sigmas:
            raise ValueError("only use_flow_sigmas=True is ported")
        if self.final_sigmas_type != "zero":
            raise ValueError("only final_sigmas_type='zero' is ported, "
                             f"got {self.final_sigmas_type!r}")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be positive, got {self.flow_shift}")

    @classmethod
    def sana(cls, **overrides) -> "DPMSolverMultistepScheduler":
        """The scheduler published with SANA and used by TBAC-UniImage."""
        return cls(**{"flow_shift": 3.0, **overrides})

    def make_schedule(self, num_inference_steps: int) -> Schedule:
        """Tables of `set_timesteps(num_inference_steps)` with `use_flow_sigmas`: float64 sigmas,
        timesteps = int64(sigma * 1000) (truncated), sigmas cast to float32 with a final 0."""
        _check_steps(num_inference_steps)
        n = self.num_train_timesteps
        alphas = np.linspace(1, 1 / n, num_inference_steps + 1)
        sigmas = np.flip(_shifted(1.0 - alphas, self.flow_shift))[:-1].copy()
        timesteps = (sigmas * n).astype(np.int64).astype(np.int32)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return Schedule(timesteps=timesteps, sigmas=sigmas)

    def init_state(self, sample: jax.Array) -> DPMSolverState:
        return DPMSolverState(
            model_outputs=jnp.zeros((self.solver_order,) + sample.shape, sample.dtype),
            lower_order_nums=jnp.zeros((), jnp.int32))

    def _order_for_step(self, num_steps: int, step_index, lower_order_nums) -> jax.Array:
        """diffusers' choice of solver order at this step (1-based, int32)."""
        last = step_index == num_steps - 1
        lower_order_final = last & (self.euler_at_final
                                    or (self.lower_order_final and num_steps < 15)
                                    or self.final_sigmas_type == "zero")
        lower_order_second = ((step_index == num_steps - 2) & self.lower_order_final
                              & (num_steps < 15))
        first = (self.solver_order == 1) | (lower_order_nums < 1) | lower_order_final
        second = (self.solver_order == 2) | (lower_order_nums < 2) | lower_order_second
        return jnp.where(first, 1, jnp.where(second, 2, 3)).astype(jnp.int32)

    def step(self, schedule: Schedule, state: DPMSolverState, model_output: jax.Array,
             sample: jax.Array, step_index) -> tuple[jax.Array, DPMSolverState]:
        sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
        step_index = jnp.asarray(step_index, jnp.int32)
        # convert_model_output: the flow prediction v gives the data prediction x0 = x - sigma v.
        x0_pred = sample - sigmas[step_index] * model_output
        history = jnp.concatenate([state.model_outputs[1:], x0_pred[None].astype(
            state.model_outputs.dtype)], axis=0)
        sample32 = sample.astype(jnp.float32)

        def sigma_at(offset):
            # Clamp so early steps never index out of range; those branches are not selected.
            return sigmas[jnp.clip(step_index + offset, 0, sigmas.shape[0] - 1)]

        def alpha_sigma_lambda(sigma):
            alpha_t, sigma_t = 1 - sigma, sigma
            return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)

        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigma_at(1))
        _, sigma_s0, lambda_s0 = alpha_sigma_lambda(sigma_at(0))
        h = lambda_t - lambda_s0
        m = [history[-1 - k] for k in range(self.solver_order)]  # m[0] newest

        def first_order(_):
            return (sigma_t / sigma_s0) * sample32 - (alpha_t * (jnp.exp(-h) - 1.0)) * m[0]

        def second_order(_):
            _, _, lambda_s1 = alpha_sigma_lambda(sigma_at(-1))
            r0 = (lambda_s0 - lambda_s1) / h
            d0, d1 = m[0], (1.0 / r0) * (m[0] - m[1])
            if self.solver_type == "midpoint":
                return ((sigma_t / sigma_s0) * sample32 - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
                        - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1)
            return ((sigma_t / sigma_s0) * sample32 - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
                    + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1)

        def third_order(_):
            _, _, lambda_s1 = alpha_sigma_lambda(sigma_at(-1))
            _, _, lambda_s2 = alpha_sigma_lambda(sigma_at(-2))
            h_0, h_1 = lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
            r0, r1 = h_0 / h, h_1 / h
            d1_0, d1_1 = (1.0 / r0) * (m[0] - m[1]), (1.0 / r1) * (m[1] - m[2])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            return ((sigma_t / sigma_s0) * sample32 - (alpha_t * (jnp.exp(-h) - 1.0)) * m[0]
                    + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
                    - (alpha_t * ((jnp.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)

        branches = [first_order, second_order, third_order][: self.solver_order]
        order = self._order_for_step(schedule.num_steps, step_index, state.lower_order_nums)
        prev_sample = jax.lax.switch(order - 1, branches, None)
        new_state = DPMSolverState(
            model_outputs=history,
            lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.solver_order))
        return prev_sample.astype(model_output.dtype), new_state
