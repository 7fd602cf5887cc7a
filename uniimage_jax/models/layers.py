"""Small building blocks shared by the model ports.

Logical axis names used on parameters (the mesh rules in `configs/` map them to mesh axes):
  "embed"   model width (d_model) of a tower
  "mlp"     feed-forward hidden width
  "heads"   attention heads x head_dim (q/k/v output, o input)
  "kv"      key/value heads x head_dim (GQA)
  "vocab"   vocabulary
  "conv_in", "conv_out"  convolution channels
  "norm"    1-D norm / bias vectors that are never sharded
  "layers"  the stacked layer axis under scan_layers
  None      spatial kernel dims and anything replicated
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniimage_jax.errors import ConfigError

DType = jnp.dtype

# The compute / storage dtypes a user may name (config fields, `--dtype` flags). Parameters are
# created in float32 either way; these set the matmul inputs or how a frozen tower is stored.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, field: str = "dtype"):
    """The jnp dtype called `name`; a name outside `DTYPES` is a ConfigError naming `field`."""
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r}: expected one of {list(DTYPES)}")
    return DTYPES[name]


def dense(features: int, axes: Sequence[str | None], *, use_bias: bool = True, dtype=jnp.float32,
          name: str | None = None, kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
    """nn.Dense with fp32 parameters and logical axis names on kernel (in, out) and bias (out,)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


def gelu_exact(x):
    """torch.nn.GELU() / ACT2FN['gelu'] (erf form). jax.nn.gelu defaults to the tanh form."""
    return nn.gelu(x, approximate=False)


def gelu_tanh(x):
    """torch GELU(approximate='tanh') / ACT2FN['gelu_pytorch_tanh']."""
    return nn.gelu(x, approximate=True)


def depthwise_conv(x, kernel):
    """torch `Conv2d(C, C, k, padding=k // 2, groups=C, bias=False)` on NHWC: `x` (B, H, W, C),
    `kernel` (k, k, 1, C), the grouped-convolution kernel layout; the k * k products of an
    output summed in float32 and rounded once, as a convolution accumulates.

    Two forms of the same cross-correlation, chosen when the program is lowered, by the platform
    it is compiled for (`jax.lax.platform_dependent`, so an ahead-of-time TPU compile on a CPU
    host gets the TPU form):
      TPU    XLA's grouped convolution (`feature_group_count=C`). For the tbac_3b stage-1 step
             on v5p-8 (fsdp=4, 16 per chip) XLA estimates a DiT block at 7.09 ms this way
             against 7.91 ms as shifted multiply-adds (in the whole step). Compiled alone at the
             DiT's shape (16 x 16 x 16 x 11200 per chip) the shifted forward moves half the
             grouped forward's bytes (0.187 against 0.370 GB) and the grouped backward a quarter
             of the shifted one's (0.554 against 2.19 GB: the shifted form makes k * k
             reductions for the kernel's gradient); but a block with the shifted forward and
             the grouped backward (a custom VJP) came out slower in the DiT's forward and
             backward than the grouped form both ways (est. 8.19 against 8.01 ms a block), so
             the grouped form stays.
      other  k * k shifted multiply-adds. XLA's CPU backend runs a convolution with one
             channel per group tens of times slower (measured on 2 cores: 4x64x64x512 with a
             3x3 kernel 288 ms against 52 ms, 4x64x64x192 with a 5x5 kernel 214 ms against
             9 ms). GPU takes this form too (not measured there).
    """
    return jax.lax.platform_dependent(x, kernel, tpu=_grouped_depthwise,
                                      default=_shifted_depthwise)


def _grouped_depthwise(x, kernel):
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shifted_depthwise(x, kernel):
    k, (h, w) = kernel.shape[0], x.shape[1:3]
    pad = k // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            # float32 sums: in bfloat16 every partial sum would be rounded.
            term = (padded[:, i:i + h, j:j + w, :].astype(jnp.float32)
                    * kernel[i, j, 0].astype(jnp.float32))
            out = term if out is None else out + term
    return out.astype(x.dtype)
