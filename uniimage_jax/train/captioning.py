"""The understanding objective: next-token cross-entropy of a caption given its image.

TBAC-UniImage keeps its (pretrained) MLLM frozen and never trains this. It is here for MLLMs that
cannot yet describe the images at hand: the demo's tiny MLLM starts from random weights, and a
random frozen MLLM barely carries a caption to the metaqueries, so the demo first teaches it to
caption the synthetic images (`config.task = "caption"`), then trains generation on top of it,
frozen, as the official recipe does.

One example is Qwen2.5-VL's chat

    <|im_start|>system ...<|im_end|> <|im_start|>user <image> QUESTION<|im_end|>
    <|im_start|>assistant CAPTION<|im_end|>

left-padded to a fixed length; the loss is the mean over the answer tokens (the caption and its
`<|im_end|>`) of -log p(token | everything before it): transformers' `labels` loss with -100
everywhere else (tested against it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.errors import UserError
from uniimage_jax.models.qwen2_5_vl import get_rope_index
from uniimage_jax.processing.prompts import TruncationLog, left_pad, prompt_name
from uniimage_jax.processing.qwen import chat_messages

DEFAULT_QUESTION = "Describe the image."
END_OF_TURN = "<|im_end|>"


def build_caption_inputs(processor, mllm_config, images: Sequence[Any], captions: Sequence[str],
                         *, question: str = DEFAULT_QUESTION, pad_to: int | None = None,
                         names: Sequence[str] | None = None,
                         truncations: TruncationLog | None = None
                         ) -> tuple[dict[str, np.ndarray], tuple]:
    """Numpy inputs (input_ids, attention_mask, position_ids (3, B, T), loss_mask, pixel_values
    (B, patches per image, dim)) and the static image grid, for one PIL image per caption. All
    images of a batch must have one size (static shapes). A caption too long for `pad_to` is cut
    to fit (the model learns its beginning), counted in `truncations` and named (`names`) in a
    warning, as generation prompts are."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    tok = processor.tokenizer
    enc, fitted = _encode_fitting(processor, list(images), list(captions), question, pad_to)
    truncations = truncations if truncations is not None else TruncationLog()
    for r, (before, after) in enumerate(zip(captions, fitted)):
        if after != before:
            truncations.add(names[r] if names is not None else prompt_name(before),
                            len(tok(before, add_special_tokens=False)["input_ids"]),
                            len(tok(after, add_special_tokens=False)["input_ids"]),
                            f"the fixed prompt length {pad_to} (max_prompt_tokens)")
    captions = fitted
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    loss_mask = _answer_mask(tok, ids, captions)
    length = ids.shape[1] if pad_to is None else pad_to
    padded = left_pad(ids, mask, length, processor.tokenizer.pad_token_id)
    loss_mask = np.pad(loss_mask, ((0, 0), (length - ids.shape[1], 0)))
    grid = tuple(tuple(int(v) for v in g) for g in enc["image_grid_thw"])
    if len(set(grid)) != 1:
        raise ValueError(f"the images of one caption batch must share one size, got grids {grid}")
    pos, _ = get_rope_index(mllm_config, padded["input_ids"], grid, padded["attention_mask"])
    pixel_values = np.asarray(enc["pixel_values"], np.float32)
    batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
             "position_ids": np.asarray(pos, np.int32),
             "loss_mask": loss_mask.astype(np.float32),
             "pixel_values": pixel_values.reshape(len(captions), -1, pixel_values.shape[-1])}
    return batch, grid


def _encode_fitting(processor, images: list, captions: list[str], question: str,
                    pad_to: int | None) -> tuple[dict, list[str]]:
    """The processor's left-padded batch of chats (question, image -> caption), with each caption
    too long for `pad_to` tokens cut to its longest beginning that fits; and the captions as
    encoded (cut or not)."""
    prompt = processor.apply_chat_template(chat_messages(question, 1), add_generation_prompt=True)
    tok = processor.tokenizer
    caption_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in captions]
    for _ in range(8):  # decoding then re-tokenizing may shift a token; converges in 1-2 rounds
        texts = [prompt + caption + END_OF_TURN for caption in captions]
        enc = processor(text=texts, images=images, padding=True, padding_side="left",
                        return_tensors="np")
        lengths = np.asarray(enc["attention_mask"]).sum(axis=1)
        over = [] if pad_to is None else [r for r, n in enumerate(lengths) if n > pad_to]
        if not over:
            break
        captions = list(captions)
        for r in over:
            kept = len(tok(captions[r], add_special_tokens=False)["input_ids"])
            budget = kept - int(lengths[r] - pad_to)
            if budget < 1:
                raise UserError(f"max_prompt_tokens={pad_to} leaves no room for a caption: "
                                 f"the prompt without one is {int(lengths[r]) - kept} tokens")
            captions[r] = tok.decode(caption_ids[r][:budget])
    return enc, captions


def _answer_mask(tokenizer, ids: np.ndarray, captions: list[str]) -> np.ndarray:
    """1 on each row's answer tokens (the caption and the end of the turn, the last tokens of the
    left-padded row), 0 elsewhere."""
    loss_mask = np.zeros_like(ids)
    for row, caption in enumerate(captions):
        answer = tokenizer(caption + END_OF_TURN, add_special_tokens=False)["input_ids"]
        if list(ids[row, ids.shape[1] - len(answer):]) != list(answer):
            # The answer did not tokenize on its own as inside the chat: the labels would be off.
            raise ValueError(f"{prompt_name(caption)} does not tokenize the same inside the "
                             "chat")
        loss_mask[row, ids.shape[1] - len(answer):] = 1
    return loss_mask


def caption_loss(mllm, mllm_params, batch) -> jax.Array:
    """Mean next-token NLL over `loss_mask` (fp32). `batch` as `build_caption_inputs`, with
    position_ids (3, B, T), pixel_values (B, patches per row, dim) and image_grid_thw the grid of
    one row (the vision tower runs per row)."""
    out = mllm.apply({"params": mllm_params}, batch["input_ids"], batch["attention_mask"],
                     batch["position_ids"], pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"])
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
