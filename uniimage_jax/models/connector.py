"""The connector shared by every ladder layer (official `MLLMInContext.connector`).

PyTorch: `nn.Sequential(Linear(d_mllm, C), GELU(tanh), Linear(C, C), RMSNorm(C, eps=1e-5))` with
C = SANA's caption_channels and the RMSNorm weight initialised to sqrt(5.5). The same weights are
applied to the hidden states of every selected MLLM layer; SANA's own caption_projection and
caption_norm follow inside the transformer.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from uniimage_jax.models.layers import dense, gelu_tanh

CONNECTOR_NORM_INIT = math.sqrt(5.5)


class Connector(nn.Module):
    """(..., d_mllm) -> (..., caption_channels). Submodule names are ours; the official
    `connector.0/2/3` keys map onto `linear_1/linear_2/norm` in the TBAC converter."""

    caption_channels: int
    norm_eps: float = 1e-5
    norm_init: float = CONNECTOR_NORM_INIT
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.caption_channels, ("embed", "mlp"), dtype=self.dtype, name="linear_1")(x)
        x = gelu_tanh(x)
        x = dense(self.caption_channels, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(x)
        # diffusers RMSNorm: statistics in fp32, then times the (fp32) weight.
        scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.constant(self.norm_init), ("norm",)), (self.caption_channels,),
            jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x32), -1, keepdims=True)
                                            + self.norm_eps))
        return (x32 * scale).astype(self.dtype)
