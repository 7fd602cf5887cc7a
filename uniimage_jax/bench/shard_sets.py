"""Generated training sets for `uniimage-bench --data`, in the published sets' layouts, and a
Cloud Storage emulator in its own process that holds a `gs://` copy of one.

- `write_wds_shards`: WebDataset tar shards as the BLIP3o sets ship them: per sample
  `<key>.jpg` + `<key>.txt`, keys `<shard><sample>` in order, `{00000..N-1}.tar`. The members
  are written with the standard library's `tarfile` (ustar headers, 512-byte blocks: what
  `webdataset.TarWriter` writes too).
- `write_hf_set`: a `datasets` `save_to_disk` directory of Arrow shards (image, caption).
- `write_json_images_set`: ShareGPT-4o-Image's text-to-image layout (a JSON array beside an
  image folder).
- `write_jpeg_manifest` (data_rate.py) stays the JSONL layout.

Images are photo-like JPEGs (smooth noise, 640 x 480, quality 90; a few dozen distinct ones
reused, so writing 1,000 shards takes seconds) with COCO-like captions of 15-40 words, so
decoding costs what camera images of that size cost.

`EmulatorProcess` runs `python -m uniimage_jax.storage.emulator` in a child process (so the
server's Python does not share this process's interpreter lock with the pipeline it serves) and
points this process's clients at it; `upload_tree` copies a local directory to a bucket.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

DISTINCT_IMAGES = 32


def photo_jpegs(count: int, seed: int = 0, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """`count` distinct photo-like JPEGs (smooth noise upsampled), quality 90."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = g.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(coarse).resize(size, Image.BILINEAR).save(buf, format="JPEG",
                                                                   quality=90)
        out.append(buf.getvalue())
    return out


def coco_like_caption(g: np.random.Generator) -> str:
    from uniimage_jax.bench.data_rate import WORDS

    return " ".join(g.choice(WORDS, int(g.integers(15, 41))))


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    archive.addfile(info, io.BytesIO(data))


def write_wds_shards(directory: str, shards: int, samples_per_shard: int,
                     seed: int = 0) -> str:
    """`shards` tar shards of `samples_per_shard` t2i samples each in `directory`; returns their
    brace pattern (`<directory>/{00000..00999}.tar`)."""
    os.makedirs(directory, exist_ok=True)
    images = photo_jpegs(DISTINCT_IMAGES, seed)
    g = np.random.default_rng(seed)
    width = max(5, len(str(shards - 1)))
    for s in range(shards):
        path = os.path.join(directory, f"{s:0{width}d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as archive:
            for i in range(samples_per_shard):
                key = f"{s:0{width}d}{i:04d}"
                _add(archive, f"{key}.jpg", images[int(g.integers(len(images)))])
                _add(archive, f"{key}.txt", coco_like_caption(g).encode())
        os.replace(path + ".tmp", path)
    return os.path.join(directory, f"{{{0:0{width}d}..{shards - 1:0{width}d}}}.tar")


def _samples(count: int, seed: int):
    """(JPEG bytes, caption) of `count` samples, the images drawn from a few dozen distinct."""
    images = photo_jpegs(DISTINCT_IMAGES, seed)
    g = np.random.default_rng(seed)
    for _ in range(count):
        yield images[int(g.integers(len(images)))], coco_like_caption(g)


def write_hf_set(directory: str, shards: int, samples_per_shard: int, seed: int = 0) -> str:
    """A Hugging Face `save_to_disk` directory of `shards` Arrow files (columns image: Image,
    caption: str), as `datasets` writes the published edit sets; returns its path."""
    import datasets

    rows = list(_samples(shards * samples_per_shard, seed))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in rows],
                                        "caption": [c for _, c in rows]}, features=features)
    table.save_to_disk(directory, num_shards=shards)
    return directory


def write_json_images_set(directory: str, count: int, seed: int = 0) -> str:
    """ShareGPT-4o-Image's text-to-image layout: a JSON array of {input_prompt, output_image}
    beside an image folder; returns the JSON file's path (fields: image_field=output_image,
    caption_field=input_prompt)."""
    import json

    os.makedirs(os.path.join(directory, "text_to_image"), exist_ok=True)
    entries = []
    for i, (image, caption) in enumerate(_samples(count, seed)):
        name = f"text_to_image/{i:06d}.jpg"
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(image)
        entries.append({"input_prompt": caption, "output_image": name})
    path = os.path.join(directory, "text_to_image.json")
    with open(path, "w") as fh:
        json.dump(entries, fh)
    return path


class EmulatorProcess:
    """A local Cloud Storage emulator in a child process serving `bucket`; while entered, this
    process's gcsfs / epath clients point at it (os.environ)."""

    def __init__(self, bucket: str = "uniimage-bench"):
        self.bucket = bucket
        self._process = None
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> "EmulatorProcess":
        self._process = subprocess.Popen(
            [sys.executable, "-m", "uniimage_jax.storage.emulator", "--port", "0",
             "--bucket", self.bucket], stdout=subprocess.PIPE, text=True)
        env = {}
        deadline = time.monotonic() + 60
        while "EPATH_USE_TF" not in env:  # the last variable the emulator prints
            line = self._process.stdout.readline()
            if not line or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the Cloud Storage emulator did not start")
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                env[name] = value
        self.url = env["STORAGE_EMULATOR_HOST"]
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None

    def rss_bytes(self) -> int | None:
        """The emulator's resident memory (it holds the objects in memory)."""
        try:
            with open(f"/proc/{self._process.pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError):
            return None


def upload_tree(local_dir: str, dest: str) -> None:
    """Copy every file under `local_dir` to `dest` (gs://bucket/prefix), many at once."""
    from uniimage_jax import storage

    storage.upload_dir(local_dir, dest)
