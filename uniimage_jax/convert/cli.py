"""`uniimage-convert`: PyTorch checkpoints (safetensors) -> Orbax checkpoints, and back.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`.
A checkpoint that does not match its architecture exits with status 2 and a message naming every
missing, unexpected and mis-shaped tensor; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from uniimage_jax.cli.errors import add_debug_argument, run_command

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "mllm": ("uniimage_jax.convert.qwen2_5_vl", "Qwen2.5-VL HF directory -> Orbax"),
    "dit": ("uniimage_jax.convert.sana", "SANA transformer diffusers directory -> Orbax"),
    "vae": ("uniimage_jax.convert.dc_ae", "DC-AE diffusers directory -> Orbax"),
    "tbac": ("uniimage_jax.convert.tbac", "official TBAC-UniImage state dict -> Orbax"),
    "export-tbac": ("uniimage_jax.convert.tbac_export", "Orbax -> official TBAC-UniImage state dict"),
    "merge-lora": ("uniimage_jax.convert.lora_merge", "LoRA stage -> checkpoint, adapters merged"),
    "export-lora": ("uniimage_jax.convert.lora_export",
                    "LoRA stage -> diffusers (DiT) / PEFT (MLLM) adapter files"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniimage-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)  # every subcommand is built: none skipped
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        add_debug_argument(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"uniimage-convert {args.command}", lambda: args._run(args),
                       debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
