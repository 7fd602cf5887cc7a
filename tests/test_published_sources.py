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
from uniimage_jax.data.record_fields import FIELD_NAMES
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


def _batches(cfg, task, n=6, batch=3, process=0, count=1, cache_dir=None, state=None,
             keep=False):
    """(the iterator, its next `n` batches); the iterator's read-ahead threads are stopped
    unless `keep` (the caller goes on with it and closes it)."""
    it = make_train_iterator(cfg, task=task, batch_size=batch, seed=3, image_size=32,
                             source_image_size=16, process_index=process, process_count=count,
                             cache_dir=cache_dir)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    if not keep:
        it.close()
    return it, out


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
    # Captions alone (what length grouping counts), without reading the images.
    from uniimage_jax.data.sources import make_source

    for task, sources in (("t2i", _t2i_sources(sets)), ("ti2i", _ti2i_sources(sets))):
        for kind, cfg in sources.items():
            source = make_source(cfg, task, 32, cache_dir=str(tmp_path))
            key = "caption" if task == "t2i" else "instruction"
            assert [source.caption_text(i) for i in range(len(source))] == \
                [source[i][key] for i in range(len(source))], kind
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
                             cache_dir=cache, keep=True)
        state = json.loads(json.dumps(it.get_state()))
        rest = [next(it) for _ in range(4)]
        it.close()
        _, resumed = _batches(cfg, "t2i", n=4, batch=batch, process=process, count=count,
                              cache_dir=cache, state=state)
        _assert_same(rest, resumed)


def _many_shards(folder, n_shards=34):
    """`n_shards` one- or two-sample shards (three index chunks of 16 shards)."""
    samples = ps.t2i_samples(n_shards + n_shards // 2, seed=6)
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    i = 0
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(folder, f"{s:05d}.tar")) as w:
            for x in samples[i:i + 1 + s % 2]:
                w.write({"__key__": x["key"], x["ext"]: x["image"], "txt": x["caption"]})
        i += 1 + s % 2
    return i


def run_worker(spec: str, cache: str, process: int, out: str) -> None:
    """One of two processes (`python -c`): builds the shared index, reads 3 + 3 batches,
    resumes from the state after the first 3 and checks the last 3 again, saves its batches."""
    cfg = _cfg("t2i", source="wds", path=spec)
    it, first = _batches(cfg, "t2i", n=3, batch=2, process=process, count=2, cache_dir=cache,
                         keep=True)
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(3)]
    it.close()
    _, resumed = _batches(cfg, "t2i", n=3, batch=2, process=process, count=2, cache_dir=cache,
                          state=state)
    _assert_same(rest, resumed)
    batches = first + rest
    np.savez(out, **{k: np.stack([b[k] for b in batches]) for k in ("index", "target")},
             caption=np.stack([b["caption"] for b in batches]).astype("U"))


def test_two_processes_share_the_member_index_and_see_the_global_batches(tmp_path):
    n = _many_shards(str(tmp_path / "shards"))
    spec, cache = str(tmp_path / "shards" / "{00000..00033}.tar"), str(tmp_path / "work")
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen(
        [sys.executable, "-c", "from tests.test_published_sources import run_worker; "
         f"run_worker({spec!r}, {cache!r}, {p}, {str(tmp_path / f'p{p}.npz')!r})"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    assert len(os.listdir(tmp_path / "work" / "wds_index")) == 3  # 34 shards in 16s
    _, single = _batches(_cfg("t2i", source="wds", path=spec), "t2i", n=6, batch=4,
                         cache_dir=cache)
    hosts = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
    for step, whole in enumerate(single):
        for k in ("index", "target", "caption"):
            np.testing.assert_array_equal(whole[k], np.concatenate([h[k][step] for h in hosts]))
    seen = np.concatenate([b["index"] for b in single])  # 24 of the first epoch's 51
    assert len(set(seen.tolist())) == len(seen) == 24 and seen.max() < n == 51


def test_index_work_order_and_cache(tmp_path, monkeypatch):
    """Process p indexes its own chunks first, then the others' from the end; a cached chunk
    is not read again; a resized shard is indexed again."""
    from uniimage_jax.data import shard_lists, tar_index

    _many_shards(str(tmp_path / "shards"))
    shards = shard_lists.resolve_shards(str(tmp_path / "shards"))
    seen = []
    real = tar_index.index_shard

    def spy(path):
        seen.append(int(os.path.basename(path)[:5]))
        return real(path)

    monkeypatch.setattr(tar_index, "index_shard", spy)
    work = str(tmp_path / "work")
    first = tar_index.build_index(shards, cache_dir=work, process_index=1, process_count=2,
                                  threads=1)
    assert seen == list(range(16, 32)) + list(range(32, 34)) + list(range(16))
    assert [len(s.offsets) for s in first] == [1 + s % 2 for s in range(34)]
    seen.clear()
    again = tar_index.build_index(shards, cache_dir=work, threads=1)
    assert seen == [] and all((a.offsets == b.offsets).all() for a, b in zip(first, again))
    with open(shards[20][0], "ab") as fh:  # the shard grows: its chunk is indexed again
        fh.write(b"\0" * 1024)
    seen.clear()
    tar_index.build_index(shard_lists.resolve_shards(str(tmp_path / "shards")), cache_dir=work,
                          threads=1)
    assert seen == list(range(16, 32))


def test_shard_specs_and_their_errors(tmp_path):
    from uniimage_jax.data.shard_lists import resolve_shards

    _many_shards(str(tmp_path / "s"), n_shards=3)
    d = str(tmp_path / "s")
    expected = [(f"{d}/{i:05d}.tar", os.path.getsize(f"{d}/{i:05d}.tar")) for i in range(3)]
    (tmp_path / "list.txt").write_text("# the shards\ns/00000.tar\n\ns/00001.tar\n"
                                       f"{d}/00002.tar\n")
    assert resolve_shards(d) == expected
    assert resolve_shards(f"{d}/{{00000..00002}}.tar") == expected
    assert resolve_shards(f"{d}/*.tar") == expected
    assert resolve_shards(str(tmp_path / "list.txt")) == expected
    assert resolve_shards(f"{d}/00001.tar") == expected[1:2]
    with pytest.raises(ConfigError, match=r"1 of 4 shards not found, e\.g\. .*00003\.tar"):
        resolve_shards(f"{d}/{{00000..00003}}.tar")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_shards(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds no .tar file"):
        resolve_shards(str(tmp_path))


def test_bad_configs_are_rejected_naming_the_field(sets, tmp_path):
    from uniimage_jax.data.manifest import ManifestError
    from uniimage_jax.data.sources import check_source

    root = sets["root"]
    with pytest.raises(ConfigError, match=r"data.caption_field='text': .* no such column; "
                                          r"its columns are \['image', 'caption'\]"):
        check_source(_cfg("t2i", source="hf", path=f"{root}/arrow_t2i", caption_field="text"),
                     "t2i", 32)
    with pytest.raises(ConfigError, match="needs data.path"):
        check_source(_cfg("t2i", source="wds"), "t2i", 32)
    bad = tmp_path / "meta.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{"image": \n')
    with pytest.raises(ManifestError, match=r"meta\.jsonl:2: not valid JSON"):
        check_source(_cfg("t2i", source="json_images", path=str(bad)), "t2i", 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "00000.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(UserError, match="its 1 shards hold no sample"):
        _batches(_cfg("t2i", source="wds", path=str(tmp_path / "empty")), "t2i")


def _upload_tree(local: str, dest: str) -> None:
    from uniimage_jax import storage

    for folder, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
            storage.upload(os.path.join(folder, name), f"{dest}/{rel}")


def test_gcs_sources_give_the_local_batches(sets, gcs_bucket, tmp_path, monkeypatch):
    """The same sets on a bucket (the emulator): the same batches as the local copies; the wds
    member index is cached in the gs:// workdir, the Arrow / parquet files in a local cache."""
    from uniimage_jax import storage

    monkeypatch.setenv("UNIIMAGE_CACHE", str(tmp_path / "cache"))
    root, bucket = sets["root"], f"{gcs_bucket}/published_sources"
    for name in ("BLIP3o-Pretrain-Long-Caption", "GPT-Image-Edit-1.5M", "ShareGPT-4o-Image",
                 "parquet_t2i"):
        _upload_tree(os.path.join(root, name), f"{bucket}/{name}")
    cases = [("t2i", {"source": "wds",
                      "path": "BLIP3o-Pretrain-Long-Caption/sa_{000000..000002}.tar"}),
             ("t2i", {"source": "hf", "path": "parquet_t2i"}),
             ("ti2i", {"source": "hf", "path": "GPT-Image-Edit-1.5M"}),
             ("ti2i", {"source": "json_images",
                       "path": "ShareGPT-4o-Image/text_and_image_to_image.json",
                       **SHAREGPT_TI2I})]
    for task, fields in cases:
        local = _cfg(task, **{**fields, "path": f"{root}/{fields['path']}"})
        remote = _cfg(task, **{**fields, "path": f"{bucket}/{fields['path']}"})
        _, want = _batches(local, task, n=4, cache_dir=str(tmp_path / "work"))
        _, got = _batches(remote, task, n=4, cache_dir=f"{bucket}/work")
        _assert_same(want, got, KEYS + (("source_image",) if task == "ti2i" else ()))
        assert got[0]["name"][0].startswith(bucket), got[0]["name"][0]
    assert len(storage.list_files(f"{bucket}/work/wds_index")) == 1


def _stage_config(stage, **data):
    import importlib.util

    spec = importlib.util.spec_from_file_location(stage, os.path.join(ROOT, "configs",
                                                                      f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.data.read_threads = 2
    config.data.update(data)
    return config


def test_cache_latents_reads_every_published_layout(sets, tmp_path):
    """`uniimage-cache-latents` over each layout writes the cache of the same images and
    captions as a JSONL manifest: the same latents, captions and (ti2i) source images."""
    from uniimage_jax.data.latent_records import LatentRecordSource
    from uniimage_jax.train.latent_cache import cache_latents

    def records(stage, name, **data):
        out = tmp_path / name
        result = cache_latents(_stage_config(stage, **data), str(out), batch_size=4,
                               shard_size=8)
        assert result.complete and result.num_skipped == 0
        source = LatentRecordSource(str(out))
        return [source[i] for i in range(len(source))], out

    keys = ("latents", "caption", "index")
    want, _ = records("t2i_pretrain", "ref_t2i", source="jsonl", path=sets["t2i_manifest"])
    for kind, cfg in _t2i_sources(sets).items():
        if kind == "hf_parquet":
            continue  # the same table as hf_arrow, once converted
        layout = ("source", "path") + FIELD_NAMES
        got, out = records("t2i_pretrain", kind, **{k: cfg[k] for k in layout if cfg[k]})
        assert len(got) == len(want) == 12
        for a, b in zip(want, got):
            for k in keys:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{kind} {k}")
        if kind == "wds":  # the member index is kept beside the latents
            assert len(os.listdir(out / "wds_index")) == 1
    want, _ = records("ti2i_pretrain", "ref_ti2i", source="jsonl", path=sets["ti2i_manifest"])
    got, _ = records("ti2i_pretrain", "gpt_image_edit", source="hf",
                     path=f"{sets['root']}/GPT-Image-Edit-1.5M")
    for a, b in zip(want, got):
        for k in keys + ("source_image",):
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"ti2i {k}")
