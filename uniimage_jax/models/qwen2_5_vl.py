"""Qwen2.5-VL (vision tower + M-RoPE language model) in Flax linen.

Our own port of `transformers.models.qwen2_5_vl.modeling_qwen2_5_vl` (transformers 5.23): no JAX
library provides Qwen2.5-VL. Module and attribute names mirror the PyTorch ones exactly
(`model/visual/blocks_3/attn/qkv`, `model/language_model/layers_0/self_attn/q_proj`, ...) so that
`uniimage_jax.convert.qwen2_5_vl.KEYMAP` is a handful of regex rewrites.

What is static and what is traced:
* `image_grid_thw` is a static tuple of (t, h, w) tuples. Everything the vision tower derives from
  it (rotary positions, the window permutation, attention segments) is computed with numpy at
  trace time, so one compiled function serves one set of image sizes.
* Text positions (M-RoPE, shape (3, B, T)) are computed on the host by `get_rope_index`, an exact
  numpy port of HF's, and passed in.
* The KV cache is a fixed-size buffer written at a traced `cache_index`, so decoding steps reuse
  one compiled function.

Vision attention over variable-length segments (one segment per window, or per image frame in the
full-attention blocks) is computed by gathering each segment into a padded (segments, max_len)
block with a key mask: exact, and memory O(segments * max_len^2) instead of O(N^2).

The module is longer than the project's usual ~450 lines on purpose: it mirrors one transformers
file (vision tower, M-RoPE, language model, KV cache), so a reader can hold the two side by side.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.models import layers, param_tree, remat

GridTHW = tuple[tuple[int, int, int], ...]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    """The vision tower (HF `Qwen2_5_VLVisionConfig`); head_dim = hidden_size // num_heads."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 2048
    in_channels: int = 3
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes",
                           tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("vision head_dim must be a multiple of 4 (2-D rotary over h and w)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside 0..{self.depth - 1}")
        if self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(f"window_size {self.window_size} must be a multiple of "
                             f"spatial_merge_size * patch_size = "
                             f"{self.spatial_merge_size * self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened processor patch: C * T_patch * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Language model fields (HF `text_config`), token ids, the nested vision config, and our own
    layout options (`scan_layers`, `remat`)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 11008
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_config: Qwen2_5_VLVisionConfig = dataclasses.field(
        default_factory=Qwen2_5_VLVisionConfig)
    scan_layers: bool = False
    remat: str = "none"   # remat policy of the decoder layers by name (models/remat.py)

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        object.__setattr__(self, "remat", remat.policy_name(self.remat, "Qwen2_5_VLConfig.remat"))
        if isinstance(self.vision_config, Mapping):
            object.__setattr__(self, "vision_config", Qwen2_5_VLVisionConfig(**self.vision_config))
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} x head_dim "
                             f"{self.head_dim} != hidden_size {self.hidden_size} (HF derives "
                             "head_dim = hidden_size // num_attention_heads)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 sections summing to "
                             f"head_dim // 2 = {self.head_dim // 2}")
        if self.vision_config.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision_config.out_hidden_size} != "
                             f"language hidden_size {self.hidden_size}")

    @classmethod
    def qwen2_5_vl_3b(cls, **overrides) -> "Qwen2_5_VLConfig":
        """Qwen2.5-VL-3B-Instruct (its published config.json)."""
        return cls(**overrides)  # the defaults are the 3B values

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mrope_section"] = list(self.mrope_section)
        d["vision_config"]["fullatt_block_indexes"] = list(self.vision_config.fullatt_block_indexes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Qwen2_5_VLConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Qwen2_5_VLConfig fields: {unknown}")
        vision = dict(d.pop("vision_config", {}))
        vknown = {f.name for f in dataclasses.fields(Qwen2_5_VLVisionConfig)}
        vunknown = sorted(set(vision) - vknown)
        if vunknown:
            raise ValueError(f"unknown Qwen2_5_VLVisionConfig fields: {vunknown}")
        return cls(vision_config=Qwen2_5_VLVisionConfig(**vision), **d)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "Qwen2_5_VLConfig":
        """From an HF `config.json` dict: transformers 5 nests `text_config`; older files keep the
        text fields at the top level (and `rope_scaling` / `rope_theta` instead of
        `rope_parameters`). `vision_config` is nested in both."""
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config model_type is {d.get('model_type')!r}, expected 'qwen2_5_vl'")
        text = dict(d.get("text_config") or d)
        vision = dict(d.get("vision_config") or {})
        if not vision:
            raise ValueError("config has no vision_config")

        def need(src, key, where):
            if key not in src:
                raise ValueError(f"HF config: {where} has no {key!r}")
            return src[key]

        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"unsupported text rope type {rope_type!r} (only default M-RoPE)")
        if text.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported")
        if text.get("hidden_act", "silu") != "silu" or vision.get("hidden_act", "silu") != "silu":
            raise ValueError("only hidden_act='silu' is supported")
        hidden = need(text, "hidden_size", "text config")
        heads = need(text, "num_attention_heads", "text config")
        vrope = dict(vision.get("rope_parameters") or {})
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)) or \
            text.get("tie_word_embeddings", False)
        kw = dict(
            vocab_size=need(text, "vocab_size", "text config"),
            hidden_size=hidden,
            num_hidden_layers=need(text, "num_hidden_layers", "text config"),
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads") or heads,
            head_dim=hidden // heads,
            intermediate_size=need(text, "intermediate_size", "text config"),
            rope_theta=float(theta),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=bool(tie),
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            vision_config=Qwen2_5_VLVisionConfig(
                depth=need(vision, "depth", "vision_config"),
                hidden_size=need(vision, "hidden_size", "vision_config"),
                num_heads=need(vision, "num_heads", "vision_config"),
                intermediate_size=need(vision, "intermediate_size", "vision_config"),
                patch_size=vision.get("patch_size", 14),
                temporal_patch_size=vision.get("temporal_patch_size", 2),
                spatial_merge_size=vision.get("spatial_merge_size", 2),
                window_size=vision.get("window_size", 112),
                fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
                out_hidden_size=need(vision, "out_hidden_size", "vision_config"),
                in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
                rope_theta=float(vrope.get("rope_theta", 10000.0)),
                tokens_per_second=vision.get("tokens_per_second", 2),
            ),
        )
        kw.update(overrides)
        return cls(**kw)


def init_kv_cache(config: Qwen2_5_VLConfig, batch: int, max_len: int, dtype=jnp.float32):
    """An empty fixed-size KV cache {"k", "v"}: (layers, batch, max_len, kv_heads, head_dim)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@flax.struct.dataclass
class Qwen2_5_VLOutput:
    logits: jax.Array | None  # (B, T, vocab) float32, None when compute_logits=False
    last_hidden_state: jax.Array  # (B, T, D), after the final norm
    kv_cache: dict[str, jax.Array] | None  # the updated cache, or None without one


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """HF Qwen2_5_VLRMSNorm: normalise in fp32, cast back to the input dtype, then * weight."""

    dim: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (self.dim,), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF multiplies the (fp32) weight by the input-dtype activations: the product is fp32 in
        # PyTorch's promotion; we return the compute dtype like every other module here.
        return (scale * xf.astype(x.dtype)).astype(x.dtype)


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); biases in the vision tower only."""

    hidden_size: int
    intermediate_size: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate = layers.dense(self.intermediate_size, ("embed", "mlp"), use_bias=self.use_bias,
                            dtype=self.dtype, name="gate_proj")(x)
        up = layers.dense(self.intermediate_size, ("embed", "mlp"), use_bias=self.use_bias,
                          dtype=self.dtype, name="up_proj")(x)
        return layers.dense(self.hidden_size, ("mlp", "embed"), use_bias=self.use_bias,
                            dtype=self.dtype, name="down_proj")(nn.silu(gate) * up)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _softmax_attention(q, k, v, mask, scale):
    """q (..., Tq, H, D), k/v (..., Tk, H, D), mask broadcastable to (..., H, Tq, Tk) (True =
    attend). Scores and softmax in fp32 (HF eager: softmax in fp32, probabilities cast back)."""
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", p, v)


# ----------------------------------------------------------------------------------------------
# Vision tower: host-side geometry (numpy, static per image_grid_thw)
# ----------------------------------------------------------------------------------------------


def _check_grid(grid_thw, merge: int) -> GridTHW:
    try:
        grid = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image_grid_thw must be a static sequence of (t, h, w) ints, got "
                         f"{grid_thw!r}") from e
    for t, h, w in grid:
        if t < 1 or h % merge or w % merge or h < 1 or w < 1:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) must have t >= 1 and h, w positive "
                             f"multiples of spatial_merge_size {merge}")
    return grid


def vision_rotary_positions(grid: GridTHW, merge: int) -> np.ndarray:
    """(N, 2) (h, w) patch coordinates in the processor's 2x2-merge-group order
    (HF `get_vision_position_ids`)."""
    out = []
    for t, h, w in grid:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    return np.concatenate(out, 0)


def vision_window_index(grid: GridTHW, merge: int, window: int, patch: int):
    """(window_index over merged units, window lengths in patches) as HF `get_vision_window_index`:
    merged units are grouped into windows of `window // merge // patch` units per side, the
    merged grid being padded up to whole windows (padding entries dropped, empty windows left
    out)."""
    win = window // merge // patch
    index, seqlens, offset = [], [], 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win  # HF pads a whole extra window when divisible
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, -1)
        lens = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        seqlens += [int(n) * merge * merge for n in lens if n > 0]
        offset += t * gh * gw
    return np.concatenate(index), seqlens


def segment_blocks(lengths: Sequence[int]):
    """Padded gather layout for attention within consecutive segments of these lengths.

    Returns (gather (S, L) int32 token indices, valid (S, L) bool, scatter (N,) int32 index of each
    token in the flattened (S*L) block array)."""
    lengths = [int(n) for n in lengths if n > 0]
    longest = max(lengths)
    gather = np.zeros((len(lengths), longest), np.int32)
    valid = np.zeros((len(lengths), longest), bool)
    scatter = np.zeros(sum(lengths), np.int32)
    start = 0
    for s, n in enumerate(lengths):
        gather[s, :n] = np.arange(start, start + n)
        valid[s, :n] = True
        scatter[start:start + n] = s * longest + np.arange(n)
        start += n
    return gather, valid, scatter


# ----------------------------------------------------------------------------------------------
# Vision tower: modules
# ----------------------------------------------------------------------------------------------


class Conv3dPatchProjection(nn.Module):
    """HF's Conv3d(kernel = stride = (T_patch, P, P), no bias) applied to already-flattened
    (C, T_patch, P, P) patches is a matmul; the kernel keeps the Conv3d layout (t, h, w, C, O)
    so the converter's default Conv3d transform applies."""

    config: Qwen2_5_VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches):
        c = self.config
        shape = (c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels, c.hidden_size)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
            (None, None, None, None, "embed")), shape, jnp.float32)
        # (t, h, w, C, O) -> (C, t, h, w, O): the processor's flattening order.
        kernel = jnp.transpose(kernel, (3, 0, 1, 2, 4)).reshape(-1, c.hidden_size)
        return jnp.dot(patches.astype(self.dtype), kernel.astype(self.dtype))


class Qwen2_5_VisionPatchEmbed(nn.Module):
    config: Qwen2_5_VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        return Conv3dPatchProjection(self.config, self.dtype, name="proj")(pixel_values)


class Qwen2_5_VLVisionAttention(nn.Module):
    config: Qwen2_5_VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, blocks):
        """x (R, N, dim): R rows of one image set each; cos/sin (N, head_dim) fp32; blocks =
        (gather, valid, scatter) numpy, the same for every row."""
        c = self.config
        r, n = x.shape[:2]
        qkv = layers.dense(3 * c.hidden_size, ("embed", "heads"), dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(r, n, 3, c.num_heads, c.head_dim), 2, 0)
        # Rotary in fp32 (HF apply_rotary_pos_emb_vision), then back to the compute dtype.
        cos, sin = cos[:, None, :], sin[:, None, :]
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        q = (qf * cos + _rotate_half(qf) * sin).astype(self.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).astype(self.dtype)
        gather, valid, scatter = blocks
        qb, kb, vb = q[:, gather], k[:, gather], v[:, gather]  # (R, S, L, H, D)
        mask = jnp.asarray(valid)[:, None, None, :]
        out = _softmax_attention(qb, kb, vb, mask, c.head_dim ** -0.5)
        out = out.reshape(r, -1, c.num_heads * c.head_dim)[:, scatter]
        return layers.dense(c.hidden_size, ("heads", "embed"), dtype=self.dtype, name="proj")(out)


class Qwen2_5_VLVisionBlock(nn.Module):
    config: Qwen2_5_VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, blocks):
        c = self.config
        x = x + Qwen2_5_VLVisionAttention(c, self.dtype, name="attn")(
            RMSNorm(c.hidden_size, 1e-6, name="norm1")(x), cos, sin, blocks)
        return x + GatedMLP(c.hidden_size, c.intermediate_size, True, self.dtype, name="mlp")(
            RMSNorm(c.hidden_size, 1e-6, name="norm2")(x))


class Qwen2_5_VLPatchMerger(nn.Module):
    """RMSNorm, concatenate each 2x2 merge group, Linear -> exact GELU -> Linear."""

    config: Qwen2_5_VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        width = c.hidden_size * c.spatial_merge_size ** 2
        x = RMSNorm(c.hidden_size, 1e-6, name="ln_q")(x)
        x = x.reshape(*x.shape[:-2], -1, width)
        x = layers.dense(width, ("embed", "mlp"), dtype=self.dtype, name="mlp_0")(x)
        x = layers.gelu_exact(x)
        return layers.dense(c.out_hidden_size, ("mlp", "embed"), dtype=self.dtype, name="mlp_2")(x)


class Qwen2_5_VisionTransformer(nn.Module):
    """HF `Qwen2_5_VisionTransformerPretrainedModel`: (N_patches, patch_dim) -> (N_patches / 4,
    out_hidden_size) merged tokens, in the processor's order.

    Batched form: pixel_values (B, N_patches, patch_dim), where `grid_thw` describes the images of
    ONE row and every row has the same grid (a fixed image size). The rows are computed side by
    side on a leading axis that stays split like the batch (logical "batch"), so under a
    data-parallel mesh each device runs only its own rows' images; attention stays within each
    row's windows / frames, so every row's result equals the unbatched one.
    """

    config: Qwen2_5_VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, grid_thw):
        c = self.config
        unit = c.spatial_merge_size ** 2
        grid = _check_grid(grid_thw, c.spatial_merge_size)
        n = sum(t * h * w for t, h, w in grid)
        batched = pixel_values.ndim == 3
        if pixel_values.shape[batched:] != (n, c.patch_dim) or pixel_values.ndim not in (2, 3):
            raise ValueError(f"pixel_values has shape {pixel_values.shape}; image_grid_thw {grid} "
                             f"needs ({n}, {c.patch_dim}) = (sum t*h*w, C*T_patch*P*P), or "
                             f"(rows, {n}, {c.patch_dim}) with the grid of one row")
        window_index, window_lens = vision_window_index(grid, c.spatial_merge_size, c.window_size,
                                                        c.patch_size)
        patch_order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
        window_blocks = segment_blocks(window_lens)
        full_blocks = segment_blocks([h * w for t, h, w in grid for _ in range(t)])

        # Rotary angles in fp32 over (h, w) with head_dim // 4 frequencies each.
        pos = vision_rotary_positions(grid, c.spatial_merge_size)[patch_order]
        half = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
        freqs = jnp.asarray(pos, jnp.float32)[..., None] * inv_freq  # (N, 2, head_dim // 4)
        freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], -1)
        freqs = jnp.concatenate([freqs, freqs], -1)
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)

        rows = pixel_values if batched else pixel_values[None]
        x = Qwen2_5_VisionPatchEmbed(c, self.dtype, name="patch_embed")(rows)
        x = self._rows_with_batch(x[:, patch_order], batched)
        for i in range(c.depth):
            blocks = full_blocks if i in c.fullatt_block_indexes else window_blocks
            x = Qwen2_5_VLVisionBlock(c, self.dtype, name=f"blocks_{i}")(x, cos, sin, blocks)
            x = self._rows_with_batch(x, batched)
        merged = Qwen2_5_VLPatchMerger(c, self.dtype, name="merger")(x)
        merged = merged[:, np.argsort(window_index)]
        return merged if batched else merged[0]

    @staticmethod
    def _rows_with_batch(x, batched: bool):
        """Keep the rows split like the batch (a no-op without a mesh and axis rules). The
        unbatched form has one row holding every image, which cannot be split."""
        return nn.with_logical_constraint(x, ("batch", None, None)) if batched else x


# ----------------------------------------------------------------------------------------------
# Language model
# ----------------------------------------------------------------------------------------------


def mrope_cos_sin(config: Qwen2_5_VLConfig, position_ids, dtype):
    """M-RoPE (HF Qwen2_5_VLRotaryEmbedding): angles in fp32 for each of the 3 position rows, then
    frequency section i takes its angles from row i % 3 (temporal, height, width)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, T, d/2)
    bounds = np.cumsum((0, *config.mrope_section))
    freqs = jnp.concatenate([freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(3)], -1)
    freqs = jnp.concatenate([freqs, freqs], -1)  # (B, T, d)
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


# Queries per block of the decoder's causal attention (`causal_query_blocks`): a multiple of 128,
# the TPU's lane width, which the key lengths of the blocks then are (keys are the scores' minor
# dimension).
CAUSAL_QUERY_BLOCK = 128


def causal_query_blocks(count: int, offset: int, keys: int) -> list[tuple[int, int, int]]:
    """[(start, stop, visible)]: the `count` queries at key slots offset.. in blocks of
    CAUSAL_QUERY_BLOCK, each with the number of leading key slots any query of it may see
    (causal: up to the block's last query). The keys above a block's diagonal are masked for
    every query in it, so their scores are never needed: a prompt of T tokens attends over
    about T * T / 2 scores instead of T * keys (the prompt pass's cache also holds the
    metaqueries' empty slots after it)."""
    blocks = []
    for start in range(0, count, CAUSAL_QUERY_BLOCK):
        stop = min(start + CAUSAL_QUERY_BLOCK, count)
        blocks.append((start, stop, min(offset + stop, keys)))
    return blocks


class Qwen2_5_VLAttention(nn.Module):
    config: Qwen2_5_VLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache, cache_index, kv_only: bool = False):
        """(attention output, updated cache). `kv_only`: only write x's keys and values into
        `cache` and return (None, cache): no queries, no attention, no output projection."""
        c = self.config
        b, t, _ = x.shape
        hd, nkv = c.head_dim, c.num_key_value_heads
        k = layers.dense(nkv * hd, ("embed", "kv"), dtype=self.dtype,
                         name="k_proj")(x).reshape(b, t, nkv, hd)
        v = layers.dense(nkv * hd, ("embed", "kv"), dtype=self.dtype,
                         name="v_proj")(x).reshape(b, t, nkv, hd)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        k = k * cos + _rotate_half(k) * sin
        new_cache = None
        if cache is not None:
            ck, cv = cache
            start = (0, cache_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
            new_cache = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        if kv_only:
            if cache is None:
                raise ValueError("kv_only needs a cache to write the keys and values into")
            return None, new_cache
        q_proj = layers.dense(c.num_attention_heads * hd, ("embed", "heads"), dtype=self.dtype,
                              name="q_proj")
        o_proj = layers.dense(c.hidden_size, ("heads", "embed"), use_bias=False,
                              dtype=self.dtype, name="o_proj")
        # Grouped-query attention: query head h uses kv head h // groups (HF repeat_kv).
        groups = c.num_attention_heads // nkv

        def attend(start, stop, visible):
            """The attention output of the queries start..stop over the first `visible` keys."""
            q = q_proj(x[:, start:stop]).reshape(b, stop - start, c.num_attention_heads, hd)
            q = q * cos[:, start:stop] + _rotate_half(q) * sin[:, start:stop]
            q = q.reshape(b, stop - start, nkv, groups, hd)
            s = jnp.einsum("btkgd,bskd->bkgts", q, k[:, :visible],
                           preferred_element_type=jnp.float32)
            s = jnp.where(mask[:, None, None, start:stop, :visible], s * hd ** -0.5,
                          jnp.finfo(jnp.float32).min)
            p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
            out = jnp.einsum("bkgts,bskd->btkgd", p, v[:, :visible])
            out = remat.tag_attention_output(out.reshape(b, stop - start, -1))
            return o_proj(out)

        # The query at slot `offset + i` sees key slots up to its own (causal), the rest are
        # masked: with the offset known when tracing, each block of queries (projected, attending
        # and projected back on its own, so that its rows need no copy out of the others) attends
        # only to the keys some query of it can see.
        offset = cache_index if cache is not None else 0
        blocks = (causal_query_blocks(t, offset, k.shape[1]) if isinstance(offset, int)
                  else [(0, t, k.shape[1])])
        outs = [attend(*block) for block in blocks]
        return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), new_cache


class Qwen2_5_VLDecoderLayer(nn.Module):
    """One decoder layer. Signature (carry, broadcast..., scanned cache) -> (carry, new cache)
    so that it runs unchanged under `nn.scan`."""

    config: Qwen2_5_VLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache, cache_index, kv_only: bool = False):
        c = self.config
        h, new_cache = Qwen2_5_VLAttention(c, self.dtype, name="self_attn")(
            RMSNorm(c.hidden_size, c.rms_norm_eps, name="input_layernorm")(x),
            mask, cos, sin, cache, cache_index, kv_only)
        if kv_only:   # the layer's keys and values of x, nothing above them
            return x, new_cache
        x = x + h
        x = x + GatedMLP(c.hidden_size, c.intermediate_size, False, self.dtype, name="mlp")(
            RMSNorm(c.hidden_size, c.rms_norm_eps, name="post_attention_layernorm")(x))
        # the residual stream stays split over the batch (a no-op without a mesh and rules)
        x = nn.with_logical_constraint(x, ("batch", "length", None))
        return x, new_cache


class Qwen2_5_VLTextModel(nn.Module):
    """Embedding, decoder layers (unrolled or `nn.scan`), final norm."""

    config: Qwen2_5_VLConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        layer_cls = remat.wrap(Qwen2_5_VLDecoderLayer, c.remat)
        if c.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "lora_dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(c, self.dtype)
        else:
            # setup names list entries layers_0, layers_1, ... (the naming convention)
            self.layers = [layer_cls(c, self.dtype) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def attend_logits(self, h):
        """Tied lm_head: hidden @ embedding^T."""
        return self.embed_tokens.attend(h)

    def __call__(self, inputs_embeds, attention_mask, position_ids, kv_cache=None,
                 cache_index=None, final_norm: bool = True):
        c = self.config
        b, t, _ = inputs_embeds.shape
        x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ("batch", "length", None))
        self.sow("intermediates", "inputs_embeds", x)
        cos, sin = mrope_cos_sin(c, position_ids, self.dtype)
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        if kv_cache is None:
            if attention_mask.shape != (b, t):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}; without a KV "
                                 f"cache it must be (batch, seq) = {(b, t)}")
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None] & attention_mask[:, None, :]
            caches = None
        else:
            if cache_index is None:
                raise ValueError("kv_cache given without cache_index")
            size = kv_cache["k"].shape[2]
            if attention_mask.shape != (b, size):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}; with a KV "
                                 f"cache it must cover every cache slot: (batch, cache_len) = "
                                 f"{(b, size)}")
            slots = jnp.arange(size)
            query_slots = cache_index + jnp.arange(t)
            mask = (slots[None, :] <= query_slots[:, None])[None] & attention_mask[:, None, :]
            caches = (kv_cache["k"], kv_cache["v"])
        if c.scan_layers:
            x, new = self.layers(x, mask, cos, sin, caches, cache_index)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if caches is None else (caches[0][i], caches[1][i])
                x, nc = layer(x, mask, cos, sin, layer_cache, cache_index)
                if nc is not None:
                    new_k.append(nc[0])
                    new_v.append(nc[1])
            new = None if caches is None else (jnp.stack(new_k), jnp.stack(new_v))
        new_cache = None if new is None else {"k": new[0], "v": new[1]}
        return (self.norm(x) if final_norm else x), new_cache


class Qwen2_5_VLModel(nn.Module):
    config: Qwen2_5_VLConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.visual = Qwen2_5_VisionTransformer(self.config.vision_config, self.dtype)
        self.language_model = Qwen2_5_VLTextModel(self.config, self.dtype)


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    """Qwen2.5-VL: `model/{visual, language_model}` + `lm_head` (absent with tied embeddings)."""

    config: Qwen2_5_VLConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.model = Qwen2_5_VLModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = layers.dense(self.config.vocab_size, ("embed", "vocab"), use_bias=False,
                                        dtype=self.dtype)

    def get_image_features(self, pixel_values, image_grid_thw):
        """Merged vision tokens (sum over images of t*h*w/4, out_hidden_size), images in order;
        batched pixel_values (B, patches per row, dim) give (B, merged tokens per row, out)."""
        return self.model.visual(pixel_values, image_grid_thw)

    def __call__(self, input_ids, attention_mask, position_ids, *, pixel_values=None,
                 image_grid_thw=None, kv_cache=None, cache_index=None, compute_logits=True,
                 inputs_embeds=None, final_norm: bool = True) -> Qwen2_5_VLOutput:
        """One forward pass.

        input_ids (B, T) int32 (may be None with inputs_embeds); position_ids (3, B, T) int32
        M-RoPE positions from `get_rope_index`. Without a cache attention_mask is (B, T)
        (1 = token, left padding) and attention is causal + padding; with `kv_cache` (see
        `init_kv_cache`) the T new keys/values are written at slots cache_index..cache_index+T-1,
        attention_mask is (B, S) over every cache slot and causality is by slot index.
        pixel_values (N_patches, C*T_patch*P*P) are the processor's flattened patches and
        image_grid_thw their static ((t, h, w), ...) grids; the merged image features replace
        the image_token_id positions in row-major order. Batched: pixel_values (B, patches per
        row, C*T_patch*P*P) with image_grid_thw the grid of ONE row (the same for every row); the
        vision tower then runs per row, split like the batch, and row b's features fill row b. Their count must equal the number of
        image tokens: `get_rope_index` checks it on the host (it cannot be checked under jit).
        inputs_embeds (B, T, D) bypasses the embedding lookup. `final_norm` False: the last
        hidden state is the last decoder layer's output itself, before the final norm (then
        no logits).
        """
        c = self.config
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.model.language_model.embed(input_ids)
        if position_ids.ndim != 3 or position_ids.shape[0] != 3 or \
                position_ids.shape[1:] != inputs_embeds.shape[:2]:
            raise ValueError(f"position_ids has shape {position_ids.shape}; M-RoPE needs (3, B, T) "
                             f"= (3, {inputs_embeds.shape[0]}, {inputs_embeds.shape[1]}) (see "
                             "get_rope_index)")
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            if input_ids is None:
                raise ValueError("images need input_ids to locate the image tokens")
            feats = self.get_image_features(pixel_values, image_grid_thw)
            merge = merge_row_image_features if feats.ndim == 3 else merge_image_features
            inputs_embeds = merge(inputs_embeds, input_ids == c.image_token_id, feats)
        hidden, new_cache = self.model.language_model(inputs_embeds, attention_mask, position_ids,
                                                      kv_cache, cache_index, final_norm)
        logits = None
        if compute_logits:
            if not final_norm:
                raise ValueError("logits need the final norm: compute_logits with final_norm")
            if c.tie_word_embeddings:
                logits = self.model.language_model.attend_logits(hidden)
            else:
                logits = self.lm_head(hidden)
            logits = logits.astype(jnp.float32)
        return Qwen2_5_VLOutput(logits=logits, last_hidden_state=hidden, kv_cache=new_cache)


def merge_image_features(inputs_embeds, image_mask, features):
    """Replace the image-token positions (row-major over (B, T), like torch masked_scatter) by the
    image features in order. The caller guarantees the counts match (get_rope_index checks it)."""
    b, t, d = inputs_embeds.shape
    flat_mask = image_mask.reshape(-1)
    order = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)
    merged = jnp.where(flat_mask[:, None], features.astype(inputs_embeds.dtype)[order],
                       inputs_embeds.reshape(-1, d))
    return merged.reshape(b, t, d)


def merge_row_image_features(inputs_embeds, image_mask, features):
    """`merge_image_features` with features per row (B, n, D): row b's image-token positions take
    row b's features in order. A row-local gather, so it stays on the row's device; equal to the
    flat form when every row has its n image tokens (get_rope_index checks the total)."""
    order = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features.astype(inputs_embeds.dtype), order[..., None], axis=1)
    return jnp.where(image_mask[..., None], gathered, inputs_embeds)


# ----------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------


def get_rope_index(config: Qwen2_5_VLConfig, input_ids: np.ndarray, image_grid_thw=None,
                   attention_mask: np.ndarray | None = None):
    """M-RoPE positions, numpy port of HF `Qwen2_5_VLModel.get_rope_index` (images only).

    Text tokens get 1-D positions (same on the 3 rows); each run of image tokens gets
    (t, h, w) grid positions offset by the current position, after which text resumes at
    `current + max(h, w) // merge`. Padding (attention_mask 0) gets position 0.
    Returns (position_ids int32 (3, B, T), rope_deltas int (B, 1)).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    b, t = input_ids.shape
    mask = (np.ones((b, t), bool) if attention_mask is None
            else np.asarray(attention_mask).astype(bool))
    if mask.shape != (b, t):
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, t)}")
    merge = config.vision_config.spatial_merge_size
    grids = list(_check_grid(image_grid_thw, merge)) if image_grid_thw is not None else []
    if np.any(input_ids == config.video_token_id):
        raise ValueError("video tokens are not supported")
    n_image_tokens = int(np.sum((input_ids == config.image_token_id) & mask))
    expected = sum(g[0] * g[1] * g[2] // merge ** 2 for g in grids)
    if n_image_tokens != expected:
        raise ValueError(f"{n_image_tokens} image tokens in input_ids but image_grid_thw "
                         f"{tuple(grids)} gives {expected} merged image features")
    grid_iter = iter(grids)
    position_ids = np.zeros((3, b, t), np.int64)
    deltas = []
    for i in range(b):
        ids = input_ids[i][mask[i]]
        is_image = (ids == config.image_token_id).astype(int)
        chunks, cur = [], 0
        for kind, group in itertools.groupby(is_image):
            n = len(list(group))
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
                cur += n
            else:
                gt, gh, gw = next(grid_iter)
                lt, lh, lw = gt, gh // merge, gw // merge
                if lt * lh * lw != n:
                    raise ValueError(f"a run of {n} image tokens does not match its grid "
                                     f"{(gt, gh, gw)} ({lt * lh * lw} merged tokens)")
                tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh) + cur, np.arange(lw) + cur,
                                         indexing="ij")
                chunks.append(np.stack([tt.reshape(-1) + cur, hh.reshape(-1), ww.reshape(-1)]))
                cur += max(gh, gw) // merge
        pos = np.concatenate(chunks, 1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, i, mask[i]] = pos
        deltas.append((pos.max() + 1 if pos.size else 0) - len(ids))
    return position_ids.astype(np.int32), np.asarray(deltas, np.int64)[:, None]


def intermediates_filter(module, method_name) -> bool:
    """capture_intermediates filter: decoder layer outputs only."""
    return isinstance(module, Qwen2_5_VLDecoderLayer) and method_name == "__call__"


def hidden_states(model: Qwen2_5_VLForConditionalGeneration, params, input_ids, attention_mask,
                  position_ids, *, return_output: bool = False, final_norm: bool = True, **kw):
    """(L+1, B, T, D) with HF `output_hidden_states` meaning: [0] embeddings after the image merge,
    [k] output of decoder layer k-1, [L] the final-normed output (replacing the last layer's).
    With `final_norm` False, [L] is the last layer's output itself: what a model cut to its
    first L layers (`keep_layers`) gives for hidden state L of the whole model.

    Other keyword arguments go to the model's `__call__` (compute_logits defaults to False here).
    With `return_output`, returns (hidden states, Qwen2_5_VLOutput) from the same forward pass.
    """
    kw.setdefault("compute_logits", return_output)
    out, state = model.apply({"params": params}, input_ids, attention_mask, position_ids,
                             capture_intermediates=intermediates_filter,
                             mutable=["intermediates"], **kw)
    lm = state["intermediates"]["model"]["language_model"]
    emb = lm["inputs_embeds"][0]
    n = model.config.num_hidden_layers
    if model.config.scan_layers:
        layer_out = lm["layers"]["__call__"][0][0]  # (L, B, T, D): the carry, stacked
        per_layer = [layer_out[i] for i in range(n)]
    else:
        per_layer = [lm[f"layers_{i}"]["__call__"][0][0] for i in range(n)]
    last = out.last_hidden_state if final_norm else per_layer[-1]
    stacked = jnp.stack([emb, *per_layer[:-1], last])
    return (stacked, out) if return_output else stacked


def num_decoder_layers(params) -> int:
    """Decoder layers held by an MLLM parameter tree (either layer layout)."""
    lm = params["model"]["language_model"]
    if "layers" in lm:
        return int(jax.tree.leaves(lm["layers"])[0].shape[0])
    return sum(1 for k in lm if k.startswith("layers_") and k[len("layers_"):].isdigit())


def keep_layers(params, depth: int):
    """The MLLM parameter tree cut to its first `depth` decoder layers (the embedding, the final
    norm and the vision tower stay). Arrays, host arrays and ShapeDtypeStructs alike; a stacked
    layout is sliced along its layer axis."""
    def first(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((depth, *x.shape[1:]), x.dtype, sharding=x.sharding)
        return x[:depth]

    def cut(lm):
        if "layers" in lm:
            return {**lm, "layers": jax.tree.map(first, lm["layers"])}
        return {k: v for k, v in lm.items() if not (
            k.startswith("layers_") and k[len("layers_"):].isdigit()
            and int(k[len("layers_"):]) >= depth)}
    have = num_decoder_layers(params)
    if not 1 <= depth <= have:
        raise ValueError(f"cannot keep {depth} of the {have} decoder layers")
    return _map_language_model(params, cut)


def decoder_layer_params(params, index: int):
    """Decoder layer `index`'s parameters, as `Qwen2_5_VLDecoderLayer` takes them (a stacked
    layout sliced at `index`)."""
    lm = params["model"]["language_model"]
    if "layers" in lm:
        return jax.tree.map(lambda x: x[index], lm["layers"])
    return lm[f"layers_{index}"]


def scan_params(params, config: Qwen2_5_VLConfig):
    """Per-layer layout (`layers_0..`) -> scan layout (`layers`, leading layer axis)."""
    return _map_language_model(params, lambda lm: param_tree.stack_layers(lm, "layers",
                                                               config.num_hidden_layers))


def unscan_params(params, config: Qwen2_5_VLConfig):
    """Scan layout -> per-layer layout."""
    return _map_language_model(params, lambda lm: param_tree.unstack_layers(lm, "layers"))


def _map_language_model(params, fn):
    params = dict(params)
    model = dict(params["model"])
    model["language_model"] = fn(dict(model["language_model"]))
    params["model"] = model
    return params


def _init_inputs(config: Qwen2_5_VLConfig):
    """Smallest inputs touching every parameter: one image of one merged token, one token."""
    m = config.vision_config.spatial_merge_size
    input_ids = jnp.full((1, 1), config.image_token_id, jnp.int32)
    pixel_values = jnp.zeros((m * m, config.vision_config.patch_dim), jnp.float32)
    return (input_ids, jnp.ones((1, 1), jnp.int32), jnp.zeros((3, 1, 1), jnp.int32)), \
        dict(pixel_values=pixel_values, image_grid_thw=((1, m, m),))


def init_params(config: Qwen2_5_VLConfig, rng, dtype=jnp.float32):
    """Randomly initialised (boxed, logically partitioned) "params" collection."""
    args, kw = _init_inputs(config)
    return Qwen2_5_VLForConditionalGeneration(config, dtype).init(rng, *args, **kw)["params"]


def abstract_params(config: Qwen2_5_VLConfig, dtype=jnp.float32):
    """Shapes (and logical axes) of the "params" collection, without allocating anything."""
    return jax.eval_shape(lambda r: init_params(config, r, dtype), jax.random.PRNGKey(0))
