"""The flow-matching objective against diffusers' FlowMatchEulerDiscreteScheduler tables and the
official loss formula (written here in torch the way models/tbacuniimage.py computes it)."""
import jax
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tests.parity import assert_rel_close
from uniimage_jax.diffusion import flow_matching as fm


def test_tables_match_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    timesteps, sigmas = fm.train_timestep_table()
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy()[:1000])


def test_sampled_timesteps_follow_official_indexing():
    rng = jax.random.PRNGKey(0)
    t, s = fm.sample_timesteps(rng, 4096)
    u = np.asarray(jax.random.uniform(rng, (4096,)))
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    idx = torch.from_numpy((u * 1000).astype(np.int64))
    np.testing.assert_array_equal(np.asarray(t), ref.timesteps[idx].numpy())
    np.testing.assert_array_equal(np.asarray(s), ref.sigmas[idx].numpy())
    # values are the float32 round trip sigma * 1000 of the integers 1..1000, as in diffusers
    t = np.asarray(t)
    np.testing.assert_allclose(t, np.round(t), atol=1e-3)
    assert 1 <= np.round(t).min() and np.round(t).max() <= 1000
    t2, _ = fm.sample_timesteps(rng, 4096, scheme="logit_normal")
    assert abs(float(np.median(np.asarray(t2))) - 500) < 50  # logit-normal centres on sigma 0.5


def test_loss_matches_official_formula():
    g = np.random.default_rng(0)
    x0, eps, pred = (g.standard_normal((3, 4, 4, 8)).astype(np.float32) for _ in range(3))
    sig = np.array([0.1, 0.5, 1.0], np.float32)
    xt, target = fm.noisy_latents_and_target(x0, eps, sig)
    loss = fm.flow_matching_loss(pred, target)
    # official, NCHW
    tx0, teps, tpred = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x0, eps, pred))
    ts = torch.from_numpy(sig)[:, None, None, None]
    ref_xt = (1.0 - ts) * tx0 + ts * teps
    ref_target = teps - tx0
    ref_loss = torch.mean(((tpred.float() - ref_target.float()) ** 2).reshape(3, -1), 1).mean()
    assert_rel_close(np.transpose(np.asarray(xt), (0, 3, 1, 2)), ref_xt, 1e-6, "x_t")
    assert_rel_close(loss, ref_loss, 1e-6, "loss")
