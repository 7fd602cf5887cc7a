"""Host batches -> model inputs: tokenised prompts (padded to their prompt-length bucket), M-RoPE
positions, the source images' patches and the static image grid (ti2i), or the caption stage's
question-answer prompts.

For t2i and ti2i, `ExampleEncoder` is handed to the grain pipeline and encodes each example where
grain reads it (its read threads, or its worker processes with `data.worker_count > 0`): the
prompt tokenised and left-padded to the prompt length cap, its M-RoPE positions, for ti2i the
source image's patches and grid. The main thread then only runs `assemble_batch`: it picks the
prompt bucket (a cross-process collective, so it stays there), cuts left padding, checks the image
grids agree and logs the captions that were cut. `prepare_batch` does it all on the main thread
for one host batch of raw examples (the caption stage; tests).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Any

import numpy as np

from uniimage_jax.data.batch_keys import MODEL_INPUTS, target_key
from uniimage_jax.models.uniimage import UniImage, UniImageConfig, rope_positions
from uniimage_jax.processing.prompt_buckets import (
    choose_prompt_bucket,
    longest_prompt,
    trim_left_padding,
)
from uniimage_jax.processing.prompts import (
    TruncationLog,
    build_generation_inputs,
    prompt_name,
)
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
    encoder = ExampleEncoder.for_stage(processor, mc, config, task)
    rows = [encoder({key: host_batch[key][r] for key in ("caption", "source_image")
                     if key in host_batch})[MODEL_INPUTS]
            for r in range(len(host_batch["caption"]))]
    encoded = {**host_batch, MODEL_INPUTS: {k: np.stack([row[k] for row in rows])
                                            for k in rows[0]}}
    return assemble_batch(encoded, config, truncations)


def prompt_length_cap(config) -> int:
    """The longest training prompt: the largest prompt bucket, or `model.max_prompt_tokens`
    without buckets. Longer captions are cut to fit it (counted and named)."""
    buckets = tuple(config.data.prompt_buckets)
    return buckets[-1] if buckets else int(config.model.max_prompt_tokens)


def prompt_length_field(config) -> str:
    """The config field `prompt_length_cap` comes from, as messages name it."""
    return "data.prompt_buckets[-1]" if tuple(config.data.prompt_buckets) else \
        "model.max_prompt_tokens"


# Keys an encoded example carries under MODEL_INPUTS: the prompt left-padded to the cap, (3, cap)
# positions, for ti2i the source image's patches and (t, h, w) grid; and, for a caption cut to
# fit, its token count before and after the cut and the limit that cut it (0, 0, '' when not
# cut), so that the main thread can count and name the cut captions.


@dataclasses.dataclass(frozen=True)
class ExampleEncoder:
    """One training example's model inputs, computed where grain reads the example (see the module
    docstring); picklable, for grain's worker processes. Other keys of the example ("target",
    "latents", "caption", "name", ...) pass through unchanged."""

    processor: Any
    model_config: UniImageConfig
    task: str                 # 't2i' | 'ti2i'
    pad_to: int               # prompt_length_cap(config)
    pad_to_field: str         # prompt_length_field(config)
    _per_thread: threading.local = dataclasses.field(default_factory=threading.local, init=False,
                                                     repr=False, compare=False)

    @classmethod
    def for_stage(cls, processor, model_config: UniImageConfig, config, task: str):
        """The encoder of a training stage (`config`: the training config) for `task`."""
        if task not in ("t2i", "ti2i"):
            raise ValueError(f"examples are encoded for t2i and ti2i, not {task!r}")
        return cls(processor, model_config, task, prompt_length_cap(config),
                   prompt_length_field(config))

    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_per_thread", threading.local())

    def _processor(self):
        """This thread's copy of the processor. grain calls the encoder from several read threads
        at once, and a transformers fast tokenizer must not be shared between threads: a call
        that changes its padding (captions are tokenised unpadded, prompts padded) reconfigures
        the one shared Rust tokenizer, and while another thread is encoding with it some
        tokenizers releases answer that with "RuntimeError: Already borrowed"."""
        processor = getattr(self._per_thread, "processor", None)
        if processor is None:
            processor = self._per_thread.processor = copy.deepcopy(self.processor)
        return processor

    def __call__(self, example: dict) -> dict:
        mc = self.model_config
        caption = str(example["caption"])
        images = None
        if self.task == "ti2i":
            from PIL import Image

            images = [[Image.fromarray(np.asarray(example["source_image"]))]]
        cut = _CutRecorder()
        enc = build_generation_inputs(self._processor(), [caption], images,
                                      num_metaqueries=mc.num_metaqueries,
                                      system_prompt=mc.system_prompt,
                                      max_caption_tokens=mc.max_caption_tokens,
                                      pad_to=self.pad_to, names=["?"], truncations=cut,
                                      pad_to_field=self.pad_to_field)
        grid = enc.get("image_grid_thw")
        pos = rope_positions(mc, enc["input_ids"], enc["attention_mask"], grid)
        inputs = {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0],
                  "position_ids": pos[:, 0], **cut.fields()}
        if grid is not None:
            inputs["pixel_values"] = enc["pixel_values"]
            inputs["image_grid_thw"] = np.asarray(grid[0], np.int64)
        return {**example, MODEL_INPUTS: inputs}


class _CutRecorder:
    """Takes `TruncationLog.add`'s call for the one caption of an example, to be carried to the
    main thread's log (where counting and naming happen, once per record)."""

    def __init__(self):
        self.tokens, self.kept, self.limit = 0, 0, ""

    def add(self, name: str, tokens: int, kept: int, limit: str) -> None:
        del name
        self.tokens, self.kept, self.limit = int(tokens), int(kept), str(limit)

    def fields(self) -> dict:
        return {"caption_tokens": np.int64(self.tokens), "caption_kept": np.int64(self.kept),
                "caption_cut_limit": np.str_(self.limit)}


def assemble_batch(host_batch: dict, config, truncations: TruncationLog | None = None):
    """A host batch of encoded examples (`ExampleEncoder`) -> (model inputs, image grid): the
    prompt bucket of the GLOBAL batch's longest prompt, left
    padding cut to it (positions too: padding holds position 0 and real tokens keep theirs), the
    image grids checked to agree; the captions cut to fit are counted and named in `truncations`."""
    inputs = host_batch[MODEL_INPUTS]
    names = _names(host_batch)
    truncations = truncations if truncations is not None else TruncationLog()
    for r in np.flatnonzero(inputs["caption_kept"] < inputs["caption_tokens"]):
        truncations.add(names[r] if names is not None else prompt_name(str(host_batch[
            "caption"][r])), int(inputs["caption_tokens"][r]), int(inputs["caption_kept"][r]),
            str(inputs["caption_cut_limit"][r]))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = np.ascontiguousarray(np.moveaxis(inputs["position_ids"], 1, 0))  # (B, 3, T) -> (3, B, T)
    buckets = tuple(config.data.prompt_buckets)
    if buckets:
        # Every process must pad to the same bucket (one global array shape): the bucket holds
        # the longest prompt of the GLOBAL batch, one small all-gather on multi-process runs.
        length = choose_prompt_bucket(distributed.process_max(longest_prompt(mask)), buckets)
        trimmed = trim_left_padding(ids, mask, length)
        ids, mask = trimmed["input_ids"], trimmed["attention_mask"]
        pos = np.ascontiguousarray(pos[..., pos.shape[-1] - length:])
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    key = target_key(host_batch)
    out[key] = np.asarray(host_batch[key], np.float32)
    grid = None
    if "image_grid_thw" in inputs:
        grid = tuple(tuple(int(v) for v in g) for g in inputs["image_grid_thw"])
        out["pixel_values"] = inputs["pixel_values"]
        if len(set(grid)) != 1:
            raise ValueError(f"source images of one batch must share one size, got grids {grid}")
    return out, grid


def _names(host_batch: dict) -> list[str] | None:
    """The batch's records as messages name them (a manifest's file:line)."""
    return [str(n) for n in host_batch["name"]] if "name" in host_batch else None
