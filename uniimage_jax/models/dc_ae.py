"""DC-AE (Deep Compression Autoencoder, diffusers `AutoencoderDC`) in Flax: encoder and decoder.

Our own port: no JAX implementation of DC-AE exists. It follows
`diffusers/models/autoencoders/autoencoder_dc.py` (0.42) and the pieces it uses
(`SanaMultiscaleLinearAttention` + `SanaMultiscaleAttnProcessor2_0`, `GLUMBConv`, `RMSNorm` with
bias), working in NHWC. Every channel reshuffle (pixel (un)shuffle, the grouped-mean and
repeat-interleave shortcuts, the interleaved q|k|v heads of the multi-scale attention) reproduces
PyTorch's NCHW channel order exactly, so converted weights work unchanged.

Submodule names are the diffusers attribute names (`encoder/down_blocks_3_1/attn/to_q`), so the
converter needs no renaming (`uniimage_jax.convert.dc_ae`).

Latent scaling: `encode` returns `encoder(x) * scaling_factor` and `decode` divides by it first,
i.e. the latents are the ones the diffusion model sees (diffusers leaves the scaling to callers).

The module is longer than the project's usual ~450 lines on purpose: it mirrors one diffusers file
block for block, so a reader can hold the two side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from uniimage_jax.models import layers

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
ACTIVATIONS: dict[str, Callable] = {
    # diffusers.models.activations.ACT2CLS; torch nn.GELU() is the exact (erf) form.
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
    "gelu": layers.gelu_exact,
}
# diffusers treats any value other than "pixel_unshuffle" as a strided conv and any value other than
# "interpolate" as pixel shuffle; we accept only the spellings the published configs use.
# (compared case-insensitively: published configs write "conv" and "Conv").
DOWNSAMPLE_TYPES = ("conv", "pixel_unshuffle")
UPSAMPLE_TYPES = ("interpolate", "pixel_shuffle")


def _per_stage(value, num_stages: int, field: str) -> tuple:
    if isinstance(value, str):
        return (value,) * num_stages
    value = tuple(value)
    if len(value) != num_stages:
        raise ValueError(f"DCAEConfig.{field}: {len(value)} entries for {num_stages} stages")
    return value


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """Hyper-parameters of `AutoencoderDC`; field names are those of diffusers' `__init__`.

    Strings given for a per-stage field are expanded to one entry per stage.
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] | str = "ResBlock"
    decoder_block_types: tuple[str, ...] | str = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple[str, ...] | str = "rms_norm"
    decoder_act_fns: tuple[str, ...] | str = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen normalisation)
        for side in ("encoder", "decoder"):
            chans = tuple(int(c) for c in getattr(self, f"{side}_block_out_channels"))
            set_(f"{side}_block_out_channels", chans)
            n = len(chans)
            set_(f"{side}_block_types",
                 _per_stage(getattr(self, f"{side}_block_types"), n, f"{side}_block_types"))
            nl = tuple(int(x) for x in getattr(self, f"{side}_layers_per_block"))
            if len(nl) != n:
                raise ValueError(f"DCAEConfig.{side}_layers_per_block: {len(nl)} entries for "
                                 f"{n} stages")
            if any(x <= 0 for x in nl):
                raise NotImplementedError(
                    f"DCAEConfig.{side}_layers_per_block={nl}: stages without layers are not "
                    "implemented")
            set_(f"{side}_layers_per_block", nl)
            ms = tuple(tuple(int(k) for k in s) for s in getattr(self, f"{side}_qkv_multiscales"))
            if len(ms) != n:
                raise ValueError(f"DCAEConfig.{side}_qkv_multiscales: {len(ms)} entries for "
                                 f"{n} stages")
            set_(f"{side}_qkv_multiscales", ms)
            for t in getattr(self, f"{side}_block_types"):
                if t not in BLOCK_TYPES:
                    raise NotImplementedError(f"DCAEConfig.{side}_block_types: block type {t!r} "
                                              f"is not implemented (only {BLOCK_TYPES})")
        n = len(self.decoder_block_out_channels)
        set_("decoder_norm_types", _per_stage(self.decoder_norm_types, n, "decoder_norm_types"))
        set_("decoder_act_fns", _per_stage(self.decoder_act_fns, n, "decoder_act_fns"))
        for t in self.decoder_norm_types:
            if t != "rms_norm":
                raise NotImplementedError(f"DCAEConfig.decoder_norm_types: {t!r} is not "
                                          "implemented (only 'rms_norm')")
        for t in (*self.decoder_act_fns, self.decoder_conv_act_fn):
            if t.lower() not in ACTIVATIONS:
                raise NotImplementedError(f"DCAEConfig.decoder_act_fns/decoder_conv_act_fn: "
                                          f"activation {t!r} is not implemented "
                                          f"(only {sorted(ACTIVATIONS)})")
        if self.downsample_block_type.lower() not in DOWNSAMPLE_TYPES:
            raise NotImplementedError(f"DCAEConfig.downsample_block_type="
                                      f"{self.downsample_block_type!r} is not implemented "
                                      f"(only {DOWNSAMPLE_TYPES})")
        if self.upsample_block_type.lower() not in UPSAMPLE_TYPES:
            raise NotImplementedError(f"DCAEConfig.upsample_block_type="
                                      f"{self.upsample_block_type!r} is not implemented "
                                      f"(only {UPSAMPLE_TYPES})")
        if self.encoder_block_out_channels[-1] % self.latent_channels:
            raise ValueError("DCAEConfig.latent_channels must divide the last encoder width")
        if self.decoder_block_out_channels[-1] % self.latent_channels:
            raise ValueError("DCAEConfig.latent_channels must divide the last decoder width")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            # `spatial_compression_ratio` (and diffusers' own) assumes both halves match.
            raise ValueError("DCAEConfig: encoder and decoder need the same number of stages")

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def downsample_by_pixel_unshuffle(self) -> bool:
        return self.downsample_block_type.lower() == "pixel_unshuffle"

    @property
    def upsample_by_interpolation(self) -> bool:
        return self.upsample_block_type.lower() == "interpolate"

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "DCAEConfig":
        """From a diffusers `vae/config.json` dict. Unknown fields raise, naming them."""
        cls_name = d.get("_class_name", "AutoencoderDC")
        if cls_name != "AutoencoderDC":
            raise ValueError(f"_class_name is {cls_name!r}; a DC-AE config has 'AutoencoderDC'")
        d = dict(d)
        if "block_out_channels" in d:
            # Early diffusers DC-AE configs had one `block_out_channels` for both halves.
            shared = d.pop("block_out_channels")
            for side in ("encoder", "decoder"):
                key = f"{side}_block_out_channels"
                if key in d and list(d[key]) != list(shared):
                    raise ValueError(f"AutoencoderDC config: block_out_channels={shared} "
                                     f"contradicts {key}={d[key]}")
                d[key] = shared
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise NotImplementedError(f"AutoencoderDC config fields not implemented: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists); `from_dict` inverts it."""
        return json_friendly(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DCAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DCAEConfig fields: {unknown}")
        return cls(**dict(d))

    @classmethod
    def dc_ae_f32c32_sana_1_0(cls) -> "DCAEConfig":
        """mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (the VAE of SANA 1.0 and TBAC-UniImage)."""
        stages = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
        return cls(
            in_channels=3,
            latent_channels=32,
            attention_head_dim=32,
            encoder_block_types=stages,
            decoder_block_types=stages,
            encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
            decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            upsample_block_type="interpolate",
            downsample_block_type="conv",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            encoder_out_shortcut=True,
            decoder_in_shortcut=True,
            decoder_conv_act_fn="relu",
            scaling_factor=0.41407,
        )


def json_friendly(x):
    if isinstance(x, Mapping):
        return {k: json_friendly(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [json_friendly(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# Channel shuffles, in NHWC with PyTorch's NCHW channel order
# ----------------------------------------------------------------------------------------------


def pixel_unshuffle(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
    """F.pixel_unshuffle: output channel c*f*f + i*f + j holds input pixel (f*h+i, f*w+j) of c."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle: spatial size {(h, w)} is not divisible by {factor}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, h', w', c, i, j
    return x.reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
    """F.pixel_shuffle, the inverse of `pixel_unshuffle`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (factor * factor), factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b, h, i, w, j, c
    return x.reshape(b, h * factor, w * factor, c // (factor * factor))


def channel_group_mean(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """`x.unflatten(1, (-1, group_size)).mean(2)`: mean over consecutive channel groups."""
    *lead, c = x.shape
    return x.reshape(*lead, c // group_size, group_size).mean(-1)


def repeat_channels(x: jnp.ndarray, repeats: int) -> jnp.ndarray:
    """`x.repeat_interleave(repeats, dim=1)`: each channel repeated in place."""
    return jnp.repeat(x, repeats, axis=-1)


def upsample_nearest(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
    """F.interpolate(scale_factor=factor, mode="nearest") for an integer factor."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def conv(features: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
         use_bias: bool = True, dtype=jnp.float32, name: str | None = None) -> nn.Conv:
    """nn.Conv with PyTorch's symmetric `kernel_size // 2` padding, fp32 params, logical axes."""
    pad = kernel_size // 2
    in_axis = "conv_in" if groups == 1 else None
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias,
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, in_axis, "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name)


class DepthwiseConv(nn.Module):
    """torch `Conv2d(C, C, k, padding=k // 2, groups=C)` on NHWC, computed by
    `layers.depthwise_conv` (the form fastest on the platform).

    The parameters are what `conv(C, k, groups=C)` makes (kernel (k, k, 1, C), bias (C,), the
    same names, initialiser and logical axes), so converted checkpoints load unchanged."""

    kernel_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C)
        c, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, None, "conv_out")), (k, k, 1, c),
            jnp.float32).astype(self.dtype)
        out = layers.depthwise_conv(x.astype(self.dtype), kernel)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), ("conv_out",)), (c,), jnp.float32)
            out = out + bias.astype(self.dtype)
        return out


class RMSNorm(nn.Module):
    """diffusers RMSNorm(elementwise_affine=True, bias=True) over the channel (last) axis.

    Statistics and the affine part in fp32 (as diffusers does with fp32 weights); output in `dtype`.
    """

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jnp.reciprocal(jnp.sqrt(var + self.eps)) * scale + bias
        return y.astype(self.dtype)


class ResBlock(nn.Module):
    """conv3x3 -> act -> conv3x3 (no bias) -> RMSNorm, plus the input."""

    channels: int
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = conv(self.channels, 3, dtype=self.dtype, name="conv1")(x)
        h = ACTIVATIONS[self.act_fn.lower()](h)
        h = conv(self.channels, 3, use_bias=False, dtype=self.dtype, name="conv2")(h)
        h = RMSNorm(1e-5, self.dtype, name="norm")(h)
        return h + x


class SanaMultiscaleAttentionProjection(nn.Module):
    """Depthwise k x k conv, then a 1x1 conv grouped per (q|k|v, head) channel block."""

    channels: int
    num_attention_heads: int
    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = DepthwiseConv(self.kernel_size, use_bias=False, dtype=self.dtype, name="proj_in")(x)
        return conv(self.channels, 1, groups=3 * self.num_attention_heads, use_bias=False,
                    dtype=self.dtype, name="proj_out")(x)


def uses_linear_attention(height: int, width: int, attention_head_dim: int) -> bool:
    """diffusers' choice (SanaMultiscaleAttnProcessor2_0): linear attention iff H*W > head dim."""
    return height * width > attention_head_dim


def linear_attention(q, k, v, eps: float):
    """ReLU linear attention as diffusers computes it, in fp32.

    q, k, v: (B, N, heads, d) already ReLU'd (q, k). V gets a row of ones so that the same
    matmuls produce the normaliser sum_n k_n . q_m, which then divides the rest.
    """
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # (B, N, h, d+1)
    vk = jnp.einsum("bnhe,bnhd->bhed", v, k)  # (B, h, d+1, d)
    out = jnp.einsum("bhed,bmhd->bmhe", vk, q)  # (B, N, h, d+1)
    return out[..., :-1] / (out[..., -1:] + eps)


def quadratic_attention(q, k, v, eps: float):
    """diffusers' 'quadratic' ReLU attention for small maps: scores normalised in fp32."""
    scores = jnp.einsum("bnhd,bmhd->bhnm", k, q)  # [n, m] = k_n . q_m
    scores = scores.astype(jnp.float32)
    scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + eps)
    return jnp.einsum("bnhd,bhnm->bmhd", v, scores.astype(v.dtype))


class SanaMultiscaleLinearAttention(nn.Module):
    """Multi-scale ReLU attention (EfficientViT "LiteMLA") with RMSNorm and residual.

    The concatenated [q | k | v | multiscale(q | k | v)...] channels are cut into consecutive
    blocks of 3*head_dim, each block being one head's (q, k, v): PyTorch's
    `reshape(B, -1, 3 * d, H * W)` of the NCHW tensor, which is the same cut of NHWC channels.
    """

    channels: int
    attention_head_dim: int
    kernel_sizes: Sequence[int] = (5,)
    mult: float = 1.0
    eps: float = 1e-15
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, _ = x.shape
        d = self.attention_head_dim
        heads = int(self.channels // d * self.mult)
        inner = heads * d
        qkv = jnp.concatenate([
            layers.dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name=n)(x)
            for n in ("to_q", "to_k", "to_v")], axis=-1)
        multi = [qkv] + [
            SanaMultiscaleAttentionProjection(3 * inner, heads, ks, self.dtype,
                                              name=f"to_qkv_multiscale_{i}")(qkv)
            for i, ks in enumerate(self.kernel_sizes)]
        h = jnp.concatenate(multi, axis=-1)
        linear = uses_linear_attention(hgt, wid, d)
        if linear:
            h = h.astype(jnp.float32)
        h = h.reshape(b, hgt * wid, -1, 3 * d)
        q, k, v = nn.relu(h[..., :d]), nn.relu(h[..., d:2 * d]), h[..., 2 * d:]
        if linear:
            h = linear_attention(q, k, v, self.eps).astype(self.dtype)
        else:
            h = quadratic_attention(q, k, v, self.eps)
        h = h.reshape(b, hgt, wid, -1)
        h = layers.dense(self.channels, ("heads", "embed"), use_bias=False, dtype=self.dtype,
                         name="to_out")(h)
        h = RMSNorm(1e-5, self.dtype, name="norm_out")(h)
        return h + x


class GLUMBConv(nn.Module):
    """1x1 expand (x2 for the gate) -> SiLU -> depthwise 3x3 -> value * SiLU(gate) -> 1x1
    -> RMSNorm, plus the input (diffusers' GLUMBConv with norm_type='rms_norm')."""

    channels: int
    expand_ratio: float = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = int(self.expand_ratio * self.channels)
        h = conv(2 * hidden, 1, dtype=self.dtype, name="conv_inverted")(x)
        h = nn.silu(h)
        h = DepthwiseConv(3, dtype=self.dtype, name="conv_depth")(h)
        h, gate = h[..., :hidden], h[..., hidden:]
        h = h * nn.silu(gate)
        h = conv(self.channels, 1, use_bias=False, dtype=self.dtype, name="conv_point")(h)
        h = RMSNorm(1e-5, self.dtype, name="norm")(h)
        return h + x


class EfficientViTBlock(nn.Module):
    """Multi-scale attention (token mixing) then GLUMBConv (channel mixing)."""

    channels: int
    attention_head_dim: int
    qkv_multiscales: Sequence[int] = (5,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = SanaMultiscaleLinearAttention(self.channels, self.attention_head_dim,
                                          tuple(self.qkv_multiscales), dtype=self.dtype,
                                          name="attn")(x)
        return GLUMBConv(self.channels, dtype=self.dtype, name="conv_out")(x)


def make_block(block_type: str, channels: int, config: DCAEConfig, act_fn: str,
               qkv_multiscales: Sequence[int], dtype, name: str) -> nn.Module:
    if block_type == "ResBlock":
        return ResBlock(channels, act_fn, dtype, name=name)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, config.attention_head_dim, tuple(qkv_multiscales),
                                 dtype, name=name)
    raise NotImplementedError(f"block type {block_type!r}")


class DCDownBlock2d(nn.Module):
    """Halve H and W: stride-2 conv (or conv + pixel-unshuffle), plus a parameter-free shortcut
    (pixel-unshuffle, then mean over groups of consecutive channels)."""

    in_channels: int
    out_channels: int
    pixel_unshuffle: bool = False
    shortcut: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.pixel_unshuffle:
            h = conv(self.out_channels // 4, 3, dtype=self.dtype, name="conv")(x)
            h = pixel_unshuffle(h, 2)
        else:
            h = conv(self.out_channels, 3, stride=2, dtype=self.dtype, name="conv")(x)
        if not self.shortcut:
            return h
        group_size = self.in_channels * 4 // self.out_channels
        return h + channel_group_mean(pixel_unshuffle(x, 2), group_size)


class DCUpBlock2d(nn.Module):
    """Double H and W: nearest upsample + conv (or conv + pixel-shuffle), plus a parameter-free
    shortcut (repeat-interleave channels, then pixel-shuffle)."""

    in_channels: int
    out_channels: int
    interpolate: bool = False
    shortcut: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.interpolate:
            h = conv(self.out_channels, 3, dtype=self.dtype, name="conv")(upsample_nearest(x, 2))
        else:
            h = pixel_shuffle(conv(self.out_channels * 4, 3, dtype=self.dtype, name="conv")(x), 2)
        if not self.shortcut:
            return h
        repeats = self.out_channels * 4 // self.in_channels
        return h + pixel_shuffle(repeat_channels(x, repeats), 2)


class Encoder(nn.Module):
    """Image (B, H, W, C) -> unscaled latents (B, H/r, W/r, latent_channels)."""

    config: DCAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        chans = c.encoder_block_out_channels
        x = conv(chans[0], 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        for i, (ch, n) in enumerate(zip(chans, c.encoder_layers_per_block)):
            for j in range(n):
                x = make_block(c.encoder_block_types[i], ch, c, "silu",
                               c.encoder_qkv_multiscales[i], self.dtype,
                               name=f"down_blocks_{i}_{j}")(x)
            if i < len(chans) - 1:
                x = DCDownBlock2d(ch, chans[i + 1], c.downsample_by_pixel_unshuffle, True,
                                  self.dtype, name=f"down_blocks_{i}_{n}")(x)
        out = conv(c.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)
        if c.encoder_out_shortcut:
            out = out + channel_group_mean(x, chans[-1] // c.latent_channels)
        return out


class Decoder(nn.Module):
    """Unscaled latents (B, h, w, latent_channels) -> image (B, h*r, w*r, C)."""

    config: DCAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c = self.config
        chans = c.decoder_block_out_channels
        z = z.astype(self.dtype)
        x = conv(chans[-1], 3, dtype=self.dtype, name="conv_in")(z)
        if c.decoder_in_shortcut:
            x = x + repeat_channels(z, chans[-1] // c.latent_channels)
        # diffusers builds up_blocks[i] = [upsample from stage i+1 (if any), blocks of stage i]
        # and runs them from the last stage to the first.
        for i in reversed(range(len(chans))):
            j0 = 0
            if i < len(chans) - 1:
                x = DCUpBlock2d(chans[i + 1], chans[i], c.upsample_by_interpolation, True,
                                self.dtype, name=f"up_blocks_{i}_0")(x)
                j0 = 1
            for j in range(c.decoder_layers_per_block[i]):
                x = make_block(c.decoder_block_types[i], chans[i], c, c.decoder_act_fns[i],
                               c.decoder_qkv_multiscales[i], self.dtype,
                               name=f"up_blocks_{i}_{j0 + j}")(x)
        x = RMSNorm(1e-5, self.dtype, name="norm_out")(x)
        x = ACTIVATIONS[c.decoder_conv_act_fn.lower()](x)
        return conv(c.in_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderDC(nn.Module):
    """DC-AE with scaled latents: `encode` (NHWC images in [-1, 1] -> latents * scaling_factor),
    `decode` (the inverse direction). Call with `model.apply(vars, x, method="encode")`."""

    config: DCAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype)

    def _check(self, x, channels: int, what: str, multiple: int):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderDC.{what}: expected NHWC input with {channels} channels, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"AutoencoderDC.{what}: height and width {tuple(x.shape[1:3])} must "
                             f"be multiples of {multiple}")

    def encode(self, x):
        self._check(x, self.config.in_channels, "encode", self.config.spatial_compression_ratio)
        return self.encoder(x) * self.config.scaling_factor

    def decode(self, z):
        self._check(z, self.config.latent_channels, "decode", 1)
        return self.decoder(z / self.config.scaling_factor)

    def __call__(self, x):
        return self.decode(self.encode(x))
