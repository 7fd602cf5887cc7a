"""`uniimage-convert`: PyTorch checkpoints (safetensors) -> converted checkpoints (Orbax), and back.

Subcommands: `mllm`, `dit`, `vae`, `tbac` (import), `export-tbac`, `export-lora`, `merge-lora`.
The conversions themselves live in `uniimage_jax.convert` (one module per format, whose docstring
is the subcommand's description); this module is their command-line half: arguments, the check
that `--dst` is free before a long conversion, loading training stages, writing the result.
A checkpoint that does not match its architecture exits with status 2 and a message naming every
missing, unexpected and mis-shaped tensor; nothing is written in that case.

The import subcommands' `--src`, and tbac's `--mllm`, `--dit` and `--vae`, take a local directory
or a Hugging Face model id as its model card spells it (`Qwen/Qwen2.5-VL-3B-Instruct`,
`ORG/NAME@REVISION`, `ORG/NAME/SUBFOLDER`; uniimage_jax/hub.py): only the files read are fetched,
into the Hub cache, and read from it offline. A diffusers pipeline's id (or directory) given to
`dit` / `vae` is read at its transformer/ or vae/ folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from uniimage_jax import hub, storage
from uniimage_jax.checkpoints import converted
from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax.errors import UserError

# ------------------------------------------------------------------------------------------------
# Shared arguments.
# ------------------------------------------------------------------------------------------------


HUB_HELP = " or its Hugging Face model id (ORG/NAME[@REVISION][/SUBFOLDER])"


def add_src_dst_arguments(parser, src_help: str) -> None:
    """The arguments every import subcommand takes."""
    parser.add_argument("--src", required=True, help=src_help + " (local or gs://)" + HUB_HELP)
    parser.add_argument("--dst", required=True,
                        help="output directory (Orbax params + config; local or gs://)")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")


def add_stage_export_arguments(parser, dst_help: str, src_help: str) -> None:
    """--src (a stage or converted directory), --dst, --weights, --overwrite."""
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help=dst_help)
    parser.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                        help="a training stage's EMA or raw trainable weights (default: the EMA "
                             "when the stage kept one)")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")


def local_source(path: str | None) -> str | None:
    """A PyTorch checkpoint (a directory, or one .safetensors file) as a local path: one on Cloud
    Storage is downloaded once into the local cache (`storage.local_mirror` / `local_copy`;
    of a directory only its safetensors and JSON files, what a conversion reads), since
    safetensors' lazy reader maps local files; local paths are returned unchanged."""
    if not path or not storage.is_remote(path):
        return path
    if storage.is_file(path):
        return storage.local_copy(path)
    if not storage.is_dir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    print(f"copying {path} into the local cache {storage.default_cache_dir()}")
    return storage.local_mirror(path, suffixes=(".safetensors", ".json"))


def refuse_existing(dst: str, overwrite: bool) -> None:
    """Fail before a (long) conversion rather than after it."""
    if storage.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")


def load_stage(src: str, weights: str):
    """(config, params, origin) of a converted directory or a training stage (its latest step),
    layers stored apart, the weights chosen printed."""
    from uniimage_jax.checkpoints.loader import layers_apart, load_uniimage, resolve_weights

    weights = resolve_weights(src, weights)
    print(f"reading the {weights} weights of {src}")
    config, params, origin = load_uniimage(src, weights)
    # Exports name layers one by one: a stage trained with scanned layers is unstacked here.
    return (*layers_apart(config, params), origin)


def load_lora_stage(src: str, weights: str):
    """`load_stage` of a stage that must have LoRA adapters."""
    config, params, origin = load_stage(src, weights)
    if config.lora is None:
        raise UserError(f"{src} was not trained with LoRA (config.lora.rank is 0): it has no "
                        "adapters")
    return config, params, origin


# ------------------------------------------------------------------------------------------------
# Import: PyTorch -> converted checkpoint.
# ------------------------------------------------------------------------------------------------


def _mllm_arguments(parser) -> None:
    add_src_dst_arguments(parser, "Hugging Face Qwen2.5-VL directory (config.json + safetensors)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="store decoder layers stacked for nn.scan (config.scan_layers=True)")


def _import_component(args, kind: str, convert, describe, component: str | None = None) -> None:
    """A component conversion (`convert(args) -> (config, params)`) written as a converted
    directory of `kind`, `--dst` checked first, then `--src` resolved (a Hub id fetched; a
    diffusers pipeline entered at `component`); `describe(config)` says what was written."""
    refuse_existing(args.dst, args.overwrite)
    args.src = local_source(hub.resolve(args.src, what="--src", component=component))
    config, params = convert(args)
    converted.save_converted(args.dst, params, {"kind": kind, kind: config.to_dict()},
                             overwrite=args.overwrite)
    print(f"wrote {describe(config)}to {args.dst}")


def _run_mllm(args) -> None:
    from uniimage_jax.convert.qwen2_5_vl import convert_qwen

    _import_component(
        args, "mllm",
        lambda a: convert_qwen(a.src, progress=True, scan_layers=a.scan_layers),
        lambda c: f"Qwen2.5-VL ({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                  f"scan_layers={c.scan_layers}) ")


def _dit_arguments(parser) -> None:
    add_src_dst_arguments(parser, "diffusers transformer/ directory (config.json + safetensors)")


def _run_dit(args) -> None:
    from uniimage_jax.convert.sana import convert_sana

    _import_component(args, "dit", lambda a: convert_sana(a.src, progress=True), lambda c: "",
                      component="transformer")


def _vae_arguments(parser) -> None:
    add_src_dst_arguments(parser, "diffusers AutoencoderDC directory (config.json + safetensors)")


def _run_vae(args) -> None:
    from uniimage_jax.convert.dc_ae import convert_dc_ae

    _import_component(
        args, "vae", lambda a: convert_dc_ae(a.src, progress=True),
        lambda c: f"DC-AE ({c.latent_channels} latent channels, "
                  f"f{c.spatial_compression_ratio}) ", component="vae")


def _tbac_arguments(parser) -> None:
    parser.add_argument("--src", required=True,
                        help="directory (or .safetensors file) of the official state dict"
                             + HUB_HELP + ", e.g. TencentBAC/TBAC-UniImage-3B")
    parser.add_argument("--mllm", default=None,
                        help="HF Qwen2.5-VL directory whose config.json gives the MLLM "
                             "architecture (default: Qwen2.5-VL-3B-Instruct)" + HUB_HELP
                             + ": only its config.json is fetched")
    parser.add_argument("--dit", default=None,
                        help="diffusers transformer directory (default: SANA-1600M 512px)"
                             + HUB_HELP + ": only the config")
    parser.add_argument("--vae", default=None,
                        help="diffusers vae directory (default: DC-AE f32c32 sana-1.0)"
                             + HUB_HELP + ": only the config")
    parser.add_argument("--dst", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")


def _run_tbac(args) -> None:
    from uniimage_jax.convert.tbac import convert_tbac, source_record

    refuse_existing(args.dst, args.overwrite)
    args.src = local_source(hub.resolve(args.src, what="--src"))
    # The components' architectures are read from their config.json: nothing else is fetched.
    args.mllm = local_source(hub.resolve(args.mllm, files=hub.CONFIG, what="--mllm"))
    args.dit = local_source(hub.resolve(args.dit, files=hub.CONFIG, what="--dit",
                                        component="transformer"))
    args.vae = local_source(hub.resolve(args.vae, files=hub.CONFIG, what="--vae",
                                        component="vae"))
    config, params, tensors = convert_tbac(args.src, args.mllm, args.dit, args.vae, progress=True)
    converted.save_converted(args.dst, params, {"kind": "tbac", "tbac": config.to_dict()},
                             overwrite=args.overwrite, keys=source_record(args.src, tensors))
    print(f"wrote {args.dst}")


# ------------------------------------------------------------------------------------------------
# Export: converted checkpoint or training stage -> PyTorch layouts.
# ------------------------------------------------------------------------------------------------


def _export_tbac_arguments(parser) -> None:
    add_stage_export_arguments(
        parser, "output directory for the safetensors",
        "converted TBAC-UniImage directory or training stage directory")
    parser.add_argument("--keys-from", default=None,
                        help="converted TBAC-UniImage directory whose source_keys.json gives the "
                             "official layout (default: --src, or the stage's pretrained.tbac)")


def _run_export_tbac(args) -> None:
    from uniimage_jax.convert.tbac_export import export_state_dict, read_record, write_safetensors
    from uniimage_jax.models import lora

    refuse_existing(args.dst, args.overwrite)
    config, params, origin = load_stage(args.src, args.weights)
    if config.lora is not None:  # the official layout has no adapters: fold them in
        params = lora.merge(params, config.lora)
        print("LoRA adapters merged into the exported weights")
    keys_from = args.keys_from or (args.src if storage.exists(
        storage.join(args.src, converted.SOURCE_KEYS_FILE)) else origin)
    if not keys_from:
        raise FileNotFoundError(f"{args.src} was not converted from an official checkpoint and "
                                "no --keys-from was given: the official key layout is unknown")
    record = read_record(keys_from)
    tensors = export_state_dict(params, record["tensors"])
    source_config = record["config_json"] or {"num_metaqueries": config.num_metaqueries}
    write_safetensors(tensors, args.dst, overwrite=args.overwrite,
                      json_files={"config.json": source_config},
                      metadata=record["safetensors_metadata"])
    print(f"wrote {args.dst}")


def _export_lora_arguments(parser) -> None:
    add_stage_export_arguments(parser, "output directory", "training stage directory of a LoRA run")


def _run_export_lora(args) -> None:
    import jax

    from uniimage_jax.convert.lora_export import export_lora

    refuse_existing(args.dst, args.overwrite)
    config, params, _ = load_lora_stage(args.src, args.weights)
    written = export_lora(config, jax.device_get(params), args.dst, overwrite=args.overwrite)
    print(f"wrote {', '.join(written)} to {args.dst}")


MERGE_LORA_DOC = """A LoRA training stage with its adapters folded into the weights: a converted
TBAC-UniImage.

    uniimage-convert merge-lora --src STAGE_DIR [--weights auto|ema|raw] --dst OUT

Each adapted kernel becomes `W + (alpha / r) A B` (fp32); everything else is the stage's weights
as loaded (frozen towers from the weights it was trained from, its trained additions). OUT is a
converted TBAC-UniImage directory: `uniimage-sample`, `pretrained.tbac` and `export-tbac` take
it (export-tbac through the official key record, copied when the stage started from one).
"""


def _merge_lora_arguments(parser) -> None:
    add_stage_export_arguments(parser, "output directory (a converted checkpoint)",
                               "training stage directory of a LoRA run")


def _run_merge_lora(args) -> None:
    import jax

    from uniimage_jax.models import lora

    refuse_existing(args.dst, args.overwrite)
    config, params, origin = load_lora_stage(args.src, args.weights)
    merged = jax.device_get(lora.merge(params, config.lora))
    record = None
    if origin and storage.exists(storage.join(origin, converted.SOURCE_KEYS_FILE)):
        record = json.loads(storage.read_text(storage.join(origin, converted.SOURCE_KEYS_FILE)))
    plain = dataclasses.replace(config, lora=None)
    converted.save_converted(args.dst, merged, {"kind": "tbac", "tbac": plain.to_dict()},
                             overwrite=args.overwrite, keys=record)
    print(f"wrote {args.dst} (adapters of {args.src} merged)")


# subcommand -> (module whose docstring describes it, one-line help, add_arguments, run)
SUBCOMMANDS = {
    "mllm": ("uniimage_jax.convert.qwen2_5_vl", "Qwen2.5-VL HF directory -> Orbax",
             _mllm_arguments, _run_mllm),
    "dit": ("uniimage_jax.convert.sana", "SANA transformer diffusers directory -> Orbax",
            _dit_arguments, _run_dit),
    "vae": ("uniimage_jax.convert.dc_ae", "DC-AE diffusers directory -> Orbax",
            _vae_arguments, _run_vae),
    "tbac": ("uniimage_jax.convert.tbac", "official TBAC-UniImage state dict -> Orbax",
             _tbac_arguments, _run_tbac),
    "export-tbac": ("uniimage_jax.convert.tbac_export",
                    "Orbax -> official TBAC-UniImage state dict",
                    _export_tbac_arguments, _run_export_tbac),
    "merge-lora": (None, "LoRA stage -> checkpoint, adapters merged",
                   _merge_lora_arguments, _run_merge_lora),
    "export-lora": ("uniimage_jax.convert.lora_export",
                    "LoRA stage -> diffusers (DiT) / PEFT (MLLM) adapter files",
                    _export_lora_arguments, _run_export_lora),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniimage-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text, add_arguments, run) in SUBCOMMANDS.items():
        description = importlib.import_module(module_name).__doc__ if module_name \
            else MERGE_LORA_DOC
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        add_debug_argument(p)
        p.set_defaults(_run=run)
    return parser


# The flags of each subcommand that name something to read: checked before anything loads, so a
# mistyped path is named as the flag the user typed rather than as a file missing inside it.
_SOURCE_FLAGS = ("src", "mllm", "dit", "vae", "keys_from")


def check_sources_exist(args) -> None:
    """A Hugging Face id is left to `hub.resolve` (which names a model missing from the cache);
    a local or gs:// path must exist."""
    for flag in _SOURCE_FLAGS:
        path = getattr(args, flag, None)
        if path is not None and not hub.is_hub_id(path) and not storage.exists(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file or "
                                    "directory")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        check_sources_exist(args)
        return args._run(args)

    return run_command(f"uniimage-convert {args.command}", run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
