"""`uniimage-sample`: images from a TBAC-UniImage checkpoint, for prompts or a benchmark.

    uniimage-sample --checkpoint DIR [--processor DIR] (--prompt TEXT | --prompts-file FILE)
        [--image IN.png] [--num-images 4] [--steps 30] [--guidance 4.5] [--image-guidance 1.5]
        [--seed 0] [--negative-prompt TEXT] [--scheduler dpm_solver|euler]
        [--dtype float32|bfloat16] [--param-dtype float32|bfloat16] [--images-per-call 4]
        [--prompts-per-call 1] [--mesh auto|data=A,fsdp=B,tensor=C] [--skip-existing]
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
argument, the checkpoint path and the resolved scheduler; `OUT/manifest.json` every file written
with its SHA-256 and the run and process that wrote it (`uniimage_jax.eval.sample_run`).
--num-images defaults to what the layout scores (4; TIIF-Bench 1).

Devices and hosts: the prompts are dealt to the processes of a multi-host run (`jax.distributed`,
started from the environment as the trainer starts it: JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, or a Cloud TPU VM), and each process samples its share
on a mesh of its own devices, every device conditioning, denoising and decoding prompts of its
own (`uniimage_jax.sampling.mesh_sampler`). --mesh auto keeps the weights (stored in
--param-dtype, default --dtype's) replicated on every device when they fit, else splits them
FSDP-wise over the fewest devices that hold them; --mesh data=A,fsdp=B,tensor=C lays out each
host's devices as training does. With replicated weights an image is bitwise the same on any
number of devices and processes; with split weights (fsdp or tensor > 1) XLA's partitioned
program may round a pixel by one level. --skip-existing resumes a run on any topology (the
settings must be the same: checked against OUT/settings.json).

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
    p.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16"),
                   help="dtype the weights are stored in on the devices (default: --dtype's)")
    p.add_argument("--mesh", default="auto",
                   help="mesh of each process's devices, data=A,fsdp=B,tensor=C as in training "
                        "(one size may be -1); default auto: weights replicated and every "
                        "device sampling prompts of its own, FSDP when they do not fit a device")
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
                   help="skip prompts whose output files all exist (resume a run, on any "
                        "number of devices and processes; the settings must be the same)")
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
    from uniimage_jax.train.inference_layout import parse_mesh

    parse_mesh(args.mesh)
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
        return writers.geneval_jobs(args.metadata, args.num_images, grid=not args.no_grid)
    if args.benchmark == "dpg":
        return writers.dpg_jobs(args.prompts_dir, args.num_images)
    if args.benchmark == "tiif":
        return writers.tiif_jobs(args.prompts_dir, args.model_name, args.num_images)
    prompts = ([args.prompt] if args.prompt is not None
               else writers.read_prompts_file(args.prompts_file))
    return writers.plain_jobs(prompts, args.num_images, grid=not args.no_grid)


# What the images and the files written depend on: a resumed run (--skip-existing) must have
# the same. The topology (--mesh, processes, devices) is not among them.
IDENTITY_ARGS = ("checkpoint", "weights", "processor", "benchmark", "model_name", "image",
                 "num_images", "seed", "dtype", "param_dtype", "height", "width", "no_binning",
                 "no_grid")


def _settings(args, cfg, weights: str) -> dict:
    identity = {name: getattr(args, name) for name in IDENTITY_ARGS}
    identity.update(weights=weights, sampling=dataclasses.asdict(cfg),
                    image_sha256=_file_sha256(args.image) if args.image else None)
    return {"args": vars(args), "checkpoint": absolute(args.checkpoint), "weights": weights,
            "processor": absolute(args.processor) if args.processor else None,
            "sampling": dataclasses.asdict(cfg),
            "scheduler": {"name": cfg.scheduler, "class": type(cfg.make_scheduler()).__name__,
                          **dataclasses.asdict(cfg.make_scheduler())},
            "identity": json.loads(json.dumps(identity))}


def _file_sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def _check_same_settings(out, settings: dict) -> None:
    """A resumed run into a folder sampled with other settings would mix two sets of images."""
    text = out.read_text(SETTINGS)
    old = (json.loads(text) if text else {}).get("identity")
    if old is None:
        return
    new = settings["identity"]
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise UserError(f"--skip-existing: {out.root} was sampled with other settings ({shown});"
                        " use another --out, or drop --skip-existing to sample everything anew")


SETTINGS = "settings.json"
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
    from uniimage_jax.train.distributed import maybe_initialize_distributed
    from uniimage_jax.train.inference_layout import parse_mesh

    requested_mesh = parse_mesh(args.mesh)
    maybe_initialize_distributed()  # before anything touches a device
    if requested_mesh is not None:  # a mesh this host's devices cannot take: now, not later
        import jax

        from uniimage_jax.train.sharding import make_mesh

        try:
            make_mesh(requested_mesh, jax.local_devices())
        except ValueError as e:
            raise UserError(f"--mesh {args.mesh}: {e}") from None
    args.dtype = args.dtype or default_compute_dtype()  # settings.json records the one used
    args.param_dtype = args.param_dtype or args.dtype
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
    return _run(args, cfg, jobs, requested_mesh)


def _run(args, cfg, jobs, requested_mesh) -> int:
    import jax
    from tqdm import tqdm

    from uniimage_jax.checkpoints.loader import load_for_inference, model_config, resolve_weights
    from uniimage_jax.data.images import open_rgb
    from uniimage_jax.eval.sample_run import sample_jobs
    from uniimage_jax.eval.writers import Output
    from uniimage_jax.models.layers import compute_dtype
    from uniimage_jax.train import distributed, inference_layout as layouts

    main = jax.process_index() == 0
    image = open_rgb(args.image) if args.image else None
    weights = resolve_weights(args.checkpoint, args.weights)
    # The size is checked against the checkpoint's config before the weights load.
    (height, width), output_size = _sample_size(args, model_config(args.checkpoint))
    out = Output(args.out)
    settings = _settings(args, cfg, weights)
    if args.skip_existing:
        _check_same_settings(out, settings)
    distributed.sync("uniimage_sample_settings_read")
    if main:
        print(f"uniimage-sample: {weights} weights of {args.checkpoint}", flush=True)
        out.write(SETTINGS, json.dumps(settings, indent=2))
    dtype = compute_dtype(args.dtype, "--dtype")
    model, params, processor = load_for_inference(args.checkpoint, args.processor, dtype=dtype,
                                                  weights=weights)
    param_dtype = compute_dtype(args.param_dtype, "--param-dtype")
    devices = jax.local_devices()
    mesh_config, why = layouts.choose_mesh(
        requested_mesh, len(devices), layouts.weight_bytes(params, param_dtype),
        layouts.device_memory(devices[0]))
    layout = layouts.make_layout(model, mesh_config, devices)
    params = layout.weights(layouts.stored(params, param_dtype))
    if main:
        print(f"uniimage-sample: {jax.process_count()} process(es), each on a "
              f"{layouts.describe(layout)} ({why})", flush=True)
    bar = tqdm(total=None, desc="prompts", unit="prompt", disable=not main)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = sample_jobs(jobs, out, model=model, params=params, processor=processor,
                              layout=layout, cfg=cfg, seed=args.seed,
                              num_images=args.num_images, image=image, height=height,
                              width=width, output_size=output_size,
                              skip_existing=args.skip_existing, settings=settings,
                              progress=progress)
    finally:
        bar.close()
    if main:
        print(f"wrote {summary.prompts - summary.done_before} prompt(s) to {args.out} "
              f"(run {summary.run}"
              + (f"; {summary.done_before} already there" if summary.done_before else "")
              + f"); {'complete' if summary.complete else 'INCOMPLETE'}: see "
              f"{storage.join(args.out, 'manifest.json')}")
    return 0


def _sample_size(args, config):
    """((height, width) to sample at, (height, width) to write or None); says when it snapped."""
    from uniimage_jax.sampling.sampler import binned_size, latent_shape

    height = config.image_size if args.height is None else args.height
    width = config.image_size if args.width is None else args.width
    if args.no_binning or (args.height is None and args.width is None):
        try:
            latent_shape(config, height, width)  # a size the model cannot take
        except UserError as e:
            raise UserError(f"--height {height} --width {width}"
                            f"{' (--no-binning)' if args.no_binning else ''}: {e}") from None
        return (height, width), None
    binned = binned_size(config, height, width)
    if binned != (height, width):
        print(f"uniimage-sample: {height}x{width} (height x width) snapped to the nearest "
              f"aspect-ratio bin {binned[0]}x{binned[1]}; images are resized and centre-cropped "
              f"back to {height}x{width} (--no-binning samples at exactly that size)")
    return binned, (height, width)


if __name__ == "__main__":
    sys.exit(main())
