"""`uniimage-demo`: both halves of the unified model, trained in a few CPU minutes, measured, shown.

    uniimage-demo [--workdir ./uniimage_demo] [--steps N] [--caption-steps N] [--seed S]
    uniimage-demo --report-only --checkpoint DIR [--caption-checkpoint DIR] [--processor DIR]
        [--metadata FILE] [--report-dir DIR]

1. builds the tiny model (`configs/demo.py`: random 4-layer Qwen2.5-VL-shaped MLLM, 4-block ladder
   DiT, 32 px pixel autoencoder) and scores it UNTRAINED (the initialisation both stages start
   from): it captions held-out synthetic images (understanding) and draws held-out prompts
   (generation);
2. understanding stage (`configs/demo.py:caption`): teaches the MLLM to caption the synthetic
   images. A random frozen MLLM barely carries a caption to the metaqueries, and the official
   recipe assumes a pretrained one; this stage stands in for that pretraining;
3. generation stage (`configs/demo.py`): the official text-to-image recipe on top, the MLLM
   frozen, the ladder DiT, connector and metaqueries trained by flow matching;
4. scores the trained model the same way, with the same images, prompts and noise, prints both
   tables and writes the report: captions checked against the drawn scenes
   (`eval/caption_scorer.py`), images by the deterministic GenEval-style scorer
   (`eval/synthetic_scorer.py`).

Held-out: training draws scenes from the synthetic dataset with `data.synthetic_seed` (0); the
evaluated images and prompts come from other seeds (`--seed` + 1000), so no evaluated scene was
trained on (short captions can repeat: the vocabulary is 4 shapes x 7 colours).

Outputs under the workdir: `report.html` (one self-contained page: every prompt with its samples
before and after training and the scorer's verdict under each, every image with its captions and
their verdicts, both score tables, both stages' loss curves; printed last), `demo_sheet_01.png`,
... (12 prompts a sheet, written beside their samples before and after training), and
`demo_scores.json` (all four score tables, every caption and verdict, timings), and the stage
directories `demo_caption/` and `demo/` (checkpoints, metrics.jsonl, TensorBoard). `--quick`
shrinks everything to a smoke run for tests (a few steps; scores meaningless).

`--report-only` trains nothing: it scores one trained stage directory (`--checkpoint`; its MLLM
also captions, unless `--caption-checkpoint` names the understanding stage) on the demo's held-out
prompts and images, or on the prompts of a GenEval-style `--metadata` JSONL file whose classes and
colours are the synthetic scorer's, with the checkpoint's own sampling settings (its training
config's `sample_steps`, `sample_guidance` and fixed prompt length `model.max_prompt_tokens`, so
a stage of any recipe, e.g. `configs/t2i_pretrain.py:tiny`, is sampled as it was trained;
`--sample-steps` / `--guidance` override), and writes the same report (`report.html`,
`sheet_*.png`, `report_scores.json`) to `--report-dir` (default `<checkpoint>/report`). It shows that checkpoint only: the weights a run started from are not
recorded in its stage directory (a random init for the tiny preset, a pretrained MLLM for a stage
on top of another), so no "before" column is guessed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from uniimage_jax.cli.arguments import add_model_arguments
from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax.errors import UserError
from uniimage_jax.eval import demo_experiment
from uniimage_jax.eval.demo_experiment import DEFAULT_WORKDIR, QUICK

# The counts a user may set (each >= 1) and --quick shrinks unless given on the command line; the
# report of an existing checkpoint takes only the sampling steps from --quick.
_QUICK_COUNTS = ("steps", "caption_steps", "num_prompts", "num_images", "num_scenes",
                 "sample_steps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uniimage-demo",
        description="Train the tiny TBAC-UniImage on synthetic shapes for a few CPU minutes (the "
                    "MLLM to caption, then generation on top), compare its understanding and "
                    "generation scores with the untrained model's, and write report.html.")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help="output directory (report, sheets, scores, training stages); "
                        "default %(default)s")
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
                   help="denoising steps at evaluation (default: the stage config's "
                        "sample_steps: the demo's, or --checkpoint's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale at evaluation (default: the stage "
                        "config's sample_guidance)")
    p.add_argument("--config", default=None,
                   help="the demo training config file (default: configs/demo.py of the checkout)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous demo run in --workdir first")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run for tests: {QUICK} (scores are meaningless)")
    r = p.add_argument_group("report of an existing checkpoint (no training)")
    r.add_argument("--report-only", action="store_true",
                   help="score --checkpoint and write its report; trains nothing")
    add_model_arguments(
        r, dtype=False, checkpoint_help="a trained stage directory (its latest step) to report on",
        processor_help="processor directory (default: the tiny_processor beside --checkpoint)")
    r.add_argument("--caption-checkpoint", default=None,
                   help="the understanding stage to caption with and plot (default: the MLLM "
                        "of --checkpoint)")
    r.add_argument("--metadata", default=None,
                   help="GenEval-style JSONL prompts in the synthetic scorer's classes and "
                        "colours (default: the demo's --num-prompts held-out prompts)")
    r.add_argument("--report-dir", default=None,
                   help="where the report goes (default: <checkpoint>/report)")
    add_debug_argument(p)
    return p


def _check_args(args) -> None:
    """Raises UserError naming the first bad or misplaced flag."""
    for name in _QUICK_COUNTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):  # NaN fails too
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    report_flags = [f for f in ("checkpoint", "caption_checkpoint", "processor", "metadata",
                                "report_dir") if getattr(args, f) is not None]
    if report_flags and not args.report_only:
        raise UserError(f"--{report_flags[0].replace('_', '-')} belongs to --report-only")
    if args.report_only and args.checkpoint is None:
        raise UserError("--report-only needs --checkpoint DIR")
    defaults = build_parser()
    training_flags = [f for f in ("workdir", "steps", "caption_steps", "overwrite")
                      if getattr(args, f) != defaults.get_default(f)]
    if args.report_only and training_flags:
        raise UserError(f"--{training_flags[0].replace('_', '-')} belongs to the demo's "
                        "training, not to --report-only"
                        + (" (write the report elsewhere with --report-dir)"
                           if training_flags[0] == "workdir" else ""))


def _apply_quick(args) -> None:
    """--quick: the smoke-run value of every count left at its default on the command line."""
    if not args.quick:
        return
    defaults = build_parser()
    for name in ("sample_steps",) if args.report_only else _QUICK_COUNTS:
        if getattr(args, name) == defaults.get_default(name):
            setattr(args, name, QUICK[name])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_command("uniimage-demo", lambda: _run(args), debug=args.debug,
                       where=None if args.report_only else args.workdir)


def _run(args) -> int:
    _check_args(args)
    _apply_quick(args)
    if args.report_only:   # every path and prompt is checked before a model loads
        demo_experiment.run_report_only(args)
    else:
        demo_experiment.run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
