"""`uniimage-sample` and `uniimage-understand --questions` over devices and processes.

One shared set of runs (`made_once`) of the tiny TBAC-UniImage of `tests/tbac_fixture.py` on a
6-prompt GenEval layout, 2 denoising steps:
* 1 device (this process): the reference set;
* 2 processes x 2 virtual CPU devices (jax.distributed + gloo, started the way the launch
  recipes start them: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), stopped by
  both processes at their second call as a preemption would stop them, then resumed with
  --skip-existing by 1 process x 4 devices;
* 1 process x 4 devices, weights replicated (data=4) and FSDP-sharded (fsdp=4: the same within
  one uint8 level, see the test);
and the same for a questions JSONL (about an image) answered with sampling (temperature 0.7) on
1 and 4 devices.
The images must be the same bytes whatever the topology; the manifest must say who wrote what.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shared_runs import made_once
from tests.xla_env import with_devices

ROOT = str(Path(__file__).resolve().parents[1])
STEPS = "2"
PROMPTS = 6

WORKER = r'''
import json, sys
from uniimage_jax.cli import sample, understand
from uniimage_jax.sampling import mesh_sampler

for command, argv, stop_after in json.loads(sys.argv[1]):
    if stop_after:  # a preemption: every process stops when its call stop_after + 1 starts
        real, calls = mesh_sampler.MeshSampler.sample, []
        def stopping(self, slots, real=real, calls=calls, stop_after=stop_after):
            calls.append(1)
            if len(calls) > stop_after:
                raise SystemExit(3)
            return real(self, slots)
        mesh_sampler.MeshSampler.sample = stopping
    rc = {"sample": sample, "understand": understand}[command].main(argv)
    if rc:
        sys.exit(rc)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(folder, commands, devices: int, processes: int = 1) -> list[dict]:
    worker = os.path.join(folder, "worker.py")
    with open(worker, "w") as fh:
        fh.write(WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=with_devices(devices))
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                   JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, worker, json.dumps(commands)],
                              env=dict(env, JAX_PROCESS_ID=str(i)) if processes > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    results = []
    try:
        for p in procs:
            out = p.communicate(timeout=600)[0]
            results.append({"returncode": p.returncode, "log": out[-4000:]})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _build(folder: str) -> dict:
    from tests.tbac_fixture import build_tiny_tbac
    from uniimage_jax.cli import sample, understand
    from uniimage_jax.data.synthetic import prompts
    from tests.test_sampling import _input_image

    tiny = build_tiny_tbac(os.path.join(folder, "tiny"))
    metadata = os.path.join(folder, "evaluation_metadata.jsonl")
    with open(metadata, "w") as fh:
        fh.writelines(json.dumps(meta) + "\n" for _, meta in prompts(PROMPTS))
    questions = os.path.join(folder, "questions.jsonl")
    _input_image().save(os.path.join(folder, "x.png"))
    with open(questions, "w") as fh:  # one compiled shape: one image size, one length bucket
        for q in ("What is this?", "What is in it?", "Name the shapes.", "And here?"):
            fh.write(json.dumps({"question": q, "image": "x.png"}) + "\n")
        fh.write(json.dumps({"question": "Describe the image.", "images": ["x.png"], "id": 7})
                 + "\n")

    def sample_args(out, *extra):
        return ["--checkpoint", tiny["dst"], "--processor", tiny["processor"], "--benchmark",
                "geneval", "--metadata", metadata, "--steps", STEPS, "--seed", "5",
                "--out", os.path.join(folder, out), *extra]

    def answer_args(out):
        return ["--checkpoint", tiny["dst"], "--processor", tiny["processor"], "--questions",
                questions, "--out", os.path.join(folder, out), "--max-new-tokens", "6",
                "--temperature", "0.7", "--top-p", "0.9", "--seed", "3",
                "--questions-per-call", "2"]

    # 1 device (this process): the reference.
    assert sample.main(sample_args("one")) == 0
    assert understand.main(answer_args("answers_one.jsonl")) == 0
    # 2 processes x 2 devices, stopped at the second call of each; resumed on 4 devices.
    stopped = _run_workers(folder, [["sample", sample_args("resumed", "--skip-existing"), 1]],
                           devices=2, processes=2)
    four = _run_workers(folder, [
        ["sample", sample_args("resumed", "--skip-existing"), 0],
        ["sample", sample_args("four"), 0],
        ["sample", sample_args("fsdp", "--mesh", "fsdp=4"), 0],
        ["understand", answer_args("answers_four.jsonl"), 0]], devices=4)
    return {"folder": folder, "stopped": stopped, "four": four[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return made_once(tmp_path_factory, "sample_topologies", _build)


def _files(folder: str) -> dict[str, bytes]:
    """Every output file's bytes, without the run's own records (settings, manifest)."""
    out = {}
    for d, _, names in os.walk(folder):
        rel = os.path.relpath(d, folder)
        if rel.split(os.sep)[0] == "manifest":
            continue
        for name in names:
            if name not in ("settings.json", "manifest.json"):
                with open(os.path.join(d, name), "rb") as fh:
                    out[os.path.normpath(os.path.join(rel, name))] = fh.read()
    return out


def test_geneval_is_the_same_bytes_on_1_device_4_devices_and_2_processes(runs):
    folder = runs["folder"]
    assert [r["returncode"] for r in runs["stopped"]] == [3, 3], runs["stopped"]
    assert runs["four"]["returncode"] == 0, runs["four"]["log"]
    one = _files(os.path.join(folder, "one"))
    assert len(one) == PROMPTS * 6  # metadata, 4 samples and the grid per prompt
    assert len({one[f"{i:05d}/samples/0000.png"] for i in range(PROMPTS)}) == PROMPTS
    for other in ("four", "resumed"):
        got = _files(os.path.join(folder, other))
        assert sorted(got) == sorted(one), other
        differ = [name for name in one if got[name] != one[name]]
        assert not differ, (other, differ)


def test_interrupted_two_process_run_resumed_on_four_devices_and_its_manifest(runs):
    folder = os.path.join(runs["folder"], "resumed")
    manifest = json.loads(Path(folder, "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["missing_prompts"] == []
    assert manifest["prompts"] == PROMPTS and not manifest["unrecorded_files"]
    first, second = manifest["runs"]
    assert (first["processes"], first["devices_per_process"], first["done_before"]) == (2, 2, 0)
    assert (second["processes"], second["devices_per_process"]) == (1, 4)
    # Each process of the stopped run wrote its first call (2 devices: 2 prompts), the resumed
    # run the other 2 prompts; every file once, with the hash of its bytes.
    writers = {}
    for path, record in manifest["files"].items():
        writers.setdefault((record["run"], record["process"]), set()).add(record["prompt"])
        assert hashlib.sha256(Path(folder, path).read_bytes()).hexdigest() == record["sha256"]
    assert second["done_before"] == 4
    assert {k: len(v) for k, v in writers.items()} == {
        (first["run"], 0): 2, (first["run"], 1): 2, (second["run"], 0): 2}
    assert set().union(*writers.values()) == set(range(PROMPTS))
    assert sorted(manifest["files"]) == sorted(_files(folder))
    settings = json.loads(Path(folder, "settings.json").read_text())
    assert settings["identity"]["seed"] == 5 and settings["identity"]["sampling"]["num_steps"] == 2


def test_fsdp_sharded_weights_give_the_replicated_images_within_one_level(runs):
    """Weights split over 4 devices by the training rules (FSDP along "embed") run the program
    XLA's partitioner makes, whose float32 sums may be ordered differently from the single
    device's (a last-bit difference, ~1e-7 relative): a pixel that lies on a uint8 rounding
    boundary can move by one level. Stated tolerance: every pixel within 1/255, under 1% of any
    image's pixels moved (seen: 3 of 24 images, 0.13% of their pixels); other files identical."""
    import io

    import numpy as np
    from PIL import Image

    one = _files(os.path.join(runs["folder"], "one"))
    fsdp = _files(os.path.join(runs["folder"], "fsdp"))
    assert sorted(fsdp) == sorted(one)
    moved = []
    for name in one:
        if not name.endswith(".png"):
            assert fsdp[name] == one[name], name
            continue
        a, b = (np.asarray(Image.open(io.BytesIO(x[name])), np.int16) for x in (one, fsdp))
        diff = np.abs(a - b)
        assert diff.max() <= 1, name
        moved.append((diff > 0).mean())
    assert max(moved) < 0.01, max(moved)
    assert "fsdp=4" in runs["four"]["log"] and "weights sharded" in runs["four"]["log"]


def test_batch_answers_are_the_same_on_1_and_4_devices(runs):
    folder = runs["folder"]
    one = Path(folder, "answers_one.jsonl").read_text()
    assert Path(folder, "answers_four.jsonl").read_text() == one
    records = [json.loads(line) for line in one.splitlines()]
    assert [r["question"] for r in records][:2] == ["What is this?", "What is in it?"]
    assert records[-1]["id"] == 7 and records[-1]["images"] == ["x.png"]
    assert all(isinstance(r["answer"], str) for r in records)
    # Sampled answers: the questions draw from their own streams, so they differ.
    assert len({r["answer"] for r in records}) > 1


def test_a_file_two_processes_of_one_run_wrote_is_refused_a_later_run_wins(tmp_path):
    """The manifest's guard: the share must never give a prompt to two processes of a run; a
    later run (a resume that redid a half-written prompt) replaces the earlier record."""
    from uniimage_jax.eval.sample_run import MANIFEST_DIR, read_records
    from uniimage_jax.eval.writers import Output

    out = Output(str(tmp_path))
    first, later = "20260101T000000.000000Z", "20260102T000000.000000Z"
    for run in (first, later):
        out.write(f"{MANIFEST_DIR}/{run}/run.json", json.dumps({"run": run}))

    def record(run, process, digest):
        out.write(f"{MANIFEST_DIR}/{run}/process-{process:05d}-of-00002.jsonl", json.dumps(
            {"prompt": 0, "caption": "c", "files": {"00000/grid.png": digest}}) + "\n")

    record(first, 0, "aa")
    record(later, 1, "bb")
    runs, files = read_records(out)
    assert [r["run"] for r in runs] == [first, later]
    assert files["00000/grid.png"] == {"prompt": 0, "sha256": "bb", "run": later, "process": 1}
    record(first, 1, "cc")
    with pytest.raises(RuntimeError, match="written by processes 0 and 1 of run " + first):
        read_records(out)


def test_resuming_a_folder_sampled_with_other_settings_is_refused(tmp_path):
    from uniimage_jax.cli import sample
    from uniimage_jax.errors import UserError
    from uniimage_jax.eval.writers import Output

    out = Output(str(tmp_path))
    out.write("settings.json", json.dumps({"identity": {"seed": 1, "steps": 30, "mesh": None}}))
    sample._check_same_settings(out, {"identity": {"seed": 1, "steps": 30, "mesh": None}})
    with pytest.raises(UserError, match=r"other settings \(seed 1 -> 2\)"):
        sample._check_same_settings(out, {"identity": {"seed": 2, "steps": 30, "mesh": None}})
