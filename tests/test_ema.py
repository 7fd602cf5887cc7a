"""EMA of the trainable parameters (`uniimage_jax/train/ema.py`) against a hand computation.

The expected EMA is recomputed in numpy float32 from the parameters the jitted step produced,
step by step (copy phase, update grid, a spike-skipped step, a checkpoint round trip), and must
match bit for bit on CPU. The CLI test resumes an EMA-less run with the EMA switched on and checks
what samplers and exporters are told.
"""
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import T2I, _run, _train_cmd

DECAY, START, EVERY = 0.9, 2, 2


def _setup(tmp_path):
    import importlib.util

    from uniimage_jax.data.pipeline import make_train_iterator
    from uniimage_jax.train import ema
    from uniimage_jax.train import batches
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train import step as train_step
    from uniimage_jax.checkpoints.partition import partition_params
    from uniimage_jax.train.optimizer import make_optimizer

    spec = importlib.util.spec_from_file_location("t2i", T2I)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    config.ema.enabled = True
    config.ema.decay, config.ema.start_step, config.ema.every_steps = DECAY, START, EVERY
    model = stage_setup.build_model(config)
    processor = stage_setup.load_processor_for(config, model, str(tmp_path))
    trainable, frozen = partition_params(model.init(jax.random.PRNGKey(0)), list(config.trainable))
    tx = make_optimizer(config.optimizer)
    state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                               opt_state=tx.init(trainable), rng=jax.random.PRNGKey(0),
                               ema=ema.init(trainable))
    train_step = jax.jit(train_step.make_train_step(model, tx, config), static_argnums=(3,))
    ema_step = jax.jit(ema.make_state_update(config.ema))

    def step(state, frozen, batch, grid):  # as the trainer's loop runs them
        state, metrics = train_step(state, frozen, batch, grid)
        return ema_step(state, jnp.zeros((), jnp.uint32)), metrics
    it = make_train_iterator(config.data, task="t2i", batch_size=2, seed=0,
                             image_size=model.config.image_size)

    def batch():
        arrays, _ = batches.prepare_batch(next(it), processor, model, config, "t2i")
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return config, state, frozen, step, batch


def _hand_ema(ema, params, step, skipped):
    """The documented rule, in numpy float32."""
    d, r = np.float32(DECAY), np.float32(1.0 - DECAY)
    if skipped:
        return ema
    if step <= START:
        return jax.tree.map(lambda p: np.array(p, np.float32), params)
    if step % EVERY:
        return ema
    return jax.tree.map(lambda e, p: d * e + r * np.asarray(p, np.float32), ema, params)


def _assert_bitwise(a, b, what):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb), what
    for (path, x), y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), \
            f"{what}: {jax.tree_util.keystr(path)} differs"


def test_ema_matches_a_hand_computation_through_a_skip_and_a_resume(tmp_path):
    from uniimage_jax.checkpoints import stage as ckpt_lib
    from uniimage_jax.train import ema as ema_lib

    config, state, frozen, step, batch = _setup(tmp_path)
    expected = jax.device_get(state.ema)
    _assert_bitwise(expected, jax.device_get(state.params), "init is a copy")
    n_steps, skip_at, save_at = 8, 5, 5
    for s in range(1, n_steps + 1):
        b = batch()
        if s == skip_at:  # a NaN loss: spike skipping must leave params, optimiser and EMA alone
            b = {**b, "target": b["target"] * jnp.nan}
        before = jax.device_get(state)
        state, metrics = step(state, frozen, b, None)
        skipped = bool(metrics["spike/skipped"])
        assert skipped == (s == skip_at), s
        if skipped:
            _assert_bitwise(state.params, before.params, "skipped step params")
            _assert_bitwise(state.ema, before.ema, "skipped step EMA")
        expected = _hand_ema(expected, jax.device_get(state.params), s, skipped)
        _assert_bitwise(state.ema, expected, f"EMA after step {s}")
        if s == save_at:  # save, then resume into a fresh state: the EMA comes back bitwise
            ckpt = ckpt_lib.StageCheckpointer(str(tmp_path / "w"), "s", async_save=False,
                                              save_every=1)
            ckpt.save(s, state, None, config.to_dict())
            ckpt.wait()
            fresh = state.replace(ema=jax.tree.map(jnp.zeros_like, state.ema),
                                  params=jax.tree.map(jnp.zeros_like, state.params))
            state, _ = ema_lib.resume(fresh, ckpt.stored_state_keys(), config.ema,
                                      lambda target: ckpt.restore(abstract_state=target))
            ckpt.close()
            _assert_bitwise(state.ema, expected, "restored EMA")
    # the EMA really averages: it differs from the parameters after the copy phase
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.ema),
                                                         jax.tree.leaves(state.params)))


def test_ema_config_is_checked_before_anything_runs():
    from uniimage_jax.train import ema

    c = ema.default_ema_config()
    assert not c.enabled  # the official recipe has no EMA
    c.enabled, c.decay = True, 1.0
    with pytest.raises(ValueError, match="config.ema.decay"):
        ema.check_config(c)
    c.decay, c.every_steps = 0.99, 0
    with pytest.raises(ValueError, match="config.ema.every_steps"):
        ema.check_config(c)


def _sample(capsys, stage, out, *extra):
    """`uniimage-sample` (its main, in this process: both samplings share one compiled sampler)
    -> (exit status, stdout, stderr)."""
    from uniimage_jax.cli import sample

    capsys.readouterr()
    code = sample.main(["--checkpoint", stage, "--prompt", "a red circle", "--steps", "1",
                        "--num-images", "1", "--images-per-call", "1", "--out", out, *extra])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


def test_ema_switched_on_at_resume_starts_from_the_params_and_samplers_use_it(tmp_path, capsys):
    from uniimage_jax.checkpoints.loader import load_uniimage, resolve_weights
    from uniimage_jax.checkpoints.stage import restore_params_only

    w = str(tmp_path / "w")
    stage = os.path.join(w, "t2i_pretrain")
    common = ["--config.batch_size=2", "--config.checkpoint.every_steps=1",
              "--config.checkpoint.keep=10"]
    _run(_train_cmd(w, "--config.max_steps=3", *common))
    assert resolve_weights(stage) == "raw"
    bad = _sample(capsys, stage, str(tmp_path / "bad"), "--weights", "ema")
    assert bad.returncode == 2 and "holds no EMA weights" in bad.stderr, bad.stderr[-2000:]

    decay = 0.5
    out = _run(_train_cmd(w, "--config.max_steps=5", *common, "--config.ema.enabled=True",
                          f"--config.ema.decay={decay}"))
    assert "has no EMA; it starts from the current parameters" in out.stderr
    assert resolve_weights(stage) == "ema"
    _, ema_params, _ = load_uniimage(stage, "ema")
    _, raw_params, _ = load_uniimage(stage, "raw")
    trainable = {k: raw_params[k] for k in ("dit", "connector", "metaquery")}
    per_step = {s: jax.device_get(restore_params_only(os.path.join(stage, str(s)), trainable))
                for s in (3, 4, 5)}
    d, r = np.float32(decay), np.float32(1.0 - decay)
    expected = per_step[3]
    for s in (4, 5):
        expected = jax.tree.map(lambda e, p: d * e + r * p, expected, per_step[s])
    _assert_bitwise({k: ema_params[k] for k in trainable}, expected, "EMA after the resume")
    _assert_bitwise({k: raw_params[k] for k in trainable}, per_step[5], "raw weights")

    ok = _sample(capsys, stage, str(tmp_path / "s_ema"))
    assert ok.returncode == 0 and "ema weights of" in ok.stdout, ok.stderr[-2000:]
    raw = _sample(capsys, stage, str(tmp_path / "s_raw"), "--weights", "raw")
    assert raw.returncode == 0 and "raw weights of" in raw.stdout, raw.stderr[-2000:]
