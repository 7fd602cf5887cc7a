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
    `kernel` (k, k, 1, C), the grouped-convolution kernel layout; products summed in float32.

    A depthwise convolution makes k * k multiply-adds per element: it is bound by memory traffic,
    so the fastest form is the one that moves the fewest bytes. Two forms of the same
    cross-correlation, chosen when the program is lowered, by the platform it is compiled for
    (`jax.lax.platform_dependent`, so an ahead-of-time TPU compile on a CPU host gets the TPU
    form):
      TPU    forward as k * k shifted multiply-adds, backward as the transpose of XLA's grouped
             convolution (`feature_group_count=C`). Compiled alone for one v5p chip at the
             tbac_3b DiT's shape (16 x 16 x 16 x 11200, bf16), XLA's estimates: the shifted
             forward reads the input once and writes the output once (0.187 GB, 0.079 ms), the
             grouped forward twice that (0.370 GB, 0.157 ms); backward, the grouped transpose
             moves 0.554 GB (0.236 ms: the input read once for the kernel's gradient, the
             output gradient once for the input's) where the shifted form's transpose makes
             k * k separate reductions for the kernel's gradient (2.19 GB, 0.93 ms).
      other  k * k shifted multiply-adds, forward and backward. XLA's CPU backend runs a
             convolution with one channel per group tens of times slower (measured on 2
             cores: 4x64x64x512 with a 3x3 kernel 288 ms against 52 ms, 4x64x64x192 with a
             5x5 kernel 214 ms against 9 ms). GPU takes this form too (not measured there).
    """
    return jax.lax.platform_dependent(x, kernel, tpu=_depthwise_shifted_then_grouped,
                                      default=_shifted_depthwise)


def _grouped_depthwise(x, kernel):
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        preferred_element_type=jnp.float32).astype(x.dtype)


def _shifted_depthwise(x, kernel):
    k, (h, w) = kernel.shape[0], x.shape[1:3]
    pad = k // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            # float32 sums, as a convolution accumulates: k * k bfloat16 roundings otherwise.
            term = (padded[:, i:i + h, j:j + w, :].astype(jnp.float32)
                    * kernel[i, j, 0].astype(jnp.float32))
            out = term if out is None else out + term
    return out.astype(x.dtype)


@jax.custom_vjp
def _depthwise_shifted_then_grouped(x, kernel):
    return _shifted_depthwise(x, kernel)


def _shifted_forward(x, kernel):
    return _shifted_depthwise(x, kernel), (x, kernel)


def _grouped_backward(residuals, out_grad):
    x, kernel = residuals
    return jax.vjp(_grouped_depthwise, x, kernel)[1](out_grad)


_depthwise_shifted_then_grouped.defvjp(_shifted_forward, _grouped_backward)
