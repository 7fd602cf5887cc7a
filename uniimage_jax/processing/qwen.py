"""Loading the Qwen2.5-VL processor / tokenizer offline and encoding chat questions for answering.

All tokenization, chat templating and image preprocessing is transformers' own
(`Qwen2_5_VLProcessor`, `Qwen2VLImageProcessor`, `Qwen2Tokenizer`); this module only loads them
strictly from a directory (local, or on Cloud Storage: copied once into the local cache, see
`uniimage_jax.storage.local_mirror`) and turns their output into numpy arrays for the JAX
model.

transformers' `Qwen2_5_VLProcessor` insists on a video processor, and transformers' video
processors need torchvision. Understanding here never takes video, so when torchvision is absent
`load_processor` builds `ImageOnlyQwen2_5_VLProcessor`: the same class with the video processor
left out of its constructor (its `__call__` already skips video when there is none). With
torchvision installed, the stock `AutoProcessor` result is returned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# Files a transformers tokenizer directory provides (any one is enough for AutoTokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


_IMAGE_ONLY_CLASS = []  # the class, made once on first use (importing transformers is slow)


def __getattr__(name: str):
    # Pickle finds the class by its module and name (a processor travels to grain's worker
    # processes inside the trainer's example encoder), so the lazily made class is reachable here.
    if name == "ImageOnlyQwen2_5_VLProcessor":
        return _image_only_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_only_processor_class():
    if _IMAGE_ONLY_CLASS:
        return _IMAGE_ONLY_CLASS[0]
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """`Qwen2_5_VLProcessor` without a video processor (torchvision-free environments).

        `ProcessorMixin` discovers sub-processors from the constructor signature, so leaving
        `video_processor` out of it is all it takes; images and text go through the stock code.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                             **kwargs)

    ImageOnlyQwen2_5_VLProcessor.__qualname__ = "ImageOnlyQwen2_5_VLProcessor"
    _IMAGE_ONLY_CLASS.append(ImageOnlyQwen2_5_VLProcessor)
    return ImageOnlyQwen2_5_VLProcessor


def image_only_processor(image_processor, tokenizer, chat_template=None):
    """A Qwen2.5-VL processor from an image processor and a tokenizer, with no video processor."""
    return _image_only_processor_class()(image_processor, tokenizer, chat_template=chat_template)


def _local_dir(path: str) -> str:
    """`path` as a local directory: a gs:// one is copied once into the local cache."""
    from uniimage_jax import storage

    if storage.is_remote(path) and not storage.is_dir(path):
        raise FileNotFoundError(f"directory {path!r} does not exist")
    return storage.local_mirror(path)


def _check_dir(path: str, what: str, needed: Sequence[str]) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory {path!r} does not exist")
    if not any(os.path.exists(os.path.join(path, f)) for f in needed):
        raise FileNotFoundError(f"{path!r} is not a {what} directory: none of {', '.join(needed)} "
                                f"is in it (save one with `.save_pretrained(dir)`)")
    return path


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def load_tokenizer(path: str):
    """The tokenizer saved in `path` (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    path = _local_dir(path)
    _check_dir(path, "tokenizer", _TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_processor(path: str):
    """The Qwen2.5-VL processor saved in `path` (no download), see the module docstring."""
    path = _local_dir(path)
    _check_dir(path, "tokenizer", _TOKENIZER_FILES)
    _check_dir(path, "image processor", _IMAGE_PROCESSOR_FILES)
    if _torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, local_files_only=True)
    return _image_only_processor_class().from_pretrained(path, local_files_only=True)


def chat_messages(question: str, num_images: int = 0,
                  history: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """The user turn asking `question`: `num_images` image slots, then the question (Qwen's
    documented order). `history`: earlier (question, answer) turns of the same conversation, which
    come first; the images then belong to the first user turn, where they were asked about."""
    turns = [*history, (question, None)]
    messages = []
    for i, (asked, answered) in enumerate(turns):
        slots = [{"type": "image"}] * num_images if i == 0 else []
        messages.append({"role": "user", "content": [*slots, {"type": "text", "text": asked}]})
        if answered is not None:
            messages.append({"role": "assistant",
                             "content": [{"type": "text", "text": answered}]})
    return messages


def encode_chat(processor, questions: Sequence[str],
                images: Sequence[Sequence[Any] | None] | None = None,
                padding_side: str = "left",
                histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> dict[str, Any]:
    """Tokenize a batch of chat questions (each with its own list of PIL images) for generation;
    `histories`, one per question, holds the earlier (question, answer) turns of its conversation.

    Returns numpy input_ids / attention_mask (int32, padded on `padding_side`, left for
    generation), mm_token_type_ids (int32, 1 on image tokens; transformers' Qwen2.5-VL derives its
    M-RoPE positions from it and silently falls back to 1-D positions without it) and, when any
    row has images, pixel_values (float32, the patches of every image in order) and
    image_grid_thw as a tuple of (t, h, w) int tuples (static for jit).
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of strings, not one string")
    rows = list(images) if images is not None else [None] * len(questions)
    if len(rows) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(rows)} image lists")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    rows = [list(r) if r else [] for r in rows]
    histories = list(histories) if histories is not None else [()] * len(questions)
    if len(histories) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(histories)} histories")
    texts = [processor.apply_chat_template(chat_messages(q, len(r), h), add_generation_prompt=True)
             for q, r, h in zip(questions, rows, histories)]
    flat_images = [im for r in rows for im in r]
    kwargs = {"images": flat_images} if flat_images else {}
    enc = processor(text=texts, padding=True, padding_side=padding_side, return_tensors="np",
                    **kwargs)
    out = {"input_ids": np.asarray(enc["input_ids"], np.int32),
           "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    if "mm_token_type_ids" in enc:  # transformers >= 5 processors give it
        out["mm_token_type_ids"] = np.asarray(enc["mm_token_type_ids"], np.int32)
    if flat_images:
        out["pixel_values"] = np.asarray(enc["pixel_values"], np.float32)
        out["image_grid_thw"] = tuple(tuple(int(v) for v in g) for g in enc["image_grid_thw"])
    return out
