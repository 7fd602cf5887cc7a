"""`uniimage-bench --data`: how many training samples per second one host's input side makes.

What is timed is everything the host does for a step before the device, as the trainer does it:
the grain pipeline (JPEG decode, resize + centre crop, CFG dropout, and the trainer's example
encoder: tokenisation, M-RoPE positions, for ti2i the Qwen image processor; all in grain's read
threads, or in its worker processes with `data.worker_count > 0`), then batching and the main
thread's `assemble_batch` (prompt bucket, left padding cut). No model runs and no parameter
exists. The rate is batches over wall time once `warmup` batches have arrived (grain's worker
processes start in the warm-up); the main thread's own share is reported apart. The data is a
temporary JSONL manifest of real JPEG photos-like images (smooth noise, 640 x 480, quality 90)
with COCO-like captions of 15-40 words, so decode and resize cost what camera images of that
size cost.

Compare the figure with the step rate the chips sustain (samples/s per host = per-chip samples/s
x chips per host): when the host is slower, raise `data.read_threads`, and `data.worker_count`
where the host has cores to spare (each example then crosses between processes in shared
memory, which costs more than it saves on a host with few cores).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import numpy as np

from uniimage_jax.errors import ConfigError

WORDS = ("a", "photo", "of", "red", "small", "dog", "sitting", "on", "wooden", "bench", "next",
         "to", "the", "river", "with", "trees", "in", "background", "and", "blue", "sky", "two",
         "people", "walking", "along", "street", "at", "night", "city", "lights")


def write_jpeg_manifest(directory: str, task: str, count: int, seed: int = 0) -> str:
    """`count` JPEG records (t2i or ti2i) and their manifest in `directory`; returns its path."""
    import json

    from PIL import Image

    g = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    lines = []
    for i in range(count):
        coarse = g.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth, photo-like content
        img = Image.fromarray(coarse).resize((640, 480), Image.BILINEAR)
        name = f"img{i}.jpg"
        img.save(os.path.join(directory, name), quality=90)
        caption = " ".join(g.choice(WORDS, int(g.integers(15, 41))))
        if task == "t2i":
            lines.append({"image": name, "caption": caption})
        else:
            lines.append({"source_image": name, "instruction": caption,
                          "target_image": f"img{(i + 1) % count}.jpg"})
    path = os.path.join(directory, f"{task}.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    return path


LAYOUTS = ("jsonl", "wds", "hf", "json_images")


def _write_set(directory: str, layout: str, task: str, images: int, shards: int,
               samples_per_shard: int) -> tuple[str, int, dict]:
    """(data.path, number of samples, other data fields) of a generated set in `layout`."""
    from uniimage_jax.bench import shard_sets

    n = shards * samples_per_shard
    if layout == "jsonl":
        return write_jpeg_manifest(directory, task, images), images, {}
    if layout == "wds":
        return shard_sets.write_wds_shards(directory, shards, samples_per_shard), n, {}
    if layout == "hf":
        return shard_sets.write_hf_set(directory, shards, samples_per_shard), n, {}
    if layout == "json_images":
        return (shard_sets.write_json_images_set(directory, n), n,
                {"image_field": "output_image", "caption_field": "input_prompt"})
    raise ConfigError(f"--data-layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


@contextlib.contextmanager
def _environ(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _rss_bytes() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    import resource

    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # the two count pages slightly differently: the peak is at least the resident size
    return resident, max(resident, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_data_benchmark(config, *, steps: int = 20, warmup: int = 3, images: int = 64,
                       processor_dir: str | None = None, log=print, layout: str = "jsonl",
                       shards: int = 1000, samples_per_shard: int = 4,
                       gcs_emulator: bool = False) -> dict:
    """Samples/s of one host's input side for the stage `config` (t2i or ti2i) on a generated
    set, and its time to the first batch; `processor_dir`: the Qwen2.5-VL processor (default:
    the tiny stand-in, whose tokenizer is smaller but whose image processor is the same code).

    The set: `layout` "jsonl" = `images` JPEGs and their manifest; "wds" = `shards` WebDataset
    tar shards of `samples_per_shard` samples; "hf" = a `save_to_disk` directory of `shards`
    Arrow files; "json_images" = a JSON array beside an image folder (shard_sets.py; the last
    three t2i). With `gcs_emulator` it is uploaded to a Cloud Storage emulator in a child process
    and read through gs://.

    Time to the first batch is timed twice, from nothing (cold: the source's start-up work, e.g.
    a WebDataset member index, then the pipeline's, e.g. caption token counts when batches are
    grouped by length) and again with what that run cached in the workdir (cached); the rate is
    then taken on the second iterator."""
    from uniimage_jax.bench import shard_sets
    from uniimage_jax.data.mixture import make_training_source
    from uniimage_jax.data.pipeline import make_train_iterator
    from uniimage_jax.processing.caption_tokens import CaptionTokenCounter
    from uniimage_jax.train import batches, stage_setup

    task = config.task
    image_size = int(config.model.image_size)
    if layout != "jsonl" and task != "t2i":
        raise ConfigError(f"--data-layout {layout}: the generated sets of the published layouts "
                          "are t2i; use --task t2i")
    if gcs_emulator and layout == "jsonl":
        raise ConfigError("--gcs-emulator reads a set of a published layout through gs://: give "
                          "--data-layout wds, hf or json_images")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if processor_dir or config.model.preset == "tiny":
            config.processor_dir = processor_dir or ""
            model = stage_setup.build_model(config)  # the module object only: no parameter is made
            processor = stage_setup.load_processor_for(config, model, tmp)
        else:
            model, processor = _tiny_stand_in(config, tmp)
        local = os.path.join(tmp, "set")
        path, samples, fields = _write_set(local, layout, task, images, shards,
                                           samples_per_shard)
        # what a source copies from a bucket to a local cache (a datasets directory) starts
        # empty, so that "cold" is cold
        stack.enter_context(_environ("UNIIMAGE_CACHE", os.path.join(tmp, "remote_cache")))
        emulator = None
        if gcs_emulator:
            emulator = stack.enter_context(shard_sets.EmulatorProcess())
            remote = f"gs://{emulator.bucket}/set"
            shard_sets.upload_tree(local, remote)
            path = remote + path[len(local):]
        config.data.source, config.data.path = layout, path
        for key, value in fields.items():
            config.data[key] = value
        batch = int(config.batch_size)
        encoder = batches.ExampleEncoder.for_stage(processor, model.config, config, task)
        counter = CaptionTokenCounter(processor.tokenizer)
        workdir = os.path.join(tmp, "workdir")

        def first_batch():
            """(iterator, {part: seconds}) from nothing to the first batch in hand."""
            times = [time.perf_counter()]
            source = make_training_source(config.data, task, image_size, cache_dir=workdir)
            times.append(time.perf_counter())
            it = make_train_iterator(config.data, task=task, batch_size=batch, seed=config.seed,
                                     image_size=image_size, example_encoder=encoder,
                                     source=source, cache_dir=workdir,
                                     count_caption_tokens=counter)
            times.append(time.perf_counter())
            next(it)
            times.append(time.perf_counter())
            parts = np.diff(times)
            return it, {"source_s": parts[0], "order_s": parts[1], "batch_s": parts[2],
                        "total_s": times[-1] - times[0]}

        cold_it, cold = first_batch()
        cold_it.close()
        it, cached = first_batch()
        with it:
            main_thread, tokens = [], []
            for i in range(warmup + steps):
                if i == warmup:
                    start = time.perf_counter()
                host = next(it)
                before = time.perf_counter()
                arrays, _ = batches.assemble_batch(host, config)
                if i >= warmup:
                    main_thread.append(time.perf_counter() - before)
                    tokens.append(arrays["input_ids"].shape[1])
            per_batch = (time.perf_counter() - start) / steps
        rss, peak_rss = _rss_bytes()
        emulator_rss = emulator.rss_bytes() if emulator is not None else None
    report = {"mode": "data", "preset": config.model.preset, "task": task, "batch": batch,
              "image_size": image_size, "steps": steps, "layout": layout,
              "gcs_emulator": bool(gcs_emulator), "samples": samples,
              "shards": shards if layout in ("wds", "hf") else None,
              "read_threads": int(config.data.read_threads),
              "worker_count": int(config.data.worker_count),
              "processor": processor_dir or "tiny stand-in",
              # to the first batch: the source opened (e.g. a member index), the global order
              # (e.g. caption token counts), the first batch decoded; cold, then cached
              "first_batch_cold": {k: float(v) for k, v in cold.items()},
              "first_batch_cached": {k: float(v) for k, v in cached.items()},
              "batch_s": per_batch, "samples_per_s": batch / per_batch,
              "main_thread_batch_s": float(np.median(main_thread)),
              "mean_prompt_tokens": float(np.mean(tokens)),
              "rss_bytes": rss, "peak_rss_bytes": peak_rss, "emulator_rss_bytes": emulator_rss,
              "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    where = f"{layout}{' on gs:// (emulator)' if gcs_emulator else ''}, {samples} samples"
    def parts(t):
        return (f"{t['total_s']:.1f} s (source {t['source_s']:.1f}, order {t['order_s']:.1f}, "
                f"batch {t['batch_s']:.1f})")

    log(f"[data] {task} {config.model.preset} {where}: first batch {parts(cold)} cold, "
        f"{parts(cached)} cached; "
        f"{report['samples_per_s']:.1f} samples/s per host "
        f"(batch {batch}, {per_batch * 1e3:.0f} ms per batch, of which the main thread "
        f"{report['main_thread_batch_s'] * 1e3:.1f} ms; {int(config.data.worker_count)} worker "
        f"process(es); prompts padded to {report['mean_prompt_tokens']:.0f} tokens on average);"
        f" peak RSS {peak_rss / 2**20:.0f} MiB")
    return report


def _tiny_stand_in(config, directory: str):
    """(model, processor) of the tiny preset, for timing without the Qwen2.5-VL files: the tiny
    tokenizer's ids match the tiny MLLM config (positions need both), its image processor is
    transformers' Qwen2-VL one set to Qwen2.5-VL's pixel budget (256 * 28 * 28), and the
    image size stays the preset's."""
    from uniimage_jax.models import presets
    from uniimage_jax.processing import qwen as qwen_processing
    from uniimage_jax.processing import tiny
    from uniimage_jax.processing.prompts import add_metaquery_tokens
    from uniimage_jax.train import stage_setup

    tiny_config = config.copy_and_resolve_references()
    with tiny_config.unlocked():
        tiny_config.model = presets.model_preset("tiny")
    model = stage_setup.build_model(tiny_config)
    path = os.path.join(directory, "tiny_processor")
    pixels = 256 * 28 * 28
    tiny.make_tiny_processor_dir(path, min_pixels=pixels, max_pixels=pixels)
    processor = qwen_processing.load_processor(path)
    add_metaquery_tokens(processor.tokenizer, model.config.mllm.vocab_size,
                         model.config.num_metaqueries)
    return model, processor
