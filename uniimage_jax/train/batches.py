"""Host batches -> model inputs: tokenised prompts (padded to their prompt-length bucket), M-RoPE
positions, the source images' patches and the static image grid (ti2i), or the caption stage's
question-answer prompts."""

from __future__ import annotations

import numpy as np

from uniimage_jax.models.uniimage import UniImage, rope_positions
from uniimage_jax.processing.prompt_buckets import (
    choose_prompt_bucket,
    longest_prompt,
    trim_left_padding,
)
from uniimage_jax.processing.prompts import TruncationLog, build_generation_inputs
from uniimage_jax.train import captioning, distributed


def prepare_batch(host_batch: dict, processor, model: UniImage, config, task: str,
                  truncations: TruncationLog | None = None):
    """Tokenize on the host: numpy arrays with the batch axis leading (position_ids: (3, B, T),
    see `INPUT_BATCH_AXES`), and the static image grid.
    Captions too long for the fixed prompt length are cut, counted in `truncations` and named
    (the record's file:line) in a warning."""
    mc = model.config
    if task == "caption":
        from PIL import Image

        # The target images back to uint8 (exact: the pipeline mapped uint8 x to x / 127.5 - 1).
        images = [Image.fromarray(np.round((np.asarray(x) + 1.0) * 127.5).astype(np.uint8))
                  for x in host_batch["target"]]
        captions = [str(c) for c in host_batch["caption"]]
        return captioning.build_caption_inputs(processor, mc.mllm, images, captions,
                                               question=config.caption_question,
                                               pad_to=config.model.max_prompt_tokens,
                                               names=_names(host_batch), truncations=truncations)
    captions = [str(c) for c in host_batch["caption"]]
    images = None
    if task == "ti2i":
        from PIL import Image

        images = [[Image.fromarray(np.asarray(x))] for x in host_batch["source_image"]]
    enc = build_generation_inputs(processor, captions, images,
                                  num_metaqueries=mc.num_metaqueries,
                                  system_prompt=mc.system_prompt,
                                  max_caption_tokens=mc.max_caption_tokens,
                                  pad_to=prompt_length_cap(config),
                                  names=_names(host_batch), truncations=truncations)
    buckets = tuple(config.data.prompt_buckets)
    if buckets:
        # Every process must pad to the same bucket (one global array shape): the bucket holds
        # the longest prompt of the GLOBAL batch, one small all-gather on multi-process runs.
        length = choose_prompt_bucket(distributed.process_max(longest_prompt(
            enc["attention_mask"])), buckets)
        enc.update(trim_left_padding(enc["input_ids"], enc["attention_mask"], length))
    grid = enc.get("image_grid_thw")
    pos = rope_positions(mc, enc["input_ids"], enc["attention_mask"], grid)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "position_ids": pos}
    # A latent cache's batches carry the encoded targets ("latents"): the step skips the encoder.
    key = "latents" if "latents" in host_batch else "target"
    out[key] = np.asarray(host_batch[key], np.float32)
    if grid is not None:
        b = len(captions)
        out["pixel_values"] = enc["pixel_values"].reshape(b, -1, enc["pixel_values"].shape[-1])
        if len(set(grid)) != 1:
            raise ValueError(f"source images of one batch must share one size, got grids {grid}")
    return out, grid


def prompt_length_cap(config) -> int:
    """The longest training prompt: the largest prompt bucket, or `model.max_prompt_tokens`
    without buckets. Longer captions are cut to fit it (counted and named)."""
    buckets = tuple(config.data.prompt_buckets)
    return buckets[-1] if buckets else int(config.model.max_prompt_tokens)


def _names(host_batch: dict) -> list[str] | None:
    """The batch's records as messages name them (a manifest's file:line)."""
    return [str(n) for n in host_batch["name"]] if "name" in host_batch else None
