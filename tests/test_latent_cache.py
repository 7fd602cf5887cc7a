"""The latent cache (`uniimage-cache-latents`, data.source='latents'): the step's loss from cached
latents equals the loss of encoding on the fly, the pipeline over a cache gives the batches of its
source, an interrupted cache resumes to the one-go result, unreadable images are skipped and
counted, errors are one line, and a tiny stage trains from a cache."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from uniimage_jax.data.latent_records import (
    METADATA_FILE,
    LatentRecordSource,
    shard_file,
)
from uniimage_jax.errors import ConfigError
from uniimage_jax.train.latent_cache import cache_latents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A small DC-AE in place of the tiny preset's pixel autoencoder, so that the cache goes through a
# real encoder (ResBlock and EfficientViT stages, 4x down, scaling factor): 32 px -> 8 x 8 x 48,
# the latent shape of the tiny DiT.
DCAE = {"in_channels": 3, "latent_channels": 48, "attention_head_dim": 8,
        "encoder_block_types": ["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [12, 24, 48], "decoder_block_out_channels": [12, 24, 48],
        "encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1],
        "encoder_qkv_multiscales": [[], [5], [5]], "decoder_qkv_multiscales": [[], [5], [5]],
        "downsample_block_type": "conv", "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407}


def _with_dcae(config):
    config.model.vae = ml_collections.ConfigDict(DCAE)
    return config


def _config(stage="t2i_pretrain", num_samples=6, **data):
    spec = importlib.util.spec_from_file_location(stage, os.path.join(ROOT, "configs",
                                                                      f"{stage}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    config.data.synthetic_num_samples = num_samples
    config.data.read_threads = 2
    for key, value in data.items():
        config.data[key] = value
    return config


def _latent_data(config, path):
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.source, data.path = "latents", str(path)
    return data


def _batches(data_cfg, task, n, batch_size=2, image_size=32):
    from uniimage_jax.data.pipeline import make_train_iterator

    with make_train_iterator(data_cfg, task=task, batch_size=batch_size, seed=3,
                             image_size=image_size) as it:
        return [next(it) for _ in range(n)]


def _records(path):
    source = LatentRecordSource(path)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def t2i_cache(tmp_path_factory):
    config = _with_dcae(_config(num_samples=6, caption_dropout=0.4))
    out = tmp_path_factory.mktemp("t2i_cache") / "latents"
    result = cache_latents(config, str(out), batch_size=4, shard_size=4)
    assert result.complete and result.num_examples == 6 and result.num_skipped == 0
    return config, out


def test_train_step_loss_from_cached_latents_equals_encoding_on_the_fly(t2i_cache, tmp_path):
    from uniimage_jax.train import sharding
    from uniimage_jax.train.batches import prepare_batch
    from uniimage_jax.train.optimizer import make_optimizer
    from uniimage_jax.train.stage_setup import (
        base_params,
        build_model,
        load_processor_for,
        split_params,
    )
    from uniimage_jax.train.step import TrainState, make_train_step

    config, out = t2i_cache
    model = build_model(config)
    processor = load_processor_for(config, model, str(tmp_path))
    mesh = sharding.make_mesh({"data": 1}, devices=jax.local_devices()[:1])
    # The parameters the cache was encoded with: the tiny preset's init from config.seed.
    trainable, frozen = split_params(
        base_params(config, model, mesh, sharding.rules_from_config(config.logical_rules)),
        config, model)
    tx = make_optimizer(config.optimizer)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                       opt_state=tx.init(trainable), rng=jax.random.PRNGKey(5))
    step = jax.jit(make_train_step(model, tx, config), static_argnums=(3,))
    images = _batches(config.data, "t2i", 1, batch_size=4)[0]
    cached = _batches(_latent_data(config, out), "t2i", 1, batch_size=4)[0]
    assert "target" not in cached and cached["latents"].shape == (4, 8, 8, 48)
    np.testing.assert_array_equal(images["caption"], cached["caption"])
    a_img, _ = prepare_batch(images, processor, model, config, "t2i")
    a_lat, _ = prepare_batch(cached, processor, model, config, "t2i")
    assert "target" not in a_lat
    _, m_img = step(state, frozen, a_img, None)
    _, m_lat = step(state, frozen, a_lat, None)
    loss_img, loss_lat = float(m_img["loss"]), float(m_lat["loss"])
    assert np.isfinite(loss_img) and abs(loss_img - loss_lat) <= 1e-6, (loss_img, loss_lat)
    # The cached latents are the autoencoder's output for the pipeline's crop.
    encoded = jax.jit(model.encode_images)(frozen, jnp.asarray(images["target"]))
    # (To fp32 rounding: the cache encoded them in a batch sharded over the devices.)
    np.testing.assert_allclose(cached["latents"], np.asarray(encoded), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["t2i_pretrain", "ti2i_pretrain"])
def test_pipeline_over_a_cache_repeats_its_source(stage, t2i_cache, tmp_path):
    if stage == "t2i_pretrain":
        config, out = t2i_cache
        task = "t2i"
    else:  # dropout made frequent, so that a different draw would show
        config = _config(stage, num_samples=6, caption_dropout=0.3, image_dropout_low=0.1,
                         image_dropout_high=0.6)
        out = tmp_path / "ti2i"
        cache_latents(config, str(out), batch_size=2, shard_size=4)
        task = "ti2i"
    n = 6  # two epochs of 3 batches: the epoch enters the dropout draw
    original = _batches(config.data, task, n)
    cached = _batches(_latent_data(config, out), task, n)
    for a, b in zip(original, cached):
        for key in ("caption", "index", "name", "num_empty_captions", "num_skipped"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        if task == "ti2i":
            np.testing.assert_array_equal(a["source_image"], b["source_image"])
    assert sum(b["num_empty_captions"] for b in cached) > 0  # the dropout really drew
    if task == "ti2i":
        black = [not img.any() for b in cached for img in b["source_image"]]
        assert any(black) and not all(black)


def test_an_interrupted_cache_resumes_to_the_one_go_result(tmp_path):
    config = _config(num_samples=10)
    one_go, resumed = tmp_path / "one_go", tmp_path / "resumed"
    cache_latents(config, str(one_go), batch_size=2, shard_size=3)
    first = cache_latents(config, str(resumed), batch_size=2, shard_size=3, max_shards=1)
    assert not first.complete and first.shards_done == 1 and first.num_shards == 4
    with pytest.raises(ConfigError, match="incomplete"):
        LatentRecordSource(resumed)
    # A shard written but never marked complete (killed between the two writes): redone.
    (resumed / shard_file(1)).write_bytes(b"partial")
    second = cache_latents(config, str(resumed), batch_size=2, shard_size=3)
    assert second.complete and second.shards_written == 3
    a, b = _records(one_go), _records(resumed)
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    meta_a, meta_b = (json.loads((d / METADATA_FILE).read_text()) for d in (one_go, resumed))
    assert meta_a == meta_b
    # The same directory with other data is refused, naming what differs.
    other = _config(num_samples=12)
    with pytest.raises(ConfigError, match="holds a latent cache of other data"):
        cache_latents(other, str(resumed), batch_size=2, shard_size=3)


def test_sigterm_leaves_no_partial_shard_and_a_rerun_clears_what_a_kill_left(tmp_path,
                                                                             monkeypatch, capsys):
    """SIGTERM in the middle of a shard (a real signal, through the commands' handler): one line
    saying what is complete, exit status 143, no temporary shard left; the rerun removes what a
    killed run (kill -9 cleans nothing up) left and finishes the cache."""
    import signal

    from uniimage_jax.cli.errors import TERMINATED_EXIT_CODE, run_command
    from uniimage_jax.train import latent_cache

    config = _config(num_samples=6)
    out = tmp_path / "cache"
    encode = latent_cache._encode_shard

    def encode_then_sigterm(reader, indices, *args):
        for n, record in enumerate(encode(reader, indices, *args)):
            yield record
            if indices.start == 2 and n == 0:  # shard 1 of 3: its first record is written
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(latent_cache, "_encode_shard", encode_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    code = run_command("uniimage-cache-latents",
                       lambda: cache_latents(config, str(out), batch_size=2, shard_size=2))
    assert code == TERMINATED_EXIT_CODE == 143
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"uniimage-cache-latents: stopped by SIGTERM: 1 of 3 shards of {out} complete; rerun "
        "the same command to continue")
    assert sorted(os.listdir(out)) == sorted([METADATA_FILE, shard_file(0), "shard-00000.json"])
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    monkeypatch.undo()
    (out / f"{shard_file(2)}.tmp-99999").write_bytes(b"")
    (out / f".{METADATA_FILE}.k3j_x9.tmp").write_text("{")  # as storage.write_text leaves it
    result = cache_latents(config, str(out), batch_size=2, shard_size=2)
    assert result.complete and result.shards_written == 2 and result.num_examples == 6
    assert not [n for n in os.listdir(out) if ".tmp" in n], os.listdir(out)


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    from tests.test_data import write_messy_dataset

    manifest, bad, _ = write_messy_dataset(tmp_path / "data")
    config = _config(source="jsonl", path=str(manifest))
    out = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="uniimage_jax.data"):
        result = cache_latents(config, str(out), batch_size=4, shard_size=8)
    assert result.complete and result.num_skipped == len(bad) == 3
    assert result.num_examples == 15 - 3
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["num_skipped"] == 3
    assert {s[1] for shard in meta["shards"] for s in shard["skipped"]} == bad
    for f in bad:
        assert f in caplog.text, f
    names = {r["name"] for r in _records(out)}
    assert len(names) == 12 and all(n.startswith(str(manifest)) for n in names)


def test_config_errors_name_the_field(t2i_cache, tmp_path):
    from uniimage_jax.data.pipeline import check_training_data

    config, out = t2i_cache
    cases = [({"aspect_buckets": "sana_512"}, "t2i_pretrain", "aspect buckets with a latent"),
             ({"image_size": 64}, "t2i_pretrain", "data.image_size=64"),
             ({}, "ti2i_pretrain", "caches t2i data"),
             ({"path": str(tmp_path / "nothing")}, "t2i_pretrain", "no such latent cache")]
    for data, stage, message in cases:
        c = _config(stage)
        c.data.source, c.data.path = "latents", str(out)
        for key, value in data.items():
            c.data[key] = value
        with pytest.raises(ConfigError, match=message):
            check_training_data(c)
    # The tiny preset's own pixel autoencoder did not encode this cache: refused at start-up.
    from uniimage_jax.train.latent_cache import check_cache_fits_model
    from uniimage_jax.train.stage_setup import build_model

    c = _config()
    c.data.source, c.data.path = "latents", str(out)
    check_training_data(c)
    with pytest.raises(ConfigError, match="another autoencoder"):
        check_cache_fits_model(c, build_model(c))
    check_cache_fits_model(config, build_model(config))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "uniimage_jax.cli.cache_latents", *args],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "UNIIMAGE_DEBUG"})


def test_cli_errors_are_one_line_with_status_2(t2i_cache, tmp_path):
    _, out = t2i_cache
    p = _cli(f"--config={ROOT}/configs/ti2i_pretrain.py:tiny", f"--out={out}",
             "--config.data.synthetic_num_samples=6", "--shard_size=4")
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("uniimage-cache-latents: error: --out ") and "task" in lines[-1]
    assert "Traceback" not in p.stderr
    p = _cli(f"--config={tmp_path}/missing.py:tiny", f"--out={tmp_path}/o")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        (f"uniimage-cache-latents: error: --config {tmp_path}/missing.py: no such file (the "
         "stage configs are configs/*.py of the source checkout)")]


def test_a_tiny_stage_trains_from_a_cache(t2i_cache, tmp_path):
    from uniimage_jax.train.trainer import train

    _, out = t2i_cache
    c = _with_dcae(_config())
    c.data.source, c.data.path = "latents", str(out)
    c.max_steps, c.batch_size, c.log_every = 2, 2, 1
    c.checkpoint.async_save = False
    result = train(c, str(tmp_path / "w"))
    assert result.step == 2 and all(np.isfinite(result.losses)) and len(result.losses) == 2


def test_two_processes_write_the_cache_of_one(tmp_path):
    import socket

    one, two = tmp_path / "one", tmp_path / "two"
    args = [f"--config={ROOT}/configs/t2i_pretrain.py:tiny", "--shard_size=2", "--batch=2",
            "--config.data.synthetic_num_samples=7"]
    p = _cli(*args, f"--out={one}")
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "uniimage_jax.cli.cache_latents", *args, f"--out={two}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    # Shards 0 and 2 of 4 from process 0 (and the metadata), 1 and 3 from process 1.
    for out, _ in outs:
        assert "7 examples encoded" in out and "2 shards written now (complete)" in out, out
    a, b = _records(one), _records(two)
    assert [r["index"] for r in b] == list(range(7))
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert (json.loads((one / METADATA_FILE).read_text())["shards"]
            == json.loads((two / METADATA_FILE).read_text())["shards"])


def test_a_converted_autoencoder_is_read_alone(tmp_path):
    """`pretrained.vae`: the converted DC-AE is what encodes (and nothing else is loaded)."""
    import flax.linen as nn

    from uniimage_jax.checkpoints.converted import save_converted
    from uniimage_jax.data.pipeline import example_reader
    from uniimage_jax.data.sources import make_source
    from uniimage_jax.train.stage_setup import build_model

    config = _with_dcae(_config(num_samples=3))
    model = build_model(config)
    vae = jax.device_get(nn.meta.unbox(model.init_autoencoder(jax.random.PRNGKey(7))))
    save_converted(str(tmp_path / "vae"), vae, {"kind": "vae", "vae": model.config.vae.to_dict()})
    config.pretrained.vae = str(tmp_path / "vae")
    cache_latents(config, str(tmp_path / "cache"), batch_size=2, shard_size=3)
    reader = example_reader(make_source(config.data, "t2i", 32), "t2i", 32, 448)
    targets = np.stack([reader(i, i)["target"] for i in range(3)])
    want = np.asarray(jax.jit(model.encode_images)({"vae": vae}, jnp.asarray(targets)))
    got = np.stack([r["latents"] for r in _records(tmp_path / "cache")])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "cache" / METADATA_FILE).read_text())
    assert meta["model"]["pretrained_vae"] == str(tmp_path / "vae")
    assert meta["scaling_factor"] == 0.41407
