"""Tiny stand-ins of the published training sets, written with the writers their publishers use
(`webdataset.TarWriter`, `datasets.Dataset.save_to_disk` / `to_parquet`, JSON metadata beside
image folders), and the same images and captions as a JSONL manifest (the reference the
sources are compared with).

    BLIP3o-Pretrain-Long-Caption, -JourneyDB, BLIP3o-60k
        tar shards: <key>.jpg|png|webp + <key>.txt (+ <key>.json with a "prompt")
    GPT-Image-Edit-1.5M
        save_to_disk: source_image (Image), caption (str or list), target_image (Image)
    ShareGPT-4o-Image
        text_to_image.json [{input_prompt, output_image}];
        text_and_image_to_image.json [{input_prompt, input_image: [...], output_image}]
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP")
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def encoded_image(seed: int, fmt: str = "PNG") -> bytes:
    """A small smooth image (32-48 px sides) encoded as `fmt` (WEBP lossless)."""
    rng = np.random.default_rng(seed)
    h, w = (int(x) for x in rng.integers(32, 49, 2))
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def t2i_samples(n: int, seed: int = 0) -> list[dict]:
    """[{key, ext, image bytes, caption, prompt}] of `n` text-to-image samples."""
    out = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        out.append({"key": f"{seed:02d}{i:05d}", "ext": EXT[fmt],
                    "image": encoded_image(1000 * seed + i, fmt),
                    "caption": f"set {seed} sample {i}: a long caption " + "word " * (i % 5),
                    "prompt": f"short prompt {seed}/{i}"})
    return out


def ti2i_samples(n: int, seed: int = 7) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"key": f"e{seed:02d}{i:04d}",
                    "source": encoded_image(5000 + 1000 * seed + i, "PNG"),
                    "target": encoded_image(9000 + 1000 * seed + i, "JPEG"),
                    "instruction": f"edit {i}: make it {['red', 'blue', 'round'][i % 3]}"})
    return out


def write_images(folder: str, named: dict[str, bytes]) -> None:
    for rel, data in named.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)


def write_manifest(path: str, lines: list[dict]) -> str:
    with open(path, "w") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def write_wds(folder: str, samples: list[dict], per_shard: int, name: str = "{:05d}.tar",
              json_prompt: bool = True) -> list[str]:
    """Tar shards of t2i samples written by webdataset.TarWriter; their paths."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(0, len(samples), per_shard):
        path = os.path.join(folder, name.format(s // per_shard))
        with wds.TarWriter(path) as writer:
            for x in samples[s:s + per_shard]:
                sample = {"__key__": x["key"], x["ext"]: x["image"], "txt": x["caption"]}
                if json_prompt:
                    sample["json"] = {"prompt": x["prompt"], "width": 0}
                writer.write(sample)
        paths.append(path)
    return paths


def write_wds_ti2i(folder: str, samples: list[dict], per_shard: int) -> list[str]:
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(0, len(samples), per_shard):
        path = os.path.join(folder, f"{s // per_shard:05d}.tar")
        with wds.TarWriter(path) as writer:
            for x in samples[s:s + per_shard]:
                writer.write({"__key__": x["key"], "source_image.png": x["source"],
                              "target_image.jpg": x["target"], "txt": x["instruction"]})
        paths.append(path)
    return paths


def write_arrow_t2i(path: str, samples: list[dict], parquet: str | None = None) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": x["image"], "path": None} for x in samples],
         "caption": [x["caption"] for x in samples]}, features=features)
    table.save_to_disk(path)
    if parquet:
        os.makedirs(os.path.dirname(parquet), exist_ok=True)
        table.to_parquet(parquet)


def write_gpt_image_edit(path: str, samples: list[dict]) -> None:
    """The columns the official stage-2 loader reads: source_image, caption, target_image (a
    caption may be a list, of which the last item is the instruction)."""
    import datasets

    features = datasets.Features({"source_image": datasets.Image(),
                                  "caption": datasets.Sequence(datasets.Value("string")),
                                  "target_image": datasets.Image()})
    datasets.Dataset.from_dict(
        {"source_image": [{"bytes": x["source"], "path": None} for x in samples],
         "caption": [[f"(turn 1 of sample {i})", x["instruction"]] if i % 2 else
                     [x["instruction"]] for i, x in enumerate(samples)],
         "target_image": [{"bytes": x["target"], "path": None} for x in samples]},
        features=features).save_to_disk(path)


def write_sharegpt(folder: str, t2i: list[dict], ti2i: list[dict]) -> tuple[str, str]:
    """ShareGPT-4o-Image's layout: a JSON array per part, images relative to it."""
    os.makedirs(folder, exist_ok=True)
    write_images(folder, {f"text_to_image/{x['key']}.{x['ext']}": x["image"] for x in t2i})
    write_images(folder, {f"text_and_image_to_image/{x['key']}_in.png": x["source"]
                          for x in ti2i})
    write_images(folder, {f"text_and_image_to_image/{x['key']}_out.jpg": x["target"]
                          for x in ti2i})
    first = os.path.join(folder, "text_to_image.json")
    with open(first, "w") as fh:
        json.dump([{"input_prompt": x["caption"],
                    "output_image": f"text_to_image/{x['key']}.{x['ext']}"} for x in t2i], fh)
    second = os.path.join(folder, "text_and_image_to_image.json")
    with open(second, "w") as fh:
        json.dump([{"input_prompt": x["instruction"],
                    "input_image": [f"text_and_image_to_image/{x['key']}_in.png"],
                    "output_image": f"text_and_image_to_image/{x['key']}_out.jpg"}
                   for x in ti2i], fh)
    return first, second


def write_published_sets(root: str, n_t2i: int = 12, n_ti2i: int = 8) -> dict:
    """Every layout above under `root` (named as published), plus the reference manifests;
    returns their paths."""
    long_caption = t2i_samples(n_t2i, seed=0)
    journeydb = t2i_samples(n_t2i // 2, seed=1)
    sixty_k = t2i_samples(n_t2i // 2, seed=2)
    edits = ti2i_samples(n_ti2i)
    out = {"root": root}
    out["long_caption"] = write_wds(os.path.join(root, "BLIP3o-Pretrain-Long-Caption"),
                                    long_caption, per_shard=5, name="sa_{:06d}.tar")
    out["journeydb"] = write_wds(os.path.join(root, "BLIP3o-Pretrain-JourneyDB"), journeydb,
                                 per_shard=4, name="JourneyDB_{:03d}.tar", json_prompt=False)
    out["sixty_k"] = write_wds(os.path.join(root, "BLIP3o-60k"), sixty_k, per_shard=3,
                               name="{:05d}.tar", json_prompt=False)
    write_gpt_image_edit(os.path.join(root, "GPT-Image-Edit-1.5M"), edits)
    out["sharegpt"] = write_sharegpt(os.path.join(root, "ShareGPT-4o-Image"), sixty_k, edits)
    # The reference: the same images and captions as a JSONL manifest of image files.
    ref = os.path.join(root, "reference")
    write_images(ref, {f"{x['key']}.{x['ext']}": x["image"] for x in long_caption})
    write_images(ref, {f"{x['key']}_in.png": x["source"] for x in edits})
    write_images(ref, {f"{x['key']}_out.jpg": x["target"] for x in edits})
    out["t2i_manifest"] = write_manifest(os.path.join(ref, "t2i.jsonl"), [
        {"image": f"{x['key']}.{x['ext']}", "caption": x["caption"]} for x in long_caption])
    out["ti2i_manifest"] = write_manifest(os.path.join(ref, "ti2i.jsonl"), [
        {"source_image": f"{x['key']}_in.png", "instruction": x["instruction"],
         "target_image": f"{x['key']}_out.jpg"} for x in edits])
    return out
