"""Aspect-ratio buckets: the table and the nearest-bin rule against diffusers, the cover-crop
transform against torch, one shape per batch, deterministic and bitwise-resumable order that does
not depend on the process count, a tiny training run on mixed shapes, and `uniimage-sample
--height/--width`."""
import collections
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from uniimage_jax.data import images
from uniimage_jax.data.buckets import SANA_512_BINS, BucketPlan, make_bucket_set
from uniimage_jax.data.manifest import ManifestError
from uniimage_jax.data.pipeline import default_data_config, make_train_iterator
from uniimage_jax.data.sources import JsonlSource, SyntheticSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (width, height) of the images of the mixed dataset: ratios from 1:4 to 4:1, with near-ties
SIZES = [(64, 16), (60, 20), (90, 40), (70, 35), (48, 36), (40, 40), (41, 40), (36, 48),
         (35, 70), (40, 90), (20, 60), (16, 64), (100, 30), (30, 100), (66, 33), (33, 66),
         (50, 47), (47, 50), (80, 44), (44, 80)]


def _diffusers_bin(height, width):
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN

    return PixArtImageProcessor.classify_height_width_bin(height, width, ASPECT_RATIO_512_BIN)


def test_sana_512_table_is_diffusers():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN

    assert list(SANA_512_BINS) == list(ASPECT_RATIO_512_BIN)
    for key, (h, w) in ASPECT_RATIO_512_BIN.items():
        assert SANA_512_BINS[key] == (int(h), int(w))


def test_nearest_bin_is_diffusers_rule():
    rng = np.random.default_rng(0)
    sizes = [(h, w) for w, h in SIZES] + [tuple(x) for x in rng.integers(8, 4000, (500, 2))]
    sizes += [(h, w) for h, w in [(512, 512), (1, 4), (4, 1), (1, 1000), (1000, 1)]]
    at_512 = make_bucket_set("sana_512", 512, 32)
    assert at_512.shapes == tuple(SANA_512_BINS.values())  # no rescaling at the table's size
    buckets = at_512.buckets_of(np.array(sizes))
    for (h, w), b in zip(sizes, buckets):
        assert at_512.snap(h, w) == _diffusers_bin(h, w) == at_512.shapes[b], (h, w)
    # Scaled to the tiny preset (32 px, pixel autoencoder f4): the entry diffusers picks, each
    # side rounded to a multiple of 4 (halves up), at least 4.
    tiny = make_bucket_set("sana_512", 32, 4)
    for (h, w), b in zip(sizes, tiny.buckets_of(np.array(sizes))):
        dh, dw = _diffusers_bin(h, w)
        want = tuple(max(4, int(np.floor(x / 16 / 4 + 0.5)) * 4) for x in (dh, dw))
        assert tiny.shapes[b] == tiny.snap(h, w) == want, (h, w)
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in tiny.shapes) and len(tiny.shapes) == 22
    assert tiny.snap(32, 64) == (24, 44) and tiny.snap(32, 32) == (32, 32)
    assert list(tiny.buckets_of(np.array([[-1, -1]]))) == [-1]
    with pytest.raises(ValueError, match="data.aspect_buckets='sana_1024'"):
        make_bucket_set("sana_1024", 32, 4)


def test_resize_cover_crop_matches_torch_antialiased_bilinear():
    import torch

    rng = np.random.default_rng(1)
    img = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 20, 3)).astype(np.uint8)).resize(
        (100, 60), Image.Resampling.BICUBIC))
    out = images.resize_cover_crop(img, 24, 44)
    assert out.shape == (24, 44, 3) and out.dtype == np.uint8
    # Cover 24 x 44 from 60 x 100: the width binds (44/100 > 24/60): (int(44 * 60 / 100), 44)
    # = (26, 44), then rows int(round((26 - 24) / 2)) = 1 .. 25.
    assert images.cover_shape(60, 100, 24, 44) == (26, 44)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float(), size=(26, 44),
        mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(out.astype(np.float32) - ref[1:25]).max() <= 1.5
    # A square target is the official square transform.
    np.testing.assert_array_equal(images.resize_cover_crop(img, 32, 32),
                                  images.resize_center_crop(img, 32))
    assert images.cover_shape(60, 100, 32, 32) == images.resized_shape(60, 100, 32)
    assert images.read_image_size(_png_bytes(img)) == (60, 100)


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_mixed_dataset(d, *, truncated=True, missing=True, sizes_in_manifest=(0, 1)):
    """PNGs of SIZES (some lines giving width/height), plus a truncated file (its header reads,
    its pixels do not) and a missing one; returns (manifest, bad paths)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines, bad = [], []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(d / f"{i}.png")
        line = {"image": f"{i}.png", "caption": f"image {i}"}
        if i in sizes_in_manifest:
            line.update(width=w, height=h)
        lines.append(line)
    if truncated:
        data = _png_bytes(rng.integers(0, 256, (40, 41, 3), np.uint8))
        (d / "truncated.png").write_bytes(data[:len(data) // 2])
        lines.append({"image": "truncated.png", "caption": "cut"})
        bad.append(str(d / "truncated.png"))
    if missing:
        lines.append({"image": "missing.png", "caption": "gone"})
        bad.append(str(d / "missing.png"))
    manifest = d / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, bad


def _cfg(manifest, **kw):
    c = default_data_config("t2i")
    c.update(source="jsonl", path=str(manifest), read_threads=2, aspect_buckets="sana_512", **kw)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_every_batch_is_one_bucket_and_every_sample_its_nearest(tmp_path):
    manifest, bad = write_mixed_dataset(tmp_path / "d")
    it = make_train_iterator(_cfg(manifest), task="t2i", batch_size=2, seed=0, image_size=512,
                             size_multiple=32, cache_dir=str(tmp_path / "w"))
    hist = it.bucket_histogram
    assert sum(hist.values()) == len(SIZES) + 1  # the truncated file's header reads; missing not
    batches = _take(it, 40)
    seen = set()
    for b in batches:
        assert b["target"].dtype == np.float32 and b["target"].ndim == 4
        for index in b["index"]:
            seen.add(int(index))
            w, h = SIZES[index]
            assert b["target"].shape[1:3] == _diffusers_bin(h, w), (index, (h, w))
    # Every bucket holding a whole batch (2) of examples turns up, as the bucket diffusers picks.
    counts = collections.Counter(_diffusers_bin(h, w) for w, h in SIZES + [(41, 40)])
    used = {shape for shape, n in counts.items() if n >= 2}
    assert {b["target"].shape[1:3] for b in batches} == used and len(used) >= 4
    # The truncated example (index 20) never arrives: a same-bucket example replaces it, and it
    # is counted and named like any unreadable example, as is the missing file.
    assert len(SIZES) not in seen and len(SIZES) + 1 not in seen
    assert it.num_skipped == 2 and sorted(it.skipped_files()) == sorted(bad)
    assert batches[-1]["num_skipped"] == 2
    # The sizes were cached by manifest content; a second start reads the cache, not the files.
    cached = os.listdir(tmp_path / "w" / "bucket_cache")
    assert len(cached) == 1 and cached[0].startswith("t2i-")
    os.rename(tmp_path / "d" / "5.png", tmp_path / "d" / "5.moved")
    again = make_train_iterator(_cfg(manifest), task="t2i", batch_size=2, seed=0,
                                image_size=512, size_multiple=32, cache_dir=str(tmp_path / "w"))
    assert again.bucket_histogram == hist


def test_bucket_order_is_deterministic_resumes_bitwise_and_ignores_process_count(tmp_path):
    manifest, _ = write_mixed_dataset(tmp_path / "d")
    cfg = _cfg(manifest, caption_dropout=0.3)

    def fresh(batch=2, process=0, count=1, seed=5):
        return make_train_iterator(cfg, task="t2i", batch_size=batch, seed=seed,
                                   process_index=process, process_count=count, image_size=32,
                                   size_multiple=4)

    a, b = fresh(), fresh()
    first = _take(a, 7)
    _same(first, _take(b, 7))
    state = json.loads(json.dumps(a.get_state()))  # checkpoints store it as JSON
    rest = _take(a, 15)  # past an epoch boundary
    resumed = fresh()
    resumed.set_state(state)
    _same(_take(resumed, 15), rest)
    assert resumed.skipped_files() == a.skipped_files()
    assert any((x["index"] != y["index"]).any() for x, y in zip(first, _take(fresh(seed=6), 7)))
    # Two processes with batch 2 see together what one process with batch 4 sees.
    single = _take(fresh(batch=4), 12)
    hosts = [_take(fresh(batch=2, process=p, count=2), 12) for p in range(2)]
    for step, whole in enumerate(single):
        parts = [hosts[p][step] for p in range(2)]
        np.testing.assert_array_equal(whole["index"], np.concatenate([x["index"] for x in parts]))
        np.testing.assert_array_equal(whole["target"],
                                      np.concatenate([x["target"] for x in parts]))


def test_epoch_order_is_whole_global_batches_of_one_bucket():
    buckets = make_bucket_set("sana_512", 32, 4)
    rng = np.random.default_rng(0)
    bucket_of = rng.integers(-1, 5, 203).astype(np.int32)  # -1: size unreadable
    plan = BucketPlan(buckets=buckets, bucket_of=bucket_of, global_batch=6)
    counts = np.bincount(bucket_of[bucket_of >= 0], minlength=5)
    assert plan.epoch_length == int(sum(c // 6 * 6 for c in counts))
    orders = [plan.epoch_order(e, seed=1, shuffle=True) for e in range(3)]
    for order in orders:
        assert len(order) == plan.epoch_length and len(set(order.tolist())) == len(order)
        assert (bucket_of[order] >= 0).all()
        for chunk in order.reshape(-1, 6):
            assert len(set(bucket_of[chunk].tolist())) == 1
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(plan.epoch_order(2, seed=1, shuffle=True), orders[2])


def test_manifest_sizes_and_bad_config(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "caption": "x", "width": 64, "height": 32}\n')
    assert JsonlSource(m, "t2i")[0]["height"] == 32
    m.write_text('{"image": "a.png", "caption": "x", "width": 64}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:1: give both 'width' and 'height'"):
        JsonlSource(m, "t2i")
    m.write_text('{"image": "a.png", "caption": "x", "width": 64, "height": 0}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:1: field 'height' must be a positive"):
        JsonlSource(m, "t2i")
    c = default_data_config("t2i")
    c.aspect_buckets = "sana"
    with pytest.raises(ValueError, match="data.aspect_buckets='sana'"):
        make_train_iterator(c, task="t2i", batch_size=2, seed=0, image_size=32)
    c.aspect_buckets, c.synthetic_aspect_ratios = "sana_512", "1,wide"
    with pytest.raises(ValueError, match="data.synthetic_aspect_ratios='1,wide'"):
        make_train_iterator(c, task="t2i", batch_size=2, seed=0, image_size=32)
    c.synthetic_aspect_ratios, c.synthetic_num_samples = "", 3
    with pytest.raises(ValueError, match="no bucket holds a whole global batch of 4"):
        make_train_iterator(c, task="t2i", batch_size=4, seed=0, image_size=32)


def test_synthetic_mixed_aspect_pads_the_scene_with_its_background():
    from uniimage_jax.data.synthetic_scenes import BACKGROUND

    square = SyntheticSource("t2i", 30, 32, seed=2)
    mixed = SyntheticSource("t2i", 30, 32, seed=2, aspect_ratios=(0.5, 1.0, 2.0))
    sizes = {mixed.target_size(i) for i in range(30)}
    assert sizes == {(32, 64), (32, 32), (64, 32)}
    for i in range(30):
        img, scene = mixed[i]["image"], square[i]["image"]
        h, w = mixed.target_size(i)
        assert img.shape == (h, w, 3) and mixed[i]["caption"] == square[i]["caption"]
        top, left = (h - 32) // 2, (w - 32) // 2
        np.testing.assert_array_equal(img[top:top + 32, left:left + 32], scene)
        outside = np.ones((h, w), bool)
        outside[top:top + 32, left:left + 32] = False
        assert (img[outside] == BACKGROUND).all()


def _run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def test_tiny_trains_on_mixed_shapes_then_samples_wide(tmp_path):
    """The tiny preset trains through a mixed-shape dataset (one compiled step per bucket) and
    `uniimage-sample --height 32 --width 64` writes 64 x 32 images from it."""
    w = str(tmp_path / "w")
    out = _run([sys.executable, "-m", "uniimage_jax.cli.train",
                f"--config={ROOT}/configs/t2i_pretrain.py:tiny", f"--workdir={w}",
                "--config.max_steps=4", "--config.batch_size=4", "--config.log_every=1",
                "--config.checkpoint.async_save=False", "--config.data.aspect_buckets=sana_512",
                "--config.data.synthetic_num_samples=64",
                "--config.data.synthetic_aspect_ratios=0.5,1"])
    assert "aspect buckets sana_512" in out.stderr and "24x44" in out.stderr
    stage = os.path.join(w, "t2i_pretrain")
    with open(os.path.join(stage, "metrics.jsonl")) as fh:
        losses = [json.loads(line)["loss"] for line in fh]
    assert len(losses) == 4 and all(np.isfinite(losses))
    with open(os.path.join(stage, "buckets.json")) as fh:
        hist = json.load(fh)["examples_per_bucket"]
    assert set(hist) == {"24x44", "32x32"} and sum(hist.values()) == 64
    sample = [sys.executable, "-m", "uniimage_jax.cli.sample", "--checkpoint", stage,
              "--prompt", "a photo of a red circle", "--steps", "2", "--num-images", "1",
              "--images-per-call", "1", "--no-grid"]
    out = _run(sample + ["--height", "32", "--width", "64", "--out", str(tmp_path / "binned")])
    assert "snapped to the nearest aspect-ratio bin 24x44" in out.stdout
    assert np.asarray(Image.open(tmp_path / "binned" / "00000_00.png")).shape == (32, 64, 3)
    out = _run(sample + ["--height", "32", "--width", "64", "--no-binning",
                         "--out", str(tmp_path / "exact")])
    assert "snapped" not in out.stdout
    assert np.asarray(Image.open(tmp_path / "exact" / "00000_00.png")).shape == (32, 64, 3)
    bad = subprocess.run(sample + ["--height", "30", "--width", "64", "--no-binning",
                                   "--out", str(tmp_path / "bad")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "image size 30x64 (height x width) must be positive multiples of 4" in bad.stderr


def test_ti2i_targets_take_buckets_and_sources_stay_square():
    c = default_data_config("ti2i")
    c.update(synthetic_num_samples=40, read_threads=1, aspect_buckets="sana_512",
             synthetic_aspect_ratios="0.5,2")
    it = make_train_iterator(c, task="ti2i", batch_size=2, seed=0, image_size=32,
                             size_multiple=4, source_image_size=56)
    shapes = set()
    for _ in range(10):
        b = next(it)
        shapes.add(b["target"].shape)
        assert b["source_image"].shape == (2, 56, 56, 3)
    assert shapes == {(2, 24, 44, 3), (2, 44, 24, 3)}
