"""Bad input a user can give, and what each command does with it: one line naming the culprit on
stderr, exit status 2, no traceback (unless --debug), nothing half-written, and the error before
anything slow (model initialisation, compilation).

Covers the shared CLI wrapper (`uniimage_jax/cli/errors.py`), corrupt safetensors (truncated, a
header claiming 2^62 bytes, garbage) in single-file and sharded checkpoints, missing tensors named
by their source key, sampling arguments (NaN / negative guidance, nonsense steps), data errors
found before the model is built, `uniimage-train --help`, and huge images (decoded reduced;
decompression bombs skipped and named).
"""
import errno
import io
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from uniimage_jax.cli.errors import run_command
from uniimage_jax.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "configs", "t2i_pretrain.py")


# ------------------------------------------------------------------------- the shared wrapper


def _raise(e):
    def fn():
        raise e
    return fn


def test_wrapper_maps_user_errors_to_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("UNIIMAGE_DEBUG", raising=False)
    assert run_command("uniimage-x", _raise(ConfigError("config.batch_size must be >= 1"))) == 2
    assert capsys.readouterr().err == "uniimage-x: error: config.batch_size must be >= 1\n"
    assert run_command("uniimage-x", _raise(
        FileNotFoundError(errno.ENOENT, "No such file or directory", "a/b.png"))) == 2
    assert capsys.readouterr().err == "uniimage-x: error: No such file or directory: a/b.png\n"
    assert run_command("uniimage-x", _raise(IsADirectoryError("manifest.jsonl is a dir"))) == 2
    capsys.readouterr()

    # A full disk, wrapped by a library (as Orbax's async writers do): one line, naming the path.
    def disk_full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    assert run_command("uniimage-x", disk_full, where="/runs/w") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device writing /runs/w" in err
    # TensorStore (Orbax's writer) says it in a ValueError's text.
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: Failed to '
                             "write 308886 bytes to file 15: No space left on device "
                             "[os_error_code='28']")
    assert run_command("uniimage-x", _raise(tensorstore), where="/runs/w") == 2
    assert "no space left on device writing /runs/w" in capsys.readouterr().err

    # Anything that is not a user error keeps its traceback (it may be a bug).
    for bug in (ValueError("operands could not be broadcast"), KeyError("x"), TypeError("t"),
                OSError(errno.EIO, "I/O error")):
        with pytest.raises(type(bug)):
            run_command("uniimage-x", _raise(bug))
    # --debug / UNIIMAGE_DEBUG=1 show the traceback of user errors too.
    with pytest.raises(ConfigError):
        run_command("uniimage-x", _raise(ConfigError("c")), debug=True)
    monkeypatch.setenv("UNIIMAGE_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_command("uniimage-x", _raise(ConfigError("c")))


def test_project_errors_are_user_errors():
    from uniimage_jax.convert.sources import UnreadableCheckpointError
    from uniimage_jax.errors import ConversionError
    from uniimage_jax.data.images import UnreadableImageError
    from uniimage_jax.data.manifest import ManifestError

    for cls in (ConversionError, UnreadableCheckpointError, UnreadableImageError, ManifestError,
                ConfigError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


# ------------------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """A tiny Qwen2.5-VL saved by transformers: one file (new key layout) and sharded (legacy)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tests import tiny_assets
    from tests.test_qwen_convert import TO_LEGACY, TO_NEW, _relayout

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_assets.tiny_qwen_hf_config()).eval()
    root = tmp_path_factory.mktemp("hf")
    single, sharded = str(root / "single"), str(root / "sharded")
    model.save_pretrained(single)
    _relayout(single, TO_NEW)
    model.save_pretrained(sharded, max_shard_size="60KB")
    _relayout(sharded, TO_LEGACY)
    return {"single": single, "sharded": sharded}


def _corrupt(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        if how == "truncated":
            fh.write(data[:len(data) // 2])
        elif how == "header_2_62":
            fh.write(struct.pack("<Q", 2 ** 62) + data[8:])
        elif how == "garbage_header":
            fh.write(struct.pack("<Q", 16) + b"{not json at all" + data[24:])
        elif how == "empty":
            pass


@pytest.mark.parametrize("how", ["truncated", "header_2_62", "garbage_header", "empty"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_corrupt_safetensors_is_named_with_exit_2(hf_checkpoints, tmp_path, capsys, how, layout):
    from uniimage_jax.cli.convert import main

    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoints[layout], src)
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    bad = os.path.join(src, files[1] if layout == "sharded" else files[0])
    _corrupt(bad, how)
    dst = tmp_path / "out"
    assert main(["mllm", "--src", src, "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uniimage-convert mllm: error: cannot read ") and err.count("\n") == 1
    assert bad in err and "Traceback" not in err
    if layout == "sharded":
        assert f"shard 2 of {len(files)}" in err
    assert not dst.exists()


def test_corrupt_shard_through_the_console_script(hf_checkpoints, tmp_path):
    """As a user runs it: the installed command exits 2 with one line (no SafetensorError)."""
    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoints["sharded"], src)
    shard = os.path.join(src, sorted(f for f in os.listdir(src)
                                     if f.endswith(".safetensors"))[2])
    _corrupt(shard, "header_2_62")
    p = subprocess.run([sys.executable, "-m", "uniimage_jax.cli.convert", "mllm", "--src", src,
                        "--dst", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if "error:" in line or "Traceback" in line]
    assert len(lines) == 1 and shard in lines[0] and "header too large" in lines[0], p.stderr


def test_bad_shard_index_is_named(hf_checkpoints, tmp_path, capsys):
    from uniimage_jax.cli.convert import main

    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoints["sharded"], src)
    index = os.path.join(src, "model.safetensors.index.json")
    with open(index, "w") as fh:
        fh.write('{"metadata": {}}')
    assert main(["mllm", "--src", src, "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert index in err and "weight_map" in err


@pytest.mark.parametrize("layout,removed", [
    ("sharded", "model.layers.0.mlp.gate_proj.weight"),          # legacy layout
    ("sharded", "visual.blocks.1.norm1.weight"),
    ("single", "model.language_model.layers.0.mlp.gate_proj.weight"),  # transformers >= 4.52
    ("single", "model.visual.merger.mlp.0.bias"),
])
def test_missing_tensor_is_named_by_its_source_key(hf_checkpoints, tmp_path, capsys, layout,
                                                   removed):
    """The user searches the checkpoint for the key it lacks, in the checkpoint's own layout."""
    import json

    from safetensors.torch import load_file, save_file

    from uniimage_jax.cli.convert import main

    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoints[layout], src)
    for f in os.listdir(src):
        path = os.path.join(src, f)
        if f.endswith(".safetensors"):
            tensors = load_file(path)
            if removed in tensors:
                del tensors[removed]
                save_file(tensors, path, metadata={"format": "pt"})
        elif f.endswith(".index.json"):
            with open(path) as fh:
                index = json.load(fh)
            index["weight_map"].pop(removed, None)
            with open(path, "w") as fh:
                json.dump(index, fh)
    assert main(["mllm", "--src", src, "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    missing = [line.strip() for line in err.splitlines() if "(our parameter" in line]
    assert len(missing) == 1 and missing[0].startswith(removed + " (our parameter model/"), err


# ------------------------------------------------------------------------- sampling arguments


@pytest.mark.parametrize("field,value", [
    ("guidance_scale", float("nan")), ("guidance_scale", -3.0), ("guidance_scale", float("inf")),
    ("image_guidance_scale", float("nan")), ("image_guidance_scale", -1.0),
    ("num_steps", 0), ("num_steps", -5), ("num_steps", 2.5), ("num_steps", True),
    ("images_per_call", 0), ("max_prompt_tokens", 0), ("scheduler", "ddim"),
])
def test_sampling_config_refuses_nonsense(field, value):
    from uniimage_jax.sampling.sampler import SamplingConfig

    with pytest.raises(ConfigError, match=field if field != "scheduler" else "ddim"):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--guidance", "-3"),
                                        ("--image-guidance", "nan"), ("--image-guidance", "-1"),
                                        ("--steps", "0"), ("--guidance", "inf")])
def test_sample_cli_refuses_bad_guidance_before_loading(tmp_path, capsys, flag, value):
    from uniimage_jax.cli import sample

    out = tmp_path / "out"
    rc = sample.main(["--checkpoint", str(tmp_path), "--prompt", "a red circle", flag, value,
                      "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"uniimage-sample: error: {flag} must be") and \
        err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "-1"),
                                        ("--top-p", "0"), ("--max-new-tokens", "0")])
def test_understand_cli_refuses_bad_decoding_arguments(tmp_path, capsys, flag, value):
    from uniimage_jax.cli import understand

    rc = understand.main(["--checkpoint", str(tmp_path), "--processor", str(tmp_path),
                          "--question", "q", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"uniimage-understand: error: {flag} must be"), err


def test_non_utf8_prompts_file_names_file_and_line(tmp_path, capsys):
    from uniimage_jax.cli import sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\n".encode() + "un caf\xe9\n".encode("latin-1"))
    assert sample.main(["--checkpoint", str(tmp_path), "--prompts-file", str(prompts),
                        "--out", str(tmp_path / "out")]) == 2
    assert f"{prompts}:2: not UTF-8" in capsys.readouterr().err


# ------------------------------------------------------------------------- data before the model


def _tiny_config(**data):
    from uniimage_jax.train.config import base_config

    c = base_config(stage="t2i_pretrain", task="t2i", preset="tiny")
    c.batch_size = 2
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def _manifests(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"image": "a.png", "caption": "x"}\n'.encode()
                      + '{"image": "b.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    folder = tmp_path / "images"
    folder.mkdir()
    return [(str(bad_json), f"{bad_json}:2: not valid JSON"),
            (str(latin1), f"{latin1}:2: not UTF-8"),
            (str(folder), f"data.path={folder} is a directory"),
            (str(tmp_path / "absent.jsonl"), "manifest not found")]


def test_data_errors_arrive_before_the_model_is_built(tmp_path, monkeypatch):
    from uniimage_jax.train import stage_setup, trainer

    def no_model(*a, **k):
        raise AssertionError("the model was built before the data was checked")
    monkeypatch.setattr(stage_setup, "build_model", no_model)
    monkeypatch.setattr(trainer.distributed, "maybe_initialize_distributed", no_model)
    for path, message in _manifests(tmp_path):
        with pytest.raises((UserError, FileNotFoundError), match=message):
            trainer.train(_tiny_config(source="jsonl", path=path), str(tmp_path / "w"))
    for batch in (0, -4):
        c = _tiny_config()
        c.batch_size = batch
        with pytest.raises(ConfigError, match=f"config.batch_size must be a positive integer.*"
                                              f"got {batch}"):
            trainer.train(c, str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="data.caption_dropout must be in"):
        trainer.train(_tiny_config(caption_dropout=1.5), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def _train_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "uniimage_jax.cli.train", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_train_cli_help_and_one_line_errors(tmp_path):
    p = _train_cli("--help")
    assert p.returncode == 0, p.stderr
    for needle in ("--config FILE[:PRESET]", "--config.KEY=VALUE", "uniimage_jax/train/config.py",
                   "--workdir", "--chain", "--debug", "configs/t2i_pretrain.py"):
        assert needle in p.stdout, needle

    manifest, message = _manifests(tmp_path)[1]
    cases = [
        ([f"--config={T2I}:tiny", f"--workdir={tmp_path}/w", "--config.no_such_field=1"],
         "--config.no_such_field: no such config field"),
        ([f"--config={T2I}:tiny", f"--workdir={tmp_path}/w", "--config.data.no_such=1"],
         "--config.data.no_such: no such config field"),
        ([f"--config={tmp_path}/absent.py:tiny", f"--workdir={tmp_path}/w"], "absent.py"),
        ([f"--config={T2I}:tiny"], "--config and --workdir are required"),
        ([f"--config={T2I}:tiny", f"--workdir={tmp_path}/w", "--config.data.source=jsonl",
          f"--config.data.path={manifest}"], message),
        ([f"--config={T2I}:tiny", f"--workdir={tmp_path}/w", "--config.data.source=jsonl",
          f"--config.data.mixture=({{'path': '{manifest}'}}, {{'pth': 'b.jsonl'}})"],
         "data.mixture[1].pth: no such data field"),
    ]
    for args, needle in cases:
        p = _train_cli(*args)
        assert p.returncode == 2, (args, p.stderr[-3000:])
        assert p.stderr.strip().splitlines()[-1].startswith("uniimage-train: error: ")
        assert needle in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-3000:])
    assert not os.path.exists(tmp_path / "w" / "t2i_pretrain")


# ------------------------------------------------------------------------- huge images


def _photo(width, height, fmt, seed=0):
    """A smooth picture with some texture (as photos are), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in range(3)], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt,expected_shape", [("JPEG", (192, 256, 3)), ("PNG", (192, 256, 3))])
def test_huge_images_decode_reduced_close_to_the_full_decode(fmt, expected_shape):
    """Reduced decode + resize vs full decode + resize, at the model's 64 px: within 3 levels
    (of 255) at every pixel of the (smooth) picture and 0.5 on average."""
    from uniimage_jax.data.images import load_image, resize_center_crop

    data = _photo(2048, 1536, fmt)
    reduced = load_image(data, min_size=64)
    assert reduced.shape == expected_shape  # 1/8 scale: libjpeg draft, or Image.reduce(8)
    a = resize_center_crop(reduced, 64).astype(np.int16)
    b = resize_center_crop(load_image(data), 64).astype(np.int16)
    diff = np.abs(a - b)
    assert diff.max() <= 3 and diff.mean() <= 0.5, (diff.max(), diff.mean())


def test_images_that_need_no_reduction_decode_bitwise_as_before():
    from uniimage_jax.data.images import load_image

    for fmt in ("JPEG", "PNG"):
        data = _photo(300, 250, fmt)   # shorter side < 4 x 64: decoded in full
        assert np.array_equal(load_image(data, min_size=64), load_image(data))


def test_decompression_bomb_is_skipped_counted_and_named(tmp_path, monkeypatch, caplog):
    from uniimage_jax.data.images import UnreadableImageError, load_image
    from uniimage_jax.data.pipeline import default_data_config, make_train_iterator

    (tmp_path / "bomb.png").write_bytes(_photo(200, 200, "PNG"))
    (tmp_path / "ok.png").write_bytes(_photo(20, 20, "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)   # limit 2 x 10k = 20k pixels
    with pytest.raises(UnreadableImageError, match=r"bomb\.png: Image size \(40000 pixels\) "
                                                   r".* exceeds the decompression-bomb limit"):
        load_image(str(tmp_path / "bomb.png"))
    (tmp_path / "m.jsonl").write_text('{"image": "bomb.png", "caption": "a"}\n'
                                      '{"image": "ok.png", "caption": "b"}\n')
    cfg = default_data_config("t2i")
    cfg.source, cfg.path = "jsonl", str(tmp_path / "m.jsonl")
    cfg.image_size, cfg.shuffle = 16, False
    with make_train_iterator(cfg, task="t2i", batch_size=2, seed=0) as it:
        batch = next(it)
        assert list(batch["caption"]) == ["b", "b"]
        assert it.skipped_files() == [str(tmp_path / "bomb.png")]


def test_full_disk_log_records_are_dropped_unless_debugging(caplog, monkeypatch):
    import logging

    from uniimage_jax.cli.errors import quiet_disk_full_logs

    monkeypatch.delenv("UNIIMAGE_DEBUG", raising=False)
    quiet_disk_full_logs("uniimage_test.quiet")
    quiet_disk_full_logs("uniimage_test.loud", debug=True)
    for name in ("uniimage_test.quiet", "uniimage_test.loud"):
        logging.getLogger(name).error("save failed: No space left on device")
        try:  # Orbax: a generic message, the full disk in the attached exception
            raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")
        except ValueError:
            logging.getLogger(name).exception("save thread failed")
        logging.getLogger(name).error("another failure")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("uniimage_test.quiet", "another failure"),
        ("uniimage_test.loud", "save failed: No space left on device"),
        ("uniimage_test.loud", "save thread failed"),
        ("uniimage_test.loud", "another failure")]


def test_sample_grid_settings_are_checked_before_training(tmp_path):
    from uniimage_jax.train import stage_setup

    c = _tiny_config()
    c.sample_every, c.sample_guidance = 10, float("nan")
    with pytest.raises(ConfigError, match="config.sample_guidance=nan"):
        stage_setup.validate(c)


def test_a_full_disk_can_end_the_process_at_once():
    """uniimage-train asks for it: nothing runs after the line (no shutdown noise)."""
    code = ("import atexit, errno\n"
            "from uniimage_jax.cli.errors import run_command\n"
            "atexit.register(print, 'atexit ran')\n"
            "def write():\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device', '/w/x')\n"
            "run_command('uniimage-x', write, exit_at_once_if_disk_full=True)\n"
            "print('returned')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.startswith("uniimage-x: error: no space left on device writing /w/x: ")
    assert p.stderr.count("\n") == 1
