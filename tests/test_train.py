"""Training on the tiny preset: the CLI, resume, preemption, fault injection, meshes, processes.

Runs go through `uniimage-train` in subprocesses (as users run it) where the acceptance criteria
speak of the command, of SIGTERM, of fake devices or of several processes; the step function is
driven directly for fault injection.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.checkpoints.loader import load_uniimage
from tests.xla_env import with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "configs", "t2i_pretrain.py")
# The one-process run (`_train_cmd(workdir, *REFERENCE_RUN)`) that the 8-device and two-process
# runs must match: made once per session by the `tiny_t2i_stage` fixture (tests/conftest.py).
# Its held-out loss (every 3 steps, 6 examples) does not touch the weights.
REFERENCE_RUN = ("--config.max_steps=3", "--config.checkpoint.every_steps=3",
                 "--config.eval.every_steps=3", "--config.eval.num_examples=6")


def _train_cmd(workdir, *overrides, config=T2I + ":tiny"):
    return [sys.executable, "-m", "uniimage_jax.cli.train", f"--config={config}",
            f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint.async_save=False",
            *overrides]


def _run(cmd, env=None, timeout=600):
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _losses(stage_dir, key="loss"):
    """{step: loss} from metrics.jsonl (the last record of a step wins); key="eval/loss": the
    held-out loss records, whole."""
    out = {}
    with open(os.path.join(stage_dir, "metrics.jsonl")) as fh:
        for line in fh:
            m = json.loads(line)
            if key in m:
                out[m["step"]] = m["loss"] if key == "loss" else m
    return out


def _steps(stage_dir):
    return sorted(int(d) for d in os.listdir(stage_dir) if d.isdigit())


def _trainable(params):
    return {k: params[k] for k in ("dit", "connector", "metaquery")}


def test_cli_trains_checkpoints_and_resumes(tmp_path):
    w = str(tmp_path / "w")
    _run(_train_cmd(w, "--config.max_steps=6", "--config.checkpoint.every_steps=3"))
    stage = os.path.join(w, "t2i_pretrain")
    assert _steps(stage) == [3, 6]
    first = _losses(stage)
    assert sorted(first) == list(range(1, 7))
    out = _run(_train_cmd(w, "--config.max_steps=9", "--config.checkpoint.every_steps=3"))
    assert "resumed" in out.stderr and "step 6" in out.stderr
    assert _steps(stage)[-1] == 9
    resumed = _losses(stage)
    assert sorted(resumed) == list(range(1, 10))
    assert all(resumed[s] == first[s] for s in first)
    # unknown keys are rejected before anything runs
    bad = subprocess.run(_train_cmd(w, "--config.max_stepz=3"), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "max_stepz" in bad.stderr


def test_split_prompt_with_a_trainable_mllm_is_refused(tmp_path):
    """The prompt runs without gradients under split_prompt: a trainable MLLM would silently
    get truncated gradients, so the config is rejected before anything loads."""
    import pytest

    from uniimage_jax.train import trainer
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.config import base_config

    c = base_config(stage="s", task="t2i", preset="tiny")
    c.trainable = ("dit/.*", "mllm/model/language_model/layers_0/.*")
    with pytest.raises(ValueError,
                       match=r"split_prompt=True .* mllm/model/language_model/layers_0"):
        trainer.train(c, str(tmp_path))
    assert not os.listdir(tmp_path)
    c.split_prompt = False
    assert stage_setup.validate(c).config.mllm.num_hidden_layers == 4


def test_caption_task_config_errors_name_the_field(tmp_path):
    import pytest

    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.config import base_config

    c = base_config(stage="s", task="caption", preset="tiny")
    assert c.data.caption_dropout == 0.0
    with pytest.raises(ValueError, match="matches no mllm/ parameter"):
        stage_setup.validate(c)              # the default trainable set is the generation half
    c.trainable = ("mllm/.*",)
    assert stage_setup.validate(c) is not None
    c.data.caption_dropout = 0.1
    with pytest.raises(ValueError, match="caption_dropout=0.1"):
        stage_setup.validate(c)
    c.task = "t2x"
    with pytest.raises(ValueError, match="config.task must be one of"):
        stage_setup.validate(c)


def test_held_out_loss_config_errors_name_the_field():
    import pytest

    from uniimage_jax.errors import ConfigError
    from uniimage_jax.train import eval_loss, stage_setup
    from uniimage_jax.train.config import base_config

    def config(task="t2i", **fields):
        c = base_config(stage="s", task=task, preset="tiny")
        c.eval.every_steps = 10
        if task == "caption":
            c.trainable = ("mllm/.*",)
        for name, value in fields.items():
            *parents, leaf = name.split("__")
            node = c
            for part in parents:
                node = node[part]
            node[leaf] = value
        return c

    eval_loss.check_config(config())  # the defaults pass
    eval_loss.check_config(config("ti2i"))
    for fields, match in [
            ({"eval__every_steps": -1}, r"config\.eval\.every_steps must be an integer >= 0"),
            ({"eval__num_examples": 0}, r"config\.eval\.num_examples must be"),
            ({"eval__per_device_batch": 0}, r"config\.eval\.per_device_batch must be"),
            ({"eval__num_bands": 3}, r"config\.eval\.num_bands=3 must divide "
                                     r"config\.eval\.num_timesteps=10"),
            ({"eval__seed": 2**32}, r"config\.eval\.seed must be < 2\*\*32"),
            ({"data__source": "jsonl"}, r"config\.eval\.data\.source='synthetic'")]:
        with pytest.raises(ConfigError, match=match):
            stage_setup.validate(config(**fields))
    with pytest.raises(ConfigError, match=r"config\.eval\.every_steps=10: .* config\.task="
                                          r"'caption' has none"):
        stage_setup.validate(config("caption", data__caption_dropout=0.0))


# The held-out loss every 2 steps, and an EMA that copies the weights up to step 6: until then the
# EMA evaluation evaluates the same weights again (bitwise equal), afterwards other weights.
HELD_OUT = ("--config.eval.every_steps=2", "--config.eval.num_examples=4",
            "--config.ema.enabled=True", "--config.ema.start_step=6")


def test_sigterm_then_resume_repeats_the_uninterrupted_run_bitwise(tmp_path):
    """Also the held-out loss: bitwise the same after a resume; it moves when the weights move
    and not otherwise."""
    steps = "--config.max_steps=14"
    ref = str(tmp_path / "ref")
    _run(_train_cmd(ref, steps, *HELD_OUT))
    reference = _losses(os.path.join(ref, "t2i_pretrain"))
    held_out = _losses(os.path.join(ref, "t2i_pretrain"), "eval/loss")
    assert sorted(held_out) == list(range(0, 15, 2))
    assert set(held_out[0]) == {"step", *(f"eval/{w}loss{band}" for w in ("", "ema_") for band in
                                          ("", "_t0.0-0.2", "_t0.2-0.4", "_t0.4-0.6",
                                           "_t0.6-0.8", "_t0.8-1.0"))}
    values = [r["eval/loss"] for r in held_out.values()]
    assert len(set(values)) == len(values)  # every evaluation saw other weights
    for s, r in held_out.items():  # the same weights twice: the same bits; others: not
        assert (r["eval/ema_loss"] == r["eval/loss"]) == (s <= 6), (s, r)

    w = str(tmp_path / "w")
    stage = os.path.join(w, "t2i_pretrain")
    proc = subprocess.Popen(_train_cmd(w, steps, *HELD_OUT), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline:
        if os.path.exists(os.path.join(stage, "metrics.jsonl")) and len(_losses(stage)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 42, err[-3000:]  # stopped early after saving: "restart me"
    assert "SIGTERM" in err
    interrupted_at = _steps(stage)[-1]
    assert 4 <= interrupted_at < 14, interrupted_at
    _run(_train_cmd(w, steps, *HELD_OUT))
    resumed = _losses(stage)
    assert sorted(resumed) == sorted(reference)
    for s in reference:  # bitwise: the JSON floats are exact float32 values
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])
    assert _losses(stage, "eval/loss") == held_out  # every band, EMA too, to the bit


def test_fsdp_mesh_on_8_fake_devices_matches_one_device(tmp_path, tiny_t2i_stage):
    common = list(REFERENCE_RUN)
    one = tiny_t2i_stage["workdir"]
    eight = str(tmp_path / "eight")
    _run(_train_cmd(eight, *common, "--config.mesh.data=2", "--config.mesh.fsdp=4"),
         env={"XLA_FLAGS": with_devices(8)})
    _, p1, _ = load_uniimage(os.path.join(one, "t2i_pretrain"))
    _, p8, _ = load_uniimage(os.path.join(eight, "t2i_pretrain"))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         _trainable(p1), _trainable(p8)))
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(_trainable(p1)))
    assert max(moved) <= 1e-5 * scale, max(moved)


def test_two_processes_match_one(tmp_path, tiny_t2i_stage):
    """Also the held-out loss (6 examples: one call of 2 x 4 rows, two calls of 4 on one device,
    padded): bitwise the same for the same weights (step 0)."""
    common = list(REFERENCE_RUN)
    one = tiny_t2i_stage["workdir"]
    two = str(tmp_path / "two")
    import socket

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["bash", os.path.join(ROOT, "launch", "multiprocess_train.sh"), "--local", "2", "--cpu",
           "--port", str(port), "--stage", "t2i_pretrain", "--preset", "tiny", "--workdir", two,
           "--log-dir", str(tmp_path / "logs"), "--",
           "--config.log_every=1", "--config.checkpoint.async_save=False", *common]
    _run(cmd)
    _, p1, _ = load_uniimage(os.path.join(one, "t2i_pretrain"))
    _, p2, _ = load_uniimage(os.path.join(two, "t2i_pretrain"))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         _trainable(p1), _trainable(p2)))
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(_trainable(p1)))
    assert max(diffs) <= 1e-5 * scale, max(diffs)
    l1, l2 = _losses(os.path.join(one, "t2i_pretrain")), _losses(os.path.join(two, "t2i_pretrain"))
    assert sorted(l1) == sorted(l2)
    assert all(abs(l1[s] - l2[s]) <= 1e-5 * abs(l1[s]) for s in l1)
    e1 = _losses(os.path.join(one, "t2i_pretrain"), "eval/loss")
    e2 = _losses(os.path.join(two, "t2i_pretrain"), "eval/loss")
    assert sorted(e1) == sorted(e2) == [0, 3]
    assert e1[0] == e2[0]  # the same weights: every band to the bit
    assert all(abs(e1[3][k] - e2[3][k]) <= 1e-5 * e1[3][k] for k in e1[3] if k != "step")


def _tiny_setup(tmp_path, batch_size=4):
    import importlib.util

    from uniimage_jax.data.pipeline import make_train_iterator
    from uniimage_jax.train import step as train_step
    from uniimage_jax.train import batches
    from uniimage_jax.train import stage_setup
    from uniimage_jax.checkpoints.partition import partition_params
    from uniimage_jax.train.optimizer import make_optimizer

    spec = importlib.util.spec_from_file_location("t2i", T2I)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    model = stage_setup.build_model(config)
    processor = stage_setup.load_processor_for(config, model, str(tmp_path))
    trainable, frozen = partition_params(model.init(jax.random.PRNGKey(0)), list(config.trainable))
    tx = make_optimizer(config.optimizer)
    state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                  opt_state=tx.init(trainable), rng=jax.random.PRNGKey(0))
    step = jax.jit(train_step.make_train_step(model, tx, config), static_argnums=(3,))
    it = make_train_iterator(config.data, task="t2i", batch_size=batch_size, seed=0,
                             image_size=model.config.image_size)

    def batch_stream():
        while True:
            arrays, _ = batches.prepare_batch(next(it), processor, model, config, "t2i")
            yield {k: jnp.asarray(v) for k, v in arrays.items()}
    return state, frozen, step, batch_stream()


def _bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def test_fault_injection_skips_bitwise_and_frozen_stay_frozen(tmp_path):
    state, frozen, step, batches = _tiny_setup(tmp_path)
    frozen_before = jax.device_get(frozen)
    start = jax.device_get(state.params)
    for _ in range(30):  # past the tiny warm-up (20 steps)
        state, m = step(state, frozen, next(batches), None)
    assert int(m["spike/num_skipped"]) == 0
    good = next(batches)
    for name, bad in [("NaN loss", {**good, "target": good["target"] * jnp.nan}),
                      ("100x gradient spike", {**good, "target": good["target"] * 100.0})]:
        before = jax.device_get(state)
        state, m = step(state, frozen, bad, None)
        assert bool(m["spike/skipped"]), name
        assert _bitwise_equal(state.params, before.params), name
        assert _bitwise_equal(state.opt_state.inner_state, before.opt_state.inner_state), name
    assert int(m["spike/num_skipped"]) == 2
    for _ in range(200):  # a normal run skips nothing
        state, m = step(state, frozen, next(batches), None)
    assert int(m["spike/num_skipped"]) == 2 and np.isfinite(float(m["loss"]))
    assert _bitwise_equal(frozen, frozen_before)  # never written, never donated
    for part in ("dit", "connector", "metaquery"):
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                             state.params[part], start[part]))
        assert any(moved), part
    assert set(state.params) == {"dit", "connector", "metaquery"}
    assert "mllm" in frozen and "extra_embedding_rows" in frozen


def test_messy_dataset_trains_through_and_counts_skips(tmp_path):
    from tests.test_data import write_messy_dataset

    manifest, bad, _ = write_messy_dataset(tmp_path / "data")
    w = str(tmp_path / "w")
    out = _run(_train_cmd(w, "--config.max_steps=4", "--config.batch_size=4",
                          "--config.data.source=jsonl", f"--config.data.path={manifest}"))
    with open(os.path.join(w, "t2i_pretrain", "metrics.jsonl")) as fh:
        last = [json.loads(line) for line in fh][-1]
    assert last["skipped_samples"] == len(bad) == 3
    for f in bad:
        assert f in out.stderr, f
