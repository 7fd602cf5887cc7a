"""The demo's experiment: the tiny TBAC-UniImage scored untrained, trained in two stages
(understanding, then generation on top) and scored again on held-out scenes and prompts, and the
report of one trained stage directory (`run_report_only`). `uniimage-demo` is the command line
over it; the argument namespace it passes carries the command's flags (`workdir`, `steps`,
`caption_steps`, `num_prompts`, `num_images`, `num_scenes`, `seed`, `sample_steps`, `guidance`,
`config`, `overwrite`, `quick`; for the report `checkpoint`, `caption_checkpoint`, `processor`,
`metadata`, `report_dir`), with the --quick smoke-run values already applied to the counts.

Held-out: training draws scenes from the synthetic dataset with `data.synthetic_seed` (0); the
evaluated images and prompts come from other seeds (seed + EVAL_SEED_OFFSET), so no evaluated
scene was trained on (short captions can repeat: the vocabulary is 4 shapes x 7 colours).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time

from uniimage_jax.errors import Terminated, UserError

DEFAULT_WORKDIR = "./uniimage_demo"
SCORES_FILE = "demo_scores.json"
SHEET_PREFIX = "demo_sheet"
REPORT_ONLY_SCORES_FILE = "report_scores.json"
REPORT_ONLY_SHEET_PREFIX = "sheet"
# Evaluation images and prompts are drawn with seed + this offset: never the training data's seed.
EVAL_SEED_OFFSET = 1000
MAX_CAPTION_TOKENS = 24  # the longest synthetic caption is 14 tokens of the tiny vocabulary
QUICK = {"steps": 3, "caption_steps": 2, "num_prompts": 6, "num_images": 1, "num_scenes": 6,
         "sample_steps": 2, "batch_size": 4}
ABOUT = (
    "uniimage-demo trains the tiny TBAC-UniImage (a 4-layer Qwen2.5-VL-shaped MLLM, a 4-block "
    "ladder SANA diffusion transformer, 32 px images through a pixel autoencoder) from random "
    "weights on built-in synthetic coloured shapes, for a few CPU minutes: first the MLLM learns "
    "to caption the images (understanding; the official recipe starts from a pretrained, frozen "
    "Qwen2.5-VL instead), then the official text-to-image stage trains the ladder DiT, the "
    "connector and the metaqueries on the frozen MLLM (generation).",
    "Both halves are scored before and after training on held-out prompts and images (other "
    "seeds than the training data), with the same noise: captions against the drawn scenes, "
    "samples by a deterministic GenEval-style scorer (no learned detector).",
    "It is a demonstration that every part learns, not a quality benchmark: the trained samples "
    "are coloured blobs in the prompt's colours that take the named shape some of the time, and "
    "the scores of a 32 px model trained for minutes say nothing about the published model.",
)
QUICK_NOTE = "This is a --quick smoke run of a few steps: its scores are meaningless."


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


def configure_stage(config, steps: int | None, args):
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


def sampling_config(config, args):
    """The sampling settings of a stage `config` as its trainer's sample grids use them (its
    steps, guidance and fixed prompt length), with --sample-steps / --guidance applied."""
    from uniimage_jax.sampling.sampler import SamplingConfig

    steps = args.sample_steps or config.sample_steps
    guidance = config.sample_guidance if args.guidance is None else args.guidance
    # One fixed prompt length: every prompt reuses one compiled sampler.
    return SamplingConfig(num_steps=steps, guidance_scale=guidance,
                          max_prompt_tokens=config.model.max_prompt_tokens)


def checkpoint_sampling_config(checkpoint: str, args):
    """The sampling settings `--report-only` uses for `checkpoint`: those of its own training
    config (a stage trained by any recipe, e.g. `configs/t2i_pretrain.py:tiny`, whose system
    prompt needs a longer fixed prompt than the demo's), never the demo's; a converted checkpoint
    has no training config, so the sampler's defaults (prompts padded to their own length)."""
    from uniimage_jax.checkpoints.loader import training_config
    from uniimage_jax.sampling.sampler import SamplingConfig

    stage = training_config(checkpoint)
    if stage is not None:
        return sampling_config(stage, args)
    defaults = SamplingConfig()
    return SamplingConfig(num_steps=args.sample_steps or defaults.num_steps,
                          guidance_scale=(defaults.guidance_scale if args.guidance is None
                                          else args.guidance))


def caption_question(checkpoint: str, recipe) -> str:
    """The question a caption stage was trained to answer (its config's), else the demo's."""
    from uniimage_jax.checkpoints.loader import training_config

    stage = training_config(checkpoint)
    if stage is not None and stage.task == "caption":
        return stage.caption_question
    return recipe.get_config("caption").caption_question


def held_out_prompts(num_prompts: int, seed: int) -> list[tuple[str, dict]]:
    """The generation prompts scored: drawn with the evaluation seed, never trained on."""
    from uniimage_jax.data import synthetic

    return synthetic.prompts(num_prompts, seed=seed + EVAL_SEED_OFFSET)


def held_out_scenes(num_scenes: int, image_size: int, seed: int) -> list[dict]:
    """The synthetic scenes the MLLM captions: drawn with the evaluation seed, never trained on."""
    from uniimage_jax.data import synthetic

    dataset = synthetic.SyntheticCompositionalDataset(num_scenes, image_size=image_size,
                                                      seed=seed + EVAL_SEED_OFFSET)
    return [dataset[i] for i in range(num_scenes)]


def _prepare_workdir(args, caption_cfg, config) -> tuple[str, str, str]:
    """(workdir, caption stage dir, generation stage dir), a previous run removed only when
    --overwrite says so."""
    workdir = os.path.abspath(args.workdir)
    caption_dir = os.path.join(workdir, caption_cfg.stage)
    stage_dir = os.path.join(workdir, config.stage)
    existing = [d for d in (caption_dir, stage_dir) if os.path.exists(d)]
    if existing:
        if not args.overwrite:
            raise UserError(f"{existing[0]} already holds a demo run; pass --overwrite to start "
                            "again or choose another --workdir")
        for d in existing:
            shutil.rmtree(d)
    os.makedirs(workdir, exist_ok=True)
    return workdir, caption_dir, stage_dir


def _untrained_model(config, workdir: str, pixels: int | None):
    """(model, params, processor) exactly as both stages start: random init with config.seed,
    split and merged as the trainer does (so the tree matches the loaded checkpoints' and the
    trained evaluation reuses the compiled functions)."""
    import jax

    from uniimage_jax.processing import tiny
    from uniimage_jax.checkpoints.partition import merge_params, partition_params
    from uniimage_jax.train.stage_setup import build_model, load_processor_for

    # The images reach the MLLM at a fixed size (configs/demo.py); the stages load this processor.
    # Written afresh every run: a processor left by another version would change the inputs.
    if pixels:
        processor_dir = os.path.join(workdir, "tiny_processor")
        shutil.rmtree(processor_dir, ignore_errors=True)
        tiny.make_tiny_processor_dir(processor_dir, min_pixels=pixels, max_pixels=pixels)
    model = build_model(config)
    processor = load_processor_for(config, model, workdir)
    params = merge_params(*partition_params(jax.jit(model.init)(jax.random.PRNGKey(config.seed)),
                                            list(config.trainable)))
    return model, params, processor


def run_demo(args) -> dict:
    """The demo; returns the JSON summary it writes."""
    from uniimage_jax.checkpoints.loader import load_for_inference, resolve_weights
    from uniimage_jax.eval import synthetic_eval
    from uniimage_jax.train.trainer import train

    recipe = load_demo_module(args.config or default_config_path())
    caption_cfg = configure_stage(recipe.get_config("caption"), args.caption_steps, args)
    config = configure_stage(recipe.get_config(""), args.steps, args)
    workdir, caption_dir, _ = _prepare_workdir(args, caption_cfg, config)
    config.pretrained.mllm = caption_dir  # generation on top of the MLLM that learned to caption
    evaluation = synthetic_eval.Evaluation(
        prompts=held_out_prompts(args.num_prompts, args.seed),
        scenes=held_out_scenes(args.num_scenes, config.model.image_size, args.seed))
    _announce(args, caption_cfg, config, evaluation, args.num_images)
    sampling = sampling_config(config, args)
    score = dict(num_images=args.num_images, seed=args.seed, sampling=sampling,
                 question=caption_cfg.caption_question, max_new_tokens=MAX_CAPTION_TOKENS)
    t0 = time.perf_counter()
    print("scoring the untrained model ...", flush=True)
    untrained = _untrained_model(config, workdir, getattr(recipe, "PROCESSOR_PIXELS", None))
    evaluation.score("untrained", *untrained, **score)
    del untrained
    t_untrained = time.perf_counter()
    print("1/2 understanding: captioning the synthetic images ...", flush=True)
    caption_result = train(caption_cfg, workdir)
    _stop_if_cut_short(caption_cfg, caption_result)
    t_caption = time.perf_counter()
    print("2/2 generation: the official text-to-image stage on the frozen MLLM ...", flush=True)
    result = train(config, workdir)
    _stop_if_cut_short(config, result)
    t_train = time.perf_counter()
    weights = resolve_weights(result.stage_dir)
    print(f"scoring the trained model ({weights} weights) ...", flush=True)
    evaluation.score("trained", *load_for_inference(result.stage_dir, weights=weights), **score)
    t_end = time.perf_counter()
    seconds = {"untrained_eval": t_untrained - t0, "caption_train": t_caption - t_untrained,
               "generation_train": t_train - t_caption, "trained_eval": t_end - t_train,
               "total": t_end - t0}
    stages = {"caption": (caption_cfg, caption_result), "generation": (config, result)}
    return _write_demo_report(evaluation, workdir, args, stages, weights, sampling, seconds)


def _stop_if_cut_short(config, result) -> None:
    """A stage that stopped before its last step was stopped by SIGTERM (the trainer saved it and
    returned): the demo stops too, rather than score a half-trained model."""
    if result.step < config.max_steps:
        raise Terminated(f"the {config.stage} stage stopped at step {result.step} of "
                         f"{config.max_steps} (saved in {result.stage_dir}); the demo starts "
                         "again with --overwrite")


def _write_demo_report(evaluation, workdir: str, args, stages: dict, weights: str, sampling,
                       seconds: dict) -> dict:
    """The demo's report, scores and sheets written and printed; returns the summary.
    `stages` maps "caption" and "generation" to (stage config, training result)."""
    from uniimage_jax.eval import report

    (caption_cfg, caption_result), (config, result) = stages["caption"], stages["generation"]
    extra = {
        "steps": {"caption": caption_result.step, "generation": result.step},
        "weights": weights,
        "batch_size": config.batch_size, "seed": args.seed,
        "final_loss": {"caption": caption_result.losses[-1] if caption_result.losses else None,
                       "generation": result.losses[-1] if result.losses else None},
        "trainable": {"caption": list(caption_cfg.trainable),
                      "generation": list(config.trainable)},
        "sampling": _sampling_summary(sampling),
        "stage_dirs": {"caption": caption_result.stage_dir, "generation": result.stage_dir},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    summary = report.write_results(
        evaluation, workdir, scores_file=SCORES_FILE, sheet_prefix=SHEET_PREFIX,
        title="uniimage-demo: the tiny TBAC-UniImage before and after training",
        about=ABOUT + ((QUICK_NOTE,) if args.quick else ()), settings=_settings_line(extra),
        stages={"understanding stage (next-token loss)": caption_result.stage_dir,
                "generation stage (flow-matching loss)": result.stage_dir}, extra=extra)
    _print_results(summary, evaluation)
    return summary


def _sampling_summary(sampling) -> dict:
    return {"num_steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale,
            "scheduler": sampling.scheduler, "max_prompt_tokens": sampling.max_prompt_tokens}


def _announce(args, caption_cfg, config, evaluation, num_images: int) -> None:
    print(f"uniimage-demo: the tiny TBAC-UniImage ({config.model.image_size} px, random init) "
          f"learns to caption synthetic shapes ({caption_cfg.max_steps} steps, the MLLM trains), "
          f"then to draw them ({config.max_steps} steps, the MLLM frozen as in the official "
          f"recipe); scored before and after on {len(evaluation.scenes)} held-out images to "
          f"caption and {len(evaluation.prompts)} held-out prompts x {num_images} samples"
          + (" [--quick: a smoke run, scores are meaningless]" if args.quick else ""),
          flush=True)


def _settings_line(extra: dict) -> str:
    s, sampling = extra["steps"], extra["sampling"]
    line = (f"{s['caption']} understanding + {s['generation']} generation training steps, batch "
            f"{extra['batch_size']}, seed {extra['seed']}; sampling: {sampling['num_steps']} "
            f"{sampling['scheduler']} steps, guidance {sampling['guidance_scale']}")
    if "seconds" in extra:
        line += f"; {extra['seconds']['total']:.0f} s in all"
    return line


def _print_results(summary: dict, evaluation) -> None:
    """Both tables, a few captions, where everything went; the report's path last."""
    from uniimage_jax.eval.synthetic_eval import format_table

    print()
    print(f"understanding: {len(evaluation.scenes)} held-out images captioned by the MLLM "
          "(fraction fully correct):")
    print(format_table(summary["understanding"]))
    last = list(evaluation.understanding)[-1]
    for record in summary["captions"][:3]:
        print(f"  e.g. truth {record['truth']!r}, MLLM {record[last]!r}")
    print()
    print(f"generation: {len(evaluation.prompts)} held-out prompts x "
          f"{len(summary['prompts'][0][last + '_correct'])} samples (fraction correct, "
          "GenEval's rules):")
    print(format_table(summary["generation"]))
    print()
    print(f"labelled sheets:   {', '.join(summary['sheets'])}")
    if "stage_dirs" in summary:
        print(f"checkpoints:       {', '.join(summary['stage_dirs'].values())}")
    if "seconds" in summary:
        sec = summary["seconds"]
        print(f"time: {sec['total']:.0f} s (training {sec['caption_train']:.0f} s understanding "
              f"+ {sec['generation_train']:.0f} s generation)")
    print(f"scores, verdicts:  {summary['scores_file']}")
    print(f"report:            {summary['report']}")


def _check_stage_dir(flag: str, path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a directory")
    return os.path.abspath(path)


def run_report_only(args) -> dict:
    """Scores --checkpoint (and --caption-checkpoint) and writes the report; returns its summary.
    Every path is checked before any model loads."""
    from uniimage_jax.checkpoints.loader import load_for_inference, resolve_weights
    from uniimage_jax.eval import synthetic_eval

    checkpoint = _check_stage_dir("--checkpoint", args.checkpoint)
    caption_checkpoint = _check_stage_dir("--caption-checkpoint", args.caption_checkpoint)
    processor_dir = _check_stage_dir("--processor", args.processor)
    prompts = (synthetic_eval.read_scorable_prompts(args.metadata) if args.metadata else
               held_out_prompts(args.num_prompts, args.seed))
    recipe = load_demo_module(args.config or default_config_path())
    out_dir = os.path.abspath(args.report_dir or os.path.join(checkpoint, "report"))
    sampling = checkpoint_sampling_config(checkpoint, args)
    question = caption_question(caption_checkpoint or checkpoint, recipe)
    weights = resolve_weights(checkpoint)
    print(f"uniimage-demo --report-only: the {weights} weights of {checkpoint}", flush=True)
    model, params, processor = load_for_inference(checkpoint, processor_dir, weights=weights)
    mllm = load_for_inference(caption_checkpoint, processor_dir) if caption_checkpoint else None
    evaluation = synthetic_eval.Evaluation(prompts=prompts, scenes=held_out_scenes(
        args.num_scenes, model.config.image_size, args.seed))
    print(f"uniimage-demo --report-only: {checkpoint} on {len(prompts)} prompts x "
          f"{args.num_images} samples and {args.num_scenes} held-out images to caption",
          flush=True)
    evaluation.score("trained", model, params, processor, num_images=args.num_images,
                     seed=args.seed, sampling=sampling, max_new_tokens=MAX_CAPTION_TOKENS,
                     question=question, mllm=mllm)
    return _write_checkpoint_report(evaluation, out_dir, args, checkpoint, caption_checkpoint,
                                    sampling)


def _write_checkpoint_report(evaluation, out_dir: str, args, checkpoint: str,
                             caption_checkpoint: str | None, sampling) -> dict:
    """The report of one checkpoint (no before-training column), written and printed."""
    from uniimage_jax.eval import report

    stages = {"understanding stage": caption_checkpoint} if caption_checkpoint else {}
    stages[f"{os.path.basename(checkpoint)} (training loss)"] = checkpoint
    extra = {"checkpoint": checkpoint, "caption_checkpoint": caption_checkpoint,
             "seed": args.seed, "sampling": _sampling_summary(sampling)}
    source = (f"from {os.path.abspath(args.metadata)}" if args.metadata
              else "the demo's held-out synthetic prompts")
    captioner = f" (from {caption_checkpoint})" if caption_checkpoint else ""
    about = (f"The checkpoint {checkpoint} scored on {len(evaluation.prompts)} prompts ({source}) "
             f"and {args.num_scenes} held-out synthetic images its MLLM{captioner} captions, with "
             "the checkpoint's own sampling settings (its training config). Samples are judged by "
             "a deterministic GenEval-style scorer (no learned detector), captions against the "
             "drawn scenes.",
             "Only this checkpoint is shown: a stage directory does not record the weights its "
             "training started from, so there is no before-training column.")
    summary = report.write_results(
        evaluation, out_dir, scores_file=REPORT_ONLY_SCORES_FILE,
        sheet_prefix=REPORT_ONLY_SHEET_PREFIX, title=f"uniimage report: {checkpoint}",
        about=about, settings=f"seed {args.seed}; sampling: {sampling.num_steps} "
        f"{sampling.scheduler} steps, guidance {sampling.guidance_scale}", stages=stages,
        extra=extra)
    _print_results(summary, evaluation)
    return summary
