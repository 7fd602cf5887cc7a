"""Rematerialisation (activation checkpointing) of a layer stack, chosen by name from config.

A policy decides which intermediate values of a layer the backward pass keeps; everything else is
recomputed. The names map to `jax.checkpoint_policies`:

  none                    no remat: every intermediate is kept (fastest, most memory)
  full                    keep nothing inside the layer, recompute it all (least memory)
  dots_saveable           keep matmul outputs, recompute the cheap elementwise work
  dots_no_batch_saveable  keep matmuls without batch dimensions (projections, not attention
                          scores): the usual choice for long sequences
  save_attention_outputs  keep only the attention outputs (tagged ATTENTION_OUTPUT in the layers)

Every policy gives the same values and gradients; they only trade memory for recomputation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from uniimage_jax.errors import ConfigError

# The tag the attention modules put on their outputs, for `save_attention_outputs`.
ATTENTION_OUTPUT = "attention_output"

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_outputs": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT),
}


def policy_name(value, field: str) -> str:
    """The policy name `value` stands for; a bool (older configs) means 'full' / 'none'.
    Anything else is a ConfigError naming `field` and the choices."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in POLICIES:
        raise ConfigError(f"{field}={value!r}: unknown remat policy; choose one of "
                          f"{sorted(POLICIES)}")
    return value


def wrap(module_cls, name: str, static_argnums=()):
    """`module_cls` under the named policy (the class itself for 'none')."""
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=POLICIES[name], static_argnums=static_argnums)


def tag_attention_output(x):
    """Name an attention output so `save_attention_outputs` keeps it (no-op otherwise)."""
    return checkpoint_name(x, ATTENTION_OUTPUT)
