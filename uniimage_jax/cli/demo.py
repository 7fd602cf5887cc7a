"""`uniimage-demo`: both halves of the unified model, trained in a few CPU minutes, measured.

    uniimage-demo [--workdir ./uniimage_demo] [--steps N] [--caption-steps N] [--seed S]

1. builds the tiny model (`configs/demo.py`: random 4-layer Qwen2.5-VL-shaped MLLM, 4-block ladder
   DiT, 32 px pixel autoencoder) and scores it UNTRAINED (the initialisation both stages start
   from): it captions held-out synthetic images (understanding) and draws held-out prompts
   (generation);
2. understanding stage (`configs/demo.py:caption`): teaches the MLLM to caption the synthetic
   images. A random frozen MLLM barely carries a caption to the metaqueries, and the official
   recipe assumes a pretrained one; this stage stands in for that pretraining;
3. generation stage (`configs/demo.py`): the official text-to-image recipe on top, the MLLM
   frozen, the ladder DiT, connector and metaqueries trained by flow matching;
4. scores the trained model the same way, with the same images, prompts and noise, and prints
   both tables: captions checked against the drawn scenes (`eval/caption_scorer.py`), images by
   the deterministic GenEval-style scorer (`eval/synthetic_scorer.py`).

Held-out: training draws scenes from the synthetic dataset with `data.synthetic_seed` (0); the
evaluated images and prompts come from other seeds (`--seed` + 1000), so no evaluated scene was
trained on (short captions can repeat: the vocabulary is 4 shapes x 7 colours).

Outputs under the workdir: `demo_grid.png` (trained; rows = prompts, columns = samples),
`demo_grid_untrained.png`, `demo_scores.json` (all four score tables, the captions written, the
prompts and per-image verdicts, timings), and the stage directories `demo_caption/` and `demo/`
(checkpoints, metrics.jsonl, TensorBoard). `--quick` shrinks everything to a smoke run for tests
(a few steps; scores meaningless).
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

from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax.errors import UserError

GRID_FILE = "demo_grid.png"
UNTRAINED_GRID_FILE = "demo_grid_untrained.png"
SCORES_FILE = "demo_scores.json"
# Evaluation images and prompts are drawn with seed + this offset: never the training data's seed.
EVAL_SEED_OFFSET = 1000
MAX_CAPTION_TOKENS = 24  # the longest synthetic caption is 14 tokens of the tiny vocabulary
QUICK = {"steps": 3, "caption_steps": 2, "num_prompts": 6, "num_images": 1, "num_scenes": 6,
         "sample_steps": 2, "batch_size": 4}


def default_config_path() -> str:
    """configs/demo.py of the source checkout this package runs from."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "configs", "demo.py")


def load_demo_module(path: str):
    """The demo config file as a module: `get_config('')` (generation), `get_config('caption')`
    (understanding) and `PROCESSOR_PIXELS`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo config {path} not found: run from a source checkout "
                                "(pip install -e .) or pass --config PATH/TO/configs/demo.py")
    spec = importlib.util.spec_from_file_location("uniimage_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uniimage-demo",
        description="Train the tiny TBAC-UniImage on synthetic shapes for a few CPU minutes (the "
                    "MLLM to caption, then generation on top) and compare its understanding and "
                    "generation scores with the untrained model's.")
    p.add_argument("--workdir", default="./uniimage_demo",
                   help="output directory (grids, scores, training stages); default %(default)s")
    p.add_argument("--steps", type=int, default=None,
                   help="generation training steps (default: the demo config's)")
    p.add_argument("--caption-steps", type=int, default=None,
                   help="understanding (captioning) training steps (default: the demo config's)")
    p.add_argument("--num-prompts", type=int, default=48,
                   help="held-out generation prompts, categories in turn (default %(default)s)")
    p.add_argument("--num-images", type=int, default=4,
                   help="samples per prompt (default %(default)s)")
    p.add_argument("--num-scenes", type=int, default=96,
                   help="held-out images the MLLM captions (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="run seed: initialisation, data order, evaluation images, prompts, noise")
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
    add_debug_argument(p)
    return p


def _check_args(args) -> None:
    for name in ("steps", "caption_steps", "num_prompts", "num_images", "num_scenes",
                 "sample_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):  # NaN fails too
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")


def _quick_or(args, name: str):
    """The --quick value of `name` unless given on the command line (differs from its default)."""
    given = getattr(args, name)
    return QUICK[name] if args.quick and given == build_parser().get_default(name) else given


def _configure(config, steps: int | None, args):
    """A stage config with the command-line choices applied (validated before compiling)."""
    config.seed = args.seed
    if args.quick:
        config.batch_size = QUICK["batch_size"]
        config.optimizer.warmup_steps = 1
    config.max_steps = steps or config.max_steps
    # The cosine follows the stage's length; it must stay longer than the warm-up.
    config.optimizer.total_steps = max(config.max_steps, config.optimizer.warmup_steps + 1)
    config.checkpoint.every_steps = config.max_steps
    return config


def _sampling_config(config, args):
    from uniimage_jax.sampling.sampler import SamplingConfig

    steps = args.sample_steps or (QUICK["sample_steps"] if args.quick else config.sample_steps)
    guidance = config.sample_guidance if args.guidance is None else args.guidance
    # One fixed prompt length: every prompt reuses one compiled sampler.
    return SamplingConfig(num_steps=steps, guidance_scale=guidance,
                          max_prompt_tokens=config.model.max_prompt_tokens)


def evaluate(model, params, processor, eval_prompts, num_images: int, seed: int, cfg):
    """Generation: (scores, images per prompt, per-image verdicts). Sample j of prompt i uses
    noise seed (seed, i, j), identical for the untrained and the trained model."""
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


def evaluate_understanding(model, params, processor, scenes, question: str):
    """Understanding: (scores, the captions the MLLM wrote) for held-out synthetic scenes."""
    from PIL import Image

    from uniimage_jax.eval.caption_scorer import score_captions
    from uniimage_jax.sampling.generate import answer

    captions = answer(model.mllm, params["mllm"], processor,
                      [[Image.fromarray(s["image"])] for s in scenes], [question] * len(scenes),
                      max_new_tokens=MAX_CAPTION_TOKENS)
    scores = score_captions((c, s["objects"], s["metadata"]["tag"])
                            for c, s in zip(captions, scenes))
    return scores, captions


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
    from uniimage_jax.models.loader import load_for_inference, resolve_weights
    from uniimage_jax.processing import tiny
    from uniimage_jax.train.optimizer import merge_params, partition_params
    from uniimage_jax.train.trainer import build_model, load_processor_for, train

    _check_args(args)
    recipe = load_demo_module(args.config or default_config_path())
    caption_cfg = _configure(recipe.get_config("caption"), _quick_or(args, "caption_steps"), args)
    config = _configure(recipe.get_config(""), _quick_or(args, "steps"), args)
    pixels = getattr(recipe, "PROCESSOR_PIXELS", None)
    workdir = os.path.abspath(args.workdir)
    caption_dir = os.path.join(workdir, caption_cfg.stage)
    stage_dir = os.path.join(workdir, config.stage)
    config.pretrained.mllm = caption_dir  # generation on top of the MLLM that learned to caption
    existing = [d for d in (caption_dir, stage_dir) if os.path.exists(d)]
    if existing:
        if not args.overwrite:
            raise UserError(f"{existing[0]} already holds a demo run; pass --overwrite to start "
                            "again or choose another --workdir")
        for d in existing:
            shutil.rmtree(d)
    os.makedirs(workdir, exist_ok=True)
    num_prompts = _quick_or(args, "num_prompts")
    num_images = _quick_or(args, "num_images")
    num_scenes = _quick_or(args, "num_scenes")
    print(f"uniimage-demo: the tiny TBAC-UniImage ({config.model.image_size} px, random init) "
          f"learns to caption synthetic shapes ({caption_cfg.max_steps} steps, the MLLM trains), "
          f"then to draw them ({config.max_steps} steps, the MLLM frozen as in the official "
          f"recipe); scored before and after on {num_scenes} held-out images to caption and "
          f"{num_prompts} held-out prompts x {num_images} samples"
          + (" [--quick: a smoke run, scores are meaningless]" if args.quick else ""),
          flush=True)
    t0 = time.perf_counter()
    sampling = _sampling_config(config, args)
    eval_seed = args.seed + EVAL_SEED_OFFSET
    eval_prompts = synthetic.prompts(num_prompts, seed=eval_seed)
    scenes_ds = synthetic.SyntheticCompositionalDataset(
        num_scenes, image_size=config.model.image_size, seed=eval_seed)
    scenes = [scenes_ds[i] for i in range(num_scenes)]

    # The images reach the MLLM at a fixed size (configs/demo.py); the stages load this processor.
    # Written afresh every run: a processor left by another version would change the inputs.
    if pixels:
        processor_dir = os.path.join(workdir, "tiny_processor")
        shutil.rmtree(processor_dir, ignore_errors=True)
        tiny.make_tiny_processor_dir(processor_dir, min_pixels=pixels, max_pixels=pixels)
    # Untrained: exactly the parameters both stages start from (random init with config.seed).
    model = build_model(config)
    processor = load_processor_for(config, model, workdir)
    # Split and merged as the trainer does, so the tree matches the loaded checkpoints' and the
    # trained evaluation reuses the compiled functions.
    params0 = merge_params(*partition_params(jax.jit(model.init)(jax.random.PRNGKey(config.seed)),
                                             list(config.trainable)))
    print("scoring the untrained model ...", flush=True)
    understanding0, captions0 = evaluate_understanding(model, params0, processor, scenes,
                                                       caption_cfg.caption_question)
    generation0, rows0, verdicts0 = evaluate(model, params0, processor, eval_prompts, num_images,
                                             args.seed, sampling)
    del params0
    t_untrained = time.perf_counter()

    print("1/2 understanding: captioning the synthetic images ...", flush=True)
    caption_result = train(caption_cfg, workdir)
    t_caption = time.perf_counter()
    print("2/2 generation: the official text-to-image stage on the frozen MLLM ...", flush=True)
    result = train(config, workdir)
    t_train = time.perf_counter()

    weights = resolve_weights(result.stage_dir)
    print(f"scoring the trained model ({weights} weights) ...", flush=True)
    model, params, processor = load_for_inference(result.stage_dir, weights=weights)
    understanding, captions = evaluate_understanding(model, params, processor, scenes,
                                                     caption_cfg.caption_question)
    generation, rows, verdicts = evaluate(model, params, processor, eval_prompts, num_images,
                                          args.seed, sampling)
    t_end = time.perf_counter()

    grid = _save_grid(rows, os.path.join(workdir, GRID_FILE))
    grid0 = _save_grid(rows0, os.path.join(workdir, UNTRAINED_GRID_FILE))
    summary = {
        "understanding": {"untrained": understanding0, "trained": understanding},
        "generation": {"untrained": generation0, "trained": generation},
        "steps": {"caption": caption_result.step, "generation": result.step},
        "weights": weights,
        "batch_size": config.batch_size, "seed": args.seed,
        "final_loss": {"caption": caption_result.losses[-1] if caption_result.losses else None,
                       "generation": result.losses[-1] if result.losses else None},
        "trainable": {"caption": list(caption_cfg.trainable),
                      "generation": list(config.trainable)},
        "sampling": {"num_steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale,
                     "scheduler": sampling.scheduler},
        "captions": [{"truth": s["caption"], "untrained": c0, "trained": c}
                     for s, c0, c in zip(scenes, captions0, captions)],
        "prompts": [{"caption": c, "metadata": m, "untrained_correct": v0, "trained_correct": v}
                    for (c, m), v0, v in zip(eval_prompts, verdicts0, verdicts)],
        "grid": grid, "untrained_grid": grid0,
        "stage_dirs": {"caption": caption_result.stage_dir, "generation": result.stage_dir},
        "seconds": {"untrained_eval": round(t_untrained - t0, 1),
                    "caption_train": round(t_caption - t_untrained, 1),
                    "generation_train": round(t_train - t_caption, 1),
                    "trained_eval": round(t_end - t_train, 1),
                    "total": round(t_end - t0, 1)},
    }
    scores_path = os.path.join(workdir, SCORES_FILE)
    with open(scores_path, "w") as f:
        json.dump(summary, f, indent=2)

    print()
    print(f"understanding: {num_scenes} held-out images captioned by the MLLM (fraction fully "
          "correct):")
    print(format_table(understanding0, understanding))
    for s, c in list(zip(scenes, captions))[:3]:
        print(f"  e.g. truth {s['caption']!r}, MLLM {c!r}")
    print()
    print(f"generation: {num_prompts} held-out prompts x {num_images} samples (fraction correct, "
          "GenEval's rules):")
    print(format_table(generation0, generation))
    print()
    print(f"trained samples:   {grid}  (rows = prompts, columns = samples)")
    print(f"untrained samples: {grid0}")
    print(f"scores, captions:  {scores_path}")
    print(f"checkpoints:       {caption_result.stage_dir}, {result.stage_dir}")
    sec = summary["seconds"]
    print(f"time: {sec['total']:.0f} s (training {sec['caption_train']:.0f} s understanding + "
          f"{sec['generation_train']:.0f} s generation)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_command("uniimage-demo", lambda: run(args) and None, debug=args.debug,
                       where=args.workdir)


if __name__ == "__main__":
    sys.exit(main())
