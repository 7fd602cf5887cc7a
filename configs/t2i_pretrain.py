"""Stage 1: text-to-image pre-training (official: batch 16/GPU, 150k steps, AdamW 1e-4).

    uniimage-train --config configs/t2i_pretrain.py:tiny --workdir /tmp/w --config.max_steps=20
"""
from uniimage_jax.train.config import base_config


def get_config(preset: str = "tiny"):
    c = base_config(stage="t2i_pretrain", task="t2i", preset=preset)
    c.data.caption_dropout = 0.1            # caption -> "" with p 0.1 (CFG)
    if preset == "tiny":
        c.batch_size = 8
        c.max_steps = 300
        c.optimizer.total_steps = 300
        c.optimizer.warmup_steps = 20
        c.optimizer.lr = 1e-3
        c.optimizer.min_lr = 1e-4
        c.data.source = "synthetic"
        c.checkpoint.every_steps = 100
        c.log_every = 10
    else:
        c.batch_size = 16 * 8                # 16 per GPU on 8 GPUs; scale to your slice
        c.max_steps = 150_000
        c.optimizer.total_steps = 150_000
        c.compute_dtype = "bfloat16"
        c.frozen_dtype = "bfloat16"
    return c
