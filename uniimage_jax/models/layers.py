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
