"""`uniimage-sample`: images from a TBAC-UniImage checkpoint, for prompts or a benchmark.

    uniimage-sample --checkpoint DIR [--processor DIR] (--prompt TEXT | --prompts-file FILE)
        [--image IN.png] [--num-images 4] [--steps 30] [--guidance 4.5] [--image-guidance 1.5]
        [--seed 0] [--negative-prompt TEXT] [--scheduler dpm_solver|euler]
        [--dtype float32|bfloat16] [--images-per-call 4] [--prompts-per-call 1]
        [--height H --width W [--no-binning]] --out DIR
    uniimage-sample --checkpoint DIR --benchmark geneval \
        --metadata evaluation_metadata.jsonl --out DIR
    uniimage-sample --checkpoint DIR --benchmark dpg --prompts-dir DIR --out DIR
    uniimage-sample --checkpoint DIR --benchmark tiif --prompts-dir data/test_prompts \
        [--model-name uniimage] --out DIR

--checkpoint is a converted TBAC-UniImage (`uniimage-convert tbac`) or a training stage directory
(its latest step; its EMA weights when it kept them, unless --weights raw; the choice is printed
and recorded in settings.json; LoRA adapters are applied as they are). --processor is the
Qwen2.5-VL directory with the tokenizer and image processor, or its Hugging Face model id
(default: the `tiny_processor` a tiny training run wrote next to its stages).

Outputs (see `uniimage_jax.eval.writers`): for prompts, `OUT/<prompt 05d>_<sample 02d>.png` and
`OUT/<prompt 05d>_grid.png`; for GenEval, `OUT/<prompt 05d>/{metadata.jsonl,samples/0000.png,..,
grid.png}`; for DPG-Bench, `OUT/<item_id>.png` (2x2 grid); for TIIF-Bench,
`OUT/<type>/<model name>/{short,long}_description/<line>.png`. `OUT/settings.json` records every
argument, the checkpoint path and the resolved scheduler. --num-images defaults to what the layout
scores (4; TIIF-Bench 1).

Sample j of every prompt starts from the noise of `fold_in(PRNGKey(seed), j)` and is denoised in
group j // images-per-call, so an image depends neither on the other prompts in the file nor on
--num-images. One compiled conditioning call per prompt (prompts of similar length share its
compilation); one compiled denoising loop per --prompts-per-call groups of --images-per-call
samples (of one prompt or several; a group's images are bitwise the same in any call), with the
prompts' DiT context computed once before the loop; one batched decode per call's worth of
images. --dtype defaults to bfloat16 on GPUs and TPUs and float32 on CPUs (parameters stay
float32); --dtype float32 gives fp32 anywhere.

--height/--width (default: the model's square image size) are snapped to the nearest of SANA's
aspect-ratio bins scaled to the model's size, and the images resized and centre-cropped back to
the size asked for, as diffusers' SANA pipeline does; the command says when it snapped.
--no-binning samples at exactly that size (multiples of the autoencoder factor x patch size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from uniimage_jax import storage
from uniimage_jax.cli.arguments import PROCESSOR_HUB_HELP, add_dtype_argument
from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax.errors import ConfigError, UserError
from uniimage_jax.eval.writers import TIIF_SAMPLES
from uniimage_jax import hub
from uniimage_jax.paths import absolute

DEFAULT_NUM_IMAGES = 4    # plain prompts, GenEval and DPG-Bench


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniimage-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="converted TBAC-UniImage directory or training stage directory")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                   help="a training stage's EMA or raw trainable weights (default: the EMA when "
                        "the stage kept one)")
    p.add_argument("--processor", default=None,
                   help="Qwen2.5-VL directory with the tokenizer and image processor files"
                        + PROCESSOR_HUB_HELP)
    p.add_argument("--prompt", default=None, help="one caption")
    p.add_argument("--prompts-file", default=None, help="a text file, one caption per line")
    p.add_argument("--benchmark", default=None, choices=("geneval", "dpg", "tiif"),
                   help="write a benchmark's layout instead of plain prompt images")
    p.add_argument("--metadata", default=None,
                   help="GenEval evaluation_metadata.jsonl (with --benchmark geneval)")
    p.add_argument("--prompts-dir", default=None,
                   help="DPG-Bench prompts folder, one <item_id>.txt per prompt (--benchmark "
                        "dpg), or TIIF-Bench's folder of .jsonl prompt files (--benchmark tiif)")
    p.add_argument("--model-name", default="uniimage",
                   help="the <model name> folder of the TIIF-Bench layout (default %(default)s)")
    p.add_argument("--image", default=None,
                   help="input image for image+text-to-image (every prompt uses it)")
    p.add_argument("--num-images", type=int, default=None,
                   help=f"samples per prompt (default {DEFAULT_NUM_IMAGES}; DPG-Bench needs 4, "
                        "TIIF-Bench 1)")
    p.add_argument("--images-per-call", type=int, default=4,
                   help="samples denoised together (fixed, so an image never depends on "
                        "--num-images; lower it to save work when sampling fewer)")
    p.add_argument("--prompts-per-call", type=int, default=1,
                   help="groups of --images-per-call samples (one prompt's each) denoised by one "
                        "compiled call; raise it on accelerators to keep them busy (default "
                        "%(default)s)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.5, help="text guidance scale")
    p.add_argument("--image-guidance", type=float, default=1.5,
                   help="image guidance scale (with --image; exactly 1 drops the black-image row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default="", help="caption of the unconditional rows")
    p.add_argument("--scheduler", default="dpm_solver", choices=("dpm_solver", "euler"))
    add_dtype_argument(p, backend_dtype=True)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="pad every prompt to this many tokens (default: round up to 64); a "
                        "longer caption is cut to fit, with a warning naming it")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the model's image size)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels (default: the model's image size)")
    p.add_argument("--no-binning", action="store_true",
                   help="sample at exactly --height x --width instead of the nearest "
                        "aspect-ratio bin")
    p.add_argument("--no-grid", action="store_true", help="do not write grid images")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip prompts whose output files all exist (resume a run)")
    p.add_argument("--out", required=True, help="output directory")
    add_debug_argument(p)
    return p


# SamplingConfig's fields as this command's flags, so that its checks name what the user typed.
FLAG_OF_FIELD = {"num_steps": "--steps", "guidance_scale": "--guidance",
                 "image_guidance_scale": "--image-guidance", "scheduler": "--scheduler",
                 "images_per_call": "--images-per-call", "prompts_per_call": "--prompts-per-call",
                 "max_prompt_tokens": "--max-prompt-tokens"}


def _check_args(args) -> None:
    """Impossible combinations and missing files, before anything is loaded or compiled."""
    if args.benchmark is None:
        if (args.prompt is None) == (args.prompts_file is None):
            raise UserError("give exactly one of --prompt and --prompts-file "
                            "(or --benchmark geneval|dpg)")
        if args.prompt is not None and not args.prompt.strip():
            raise UserError("--prompt is empty")
    else:
        if args.prompt is not None or args.prompts_file is not None:
            raise UserError(f"--benchmark {args.benchmark} reads its own prompts; drop "
                            "--prompt/--prompts-file")
        need = {"geneval": "metadata", "dpg": "prompts_dir", "tiif": "prompts_dir"}[args.benchmark]
        if getattr(args, need) is None:
            raise UserError(f"--benchmark {args.benchmark} needs --{need.replace('_', '-')}")
    if args.image is not None and not os.path.isfile(args.image):
        raise FileNotFoundError(f"input image {args.image!r} does not exist")
    if not storage.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    if args.num_images is None:
        args.num_images = TIIF_SAMPLES if args.benchmark == "tiif" else DEFAULT_NUM_IMAGES
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")


def _jobs(args):
    from uniimage_jax.eval import writers

    if args.benchmark == "geneval":
        return writers.geneval_jobs(args.metadata, args.out, args.num_images,
                                    grid=not args.no_grid)
    if args.benchmark == "dpg":
        return writers.dpg_jobs(args.prompts_dir, args.out, args.num_images)
    if args.benchmark == "tiif":
        return writers.tiif_jobs(args.prompts_dir, args.out, args.model_name, args.num_images)
    prompts = ([args.prompt] if args.prompt is not None
               else writers.read_prompts_file(args.prompts_file))
    return writers.plain_jobs(prompts, args.out, args.num_images, grid=not args.no_grid)


def _settings(args, cfg, weights: str) -> dict:
    return {"args": vars(args), "checkpoint": absolute(args.checkpoint),
            "weights": weights,
            "processor": absolute(args.processor) if args.processor else None,
            "sampling": dataclasses.asdict(cfg),
            "scheduler": {"name": cfg.scheduler, "class": type(cfg.make_scheduler()).__name__,
                          **dataclasses.asdict(cfg.make_scheduler())}}


PATH_ARGS = ("checkpoint", "processor", "prompts_file", "metadata", "prompts_dir", "image", "out")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in PATH_ARGS:  # made absolute once, as they enter (settings.json records them)
        setattr(args, name, (hub.entered if name == "processor" else absolute)(
            getattr(args, name)))
    return run_command("uniimage-sample", lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    _check_args(args)
    # A Hugging Face model id is fetched (or found in the Hub cache) here, before any loading.
    args.processor = hub.resolve(args.processor, files=hub.PROCESSOR, what="--processor")
    from uniimage_jax.sampling.sampler import SamplingConfig, default_compute_dtype

    args.dtype = args.dtype or default_compute_dtype()  # settings.json records the one used
    try:  # the sampler's own checks, reported in this command's flags
        cfg = SamplingConfig(num_steps=args.steps, guidance_scale=args.guidance,
                             image_guidance_scale=args.image_guidance, scheduler=args.scheduler,
                             negative_prompt=args.negative_prompt,
                             max_prompt_tokens=args.max_prompt_tokens,
                             images_per_call=args.images_per_call,
                             prompts_per_call=args.prompts_per_call)
    except ConfigError as e:
        field, rest = str(e).split(" ", 1)
        raise UserError(f"{FLAG_OF_FIELD.get(field, field)} {rest}") from None
    jobs = _jobs(args)
    return _run(args, cfg, jobs)


def _run(args, cfg, jobs) -> int:
    from tqdm import tqdm

    from uniimage_jax.data.images import open_rgb
    from uniimage_jax.checkpoints.loader import load_for_inference, resolve_weights
    from uniimage_jax.models.layers import compute_dtype
    from uniimage_jax.sampling.sampler import generate_prompts

    image = open_rgb(args.image) if args.image else None
    weights = resolve_weights(args.checkpoint, args.weights)
    print(f"uniimage-sample: {weights} weights of {args.checkpoint}", flush=True)
    storage.makedirs(args.out)
    storage.write_text(storage.join(args.out, "settings.json"),
                       json.dumps(_settings(args, cfg, weights), indent=2))
    dtype = compute_dtype(args.dtype, "--dtype")
    model, params, processor = load_for_inference(args.checkpoint, args.processor, dtype=dtype,
                                                  weights=weights)
    (height, width), output_size = _sample_size(args, model.config)
    todo = [job for job in jobs if not (args.skip_existing and job.done())]
    skipped = len(jobs) - len(todo)
    with tqdm(total=len(todo), desc="prompts", unit="prompt") as bar:
        for i in range(0, len(todo), cfg.prompts_per_call):
            chunk = todo[i:i + cfg.prompts_per_call]
            images = generate_prompts(model, params, processor, [j.caption for j in chunk],
                                      image, num_images=args.num_images, seed=args.seed,
                                      cfg=cfg, height=height, width=width,
                                      output_size=output_size)
            for job, job_images in zip(chunk, images):
                job.write(job_images)
            bar.update(len(chunk))
    print(f"wrote {len(todo)} prompt(s) to {args.out}"
          + (f" ({skipped} already there)" if skipped else ""))
    return 0


def _sample_size(args, config):
    """((height, width) to sample at, (height, width) to write or None); says when it snapped."""
    from uniimage_jax.sampling.sampler import binned_size, latent_shape

    height = config.image_size if args.height is None else args.height
    width = config.image_size if args.width is None else args.width
    if args.no_binning or (args.height is None and args.width is None):
        latent_shape(config, height, width)  # a size the model cannot take: one-line error
        return (height, width), None
    binned = binned_size(config, height, width)
    if binned != (height, width):
        print(f"uniimage-sample: {height}x{width} (height x width) snapped to the nearest "
              f"aspect-ratio bin {binned[0]}x{binned[1]}; images are resized and centre-cropped "
              f"back to {height}x{width} (--no-binning samples at exactly that size)")
    return binned, (height, width)


if __name__ == "__main__":
    sys.exit(main())
