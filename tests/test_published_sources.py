"""Sources of the published layouts (wds tar shards, Hugging Face Arrow / parquet, JSON metadata
with image folders): the same examples as a JSONL manifest of the same images and captions, bad
samples skipped, counted and named, exact resume, batches independent of the process count
(in-process and two real processes sharing the member index), gs:// through the emulator."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests import published_sets as ps
from uniimage_jax.data.pipeline import default_data_config, make_train_iterator
from uniimage_jax.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAREGPT_T2I = {"image_field": "output_image", "caption_field": "input_prompt"}
SHAREGPT_TI2I = {"source_image_field": "input_image", "instruction_field": "input_prompt",
                 "target_image_field": "output_image"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("published"))
    out = ps.write_published_sets(root)
    # The Long-Caption samples again as an Arrow table, a parquet file and ShareGPT-style JSON.
    samples = ps.t2i_samples(12, seed=0)
    ps.write_arrow_t2i(os.path.join(root, "arrow_t2i"), samples,
                       parquet=os.path.join(root, "parquet_t2i", "train-00000.parquet"))
    out["sharegpt_like"] = ps.write_sharegpt(os.path.join(root, "sharegpt_like"), samples, [])[0]
    out["wds_ti2i"] = ps.write_wds_ti2i(os.path.join(root, "wds_ti2i"), ps.ti2i_samples(8), 3)
    return out


def _cfg(task, **fields):
    c = default_data_config(task)
    c.read_threads, c.prefetch_buffer_size = 2, 4  # tiny sets: no read-ahead past the test
    c.update(fields)
    return c


def _batches(cfg, task, n=6, batch=3, process=0, count=1, cache_dir=None, state=None):
    it = make_train_iterator(cfg, task=task, batch_size=batch, seed=3, image_size=32,
                             source_image_size=16, process_index=process, process_count=count,
                             cache_dir=cache_dir)
    if state is not None:
        it.set_state(state)
    return it, [next(it) for _ in range(n)]


KEYS = ("target", "caption", "index", "num_empty_captions", "num_skipped")


def _assert_same(a, b, keys=KEYS):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _t2i_sources(sets):
    root = sets["root"]
    return {"wds": _cfg("t2i", source="wds", path=f"{root}/BLIP3o-Pretrain-Long-Caption"),
            "hf_arrow": _cfg("t2i", source="hf", path=f"{root}/arrow_t2i"),
            "hf_parquet": _cfg("t2i", source="hf", path=f"{root}/parquet_t2i"),
            "json_images": _cfg("t2i", source="json_images", path=sets["sharegpt_like"],
                                **SHAREGPT_T2I)}


def _ti2i_sources(sets):
    root = sets["root"]
    return {"wds": _cfg("ti2i", source="wds", path=f"{root}/wds_ti2i"),
            "hf_arrow": _cfg("ti2i", source="hf", path=f"{root}/GPT-Image-Edit-1.5M"),
            "json_images": _cfg("ti2i", source="json_images", path=sets["sharegpt"][1],
                                **SHAREGPT_TI2I)}


def test_every_source_gives_the_manifest_examples(sets, tmp_path):
    """Bitwise the decoded (and cropped, dropped-out) examples of a JSONL manifest of the same
    images and captions, over more than an epoch."""
    _, ref = _batches(_cfg("t2i", source="jsonl", path=sets["t2i_manifest"]), "t2i")
    for kind, cfg in _t2i_sources(sets).items():
        _, got = _batches(cfg, "t2i", cache_dir=str(tmp_path))
        _assert_same(ref, got)
        assert got[0]["num_empty_captions"] + len({c for b in got for c in b["caption"]}) > 3
    _, ref = _batches(_cfg("ti2i", source="jsonl", path=sets["ti2i_manifest"]), "ti2i")
    for kind, cfg in _ti2i_sources(sets).items():
        _, got = _batches(cfg, "ti2i", cache_dir=str(tmp_path))
        _assert_same(ref, got, KEYS + ("source_image",))
    # A wds caption from a field of the json member instead of the txt member.
    cfg = _cfg("t2i", source="wds", path=sets["long_caption"][0], caption_field="prompt",
               caption_dropout=0.0, shuffle=False)
    _, got = _batches(cfg, "t2i", n=1, batch=5)
    assert list(got[0]["caption"]) == [f"short prompt 0/{i}" for i in range(5)]
    assert got[0]["name"][1] == f"{sets['long_caption'][0]}:0000001"


def _bad_wds(d):
    """Shards with a sample of each kind of trouble; returns (spec, {name: reason part})."""
    good = ps.t2i_samples(6, seed=3)
    shard0 = str(d / "00000.tar")
    import webdataset as wds

    with wds.TarWriter(shard0) as w:
        w.write({"__key__": "g0", "jpg": good[0]["image"], "txt": "good 0"})
        w.write({"__key__": "no_image", "txt": "a caption", "json": {"prompt": "p"}})
        w.write({"__key__": "no_caption", "png": good[1]["image"]})
        jpeg = good[0]["image"]  # a JPEG cut in half: its header reads, its pixels do not
        w.write({"__key__": "undecodable", "jpg": jpeg[:len(jpeg) // 2], "txt": "x"})
        w.write({"__key__": "g1", "png": good[1]["image"], "txt": "good 1"})
    shard1 = str(d / "00001.tar")
    with wds.TarWriter(shard1) as w:
        w.write({"__key__": "g2", "webp": good[2]["image"], "txt": "good 2"})
        w.write({"__key__": "g3", "jpg": good[3]["image"], "txt": "good 3"})
        w.write({"__key__": "cut", "jpg": good[0]["image"], "txt": "cut short"})
    with tarfile.open(shard1) as t:  # cut the shard inside the last sample's image
        member = next(m for m in t.getmembers() if m.name == "cut.jpg")
    with open(shard1, "r+b") as fh:
        fh.truncate(member.offset_data + member.size // 2)
    bad = {f"{shard0}:no_image": "no image member", f"{shard0}:no_caption": "no caption",
           f"{shard0}:undecodable": "decode failed", f"{shard1}:cut": "truncated member cut.jpg"}
    good = {f"{shard0}:g0", f"{shard0}:g1", f"{shard1}:g2", f"{shard1}:g3"}
    return str(d / "{00000..00001}.tar"), bad, good


def _bad_hf(d):
    import datasets

    good = ps.t2i_samples(3, seed=4)
    images = [good[0]["image"], None, good[1]["image"], b"garbage bytes", good[2]["image"]]
    path = str(d / "table")
    datasets.Dataset.from_dict(
        {"image": [None if b is None else {"bytes": b, "path": None} for b in images],
         "caption": ["c0", "c1", None, "c3", "c4"]},
        features=datasets.Features({"image": datasets.Image(),
                                    "caption": datasets.Value("string")})).save_to_disk(path)
    return path, {f"{path}[1]": "no image (null)", f"{path}[2]": "no caption (null)",
                  f"{path}[3]": "not a recognised image format"}, {f"{path}[0]", f"{path}[4]"}


def _bad_json(d):
    good = ps.t2i_samples(2, seed=5)
    ps.write_images(str(d), {"a.png": good[0]["image"], "b.png": good[1]["image"],
                             "broken.jpg": b"\xff\xd8\xff garbage"})
    path = ps.write_manifest(str(d / "meta.jsonl"), [
        {"output_image": "a.png", "input_prompt": "a"},
        {"output_image": "missing.png", "input_prompt": "m"},
        {"output_image": "b.png"},
        {"output_image": "broken.jpg", "input_prompt": "x"},
        {"output_image": None, "input_prompt": "n"},
        {"output_image": "b.png", "input_prompt": "b"}])
    return path, {str(d / "missing.png"): "file not found",
                  f"{path}:3": "no caption (no field 'input_prompt')",
                  str(d / "broken.jpg"): "not a recognised image format",
                  f"{path}:5": "no image (null)"}, \
        {f"{path}:1", f"{path}:6"}


@pytest.mark.parametrize("kind", ["wds", "hf", "json_images"])
def test_bad_samples_are_skipped_counted_and_named(kind, tmp_path, caplog):
    path, bad, good = {"wds": _bad_wds, "hf": _bad_hf, "json_images": _bad_json}[kind](tmp_path)
    cfg = _cfg("t2i", source=kind, path=path, caption_dropout=0.0,
               **(SHAREGPT_T2I if kind == "json_images" else {}))
    with caplog.at_level("WARNING", logger="uniimage_jax.data"):
        it, batches = _batches(cfg, "t2i", n=4, batch=2, cache_dir=str(tmp_path / "work"))
    assert sorted(it.skipped_files()) == sorted(bad)
    assert batches[-1]["num_skipped"] == len(bad)
    reasons = {path: reason for path, reason in it._skip_log.entries.values()}
    for name, part in bad.items():
        assert part in reasons[name], (name, reasons[name])
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    assert {n for b in batches for n in b["name"]} == good  # 8 examples: every good one
    if kind == "wds":  # the shard cut short is named when its headers are indexed
        assert any("tar headers unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["wds", "hf_arrow", "json_images"])
def test_resume_and_two_processes_see_the_one_process_batches(kind, sets, tmp_path):
    cfg = _t2i_sources(sets)[kind]
    cache = str(tmp_path)
    it, single = _batches(cfg, "t2i", n=8, batch=4, cache_dir=cache)  # 32 > 2 epochs of 12
    hosts = [_batches(cfg, "t2i", n=8, batch=2, process=p, count=2, cache_dir=cache)[1]
             for p in range(2)]
    for step, whole in enumerate(single):
        parts = [hosts[p][step] for p in range(2)]
        for k in ("target", "index", "caption"):
            np.testing.assert_array_equal(whole[k], np.concatenate([b[k] for b in parts]))
    for process, count, batch in ((0, 1, 4), (1, 2, 2)):
        it, first = _batches(cfg, "t2i", n=2, batch=batch, process=process, count=count,
                             cache_dir=cache)
        state = json.loads(json.dumps(it.get_state()))
        rest = [next(it) for _ in range(4)]
        _, resumed = _batches(cfg, "t2i", n=4, batch=batch, process=process, count=count,
                              cache_dir=cache, state=state)
        _assert_same(rest, resumed)
