"""The `uniimage-demo` training recipe: the tiny preset on the built-in synthetic shapes, tuned to
learn something visible in a few CPU minutes (the official recipe needs days of GPUs).

    uniimage-demo                                    # uses get_config() below
    uniimage-train --config configs/demo.py --workdir /tmp/w   # the same stage, without the scoring

Why these values (the official ones are in configs/t2i_pretrain.py):
- lr 2e-3 with a short warm-up and a cosine to 1e-4: a ~1M-parameter DiT from scratch tolerates a
  learning rate 20x the official one, and the run is too short for a long warm-up.
- batch 16: twice the tiny default; more samples per compiled step are nearly free on CPU.
- uniform timesteps (official): `logit_normal` left more per-pixel speckle in the samples.
- the tiny MLLM's language model is TRAINED too (unlike the official recipe): its weights are
  random, and frozen random features barely separate captions (measured: trained scores stayed
  at 0 with it frozen, 600 steps).
- weight decay 0: with a few hundred steps it only slows the fit.
"""
from uniimage_jax.train.config import base_config

DEMO_STEPS = 600


def get_config(arg: str = ""):
    del arg  # one recipe; `--config configs/demo.py` passes nothing
    c = base_config(stage="demo", task="t2i", preset="tiny")
    c.data.source = "synthetic"
    c.data.caption_dropout = 0.1            # keeps the unconditional branch for CFG
    c.data.read_threads = 2                 # 2-core machine
    c.data.prefetch_buffer_size = 32
    c.batch_size = 16
    c.max_steps = DEMO_STEPS
    c.timestep_sampling = "uniform"
    # A random frozen 4-layer MLLM barely separates captions; train its language model too
    # (the demo says so when it starts).
    c.trainable = ("dit/.*", "connector/.*", "metaquery/.*", "mllm/model/language_model/.*")
    c.optimizer.lr = 2e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.total_steps = DEMO_STEPS
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = DEMO_STEPS   # one checkpoint, at the end
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.log_every = 10
    return c
