"""`uniimage-understand`: answer a question about images with a converted Qwen2.5-VL.

    uniimage-understand --checkpoint DIR --processor HF_DIR \
        --image X.png [--image Y.png] --question TEXT \
        [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--dtype bfloat16]

DIR is the output of `uniimage-convert mllm`, or a TBAC-UniImage checkpoint (the output of
`uniimage-convert tbac`, or a training stage directory): TBAC-UniImage keeps its MLLM frozen, so
its understanding is that of the Qwen2.5-VL inside it (`params["mllm"]`). HF_DIR is the Hugging
Face model directory (tokenizer, chat template and image processor files), or its model id
(`Qwen/Qwen2.5-VL-3B-Instruct`: fetched into the Hub cache once, read from it offline). Temperature 0 (the
default) is greedy decoding. The answer is printed to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

from uniimage_jax import storage
from uniimage_jax.cli.arguments import add_model_arguments
from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax import hub
from uniimage_jax.paths import absolute


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniimage-understand", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(
        p, required=True,
        checkpoint_help="converted Qwen2.5-VL (uniimage-convert mllm) or TBAC-UniImage "
                        "(uniimage-convert tbac, or a training stage directory)",
        processor_help="Hugging Face directory with the tokenizer and image processor")
    p.add_argument("--image", action="append", default=[],
                   help="an input image (repeat for several); none for a text-only question")
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    add_debug_argument(p)
    return p


def load_mllm(path: str):
    """(Qwen2_5_VLConfig, params) from a converted MLLM or from any TBAC-UniImage checkpoint."""
    import json

    from uniimage_jax.checkpoints import converted

    config_file = storage.join(path, converted.CONFIG_FILE)
    if storage.is_file(config_file):
        kind = json.loads(storage.read_text(config_file)).get("kind")
        if kind == "mllm":
            from uniimage_jax.checkpoints.converted import load_qwen

            return load_qwen(path)
    from uniimage_jax.checkpoints.loader import load_uniimage

    config, params, _ = load_uniimage(path)
    if config.lora is not None:  # text generation applies the MLLM directly: fold its adapters
        from uniimage_jax.models import lora

        params = lora.merge(params, config.lora)
    return config.mllm, params["mllm"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Made absolute once, as they enter (Orbax restores from absolute paths only).
    args.checkpoint, args.processor = absolute(args.checkpoint), hub.entered(args.processor)
    args.image = [absolute(p) for p in args.image]
    return run_command("uniimage-understand", lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    from uniimage_jax.errors import ConfigError

    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path!r} does not exist")
    if not storage.is_dir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint!r} does not exist")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):  # NaN fails too
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    # A Hugging Face model id is fetched (or found in the Hub cache) here, before any loading.
    args.processor = hub.resolve(args.processor, files=hub.PROCESSOR, what="--processor")

    import jax

    from uniimage_jax.data.images import open_rgb
    from uniimage_jax.models.layers import compute_dtype
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from uniimage_jax.processing.qwen import load_processor
    from uniimage_jax.sampling.text_generation import answer

    processor = load_processor(args.processor)
    images = [open_rgb(p) for p in args.image]
    config, params = load_mllm(args.checkpoint)
    dtype = compute_dtype(args.dtype, "--dtype")
    model = Qwen2_5_VLForConditionalGeneration(config, dtype)
    text = answer(model, params, processor, [images], [args.question],
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, rng=jax.random.PRNGKey(args.seed))[0]
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
