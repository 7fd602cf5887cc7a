"""`uniimage-demo`: the whole pipeline in a few CPU minutes, measured.

    uniimage-demo [--workdir ./uniimage_demo] [--steps N] [--num-prompts N] [--seed S]

1. builds the tiny preset (random frozen 4-layer MLLM, 4-block ladder DiT, 32 px pixel
   autoencoder) and scores the UNTRAINED model (step 0, the same initialisation training starts
   from) on held-out synthetic prompts;
2. trains it with `configs/demo.py` on the built-in synthetic shapes dataset (`uniimage_jax.train`,
   the same trainer as `uniimage-train`). Unlike the official recipe the tiny MLLM's language
   model is trained too: its weights are random, and random frozen features barely carry the
   caption (the intro line prints the trainable patterns);
3. samples the same prompts with the same noise from the trained model, scores them with the
   deterministic synthetic scorer (GenEval's rules), and prints both score tables side by side.

Held-out: training scenes come from the synthetic dataset's stream with `data.synthetic_seed`;
evaluation prompts come from `synthetic.prompts` (a separate random stream) with a different seed,
so no evaluated scene was trained on (captions can repeat: the vocabulary is 4 shapes x 7 colours).

Outputs under the workdir: `demo_grid.png` (trained; rows = prompts, columns = samples),
`demo_grid_untrained.png`, `demo_scores.json` (both score tables, the prompts, per-image verdicts,
timings), and the training stage `demo/` (checkpoint, metrics.jsonl, TensorBoard).
`--quick` shrinks everything to a smoke run for tests (a few steps; scores meaningless).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from typing import Sequence

GRID_FILE = "demo_grid.png"
UNTRAINED_GRID_FILE = "demo_grid_untrained.png"
SCORES_FILE = "demo_scores.json"
# Evaluation prompts are drawn with seed + this offset: never the training data's seed.
EVAL_SEED_OFFSET = 1000
QUICK = {"steps": 3, "num_prompts": 6, "num_images": 1, "sample_steps": 2, "batch_size": 4}


def default_config_path() -> str:
    """configs/demo.py of the source checkout this package runs from."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "configs", "demo.py")


def load_demo_config(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo config {path} not found: run from a source checkout "
                                "(pip install -e .) or pass --config PATH/TO/configs/demo.py")
    spec = importlib.util.spec_from_file_location("uniimage_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uniimage-demo",
        description="Train the tiny TBAC-UniImage on synthetic shapes for a few CPU minutes and "
                    "compare its compositional scores with the untrained model's.")
    p.add_argument("--workdir", default="./uniimage_demo",
                   help="output directory (grid, scores, training stage); default %(default)s")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the demo config's max_steps)")
    p.add_argument("--num-prompts", type=int, default=24,
                   help="held-out evaluation prompts, categories in turn (default %(default)s)")
    p.add_argument("--num-images", type=int, default=4,
                   help="samples per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="run seed: initialisation, data order, evaluation prompts and noise")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="denoising steps at evaluation (default: the demo's value)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale at evaluation (default: the demo's)")
    p.add_argument("--config", default=None,
                   help="the demo training config file (default: configs/demo.py of the checkout)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous demo run in --workdir first")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run for tests: {QUICK} (scores are meaningless)")
    return p


def _check_args(args) -> None:
    for name in ("steps", "num_prompts", "num_images", "sample_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"uniimage-demo: --{name.replace('_', '-')} must be >= 1, "
                             f"got {value}")
    if args.guidance is not None and args.guidance < 0:
        raise SystemExit(f"uniimage-demo: --guidance must be >= 0, got {args.guidance}")


def _configure(args):
    """The training config with the command-line choices applied (validated before compiling)."""
    config = load_demo_config(args.config or default_config_path())
    config.seed = args.seed
    if args.quick:
        config.batch_size = QUICK["batch_size"]
        steps = args.steps or QUICK["steps"]
        config.optimizer.warmup_steps = 1
    else:
        steps = args.steps or config.max_steps
    config.max_steps = steps
    # The cosine follows the demo's length; it must stay longer than the warm-up.
    config.optimizer.total_steps = max(steps, config.optimizer.warmup_steps + 1)
    config.checkpoint.every_steps = steps
    return config


def _sampling_config(config, args):
    from uniimage_jax.sampling.sampler import SamplingConfig

    steps = args.sample_steps or (QUICK["sample_steps"] if args.quick else config.sample_steps)
    guidance = config.sample_guidance if args.guidance is None else args.guidance
    # One fixed prompt length: every prompt reuses one compiled sampler.
    return SamplingConfig(num_steps=steps, guidance_scale=guidance,
                          max_prompt_tokens=config.model.max_prompt_tokens)


def evaluate(model, params, processor, eval_prompts, num_images: int, seed: int, cfg):
    """(scores, images per prompt, per-image verdicts). Sample j of prompt i uses noise seed
    (seed, i, j), identical for the untrained and the trained model."""
    from uniimage_jax.eval.synthetic_scorer import score_image, score_images
    from uniimage_jax.sampling.sampler import generate

    images, verdicts, pairs = [], [], []
    for i, (caption, metadata) in enumerate(eval_prompts):
        row = generate(model, params, processor, caption, num_images=num_images,
                       seed=seed * 100_003 + i, cfg=cfg)
        images.append(row)
        verdicts.append([bool(score_image(im, metadata)) for im in row])
        pairs += [(im, metadata) for im in row]
    return score_images(pairs), images, verdicts


def _save_grid(rows, path: str) -> str:
    from uniimage_jax.sampling.grid import save_grid

    return save_grid([im for row in rows for im in row], path, cols=len(rows[0]))


def format_table(untrained: dict, trained: dict) -> str:
    """category | untrained | trained, with `overall` last."""
    cats = [k for k in trained if k != "overall"] + ["overall"]
    width = max(len(c) for c in cats + ["category"])
    lines = [f"{'category':<{width}}  untrained  trained", "-" * (width + 20)]
    for c in cats:
        if c == "overall":
            lines.append("-" * (width + 20))
        lines.append(f"{c:<{width}}  {untrained.get(c, float('nan')):9.3f}  {trained[c]:7.3f}")
    return "\n".join(lines)


def run(args) -> dict:
    """The demo; returns the JSON summary it writes."""
    import jax

    from uniimage_jax.data import synthetic
    from uniimage_jax.models.loader import load_for_inference
    from uniimage_jax.train.optimizer import merge_params, partition_params
    from uniimage_jax.train.trainer import build_model, load_processor_for, train

    _check_args(args)
    config = _configure(args)
    workdir = os.path.abspath(args.workdir)
    stage_dir = os.path.join(workdir, config.stage)
    if os.path.exists(stage_dir):
        if not args.overwrite:
            raise SystemExit(f"uniimage-demo: {stage_dir} already holds a demo run; pass "
                             "--overwrite to start again or choose another --workdir")
        shutil.rmtree(stage_dir)
    os.makedirs(workdir, exist_ok=True)
    num_prompts = QUICK["num_prompts"] if args.quick and args.num_prompts == 24 \
        else args.num_prompts
    num_images = QUICK["num_images"] if args.quick and args.num_images == 4 else args.num_images
    trainable = ", ".join(config.trainable)
    mllm_note = ("random MLLM, its language model trained too since random frozen features "
                 "barely carry the caption" if any(t.startswith("mllm") for t in config.trainable)
                 else "random frozen MLLM")
    print(f"uniimage-demo: training the tiny TBAC-UniImage ({config.model.image_size} px, "
          f"{mllm_note}; trainable: {trainable}) on synthetic shapes for "
          f"{config.max_steps} steps (batch {config.batch_size}), then scoring "
          f"{num_prompts} held-out prompts x {num_images} samples before and after"
          + (" [--quick: a smoke run, scores are meaningless]" if args.quick else ""),
          flush=True)
    t0 = time.perf_counter()
    sampling = _sampling_config(config, args)
    eval_prompts = synthetic.prompts(num_prompts, seed=args.seed + EVAL_SEED_OFFSET)

    # Untrained: exactly the parameters the trainer starts from (random init with config.seed).
    model = build_model(config)
    processor = load_processor_for(config, model, workdir)
    # Split and merged as the trainer does, so the tree matches the loaded checkpoint's and the
    # trained evaluation reuses the compiled sampler.
    params0 = merge_params(*partition_params(jax.jit(model.init)(jax.random.PRNGKey(config.seed)),
                                             list(config.trainable)))
    print("scoring the untrained model ...", flush=True)
    untrained, rows0, verdicts0 = evaluate(model, params0, processor, eval_prompts, num_images,
                                           args.seed, sampling)
    del params0
    t_untrained = time.perf_counter()

    result = train(config, workdir)
    t_train = time.perf_counter()

    print("scoring the trained model ...", flush=True)
    model, params, processor = load_for_inference(result.stage_dir)
    trained, rows, verdicts = evaluate(model, params, processor, eval_prompts, num_images,
                                       args.seed, sampling)
    t_end = time.perf_counter()

    grid = _save_grid(rows, os.path.join(workdir, GRID_FILE))
    grid0 = _save_grid(rows0, os.path.join(workdir, UNTRAINED_GRID_FILE))
    summary = {
        "untrained": untrained, "trained": trained,
        "steps": result.step, "batch_size": config.batch_size, "seed": args.seed,
        "final_loss": result.losses[-1] if result.losses else None,
        "trainable": list(config.trainable),
        "sampling": {"num_steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale,
                     "scheduler": sampling.scheduler},
        "prompts": [{"caption": c, "metadata": m, "untrained_correct": v0, "trained_correct": v}
                    for (c, m), v0, v in zip(eval_prompts, verdicts0, verdicts)],
        "grid": grid, "untrained_grid": grid0, "stage_dir": result.stage_dir,
        "seconds": {"untrained_eval": round(t_untrained - t0, 1),
                    "train": round(t_train - t_untrained, 1),
                    "trained_eval": round(t_end - t_train, 1),
                    "total": round(t_end - t0, 1)},
    }
    scores_path = os.path.join(workdir, SCORES_FILE)
    with open(scores_path, "w") as f:
        json.dump(summary, f, indent=2)

    print()
    print(f"synthetic compositional scores ({num_prompts} held-out prompts x {num_images} "
          "samples, fraction correct):")
    print(format_table(untrained, trained))
    print()
    print(f"trained samples:   {grid}  (rows = prompts, columns = samples)")
    print(f"untrained samples: {grid0}")
    print(f"scores + prompts:  {scores_path}")
    print(f"checkpoint:        {result.stage_dir}")
    print(f"time: {summary['seconds']['total']:.0f} s (train {summary['seconds']['train']:.0f} s)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
