"""Stage 3: fine-tuning on curated image+text-to-image data, initialised from stage 2 (official:
batch 4/GPU, 100 epochs of GPT-Image-1 data, same CFG dropout as stage 2)."""
from uniimage_jax.train.config import base_config


def get_config(preset: str = "tiny"):
    c = base_config(stage="finetune", task="ti2i", preset=preset)
    c.init_from = ""                         # set to <workdir>/ti2i_pretrain (the chain does)
    if preset == "tiny":
        c.batch_size = 4
        c.max_steps = 50
        c.optimizer.total_steps = 50
        c.optimizer.warmup_steps = 5
        c.optimizer.lr = 2e-4
        c.optimizer.min_lr = 2e-5
        c.data.source = "synthetic"
        c.checkpoint.every_steps = 25
        c.log_every = 10
    else:
        c.batch_size = 4 * 8
        c.optimizer.total_steps = 20_000
        c.max_steps = 20_000                 # ~100 epochs of a curated set: set from its size
        c.compute_dtype = "bfloat16"
        c.frozen_dtype = "bfloat16"
    return c
