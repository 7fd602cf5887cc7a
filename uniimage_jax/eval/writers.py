"""Where sampled images go: plain prompt runs and the folder layouts benchmark scorers expect.

Each layout turns its input (a prompts file, GenEval's `evaluation_metadata.jsonl`, DPG-Bench's
prompts folder, TIIF-Bench's prompt .jsonl files) into a list of `PromptJob`s: the caption to
sample and a `write(images)` that stores that prompt's images. `uniimage-sample` samples every job
in turn; the library is the same for a notebook or a custom loop.

Layouts (PIL PNGs):
* plain: `OUT/<prompt index 05d>_<sample index 02d>.png` and `OUT/<prompt index 05d>_grid.png`.
* GenEval: `OUT/<prompt index 05d>/metadata.jsonl` (the prompt's metadata line, unchanged),
  `OUT/<idx>/samples/0000.png`, `0001.png`, ... and `OUT/<idx>/grid.png`.
* DPG-Bench: `OUT/<item_id>.png`, a 2x2 grid of 4 samples without padding (DPG-Bench's scorer cuts
  the grid into four equal tiles); item_id is the stem of the prompt's `.txt` file.
* TIIF-Bench: `OUT/<type>/<model name>/short_description/<idx>.png` and
  `.../long_description/<idx>.png`, one image per description, where idx is the prompt's line
  number (from 0) in its `.jsonl` file and type its "type" field, as TIIF-Bench's own
  `eval/inference_t2i_models.py` names them.

OUT may be on Cloud Storage (`gs://`): every file goes through the storage layer (an image is
encoded to PNG bytes and written whole; a local file under a temporary name, then renamed).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence

from PIL import Image

from uniimage_jax import storage
from uniimage_jax.data.jsonl import read_json_objects, read_text_lines
from uniimage_jax.errors import UserError
from uniimage_jax.sampling.image_tiles import tile_images

DPG_SAMPLES = 4  # DPG-Bench scores a 2x2 grid
TIIF_SAMPLES = 1  # TIIF-Bench scores one image per description
TIIF_DESCRIPTIONS = ("short_description", "long_description")


@dataclasses.dataclass(frozen=True)
class PromptJob:
    """One prompt to sample: its caption, the files its images become, and the writer."""

    caption: str
    outputs: tuple[str, ...]
    write: Callable[[Sequence[Image.Image]], None]

    def done(self) -> bool:
        """Whether every output file exists already (a resumed run skips the prompt)."""
        return all(storage.is_file(p) for p in self.outputs)


# ------------------------------------------------------------------------------------- inputs
def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped. An empty file is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    prompts = [line.strip() for _, line in read_text_lines(path, error=UserError)
               if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path!r} has no prompts")
    return prompts


def read_geneval_metadata(path: str) -> list[tuple[str, dict]]:
    """(raw line, parsed dict) per non-blank line of GenEval's evaluation_metadata.jsonl; every
    line must be a JSON object with a non-empty "prompt"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GenEval metadata file {path!r} does not exist")
    out = []
    for n, line, meta in read_json_objects(path, error=UserError):
        if not str(meta.get("prompt", "")).strip():
            raise UserError(f"{path}:{n} has no \"prompt\" field")
        out.append((line, meta))
    if not out:
        raise UserError(f"GenEval metadata file {path!r} has no prompts")
    return out


def read_dpg_prompts(prompts_dir: str) -> list[tuple[str, str]]:
    """(item_id, prompt) for every `<item_id>.txt` in `prompts_dir`, sorted by item_id."""
    if not os.path.isdir(prompts_dir):
        raise FileNotFoundError(f"DPG-Bench prompts directory {prompts_dir!r} does not exist")
    out = []
    for name in sorted(os.listdir(prompts_dir)):
        stem, ext = os.path.splitext(name)
        if ext != ".txt":
            continue
        with open(os.path.join(prompts_dir, name), encoding="utf-8") as fh:
            text = fh.read().strip()
        if not text:
            raise UserError(f"DPG-Bench prompt file {os.path.join(prompts_dir, name)!r} is empty")
        out.append((stem, text))
    if not out:
        raise UserError(f"DPG-Bench prompts directory {prompts_dir!r} has no .txt prompt files")
    return out


def read_tiif_prompts(prompts_dir: str) -> list[tuple[str, int, dict]]:
    """(file name, line index, record) for every line of every `*.jsonl` in `prompts_dir` (files
    sorted by name); each record needs "type" and both descriptions."""
    if not os.path.isdir(prompts_dir):
        raise FileNotFoundError(f"TIIF-Bench prompts directory {prompts_dir!r} does not exist")
    out = []
    for name in sorted(n for n in os.listdir(prompts_dir) if n.endswith(".jsonl")):
        path = os.path.join(prompts_dir, name)
        # Every line counts: TIIF-Bench names an image by its prompt's line number.
        for lineno, _, record in read_json_objects(path, error=UserError, skip_blank=False):
            for field in ("type",) + TIIF_DESCRIPTIONS:
                if not str(record.get(field, "")).strip():
                    raise UserError(f"{path}:{lineno} has no \"{field}\" field")
            out.append((name, lineno - 1, record))
    if not out:
        raise UserError(f"TIIF-Bench prompts directory {prompts_dir!r} has no .jsonl prompts")
    return out


# ------------------------------------------------------------------------------------- layouts
def _save(image: Image.Image, path: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())


def plain_jobs(prompts: Sequence[str], out_dir: str, num_images: int,
               grid: bool = True) -> list[PromptJob]:
    jobs = []
    for i, caption in enumerate(prompts):
        samples = tuple(os.path.join(out_dir, f"{i:05d}_{j:02d}.png") for j in range(num_images))
        grid_path = os.path.join(out_dir, f"{i:05d}_grid.png") if grid else None

        def write(images, samples=samples, grid_path=grid_path):
            _check_count(images, len(samples))
            for im, p in zip(images, samples):
                _save(im, p)
            if grid_path:
                _save(tile_images(list(images)), grid_path)

        jobs.append(PromptJob(caption, samples + ((grid_path,) if grid_path else ()), write))
    return jobs


def geneval_jobs(metadata_file: str, out_dir: str, num_images: int = 4,
                 grid: bool = True) -> list[PromptJob]:
    jobs = []
    for i, (line, meta) in enumerate(read_geneval_metadata(metadata_file)):
        folder = os.path.join(out_dir, f"{i:05d}")
        meta_path = os.path.join(folder, "metadata.jsonl")
        samples = tuple(os.path.join(folder, "samples", f"{j:04d}.png") for j in range(num_images))
        grid_path = os.path.join(folder, "grid.png") if grid else None

        def write(images, line=line, meta_path=meta_path, samples=samples, grid_path=grid_path):
            _check_count(images, len(samples))
            storage.write_text(meta_path, line + "\n")
            for im, p in zip(images, samples):
                _save(im, p)
            if grid_path:
                _save(tile_images(list(images)), grid_path)

        outputs = (meta_path,) + samples + ((grid_path,) if grid_path else ())
        jobs.append(PromptJob(str(meta["prompt"]), outputs, write))
    return jobs


def dpg_jobs(prompts_dir: str, out_dir: str, num_images: int = DPG_SAMPLES) -> list[PromptJob]:
    if num_images != DPG_SAMPLES:
        raise UserError(f"DPG-Bench scores a 2x2 grid: --num-images must be {DPG_SAMPLES}, "
                        f"got {num_images}")
    jobs = []
    for item_id, caption in read_dpg_prompts(prompts_dir):
        path = os.path.join(out_dir, f"{item_id}.png")

        def write(images, path=path):
            _check_count(images, DPG_SAMPLES)
            _save(tile_images(list(images), cols=2, pad=0), path)

        jobs.append(PromptJob(caption, (path,), write))
    return jobs


def tiif_jobs(prompts_dir: str, out_dir: str, model_name: str,
              num_images: int = TIIF_SAMPLES) -> list[PromptJob]:
    if num_images != TIIF_SAMPLES:
        raise UserError(f"TIIF-Bench scores one image per description: --num-images must be "
                        f"{TIIF_SAMPLES}, got {num_images}")
    if not model_name or os.sep in model_name or model_name in (".", ".."):
        raise UserError(f"TIIF-Bench model name {model_name!r} must be a plain folder name")
    jobs, owner = [], {}
    for name, idx, record in read_tiif_prompts(prompts_dir):
        for field in TIIF_DESCRIPTIONS:
            path = os.path.join(out_dir, str(record["type"]), model_name, field, f"{idx}.png")
            if path in owner:  # two files give the same type and line: one would overwrite
                raise UserError(f"{name} line {idx + 1} and {owner[path]} both map to {path}")
            owner[path] = f"{name} line {idx + 1}"

            def write(images, path=path):
                _check_count(images, TIIF_SAMPLES)
                _save(images[0], path)

            jobs.append(PromptJob(str(record[field]), (path,), write))
    return jobs


def _check_count(images, expected: int) -> None:
    if len(images) != expected:
        raise ValueError(f"expected {expected} images for this prompt, got {len(images)}")
