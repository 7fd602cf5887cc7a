"""A sampling run over every device of every process: who samples what, resuming, the manifest.

* Share: the prompts not yet done are dealt to the processes in turn (prompt i of the list still
  to do goes to process i mod P), and each process samples its share on a mesh of its own
  devices (`sampling.mesh_sampler`). What is done is decided once, before anything is written,
  as the OR over processes of what each sees (hosts may see only their own disks), so every
  process deals the same list and a prompt is sampled by exactly one process.
* Order: a process sorts its slots by prompt length (a slot is one prompt's group of
  `images_per_call` samples), so the prompts conditioned together in a round mostly share one
  compiled length; a prompt's files are written as soon as its last group is decoded.
* Resume: a file is written whole or not at all (`writers.Output`); a prompt counts as done when
  all its files exist, whatever topology wrote them, so a rerun on any number of processes and
  devices finishes the same set.
* Manifest: each process records what it wrote (file, SHA-256 of its bytes) in
  `manifest/<run>/process-<i>-of-<P>.jsonl`, rewritten after every call, so an interrupted run
  keeps its record; at the end process 0 writes `manifest.json`: the settings, every run that
  contributed (processes, devices, mesh), and each file with its hash and the run and process
  that wrote it last.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from uniimage_jax.eval.writers import Output, PromptJob
from uniimage_jax.sampling import sampler
from uniimage_jax.sampling.mesh_sampler import DeviceLayout, MeshSampler
from uniimage_jax.train import distributed
from uniimage_jax.train.inference_layout import describe

MANIFEST = "manifest.json"
MANIFEST_DIR = "manifest"


@dataclasses.dataclass
class RunSummary:
    run: str
    prompts: int            # in the whole set
    done_before: int        # done when this run started (by any earlier run)
    written: int            # prompts written by this process in this run
    complete: bool          # every prompt's files exist (known on process 0 only)


def new_run_id() -> str:
    """A name for this run, the same on every process (process 0's clock)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    seconds, micros = distributed.from_main([int(now.timestamp()), now.microsecond])
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{stamp:%Y%m%dT%H%M%S}.{micros:06d}Z"


def done_everywhere(jobs: Sequence[PromptJob], out: Output) -> np.ndarray:
    """Which prompts have all their files, on any process."""
    return distributed.any_process_mask([job.done(out) for job in jobs])


def share(todo: Sequence[int]) -> list[int]:
    """This process's prompts of the list still to do."""
    return list(todo[jax.process_index()::jax.process_count()])


def _slot_order(encoded: dict[int, sampler.EncodedPrompt], groups: int):
    """(prompt, group) slots sorted by compiled shape, then prompt and group."""
    return sorted(((i, g) for i in encoded for g in range(groups)),
                  key=lambda s: (encoded[s[0]].input_ids.shape, repr(encoded[s[0]].grid), s))


def sample_jobs(jobs: Sequence[PromptJob], out: Output, *, model, params, processor,
                layout: DeviceLayout, cfg: sampler.SamplingConfig, seed: int, num_images: int,
                image=None, height: int | None = None, width: int | None = None,
                output_size: tuple[int, int] | None = None, skip_existing: bool = False,
                settings: dict | None = None,
                progress: Callable[[int, int], object] | None = None) -> RunSummary:
    """Sample every job not yet done over all processes (module docstring); `params` placed as
    `layout` keeps them; `settings` go into the manifest. `progress(done, total)` is called on
    process 0 with this process's prompt count."""
    run = new_run_id()
    done = done_everywhere(jobs, out) if skip_existing else np.zeros(len(jobs), bool)
    mine = share([i for i in range(len(jobs)) if not done[i]])
    pid, count = jax.process_index(), jax.process_count()
    if pid == 0:
        out.write(f"{MANIFEST_DIR}/{run}/run.json", json.dumps({
            "run": run, "processes": count, "devices_per_process": layout.mesh.devices.size,
            "platform": layout.mesh.devices.flat[0].platform,
            "device_kind": layout.mesh.devices.flat[0].device_kind,
            "layout": describe(layout), "done_before": int(done.sum()),
            "prompts": len(jobs)}, indent=2))
    encoded = {i: sampler.encode_prompt(model, processor, jobs[i].caption, image, cfg)
               for i in mine}
    per = cfg.images_per_call
    groups = math.ceil(num_images / per)
    slots = _slot_order(encoded, groups)
    mesh_sampler = MeshSampler(model, params, layout, cfg, seed=seed, height=height,
                               width=width)
    pending: dict[int, dict[int, np.ndarray]] = {}
    records: list[str] = []
    part = f"{MANIFEST_DIR}/{run}/process-{pid:05d}-of-{count:05d}.jsonl"
    step = mesh_sampler.slots_per_call
    for start in range(0, len(slots), step):
        call = slots[start:start + step]
        pixels = mesh_sampler.sample([(encoded[i], g) for i, g in call])
        for n, (i, g) in enumerate(call):
            pending.setdefault(i, {})[g] = pixels[n * per:(n + 1) * per]
            if len(pending[i]) < groups:
                continue
            arrays = np.concatenate([pending.pop(i)[k] for k in range(groups)])[:num_images]
            files = jobs[i].write(_images(arrays, output_size), out)
            records.append(json.dumps({"prompt": i, "caption": jobs[i].caption,
                                       "files": files}))
        out.write(part, "".join(r + "\n" for r in records))
        if progress is not None:
            progress(len(records), len(mine))
    distributed.sync("uniimage_sample_done")
    complete = False
    if pid == 0:
        complete = write_manifest(jobs, out, settings or {})
    return RunSummary(run, len(jobs), int(done.sum()), len(records), complete)


def _images(arrays: np.ndarray, output_size) -> list[Image.Image]:
    from uniimage_jax.data.images import resize_cover_crop

    if output_size is not None and tuple(output_size) != arrays.shape[1:3]:
        arrays = [resize_cover_crop(a, *output_size) for a in arrays]
    return [Image.fromarray(a) for a in arrays]


def read_records(out: Output) -> tuple[list[dict], dict[str, dict]]:
    """(runs in order, {file: its last record}) from every run's manifest parts; a file two
    processes of one run both wrote is an error (the share must never overlap)."""
    runs, files = [], {}
    for run in out.list(MANIFEST_DIR):
        info = out.read_text(f"{MANIFEST_DIR}/{run}/run.json")
        if info is None:
            continue
        runs.append(json.loads(info))
        mine: dict[str, int] = {}
        for name in out.list(f"{MANIFEST_DIR}/{run}"):
            if not name.startswith("process-"):
                continue
            process = int(name.split("-")[1])
            for line in (out.read_text(f"{MANIFEST_DIR}/{run}/{name}") or "").splitlines():
                record = json.loads(line)
                for path, digest in record["files"].items():
                    if mine.setdefault(path, process) != process:
                        raise RuntimeError(f"{path} was written by processes {mine[path]} and "
                                           f"{process} of run {run}")
                    files[path] = {"prompt": record["prompt"], "sha256": digest, "run": run,
                                   "process": process}
    return runs, files


def write_manifest(jobs: Sequence[PromptJob], out: Output, settings: dict) -> bool:
    """`manifest.json` (module docstring); returns whether the set is complete."""
    runs, files = read_records(out)
    missing = [i for i, job in enumerate(jobs) if not job.done(out)]
    expected = [path for job in jobs for path in job.outputs]
    manifest = {"settings": settings, "prompts": len(jobs), "complete": not missing,
                "missing_prompts": missing, "runs": runs,
                "unrecorded_files": [p for p in expected if p not in files and out.exists(p)],
                "files": {p: files[p] for p in expected if p in files}}
    out.write(MANIFEST, json.dumps(manifest, indent=1))
    return not missing
