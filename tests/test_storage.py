"""The storage layer against the local Cloud Storage emulator: what every gs:// path of the project
goes through (epath/gcsfs for files, tensorstore for Orbax's arrays)."""
import os
import stat
import time

import numpy as np

from uniimage_jax import storage
from uniimage_jax.storage.emulator import request_fault


def test_files_round_trip_on_the_bucket_and_locally(gcs_bucket, tmp_path):
    for root in (f"{gcs_bucket}/storage_round_trip", str(tmp_path / "local")):
        target = storage.join(root, "dir", "a.json")
        storage.makedirs(storage.join(root, "dir"))
        storage.write_text(target, '{"a": 1}')
        assert storage.read_text(target) == '{"a": 1}'
        storage.write_bytes(target, b"\x00\x01")  # replaces
        assert storage.read_bytes(target) == b"\x00\x01"
        with storage.open_file(target) as fh:
            fh.seek(1)
            assert fh.read() == b"\x01"
        assert sorted(p.name for p in storage.path(storage.join(root, "dir")).iterdir()) == \
            ["a.json"], "no temporary file may be left beside the written one"


def test_local_writes_take_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_text(tmp_path / "f.txt", "x")
        src = tmp_path / "src.bin"
        src.write_bytes(b"y")
        storage.upload(src, tmp_path / "copy.bin")
    finally:
        os.umask(old)
    for name in ("f.txt", "copy.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_upload_and_local_copy(gcs_bucket, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(1000))
    remote = f"{gcs_bucket}/storage_upload/weights.bin"
    storage.upload(src, remote)
    cache = tmp_path / "cache"
    local = storage.local_copy(remote, cache_dir=str(cache))
    assert open(local, "rb").read() == src.read_bytes()
    assert storage.local_copy(remote, cache_dir=str(cache)) == local  # reused
    assert storage.local_copy(str(src)) == str(src)


def test_rename_is_served_at_once(gcs_bucket):
    """gcsfs renames with moveTo, which the emulator lacks: without the emulator's answer,
    gcsfs retries for ~35 s before falling back to copy + delete."""
    a, b = f"{gcs_bucket}/storage_rename/a", f"{gcs_bucket}/storage_rename/b"
    storage.write_text(a, "x")
    start = time.monotonic()
    storage.path(a).rename(b)
    assert time.monotonic() - start < 5
    assert not storage.exists(a) and storage.read_text(b) == "x"


def test_injected_faults_are_retried_by_gcsfs(gcs_bucket):
    target = f"{gcs_bucket}/storage_faults/x.txt"
    served = gcs_bucket.emulator.faults_served
    request_fault(gcs_bucket.emulator.url, status=503, seconds=1.5)
    storage.write_text(target, "after the outage")  # retried with backoff until it clears
    assert storage.read_text(target) == "after the outage"
    assert gcs_bucket.emulator.faults_served > served


def test_orbax_checkpoint_on_the_bucket(gcs_bucket):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
    with ocp.CheckpointManager(f"{gcs_bucket}/storage_orbax") as manager:
        manager.save(3, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        assert manager.all_steps() == [3]
        restored = manager.restore(3, args=ocp.args.StandardRestore(state))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3))
    assert int(restored["step"]) == 3
