"""SANA transformer: diffusers `transformer/` directory (config.json + safetensors) -> Orbax.

    python -m uniimage_jax.cli.convert dit --src Sana_1600M_512px_diffusers/transformer --dst out/dit

The Flax port (`uniimage_jax.models.sana`) names every submodule after its diffusers attribute,
so the mapping is the package-wide convention alone: `transformer_blocks.3.attn2.to_out.0.weight`
-> `transformer_blocks_3/attn2/to_out_0/kernel`. Layouts are the defaults too (Linear transposed,
convs to (kh, kw, I/groups, O), the depthwise 3x3 included). The result is the per-block layout;
`uniimage_jax.models.sana.scan_params` stacks it for `scan_layers=True`.
"""

from __future__ import annotations

import json
import os

from uniimage_jax.errors import ConversionError
from uniimage_jax.convert import key_plan
from uniimage_jax.convert import sources
from uniimage_jax.models.sana import SanaConfig, abstract_params

# Nothing to rewrite, drop or re-lay out (see the module docstring).
KEYMAP = key_plan.KeyMap()

KIND = "dit"
# The diffusers ModuleLists among the Flax names (`transformer_blocks_3` is
# `transformer_blocks.3`; `linear_1` stays `linear_1`): for naming exported LoRA adapters.
LIST_MODULES = ("transformer_blocks", "to_out")


def read_config(src_dir: str) -> SanaConfig:
    path = os.path.join(src_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{src_dir} is not a diffusers SANA transformer directory: "
                                "config.json is missing")
    with open(path) as fh:
        raw = json.load(fh)
    try:
        return SanaConfig.from_diffusers(raw)
    except (TypeError, ValueError) as e:  # unsupported option / wrong value: a bad checkpoint
        raise ConversionError(path, other=[str(e)]) from e


def convert_sana(src_dir: str, progress: bool = False) -> tuple[SanaConfig, dict]:
    """(config, params) from a diffusers `SanaTransformer2DModel` directory (one safetensors file
    or shards with an index). Strict: every tensor must map to a parameter of the same shape and
    every parameter must be produced, else `ConversionError` names all offenders. `params` is
    the `params` collection (nested dict of fp32 numpy arrays, per-block layout)."""
    config = read_config(src_dir)
    source = sources.SafetensorsSource(src_dir)
    params = key_plan.convert(source, KEYMAP, abstract_params(config), progress=progress)
    return config, params


