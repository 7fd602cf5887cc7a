"""SANA diffusion transformer (diffusers `SanaTransformer2DModel`) in Flax, with ladder conditioning.

Our own port: no JAX implementation of SANA exists. It follows diffusers 0.42
`models/transformers/sana_transformer.py` and the pieces it uses (`SanaLinearAttnProcessor2_0`,
`SanaAttnProcessor2_0`, `GLUMBConv`, `AdaLayerNormSingle`, `PixArtAlphaTextProjection`, `RMSNorm`,
`PatchEmbed`), computation for computation, with two differences of layout:

* images are NHWC, and the tokens between blocks are kept as (B, H', W', D) so the FFN's convs
  need no reshuffling; attention flattens them row-major exactly like torch's `flatten(2)`;
* the cross-attention context may carry one entry per block (LADDER mode, TBAC-UniImage): block j
  cross-attends to entry j. `caption_projection` and `caption_norm` are shared and applied to
  every entry. A rank-3 context is the standard SANA behaviour (one context for every block).

Submodule names are the diffusers attribute names (`transformer_blocks_3/attn1/to_q`,
`attn2/to_out_0`, `time_embed/emb/timestep_embedder/linear_1`, `scale_shift_table`), so the
checkpoint converter (`uniimage_jax.convert.sana`) needs no key rewrites.

The module is longer than the project's usual ~450 lines on purpose: it mirrors one diffusers file
(plus the ladder and the per-call cross-attention context), so a reader can hold the two side by
side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.models import layers, param_tree, remat

# diffusers' additive bias for a padded cross-attention key (not -inf: fully padded rows stay finite).
MASK_BIAS = -10000.0
# `SanaLinearAttnProcessor2_0` divides by the normaliser row plus this constant.
LINEAR_ATTN_EPS = 1e-15


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


# Our fields that choose how the blocks run, not what they compute; diffusers has neither.
LAYOUT_FIELDS = ("scan_layers", "remat")


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """Hyper-parameters of `SanaTransformer2DModel`; field names and defaults are diffusers'.

    Options diffusers offers that this port does not implement are kept as fields (so a diffusers
    config round-trips) but any value other than the supported one is rejected, naming the field.
    `scan_layers` is ours: run the blocks under `nn.scan` (stacked parameters, flat compile time).
    """

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    # Stored by diffusers but not read by `SanaTransformer2DModel.forward` (pipelines scale the
    # timestep themselves); kept for round-tripping, it has no effect here either.
    timestep_scale: float = 1.0
    scan_layers: bool = False
    remat: str = "none"   # ours: remat policy of the blocks by name (models/remat.py)

    def __post_init__(self):
        unsupported = {
            "interpolation_scale": (self.interpolation_scale is None,
                                    "sin-cos positional embeddings are not implemented (SANA 512/1024 "
                                    "use none); expected null"),
            "guidance_embeds": (not self.guidance_embeds,
                                "guidance-distilled time embedding (SANA-Sprint) is not implemented"),
            "qk_norm": (self.qk_norm is None, "q/k normalisation (SANA 1.5/Sprint) is not implemented"),
            "dropout": (self.dropout == 0.0, "dropout is not implemented; expected 0.0"),
            "cross_attention_dim": (self.cross_attention_dim is not None,
                                    "blocks without cross-attention are not implemented"),
        }
        object.__setattr__(self, "remat", remat.policy_name(self.remat, "SanaConfig.remat"))
        for name, (ok, why) in unsupported.items():
            if not ok:
                raise ValueError(f"SanaConfig.{name}={getattr(self, name)!r}: {why}")
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(
                f"SanaConfig.cross_attention_dim={self.cross_attention_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim}: the context is "
                "projected to the model width by caption_projection before cross-attention")
        if self.num_cross_attention_heads is None or self.cross_attention_head_dim is None:
            raise ValueError("SanaConfig.num_cross_attention_heads and cross_attention_head_dim "
                             "must be set")
        for name in ("in_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                     "caption_channels", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SanaConfig.{name}={getattr(self, name)!r} must be >= 1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        """diffusers: `out_channels or in_channels`."""
        return self.out_channels or self.in_channels

    @property
    def ffn_hidden(self) -> int:
        """GLUMBConv hidden width: `int(expand_ratio * in_channels)` as diffusers computes it."""
        return int(self.mlp_ratio * self.inner_dim)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], **overrides) -> "SanaConfig":
        """From a diffusers `transformer/config.json` dict. Keys starting with `_` (class name,
        versions) are metadata; any other unknown key is rejected, naming it."""
        cls_name = d.get("_class_name", "SanaTransformer2DModel")
        if cls_name != "SanaTransformer2DModel":
            raise ValueError(f"config _class_name={cls_name!r}: expected 'SanaTransformer2DModel'")
        known = {f.name for f in dataclasses.fields(cls)} - set(LAYOUT_FIELDS)
        values = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"diffusers SANA config has fields this port does not know: {unknown}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_diffusers(self) -> dict[str, Any]:
        """The `SanaTransformer2DModel` keyword arguments: our layout options left out."""
        return {k: v for k, v in self.to_dict().items() if k not in LAYOUT_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SanaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SanaConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def sana_1600m_512(cls, **overrides) -> "SanaConfig":
        """Sana_1600M_512px (Efficient-Large-Model/Sana_1600M_512px_diffusers, transformer/)."""
        return cls(**{**dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
            num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
            cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, dropout=0.0,
            attention_bias=False, sample_size=16, patch_size=1, norm_elementwise_affine=False,
            norm_eps=1e-6, interpolation_scale=None), **overrides})


# ----------------------------------------------------------------------------------------------
# Embeddings and norms
# ----------------------------------------------------------------------------------------------


def timestep_sinusoid(timesteps: jax.Array, dim: int = 256, max_period: float = 10000.0):
    """diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
    [cos, sin] of t * exp(-log(max_period) * i / (dim/2)), in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding`, act 'silu')."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.features, (None, "mlp"), dtype=self.dtype, name="linear_1")(x)
        x = nn.silu(x)
        return layers.dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(x)


class PixArtAlphaCombinedTimestepSizeEmbeddings(nn.Module):
    """Timestep sinusoid (256) -> `timestep_embedder` (no size conditions, as in SANA)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep):
        proj = timestep_sinusoid(timestep, 256).astype(self.dtype)
        return TimestepEmbedding(self.features, self.dtype, name="timestep_embedder")(proj)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single: returns (SiLU -> Linear to 6*D block modulation, the D-wide embedding)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep):
        embedded = PixArtAlphaCombinedTimestepSizeEmbeddings(self.features, self.dtype,
                                                             name="emb")(timestep)
        modulation = layers.dense(6 * self.features, ("embed", "mlp"), dtype=self.dtype,
                                  name="linear")(nn.silu(embedded))
        return modulation, embedded


class PixArtAlphaTextProjection(nn.Module):
    """Caption projection: Linear -> GELU(tanh) -> Linear."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.features, (None, "mlp"), dtype=self.dtype, name="linear_1")(x)
        x = layers.gelu_tanh(x)
        return layers.dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(x)


class RMSNorm(nn.Module):
    """diffusers `RMSNorm` with an fp32 weight: statistics in fp32, x * rsqrt(mean(x^2) + eps) *
    weight (torch promotes the product to fp32), cast to the compute dtype."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps) * scale).astype(self.dtype)


def layer_norm(eps: float, affine: bool = False, dtype=jnp.float32, name: str | None = None):
    """torch `nn.LayerNorm(dim, elementwise_affine=affine, eps=eps)`: two-pass variance (the
    fast E[x^2]-E[x]^2 form loses precision on large activations), fp32 statistics."""
    init = nn.with_logical_partitioning
    return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, use_fast_variance=False,
                        dtype=dtype, param_dtype=jnp.float32,
                        scale_init=init(nn.initializers.ones_init(), ("norm",)),
                        bias_init=init(nn.initializers.zeros_init(), ("norm",)), name=name)


class PatchEmbed(nn.Module):
    """Conv(patch x patch, stride patch) to D, tokens kept as (B, H/p, W/p, D). SANA 512/1024 has
    no positional embedding (`interpolation_scale=None`), which the config enforces."""

    features: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        return nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                       param_dtype=jnp.float32,
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("embed",)),
                       name="proj")(x)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


class SanaLinearAttention(nn.Module):
    """Self-attention of SANA blocks, as diffusers `Attention` + `SanaLinearAttnProcessor2_0`.

    ReLU feature maps, no 1/sqrt(d) scale, no mask. Per head: out = (V' K^T) Q with V' = V plus a
    row of ones, then divided by the last row (sum_n relu(k_n) . relu(q)) + 1e-15. Activations
    can reach ~1e6, so the glue (ReLU output onward) is fp32 whatever the compute dtype, and the
    two small matmuls run at the highest precision.
    """

    heads: int
    head_dim: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, N, D)
        b, n, d = x.shape
        inner = self.heads * self.head_dim

        def proj(name):
            y = layers.dense(inner, ("embed", "heads"), use_bias=self.use_bias, dtype=self.dtype,
                             name=name)(x)
            return y.reshape(b, n, self.heads, self.head_dim)

        q = nn.relu(proj("to_q")).astype(jnp.float32)
        k = nn.relu(proj("to_k")).astype(jnp.float32)
        v = proj("to_v").astype(jnp.float32)
        v = jnp.concatenate([v, jnp.ones((b, n, self.heads, 1), jnp.float32)], axis=-1)
        hi = jax.lax.Precision.HIGHEST
        kv = jnp.einsum("bnhe,bnhd->bhed", v, k, precision=hi)  # (B, h, d+1, d)
        out = jnp.einsum("bhed,bnhd->bnhe", kv, q, precision=hi)  # (B, N, h, d+1)
        out = out[..., :-1] / (out[..., -1:] + LINEAR_ATTN_EPS)
        out = remat.tag_attention_output(out.reshape(b, n, inner).astype(self.dtype))
        return layers.dense(d, ("heads", "embed"), dtype=self.dtype, name="to_out_0")(out)


class SanaCrossAttention(nn.Module):
    """Cross-attention of SANA blocks (diffusers `Attention` + `SanaAttnProcessor2_0`): softmax
    attention with q/k/v/out biases, scale 1/sqrt(head_dim), additive key bias (G, T) from the
    mask. The softmax runs in fp32.

    `context` is the projected context (G, T, D) or its keys and values (each (G, T, heads,
    head_dim)) as this module returned them for `x=None`: the keys and values depend on the
    context only, so a sampler computes them once rather than at every denoising step. The
    queries x (B, N, D) may hold several rows per context (B a multiple of G): rows
    g * B/G .. (g+1) * B/G - 1 attend to context g, so samples that share a prompt share its
    keys and values without copies of them.
    """

    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, key_bias=None):
        inner = self.heads * self.head_dim

        def proj(name, y):
            y = layers.dense(inner, ("embed", "heads"), dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        if isinstance(context, tuple):
            k, v = context
        else:
            k, v = proj("to_k", context), proj("to_v", context)
        if x is None:
            return k, v
        b, n, d = x.shape
        g = k.shape[0]
        if b % g:
            raise ValueError(f"{b} query rows cannot be shared out over {g} contexts")
        q = proj("to_q", x).reshape(g, b // g * n, self.heads, self.head_dim)
        logits = jnp.einsum("gnhd,gthd->ghnt", q, k).astype(jnp.float32)
        logits = logits / math.sqrt(self.head_dim)
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :].astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("ghnt,gthd->gnhd", weights, v).reshape(b, n, inner)
        out = remat.tag_attention_output(out)
        return layers.dense(d, ("heads", "embed"), dtype=self.dtype, name="to_out_0")(out)


# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------


class DepthwiseConv3x3(nn.Module):
    """torch `Conv2d(C, C, 3, padding=1, groups=C)`: kernel (3, 3, 1, C) in the Flax grouped-conv
    layout, bias (C,); computed by `layers.depthwise_conv` (the form fastest on the platform)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C)
        c = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
            (None, None, None, "mlp")), (3, 3, 1, c), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("mlp",)), (c,), jnp.float32)
        out = layers.depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))
        return out + bias.astype(self.dtype)


class GLUMBConv(nn.Module):
    """SANA FFN: 1x1 conv to 2*hidden, SiLU, 3x3 depthwise conv, value * SiLU(gate), 1x1 conv
    without bias (no norm, no residual: the block adds its own)."""

    features: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, D)
        def conv1x1(features, axes, use_bias, name):
            return nn.Conv(features, (1, 1), use_bias=use_bias, dtype=self.dtype,
                           param_dtype=jnp.float32,
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.lecun_normal(), (None, None, *axes)),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                  (axes[-1],)),
                           name=name)

        x = conv1x1(2 * self.hidden, ("embed", "mlp"), True, "conv_inverted")(x)
        x = nn.silu(x)
        x = DepthwiseConv3x3(self.dtype, name="conv_depth")(x)
        value, gate = jnp.split(x, 2, axis=-1)
        x = value * nn.silu(gate)
        return conv1x1(self.features, ("mlp", "embed"), False, "conv_point")(x)


# ----------------------------------------------------------------------------------------------
# Blocks and model
# ----------------------------------------------------------------------------------------------


class SanaTransformerBlock(nn.Module):
    """One SANA block on tokens laid out (B, H', W', D).

    modulation (B, 6*D) + scale_shift_table (6, D) -> shift/scale/gate for self-attention, then
    shift/scale/gate for the FFN. Cross-attention has no pre-norm and no gate. `context` is the
    block's projected context or its cross-attention keys and values (`SanaCrossAttention`);
    with x=None the block returns those keys and values and computes nothing else.
    """

    config: SanaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, key_bias, modulation):
        cfg = self.config
        cross_attention = SanaCrossAttention(cfg.num_cross_attention_heads,
                                             cfg.cross_attention_head_dim, self.dtype,
                                             name="attn2")
        if x is None:
            return cross_attention(None, context)
        x = _rows_split_like_batch(x)
        b, h, w, d = x.shape
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(d),
            (None, "embed")), (6, d), jnp.float32)
        mod = table[None] + modulation.reshape(b, 6, d).astype(jnp.float32)
        mod = mod.astype(self.dtype)[:, :, None, None, :]  # broadcast over (H', W')
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, i] for i in range(6))

        y = layer_norm(cfg.norm_eps, dtype=self.dtype, name="norm1")(x)
        y = y * (1 + scale_msa) + shift_msa
        y = SanaLinearAttention(cfg.num_attention_heads, cfg.attention_head_dim,
                                cfg.attention_bias, self.dtype, name="attn1")(
            y.reshape(b, h * w, d))
        x = x + gate_msa * y.reshape(b, h, w, d)

        y = cross_attention(x.reshape(b, h * w, d), context, key_bias)
        x = x + y.reshape(b, h, w, d)

        y = layer_norm(cfg.norm_eps, cfg.norm_elementwise_affine, self.dtype, name="norm2")(x)
        y = y * (1 + scale_mlp) + shift_mlp
        y = GLUMBConv(d, cfg.ffn_hidden, self.dtype, name="ff")(y)
        return _rows_split_like_batch(x + gate_mlp * y)


def _rows_split_like_batch(x):
    """Keep a block's tokens split over the batch axes (a no-op without a mesh and axis rules).
    Under `nn.scan` with FSDP, XLA's sharding propagation otherwise follows the stacked weights
    (split along "embed") and keeps the activations of the whole global batch on every chip,
    so the temporaries grow with the number of FSDP shards."""
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


class _ScannedBlock(SanaTransformerBlock):
    """`nn.scan` body: (carry, per-layer input, shared input, modulation) -> (carry, output).

    Denoising: (x, this layer's keys and values, key bias, modulation) -> (x', None). Keys and
    values (carry None): (None, this layer's context or None, the context every layer shares or
    None, None) -> (None, this layer's keys and values). One body serves both because a scanned
    stack is one module: its parameters exist once, under one name."""

    @nn.compact
    def __call__(self, x, per_layer, shared, modulation):
        if x is None:
            return None, super().__call__(None, shared if per_layer is None else per_layer,
                                          None, None)
        return super().__call__(x, per_layer, shared, modulation), None


@flax.struct.dataclass
class CrossAttentionContext:
    """The DiT's conditioning prepared for denoising (`SanaTransformer2DModel.precompute_context`):
    every block's cross-attention keys and values, (num_layers, G, T, heads, head_dim) each, and
    the additive key bias (G, T) or None. It depends on the context only, not on the latents or
    the timestep, so a sampler computes it once per call instead of at every step."""

    keys: jax.Array
    values: jax.Array
    key_bias: jax.Array | None

    @property
    def num_contexts(self) -> int:
        return self.keys.shape[1]


class SanaTransformer2DModel(nn.Module):
    """SANA DiT. `__call__(hidden_states (B,H,W,C_in) NHWC, timestep (B,) in 0..1000,
    encoder_hidden_states, encoder_attention_mask=None) -> (B,H,W,C_out)`.

    encoder_hidden_states: (B, T, caption_channels) for standard SANA, or
    (num_layers, B, T, caption_channels) for LADDER mode (block j cross-attends to entry j), or
    a `CrossAttentionContext` of G contexts from `precompute_context` (then B must be a
    multiple of G, rows g * B/G .. (g+1) * B/G - 1 use context g, and the mask is not given).
    encoder_attention_mask: (B, T) with 1 = keep, 0 = padding (shared by every block); as in
    diffusers it becomes the additive bias (1 - mask) * -10000.
    """

    config: SanaConfig
    dtype: Any = jnp.float32

    def precompute_context(self, encoder_hidden_states, encoder_attention_mask=None):
        """The `CrossAttentionContext` of (B, T, C) or ladder (num_layers, B, T, C) contexts:
        caption_projection, caption_norm and every block's cross-attention keys and values, the
        part of a forward pass that does not depend on the latents or the timestep."""
        return self(None, None, encoder_hidden_states, encoder_attention_mask)

    def _check_inputs(self, hidden_states, timestep, context, mask):
        cfg = self.config
        if isinstance(context, CrossAttentionContext):
            self._check_latents(hidden_states, timestep)
            if context.keys.shape[0] != cfg.num_layers:
                raise ValueError(f"the precomputed context has {context.keys.shape[0]} layers, "
                                 f"the model {cfg.num_layers}")
            if hidden_states.shape[0] % context.num_contexts or mask is not None:
                raise ValueError(f"{hidden_states.shape[0]} latents cannot share "
                                 f"{context.num_contexts} precomputed contexts (or a mask was "
                                 "given with them: it is part of the precomputed context)")
            return
        if context.ndim == 3:
            ctx_b = context.shape[0]
        elif context.ndim == 4:
            if context.shape[0] != cfg.num_layers:
                raise ValueError(
                    f"ladder encoder_hidden_states has {context.shape[0]} entries but the model "
                    f"has {cfg.num_layers} blocks: give one context per block")
            ctx_b = context.shape[1]
        else:
            raise ValueError("encoder_hidden_states must be (B, T, C) or, for ladder mode, "
                             f"(num_layers, B, T, C); got shape {context.shape}")
        b = ctx_b if hidden_states is None else hidden_states.shape[0]
        if hidden_states is not None:
            self._check_latents(hidden_states, timestep)
        if ctx_b != b or context.shape[-1] != cfg.caption_channels:
            raise ValueError(f"encoder_hidden_states {context.shape} does not match batch {b} "
                             f"and caption_channels {cfg.caption_channels}")
        if mask is not None and tuple(mask.shape) != (b, context.shape[-2]):
            raise ValueError(f"encoder_attention_mask must have shape {(b, context.shape[-2])}, "
                             f"got {mask.shape}")

    def _check_latents(self, hidden_states, timestep):
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be NHWC (B, H, W, {cfg.in_channels}), got "
                             f"shape {hidden_states.shape}")
        b, h, w, _ = hidden_states.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"hidden_states spatial size {h}x{w} is not a multiple of "
                             f"patch_size {p}")
        if timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep must have shape ({b},), got {timestep.shape}")

    def _blocks(self):
        """The stack of blocks: one scanned module, or a list of modules."""
        cfg = self.config
        if cfg.scan_layers:
            return nn.scan(
                remat.wrap(_ScannedBlock, cfg.remat), variable_axes={"params": 0},
                split_rngs={"params": True, "lora_dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
                    cfg, self.dtype, name="transformer_blocks")
        block = remat.wrap(SanaTransformerBlock, cfg.remat)
        return [block(cfg, self.dtype, name=f"transformer_blocks_{i}")
                for i in range(cfg.num_layers)]

    def _cross_context(self, blocks, encoder_hidden_states, encoder_attention_mask):
        ladder = encoder_hidden_states.ndim == 4
        key_bias = None
        if encoder_attention_mask is not None:
            key_bias = (1.0 - encoder_attention_mask.astype(jnp.float32)) * MASK_BIAS
        d = self.config.inner_dim
        context = PixArtAlphaTextProjection(d, self.dtype, name="caption_projection")(
            encoder_hidden_states.astype(self.dtype))
        context = RMSNorm(1e-5, self.dtype, name="caption_norm")(context)
        if self.config.scan_layers:
            _, (keys, values) = blocks(None, context if ladder else None,
                                       None if ladder else context, None)
        else:
            kv = [block(None, context[i] if ladder else context, None, None)
                  for i, block in enumerate(blocks)]
            keys, values = (jnp.stack(t) for t in zip(*kv))
        return CrossAttentionContext(keys, values, key_bias)

    @nn.compact
    def __call__(self, hidden_states, timestep, encoder_hidden_states,
                 encoder_attention_mask=None):
        cfg = self.config
        timestep = None if timestep is None else jnp.asarray(timestep)
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask)
        blocks = self._blocks()
        context = encoder_hidden_states
        if not isinstance(context, CrossAttentionContext):
            context = self._cross_context(blocks, context, encoder_attention_mask)
        if hidden_states is None:  # precompute_context
            return context
        b, h, w, _ = hidden_states.shape
        p, d = cfg.patch_size, cfg.inner_dim

        x = PatchEmbed(d, p, self.dtype, name="patch_embed")(hidden_states.astype(self.dtype))
        modulation, embedded_timestep = AdaLayerNormSingle(d, self.dtype, name="time_embed")(
            timestep)
        kv = (context.keys, context.values)
        if cfg.scan_layers:
            x, _ = blocks(x, kv, context.key_bias, modulation)
        else:
            for i, block in enumerate(blocks):
                x = block(x, (kv[0][i], kv[1][i]), context.key_bias, modulation)

        # Output: non-affine LayerNorm (eps 1e-6) modulated by a (2, D) table, then proj_out.
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(d),
            (None, "embed")), (2, d), jnp.float32)
        shift_scale = table[None] + embedded_timestep.astype(jnp.float32)[:, None]
        shift, scale = (shift_scale[:, i, None, None, :].astype(self.dtype) for i in range(2))
        x = layer_norm(1e-6, dtype=self.dtype, name="norm_out")(x)
        x = x * (1 + scale) + shift
        x = layers.dense(p * p * cfg.out_dim, ("embed", None), dtype=self.dtype,
                         name="proj_out")(x)
        # Unpatchify: each token's (p, p, C) patch goes back to its place in NHWC.
        hp, wp = h // p, w // p
        x = x.reshape(b, hp, wp, p, p, cfg.out_dim).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, cfg.out_dim)


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def dummy_inputs(config: SanaConfig, batch: int = 1, tokens: int = 1):
    """Smallest well-formed inputs (for init / eval_shape)."""
    s = config.patch_size
    return (jnp.zeros((batch, s, s, config.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, tokens, config.caption_channels), jnp.float32))


def abstract_params(config: SanaConfig, dtype=jnp.float32):
    """Shapes (with logical-axis boxes) of the `params` collection, without allocating it."""
    model = SanaTransformer2DModel(config, dtype)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(config)))[
        "params"]


def _num_blocks(tree, name="transformer_blocks"):
    return sum(1 for k in tree if k.startswith(f"{name}_") and k[len(name) + 1:].isdigit())


def scan_params(params: Mapping[str, Any], config: SanaConfig) -> dict[str, Any]:
    """Per-block params (`transformer_blocks_{i}`) -> the `scan_layers=True` layout (one
    `transformer_blocks` subtree stacked on a leading layer axis). Accepts the `params`
    collection itself or a dict holding it under "params"."""
    if "params" in params:
        return {**params, "params": scan_params(params["params"], config)}
    found = _num_blocks(params)
    if found != config.num_layers:
        raise ValueError(f"expected {config.num_layers} transformer_blocks_i subtrees, found "
                         f"{found}")
    return param_tree.stack_layers(params, "transformer_blocks", config.num_layers)


def unscan_params(params: Mapping[str, Any], config: SanaConfig) -> dict[str, Any]:
    """Inverse of `scan_params`."""
    if "params" in params:
        return {**params, "params": unscan_params(params["params"], config)}
    if "transformer_blocks" not in params:
        raise ValueError("no stacked 'transformer_blocks' subtree: params are not in the "
                         "scan_layers layout")
    stacked = np.shape(jax.tree.leaves(params["transformer_blocks"])[0])[0]
    if stacked != config.num_layers:
        raise ValueError(f"stacked transformer_blocks has {stacked} layers, config says "
                         f"{config.num_layers}")
    return param_tree.unstack_layers(params, "transformer_blocks")
