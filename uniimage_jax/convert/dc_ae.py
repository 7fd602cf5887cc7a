"""DC-AE: a diffusers `AutoencoderDC` directory (the `vae/` folder) -> Orbax checkpoint.

The source directory holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards with
an index). The Flax port (`uniimage_jax.models.dc_ae`) names every submodule after its diffusers
attribute, and nested `nn.Sequential` indices become `down_blocks_3_1`, so the package-wide naming
convention covers every key: the key map has no rewrites, and every tensor takes the default
layout change (Linear transposed, Conv2d to (kh, kw, in/groups, out), norm weight -> scale).

    uniimage-convert vae --src DIR/vae --dst OUT [--overwrite]
"""

from __future__ import annotations

import json
import os
from typing import Any

from uniimage_jax.errors import ConversionError
from uniimage_jax.convert import key_plan
from uniimage_jax.convert import sources
from uniimage_jax.models.dc_ae import AutoencoderDC, DCAEConfig

KEYMAP = key_plan.KeyMap()


def abstract_params(config: DCAEConfig) -> dict[str, Any]:
    """The (boxed, abstract) parameter tree of `AutoencoderDC(config)`; no memory allocated."""
    import jax
    import jax.numpy as jnp

    r = config.spatial_compression_ratio
    x = jax.ShapeDtypeStruct((1, r, r, config.in_channels), jnp.float32)
    model = AutoencoderDC(config)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]


def read_config(src_dir: str) -> DCAEConfig:
    path = os.path.join(src_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{src_dir} is not a diffusers AutoencoderDC directory: "
                                "config.json is missing")
    with open(path) as fh:
        raw = json.load(fh)
    try:
        return DCAEConfig.from_diffusers(raw)
    except (ValueError, NotImplementedError, TypeError) as e:  # the CLI reports it cleanly
        raise ConversionError(path, other=[str(e)]) from e


def convert_dc_ae(src_dir: str, progress: bool = False) -> tuple[DCAEConfig, dict[str, Any]]:
    """(config, params) from a diffusers `vae/` directory; params is the "params" collection as a
    nested dict of fp32 numpy arrays. Raises ConversionError naming every bad key."""
    config = read_config(src_dir)
    source = sources.SafetensorsSource(src_dir)
    params = key_plan.convert(source, KEYMAP, abstract_params(config), progress=progress)
    return config, params


