"""A LoRA training stage with its adapters folded into the weights: a converted TBAC-UniImage.

    uniimage-convert merge-lora --src STAGE_DIR [--weights auto|ema|raw] --dst OUT

Each adapted kernel becomes `W + (alpha / r) A B` (fp32); everything else is the stage's weights
as loaded (frozen towers from the weights it was trained from, its trained additions). OUT is a
converted TBAC-UniImage directory: `uniimage-sample`, `pretrained.tbac` and `export-tbac` take
it (export-tbac through the official key record, copied when the stage started from one).
"""

from __future__ import annotations

import json
import os

from uniimage_jax.convert import common


def add_arguments(parser) -> None:
    from uniimage_jax.convert.lora_export import add_lora_stage_arguments

    add_lora_stage_arguments(parser, "output directory (a converted checkpoint)")


def run(args) -> None:
    import dataclasses

    import jax

    from uniimage_jax.convert.lora_export import load_lora_stage
    from uniimage_jax.models import lora

    common.refuse_existing(args.dst, args.overwrite)
    config, params, origin = load_lora_stage(args.src, args.weights)
    merged = jax.device_get(lora.merge(params, config.lora))
    record = None
    if origin and os.path.exists(os.path.join(origin, common.SOURCE_KEYS_FILE)):
        with open(os.path.join(origin, common.SOURCE_KEYS_FILE)) as fh:
            record = json.load(fh)
    plain = dataclasses.replace(config, lora=None)
    common.save_converted(args.dst, merged, {"kind": "tbac", "tbac": plain.to_dict()},
                          overwrite=args.overwrite, keys=record)
    print(f"wrote {args.dst} (adapters of {args.src} merged)")
