"""StageCheckpointer: bitwise round trip, keep-N, save grid, async, resharding, params-only
restore, strict errors, SIGTERM flag, and a two-process (multi-host) save / restore."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uniimage_jax.checkpoints.stage import StageCheckpointer, restore_params_only
from uniimage_jax.train import distributed


def make_state(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "params": {
            "blocks_0": {"attn": {"kernel": jax.random.normal(k[0], (8, 6)),
                                  "bias": jax.random.normal(k[1], (6,))}},
            "embed": jax.random.normal(k[2], (4, 8)).astype(jnp.bfloat16),
        },
        "opt_state": {"mu": jax.random.normal(k[3], (8, 6)), "count": jnp.int32(7 + seed)},
        "step": jnp.int32(100 + seed),
        "rng": jax.random.key(seed + 11),
    }


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_bitwise_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key), path
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8),
                                      err_msg=str(path))


CONFIG = {"stage": "t2i_pretrain", "optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "init_from": None}


def test_round_trip_bitwise_async_then_wait(tmp_path):
    state = make_state()
    data_state = {"epoch": 2, "position": 12345, "shards": ["a", "b"]}
    with StageCheckpointer(str(tmp_path), "t2i_pretrain", keep=3, save_every=10,
                           async_save=True) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, data_state, CONFIG)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        assert (tmp_path / "t2i_pretrain" / "10" / "state").is_dir()
        restored, data, config = ckpt.restore(abstract_state=abstract_of(state))
    assert_bitwise_equal(restored, state)
    assert data == data_state
    assert config == CONFIG


def test_grain_bytes_state_and_reopen(tmp_path):
    state = make_state(1)
    grain_state = b'{"next_index": 17, "worker_count": 0}'
    ckpt = StageCheckpointer(str(tmp_path), "finetune", save_every=5, async_save=False)
    ckpt.save(5, state, grain_state, CONFIG)
    ckpt.close()
    # A fresh manager (as after preemption) finds the step and restores the same bytes.
    ckpt = StageCheckpointer(str(tmp_path), "finetune", save_every=5)
    assert ckpt.latest_step() == 5
    restored, data, _ = ckpt.restore(5, abstract_state=abstract_of(state))
    ckpt.close()
    assert data == grain_state
    assert_bitwise_equal(restored, state)


def test_keep_n_save_grid_and_latest_step(tmp_path):
    state = make_state()
    with StageCheckpointer(str(tmp_path), "s", keep=2, save_every=10, async_save=True) as ckpt:
        saved = [step for step in range(1, 41) if ckpt.save(step, state, {"i": step}, CONFIG)]
        assert saved == [10, 20, 30, 40]
        assert ckpt.save(43, state, {"i": 43}, CONFIG, force=True)  # off-grid, forced
        ckpt.wait()
        assert ckpt.all_steps() == [40, 43]
        assert ckpt.latest_step() == 43
        _, data, _ = ckpt.restore(abstract_state=abstract_of(state))
        assert data == {"i": 43}
        _, data, _ = ckpt.restore(40, abstract_state=abstract_of(state))
        assert data == {"i": 40}
    on_disk = sorted(int(p.name) for p in (tmp_path / "s").iterdir() if p.name.isdigit())
    assert on_disk == [40, 43]


def test_restore_onto_other_sharding(tmp_path):
    state = make_state()
    with StageCheckpointer(str(tmp_path), "s", save_every=1) as ckpt:
        ckpt.save(1, state, None, CONFIG)
        ckpt.wait()
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        spec = {"blocks_0/attn/kernel": P("data", "model"), "embed": P(None, "model")}

        def target(path, x):
            name = "/".join(str(getattr(k, "key", k)) for k in path[1:])
            pspec = spec.get(name, P())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, pspec))

        abstract = jax.tree_util.tree_map_with_path(target, state)
        restored, data, _ = ckpt.restore(abstract_state=abstract)
    assert data is None
    assert_bitwise_equal(restored, state)
    kernel = restored["params"]["blocks_0"]["attn"]["kernel"]
    assert isinstance(kernel.sharding, NamedSharding)
    assert kernel.sharding.spec == P("data", "model")
    assert restored["params"]["embed"].sharding.spec == P(None, "model")


def test_params_only_from_previous_stage(tmp_path, monkeypatch):
    prev = make_state(3)
    with StageCheckpointer(str(tmp_path), "t2i_pretrain", save_every=100) as ckpt:
        ckpt.save(100, make_state(2), None, CONFIG)
        ckpt.save(200, prev, {"x": 1}, CONFIG)
    abstract_params = abstract_of(prev["params"])
    for where in (tmp_path / "t2i_pretrain", tmp_path / "t2i_pretrain" / "200",
                  tmp_path / "t2i_pretrain" / "200" / "state"):
        params = StageCheckpointer.restore_params_only(str(where), abstract_params)
        assert_bitwise_equal(params, prev["params"])
    params = restore_params_only(str(tmp_path / "t2i_pretrain" / "100"), abstract_params)
    assert_bitwise_equal(params, make_state(2)["params"])
    monkeypatch.chdir(tmp_path)   # a relative stage path, as a user types it
    assert_bitwise_equal(restore_params_only("t2i_pretrain", abstract_params), prev["params"])


def test_strict_errors_name_the_problem(tmp_path):
    state = make_state()
    with StageCheckpointer(str(tmp_path), "s", save_every=1, async_save=False) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(abstract_state=abstract_of(state))
        ckpt.save(1, state, {}, CONFIG)
        ab = abstract_of(state)

        wrong_shape = jax.tree.map(lambda x: x, ab)
        wrong_shape["params"]["blocks_0"]["attn"]["bias"] = jax.ShapeDtypeStruct(
            (7,), jnp.float32, sharding=ab["params"]["embed"].sharding)
        with pytest.raises(ValueError, match=r"blocks_0/attn/bias: checkpoint shape \(6,\)"):
            ckpt.restore(abstract_state=wrong_shape)

        extra = jax.tree.map(lambda x: x, ab)
        extra["params"]["new_head"] = ab["params"]["blocks_0"]["attn"]["bias"]
        with pytest.raises(ValueError, match=r"missing from the checkpoint: \['params/new_head'\]"):
            ckpt.restore(abstract_state=extra)

        fewer = jax.tree.map(lambda x: x, ab)
        del fewer["opt_state"]
        with pytest.raises(ValueError, match="not in the restore target.*opt_state/count"):
            ckpt.restore(abstract_state=fewer)

        wrong_dtype = jax.tree.map(lambda x: x, ab)
        wrong_dtype["params"]["embed"] = jax.ShapeDtypeStruct((4, 8), jnp.float32,
                                                              sharding=ab["params"]["embed"].sharding)
        with pytest.raises(ValueError, match="embed: checkpoint dtype bfloat16"):
            ckpt.restore(abstract_state=wrong_dtype)

        unplaced = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ab)
        with pytest.raises(ValueError, match="without a sharding.*params/embed"):
            ckpt.restore(abstract_state=unplaced)

        with pytest.raises(FileNotFoundError, match="step 5 not found"):
            ckpt.restore(5, abstract_state=ab)

        # A missing item directory is named.
        import shutil
        shutil.rmtree(tmp_path / "s" / "1" / "data")
        with pytest.raises(FileNotFoundError, match=r"lacks item\(s\) \['data'\]"):
            ckpt.restore(1, abstract_state=ab)

    bad_params = {"blocks_0": ab["params"]["blocks_0"]}
    with pytest.raises(ValueError, match=r"not in the restore target.*params/embed"):
        # Other state entries (optimiser, step) are skipped, but every stored param must be used.
        restore_params_only(str(tmp_path / "s"), bad_params)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['params/extra'\]"):
        restore_params_only(str(tmp_path / "s"), {**bad_params, "embed": ab["params"]["embed"],
                                                   "extra": ab["params"]["embed"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_params_only(str(tmp_path / "nope"), bad_params)


def test_sigterm_inside_watch_sets_the_stop_flag_and_the_handler_comes_back_after():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.watch_sigterm():
        assert distributed.stop_requested(0, every=1) is False
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # Python runs handlers between bytecodes of the main thread
            if distributed.sigterm_received():
                break
            time.sleep(0.01)
        assert distributed.sigterm_received() is True
        assert distributed.stop_requested(7, every=10) is True  # one process: every step
    assert signal.getsignal(signal.SIGTERM) is before


MULTIPROCESS_WORKER = r'''
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from uniimage_jax.checkpoints.stage import StageCheckpointer

mesh = Mesh(np.array(jax.devices()).reshape(4), ("data",))
full = np.arange(32, dtype=np.float32).reshape(8, 4)
w = jax.make_array_from_callback((8, 4), NamedSharding(mesh, P("data")), lambda i: full[i])
replicated = NamedSharding(mesh, P())
state = {"params": {"w": w}, "step": jax.device_put(jnp.int32(3), replicated)}
ckpt = StageCheckpointer(sys.argv[3], "t2i_pretrain", save_every=1)
pid = jax.process_index()
ckpt.save(1, state, {"process": pid, "position": 10 + pid}, {"a": 1})
ckpt.wait()
abstract = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=replicated)},
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
restored, data, config = ckpt.restore(abstract_state=abstract)
ckpt.close()
print("RESULT " + json.dumps({
    "w_equal": bool(np.array_equal(np.asarray(restored["params"]["w"].addressable_data(0)), full)),
    "step": int(restored["step"].addressable_data(0)), "data": data, "config": config}))
'''


def test_two_processes_shard_save_and_own_data_state(tmp_path):
    """Two CPU processes (gloo): a state sharded across both is saved by both and restored onto
    a replicated target; each process gets its own data iterator state back."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(MULTIPROCESS_WORKER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(worker), f"127.0.0.1:{port}", str(i),
                               str(tmp_path / "wd")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, out[-3000:]
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        assert result == {"w_equal": True, "step": 3, "data": {"process": i, "position": 10 + i},
                          "config": {"a": 1}}
    data_dir = tmp_path / "wd" / "t2i_pretrain" / "1" / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == ["process_0-of-2.json",
                                                               "process_1-of-2.json"]


def test_converted_directories_get_the_modes_of_the_umask(tmp_path):
    """A converted checkpoint and an export (safetensors writes its files 0o600, `mkdtemp` its
    folder 0o700) land with the modes `mkdir` and `open` give under the umask, readable by the
    other users of a shared machine under 022, and no more than the umask allows under 027."""
    from uniimage_jax.checkpoints.converted import save_converted
    from uniimage_jax.convert.tbac_export import write_safetensors

    old = os.umask(0o022)
    try:
        for mask in (0o022, 0o027):
            os.umask(mask)
            written = [save_converted(str(tmp_path / f"conv{mask:o}"), {"w": np.ones(3)},
                                      {"kind": "x"}),
                       write_safetensors({"w": np.ones(3, np.float32)},
                                         str(tmp_path / f"export{mask:o}"),
                                         json_files={"config.json": {}})]
            for root in written:
                modes = {}
                for folder, dirs, files in os.walk(root):
                    for name in [""] + dirs + files:
                        path = os.path.join(folder, name)
                        modes[path] = os.stat(path).st_mode & 0o777
                dirs_ok = {p for p, m in modes.items() if os.path.isdir(p) and m == 0o777 & ~mask}
                files_ok = {p for p, m in modes.items() if os.path.isfile(p)
                            and m == 0o666 & ~mask}
                assert dirs_ok | files_ok == set(modes), {p: oct(m) for p, m in modes.items()}
                assert any(p.endswith(".safetensors") for p in files_ok) or \
                    any("params" in p for p in files_ok)
    finally:
        os.umask(old)
