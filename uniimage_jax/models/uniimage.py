"""TBAC-UniImage: frozen Qwen2.5-VL + metaqueries + shared connector + ladder SANA + autoencoder.

The model is a composition of four Flax modules over one parameter dict

    params = {"mllm": ..., "metaquery": {"embedding": (N, D)}, "connector": ...,
              "dit": ..., "vae": ...}

(+ "extra_embedding_rows" (2, D) when converted from the official checkpoint: the official code
resizes the embedding table by N + 2 rows and never uses the last two; we keep them only so an
export reproduces the checkpoint exactly). The metaquery embeddings are their own parameter: the
frozen MLLM table is never touched, and freezing is a matter of which top-level keys train.

Conditioning (official `encode_condition`): the prompt ends in
`<|vision_start|><|img0|>..<|img{N-1}|><|vision_end|><|im_end|>`; with left padding the N query
positions are the same in every row, `T-N-2 .. T-3`. The MLLM runs over the prompt; the hidden
states of the query positions are taken from the layers chosen by `ladder_indices` (HF meaning:
0 = embeddings, k = output of decoder layer k-1, L = final-normed), passed through the connector,
and block j of SANA cross-attends to entry j.

Two equivalent conditioning paths:
* `condition(..., split_prompt=False)`: one forward pass over the whole sequence (the official
  way; a backward pass then runs over every prompt position).
* `condition(..., split_prompt=True)` (default in training): the prompt before the queries runs
  once under `stop_gradient` and fills a KV cache; only the N query positions are then computed
  (and differentiated) against that cache. Under the causal mask the prompt does not depend on
  the trainable query embeddings, so losses and gradients are the same, at a fraction of the
  backward cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.models import lora
from uniimage_jax.models.connector import Connector
from uniimage_jax.models.dc_ae import AutoencoderDC, DCAEConfig
from uniimage_jax.models.ladder import ladder_indices
from uniimage_jax.models.pixel_ae import PixelAEConfig, PixelAutoencoder
from uniimage_jax.models.qwen2_5_vl import (Qwen2_5_VLConfig, Qwen2_5_VLDecoderLayer,
                                            Qwen2_5_VLForConditionalGeneration,
                                            decoder_layer_params, get_rope_index,
                                            hidden_states, init_kv_cache, keep_layers,
                                            mrope_cos_sin,
                                            init_params as init_mllm_params,
                                            num_decoder_layers)
from uniimage_jax.models.sana import SanaConfig, SanaTransformer2DModel
from uniimage_jax.processing.prompts import DEFAULT_SYSTEM_PROMPT, MAX_CAPTION_TOKENS
from uniimage_jax.diffusion import flow_matching

# Tokens after the metaquery block: <|vision_end|><|im_end|>.
_SUFFIX_AFTER_QUERIES = 2


def vae_config_from_dict(d: dict) -> DCAEConfig | PixelAEConfig:
    return PixelAEConfig.from_dict(d) if d.get("type") == "pixel" else DCAEConfig.from_dict(d)


@dataclasses.dataclass(frozen=True)
class UniImageConfig:
    """The whole model. Validated on construction (ladder vs depths, widths, latent channels)."""

    mllm: Qwen2_5_VLConfig
    dit: SanaConfig
    vae: DCAEConfig | PixelAEConfig
    num_metaqueries: int = 64
    ladder: str | tuple[int, ...] = "official"
    image_size: int = 512
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_caption_tokens: int = MAX_CAPTION_TOKENS
    extra_embedding_rows: int = 2
    lora: lora.LoraConfig | None = None   # adapters on the DiT / MLLM (models/lora.py)

    def __post_init__(self):
        if not isinstance(self.ladder, str):
            object.__setattr__(self, "ladder", tuple(int(i) for i in self.ladder))
        ladder_indices(self.ladder, self.mllm.num_hidden_layers, self.dit.num_layers)
        if self.num_metaqueries < 1:
            raise ValueError(f"num_metaqueries must be >= 1, got {self.num_metaqueries}")
        latent_channels = self.vae.latent_channels
        if self.dit.in_channels != latent_channels:
            raise ValueError(f"dit.in_channels={self.dit.in_channels} but the autoencoder makes "
                             f"{latent_channels}-channel latents")
        if self.image_size % self.vae_downsample:
            raise ValueError(f"image_size={self.image_size} is not a multiple of the autoencoder's "
                             f"downsampling factor {self.vae_downsample}")

    @property
    def ladder_indices(self) -> tuple[int, ...]:
        return ladder_indices(self.ladder, self.mllm.num_hidden_layers, self.dit.num_layers)

    @property
    def conditioning_depth(self) -> int:
        """MLLM decoder layers the conditioning needs: hidden state k is the output of layer
        k-1, so the deepest index the ladder reads is the number of layers to run (all of them,
        and the final norm, when it reads the final-normed state L)."""
        return max(1, *self.ladder_indices)

    @property
    def vae_downsample(self) -> int:
        if isinstance(self.vae, PixelAEConfig):
            return self.vae.patch_size
        return self.vae.spatial_compression_ratio

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (autoencoder downsampling x DiT patch): any such
        (height, width) works, since SANA has no positional embedding and both autoencoders are
        convolutional, so aspect buckets and non-square sampling only change the shapes."""
        return self.vae_downsample * self.dit.patch_size

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_downsample

    @property
    def metaquery_token_ids(self) -> tuple[int, ...]:
        v = self.mllm.vocab_size
        return tuple(range(v, v + self.num_metaqueries))

    def to_dict(self) -> dict:
        return {"mllm": self.mllm.to_dict(), "dit": self.dit.to_dict(),
                "vae": self.vae.to_dict(), "num_metaqueries": self.num_metaqueries,
                "ladder": self.ladder if isinstance(self.ladder, str) else list(self.ladder),
                "image_size": self.image_size, "system_prompt": self.system_prompt,
                "max_caption_tokens": self.max_caption_tokens,
                "extra_embedding_rows": self.extra_embedding_rows,
                **({"lora": self.lora.to_dict()} if self.lora is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "UniImageConfig":
        d = dict(d)
        adapters = d.pop("lora", None)
        return cls(mllm=Qwen2_5_VLConfig.from_dict(d.pop("mllm")),
                   lora=lora.LoraConfig.from_dict(adapters) if adapters else None,
                   dit=SanaConfig.from_dict(d.pop("dit")),
                   vae=vae_config_from_dict(d.pop("vae")), **d)


class UniImage:
    """Pure functions over the parameter dict; see the module docstring."""

    def __init__(self, config: UniImageConfig, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.mllm = Qwen2_5_VLForConditionalGeneration(config.mllm, dtype=dtype)
        self.connector = Connector(config.dit.caption_channels, dtype=dtype)
        self.dit = SanaTransformer2DModel(config.dit, dtype=dtype)
        self.vae = (PixelAutoencoder(config.vae, dtype=dtype)
                    if isinstance(config.vae, PixelAEConfig) else AutoencoderDC(config.vae, dtype=dtype))

    # ------------------------------------------------------------------------------- init
    def init_boxed(self, rng: jax.Array) -> dict[str, Any]:
        """Random parameters for every part (fp32), with their logical-axis boxes."""
        c = self.config
        k = jax.random.split(rng, 5)
        d = c.mllm.hidden_size
        ls = c.latent_size
        mllm = init_mllm_params(c.mllm, k[0])
        metaquery = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))(
            k[1], (c.num_metaqueries, d), jnp.float32)
        connector = self.connector.init(k[2], jnp.zeros((1, 1, d)))["params"]
        dit = self.dit.init(k[3], jnp.zeros((1, ls, ls, c.dit.in_channels)), jnp.zeros((1,)),
                            jnp.zeros((c.dit.num_layers, 1, 2, c.dit.caption_channels)),
                            jnp.ones((1, 2), jnp.int32))["params"]
        params = {"mllm": mllm, "metaquery": {"embedding": metaquery}, "connector": connector,
                  "dit": dit, "vae": self.init_autoencoder(rng)}
        if c.extra_embedding_rows:
            params["extra_embedding_rows"] = nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, "embed"))(
                k[1], (c.extra_embedding_rows, d), jnp.float32)
        if c.lora is not None:
            params = lora.join(params, self.init_adapters(params, rng))
        return params

    def init_adapters(self, params, rng: jax.Array) -> dict[str, Any]:
        """Fresh LoRA adapters (B = 0) for `params` (base parameters, boxed, abstract or not)."""
        return lora.init_adapters(params, self.config.lora, jax.random.fold_in(rng, 5))

    def init_autoencoder(self, rng: jax.Array) -> dict[str, Any]:
        """The autoencoder's part of `init_boxed(rng)` alone (a latent cache of the tiny preset
        encodes with it without initialising the rest)."""
        k = jax.random.split(rng, 5)[4]
        size = self.config.image_size
        return self.vae.init(k, jnp.zeros((1, size, size, 3))).get("params", {})

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """Random parameters for every part (fp32), unboxed."""
        return nn.meta.unbox(self.init_boxed(rng))

    # ------------------------------------------------------------------------ conditioning
    def embed(self, params, input_ids):
        """Token embeddings with the metaquery ids looked up in their own table."""
        table = params["mllm"]["model"]["language_model"]["embed_tokens"]["embedding"]
        queries = params["metaquery"]["embedding"]
        v = self.config.mllm.vocab_size
        is_query = input_ids >= v
        base = jnp.take(table, jnp.where(is_query, 0, input_ids), axis=0)
        q = jnp.take(queries, jnp.clip(input_ids - v, 0, queries.shape[0] - 1), axis=0)
        return jnp.where(is_query[..., None], q, base).astype(self.dtype)

    def ladder_features(self, params, batch, *, split_prompt: bool = True, rngs=None):
        """(n_dit, B, N, D_mllm): the selected hidden states at the N query positions, and the
        attention mask of those positions (B, N). `rngs`: e.g. the LoRA dropout stream."""
        with lora.adapters(self.config.lora):
            return self._ladder_features(params, batch, split_prompt, rngs or {})

    def _ladder_features(self, params, batch, split_prompt, rngs):
        c = self.config
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        b, t = input_ids.shape
        n = c.num_metaqueries
        q0 = t - n - _SUFFIX_AFTER_QUERIES  # first query position (left padding: same every row)
        if not split_prompt:
            mllm_params = params["mllm"]
            mllm, final_norm = self._conditioning_mllm(mllm_params)
            hidden = hidden_states(mllm, mllm_params, input_ids, mask, batch["position_ids"],
                                   inputs_embeds=self.embed(params, input_ids), rngs=rngs,
                                   final_norm=final_norm, **_images(batch))
            hidden = hidden[:, :, q0:q0 + n]
        else:
            hidden = self._query_hidden(params, batch, self._prompt_cache(params, batch, rngs),
                                        rngs)
        return hidden[np.asarray(c.ladder_indices)], mask[:, q0:q0 + n]

    def prompt_cache(self, params, batch, rngs=None):
        """The split-prompt path's first half: the prompt before the metaqueries, forward only,
        as the MLLM's KV cache (layers, B, T - 2, kv heads, head dim), the query slots empty."""
        with lora.adapters(self.config.lora):
            return self._prompt_cache(params, batch, rngs or {})

    def query_features(self, params, batch, cache, rngs=None):
        """The split-prompt path's second half: the metaqueries against `cache`, their ladder
        hidden states (n_dit, B, N, D_mllm)."""
        with lora.adapters(self.config.lora):
            hidden = self._query_hidden(params, batch, cache, rngs or {})
        return hidden[np.asarray(self.config.ladder_indices)]

    def _prompt_cache(self, params, batch, rngs):
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        b, t = input_ids.shape
        n = self.config.num_metaqueries
        q0 = t - n - _SUFFIX_AFTER_QUERIES
        mllm_params = jax.lax.stop_gradient(params["mllm"])
        depth = num_decoder_layers(mllm_params)
        prefix_ids = input_ids[:, :q0]
        positions = batch["position_ids"][:, :, :q0]
        embeds = jax.lax.stop_gradient(self.embed(params, prefix_ids))

        def run_layers(count, final_norm=True):
            """The prompt through the first `count` decoder layers, writing their cache."""
            mllm = self._mllm_of_depth(count)
            return mllm.apply(
                {"params": keep_layers(mllm_params, count)}, prefix_ids, mask[:, :q0 + n],
                positions, inputs_embeds=embeds,
                kv_cache=init_kv_cache(mllm.config, b, q0 + n, self.dtype), cache_index=0,
                compute_logits=False, final_norm=final_norm, rngs=rngs, **_images(batch))

        if depth < 2:
            return jax.lax.stop_gradient(run_layers(depth).kv_cache)
        # The top layer's keys and values are all the cache needs of it: the layers below run
        # whole, the top one only to its key/value projections. (A scanned stack would run the
        # top layer's attention and MLP for an output nobody reads.)
        below = run_layers(depth - 1, final_norm=False)
        config = self.config.mllm
        cos, sin = mrope_cos_sin(config, positions, self.dtype)
        empty = jnp.zeros_like(below.kv_cache["k"][0])
        _, (k, v) = Qwen2_5_VLDecoderLayer(config, self.dtype).apply(
            {"params": decoder_layer_params(mllm_params, depth - 1)},
            below.last_hidden_state, None, cos, sin, (empty, empty), 0, kv_only=True, rngs=rngs)
        cache = {"k": jnp.concatenate([below.kv_cache["k"], k[None]]),
                 "v": jnp.concatenate([below.kv_cache["v"], v[None]])}
        return jax.lax.stop_gradient(cache)

    def _query_hidden(self, params, batch, cache, rngs):
        """All hidden states (depth + 1, B, N, D) of the N queries (differentiated) attending to
        the cached prompt."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        t = input_ids.shape[1]
        n = self.config.num_metaqueries
        q0 = t - n - _SUFFIX_AFTER_QUERIES
        mllm_params = params["mllm"]
        mllm, final_norm = self._conditioning_mllm(mllm_params)
        query_ids = input_ids[:, q0:q0 + n]
        return hidden_states(mllm, mllm_params, query_ids, mask[:, :q0 + n],
                             batch["position_ids"][:, :, q0:q0 + n],
                             inputs_embeds=self.embed(params, query_ids), kv_cache=cache,
                             cache_index=q0, rngs=rngs, final_norm=final_norm)

    def _conditioning_mllm(self, mllm_params):
        """(module, final_norm): the MLLM as deep as `mllm_params` (all its layers, or the first
        `config.conditioning_depth` of them when the layers above were left out), and whether
        its last hidden state is the final-normed one (only at full depth)."""
        depth = num_decoder_layers(mllm_params)
        full = self.config.mllm.num_hidden_layers
        if depth == full:
            return self.mllm, True
        if depth < self.config.conditioning_depth:
            raise ValueError(f"the MLLM parameters hold {depth} decoder layers but the ladder "
                             f"reads hidden state {self.config.conditioning_depth}")
        return self._mllm_of_depth(depth), False

    def _mllm_of_depth(self, depth: int):
        """The MLLM module cut to its first `depth` decoder layers."""
        config = dataclasses.replace(self.config.mllm, num_hidden_layers=depth)
        return Qwen2_5_VLForConditionalGeneration(config, dtype=self.dtype)

    def condition(self, params, batch, *, split_prompt: bool = True, rngs=None):
        """(ladder context (n_dit, B, N, caption_channels), context mask (B, N))."""
        feats, mask = self.ladder_features(params, batch, split_prompt=split_prompt, rngs=rngs)
        ctx = self.connector.apply({"params": params["connector"]}, feats)
        return ctx, mask

    # ----------------------------------------------------------------------- generation
    def precompute_context(self, params, context, context_mask):
        """The DiT's `CrossAttentionContext` of G ladder contexts (n_dit, G, N, C) and their mask
        (G, N): what a denoising step needs of them, computed once per sampling call."""
        with lora.adapters(self.config.lora):
            return self.dit.apply({"params": params["dit"]}, context, context_mask,
                                  method=self.dit.precompute_context)

    def velocity(self, params, latents, timesteps, context, context_mask=None, rngs=None):
        """SANA's flow prediction for NHWC latents; timesteps (B,) in 0..1000; context: ladder
        contexts and their mask, or a `precompute_context` result (mask None)."""
        with lora.adapters(self.config.lora):
            return self.dit.apply({"params": params["dit"]}, latents, timesteps, context,
                                  context_mask, rngs=rngs or {})

    def encode_images(self, params, images):
        """NHWC images in [-1, 1] -> scaled latents (frozen autoencoder)."""
        return self.vae.apply({"params": params.get("vae", {})}, images, method="encode")

    def decode_latents(self, params, latents):
        return self.vae.apply({"params": params.get("vae", {})}, latents, method="decode")

    def loss(self, params, batch, rng, *, latents=None, split_prompt: bool = True,
             timestep_sampling: str = "uniform"):
        """The official flow-matching loss with noise and timesteps drawn from `rng`.
        `batch["target"]`: NHWC images in [-1, 1] (or pass `latents`). Returns (loss, aux)."""
        if latents is None:
            latents = self.encode_images(params, batch["target"])
        rngs = None
        if self.config.lora is not None and self.config.lora.dropout:
            rngs = {lora.DROPOUT_RNG: jax.random.fold_in(rng, 2)}
        return flow_matching.training_loss(self._velocity_fn(params, batch, split_prompt, rngs),
                                           latents, rng, scheme=timestep_sampling)

    def loss_given_noise(self, params, batch, latents, noise, timesteps, sigmas, *,
                         split_prompt: bool = True, rngs=None):
        """The loss for given latents, noise, timesteps (B,) and sigmas (B,); `rngs`: the LoRA
        dropout stream (training only)."""
        return flow_matching.loss_given_noise(self._velocity_fn(params, batch, split_prompt, rngs),
                                              latents, noise, timesteps, sigmas)

    def _velocity_fn(self, params, batch, split_prompt: bool, rngs):
        """SANA's velocity as a function of (x_t, timesteps), conditioned on the batch's prompts
        (what the flow-matching loss differentiates)."""
        def predict(noisy, timesteps):
            ctx, mask = self.condition(params, batch, split_prompt=split_prompt, rngs=rngs)
            return self.velocity(params, noisy, timesteps, ctx, mask, rngs=rngs)
        return predict


def _images(batch) -> dict:
    return {"pixel_values": batch.get("pixel_values"),
            "image_grid_thw": batch.get("image_grid_thw")}


# The batch axis of each model input where it does not lead: M-RoPE positions are (3, B, T), the
# layout of every Qwen2.5-VL function, and batches carry them so from the host to the model.
INPUT_BATCH_AXES = {"position_ids": 1}


def rope_positions(config: UniImageConfig, input_ids, attention_mask, image_grid_thw=None):
    """Host-side M-RoPE positions (3, B, T) for a batch (HF get_rope_index)."""
    pos, _ = get_rope_index(config.mllm, np.asarray(input_ids), image_grid_thw,
                            np.asarray(attention_mask))
    return pos
