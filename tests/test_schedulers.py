"""Scheduler parity with diffusers 0.42.1: tables and every step of a whole denoising run, ours
run as one jitted `lax.scan` with a traced step index, fed the same random model outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler as RefDPM
from diffusers import FlowMatchEulerDiscreteScheduler as RefEuler

from tests.parity import assert_rel_close
from uniimage_jax.diffusion import schedulers as S

SHAPE = (2, 4, 4, 3)  # (B, H, W, C); the schedulers are elementwise so the layout is irrelevant


def _random_run(num_steps, seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal(SHAPE).astype(np.float32)
    # Velocity-like outputs: noise minus a fixed "image", plus per-step jitter.
    x0 = g.standard_normal(SHAPE).astype(np.float32)
    outs = np.stack([x - x0 + 0.3 * g.standard_normal(SHAPE).astype(np.float32)
                     for _ in range(num_steps)])
    return x, outs


def _reference_run(ref, x, outs):
    sample = torch.from_numpy(x)
    trajectory = []
    for i, t in enumerate(ref.timesteps):
        sample = ref.step(torch.from_numpy(outs[i]), t, sample, return_dict=False)[0]
        trajectory.append(sample.numpy().copy())
    return np.stack(trajectory)


def _our_run(sched, schedule, x, outs):
    @jax.jit
    def run(schedule, x, outs):
        def body(carry, inputs):
            sample, state = carry
            i, out = inputs
            sample, state = sched.step(schedule, state, out, sample, i)
            return (sample, state), sample

        init = (x, sched.init_state(x))
        _, trajectory = jax.lax.scan(body, init, (jnp.arange(outs.shape[0]), outs))
        return trajectory

    return np.asarray(run(schedule, jnp.asarray(x), jnp.asarray(outs)))


def _check_run(sched, ref, num_steps, seed):
    schedule = sched.make_schedule(num_steps)
    ref.set_timesteps(num_steps)
    assert schedule.num_steps == len(ref.timesteps)
    np.testing.assert_array_equal(schedule.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    assert_rel_close(S.model_timesteps(schedule), ref.timesteps.numpy(), 1e-6, "timesteps")
    x, outs = _random_run(num_steps, seed)
    expected = _reference_run(ref, x, outs)
    actual = _our_run(sched, schedule, x, outs)
    worst = 0.0
    for i in range(num_steps):
        worst = max(worst, assert_rel_close(actual[i], expected[i], 1e-6, f"step {i}"))
    return worst


@pytest.mark.parametrize("num_steps", [30, 20, 10])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_flow_match_euler_matches_diffusers(num_steps, shift):
    sched = S.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref = RefEuler(num_train_timesteps=1000, shift=shift)
    _check_run(sched, ref, num_steps, seed=num_steps)


@pytest.mark.parametrize("num_steps", [30, 20, 10])
def test_dpm_solver_sana_matches_diffusers(num_steps):
    sched = S.DPMSolverMultistepScheduler.sana()
    ref = RefDPM(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    _check_run(sched, ref, num_steps, seed=100 + num_steps)


@pytest.mark.parametrize("solver_order,solver_type,num_steps",
                         [(3, "midpoint", 20), (3, "midpoint", 10), (2, "heun", 10),
                          (1, "midpoint", 10)])
def test_dpm_solver_other_orders_match_diffusers(solver_order, solver_type, num_steps):
    """Order 3 under 15 steps exercises lower_order_final's second-order penultimate step."""
    sched = S.DPMSolverMultistepScheduler.sana(solver_order=solver_order, solver_type=solver_type)
    ref = RefDPM(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction",
                 solver_order=solver_order, solver_type=solver_type)
    _check_run(sched, ref, num_steps, seed=200 + num_steps)


def test_order_selection_follows_lower_order_final():
    sched = S.DPMSolverMultistepScheduler.sana(solver_order=3)
    orders = [int(sched._order_for_step(10, i, min(i, 3))) for i in range(10)]
    assert orders == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    orders = [int(sched._order_for_step(20, i, min(i, 3))) for i in range(20)]
    assert orders[-2:] == [3, 1]


def test_model_timestep_broadcasts_and_accepts_traced_index():
    schedule = S.DPMSolverMultistepScheduler.sana().make_schedule(30)
    t = jax.jit(lambda i: S.model_timestep(schedule, i, 3))(jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(t), np.full(3, schedule.timesteps[0], np.float32))


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="solver_order"):
        S.DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="prediction_type"):
        S.DPMSolverMultistepScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.FlowMatchEulerDiscreteScheduler().make_schedule(0)
