"""What users do by habit must not lose a run: relative paths, long captions, the stage chain
(preemption, per-stage data), two runs in one workdir, all-skipped steps, the logged metrics.

Commands run in subprocesses from a temporary directory, as a user types them (README shapes).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a small red circle sits above a large blue square while a green triangle rests to the "
         "left of a yellow diamond and a purple star hides behind them all").split()


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def _cmd(module, *args):
    return [sys.executable, "-m", f"uniimage_jax.cli.{module}", *args]


def _run(cmd, cwd, ok=True, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _records(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _steps(stage_dir):
    return sorted(int(d) for d in os.listdir(stage_dir) if d.isdigit())


def _user_dir(tmp_path):
    """A user's directory: the configs (as in a checkout) and a small JSONL dataset of each
    kind, the t2i one with a 40-word caption on line 2."""
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    data = tmp_path / "data"
    data.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(g.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(data / f"{i}.png")
    captions = ["a red circle", _words(40), "a blue square", "two green triangles"]
    (data / "t2i.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(captions)))
    (data / "ti2i.jsonl").write_text("".join(
        json.dumps({"source_image": f"{i}.png", "instruction": "make it blue",
                    "target_image": f"{(i + 1) % 4}.png"}) + "\n" for i in range(4)))
    return tmp_path


# ------------------------------------------------------------------------------- paths


def test_paths_are_made_absolute_and_urls_left_alone(tmp_path, monkeypatch, gcs_bucket):
    from uniimage_jax import storage
    from uniimage_jax.errors import UserError
    from uniimage_jax.paths import absolute, is_url
    from uniimage_jax.train.config import base_config
    from uniimage_jax.train.config_paths import (PATH_FIELDS, check_paths_exist,
                                                 make_paths_absolute)

    monkeypatch.chdir(tmp_path)
    assert absolute("runs/w2") == str(tmp_path / "runs" / "w2")
    assert absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    for url in ("gs://bucket/run", "s3://b/k", "file:///tmp/x"):
        assert is_url(url) and absolute(url) == url
    assert absolute("") == "" and absolute(None) is None
    c = base_config(stage="s", task="t2i", preset="tiny")
    c.init_from, c.processor_dir, c.data.path = "runs/w2/t2i_pretrain", "proc", "data/t.jsonl"
    mllm = f"{gcs_bucket}/test_paths_are_made_absolute/mllm"
    c.pretrained.mllm, c.pretrained.tbac = mllm, ""
    make_paths_absolute(c)
    assert c.init_from == str(tmp_path / "runs/w2/t2i_pretrain")
    assert c.processor_dir == str(tmp_path / "proc")
    assert c.data.path == str(tmp_path / "data/t.jsonl")
    assert c.pretrained.mllm == mllm and c.pretrained.tbac == ""
    with pytest.raises(ValueError, match=r"config\.init_from='.*runs/w2/t2i_pretrain' does not"):
        check_paths_exist(c)  # before anything is built
    c.init_from = c.processor_dir = ""
    with pytest.raises(UserError, match=r"config\.pretrained\.mllm='gs://.*/mllm' does not exist"):
        check_paths_exist(c)  # a gs:// path is looked up on its bucket too
    storage.write_text(f"{mllm}/config.json", "{}")
    check_paths_exist(c)  # now it exists; '' is not set
    for field in PATH_FIELDS:  # every listed field exists and is a path string
        node = c
        for part in field.split("."):
            node = node[part]
        assert isinstance(node, str), field


def test_relative_paths_long_captions_and_prompts_in_the_readme_commands(tmp_path, monkeypatch):
    """README shapes with relative paths: train (with a JSONL manifest holding a 40-word
    caption, too long for the tiny preset's 160-token prompt), sample (a 5000-word prompt),
    understand; then a relative init_from path restores."""
    cwd = _user_dir(tmp_path)
    out = _run(_cmd("train", "--config", "configs/t2i_pretrain.py:tiny", "--workdir", "runs/w2",
                    "--config.max_steps=3", "--config.batch_size=4", "--config.log_every=1",
                    "--config.data.source=jsonl", "--config.data.path=data/t2i.jsonl",
                    "--config.data.caption_dropout=0", "--config.checkpoint.async_save=False"),
               cwd)
    stage = cwd / "runs" / "w2" / "t2i_pretrain"
    assert _steps(stage) == [3]
    assert "t2i_pretrain: step 3 of 3" in out.stdout
    # the long caption trains through: cut, counted, its record named by file:line
    assert f"{cwd / 'data' / 't2i.jsonl'}:2: caption cut from" in out.stderr, out.stderr[-3000:]
    records = _records(stage)
    assert [r["truncated_captions"] for r in records] == [1, 1, 1]
    # the first step (compilation) is not throughput: untimed; later steps are
    assert "samples_per_s" not in records[0] and records[1]["samples_per_s"] > 0
    stored = json.loads((stage / "3" / "config" / "metadata").read_text())
    assert stored["data"]["path"] == str(cwd / "data" / "t2i.jsonl")  # absolute in checkpoints
    assert not (stage / "RUN_LOCK.json").exists()  # released at the end

    (cwd / "prompts.txt").write_text("a photo of a red circle\n" + _words(5000) + "\n")
    out = _run(_cmd("sample", "--checkpoint", "runs/w2/t2i_pretrain", "--prompts-file",
                    "prompts.txt", "--out", "samples/", "--steps", "2", "--num-images", "1",
                    "--images-per-call", "1", "--no-grid"), cwd)
    assert sorted(os.listdir(cwd / "samples")) == ["00000_00.png", "00001_00.png", "manifest",
                                                   "manifest.json", "settings.json"]
    assert "(5000 words, " in out.stderr and "caption cut from" in out.stderr and \
        "max_caption_tokens=256" in out.stderr, out.stderr[-3000:]
    assert "red circle'" not in out.stderr  # the short prompt is not cut

    out = _run(_cmd("understand", "--checkpoint", "runs/w2/t2i_pretrain", "--processor",
                    "runs/w2/tiny_processor", "--image", "data/0.png", "--question",
                    "Describe the image.", "--max-new-tokens", "3"), cwd)

    # init_from restores from a relative path too (the same function the trainer calls)
    from uniimage_jax.checkpoints.loader import load_uniimage
    from uniimage_jax.checkpoints.stage import restore_params_only
    from uniimage_jax.checkpoints.partition import partition_params

    _, params, _ = load_uniimage(str(stage))
    trainable, _ = partition_params(params, ["dit/.*", "connector/.*", "metaquery/.*"])
    monkeypatch.chdir(cwd)
    restored = restore_params_only("runs/w2/t2i_pretrain", trainable)
    np.testing.assert_array_equal(np.asarray(restored["metaquery"]["embedding"]),
                                  np.asarray(trainable["metaquery"]["embedding"]))


# ------------------------------------------------------------------------------- chain


def _chain_cmd(*extra):
    return _cmd("train", "--config", "configs/t2i_pretrain.py:tiny", "--workdir", "w", "--chain",
                "--chain_max_steps=2", "--chain_config=t2i_pretrain.max_steps=8",
                "--config.batch_size=2", "--config.log_every=1",
                "--config.checkpoint.async_save=False", "--config.data.source=jsonl",
                "--config.data.path=data/t2i.jsonl", *extra)


TI2I_DATA = [f"--chain_config={stage}.{key}" for stage in ("ti2i_pretrain", "finetune")
             for key in ("data.source=jsonl", "data.path=data/ti2i.jsonl", "batch_size=2")]


def test_chain_configs_take_per_stage_overrides_and_refuse_silent_synthetic_data():
    from uniimage_jax.train import chain
    from uniimage_jax.train.config import base_config

    def first():
        c = base_config(stage="t2i_pretrain", task="t2i", preset="tiny")
        c.data.source, c.data.path = "jsonl", "t2i.jsonl"
        return c

    configs = chain.stage_configs(first(), os.path.join(ROOT, "configs"), max_steps=5, overrides=[
        "ti2i_pretrain.data.source=jsonl", "ti2i_pretrain.data.path=edits.jsonl",
        "finetune.data.source=synthetic", "finetune.max_steps=7", "finetune.data.shuffle=false",
        "finetune.optimizer.lr=3e-5"])
    assert [c.stage for c in configs] == list(chain.CHAIN)
    assert configs[1].data.path == "edits.jsonl" and configs[1].max_steps == 5
    assert configs[2].max_steps == 7 and configs[2].data.shuffle is False
    assert configs[2].optimizer.lr == 3e-5
    with pytest.raises(ValueError, match=r"ti2i_pretrain would train on the built-in synthetic"
                                         r".*--chain_config=ti2i_pretrain\.data\.source=jsonl"):
        chain.stage_configs(first(), os.path.join(ROOT, "configs"))
    for bad, message in [("finetune.max_stepz=3", r"finetune has no config field 'max_stepz' "
                                                   r"\(did you mean 'max_steps'\?\)$"),
                         ("finetune.data.soruce=x", r"finetune has no config field 'data.soruce' "
                                                    r"\(did you mean 'data.source'\?\)$"),
                         ("finetun.max_steps=3", "stage 'finetun' is not in this chain"),
                         ("finetune.max_steps=many", "'many' is not a valid int"),
                         ("finetune.data.shuffle=maybe", "expected true or false"),
                         ("finetune.data=x", "is a group of fields"),
                         ("max_steps=3", "expected STAGE.KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            chain.stage_configs(first(), os.path.join(ROOT, "configs"),
                                overrides=["ti2i_pretrain.data.source=synthetic",
                                           "finetune.data.source=synthetic", bad])


def test_sigterm_stops_the_chain_and_the_rerun_trains_later_stages_from_the_finished_one(
        tmp_path):
    cwd = _user_dir(tmp_path)
    # without data for the ti2i stages the chain refuses before training anything
    out = _run(_chain_cmd(), cwd, ok=False)
    assert out.returncode != 0 and "--chain_config=ti2i_pretrain.data.source=jsonl" in out.stderr
    assert not (cwd / "w").exists()

    first = cwd / "w" / "t2i_pretrain"
    proc = subprocess.Popen(_chain_cmd(*TI2I_DATA), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                     "PYTHONPATH": ROOT})
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (first / "metrics.jsonl").exists() and len(_records(first)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 42, stderr[-3000:]  # "restart me": stopped early, saved
    assert "exit status 42 (rerun the same command to resume)" in stderr
    stopped = _steps(first)[-1]
    assert 2 <= stopped < 8, stopped
    assert (f"t2i_pretrain stopped at step {stopped} of 8: the chain stops before "
            "ti2i_pretrain, finetune") in stdout
    assert not (cwd / "w" / "ti2i_pretrain").exists()  # nothing trained from the partial stage

    out = _run(_chain_cmd(*TI2I_DATA), cwd)
    assert _steps(first)[-1] == 8
    for stage in ("ti2i_pretrain", "finetune"):
        assert _steps(cwd / "w" / stage)[-1] == 2, stage
    assert "source=JsonlSource(" in out.stderr and "task='ti2i'" in out.stderr
    # each later stage started from the final step of the stage before it
    record = json.loads((cwd / "w" / "ti2i_pretrain" / "INIT_FROM.json").read_text())
    assert record == {"init_from": str(first), "step": 8}
    record = json.loads((cwd / "w" / "finetune" / "INIT_FROM.json").read_text())
    assert record["step"] == 2
    assert "initialised trainable parameters from" in out.stderr
    # each stage starts from the previous one's parameters, so the chain carries training on
    from tests.test_train import _bitwise_equal, _trainable
    from uniimage_jax.checkpoints.loader import load_uniimage

    _, p1, _ = load_uniimage(str(first))
    _, p3, _ = load_uniimage(str(cwd / "w" / "finetune"))
    assert not _bitwise_equal(_trainable(p1), _trainable(p3))

    # a later stage trained from an unfinished earlier one is refused, also in runs older than
    # the record (judged by file times)
    from uniimage_jax.train import lineage

    second = str(cwd / "w" / "ti2i_pretrain")
    lineage.check(second, str(first))
    (cwd / "w" / "ti2i_pretrain" / "INIT_FROM.json").write_text(
        json.dumps({"init_from": str(first), "step": stopped}))
    with pytest.raises(ValueError, match=f"at step {stopped}, but t2i_pretrain is now at step 8"):
        lineage.check(second, str(first))
    os.remove(cwd / "w" / "ti2i_pretrain" / "INIT_FROM.json")
    lineage.check(second, str(first))  # t2i_pretrain/8 was written before ti2i_pretrain began
    later = os.path.getmtime(cwd / "w" / "ti2i_pretrain" / "2") + 5
    os.utime(first / "8", (later, later))
    with pytest.raises(ValueError, match="trained from an unfinished t2i_pretrain"):
        lineage.check(second, str(first))


# ------------------------------------------------------------------------------- workdir lock


def _lock_record(path, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "then",
              "heartbeat": time.time(), "token": "t", **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_workdir_lock_refuses_a_live_run_and_takes_over_stale_ones(tmp_path, caplog):
    from uniimage_jax.train.workdir_lock import LOCK_FILE, LockHeldError, StageLock

    stage = tmp_path / "w" / "t2i_pretrain"
    lock_file = stage / LOCK_FILE
    with StageLock(str(stage), heartbeat_s=0.05) as lock:
        first = json.loads(lock_file.read_text())
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
        time.sleep(0.3)
        assert json.loads(lock_file.read_text())["heartbeat"] > first["heartbeat"]  # beating
        with pytest.raises(LockHeldError, match="already in use by this process"):
            StageLock(str(stage)).acquire()
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from uniimage_jax.train.workdir_lock import "
             "StageLock; StageLock(sys.argv[1]).acquire()", str(stage)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert other.returncode != 0
        assert (f"in use by another run: pid {os.getpid()} on host {socket.gethostname()!r}, "
                f"started {first['started']}") in other.stderr, other.stderr[-2000:]
    assert not lock_file.exists()  # released

    dead = subprocess.Popen(["true"])
    dead.wait()
    g = np.random.default_rng(0)
    cases = [  # (record, taken over?)
        ({"pid": dead.pid}, True),                                        # killed run, this host
        ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}, True),  # silent host
        ({"host": "elsewhere", "pid": 1}, False),                         # live on another host
        ({"pid": os.getppid()}, False),                                   # a live pid here
        ({"pid": os.getpid()}, True),            # this pid, not held by us: an earlier life
    ]
    for fields, taken in cases:
        _lock_record(lock_file, **fields)
        lock = StageLock(str(stage))
        if taken:
            caplog.clear()
            lock.acquire()
            assert "taking over" in caplog.text, fields
            lock.release()
        else:
            with pytest.raises(LockHeldError, match="in use by another run"):
                lock.acquire()
    lock_file.write_bytes(g.integers(0, 255, 7, dtype=np.uint8).tobytes())  # a cut-short write
    with StageLock(str(stage)):
        pass
    assert not lock_file.exists()


def test_training_refuses_a_stage_directory_in_use(tmp_path):
    from uniimage_jax.train.workdir_lock import StageLock

    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    with StageLock(str(tmp_path / "w" / "t2i_pretrain")):
        out = _run(_cmd("train", "--config", "configs/t2i_pretrain.py:tiny", "--workdir", "w",
                        "--config.max_steps=2"), tmp_path, ok=False)
    assert out.returncode != 0
    assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in out.stderr, out.stderr[-3000:]
    assert os.listdir(tmp_path / "w" / "t2i_pretrain") == []  # nothing written by the refused run


# ------------------------------------------------------------------------------- console, metrics


def test_a_run_whose_steps_are_all_skipped_says_so(tmp_path):
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    out = _run(_cmd("train", "--config", "configs/t2i_pretrain.py:tiny", "--workdir", "w",
                    "--config.max_steps=3", "--config.log_every=2", "--config.batch_size=2",
                    "--config.checkpoint.async_save=False",
                    "--config.optimizer.spike.grad_max=1e-9"), tmp_path)
    assert "t2i_pretrain: step 3 of 3 (3 skipped as loss/gradient spikes, the parameters left " \
           "unchanged)" in out.stdout, out.stdout
    assert "step 2: 2 step(s) skipped as loss/gradient spikes" in out.stderr
    assert "skipped=3" in out.stderr  # the progress bar
    records = _records(tmp_path / "w" / "t2i_pretrain")
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 2), (3, 1)]


def test_metric_window_means_the_loss_and_leaves_compilation_out():
    from uniimage_jax.train.metric_window import MetricWindow

    now = [0.0]
    w = MetricWindow(global_batch=8, clock=lambda: now[0])
    steps = [(1.0, 30.0, 0), (2.0, 1.0, 1), (4.0, 1.0, 0), (9.0, 1.0, 0)]  # loss, seconds, skip
    records = []
    for i, (loss, seconds, skipped) in enumerate(steps):
        now[0] += seconds  # the first step compiles for 30 s
        m = {"loss": np.float32(loss), "grad_norm": np.float32(2 * loss),
             "spike/skipped": np.int32(skipped), "spike/num_skipped": np.int32(1)}
        w.add(m)
        if i in (1, 3):
            records.append(w.record(m))
    assert records[0]["loss"] == 1.5 and records[0]["grad_norm"] == 3.0
    assert records[0]["samples_per_s"] == 8.0  # step 2 only: 8 samples in 1 s, not 16 in 31 s
    assert records[0]["skipped_steps"] == 1 and records[0]["spike/num_skipped"] == 1
    assert records[1]["loss"] == 6.5 and records[1]["samples_per_s"] == 8.0
    assert records[1]["skipped_steps"] == 0
    first_only = MetricWindow(global_batch=8, clock=lambda: now[0])
    first_only.add({"loss": np.float32(3.0)})
    assert "samples_per_s" not in first_only.record({"loss": np.float32(3.0)})


def test_caption_stage_cuts_long_answers_to_the_fixed_length(tmp_path, caplog):
    """The understanding ('caption') stage pads to the same fixed length: a long caption is cut
    to fit, with a warning naming its record, instead of stopping the run."""
    from uniimage_jax.processing import tiny
    from uniimage_jax.processing.prompts import TruncationLog
    from uniimage_jax.processing.qwen import load_processor
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.captioning import build_caption_inputs
    from uniimage_jax.train.config import base_config

    tiny.make_tiny_processor_dir(str(tmp_path / "p"))
    processor = load_processor(str(tmp_path / "p"))
    mllm = stage_setup.build_model(base_config(stage="s", task="caption", preset="tiny")).config.mllm
    images = [Image.new("RGB", (32, 32), (200, 0, 0))] * 2
    captions = ["a red square", _words(120)]
    log = TruncationLog()
    batch, _ = build_caption_inputs(processor, mllm, images, captions, pad_to=160,
                                    names=["m.jsonl:1", "m.jsonl:2"], truncations=log)
    assert batch["input_ids"].shape == (2, 160) and batch["attention_mask"][1].sum() <= 160
    assert log.count == 1 and "m.jsonl:2: caption cut from" in caplog.text
    full, _ = build_caption_inputs(processor, mllm, images[:1], captions[:1], pad_to=160)
    np.testing.assert_array_equal(full["input_ids"][0], batch["input_ids"][0])  # row 0 as is
    answer = processor.tokenizer.decode(batch["input_ids"][1][batch["loss_mask"][1] > 0])
    assert _words(120).startswith(answer.removesuffix("<|im_end|>")[:200])
    with pytest.raises(ValueError, match="no room for a caption"):
        build_caption_inputs(processor, mllm, images, captions, pad_to=40)


def test_workdir_lock_on_object_stores_goes_by_heartbeat(tmp_path, monkeypatch, caplog):
    """On gs:// there is no exclusive create and no pid to check: the lock is written, read back
    (the token decides a race) and judged stale by its heartbeat alone. Driven on a local
    directory with the URL branch forced."""
    from uniimage_jax.train import workdir_lock
    from uniimage_jax.train.workdir_lock import LOCK_FILE, LockHeldError, StageLock

    monkeypatch.setattr(workdir_lock, "is_url", lambda path: True)
    monkeypatch.setattr(workdir_lock, "_REMOTE_SETTLE_S", 0.0)
    stage = tmp_path / "t2i_pretrain"
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock_record(stage / LOCK_FILE, pid=dead.pid)  # a dead pid cannot be seen from elsewhere
    with pytest.raises(LockHeldError, match=f"pid {dead.pid}"):
        StageLock(str(stage)).acquire()
    _lock_record(stage / LOCK_FILE, pid=dead.pid, heartbeat=time.time() - 3600)
    with StageLock(str(stage)) as lock:
        assert "no heartbeat for 3600 s" in caplog.text
        assert json.loads((stage / LOCK_FILE).read_text())["token"] == lock.token
    assert not (stage / LOCK_FILE).exists()
    # A lock of an earlier attempt of the same scheduler job (a pod restarted after a lost
    # process 0) is taken over at once; another job's live lock is not.
    monkeypatch.setenv(workdir_lock.ENV_RUN_ID, "slurm-123")
    _lock_record(stage / LOCK_FILE, pid=dead.pid, run_id="slurm-99")
    with pytest.raises(LockHeldError, match=f"pid {dead.pid}"):
        StageLock(str(stage)).acquire()
    caplog.clear()
    _lock_record(stage / LOCK_FILE, pid=dead.pid, run_id="slurm-123")
    with StageLock(str(stage)) as lock:
        assert "earlier attempt of this job (UNIIMAGE_RUN_ID=slurm-123)" in caplog.text
        assert json.loads((stage / LOCK_FILE).read_text())["run_id"] == "slurm-123"
