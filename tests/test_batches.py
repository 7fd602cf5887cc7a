"""Model inputs made per example where grain reads (`ExampleEncoder`, in read threads or worker
processes) and put together on the main thread (`assemble_batch`) are, bit for bit, the arrays of
the whole batch tokenised at once and padded to its bucket (`build_generation_inputs` and
`rope_positions` over the batch): t2i and ti2i, with and without prompt buckets, with captions cut
to fit; the cut captions are counted and named alike. Worker processes give the same batches as
threads, and the tiny trainer runs on them."""
import importlib.util
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from uniimage_jax.data.batch_keys import MODEL_INPUTS as MODEL
from uniimage_jax.data.pipeline import make_train_iterator
from uniimage_jax.models.uniimage import rope_positions
from uniimage_jax.processing.prompt_buckets import choose_prompt_bucket, longest_prompt
from uniimage_jax.processing.prompts import build_generation_inputs
from uniimage_jax.train import batches, stage_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("red", "circle", "above", "a", "blue", "square", "zebra", "quantum", "left", "of")


def _tiny_config(task):
    name = {"t2i": "t2i_pretrain", "ti2i": "ti2i_pretrain"}[task]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("tiny")


def _records(task, count=16):
    """In-memory records: captions of 0-11 words, two of 70 (too long for the tiny 160-token
    prompt: cut), 48 x 40 images (ti2i sources resized to the tiny source size)."""
    g = np.random.default_rng(0)
    out = []
    for i in range(count):
        caption = " ".join(g.choice(WORDS, 70 if i in (4, 9) else int(g.integers(0, 12))))
        image = g.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        name = f"mem.jsonl:{i + 1}"
        if task == "t2i":
            out.append({"image": image, "caption": caption, "name": name})
        else:
            out.append({"target_image": image, "instruction": caption, "name": name,
                        "source_images": [g.integers(0, 256, (40, 48, 3), dtype=np.uint8)]})
    return out


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """{task: (config, model, processor)} of the tiny preset (no parameter is made)."""
    out = {}
    for task in ("t2i", "ti2i"):
        config = _tiny_config(task)
        config.data.caption_dropout = 0.1  # some empty captions too
        model = stage_setup.build_model(config)
        processor = stage_setup.load_processor_for(config, model,
                                                   str(tmp_path_factory.mktemp(task)))
        out[task] = (config, model, processor)
    return out


def _host_batches(config, model, task, encoder, count=4, batch_size=4):
    it = make_train_iterator(config.data, task=task, batch_size=batch_size, seed=0,
                             image_size=model.config.image_size, source=_records(task),
                             example_encoder=encoder)
    with it:
        return [next(it) for _ in range(count)]


def _whole_batch_inputs(host, processor, model, config, task, truncations):
    """The reference: the batch's prompts built together, padded to the cap to find the longest
    prompt (and cut the captions that do not fit), then, below the cap, built again padded to
    the bucket that holds it."""
    from PIL import Image

    mc = model.config
    captions = [str(c) for c in host["caption"]]
    images = ([[Image.fromarray(x)] for x in host["source_image"]] if task == "ti2i" else None)
    buckets = tuple(config.data.prompt_buckets)
    cap = buckets[-1] if buckets else int(config.model.max_prompt_tokens)
    field = "data.prompt_buckets[-1]" if buckets else "model.max_prompt_tokens"

    def build(pad_to, log):
        return build_generation_inputs(processor, captions, images,
                                       num_metaqueries=mc.num_metaqueries,
                                       system_prompt=mc.system_prompt,
                                       max_caption_tokens=mc.max_caption_tokens, pad_to=pad_to,
                                       names=[str(n) for n in host["name"]], truncations=log,
                                       pad_to_field=field)

    enc = build(cap, truncations)
    length = choose_prompt_bucket(longest_prompt(enc["attention_mask"]), buckets) if buckets \
        else cap
    if length < cap:  # no caption was cut (a cut one fills the cap)
        enc = build(length, batches.TruncationLog())
    grid = enc.get("image_grid_thw")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "position_ids": rope_positions(mc, enc["input_ids"], enc["attention_mask"], grid),
           "target": np.asarray(host["target"], np.float32)}
    if grid is not None:
        out["pixel_values"] = enc["pixel_values"].reshape(len(captions), -1,
                                                          enc["pixel_values"].shape[-1])
    return out, grid


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "uniimage_jax.prompts"]


@pytest.mark.parametrize("task", ["t2i", "ti2i"])
def test_encoded_examples_assemble_to_the_whole_batch_arrays_bitwise(tiny_parts, task, caplog):
    config, model, processor = tiny_parts[task]
    encoder = batches.ExampleEncoder.for_stage(processor, model.config, config, task)
    hosts = _host_batches(config, model, task, pickle.loads(pickle.dumps(encoder)))
    cap = int(config.model.max_prompt_tokens)
    longest = [int(h[MODEL]["attention_mask"].sum(1).max()) for h in hosts]
    # buckets that cut left padding from every batch, each to its longest prompt
    buckets = tuple(sorted({*longest, cap}))
    assert len(buckets) > 2, buckets
    trimmed = set()
    for prompt_buckets in ((), buckets):
        config.data.prompt_buckets = prompt_buckets
        encoder = batches.ExampleEncoder.for_stage(processor, model.config, config, task)
        hosts = _host_batches(config, model, task, encoder)
        logs = {}
        for path in ("whole", "encoded"):
            truncations = batches.TruncationLog()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="uniimage_jax.prompts"):
                got = []
                for host in hosts:
                    if path == "whole":
                        got.append(_whole_batch_inputs(host, processor, model, config, task,
                                                       truncations))
                    else:
                        got.append(batches.assemble_batch(host, config, truncations))
            logs[path] = (truncations.count, _warnings(caplog), got)
        assert logs["whole"][:2] == logs["encoded"][:2]
        count, warnings, _ = logs["whole"]
        assert count >= 1 and len(warnings) == count, warnings  # long captions were cut
        field = "data.prompt_buckets[-1]" if prompt_buckets else "model.max_prompt_tokens"
        assert all(f"to fit the fixed prompt length {cap} ({field})" in w for w in warnings)
        for (want, want_grid), (arrays, grid) in zip(logs["whole"][2], logs["encoded"][2]):
            assert grid == want_grid and (grid is not None) == (task == "ti2i")
            assert arrays.keys() == want.keys()
            for key in want:
                assert arrays[key].dtype == want[key].dtype, key
                assert np.array_equal(arrays[key], want[key]), key
            trimmed.add(arrays["input_ids"].shape[1])
    assert len(trimmed) > 2, trimmed  # the cap, and several buckets below it
    config.data.prompt_buckets = ()


def test_positions_of_a_cap_padded_row_cut_to_a_bucket_are_the_bucket_row_positions(tiny_parts):
    """Left padding holds position 0 and the real tokens' positions do not depend on it, so
    positions made once per example (at the cap) can be cut with the padding (ti2i: image tokens
    take grid positions)."""
    from uniimage_jax.processing.prompt_buckets import trim_left_padding

    config, model, processor = tiny_parts["ti2i"]
    encoder = batches.ExampleEncoder.for_stage(processor, model.config, config, "ti2i")
    inputs = min((h[MODEL] for h in _host_batches(config, model, "ti2i", encoder)),
                 key=lambda x: x["attention_mask"].sum(1).max())  # the most padding
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    grid = tuple(tuple(int(v) for v in g) for g in inputs["image_grid_thw"])
    at_cap = rope_positions(model.config, ids, mask, grid)
    np.testing.assert_array_equal(at_cap, np.moveaxis(inputs["position_ids"], 1, 0))
    length = int(mask.sum(1).max())
    cut = trim_left_padding(ids, mask, length)
    at_bucket = rope_positions(model.config, cut["input_ids"], cut["attention_mask"], grid)
    assert at_bucket.shape[-1] == length < ids.shape[1]
    np.testing.assert_array_equal(at_cap[..., -length:], at_bucket)
    assert at_cap[..., :-length].max() == 0 and at_bucket.max() > length // 2


def test_worker_processes_encode_the_same_batches_as_threads(tiny_parts):
    config, model, processor = tiny_parts["ti2i"]
    encoder = batches.ExampleEncoder.for_stage(processor, model.config, config, "ti2i")
    threads = _host_batches(config, model, "ti2i", encoder, count=2)
    config.data.worker_count = 1
    try:
        workers = _host_batches(config, model, "ti2i", encoder, count=2)
    finally:
        config.data.worker_count = 0
    for a, b in zip(threads, workers):
        assert a.keys() == b.keys() and a[MODEL].keys() == b[MODEL].keys()
        for key in a[MODEL]:
            np.testing.assert_array_equal(a[MODEL][key], b[MODEL][key], err_msg=key)
        np.testing.assert_array_equal(a["target"], b["target"])



def test_the_tiny_trainer_runs_on_worker_processes(tmp_path):
    """Two steps with `data.worker_count=1`: tokenisation in a grain worker process, the cut
    caption still counted in the metrics and named (file:line) in the log."""
    from PIL import Image

    lines = []
    for i in range(8):
        Image.new("RGB", (40, 36), (30 * i, 200, 90)).save(tmp_path / f"{i}.png")
        words = 70 if i == 3 else 5
        lines.append(f'{{"image": "{i}.png", "caption": "{" ".join(WORDS[:5] * (words // 5))}"}}')
    manifest = tmp_path / "t2i.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "uniimage_jax.cli.train",
           f"--config={os.path.join(ROOT, 'configs', 't2i_pretrain.py')}:tiny",
           f"--workdir={workdir}", "--config.max_steps=2", "--config.batch_size=4",
           "--config.log_every=1", "--config.checkpoint.async_save=False",
           "--config.data.source=jsonl", f"--config.data.path={manifest}",
           "--config.data.shuffle=False", "--config.data.caption_dropout=0",
           "--config.data.worker_count=1", "--config.data.prompt_buckets=(160,)"]
    out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "t2i_pretrain: step 2 of 2" in out.stdout
    assert f"{manifest}:4: caption cut from" in out.stderr, out.stderr[-3000:]
    assert "(data.prompt_buckets[-1])" in out.stderr
    # the step's compile for the batch shape is logged once, with XLA's per-device memory
    assert out.stderr.count("step compiled for prompts of 160 tokens, target 32x32") == 1
    assert re.search(r"step compiled for .*: \d+\.\d (MiB|GiB) per device \(argument ",
                     out.stderr), out.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "t2i_pretrain" / "metrics.jsonl").read_text()
               .splitlines()]
    # batches grouped by caption length (the trainer's tokenizer counted them once, cached in
    # the workdir): the cut caption is in one of the two, whichever comes first
    assert [r["truncated_captions"] for r in records] in ([0, 1], [1, 1])
    assert [r["prompt_tokens"] for r in records] == [160, 160]
    assert len(list((workdir / "caption_lengths").glob("t2i-*/000000.npy"))) == 1


def test_a_prompt_cap_without_room_names_its_field(tiny_parts):
    from uniimage_jax.errors import UserError

    config, model, processor = tiny_parts["t2i"]
    for buckets, field in (((100,), "config.data.prompt_buckets[-1]=100"),
                           ((), "config.model.max_prompt_tokens=100")):
        config = config.copy_and_resolve_references()
        config.data.prompt_buckets = buckets
        config.model.max_prompt_tokens = 100 if not buckets else 160
        with pytest.raises(UserError, match=rf"^{re.escape(field)} leaves no room"):
            stage_setup.check_prompt_fits(config, model, processor)


def test_each_read_thread_encodes_with_its_own_processor(tiny_parts):
    """A fast tokenizer is not to be shared between threads (see ExampleEncoder._processor); the
    copies encode alike, and a pickled encoder (a worker process's) starts without copies."""
    import threading

    config, model, processor = tiny_parts["t2i"]
    encoder = batches.ExampleEncoder.for_stage(processor, model.config, config, "t2i")
    example = {"caption": " ".join(WORDS * 3), "name": "n", "target": np.zeros(1)}
    seen, outputs = [], []

    def encode():
        seen.append(encoder._processor())
        outputs.append(encoder(example)[MODEL])

    threads = [threading.Thread(target=encode) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in seen}) == 3 and all(p is not processor for p in seen)
    for out in outputs[1:]:
        for key in out:
            np.testing.assert_array_equal(out[key], outputs[0][key], err_msg=key)
    clone = pickle.loads(pickle.dumps(encoder))
    assert not hasattr(clone._per_thread, "processor") and clone.pad_to == encoder.pad_to


def test_caption_token_counts_are_the_prompt_tokens_a_caption_adds(tiny_parts):
    """`CaptionTokenCounter` (length-grouped batches) counts what a caption adds to its training
    prompt, as `build_generation_inputs` builds it, from several threads at once; its cache key
    is the tokenizer's, not the object's."""
    import concurrent.futures

    from uniimage_jax.processing.caption_tokens import CaptionTokenCounter

    config, model, processor = tiny_parts["t2i"]
    captions = [r["caption"] for r in _records("t2i") if len(r["caption"].split()) < 20]
    mc = model.config

    def prompt_length(caption):
        enc = build_generation_inputs(processor, [caption], num_metaqueries=mc.num_metaqueries,
                                      system_prompt=mc.system_prompt)
        return int(enc["attention_mask"].sum())

    counter = CaptionTokenCounter(processor.tokenizer)
    want = [prompt_length(c) - prompt_length("") for c in captions]
    assert max(want) > 3 and counter(captions).tolist() == want
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(x.tolist() == want for x in pool.map(counter, [captions] * 8))
    assert CaptionTokenCounter(pickle.loads(pickle.dumps(processor.tokenizer))).key == counter.key
