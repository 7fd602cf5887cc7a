"""Data pipeline: robust decoding, skip-and-count, determinism, resume, sharding, CFG dropout."""
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uniimage_jax.data import images
from uniimage_jax.data.images import UnreadableImageError, load_image
from uniimage_jax.data.manifest import ManifestError
from uniimage_jax.data.pipeline import default_data_config, make_train_iterator
from uniimage_jax.data.sources import JsonlSource

RED = (220, 30, 30)


def _png16_rgb(path, rgb16, size=(6, 5)):
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write 48-bit PNGs)."""
    w, h = size
    row = b"\x00" + struct.pack(">3H", *rgb16) * w  # filter type 0 + big-endian samples

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def _solid(color, size=(40, 30), mode="RGB"):
    return Image.new(mode, size, color)


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
    """Good images plus every kind of trouble; returns (manifest path, expected bad files)."""
    return write_messy_dataset(tmp_path_factory.mktemp("messy"))


def write_messy_dataset(d):
    """Good images plus every kind of trouble in `d` (a pathlib.Path); returns (manifest path,
    the files expected to be skipped, d)."""
    (d / "img").mkdir(parents=True)
    good = []
    rng = np.random.default_rng(0)
    for i in range(9):
        arr = rng.integers(0, 256, (24 + 4 * i, 36, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / "img" / f"good{i}.png")
        good.append(f"img/good{i}.png")
    buf = io.BytesIO()
    _solid(RED, (64, 64)).save(buf, format="JPEG", quality=95)
    (d / "img" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "img" / "zero.jpg").write_bytes(b"")
    _solid((0, 255, 255, 0), (32, 32), "CMYK").save(d / "img" / "cmyk.jpg", quality=100)
    _png16_rgb(d / "img" / "rgb16.png", (0xFFFF, 0x8080, 0x0000))
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16] = (*RED, 255)  # top half opaque red, bottom half fully transparent black
    Image.fromarray(rgba, "RGBA").save(d / "img" / "rgba.png")
    lines = [{"image": p, "caption": f"good {i}"} for i, p in enumerate(good)]
    lines += [{"image": "img/truncated.jpg", "caption": "truncated"},
              {"image": "img/zero.jpg", "caption": "zero"},
              {"image": "img/missing.png", "caption": "missing"},
              {"image": "img/cmyk.jpg", "caption": "cmyk"},
              {"image": "img/rgb16.png", "caption": "sixteen"},
              {"image": "img/rgba.png", "caption": ""}]  # an empty caption is valid
    manifest = d / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    bad = {str(d / "img" / n) for n in ("truncated.jpg", "zero.jpg", "missing.png")}
    return manifest, bad, d


def test_load_image_formats(messy_dir):
    _, _, d = messy_dir
    cmyk = load_image(d / "img" / "cmyk.jpg")  # C=0, M=255, Y=255, K=0 is pure red
    assert cmyk.dtype == np.uint8 and cmyk.shape == (32, 32, 3)
    np.testing.assert_allclose(cmyk.reshape(-1, 3).mean(0), (255, 0, 0), atol=3)
    rgb16 = load_image(d / "img" / "rgb16.png")
    assert rgb16.shape == (5, 6, 3) and (rgb16 == (255, 128, 0)).all(), rgb16[0, 0]
    rgba = load_image(d / "img" / "rgba.png")
    assert (rgba[:16] == RED).all() and (rgba[16:] == 255).all()  # composited onto white
    grey16 = np.full((4, 4), 32768, np.uint16)
    grey16[0, 0], grey16[0, 1] = 65535, 1000
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    g = load_image(buf.getvalue())
    assert g[0, 0].tolist() == [255] * 3 and g[0, 1].tolist() == [4] * 3  # scaled, not clipped
    assert (g[1:] == 128).all()
    la = Image.new("LA", (4, 4), (0, 128))  # black at half opacity over white
    buf = io.BytesIO()
    la.save(buf, format="PNG")
    assert (np.abs(load_image(buf.getvalue()).astype(int) - 127) <= 1).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert (load_image(buf.getvalue()) == (10, 20, 30)).all()
    grey = load_image(_png_bytes(Image.new("L", (3, 3), 77)))
    assert grey.shape == (3, 3, 3) and (grey == 77).all()


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "decode failed"),
                                         ("zero.jpg", "empty file"),
                                         ("missing.png", "file not found")])
def test_unreadable_images_raise_naming_the_file(messy_dir, name, reason):
    _, _, d = messy_dir
    with pytest.raises(UnreadableImageError, match=reason) as e:
        load_image(d / "img" / name)
    assert e.value.path == str(d / "img" / name) and name in str(e.value)


def test_non_image_file_raises(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image")
    with pytest.raises(UnreadableImageError, match="not a recognised image format"):
        load_image(p)


def test_resize_center_crop_matches_torch_antialiased_bilinear():
    import torch

    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 256, (12, 20, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(smooth.astype(np.uint8)).resize((100, 60),
                                                                     Image.Resampling.BICUBIC))
    out = images.resize_center_crop(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # torchvision v2 Resize(32) on (60, 100): (32, int(32 * 100 / 60)) = (32, 53); crop left
    # int(round((53 - 32) / 2)) = 10. Torch's antialiased bilinear is the tensor twin of Pillow's.
    ref = torch.nn.functional.interpolate(torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float(),
                                          size=(32, 53), mode="bilinear", antialias=True,
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    ref = ref[:, 10:42]
    assert np.abs(out.astype(np.float32) - ref).max() <= 1.5
    x = images.to_model_range(np.array([[[0, 255, 128]]], np.uint8))
    np.testing.assert_allclose(x, [[[-1.0, 1.0, 128 / 127.5 - 1]]], atol=1e-7)


def test_manifest_errors_name_file_and_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: missing field 'caption'"):
        JsonlSource(m, "t2i")
    m.write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not valid JSON"):
        JsonlSource(m, "t2i")
    m.write_text('{"source_image": ["a.png", "b.png"], "caption": "edit", "target_image": "c.png"}\n'
                 '{"source_image": [], "instruction": "x", "target_image": "c.png"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: 'source_image'"):
        JsonlSource(m, "ti2i")
    m.write_text('{"source_image": ["a.png", "b.png"], "caption": "edit", "target_image": "c.png"}\n')
    rec = JsonlSource(m, "ti2i")[0]
    assert rec["source_images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert rec["instruction"] == "edit" and rec["target_image"] == str(tmp_path / "c.png")


def _jsonl_cfg(manifest, task="t2i", **kw):
    c = default_data_config(task)
    c.source, c.path, c.read_threads = "jsonl", str(manifest), 2
    c.update(kw)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pipeline_skips_and_counts_unreadable(messy_dir, caplog):
    manifest, bad, d = messy_dir
    cfg = _jsonl_cfg(manifest, caption_dropout=0.0)
    with caplog.at_level(logging.WARNING, logger="uniimage_jax.data"):
        it = make_train_iterator(cfg, task="t2i", batch_size=4, seed=3, image_size=16)
        batches = _take(it, 12)  # 48 examples = 3+ epochs of the 12 readable ones
    seen = np.concatenate([b["index"] for b in batches])
    assert set(seen.tolist()) == set(range(15)) - {9, 10, 11}
    assert batches[-1]["num_skipped"] == 3 == it.num_skipped
    assert sorted(it.skipped_files()) == sorted(bad)
    warnings = [r.getMessage() for r in caplog.records if r.name == "uniimage_jax.data"]
    for path in bad:  # each bad file named exactly once, however many epochs pass
        assert sum(path in w for w in warnings) == 1, (path, warnings)
    # ... by its manifest's file:line, as every other message names a record
    for line in (10, 11, 12):  # the truncated, empty and missing files' lines
        assert sum(w.startswith(f"skipping unreadable {manifest}:{line}: ") for w in warnings) \
            == 1, warnings
    for b in batches:
        assert b["target"].dtype == np.float32 and b["target"].shape == (4, 16, 16, 3)
        assert b["num_empty_captions"] == int((b["caption"] == "").sum())
        assert -1 <= b["target"].min() and b["target"].max() <= 1
    # CMYK / 16-bit / RGBA examples arrive with their true colours (solid or half-solid images).
    by_index = {int(i): (t, c) for b in batches for i, t, c in zip(b["index"], b["target"],
                                                                    b["caption"])}
    red = np.array(RED) / 127.5 - 1
    np.testing.assert_allclose(by_index[12][0].reshape(-1, 3).mean(0), (1, -1, -1), atol=0.03)
    np.testing.assert_allclose(by_index[13][0], np.broadcast_to([1, 128 / 127.5 - 1, -1],
                                                                (16, 16, 3)), atol=1e-6)
    np.testing.assert_allclose(by_index[14][0][:6], np.broadcast_to(red, (6, 16, 3)), atol=1e-6)
    np.testing.assert_allclose(by_index[14][0][10:], 1.0, atol=1e-6)
    assert by_index[14][1] == "" and by_index[12][1] == "cmyk"  # the empty caption is kept


def test_determinism_and_bitwise_resume(messy_dir):
    manifest, _, _ = messy_dir
    cfg = _jsonl_cfg(manifest)

    def fresh():
        return make_train_iterator(cfg, task="t2i", batch_size=3, seed=7, image_size=16)

    a, b = fresh(), fresh()
    first_a, first_b = _take(a, 5), _take(b, 5)
    _assert_same_batches(first_a, first_b)
    state = json.loads(json.dumps(a.get_state()))  # checkpoints store it as JSON
    uninterrupted = _take(a, 6)
    resumed = fresh()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 6), uninterrupted)
    assert resumed.skipped_files() == a.skipped_files()
    other_seed = make_train_iterator(cfg, task="t2i", batch_size=3, seed=8, image_size=16)
    assert any((x["index"] != y["index"]).any() for x, y in zip(first_a, _take(other_seed, 5)))


def test_per_host_sharding_is_disjoint_and_covering():
    cfg = default_data_config("t2i")
    cfg.synthetic_num_samples, cfg.read_threads = 23, 0
    seen = []
    for p in range(2):
        it = make_train_iterator(cfg, task="t2i", batch_size=1, seed=0, process_index=p,
                                 process_count=2, image_size=32)
        n = 12 if p == 0 else 11
        first_epoch = [int(next(it)["index"][0]) for _ in range(n)]
        assert len(set(first_epoch)) == n
        seen.append(set(first_epoch))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(23))


def test_global_batches_do_not_depend_on_the_process_count():
    """Two hosts with batch b see, together, the batches one host with batch 2b sees."""
    cfg = default_data_config("t2i")
    cfg.source, cfg.synthetic_num_samples, cfg.read_threads = "synthetic", 50, 0

    def batches(process, count, batch, n):
        it = make_train_iterator(cfg, task="t2i", batch_size=batch, seed=1, process_index=process,
                                 process_count=count, image_size=32)
        return [next(it) for _ in range(n)]

    single = batches(0, 1, 6, 10)  # 60 examples: crosses an epoch boundary
    hosts = [batches(p, 2, 3, 10) for p in range(2)]
    for step, whole in enumerate(single):
        parts = [hosts[p][step] for p in range(2)]
        np.testing.assert_array_equal(whole["index"], np.concatenate([b["index"] for b in parts]))
        np.testing.assert_array_equal(whole["target"],
                                      np.concatenate([b["target"] for b in parts]))
        assert list(whole["caption"]) == [c for b in parts for c in b["caption"]]


def test_t2i_caption_dropout_rate():
    cfg = default_data_config("t2i")
    cfg.synthetic_num_samples, cfg.read_threads = 1500, 2
    it = make_train_iterator(cfg, task="t2i", batch_size=100, seed=0, image_size=32)
    batches = _take(it, 30)  # two epochs: dropout is redrawn per epoch
    empty = sum(b["num_empty_captions"] for b in batches) / 3000
    assert abs(empty - 0.1) < 0.02, empty


def test_ti2i_dropout_rates_and_black_sources():
    cfg = default_data_config("ti2i")
    cfg.synthetic_num_samples, cfg.read_threads = 1000, 2
    it = make_train_iterator(cfg, task="ti2i", batch_size=100, seed=0, image_size=32,
                             source_image_size=28)
    caption_dropped = image_dropped = both = 0
    for b in _take(it, 10):
        assert b["source_image"].dtype == np.uint8 and b["source_image"].shape == (100, 28, 28, 3)
        black = (b["source_image"] == 0).reshape(100, -1).all(1)
        empty = b["caption"] == ""
        caption_dropped += empty.sum()
        image_dropped += black.sum()
        both += (black & empty).sum()
        # Synthetic scenes have a grey background: a black source can only come from dropout.
        assert not (b["source_image"][~black] == 0).reshape((~black).sum(), -1).all(1).any()
    assert abs(caption_dropped / 1000 - 0.2) < 0.035, caption_dropped
    assert abs(image_dropped / 1000 - 0.2) < 0.035, image_dropped
    assert abs(both / 1000 - 0.1) < 0.025, both  # 0.1 <= r < 0.2 drops both


def test_ti2i_dropout_is_exactly_the_official_rule():
    """Reproduce r from (seed, epoch, index) and check every example's dropout decision."""
    from uniimage_jax.data import pipeline

    cfg = default_data_config("ti2i")
    cfg.synthetic_num_samples, cfg.read_threads, cfg.shuffle = 40, 0, False
    it = make_train_iterator(cfg, task="ti2i", batch_size=10, seed=5, image_size=32,
                             source_image_size=32)
    from uniimage_jax.data.synthetic import SyntheticEditDataset

    ds = SyntheticEditDataset(num_samples=40, image_size=32, seed=0)
    for step, b in enumerate(_take(it, 8)):  # two epochs
        epoch = step * 10 // 40
        for i, idx in enumerate(b["index"]):
            r = np.random.default_rng([5, epoch, int(idx), pipeline._DROPOUT_STREAM]).random()
            sample = ds[int(idx)]
            assert b["caption"][i] == ("" if r < 0.2 else sample["instruction"])
            if 0.1 <= r < 0.3:
                assert (b["source_image"][i] == 0).all()
            else:
                np.testing.assert_array_equal(b["source_image"][i], sample["source_image"])
            np.testing.assert_array_equal(b["target"][i],
                                          sample["target_image"].astype(np.float32) / 127.5 - 1)


def test_ti2i_from_jsonl_manifest(messy_dir):
    _, _, d = messy_dir
    m = d / "edit.jsonl"
    m.write_text("\n".join(json.dumps(x) for x in [
        {"source_image": ["img/good0.png", "img/good1.png"], "instruction": "a", "target_image":
         "img/good2.png"},
        {"source_image": "img/zero.jpg", "instruction": "b", "target_image": "img/good3.png"},
        {"source_image": "img/cmyk.jpg", "caption": "c", "target_image": "img/rgb16.png"}]))
    cfg = _jsonl_cfg(m, "ti2i", caption_dropout=0.0, image_dropout_low=0.0, image_dropout_high=0.0)
    it = make_train_iterator(cfg, task="ti2i", batch_size=2, seed=0, image_size=16,
                             source_image_size=8)
    b = _take(it, 3)
    assert set(np.concatenate([x["index"] for x in b]).tolist()) == {0, 2}
    assert it.skipped_files() == [str(d / "img" / "zero.jpg")] and b[-1]["num_skipped"] == 1


def test_bad_config_is_rejected(messy_dir):
    manifest, _, _ = messy_dir
    with pytest.raises(ValueError, match="caption_dropout"):
        make_train_iterator(_jsonl_cfg(manifest, caption_dropout=1.5), task="t2i", batch_size=2,
                            seed=0)
    with pytest.raises(ValueError, match="none left for process"):
        make_train_iterator(_jsonl_cfg(manifest), task="t2i", batch_size=2, seed=0,
                            process_index=20, process_count=21)
    with pytest.raises(ValueError, match="data.source"):
        make_train_iterator(_jsonl_cfg(manifest, source="webdataset"), task="t2i",
                            batch_size=2, seed=0)


def test_all_unreadable_shard_is_an_error(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "nope1.png", "caption": "x"}\n{"image": "nope2.png", "caption": "y"}\n')
    it = make_train_iterator(_jsonl_cfg(m, read_threads=0), task="t2i", batch_size=1, seed=0)
    with pytest.raises(RuntimeError, match="no readable example"):
        next(it)
