"""SANA transformer: diffusers `transformer/` directory (config.json + safetensors) -> Orbax.

    python -m uniimage_jax.convert.cli dit --src Sana_1600M_512px_diffusers/transformer --dst out/dit

The Flax port (`uniimage_jax.models.sana`) names every submodule after its diffusers attribute,
so the mapping is the package-wide convention alone: `transformer_blocks.3.attn2.to_out.0.weight`
-> `transformer_blocks_3/attn2/to_out_0/kernel`. Layouts are the defaults too (Linear transposed,
convs to (kh, kw, I/groups, O), the depthwise 3x3 included). The result is the per-block layout;
`uniimage_jax.models.sana.scan_params` stacks it for `scan_layers=True`.
"""

from __future__ import annotations

import json
import os

from uniimage_jax.convert import common
from uniimage_jax.models.sana import SanaConfig, abstract_params

# Nothing to rewrite, drop or re-lay out (see the module docstring).
KEYMAP = common.KeyMap()

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
        raise common.ConversionError(path, other=[str(e)]) from e


def convert_sana(src_dir: str, progress: bool = False) -> tuple[SanaConfig, dict]:
    """(config, params) from a diffusers `SanaTransformer2DModel` directory (one safetensors file
    or shards with an index). Strict: every tensor must map to a parameter of the same shape and
    every parameter must be produced, else `ConversionError` names all offenders. `params` is
    the `params` collection (nested dict of fp32 numpy arrays, per-block layout)."""
    config = read_config(src_dir)
    source = common.SafetensorsSource(src_dir)
    params = common.convert(source, KEYMAP, abstract_params(config), progress=progress)
    return config, params


def load_sana(path: str, abstract=None) -> tuple[SanaConfig, dict]:
    """(config, params) from a directory written by this converter (`run` / `save_converted`).

    abstract: optional abstract `params` tree (e.g. `abstract_params(config)` with shardings
    attached) to check the restore against and place it accordingly.
    """
    config, params = common.load_kind(path, KIND, abstract)
    return SanaConfig.from_dict(config), params


def add_arguments(parser) -> None:
    common.add_src_dst_arguments(parser, "diffusers transformer/ directory (config.json + "
                                 "safetensors)")


def run(args) -> None:
    common.refuse_existing(args.dst, args.overwrite)
    config, params = convert_sana(args.src, progress=True)
    common.save_converted(args.dst, params, {"kind": KIND, KIND: config.to_dict()},
                          overwrite=args.overwrite)
    print(f"wrote {args.dst}")
