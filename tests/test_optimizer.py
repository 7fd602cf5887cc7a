"""Optimiser: schedule, AdamW vs torch.optim.AdamW, spike skipping, trainable/frozen partitioning."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.parity import assert_rel_close
from uniimage_jax.models import layers
from uniimage_jax.checkpoints import partition
from uniimage_jax.train import optimizer as opt


def small_cfg(**overrides):
    cfg = opt.default_optimizer_config()
    cfg.warmup_steps = 10
    cfg.total_steps = 110
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.gelu_tanh(layers.dense(16, ("embed", "mlp"), name="fc1")(x))
        return layers.dense(1, ("mlp", "embed"), name="fc2")(x)


def regression_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(4, 1))).astype(np.float32)
    params = nn.unbox(MLP().init(jax.random.key(seed), x[:1])["params"])

    def loss_fn(params, xb, yb):
        return jnp.mean((MLP().apply({"params": params}, xb) - yb) ** 2)

    return params, jnp.asarray(x), jnp.asarray(y), loss_fn


def leaves_equal_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.asarray(u).tobytes() == np.asarray(v).tobytes() and
               np.asarray(u).dtype == np.asarray(v).dtype for u, v in zip(la, lb))


# ------------------------------------------------------------------------------------ schedule

def test_schedule_warmup_then_cosine():
    cfg = small_cfg()
    sched = opt.learning_rate_schedule(cfg)

    def expected(step):
        if step < cfg.warmup_steps:
            return cfg.lr * step / cfg.warmup_steps
        frac = min((step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps), 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))

    for step in [0, 1, 5, 10, 35, 60, 85, 109, 110, 200]:
        np.testing.assert_allclose(float(sched(step)), expected(step), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(sched(60)), (cfg.lr + cfg.min_lr) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(110)), cfg.min_lr, rtol=1e-6)


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="total_steps"):
        opt.make_optimizer(small_cfg(total_steps=5))
    with pytest.raises(ValueError, match="min_lr"):
        opt.make_optimizer(small_cfg(min_lr=1.0))


# ------------------------------------------------------------------------------ AdamW vs torch

def test_adamw_matches_torch_adamw_with_clipping():
    """Clip + AdamW + warm-up/cosine over 30 steps against torch.optim.AdamW, clip_grad_norm_ and
    a LambdaLR with the same schedule (the official trainer's optimiser)."""
    import torch

    cfg = small_cfg(lr=3e-2, min_lr=1e-3, warmup_steps=5, total_steps=30)
    cfg.spike.enabled = True  # normal steps: must not change anything
    tx = opt.make_optimizer(cfg)
    sched = opt.learning_rate_schedule(cfg)
    params, x, y, loss_fn = regression_problem()
    state = tx.init(params)

    tparams = {path: torch.nn.Parameter(torch.tensor(np.asarray(v)))
               for path, v in jax.tree_util.tree_leaves_with_path(params)}
    torch_opt = torch.optim.AdamW(list(tparams.values()), lr=1.0, betas=(cfg.b1, cfg.b2),
                                  eps=cfg.eps, weight_decay=cfg.weight_decay)
    lrs = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(31)), np.float64)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda k: float(lrs[k]))

    @jax.jit
    def step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params, loss=loss)
        return opt.apply_updates_or_skip(params, updates, state), state, grads

    for i in range(30):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        # Gradients computed once (by JAX) and fed to both optimisers.
        new_params, state, grads = step(params, state, x[sl], y[sl])
        for (path, g) in jax.tree_util.tree_leaves_with_path(grads):
            tparams[path].grad = torch.tensor(np.asarray(g))
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), cfg.grad_clip)
        torch_opt.step()
        lr_sched.step()
        params = new_params
    assert int(opt.spike_metrics(state)["spike/num_skipped"]) == 0
    for path, v in jax.tree_util.tree_leaves_with_path(params):
        # ~8e-6 reached: optax forms the bias correction 1 - b2**k in fp32, where float32(0.999)
        # makes it 1.3e-5 off (6e-6 after the sqrt); torch uses float64 Python scalars.
        assert_rel_close(v, tparams[path], rtol=2e-5, name=jax.tree_util.keystr(path))


def test_matches_plain_optax_chain_when_nothing_spikes():
    """The spike wrapper is transparent on normal steps (up to XLA fusion rounding)."""
    cfg = small_cfg()
    sched = opt.learning_rate_schedule(cfg)
    ref = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                      optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay))
    tx = opt.make_optimizer(cfg)
    params, x, y, loss_fn = regression_problem(1)
    p_ref, s_ref, s = params, ref.init(params), tx.init(params)

    @jax.jit
    def step(params, s, p_ref, s_ref):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        u, s = tx.update(g, s, params, loss=loss)
        u_ref, s_ref = ref.update(jax.grad(loss_fn)(p_ref, x, y), s_ref, p_ref)
        return (opt.apply_updates_or_skip(params, u, s), s, optax.apply_updates(p_ref, u_ref),
                s_ref)

    for i in range(5):
        params, s, p_ref, s_ref = step(params, s, p_ref, s_ref)
    for a, b in zip(jax.tree.leaves((params, s.inner_state)), jax.tree.leaves((p_ref, s_ref))):
        assert_rel_close(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------- spike skipping

@pytest.fixture(scope="module")
def warmed_up():
    """50 normal (minibatch) steps with spike skipping on; returns what the spike tests need."""
    cfg = small_cfg(lr=1e-2, min_lr=1e-3, warmup_steps=10, total_steps=300)
    tx = opt.make_optimizer(cfg)
    params, x, y, loss_fn = regression_problem(2)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    @jax.jit
    def apply(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, loss=loss)
        return opt.apply_updates_or_skip(params, updates, state), state

    state = tx.init(params)
    for i in range(50):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss, grads = grad_fn(params, x[sl], y[sl])
        params, state = apply(params, state, grads, loss)
    assert int(state.num_skipped) == 0
    # A -0.0 parameter: `p + 0.0` would turn it into +0.0, a skipped step must not.
    params = jax.tree.map(lambda p: p, params)
    params["fc2"]["bias"] = jnp.array([-0.0], jnp.float32)
    return dict(params=params, state=state, x=x, y=y, grad_fn=grad_fn, apply=apply)


def _spiked_inputs(kind, loss, grads):
    if kind == "nan_loss":
        return jnp.float32(jnp.nan), grads
    if kind == "inf_loss":
        return jnp.float32(jnp.inf), grads
    if kind == "loss_spike":
        return loss * 100.0, grads
    if kind == "grad_spike_100x":
        return loss, jax.tree.map(lambda g: g * 100.0, grads)
    if kind == "nan_grad":
        return loss, jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    if kind == "grad_over_max":
        return loss, jax.tree.map(lambda g: g * 1e9, grads)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "loss_spike", "grad_spike_100x",
                                  "nan_grad", "grad_over_max"])
def test_spike_leaves_params_and_inner_state_bitwise_unchanged(warmed_up, kind):
    w = warmed_up
    params, state = w["params"], w["state"]
    loss, grads = w["grad_fn"](params, w["x"][:32], w["y"][:32])
    spike_loss, spike_grads = _spiked_inputs(kind, loss, grads)

    new_params, new_state = w["apply"](params, state, spike_grads, spike_loss)

    assert bool(new_state.last_skipped)
    assert int(new_state.num_skipped) == int(state.num_skipped) + 1
    assert int(new_state.count) == int(state.count) + 1
    assert leaves_equal_bitwise(new_params, params)
    assert np.signbit(np.asarray(new_params["fc2"]["bias"])[0])  # still -0.0
    assert leaves_equal_bitwise(new_state.inner_state, state.inner_state)
    # Non-finite values never enter the EMAs.
    assert np.isfinite(float(new_state.loss_ema)) and np.isfinite(float(new_state.grad_norm_ema))
    metrics = opt.spike_metrics(new_state)
    assert int(metrics["spike/skipped"]) == 1 and int(metrics["spike/num_skipped"]) == 1

    # Training resumes normally after the skipped step.
    after_params, after_state = w["apply"](new_params, new_state, grads, loss)
    assert not bool(after_state.last_skipped)
    assert not leaves_equal_bitwise(after_params["fc1"], params["fc1"])
    assert int(after_state.num_skipped) == 1


def test_zero_update_would_flip_negative_zero():
    """Why apply_updates_or_skip exists: the naive zero update is not bitwise neutral."""
    p = jnp.array([-0.0], jnp.float32)
    assert not np.signbit(np.asarray(optax.apply_updates(p, jnp.zeros_like(p)))[0])


def test_ema_initialised_by_first_finite_observation():
    tx = opt.spike_skipping(optax.sgd(0.1))
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full((3,), jnp.nan)}, state, params, loss=jnp.nan)
    assert bool(state.last_skipped) and np.isnan(float(state.loss_ema))
    _, state = tx.update({"w": jnp.ones((3,))}, state, params, loss=2.0)
    assert not bool(state.last_skipped)
    np.testing.assert_allclose(float(state.loss_ema), 2.0)
    np.testing.assert_allclose(float(state.grad_norm_ema), math.sqrt(3), rtol=1e-6)
    _, state = tx.update({"w": jnp.ones((3,))}, state, params, loss=4.0)
    np.testing.assert_allclose(float(state.loss_ema), 0.99 * 2.0 + 0.01 * 4.0, rtol=1e-6)
    with pytest.raises(ValueError, match="loss"):
        tx.update({"w": jnp.ones((3,))}, state, params)


def test_small_gradient_spike_below_grad_min_is_not_skipped():
    tx = opt.spike_skipping(optax.sgd(0.1))
    params = {"w": jnp.ones((1,))}
    state = tx.init(params)
    for _ in range(10):
        _, state = tx.update({"w": jnp.full((1,), 1e-3)}, state, params, loss=1.0)
    _, state = tx.update({"w": jnp.full((1,), 0.5)}, state, params, loss=1.0)  # 500x, norm < 1
    assert not bool(state.last_skipped)


def test_200_normal_steps_skip_nothing():
    cfg = small_cfg(lr=5e-3, min_lr=5e-4, warmup_steps=20, total_steps=200)
    tx = opt.make_optimizer(cfg)
    params, x, y, loss_fn = regression_problem(3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params, loss=loss)
        return opt.apply_updates_or_skip(params, updates, state), state, loss

    first = float(loss_fn(params, x, y))
    for i in range(200):
        sl = slice((i * 16) % 256, (i * 16) % 256 + 16)
        params, state, _ = step(params, state, x[sl], y[sl])
    assert int(state.num_skipped) == 0 and int(state.count) == 200
    assert float(loss_fn(params, x, y)) < 0.5 * first


# ---------------------------------------------------------------------------- trainable/frozen

def test_frozen_params_have_no_optimizer_state_and_never_change():
    params, x, y, loss_fn = regression_problem(4)
    trainable, frozen = partition.partition_params(params, [r"fc2/.*"])
    assert set(trainable) == {"fc2"} and set(frozen) == {"fc1"}
    assert leaves_equal_bitwise(partition.merge_params(trainable, frozen), jax.tree.map(
        lambda a: a, dict(params)))

    tx = opt.make_optimizer(small_cfg())
    state = tx.init(trainable)
    n_state = sum(int(np.size(a)) for a in jax.tree.leaves(state.inner_state))
    n_trainable = sum(int(np.size(a)) for a in jax.tree.leaves(trainable))
    n_frozen = sum(int(np.size(a)) for a in jax.tree.leaves(frozen))
    # Adam mu + nu for the trainable leaves plus scalar counters; nothing sized like fc1.
    assert n_state < 2 * n_trainable + 10 < n_frozen
    for sub in jax.tree.leaves(state.inner_state, is_leaf=lambda s: hasattr(s, "mu")):
        if hasattr(sub, "mu"):
            assert jax.tree.structure(sub.mu) == jax.tree.structure(trainable)

    frozen_before = jax.tree.map(np.asarray, frozen)

    @jax.jit
    def step(trainable, frozen, state):
        def f(t):
            return loss_fn(partition.merge_params(t, frozen), x, y)
        loss, grads = jax.value_and_grad(f)(trainable)
        updates, state = tx.update(grads, state, trainable, loss=loss)
        return opt.apply_updates_or_skip(trainable, updates, state), state

    t0 = trainable
    for _ in range(3):
        trainable, state = step(trainable, frozen, state)
    assert leaves_equal_bitwise(frozen, frozen_before)
    assert not leaves_equal_bitwise(trainable, t0)


def test_partition_errors():
    params, *_ = regression_problem(5)
    with pytest.raises(ValueError, match=r"match no parameter.*fc1/bias"):
        partition.partition_params(params, [r"fc2/.*", r"sana/.*"])
    with pytest.raises(ValueError, match="invalid"):
        partition.partition_params(params, [r"fc2/("])
    with pytest.raises(TypeError):
        partition.partition_params(params, r"fc2/.*")
    t, f = partition.partition_params(params, [r"fc1/kernel"])
    with pytest.raises(ValueError, match="both"):
        partition.merge_params(t, partition.merge_params(t, f))
