"""The `uniimage-demo` recipe: the tiny model on the built-in synthetic shapes, in two stages that
each fit in a few CPU minutes (the official recipe needs days of GPUs).

    uniimage-demo                                                  # both stages, then scores
    uniimage-train --config configs/demo.py:caption --workdir /tmp/w   # 1. understanding
    uniimage-train --config configs/demo.py --workdir /tmp/w \\
        --config.pretrained.mllm=/tmp/w/demo_caption                   # 2. generation

1. `caption` (stage dir `demo_caption`): the tiny MLLM starts from random weights, and a random
   frozen MLLM barely carries a caption to the metaqueries (measured: generation then learned
   almost nothing from the caption). So it first learns to describe the synthetic images
   (next-token loss on "Describe the image." -> caption; `uniimage_jax/train/captioning.py`).
   This is the understanding half of the unified model, and not part of the official recipe.
2. generation (stage dir `demo`): the official text-to-image recipe on top of it: the MLLM frozen,
   the ladder DiT, the connector and the metaqueries trained with the flow-matching loss.

The model is the `tiny` preset with a demo-sized image path:
- a 2x2 space-to-depth pixel autoencoder (16 x 16 x 12 latents for 32 px images; the preset's
  4x4 one gives 8 x 8 x 48 latents, whose 48 channels per token the 64-wide DiT renders as
  speckle), and the DiT's FFN at mlp_ratio 1.5 (its depthwise convolution dominates a CPU step);
- an empty system prompt for generation: the official one is ~70 tokens of the tiny vocabulary,
  among which a 4-layer MLLM loses the caption;
- images reach the MLLM at 112 x 112 (16 merged tokens, min = max pixels as in the official
  processor setting); `uniimage-demo` writes that processor to <workdir>/tiny_processor before
  training (a bare `uniimage-train` run writes the preset's default one, 4 tokens per image).
Optimiser: lr 2e-3 (a ~0.5M-parameter model from scratch tolerates 20x the official rate), a short
warm-up, cosine to 1e-4, no weight decay, clip 1.0; uniform timesteps (official).
"""
from uniimage_jax.train.config import base_config

CAPTION_STEPS = 1000
GENERATION_STEPS = 1000
PROCESSOR_PIXELS = 112 * 112
STAGES = {"caption": "demo_caption", "": "demo"}


def _tiny_demo_model(c) -> None:
    patch = 2
    c.model.vae = {"type": "pixel", "patch_size": patch, "in_channels": 3, "scaling_factor": 1.0}
    c.model.dit.in_channels = c.model.dit.out_channels = 3 * patch * patch
    c.model.dit.sample_size = c.model.image_size // patch
    c.model.dit.mlp_ratio = 1.5


def get_config(arg: str = ""):
    """arg '' (default): the generation stage; 'caption': the understanding stage."""
    if arg not in STAGES:
        raise ValueError(f"configs/demo.py takes '' (generation) or 'caption', got {arg!r}")
    caption = arg == "caption"
    c = base_config(stage=STAGES[arg], task="caption" if caption else "t2i", preset="tiny")
    _tiny_demo_model(c)
    c.data.source = "synthetic"
    c.data.read_threads = 2                 # 2-core machine
    c.data.prefetch_buffer_size = 32
    c.batch_size = 16
    steps = CAPTION_STEPS if caption else GENERATION_STEPS
    c.max_steps = steps
    if caption:
        c.trainable = ("mllm/.*",)
        c.model.max_prompt_tokens = 96      # chat + 16 image tokens + question + caption
    else:
        # Official: DiT, connector and metaqueries train; the MLLM (from the caption stage,
        # `pretrained.mllm`, set by uniimage-demo) is frozen.
        c.data.caption_dropout = 0.1        # keeps the unconditional branch for CFG (official)
        c.model.system_prompt = ""
        c.model.max_prompt_tokens = 64
        # The held-out loss (train/eval_loss.py; the report plots it): 32 scenes of another
        # synthetic seed than training's, 10 fixed noise levels each, every 100 steps.
        c.eval.every_steps = 100
        c.eval.num_examples = 32
        c.eval.per_device_batch = 8
    c.optimizer.lr = 2e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.total_steps = steps
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = steps        # one checkpoint, at the end
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.log_every = 10
    return c
