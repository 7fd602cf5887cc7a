"""Mesh, logical sharding rules, sharded init / training on 8 fake CPU devices, and two-process
distributed start-up.

The device-count checks run in subprocesses (`python -m tests.test_sharding <check>`) because
XLA_FLAGS=--xla_force_host_platform_device_count must be set before JAX starts.
"""
import json
import logging
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from uniimage_jax.models import layers
from uniimage_jax.train import distributed, sharding
from tests.xla_env import with_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_subprocess(args, env_extra, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env_extra)
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        if k not in env_extra:
            env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "tests.test_sharding", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


EIGHT_DEVICE_CHECKS = ("mesh", "sharded_init", "sgd_matches_single_device", "batch_errors",
                       "optimizer_state_follows_params")


@pytest.fixture(scope="module")
def eight_device_run():
    """All 8-device checks in ONE subprocess (JAX start-up is the expensive part)."""
    proc = _run_subprocess(list(EIGHT_DEVICE_CHECKS),
                           {"XLA_FLAGS": with_devices(8)})
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


# ------------------------------------------------------------------ in-process rule resolution

MESH_2x4x2 = AbstractMesh((2, 4, 2), sharding.MESH_AXES)


def test_default_rules_map_logical_names():
    rules = sharding.rules_from_config(())
    spec = lambda names, shape: sharding.logical_to_partition_spec(names, shape, MESH_2x4x2, rules)
    assert spec(("embed", "mlp"), (16, 32)) == (P("fsdp", "tensor"), [])
    assert spec(("heads", "embed"), (8, 16)) == (P("tensor", "fsdp"), [])
    assert spec(("layers", "embed", "kv"), (3, 16, 4)) == (P(None, "fsdp", "tensor"), [])
    assert spec(("batch", None), (16, 5)) == (P(("data", "fsdp"), None), [])
    assert spec(("norm",), (16,)) == (P(None), [])
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 8, 6)) == (
        P(None, None, "fsdp", "tensor"), [])
    # A mesh axis is used once per array: the second "mlp" stays replicated.
    assert spec(("mlp", "mlp"), (4, 4)) == (P("tensor", None), [])
    # Non-dividing dims fall back to replicated and are reported.
    assert spec(("embed", "vocab"), (16, 7)) == (P("fsdp", None), [1])
    assert spec(("batch",), (6,)) == (P(None), [0])


def test_rules_from_config_overrides_and_errors():
    rules = dict(sharding.rules_from_config({"embed": None, "act_len": "tensor"}))
    assert rules["embed"] is None and rules["act_len"] == "tensor" and rules["mlp"] == "tensor"
    rules = dict(sharding.rules_from_config([("batch", ["data"])]))
    assert rules["batch"] == "data"
    with pytest.raises(ValueError, match="not mesh axes"):
        sharding.rules_from_config([("embed", "model")])
    with pytest.raises(ValueError, match="twice"):
        sharding.rules_from_config([("embed", None), ("embed", "fsdp")])
    with pytest.raises(ValueError, match="'embd' has no sharding rule"):
        sharding.logical_to_partition_spec(("embd",), (4,), MESH_2x4x2,
                                           sharding.DEFAULT_LOGICAL_RULES)
    with pytest.raises(ValueError, match="rank"):
        sharding.logical_to_partition_spec(("embed",), (4, 4), MESH_2x4x2,
                                           sharding.DEFAULT_LOGICAL_RULES)


def test_unknown_logical_name_error_names_the_parameter():
    class Typo(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.dense(4, ("embd", "mlp"), name="proj")(x)

    mesh = sharding.make_mesh({"data": -1})
    with pytest.raises(ValueError, match=r"\['proj'\]\['kernel'\].*'embd' has no sharding rule"):
        sharding.sharded_init(Typo().init, mesh, sharding.DEFAULT_LOGICAL_RULES,
                              jax.random.key(0), jnp.ones((2, 3)))


# --------------------------------------------------------------------- 8 fake devices (subprocess)

@pytest.mark.parametrize("check", EIGHT_DEVICE_CHECKS)
def test_on_eight_cpu_devices(eight_device_run, check):
    returncode, out, err = eight_device_run
    assert f"CHECK {check} OK" in out, f"check {check} failed:\n{out}\n{err[-6000:]}"


# -------------------------------------------------------------------- two processes (subprocess)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_initialisation():
    port = _free_port()
    procs = [_run_subprocess(["two_process"], {
        distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
        distributed.ENV_NUM_PROCESSES: "2",
        distributed.ENV_PROCESS_ID: str(pid),
        "XLA_FLAGS": with_devices(2),
    }) for pid in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, f"process failed:\n{out}\n{err[-4000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Process i contributes rows filled with i + 1: 2 rows x 3 cols on each of 2 local devices.
    expected_sum = float(sum((i + 1) * 4 * 3 for i in range(2)))
    for pid, r in enumerate(results):
        assert r["process_index"] == pid and r["process_count"] == 2 and r["device_count"] == 4
        assert r["is_main"] == (pid == 0)
        assert r["global_shape"] == [8, 3]
        assert r["pos_shape"] == [3, 8, 2] and r["pos_first_rows_sum"] == 3 * 4 * 2 * 1
        assert r["sum"] == expected_sum and r["psum"] == expected_sum
        assert r["logged"] == (pid == 0)


def test_single_process_is_a_no_op(monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_PROCESS_ID, "SLURM_JOB_ID",
              "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    distributed.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized() and distributed.is_main_process()
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
        distributed.maybe_initialize_distributed()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match="not in"):
        distributed.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized()


# ================================================================== subprocess checks (8 devices)

class TinyMLP(nn.Module):
    """Logical axes on every parameter except `plain` (unannotated -> replicated)."""

    @nn.compact
    def __call__(self, x):
        h = layers.gelu_tanh(layers.dense(32, ("embed", "mlp"), name="fc1")(x))
        h = layers.dense(16, ("mlp", "embed"), name="fc2")(h)
        odd = layers.dense(3, ("embed", "vocab"), name="odd")(h)  # 3 does not divide tensor=2
        plain = nn.Dense(1, name="plain")(h)
        return plain + odd.sum(-1, keepdims=True)


def _check_mesh():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert dict(sharding.make_mesh({"data": -1, "fsdp": 4}).shape) == {
        "data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": -1}).shape)["tensor"] == 2
    assert dict(sharding.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    bad = [({"data": 3, "fsdp": 2}, "has 6 devices but 8"),
           ({"data": -1, "fsdp": 3}, "does not divide the 8 devices"),
           ({"data": -1, "fsdp": -1}, "at most one"),
           ({"data": 2, "model": 4}, "unknown mesh axes"),
           ({"data": 0, "fsdp": 8}, "positive int")]
    for cfg, msg in bad:
        try:
            sharding.make_mesh(cfg)
        except ValueError as e:
            assert msg in str(e), (cfg, str(e))
        else:
            raise AssertionError(f"no error for mesh {cfg}")


def _check_sharded_init():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = TinyMLP()
    x = jnp.ones((4, 16), jnp.float32)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(sharding.__name__).addHandler(handler)
    params, shardings = sharding.sharded_init(model.init, mesh, sharding.DEFAULT_LOGICAL_RULES,
                                              jax.random.key(0), x)
    p = params["params"]
    expect = {("fc1", "kernel"): (P("fsdp", "tensor"), (8, 16)),
              ("fc1", "bias"): (P("tensor"), (16,)),
              ("fc2", "kernel"): (P("tensor", "fsdp"), (16, 8)),
              ("odd", "kernel"): (P("fsdp", None), (8, 3)),  # non-dividing vocab dim replicated
              ("plain", "kernel"): (P(), (16, 1))}  # unannotated: replicated
    for (mod, name), (spec, shard_shape) in expect.items():
        arr = p[mod][name]
        assert not isinstance(arr, nn.Partitioned)
        assert arr.sharding.spec == spec, (mod, name, arr.sharding.spec)
        assert shardings["params"][mod][name].spec == spec
        assert all(s.data.shape == shard_shape for s in arr.addressable_shards), (mod, name)
    assert any("odd" in r.getMessage() and "replicated" in r.getMessage() for r in records)
    # Same values as an unsharded init.
    ref = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _check_sgd_matches_single_device():
    from tests.parity import assert_rel_close

    model = TinyMLP()
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(5, 16, 16)).astype(np.float32)
    ys = rng.normal(size=(5, 16, 1)).astype(np.float32)

    def loss_fn(params, x, y):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def sgd_step(params, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)

    def perturb(params):
        # Non-trivial values everywhere (biases are zero-initialised).
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        return tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    # Reference: one device.
    ref = jax.jit(lambda k, x: perturb(nn.meta.unbox(model.init(k, x))))(jax.random.key(1), xs[0])
    ref_step = jax.jit(sgd_step)
    for x, y in zip(xs, ys):
        ref = ref_step(ref, x, y)
    assert all(len(a.devices()) == 1 for a in jax.tree.leaves(ref))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, shardings = sharding.sharded_init(model.init, mesh, sharding.DEFAULT_LOGICAL_RULES,
                                              jax.random.key(1), jnp.asarray(xs[0]))
    params = jax.jit(perturb, out_shardings=shardings)(params)
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(sgd_step, in_shardings=(shardings, batch_sh, batch_sh),
                   out_shardings=shardings, donate_argnums=(0,))
    with jax.set_mesh(mesh):
        for x, y in zip(xs, ys):
            xb, yb = sharding.shard_host_batch((x, y), mesh)
            assert xb.sharding.spec == P(("data", "fsdp")) and len(xb.devices()) == 8
            params = step(params, xb, yb)
    assert params["params"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref)):
        err = assert_rel_close(a, b, rtol=1e-5, name=jax.tree_util.keystr(path))
        print(f"rel err {jax.tree_util.keystr(path)}: {err:.2e}")


def _check_batch_errors():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    sharding.check_batch_divisible(16, mesh)
    for bad in (6, 0):
        try:
            sharding.check_batch_divisible(bad, mesh)
        except ValueError as e:
            assert f"batch size {bad}" in str(e) and "data=2 x fsdp=4" in str(e), str(e)
        else:
            raise AssertionError(f"no error for batch {bad}")
    try:
        sharding.shard_host_batch({"x": np.zeros((6, 2), np.float32)}, mesh)
    except ValueError as e:
        assert "batch size 6" in str(e) and "8 batch shards" in str(e), str(e)
    else:
        raise AssertionError("no error for a 6-row host batch on 8 batch shards")
    out = sharding.shard_host_batch({"x": np.arange(16, dtype=np.float32)}, mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(16))
    # M-RoPE positions (3, B, T) travel in the model's layout, split along their batch axis 1.
    pos = np.arange(3 * 16 * 5, dtype=np.int32).reshape(3, 16, 5)
    out = sharding.shard_host_batch({"position_ids": pos, "x": np.zeros((16, 2), np.float32)},
                                    mesh, batch_axes={"position_ids": 1})
    assert out["position_ids"].sharding.spec == P(None, ("data", "fsdp"))
    assert out["x"].sharding.spec == P(("data", "fsdp")), out["x"].sharding
    assert {s.data.shape for s in out["position_ids"].addressable_shards} == {(3, 2, 5)}
    np.testing.assert_array_equal(np.asarray(out["position_ids"]), pos)
    try:
        sharding.shard_host_batch({"position_ids": pos[:, :6]}, mesh,
                                  batch_axes={"position_ids": 1})
    except ValueError as e:
        assert "batch size 6" in str(e) and "8 batch shards" in str(e), str(e)
    else:
        raise AssertionError("no error for 6 position rows on 8 batch shards")


def _check_optimizer_state_follows_params():
    """The trainer's fresh optimiser state under fsdp=4: AdamW's moments are laid out exactly as
    their parameters, so each device holds a quarter of every fsdp-split moment (not all of it)."""
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.optimizer import default_optimizer_config, make_optimizer

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    params, _ = sharding.sharded_init(TinyMLP().init, mesh, sharding.DEFAULT_LOGICAL_RULES,
                                      jax.random.key(0), jnp.ones((4, 16), jnp.float32))
    trainable = params["params"]
    tx = make_optimizer(default_optimizer_config())
    state = stage_setup.initial_state(trainable, tx, mesh, seed=0, ema=False)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    assert len(adam) == 1, adam
    split = 0
    for moments in (adam[0].mu, adam[0].nu):
        for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(moments),
                                jax.tree.leaves(trainable)):
            name = jax.tree_util.keystr(path)
            assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (name, m.sharding, p.sharding)
            fsdp = "fsdp" in jax.tree.leaves(tuple(p.sharding.spec))
            for shard in m.addressable_shards:
                assert shard.data.size == (m.size // 4 if fsdp else m.size), (name, shard.data.shape)
            split += fsdp
    assert split >= 4, "too few fsdp-split leaves for the check to mean anything"
    for x in jax.tree.leaves(state.opt_state):
        if x.ndim == 0:  # counters and spike EMAs: one replicated scalar
            assert x.sharding.is_fully_replicated and x.sharding.mesh == mesh


def _two_process():
    """One of two processes: initialise, build a global array from local rows, reduce it."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("two_process")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    distributed.maybe_initialize_distributed()
    distributed.maybe_initialize_distributed()  # idempotent
    pid = jax.process_index()
    distributed.log_main("hello from %d", pid, logger=logger)
    distributed.sync("two_process_test")
    mesh = sharding.make_mesh({"data": -1})
    local = np.full((4, 3), pid + 1, np.float32)  # 2 rows per local device
    garr = sharding.shard_host_batch(local, mesh)
    total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, P()))(garr)
    # Positions (3, B, T): each process's rows land on axis 1, process 0's first.
    pos = sharding.shard_host_batch({"p": np.full((3, 4, 2), pid + 1, np.int32)}, mesh,
                                    batch_axes={"p": 1})["p"]
    pos_first = jax.jit(lambda p: jnp.sum(p[:, :4]),
                        out_shardings=jax.sharding.NamedSharding(mesh, P()))(pos)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a.sum(), ("data", "fsdp")),
                             mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P()))(garr)
    print(json.dumps({
        "process_index": pid, "process_count": jax.process_count(),
        "device_count": jax.device_count(), "is_main": distributed.is_main_process(),
        "global_shape": list(garr.shape), "sum": float(np.asarray(total)),
        "pos_shape": list(pos.shape), "pos_first_rows_sum": int(np.asarray(pos_first)),
        "psum": float(np.asarray(psum.addressable_shards[0].data)),
        "logged": any("hello from" in r.getMessage() for r in records)}))
    jax.distributed.shutdown()


CHECKS = {"mesh": _check_mesh, "sharded_init": _check_sharded_init,
          "sgd_matches_single_device": _check_sgd_matches_single_device,
          "batch_errors": _check_batch_errors,
          "optimizer_state_follows_params": _check_optimizer_state_follows_params,
          "two_process": _two_process}

if __name__ == "__main__":
    import traceback

    jax.config.update("jax_default_matmul_precision", "highest")
    failed = False
    for name in sys.argv[1:]:
        if name == "two_process":
            CHECKS[name]()
            continue
        try:
            CHECKS[name]()
            print(f"CHECK {name} OK", flush=True)
        except Exception:  # report every check, then fail
            failed = True
            print(f"CHECK {name} FAILED", flush=True)
            traceback.print_exc()
    sys.exit(1 if failed else 0)
