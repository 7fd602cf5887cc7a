"""Generation prompts with metaqueries, built exactly as the official TBAC-UniImage code does.

The official `MLLMInContext.tokenize` (models/model.py) does, for the Qwen2.5-VL backbone:

1. Extend the tokenizer: special tokens `<|pad_token_i|>` until `len(tokenizer)` equals the
   embedding table size (151936 for Qwen2.5-VL), then `<|img0|>`..`<|img{N-1}|>`. The metaquery
   ids are therefore `num_embeddings .. num_embeddings + N - 1`.
2. Truncate each caption to its first 256 tokens (tokenize, cut, decode).
3. Chat messages: a system turn with the system prompt; a user turn with one `{"type": "image"}`
   per input image followed by the caption text; the chat template with the generation prompt.
4. Append `<|vision_start|><|img0|>..<|img{N-1}|><|vision_end|><|im_end|>` to each prompt string.
5. Tokenize the batch with the processor (images expanded to their `<|image_pad|>` runs), left
   padding.

Everything tokenizer-side is transformers' own (chat template, processor); this module only
orders the calls. Output is numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_SYSTEM_PROMPT = ("You will be given an image or its caption. Please describe the content "
                         "of the image in detail in your own words.")
MAX_CAPTION_TOKENS = 256


def metaquery_tokens(num_metaqueries: int) -> list[str]:
    return [f"<|img{i}|>" for i in range(num_metaqueries)]


def add_metaquery_tokens(tokenizer, num_embeddings: int, num_metaqueries: int) -> list[int]:
    """Extend `tokenizer` in place as the official code does; return the metaquery token ids.

    num_embeddings: rows of the MLLM's (un-resized) input embedding table, i.e. its vocab_size.
    Idempotent: a tokenizer that already carries the tokens is checked, not extended twice.
    """
    queries = metaquery_tokens(num_metaqueries)
    vocab = tokenizer.get_vocab()
    if not all(q in vocab for q in queries):
        if len(tokenizer) > num_embeddings:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the "
                             f"{num_embeddings} embedding rows of the MLLM (vocab_size)")
        pad = [f"<|pad_token_{i}|>" for i in range(num_embeddings - len(tokenizer))]
        if pad:
            tokenizer.add_special_tokens({"additional_special_tokens": pad})
        tokenizer.add_special_tokens({"additional_special_tokens": queries})
    ids = tokenizer.convert_tokens_to_ids(queries)
    expected = list(range(num_embeddings, num_embeddings + num_metaqueries))
    if list(ids) != expected:
        raise ValueError(f"metaquery token ids {ids[:3]}... are not {expected[:3]}...: the "
                         f"tokenizer does not match an MLLM with vocab_size {num_embeddings}")
    return list(ids)


def metaquery_suffix(num_metaqueries: int) -> str:
    return "<|vision_start|>" + "".join(metaquery_tokens(num_metaqueries)) + \
        "<|vision_end|><|im_end|>"


def truncate_caption(tokenizer, caption: str, max_tokens: int = MAX_CAPTION_TOKENS) -> str:
    ids = tokenizer(caption, padding=False)["input_ids"][:max_tokens]
    return tokenizer.decode(ids)


def prompt_strings(processor, captions: Sequence[str], num_images: Sequence[int] | None = None,
                   *, num_metaqueries: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                   max_caption_tokens: int = MAX_CAPTION_TOKENS) -> list[str]:
    """The prompt text of each batch row (before tokenization)."""
    tok = processor.tokenizer
    num_images = list(num_images) if num_images is not None else [0] * len(captions)
    if len(num_images) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(num_images)} image counts")
    prefix = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
              if system_prompt is not None else [])
    out = []
    for caption, n in zip(captions, num_images):
        caption = truncate_caption(tok, caption, max_caption_tokens)
        content = [{"type": "image"}] * n + [{"type": "text", "text": caption}]
        conv = prefix + [{"role": "user", "content": content}]
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
        out.append(text + (metaquery_suffix(num_metaqueries) if num_metaqueries > 0 else ""))
    return out


def build_generation_inputs(processor, captions: Sequence[str],
                            images: Sequence[Sequence[Any] | None] | None = None, *,
                            num_metaqueries: int,
                            system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                            max_caption_tokens: int = MAX_CAPTION_TOKENS,
                            pad_to: int | None = None) -> dict[str, Any]:
    """Tokenized, left-padded batch: input_ids, attention_mask (int32) and, with images,
    pixel_values (float32) and image_grid_thw (a tuple of (t, h, w) tuples, in order).

    images: per row, a list of PIL images (or None / [] for a text-only row).
    pad_to: left-pad every row to this fixed length (static shapes under jit); a longer prompt
      is an error naming the lengths.
    """
    rows = list(images) if images is not None else [None] * len(captions)
    if len(rows) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(rows)} image lists")
    rows = [list(r) if r else [] for r in rows]
    texts = prompt_strings(processor, captions, [len(r) for r in rows],
                           num_metaqueries=num_metaqueries, system_prompt=system_prompt,
                           max_caption_tokens=max_caption_tokens)
    flat_images = [im for r in rows for im in r]
    processor.tokenizer.padding_side = "left"
    kwargs = {"images": flat_images} if flat_images else {}
    enc = processor(text=texts, padding=True, return_tensors="np", **kwargs)
    out = {"input_ids": np.asarray(enc["input_ids"], np.int32),
           "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    if pad_to is not None:
        out.update(left_pad(out["input_ids"], out["attention_mask"], pad_to,
                            processor.tokenizer.pad_token_id))
    if flat_images:
        out["pixel_values"] = np.asarray(enc["pixel_values"], np.float32)
        out["image_grid_thw"] = tuple(tuple(int(v) for v in g) for g in enc["image_grid_thw"])
    return out


def metaquery_positions(input_ids: np.ndarray, vision_start_id: int, vision_end_id: int):
    """(B, N) positions strictly between each row's LAST <|vision_start|> and LAST <|vision_end|>,
    as the official `encode_condition` selects them; raises if rows disagree on N."""
    input_ids = np.asarray(input_ids)
    rows = []
    for r, ids in enumerate(input_ids):
        starts = np.flatnonzero(ids == vision_start_id)
        ends = np.flatnonzero(ids == vision_end_id)
        if not len(starts) or not len(ends) or ends[-1] <= starts[-1]:
            raise ValueError(f"row {r} has no <|vision_start|> ... <|vision_end|> metaquery block")
        rows.append(np.arange(starts[-1] + 1, ends[-1]))
    if len({len(p) for p in rows}) != 1:
        raise ValueError(f"rows have different numbers of metaqueries: {[len(p) for p in rows]}")
    return np.stack(rows).astype(np.int32)


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, length: int, pad_id: int):
    """Left-pad (B, T) ids and mask to (B, length)."""
    b, t = input_ids.shape
    if t > length:
        raise ValueError(f"a prompt of {t} tokens does not fit the fixed prompt length {length}; "
                         "raise max_prompt_tokens")
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    ids[:, length - t:] = input_ids
    mask[:, length - t:] = attention_mask
    return {"input_ids": ids, "attention_mask": mask}
