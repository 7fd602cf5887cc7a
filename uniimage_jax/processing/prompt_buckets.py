"""Prompt length buckets: each training batch is padded to the smallest of a few fixed lengths
that holds its longest prompt, instead of every prompt to one worst-case length.

Why: a COCO-like caption is 20-50 tokens, while the fixed length that holds the official
256-token caption cap (and, for tbac_3b, 256 image tokens t2i never has) is 640. The frozen
MLLM's prompt pass costs in proportion to the padded length, so most of it was spent on padding.
A handful of lengths bounds the compiled step count (one compile per bucket met).

Prompts are left-padded and their attention mask and M-RoPE positions start at the first real
token, so the loss of a row does not depend on the bucket it was padded to (up to float
reduction order; tests/test_prompt_buckets.py checks loss and gradients).

The lengths of the tbac_3b defaults (`TBAC_PROMPT_BUCKETS`): the Qwen2.5-VL chat template with the
official system prompt takes 32 tokens before the caption and 5 after it ("<|im_start|>system\\n",
the 24-token system prompt, "<|im_end|>\\n<|im_start|>user\\n", then "<|im_end|>\\n<|im_start|>
assistant\\n"), and the metaquery suffix 67 (<|vision_start|>, 64 queries, <|vision_end|>,
<|im_end|>): 104 tokens without a caption. A ti2i prompt adds one 448 px source image, 256 merged
image tokens plus its <|vision_start|> / <|vision_end|>: 362. The largest bucket holds the official
256-token caption cap in both, so no caption is cut further than the official code cuts it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uniimage_jax.errors import ConfigError

# t2i: room for captions of up to 24, 56, 88, 152 and 280 tokens. No image tokens reserved.
# ti2i: the same caption room after the 258 tokens of the source image.
TBAC_PROMPT_BUCKETS = {"t2i": (128, 160, 192, 256, 384),
                       "ti2i": (384, 416, 448, 512, 640)}


def check_prompt_buckets(buckets, field: str = "data.prompt_buckets") -> tuple[int, ...]:
    """`buckets` as a tuple of strictly increasing positive ints (an empty tuple: no buckets);
    ConfigError naming `field` otherwise."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise ConfigError(f"{field} must be a tuple of prompt lengths, e.g. (128, 192, 384), "
                          f"got {buckets!r}")
    out = []
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ConfigError(f"{field} must hold positive integers, got {tuple(buckets)!r}")
        out.append(int(b))
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ConfigError(f"{field} must be strictly increasing, got {tuple(out)!r}")
    return tuple(out)


def choose_prompt_bucket(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds a prompt of `longest` tokens. The caller has already cut
    captions to fit the largest bucket, so a longer prompt is a bug, not user input."""
    for b in buckets:
        if longest <= b:
            return int(b)
    raise ValueError(f"a prompt of {longest} tokens is longer than the largest prompt bucket "
                     f"{buckets[-1]}")


def longest_prompt(attention_mask: np.ndarray) -> int:
    """Tokens of the batch's longest (left-padded) prompt."""
    return int(np.asarray(attention_mask).sum(axis=1).max())


def trim_left_padding(input_ids: np.ndarray, attention_mask: np.ndarray, length: int):
    """(B, T) left-padded ids and mask cut to their last `length` columns; only padding goes."""
    t = input_ids.shape[1]
    if length > t:
        raise ValueError(f"cannot trim a prompt of {t} columns to {length}")
    if np.asarray(attention_mask)[:, : t - length].any():
        raise ValueError(f"trimming prompts to {length} tokens would drop real tokens")
    return {"input_ids": np.ascontiguousarray(input_ids[:, t - length:]),
            "attention_mask": np.ascontiguousarray(attention_mask[:, t - length:])}
