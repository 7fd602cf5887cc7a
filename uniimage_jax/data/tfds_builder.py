"""A TFDS builder for user data: a folder of image files + a JSONL manifest -> array_record.

    build_tfds_dataset("data/train.jsonl", "/data/tfds", "t2i")
    # then train with data.source='tfds', data.tfds_name='uniimage_user_data/t2i',
    #                 data.tfds_data_dir='/data/tfds'

The manifest has the layout `manifest.read_manifest` reads (paths relative to the manifest):
config "t2i" takes {"image", "caption"} lines, config "ti2i" {"source_image", "instruction" (or
"caption"), "target_image"} lines. The dataset is written with `file_format="array_record"`, which
grain reads by random access (`sources.TfdsSource`).

Every image is fully decoded at build time with `images.load_image`. An unreadable one is skipped
(its example is not written), counted and logged by name - never stored as a placeholder. Plain
RGB JPEGs are stored as their original bytes (no re-encoding loss); anything else (CMYK, 16-bit,
alpha, palette, greyscale, other formats) is stored as the 8-bit RGB that `load_image` produces,
PNG-encoded, so readers never meet those formats. The training pipeline uses one source image per
example, so for a ti2i line with several source images only the first is stored (counted in
`BuildReport.extra_sources_dropped`).

This module imports TensorFlow Datasets at import time: import it only where TFDS is used.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from uniimage_jax.data.images import UnreadableImageError, load_image
from uniimage_jax.data.manifest import check_task, read_manifest

log = logging.getLogger("uniimage_jax.data")

BUILDER_NAME = "uniimage_user_data"


def _storable(path: str):
    """What to hand the TFDS Image feature: original bytes for plain RGB JPEGs, else RGB uint8."""
    rgb = load_image(path)  # raises UnreadableImageError; full decode
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        plain_jpeg = img.format == "JPEG" and img.mode == "RGB"
    return data if plain_jpeg else rgb


class UniimageUserData(tfds.core.GeneratorBasedBuilder):
    """User image-text (t2i) or edit-triple (ti2i) data from a JSONL manifest + image files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="t2i", description="image + caption"),
        tfds.core.BuilderConfig(name="ti2i",
                                description="source image + instruction -> target image"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass manifest=<path to the JSONL manifest> (or put manifest.jsonl in manual_dir); "
        "image paths in it are relative to the manifest.")

    def __init__(self, *, manifest: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        self._manifest = os.fspath(manifest) if manifest is not None else None
        self.skipped: list[str] = []  # "path: reason" of each example not written
        self.extra_sources_dropped = 0

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8)
        if self.builder_config.name == "t2i":
            features = {"image": image, "caption": tfds.features.Text(),
                        "file_name": tfds.features.Text()}
        else:
            features = {"source_image": image, "instruction": tfds.features.Text(),
                        "target_image": tfds.features.Image(shape=(None, None, 3),
                                                            dtype=np.uint8),
                        "file_name": tfds.features.Text()}
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        manifest = self._manifest or os.path.join(dl_manager.manual_dir, "manifest.jsonl")
        return {"train": self._generate_examples(manifest)}

    def _generate_examples(self, manifest):
        task = self.builder_config.name
        for key, record in enumerate(read_manifest(manifest, task)):
            try:
                if task == "t2i":
                    example = {"image": _storable(record["image"]),
                               "caption": record["caption"], "file_name": record["image"]}
                else:
                    sources = record["source_images"]
                    self.extra_sources_dropped += len(sources) - 1
                    example = {"source_image": _storable(sources[0]),
                               "instruction": record["instruction"],
                               "target_image": _storable(record["target_image"]),
                               "file_name": record["target_image"]}
            except UnreadableImageError as e:
                self.skipped.append(f"{e.path}: {e.reason}")
                log.warning("tfds build: skipping %s, unreadable image %s (%s)",
                            record.get("name", f"example {key}"), e.path, e.reason)
                continue
            yield key, example


@dataclasses.dataclass
class BuildReport:
    name: str                   # '<builder>/<config>', the value for data.tfds_name
    data_dir: str               # the value for data.tfds_data_dir
    num_examples: int           # examples written
    skipped: list[str]          # "path: reason" of each unreadable example left out
    extra_sources_dropped: int  # ti2i source images beyond the first (not stored)


def build_tfds_dataset(manifest: str | os.PathLike, data_dir: str | os.PathLike,
                       kind: str) -> BuildReport:
    """Write the manifest's examples as TFDS `uniimage_user_data/<kind>` (array_record) under
    `data_dir`; kind is 't2i' or 'ti2i'."""
    check_task(kind)
    data_dir = os.fspath(data_dir)
    builder = UniimageUserData(config=kind, data_dir=data_dir, manifest=manifest,
                               file_format="array_record")
    builder.download_and_prepare()
    num = builder.info.splits["train"].num_examples
    if builder.skipped:
        log.warning("tfds build: %d unreadable example(s) skipped, %d written",
                    len(builder.skipped), num)
    return BuildReport(name=f"{BUILDER_NAME}/{kind}", data_dir=data_dir, num_examples=num,
                       skipped=list(builder.skipped),
                       extra_sources_dropped=builder.extra_sources_dropped)
