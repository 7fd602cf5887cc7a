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

Prompt length, the same for training and sampling: a caption is cut to `max_caption_tokens`
(the official 256) and, when every prompt is padded to a fixed length (`pad_to`, the training
config's `model.max_prompt_tokens`, or the sampler's `--max-prompt-tokens`), further to what
fits in it. Never an error in the middle of a run: each cut caption is counted and named in a
warning (`TruncationLog`). Only a fixed length too short for the prompt without any caption is an
error, and the trainer checks that before it starts (`check_prompt_room`). Validating a whole
manifest up front instead would mean tokenizing every caption before the first step (hours for a
large dataset), so cutting with a warning was chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from uniimage_jax.errors import UserError

log = logging.getLogger("uniimage_jax.prompts")

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


class TruncationLog:
    """Captions cut to fit the prompt: counted, each record named in one warning (none when
    `quiet`: for a caller that only measures a prompt it encodes again to use it)."""

    def __init__(self, quiet: bool = False):
        self._named: set[str] = set()
        self._quiet = quiet

    @property
    def count(self) -> int:
        """Distinct records cut so far."""
        return len(self._named)

    def add(self, name: str, tokens: int, kept: int, limit: str) -> None:
        if name not in self._named:
            self._named.add(name)
            if self._quiet:
                return
            log.warning("%s: caption cut from %d to %d tokens to fit %s (%d caption(s) cut so "
                        "far)", name, tokens, kept, limit, len(self._named))


# A prompt named in a message shows at most this many characters: a user's prompt may be a whole
# file, or one 100,000-character word, and a log line must stay a line.
PROMPT_NAME_CHARS = 80


def prompt_name(caption: str) -> str:
    """A prompt as warnings name it (the CLI's, the trainer's and the web app's log alike): the
    prompt, or when it is longer than PROMPT_NAME_CHARS its first PROMPT_NAME_CHARS characters
    and its length in words and characters; never the whole of a long prompt."""
    text = " ".join(caption.split())
    if len(text) <= PROMPT_NAME_CHARS:
        return f"prompt {text!r}"
    words = len(caption.split())
    return (f"prompt {text[:PROMPT_NAME_CHARS]!r} ... ({words} word{'s' * (words != 1)}, "
            f"{len(caption)} characters)")


def prompt_strings(processor, captions: Sequence[str], num_images: Sequence[int] | None = None,
                   *, num_metaqueries: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                   max_caption_tokens: int = MAX_CAPTION_TOKENS) -> list[str]:
    """The prompt text of each batch row (before tokenization)."""
    tok = processor.tokenizer
    return _chat_texts(processor, [truncate_caption(tok, c, max_caption_tokens) for c in captions],
                       num_images, num_metaqueries=num_metaqueries, system_prompt=system_prompt)


def _chat_texts(processor, captions: Sequence[str], num_images: Sequence[int] | None, *,
                num_metaqueries: int, system_prompt: str | None) -> list[str]:
    num_images = list(num_images) if num_images is not None else [0] * len(captions)
    if len(num_images) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(num_images)} image counts")
    prefix = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
              if system_prompt is not None else [])
    out = []
    for caption, n in zip(captions, num_images):
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
                            pad_to: int | None = None, names: Sequence[str] | None = None,
                            truncations: TruncationLog | None = None,
                            pad_to_field: str = "max_prompt_tokens") -> dict[str, Any]:
    """Tokenized, left-padded batch: input_ids, attention_mask (int32) and, with images,
    pixel_values (float32) and image_grid_thw (a tuple of (t, h, w) tuples, in order).

    images: per row, a list of PIL images (or None / [] for a text-only row).
    pad_to: left-pad every row to this fixed length (static shapes under jit); a caption too
      long for it is cut to fit (see the module docstring); a prompt too long even without its
      caption is an error naming the lengths.
    names: what to call each row in a truncation warning (a manifest's file:line); default: the
      caption's first words. truncations: the log that counts them (default: a fresh one).
    pad_to_field: the setting `pad_to` comes from, as messages name it (a trainer with prompt
      buckets pads to the largest bucket, not to max_prompt_tokens).
    """
    rows = list(images) if images is not None else [None] * len(captions)
    if len(rows) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(rows)} image lists")
    rows = [list(r) if r else [] for r in rows]
    tok = processor.tokenizer
    caption_ids = [tok(c, padding=False)["input_ids"] for c in captions]
    budgets = [max_caption_tokens] * len(captions)
    flat_images = [im for r in rows for im in r]
    kwargs = {"images": flat_images} if flat_images else {}
    for _ in range(8):  # decoding then re-tokenizing may shift a token; converges in 1-2 rounds
        cut = [ids[:b] for ids, b in zip(caption_ids, budgets)]
        texts = _chat_texts(processor, [tok.decode(ids) for ids in cut], [len(r) for r in rows],
                            num_metaqueries=num_metaqueries, system_prompt=system_prompt)
        # padding_side per call: the caller's tokenizer keeps its own setting
        enc = processor(text=texts, padding=True, padding_side="left", return_tensors="np",
                        **kwargs)
        lengths = np.asarray(enc["attention_mask"]).sum(axis=1)
        over = [] if pad_to is None else [r for r, n in enumerate(lengths) if n > pad_to]
        if not over:
            break
        for r in over:
            budgets[r] = len(cut[r]) - int(lengths[r] - pad_to)
            if budgets[r] < 0:
                raise UserError(f"the fixed prompt length {pad_to} ({pad_to_field}) has no "
                                 f"room for a caption: the prompt without it is "
                                 f"{int(lengths[r]) - len(cut[r])} tokens")
    truncations = truncations if truncations is not None else TruncationLog()
    for r, (ids, kept) in enumerate(zip(caption_ids, cut)):
        if len(kept) < len(ids):
            limit = (f"max_caption_tokens={max_caption_tokens}" if len(kept) == max_caption_tokens
                     else f"the fixed prompt length {pad_to} ({pad_to_field})")
            truncations.add(names[r] if names is not None else prompt_name(captions[r]), len(ids),
                            len(kept), limit)
    out = {"input_ids": np.asarray(enc["input_ids"], np.int32),
           "attention_mask": np.asarray(enc["attention_mask"], np.int32)}
    if pad_to is not None:
        out.update(left_pad(out["input_ids"], out["attention_mask"], pad_to,
                            processor.tokenizer.pad_token_id))
    if flat_images:
        out["pixel_values"] = np.asarray(enc["pixel_values"], np.float32)
        out["image_grid_thw"] = tuple(tuple(int(v) for v in g) for g in enc["image_grid_thw"])
    return out


def check_prompt_room(processor, pad_to: int, *, num_metaqueries: int,
                      system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, images=None,
                      pad_to_field: str = "max_prompt_tokens") -> int:
    """Caption tokens that fit in a prompt of fixed length `pad_to` (with `images`, a list of
    PIL images, as every row has them); ValueError when the prompt without a caption does not
    fit (naming `pad_to_field`). Cheap: one tokenization, done before training starts."""
    enc = build_generation_inputs(processor, [""], [list(images)] if images else None,
                                  num_metaqueries=num_metaqueries, system_prompt=system_prompt)
    fixed = int(enc["attention_mask"].sum())
    if fixed >= pad_to:
        raise UserError(f"{pad_to_field}={pad_to} leaves no room for a caption: the prompt "
                         f"without one is already {fixed} tokens"
                         + (f" (with {len(images)} input image(s))" if images else ""))
    return pad_to - fixed


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
