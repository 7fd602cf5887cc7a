"""Prompt length buckets and the every-N-steps stop check (issue 14, items 1 and 5).

- a row's loss and gradients do not depend on the bucket it is padded to;
- a batch is padded to the smallest bucket that holds its longest prompt;
- two processes pick the same bucket for every global batch (the run matches one process), and a
  SIGTERM sent to ONE of them stops both at the same multiple of `stop_check_every`, with a
  checkpoint there.
"""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uniimage_jax.errors import ConfigError
from uniimage_jax.processing.prompt_buckets import check_prompt_buckets, choose_prompt_bucket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "configs", "t2i_pretrain.py")
TINY_BUCKETS = (116, 120, 160)  # tiny prompts are 106 tokens + 0-15 caption tokens


def _tiny_config():
    spec = importlib.util.spec_from_file_location("t2i", T2I)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("tiny")


def test_bucket_fields_are_checked_and_the_smallest_holding_bucket_is_chosen():
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.config import base_config

    assert check_prompt_buckets([128, 192]) == (128, 192) and check_prompt_buckets(()) == ()
    for bad in ("128", (128, 128), (192, 128), (0, 64), (1.5,), (True,)):
        with pytest.raises(ConfigError, match="data.prompt_buckets"):
            check_prompt_buckets(bad)
    assert [choose_prompt_bucket(n, (128, 192)) for n in (1, 128, 129, 192)] == [128, 128, 192,
                                                                                  192]
    with pytest.raises(ValueError, match="largest prompt bucket 192"):
        choose_prompt_bucket(193, (128, 192))
    # tbac_3b t2i buckets reserve no image tokens; ti2i ones hold its 258 image tokens
    t2i = base_config(stage="s", task="t2i", preset="tbac_3b").data.prompt_buckets
    ti2i = base_config(stage="s", task="ti2i", preset="tbac_3b").data.prompt_buckets
    assert max(t2i) < 640 - 256 + 1 and min(ti2i) >= 104 + 258
    c = base_config(stage="s", task="caption", preset="tiny")
    c.data.caption_dropout = 0.0
    c.data.prompt_buckets = (128,)
    with pytest.raises(ConfigError, match="prompt_buckets is for t2i"):
        stage_setup.validate(c)
    c = _tiny_config()
    c.stop_check_every = 0
    with pytest.raises(ConfigError, match="stop_check_every"):
        stage_setup.validate(c)


def _batches(tmp_path, config, batch_size, count):
    from uniimage_jax.data.pipeline import make_train_iterator
    from uniimage_jax.train import stage_setup

    model = stage_setup.build_model(config)
    processor = stage_setup.load_processor_for(config, model, str(tmp_path))
    it = make_train_iterator(config.data, task="t2i", batch_size=batch_size, seed=0,
                             image_size=model.config.image_size)
    hosts = [next(it) for _ in range(count)]
    return model, processor, hosts


def test_a_batch_is_padded_to_the_smallest_bucket_holding_its_longest_prompt(tmp_path):
    from uniimage_jax.train import batches

    config = _tiny_config()
    model, processor, hosts = _batches(tmp_path, config, 4, 6)
    lengths = set()
    for host in hosts:
        full, _ = batches.prepare_batch(host, processor, model, config, "t2i")  # no buckets: 160
        config.data.prompt_buckets = TINY_BUCKETS
        bucketed, _ = batches.prepare_batch(host, processor, model, config, "t2i")
        config.data.prompt_buckets = ()
        longest = int(full["attention_mask"].sum(1).max())
        t = bucketed["input_ids"].shape[1]
        assert t == min(b for b in TINY_BUCKETS if b >= longest), (t, longest)
        lengths.add(t)
        for key in ("input_ids", "attention_mask", "position_ids"):  # only padding went
            np.testing.assert_array_equal(bucketed[key], full[key][..., -t:], err_msg=key)
        np.testing.assert_array_equal(bucketed["target"], full["target"])
    assert len(lengths) > 1, lengths  # the data does exercise several buckets


def test_loss_and_gradients_of_a_row_do_not_depend_on_its_bucket(tmp_path):
    """The official split-prompt path (the prompt forward once, gradients over the queries)."""
    from uniimage_jax.train import batches
    from uniimage_jax.checkpoints.partition import merge_params, partition_params

    config = _tiny_config()
    model, processor, hosts = _batches(tmp_path, config, 2, 1)
    host = hosts[0]
    config.data.prompt_buckets = (160,)
    wide, _ = batches.prepare_batch(host, processor, model, config, "t2i")
    longest = int(wide["attention_mask"].sum(1).max())
    config.data.prompt_buckets = (longest, 160)
    tight, _ = batches.prepare_batch(host, processor, model, config, "t2i")
    assert tight["input_ids"].shape[1] == longest < 160

    trainable, frozen = partition_params(model.init(jax.random.PRNGKey(0)),
                                         list(config.trainable))
    rng = jax.random.PRNGKey(3)

    def loss_and_grads(arrays):
        batch = {k: jnp.asarray(v) for k, v in arrays.items()}

        def loss_fn(p):
            return model.loss(merge_params(p, frozen), batch, rng, split_prompt=True)[0]
        return jax.jit(jax.value_and_grad(loss_fn))(trainable)

    with jax.default_matmul_precision("highest"):
        loss_w, grads_w = loss_and_grads(wide)
        loss_t, grads_t = loss_and_grads(tight)
    assert abs(float(loss_w) - float(loss_t)) <= 1e-6 * abs(float(loss_w)), (loss_w, loss_t)
    # The whole gradient, relative L2. fp32 rounding alone moves it by ~1e-6 here: padding the
    # same batch by ONE more column changes it by 0.9e-6 (the summation order of the prompt's
    # matmuls changes), so 2e-6 is the tolerance; a real dependence on the padding (positions,
    # masks) moves it by orders of magnitude more.
    diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, grads_w, grads_t))
    rel = float(diff / optax.tree.norm(grads_w))
    assert rel <= 2e-6, rel
    assert float(optax.tree.norm(grads_w)) > 0


# ------------------------------------------------------------------------ two processes


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "uniimage_jax.cli.train", f"--config={T2I}:tiny",
            f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint.async_save=False",
            "--config.batch_size=4", f"--config.data.prompt_buckets={TINY_BUCKETS}",
            "--config.stop_check_every=4", "--config.checkpoint.every_steps=1000", *overrides]


def _records(stage):
    path = os.path.join(stage, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


def _steps(stage):
    return sorted(int(d) for d in os.listdir(stage) if d.isdigit())


def test_two_processes_agree_on_buckets_and_stop_together_on_one_sigterm(tmp_path):
    max_steps = "--config.max_steps=40"
    two = str(tmp_path / "two")
    stage = os.path.join(two, "t2i_pretrain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i)}
        logs.append(open(tmp_path / f"process_{i}.log", "w+"))
        procs.append(subprocess.Popen(_cmd(two, max_steps), cwd=ROOT, env=env, text=True,
                                      stdout=logs[i], stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 600
        while time.time() < deadline and len(_records(stage)) < 2:
            assert all(p.poll() is None for p in procs), "a process ended early"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # only process 1 is preempted
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = []
    for f in logs:
        f.seek(0)
        text.append(f.read())
        f.close()
    assert [p.returncode for p in procs] == [42, 42], text[1][-3000:]
    stopped = _steps(stage)[-1]
    assert stopped % 4 == 0 and 4 <= stopped < 40, stopped
    assert all(f"SIGTERM: saving step {stopped}" in t for t in text)
    # One process, as far as the two got: max_steps does not change a step (the learning-rate
    # schedule's length is the config's optimizer.total_steps).
    one = str(tmp_path / "one")
    out = subprocess.run(_cmd(one, f"--config.max_steps={stopped}"), cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = _records(os.path.join(one, "t2i_pretrain"))
    assert len({r["prompt_tokens"] for r in reference.values()}) > 1  # several buckets met
    got = _records(stage)
    assert sorted(got) == list(range(1, stopped + 1))
    for s, r in got.items():  # the same buckets, hence the same losses, as one process
        assert r["prompt_tokens"] == reference[s]["prompt_tokens"], s
        assert abs(r["loss"] - reference[s]["loss"]) <= 1e-5 * abs(reference[s]["loss"]), s


def test_the_flop_model_pads_like_the_trainer():
    """`bench.flops.bucket_probabilities` (closed form) against batches drawn at random and
    padded by the trainer's own bucket rule."""
    from uniimage_jax.bench import flops

    buckets, fixed, rows, dist = (128, 150, 158, 384), 104, 8, (10, 60)
    want = flops.bucket_probabilities(buckets, fixed, rows, dist, caption_dropout=0.1)
    g = np.random.default_rng(0)
    n = 20_000
    caps = g.integers(dist[0], dist[1] + 1, (n, rows)) * (g.random((n, rows)) >= 0.1)
    drawn = [choose_prompt_bucket(int(fixed + c.max()), buckets) for c in caps]
    for b in buckets:
        assert abs(drawn.count(b) / n - want[b]) < 0.015, (b, drawn.count(b) / n, want[b])
    assert abs(sum(want.values()) - 1) < 1e-12 and min(want[150], want[158], want[384]) > 0.05
