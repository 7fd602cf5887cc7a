"""Stage 2: image+text-to-image pre-training, initialised from stage 1 (official: batch 4/GPU,
10 epochs; caption nulled with p 0.2, source image blacked with p 0.2, overlapping 0.1)."""
from uniimage_jax.train.config import base_config


def get_config(preset: str = "tiny"):
    c = base_config(stage="ti2i_pretrain", task="ti2i", preset=preset)
    c.init_from = ""                         # set to <workdir>/t2i_pretrain (the chain does)
    if preset == "tiny":
        c.batch_size = 4
        c.max_steps = 100
        c.optimizer.total_steps = 100
        c.optimizer.warmup_steps = 10
        c.optimizer.lr = 5e-4
        c.optimizer.min_lr = 5e-5
        c.data.source = "synthetic"
        c.checkpoint.every_steps = 50
        c.log_every = 10
    else:
        c.batch_size = 4 * 8
        c.optimizer.total_steps = 50_000
        c.max_steps = 50_000                 # ~10 epochs of your data: set from its size
        c.compute_dtype = "bfloat16"
        c.frozen_dtype = "bfloat16"
    return c
