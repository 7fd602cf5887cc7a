"""The training config schema: one `ml_collections.ConfigDict` per run.

Stage files in `configs/` call `base_config(...)` and set the official hyperparameters of their
stage; the model part comes from `uniimage_jax.models.presets`. Every field is listed here with a
comment, the config is locked (a typo in `--config.some_key=...` is rejected before anything
compiles) and the trainer checks combinations of fields at start-up, before any data is read.
"""

from __future__ import annotations

import ml_collections

from uniimage_jax.data.manifest import data_task
from uniimage_jax.models import presets
from uniimage_jax.models.lora import DEFAULT_DIT_TARGETS
from uniimage_jax.processing.prompt_buckets import TBAC_PROMPT_BUCKETS
from uniimage_jax.train.captioning import DEFAULT_QUESTION
from uniimage_jax.train.ema import default_ema_config
from uniimage_jax.train.eval_loss import default_eval_config
from uniimage_jax.train.optimizer import default_optimizer_config


def base_config(*, stage: str, task: str, preset: str) -> ml_collections.ConfigDict:
    from uniimage_jax.data.pipeline import default_data_config

    c = ml_collections.ConfigDict()
    c.stage = stage                 # directory name under the workdir: <workdir>/<stage>/
    c.task = task                   # 't2i' (caption -> image), 'ti2i' (image + text -> image)
    #                                 or 'caption' (image -> caption: trains the MLLM; not official)
    c.caption_question = DEFAULT_QUESTION  # the user turn of a 'caption' stage
    c.model = presets.model_preset(preset)
    c.seed = 0                      # parameter init (tiny), per-step RNG, data order
    c.batch_size = 16               # GLOBAL batch (official: 16 per GPU for t2i, 4 for ti2i)
    c.max_steps = 150_000           # optimiser steps of this stage
    c.compute_dtype = "float32"     # activations: 'float32' or 'bfloat16' (use bf16 on GPU/TPU)
    c.frozen_dtype = "float32"      # storage of frozen towers (MLLM, autoencoder): bf16 halves it
    c.split_prompt = True           # prompt forward once without grad, backward over queries only
    c.timestep_sampling = "uniform" # 'uniform' (official) or 'logit_normal'
    # Trainable parameters by path regex over '/'-joined paths; everything else is frozen and
    # gets no optimiser state. Official: the DiT, the connector and the new embedding rows.
    c.trainable = ("dit/.*", "connector/.*", "metaquery/.*")
    c.optimizer = default_optimizer_config()
    # LoRA (uniimage_jax/models/lora.py): rank 0 = off. With rank > 0 the adapters train and
    # `trainable` lists only what trains besides them (e.g. ('connector/.*', 'metaquery/.*')).
    c.lora = ml_collections.ConfigDict({
        "rank": 0, "alpha": 0.0, "dropout": 0.0,       # scale alpha / rank (PEFT); 0: = rank
        "dit_targets": DEFAULT_DIT_TARGETS,            # regexes over DiT Dense module paths
        "mllm_targets": ()})                           # ... and language-model ones
    c.ema = default_ema_config()    # EMA of the trainable parameters (train/ema.py); off
    # optimizer.total_steps (the cosine length) is set by each stage; it stays fixed when a run
    # is extended with a larger --config.max_steps, so the schedule of a resumed run is unchanged.
    # A caption stage reads t2i's (image, caption) pairs, and must see every caption.
    c.data = default_data_config(data_task(task))
    if task == "caption":
        c.data.caption_dropout = 0.0
    c.data.image_size = c.model.get_ref("image_size")
    if preset == "tbac_3b" and task in TBAC_PROMPT_BUCKETS:  # t2i reserves no image tokens
        c.data.prompt_buckets = TBAC_PROMPT_BUCKETS[task]
    # Weights: converted directories (uniimage-convert); mllm/dit/vae may also name a training
    # stage directory (that part of its latest step); empty = not used.
    c.pretrained = ml_collections.ConfigDict({"tbac": "", "mllm": "", "dit": "", "vae": ""})
    # Qwen2.5-VL tokenizer + preprocessor files: a local directory, or its Hugging Face model id
    # (Qwen/Qwen2.5-VL-3B-Instruct[@REVISION]: fetched into the Hub cache once, read from it
    # offline; uniimage_jax/hub.py). The pretrained.* fields are converted directories, not ids.
    c.processor_dir = ""
    c.init_from = ""                # previous stage dir: its latest trainable params (stage chain)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1 fills
    c.logical_rules = ()            # extra (logical axis, mesh axes) rules, override defaults
    # Layout of the frozen towers: 'tensor' (split over the mesh's tensor axis only, replicated
    # when it is 1) or 'replicated'; never FSDP-sharded (they would be all-gathered every step).
    c.frozen_sharding = "tensor"
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3, "async_save": True})

    # A JAX profiler trace of steps start_step+1 .. start_step+num_steps into <stage>/profile/
    # (TensorBoard's profile plugin / XProf); num_steps 0 = off.
    c.profile = ml_collections.ConfigDict({"start_step": 10, "num_steps": 0})
    # Steps between the cross-process checks for SIGTERM (a barrier on the coordination service,
    # host-side; one process checks every step). A stop is honoured within this many steps.
    c.stop_check_every = 10
    c.log_every = 50                # steps per metrics record; loss / grad_norm are window means
    c.sample_every = 0              # steps between sample grids (0: never)
    c.sample_steps = 30
    c.sample_guidance = 3.0         # official training-time evaluation guidance
    c.sample_prompts = ("a photo of a red circle", "a blue square to the left of a green circle")
    # Held-out loss (train/eval_loss.py, whose docstring says what is measured): every_steps 0 =
    # off; a fixed held-out set (eval.data: a source like config.data; eval.start/num_examples),
    # fixed noise (eval.seed) at a fixed grid of eval.num_timesteps noise levels, averaged in
    # eval.num_bands bands of sigma; logged as eval/loss, eval/loss_t0.0-0.2, ... (eval/ema_loss*
    # with an EMA) to metrics.jsonl and TensorBoard. t2i and ti2i only.
    c.eval = default_eval_config(data_task(task))
    c.eval.data.image_size = c.model.get_ref("image_size")
    c.eval.data.source_image_size = c.data.get_ref("source_image_size")
    return c
