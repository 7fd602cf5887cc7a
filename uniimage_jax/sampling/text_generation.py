"""Text generation (image understanding) with Qwen2.5-VL: one jit-compiled prefill + decode loop.

`generate_tokens` compiles a single function per (model, prompt length, image sizes, max_new_tokens,
greedy/sampling): the left-padded prompt is run once through the model into a fixed-size KV cache
(prompt length + max_new_tokens slots), then a `lax.while_loop` feeds one token per iteration
until every row has produced an end-of-sequence token or `max_new_tokens` are out. Temperature
and top-p are traced values, so changing them does not recompile.

Semantics follow `transformers` `generate` for Qwen2.5-VL:
* M-RoPE positions of the prompt come from `get_rope_index`; the token generated at step i
  gets position (prompt's largest position + 1 + i) on all three rotary rows, which is HF's
  "cache position + rope delta" for left-padded prompts (HF increments each row's last position).
* Greedy decoding takes the arg-max of the fp32 logits; sampling divides the logits by the
  temperature, keeps the smallest set of most likely tokens whose probability reaches top_p (HF's
  `TopPLogitsWarper`, always at least one token) and draws from a PRNG key folded with the step.
* A row that produced an EOS token (any of `eos_token_ids`) is finished: its later tokens are
  `pad_token_id`.

Our own code (no JAX library generates with Qwen2.5-VL's M-RoPE and vision inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.errors import ConfigError
from uniimage_jax.models.qwen2_5_vl import get_rope_index, init_kv_cache


def _check_left_padded(attention_mask: np.ndarray) -> None:
    """Generation appends at the right end: every row must be 0...0 1...1 and non-empty."""
    m = attention_mask.astype(bool)
    for r, row in enumerate(m):
        if not row.any():
            raise ValueError(f"row {r} of the prompt is empty (attention_mask is all zero)")
        first = int(np.argmax(row))
        if not row[first:].all():
            raise ValueError(f"row {r} of the prompt is not left-padded (attention_mask has a 0 "
                             "after a 1); encode prompts with padding_side='left'")


def _logits_from_hidden(module, hidden):
    """The model's output head applied to final-normed hidden states (tied or separate)."""
    if module.config.tie_word_embeddings:
        return module.model.language_model.attend_logits(hidden).astype(jnp.float32)
    return module.lm_head(hidden).astype(jnp.float32)


def _top_p_filter(logits, top_p):
    """Mask (to -inf) the tokens outside the nucleus of probability `top_p` (HF TopPLogitsWarper:
    drop the least likely tokens whose cumulative probability stays <= 1 - top_p, keep >= 1)."""
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= 1.0 - top_p
    remove_sorted = remove_sorted.at[..., -1].set(False)  # always keep the most likely token
    # threshold: the smallest kept logit per row; ties at the threshold are kept.
    kept = jnp.where(remove_sorted, jnp.inf, sorted_logits)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _next_token(logits, row_keys, step, temperature, top_p, sample: bool):
    """(B, V) fp32 logits -> (B,) int32 token ids; row r samples with fold_in(row_keys[r], step),
    so a row's tokens never depend on the rows beside it."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    logits = _top_p_filter(logits, top_p)
    draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row))
    return draw(row_keys, logits).astype(jnp.int32)


def token_loop(params, input_ids, attention_mask, position_ids, next_position, pixel_values,
               row_keys, temperature, top_p, eos_ids, pad_id, *, model, max_new_tokens: int,
               image_grid_thw, sample: bool, cache_dtype):
    """Prefill and decode loop of B left-padded rows (`generate_tokens`' compiled body; also
    compiled with one share of rows per device by `mesh_token_loop`)."""
    b, t = input_ids.shape
    variables = {"params": params}
    cache = init_kv_cache(model.config, b, t + max_new_tokens, cache_dtype)
    # Cache slots: the prompt's own mask, then generated tokens (always attended; a finished row
    # keeps computing on pad tokens, which only ever affect its own discarded outputs).
    cache_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)

    # The prefill's cache offset is a Python int: its queries then attend in causal blocks, each
    # over the keys up to its last query, never over the generated tokens' empty slots.
    prefill = model.apply(variables, input_ids, cache_mask, position_ids,
                          pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                          kv_cache=cache, cache_index=0, compute_logits=False)
    logits = model.apply(variables, prefill.last_hidden_state[:, -1:], method=_logits_from_hidden)
    first = _next_token(logits[:, 0], row_keys, 0, temperature, top_p, sample)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, last, done, tokens = state
        pos = jnp.broadcast_to((next_position + i - 1)[None, :, None], (3, b, 1))
        out = model.apply(variables, last[:, None], cache_mask, pos, kv_cache=cache,
                          cache_index=(t + i - 1).astype(jnp.int32))
        new = _next_token(out.logits[:, -1], row_keys, i, temperature, top_p, sample)
        new = jnp.where(done, pad_id, new)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, i))
        return i + 1, out.kv_cache, new, done | jnp.isin(new, eos_ids), tokens

    state = (jnp.int32(1), prefill.kv_cache, first, done, tokens)
    return jax.lax.while_loop(cond, body, state)[4]


LOOP_STATIC = ("model", "max_new_tokens", "image_grid_thw", "sample", "cache_dtype")
_token_loop = jax.jit(token_loop, static_argnames=LOOP_STATIC)


def mesh_token_loop(layout, **static):
    """`token_loop` over a `mesh_sampler.DeviceLayout` with replicated weights: every device
    runs the single-device loop on its own share of the rows (their `image_grid_thw` is the
    static grids of one device's rows). Arguments as `token_loop`'s, every row-indexed one
    split over the devices (position_ids along its axis 1)."""
    from uniimage_jax.sampling.mesh_sampler import compile_over

    return compile_over(token_loop, layout, (0, 0, 1, 0, 0, 0, None, None, None, None), 0,
                        **static)


def row_keys_of(rng, rows: int):
    """Per-row keys: `rng` (one key, row r gets fold_in(rng, r)) or already (rows, 2)."""
    rng = jnp.asarray(rng)
    if rng.ndim == 2:
        if rng.shape[0] != rows:
            raise ValueError(f"{rng.shape[0]} row keys for {rows} rows")
        return rng
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(rows))


def prepare_inputs(model, inputs: dict[str, Any]) -> dict[str, Any]:
    """The host arrays of `token_loop` for `encode_chat` output (checked): input_ids,
    attention_mask, position_ids (3, B, T), next_position (B,), pixel_values or None, and the
    static image_grid_thw."""
    input_ids = np.asarray(inputs["input_ids"], np.int32)
    attention_mask = np.asarray(inputs.get("attention_mask", np.ones_like(input_ids)), np.int32)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                          "must both be (batch, prompt_length)")
    _check_left_padded(attention_mask)
    pixel_values = inputs.get("pixel_values")
    grid = inputs.get("image_grid_thw")
    if (pixel_values is None) != (grid is None):
        raise ValueError("pass both pixel_values and image_grid_thw, or neither")
    if grid is not None:
        grid = tuple(tuple(int(v) for v in g) for g in np.asarray(grid).reshape(-1, 3))
        pixel_values = np.asarray(pixel_values, np.float32)
    position_ids, _ = get_rope_index(model.config, input_ids, grid, attention_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": np.asarray(position_ids, np.int32),
            "next_position": position_ids.max(axis=(0, 2)).astype(np.int32) + 1,
            "pixel_values": pixel_values, "image_grid_thw": grid}


def generate_tokens(model, params, inputs: dict[str, Any], *, max_new_tokens: int,
             eos_token_ids: int | Sequence[int], pad_token_id: int, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, cache_dtype=None) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens after each (left-padded) prompt.

    model: a `Qwen2_5_VLForConditionalGeneration`; params: its "params" collection.
    inputs: `encode_chat` output (input_ids, attention_mask, optionally pixel_values and
      image_grid_thw as a tuple of (t, h, w) tuples).
    temperature: 0 for greedy decoding, > 0 to sample (then `rng` is required: one key, row r
      drawing from fold_in(rng, r), or one key per row).
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    Returns (B, max_new_tokens) int32 numpy: generated ids, `pad_token_id` after a row's EOS.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails >= 0
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    sample = temperature > 0
    if sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass rng=jax.random.key(s)")
    if rng is None:
        rng = jax.random.PRNGKey(0)  # unused by greedy decoding
    eos = np.atleast_1d(np.asarray(eos_token_ids, np.int32))
    if eos.size == 0:
        raise ValueError("eos_token_ids is empty")
    x = prepare_inputs(model, inputs)
    tokens = _token_loop(
        params, jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"]),
        jnp.asarray(x["position_ids"]), jnp.asarray(x["next_position"]),
        None if x["pixel_values"] is None else jnp.asarray(x["pixel_values"]),
        row_keys_of(rng, x["input_ids"].shape[0]), jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p), jnp.asarray(eos), jnp.int32(pad_token_id), model=model,
        max_new_tokens=int(max_new_tokens), image_grid_thw=x["image_grid_thw"], sample=sample,
        cache_dtype=jnp.dtype(cache_dtype or model.dtype).name)
    return np.asarray(tokens)


def default_eos_token_ids(tokenizer) -> list[int]:
    """Qwen2.5-VL-Instruct stops at `<|im_end|>` or `<|endoftext|>` (its generation_config)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no <|im_end|>, <|endoftext|> or eos token")
    return ids


def answer(model, params, processor, images: Sequence[Sequence[Any] | None] | None,
           questions: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_p: float = 1.0, rng: jax.Array | None = None,
           eos_token_ids: Sequence[int] | None = None,
           histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[str]:
    """Answer each question about its images (a list of PIL images per question, or None).

    The chat prompt is built by `encode_chat` (images, then the question, generation prompt;
    after the earlier (question, answer) turns of `histories`, one per question, if given);
    the answer is decoded without special tokens.
    """
    from uniimage_jax.processing.qwen import encode_chat

    tok = processor.tokenizer
    inputs = encode_chat(processor, questions, images, padding_side="left", histories=histories)
    eos = list(eos_token_ids) if eos_token_ids is not None else default_eos_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    ids = generate_tokens(model, params, inputs, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                   pad_token_id=pad, temperature=temperature, top_p=top_p, rng=rng)
    return decode_answers(tok, ids, eos)


def decode_answers(tokenizer, ids: np.ndarray, eos_token_ids: Sequence[int]) -> list[str]:
    """The text of each row of generated ids, up to its first EOS, without special tokens."""
    out = []
    for row in ids:
        stop = [j for j, v in enumerate(row) if v in eos_token_ids]
        row = row[: stop[0]] if stop else row
        out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return out
