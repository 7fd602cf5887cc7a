"""Every path a user may put on Cloud Storage, end to end against the local emulator (`gcs_bucket`).

A latent cache is written to the bucket (the same bytes as a local one). One tiny LoRA training
stage trains from it with `--workdir gs://...` (the `uniimage-train` command, in a subprocess
whose current directory must stay empty), is cut back to a checkpoint and resumed, and its files
are checked: checkpoints (resume bitwise), metrics.jsonl, TensorBoard events, the run lock, the
sample sheet, the profiler trace, the tiny processor. A second stage starts from it (`init_from`
on the bucket, lineage). The three runs share one compiled step. The record-size cache and
buckets.json are written where the trainer writes them, by the functions it calls. Exports,
converters, sampling and understanding read from and write to the bucket and give the same bytes
/ pixels / text as with local paths.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.shared_runs import made_once
from uniimage_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "configs", "t2i_pretrain.py")
LORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0",
        "--config.trainable=('connector/.*', 'metaquery/.*')")
STAGE = "t2i_pretrain"
NUM_IMAGES = 16


@pytest.fixture(scope="module", autouse=True)
def local_cache(tmp_path_factory):
    """Copies of remote files (processors, checkpoints to convert) go to a temporary folder, not
    to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIIMAGE_CACHE", str(tmp_path_factory.mktemp("uniimage_cache")))
        yield


# --------------------------------------------------------------------------- cheap checks first


def test_orbax_saves_a_state_of_many_arrays_on_the_bucket(gcs_bucket):
    """tensorstore commits a state of ~100 arrays to its OCDBT manifest in several writes, each
    conditional on the generation it read back: the emulator must send that generation."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    state = {f"a{i}": jnp.arange(8.0) + i for i in range(100)}
    with ocp.CheckpointManager(f"{gcs_bucket}/gcs_paths/orbax_many") as manager:
        manager.save(1, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        restored = manager.restore(1, args=ocp.args.StandardRestore(state))
    for i in (0, 57, 99):
        np.testing.assert_array_equal(restored[f"a{i}"], np.arange(8.0) + i)


def test_directories_are_uploaded_with_their_json_files_last(gcs_bucket, tmp_path):
    """A reader that waits for a directory's JSON (a converted checkpoint's config) never sees
    an interrupted upload as complete: the emulator's generations are creation times."""
    for name in ("params/a.bin", "params/sub/b.bin", "z.bin", "config.json", "keys.json"):
        os.makedirs(os.path.dirname(tmp_path / "d" / name), exist_ok=True)
        (tmp_path / "d" / name).write_bytes(name.encode())
    dest = f"{gcs_bucket}/gcs_paths/upload_dir"
    storage.upload_dir(tmp_path / "d", dest)
    found = storage._fsspec(dest).find(dest, detail=True)
    made = {name.split("/upload_dir/", 1)[1]: int(info["generation"])
            for name, info in found.items()}
    assert sorted(made) == ["config.json", "keys.json", "params/a.bin", "params/sub/b.bin",
                            "z.bin"]
    others = max(v for k, v in made.items() if not k.endswith(".json"))
    assert others < made["config.json"] < made["keys.json"]
    assert storage.read_bytes(f"{dest}/params/sub/b.bin") == b"params/sub/b.bin"


def test_start_up_checks_stat_paths_on_the_bucket(gcs_bucket):
    from uniimage_jax.errors import UserError
    from uniimage_jax.train.config import base_config
    from uniimage_jax.train.config_paths import check_paths_exist

    there = f"{gcs_bucket}/gcs_paths/startup/vae"
    storage.write_text(f"{there}/uniimage_config.json", "{}")
    c = base_config(stage="s", task="t2i", preset="tiny")
    c.pretrained.vae = there
    check_paths_exist(c)  # a directory on the bucket is one stat
    c.init_from = f"{gcs_bucket}/gcs_paths/startup/t2i_pretrian"  # a typo
    with pytest.raises(UserError, match=r"config.init_from='gs://.*t2i_pretrian' does not exist"):
        check_paths_exist(c)
    c.init_from = ""
    c.data.source, c.data.tfds_data_dir = "tfds", f"{gcs_bucket}/tfds"
    with pytest.raises(UserError, match="tfds_data_dir=.*ArrayRecord, which opens local files"):
        check_paths_exist(c)


def test_metrics_log_on_the_bucket_appends_across_runs(gcs_bucket):
    """An object cannot be appended to: the log is rewritten whole at each sync, a later run
    continues it, and a line logged after the last sync is simply not there (never half)."""
    from uniimage_jax.train.run_log import JsonLinesLog

    path = f"{gcs_bucket}/gcs_paths/metrics/metrics.jsonl"
    first = JsonLinesLog(path, upload_every_s=3600)
    first.append({"step": 1})
    first.append({"step": 2})
    assert not storage.exists(path)  # not yet synced: at most every hour here
    first.sync()
    first.append({"step": 3})  # the "crash": never synced
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'
    second = JsonLinesLog(path, upload_every_s=0)  # a resumed run; every line uploaded
    second.append({"step": 3})
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    second.close()


def test_stage_lock_on_the_bucket_refuses_a_second_run(gcs_bucket):
    from uniimage_jax.train.workdir_lock import LOCK_FILE, LockHeldError, StageLock

    stage = f"{gcs_bucket}/gcs_paths/lock/t2i_pretrain"
    lock = f"{stage}/{LOCK_FILE}"
    other = {"host": "another-host", "pid": 1, "started": "then", "token": "theirs"}
    storage.write_text(lock, json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(LockHeldError, match="in use by another run: pid 1 on host 'another-host'"):
        StageLock(stage).acquire()
    storage.write_text(lock, json.dumps({**other, "heartbeat": time.time() - 3600}))
    with StageLock(stage) as held:  # a lock without a heartbeat for an hour is taken over
        record = json.loads(storage.read_text(lock))
        assert record["token"] == held.token and record["pid"] == os.getpid()
    assert not storage.exists(lock)


# ------------------------------------------------------------------- the training stage on gs://


def _manifest(folder) -> str:
    """A JSONL manifest of square images."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(NUM_IMAGES):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(
            os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a photo of thing {i}"}))
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_record_size_cache_and_bucket_histogram_on_the_bucket(gcs_bucket, tmp_path):
    """What the trainer writes into a gs:// workdir for aspect buckets, by the functions it
    calls: the image sizes read once (then read back instead of the files) and buckets.json."""
    from uniimage_jax.data.record_sizes import target_sizes
    from uniimage_jax.data.sources import JsonlSource
    from uniimage_jax.train.run_log import MetricsWriter

    workdir = f"{gcs_bucket}/gcs_paths/sizes"
    source = JsonlSource(_manifest(tmp_path / "data"), "t2i")
    sizes, unreadable = target_sizes(source, "t2i", cache_dir=workdir, progress=False)
    assert sizes.tolist() == [[40, 40]] * NUM_IMAGES and not unreadable
    (cached,) = storage.listdir(f"{workdir}/bucket_cache")
    assert json.loads(storage.read_text(f"{workdir}/bucket_cache/{cached}"))["sizes"] == \
        sizes.tolist()
    os.rename(tmp_path / "data" / "3.png", tmp_path / "data" / "3.moved")
    again, unreadable = target_sizes(source, "t2i", cache_dir=workdir, progress=False)
    assert again.tolist() == sizes.tolist() and not unreadable  # from the cache, not the files
    writer = MetricsWriter(f"{workdir}/stage")
    writer.buckets(0, {"32x32": NUM_IMAGES})
    writer.close()
    assert json.loads(storage.read_text(f"{workdir}/stage/buckets.json")) == \
        {"step": 0, "examples_per_bucket": {"32x32": NUM_IMAGES}}


@pytest.fixture(scope="module")
def latent_caches(gcs_bucket, tmp_path_factory):
    """The same latent cache written to the bucket and to a local directory."""
    import importlib.util

    from uniimage_jax.train.latent_cache import cache_latents

    spec = importlib.util.spec_from_file_location("t2i_pretrain", T2I)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    local = str(tmp_path_factory.mktemp("latents") / "cache")
    remote = f"{gcs_bucket}/gcs_paths/latents"
    for out in (remote, local):
        c = module.get_config("tiny")
        c.data.synthetic_num_samples = NUM_IMAGES
        result = cache_latents(c, out, shard_size=NUM_IMAGES // 2)
        assert result.complete and result.num_examples == NUM_IMAGES
    return remote, local


def test_latent_cache_on_the_bucket_matches_a_local_one(latent_caches, tmp_path, monkeypatch):
    from uniimage_jax.data.latent_records import LatentRecordSource

    remote, local = latent_caches
    assert storage.listdir(remote) == sorted(os.listdir(local))
    for name in os.listdir(local):
        if name.endswith(".array_record"):
            with open(os.path.join(local, name), "rb") as fh:
                assert storage.read_bytes(f"{remote}/{name}") == fh.read(), name
    monkeypatch.setenv("UNIIMAGE_CACHE", str(tmp_path / "cache"))
    on_bucket, on_disk = LatentRecordSource(remote, task="t2i"), LatentRecordSource(local)
    assert len(on_bucket) == len(on_disk) == NUM_IMAGES
    # grain's worker processes get the source pickled: each opens its own readers
    copied_source = pickle.loads(pickle.dumps(on_bucket))
    for i in (NUM_IMAGES - 1, 0, 9):
        a, b, c = on_bucket[i], on_disk[i], copied_source[i]
        expected = b.pop("latents")
        np.testing.assert_array_equal(a.pop("latents"), expected)
        np.testing.assert_array_equal(c.pop("latents"), expected)
        assert a == b == c
    copied = sorted(f for _, _, files in os.walk(tmp_path / "cache") for f in files)
    assert copied == ["shard-00000.array_record", "shard-00001.array_record"]


def _start(workdir: str, cwd: str, *overrides, cache: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uniimage_jax.cli.train", f"--config={T2I}:tiny",
           f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint.every_steps=2",
           "--config.checkpoint.async_save=False", *LORA, *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "UNIIMAGE_CACHE": cache}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{proc.args}:\n{out[-2000:]}\n{err[-5000:]}"
    return err


def _state_arrays(step_dir: str) -> dict:
    """The stored train state of one step as numpy arrays, by key path."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(storage.path(f"{step_dir}/state"))
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def stage_on_bucket(gcs_bucket, tmp_path_factory, latent_caches):
    """The tiny stage trained to step 4 on the bucket from the latent cache there, step 4 then
    deleted (as if the run had been preempted before saving it) and the same command run again
    (resume from step 2)."""
    tmp = tmp_path_factory.mktemp("gcs_stage")
    cwd, cache = str(tmp / "cwd"), str(tmp / "cache")
    os.makedirs(cwd)
    workdir = f"{gcs_bucket}/gcs_paths/train"
    stage = f"{workdir}/{STAGE}"
    data = ("--config.data.source=latents", f"--config.data.path={latent_caches[0]}",
            "--config.max_steps=4")
    first = _start(workdir, cwd, *data, "--config.sample_every=4", "--config.sample_steps=2",
                   "--config.profile.start_step=2", "--config.profile.num_steps=1", cache=cache)
    lock_seen = False
    while first.poll() is None:  # the lock is held on the bucket while the run trains
        lock_seen = lock_seen or storage.exists(f"{stage}/RUN_LOCK.json")
        time.sleep(0.5)
    _finish(first)
    step4 = _state_arrays(f"{stage}/4")
    storage.remove_tree(f"{stage}/4")
    resumed = _finish(_start(workdir, cwd, *data, cache=cache))
    return {"workdir": workdir, "stage": stage, "cwd": cwd, "lock_seen": lock_seen,
            "step4": step4, "resumed_log": resumed, "tmp": str(tmp), "cache": cache}


def _metrics(stage: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(f"{stage}/metrics.jsonl").splitlines()]


def test_stage_on_the_bucket_resumes_bitwise(stage_on_bucket):
    stage = stage_on_bucket["stage"]
    assert f"resumed {stage} at step 2" in stage_on_bucket["resumed_log"]
    logged = _metrics(stage)
    # The resumed run continued the first run's log (an object cannot be appended to).
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 3, 4]
    for a, b in zip(logged[2:4], logged[4:6]):  # bitwise (JSON floats are exact)
        a.pop("samples_per_s", None), b.pop("samples_per_s", None)  # a timing
        assert a == b
    again = _state_arrays(f"{stage}/4")
    assert again.keys() == stage_on_bucket["step4"].keys() and len(again) > 50
    for key, value in stage_on_bucket["step4"].items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def _tensorboard_scalars(data: bytes, tag: str) -> dict[int, float]:
    """{step: value} of `tag` in a TensorBoard event file, every record's checksums checked."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out, at = {}, 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        assert struct.unpack("I", data[at + 12 + length:at + 16 + length])[0] == \
            masked_crc32c(body)
        at += 16 + length
        event = event_pb2.Event.FromString(body)
        for value in event.summary.value:
            if value.tag == tag:
                out[event.step] = value.simple_value
    return out


def test_run_files_on_the_bucket(stage_on_bucket):
    stage, workdir = stage_on_bucket["stage"], stage_on_bucket["workdir"]
    logged = _metrics(stage)
    events = storage.listdir(f"{stage}/tensorboard")
    assert len(events) == 2 and all(e.startswith("events.out.tfevents.") for e in events)
    losses = [_tensorboard_scalars(storage.read_bytes(f"{stage}/tensorboard/{e}"), "train/loss")
              for e in events]
    first, second = sorted(losses, key=len, reverse=True)
    assert first == {m["step"]: pytest.approx(m["loss"], rel=1e-6) for m in logged[:4]}
    assert second == {m["step"]: pytest.approx(m["loss"], rel=1e-6) for m in logged[4:]}
    assert stage_on_bucket["lock_seen"] and not storage.exists(f"{stage}/RUN_LOCK.json")
    with Image.open(io.BytesIO(storage.read_bytes(f"{stage}/samples/step_0000004.png"))) as im:
        assert im.size == (2 * 32 + 2, 32)  # the two sample prompts, side by side
    traces = list(storage.path(f"{stage}/profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().length > 0
    assert storage.is_file(f"{workdir}/tiny_processor/tokenizer_config.json")
    # The latent shards were read through the local cache.
    copied = [f for _, _, files in os.walk(stage_on_bucket["cache"]) for f in files
              if f.endswith(".array_record")]
    assert copied
    # Nothing of the run landed in its current directory (a gs:// path taken for a local one).
    assert os.listdir(stage_on_bucket["cwd"]) == []


def test_stage_initialised_from_a_stage_on_the_bucket(stage_on_bucket, latent_caches):
    workdir = stage_on_bucket["workdir"]
    _finish(_start(workdir, stage_on_bucket["cwd"], "--config.stage=second",
                   f"--config.init_from={stage_on_bucket['stage']}",
                   "--config.data.source=latents", f"--config.data.path={latent_caches[0]}",
                   "--config.max_steps=1", cache=stage_on_bucket["cache"]))
    lineage = json.loads(storage.read_text(f"{workdir}/second/INIT_FROM.json"))
    assert lineage == {"init_from": stage_on_bucket["stage"], "step": 4}
    (line,) = _metrics(f"{workdir}/second")
    assert line["step"] == 1 and np.isfinite(line["loss"])


def _safetensors(path: str):
    """(header metadata, {name: array}) of a safetensors file, local or on the bucket."""
    from safetensors import safe_open

    with safe_open(storage.local_copy(path), framework="numpy") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_lora_stage_on_the_bucket_exports_to_the_bucket(stage_on_bucket, tmp_path):
    """export-lora and merge-lora from a stage on the bucket to the bucket give what they give
    from the same stage on a local disk."""
    from uniimage_jax.checkpoints import converted
    from uniimage_jax.cli import convert

    stage = stage_on_bucket["stage"]
    local_stage = storage.local_mirror(stage, cache_dir=str(tmp_path / "copy"))
    out = f"{stage_on_bucket['workdir']}/exports"
    for src, dst in ((stage, out), (local_stage, str(tmp_path / "exports"))):
        assert convert.main(["export-lora", "--src", src, "--dst", f"{dst}/lora"]) == 0
        assert convert.main(["merge-lora", "--src", src, "--dst", f"{dst}/merged"]) == 0
    # The same tensors and header metadata (safetensors orders the metadata's keys at random).
    a, b = (_safetensors(f"{d}/lora/pytorch_lora_weights.safetensors")
            for d in (out, str(tmp_path / "exports")))
    assert a[0] == b[0] and a[1].keys() == b[1].keys() and len(a[1]) > 10
    for key in a[1]:
        np.testing.assert_array_equal(a[1][key], b[1][key], err_msg=key)
    import jax

    a = converted.load_tbac(f"{out}/merged")
    b = converted.load_tbac(str(tmp_path / "exports" / "merged"))
    assert a[0] == b[0]
    jax.tree.map(np.testing.assert_array_equal, a[1], b[1])
    # --dst is refused when it exists on the bucket, before anything is loaded
    assert convert.main(["export-lora", "--src", stage, "--dst", f"{out}/lora"]) == 2


# --------------------------------------------------- converted checkpoints, exports, inference


def _standins(tmp_path_factory) -> dict:
    """The README tests' tiny checkpoints in the published layouts (shared, read-only)."""
    from tests.test_readme import _build_standins

    return made_once(tmp_path_factory, "readme_standins", _build_standins)


@pytest.fixture(scope="module")
def on_bucket(gcs_bucket, tmp_path_factory):
    """The shared tiny checkpoints, uploaded: {"local": ..., "remote": ...} of each."""
    built = _standins(tmp_path_factory)
    root = f"{gcs_bucket}/gcs_paths/published"
    local = {"tbac": built["tbac"], "processor": built["processor"],
             "dcae": os.path.join(built["names"], "dc-ae-f32c32-sana-1.0-diffusers")}
    remote = {name: f"{root}/{name}" for name in local}
    for name, path in local.items():
        storage.upload_dir(path, remote[name])
    return local, remote


def test_converter_and_export_to_the_bucket(on_bucket, tmp_path):
    import jax

    from uniimage_jax.checkpoints import converted
    from uniimage_jax.cli import convert

    local, remote = on_bucket
    mine = str(tmp_path / "vae")
    assert convert.main(["vae", "--src", remote["dcae"], "--dst", f"{remote['dcae']}_jax"]) == 0
    assert convert.main(["vae", "--src", local["dcae"], "--dst", mine]) == 0
    a, b = converted.load_dc_ae(f"{remote['dcae']}_jax"), converted.load_dc_ae(mine)
    assert a[0] == b[0]
    jax.tree.map(np.testing.assert_array_equal, a[1], b[1])
    exported = f"{remote['tbac']}_export"
    assert convert.main(["export-tbac", "--src", remote["tbac"], "--dst", exported]) == 0
    assert convert.main(["export-tbac", "--src", local["tbac"], "--dst",
                         str(tmp_path / "export")]) == 0
    for name in ("model.safetensors", "config.json"):
        with open(tmp_path / "export" / name, "rb") as fh:
            assert storage.read_bytes(f"{exported}/{name}") == fh.read(), name


def test_sample_and_understand_from_the_bucket(on_bucket, tmp_path, capsys):
    from uniimage_jax.cli import sample, understand

    local, remote = on_bucket
    outs = (f"{remote['tbac']}_samples", str(tmp_path / "samples"))
    answers = []
    for paths, out in ((remote, outs[0]), (local, outs[1])):
        assert sample.main(["--checkpoint", paths["tbac"], "--processor", paths["processor"],
                            "--prompt", "a red circle", "--steps", "2", "--num-images", "2",
                            "--images-per-call", "2", "--dtype", "float32", "--out", out]) == 0
        capsys.readouterr()
        assert understand.main(["--checkpoint", paths["tbac"], "--processor",
                                paths["processor"], "--question", "What is it?",
                                "--max-new-tokens", "3"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()
    names = sorted(os.listdir(outs[1]))
    assert names == ["00000_00.png", "00000_01.png", "00000_grid.png", "manifest",
                     "manifest.json", "settings.json"]
    assert storage.listdir(outs[0]) == names
    pngs = [n for n in names if n.endswith(".png")]
    for name in pngs:
        with Image.open(io.BytesIO(storage.read_bytes(f"{outs[0]}/{name}"))) as a, \
                Image.open(os.path.join(outs[1], name)) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    settings = json.loads(storage.read_text(f"{outs[0]}/settings.json"))
    assert settings["checkpoint"] == remote["tbac"]
    # the manifest on the bucket lists every file written, with the bytes' SHA-256
    manifest = json.loads(storage.read_text(f"{outs[0]}/manifest.json"))
    assert sorted(manifest["files"]) == pngs and manifest["complete"], manifest
    import hashlib
    for name in pngs:
        assert manifest["files"][name]["sha256"] == hashlib.sha256(
            storage.read_bytes(f"{outs[0]}/{name}")).hexdigest(), name
