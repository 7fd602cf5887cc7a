"""TFDS builder (array_record) for user data, read back through the training pipeline."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from uniimage_jax.data.images import load_image, resize_center_crop, to_model_range
from uniimage_jax.data.pipeline import default_data_config, make_train_iterator



@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One folder of images (good, CMYK, RGBA, truncated, missing) built as t2i and ti2i."""
    import tensorflow_datasets  # noqa: F401  (slow import: once per module)

    from uniimage_jax.data.tfds_builder import build_tfds_dataset

    d = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + 2 * i, 24, 3), dtype=np.uint8)).save(
            d / f"p{i}.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / "j.jpg",
                                                                           quality=90)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=100)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="JPEG")
    (d / "trunc.jpg").write_bytes(buf.getvalue()[:200])
    t2i = [{"image": f"p{i}.png", "caption": f"picture {i}"} for i in range(5)]
    t2i += [{"image": "j.jpg", "caption": "jpeg"}, {"image": "cmyk.jpg", "caption": ""},
            {"image": "trunc.jpg", "caption": "bad"}, {"image": "gone.png", "caption": "bad"}]
    (d / "t2i.jsonl").write_text("\n".join(json.dumps(x) for x in t2i))
    ti2i = [{"source_image": [f"p{i}.png", "p0.png"], "instruction": f"edit {i}",
             "target_image": f"p{(i + 1) % 5}.png"} for i in range(4)]
    ti2i += [{"source_image": "trunc.jpg", "instruction": "bad", "target_image": "p0.png"}]
    (d / "ti2i.jsonl").write_text("\n".join(json.dumps(x) for x in ti2i))
    out = tmp_path_factory.mktemp("tfds")
    return d, out, build_tfds_dataset(d / "t2i.jsonl", out, "t2i"), \
        build_tfds_dataset(d / "ti2i.jsonl", out, "ti2i")


def test_builder_writes_array_record_and_skips_unreadable(built):
    d, out, t2i, ti2i = built
    assert t2i.num_examples == 7 and ti2i.num_examples == 4
    assert sorted(s.split(":")[0] for s in t2i.skipped) == [str(d / "gone.png"),
                                                            str(d / "trunc.jpg")]
    assert [s.split(":")[0] for s in ti2i.skipped] == [str(d / "trunc.jpg")]
    assert ti2i.extra_sources_dropped == 4
    assert list(out.rglob("*.array_record*")), "no array_record shards written"
    assert not list(out.rglob("*.tfrecord*"))


def test_tfds_source_feeds_the_pipeline(built, caplog):
    d, out, t2i, _ = built
    cfg = default_data_config("t2i")
    cfg.source, cfg.tfds_name, cfg.tfds_data_dir = "tfds", t2i.name, str(out)
    cfg.caption_dropout, cfg.read_threads = 0.0, 0
    it = make_train_iterator(cfg, task="t2i", batch_size=7, seed=0, image_size=16)
    b = next(it)
    assert b["num_skipped"] == 0 and b["target"].shape == (7, 16, 16, 3)
    by_caption = {c: t for c, t in zip(b["caption"], b["target"])}
    assert set(by_caption) == {f"picture {i}" for i in range(5)} | {"jpeg", ""}
    for i in range(5):  # PNG round trip is lossless: identical to reading the file directly
        want = to_model_range(resize_center_crop(load_image(d / f"p{i}.png"), 16))
        np.testing.assert_array_equal(by_caption[f"picture {i}"], want)
    want = to_model_range(resize_center_crop(load_image(d / "j.jpg"), 16))  # original bytes
    np.testing.assert_allclose(by_caption["jpeg"], want, atol=2 / 127.5)
    np.testing.assert_allclose(by_caption[""].reshape(-1, 3).mean(0), (1, -1, -1), atol=0.03)
    state = json.loads(json.dumps(it.get_state()))
    nxt = next(it)
    again = make_train_iterator(cfg, task="t2i", batch_size=7, seed=0, image_size=16)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["target"], nxt["target"])


def test_tfds_ti2i_source(built):
    d, out, _, ti2i = built
    cfg = default_data_config("ti2i")
    cfg.source, cfg.tfds_name, cfg.tfds_data_dir = "tfds", ti2i.name, str(out)
    cfg.caption_dropout = cfg.image_dropout_low = cfg.image_dropout_high = 0.0
    cfg.read_threads = 0
    it = make_train_iterator(cfg, task="ti2i", batch_size=4, seed=0, image_size=16,
                             source_image_size=8)
    b = next(it)
    for idx, instr, src in zip(b["index"], b["caption"], b["source_image"]):
        i = int(instr.split()[-1])
        np.testing.assert_array_equal(src, resize_center_crop(load_image(d / f"p{i}.png"), 8))
    assert sorted(b["caption"].tolist()) == [f"edit {i}" for i in range(4)]


def test_unbuilt_tfds_dataset_is_a_clear_error(built, tmp_path):
    cfg = default_data_config("t2i")
    cfg.source, cfg.tfds_name, cfg.tfds_data_dir = "tfds", "uniimage_user_data/t2i", str(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not built under"):
        make_train_iterator(cfg, task="t2i", batch_size=2, seed=0)
