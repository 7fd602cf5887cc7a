"""Everything a stage needs before its first step, checked in the order that fails fastest: the
config's combinations (`validate`, before anything loads), the model, the processor, the prompt
length, then the parameters (converted weights, or a random init for the tiny preset) split into
the trained and the frozen trees and laid out on the mesh."""

from __future__ import annotations

import logging
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniimage_jax import hub, storage
from uniimage_jax.checkpoints.partition import partition_params, trainable_mask
from uniimage_jax.errors import ConfigError, UserError
from uniimage_jax.models import lora, presets
from uniimage_jax.models.layers import compute_dtype
from uniimage_jax.models.uniimage import UniImage
from uniimage_jax.processing.prompt_buckets import check_prompt_buckets
from uniimage_jax.processing.prompts import add_metaquery_tokens, check_prompt_room
from uniimage_jax.train import distributed, profiling, sharding, step_params
from uniimage_jax.train import ema as ema_lib
from uniimage_jax.train import eval_loss
from uniimage_jax.train.batches import prompt_length_cap, prompt_length_field
from uniimage_jax.train.step import TrainState

log = logging.getLogger("uniimage_jax.train")

TASKS = ("t2i", "ti2i", "caption")


def build_model(config) -> UniImage:
    model_config = presets.build_model_config(config.model,
                                              lora.from_training_config(config.lora))
    return UniImage(model_config, dtype=compute_dtype(config.compute_dtype,
                                                                "config.compute_dtype"))


def trainable_patterns(config, model: UniImage) -> list[str]:
    """`config.trainable`, plus the LoRA adapters when `config.lora.rank` > 0."""
    return lora.trainable_patterns(config.trainable, model.config.lora)


def load_processor_for(config, model: UniImage, workdir: str):
    """The tokenizer/processor, extended with the metaquery tokens."""
    from uniimage_jax.processing import qwen as qwen_processing

    path = hub.resolve(config.processor_dir, files=hub.PROCESSOR, what="config.processor_dir")
    if not path:
        if config.model.preset != "tiny":
            raise ConfigError("config.processor_dir is empty: set it to the local Qwen2.5-VL "
                              "directory holding the tokenizer and preprocessor files, or its "
                              "Hugging Face model id (Qwen/Qwen2.5-VL-3B-Instruct)")
        path = storage.join(workdir, "tiny_processor")
        if jax.process_index() == 0:
            make_tiny_processor_once(path)
        distributed.sync("tiny_processor")
    processor = qwen_processing.load_processor(path)
    add_metaquery_tokens(processor.tokenizer, model.config.mllm.vocab_size,
                         model.config.num_metaqueries)
    return processor


def make_tiny_processor_once(path: str) -> None:
    """The tiny preset's processor directory at `path` (local or gs://) unless it is there.
    On a bucket it is written locally and uploaded, its JSON files last: a directory without
    `tokenizer_config.json` is an interrupted upload and is written again."""
    import tempfile

    from uniimage_jax.processing import tiny

    if not storage.is_remote(path):
        if not os.path.exists(path):
            tiny.make_tiny_processor_dir(path)
        return
    if storage.exists(storage.join(path, "tokenizer_config.json")):
        return
    with tempfile.TemporaryDirectory(prefix="uniimage_tiny_processor_") as tmp:
        storage.upload_dir(tiny.make_tiny_processor_dir(os.path.join(tmp, "p")), path)


def abstract_params(model: UniImage, mesh, rules, config=None):
    """Every parameter as a ShapeDtypeStruct with its sharding on `mesh`: nothing is allocated.
    With `config`, what trains (`trainable_patterns`) is laid out by `rules` and the frozen rest
    by `sharding.frozen_rules(rules, config.frozen_sharding)` (never FSDP-gathered per step)."""
    boxed = jax.eval_shape(model.init_boxed, jax.random.PRNGKey(0))
    used = None   # a parameter the stage never holds is laid out but not warned about
    if config is not None:
        kept = step_params.for_stage(nn.meta.unbox(boxed), config, model)
        used = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(kept)}
    shardings = sharding.logical_to_shardings(boxed, mesh, rules, used)
    if config is not None:
        frozen = sharding.logical_to_shardings(
            boxed, mesh, sharding.frozen_rules(rules, config.frozen_sharding), used)
        trains = trainable_mask(shardings, trainable_patterns(config, model))
        shardings = jax.tree.map(lambda t, a, b: a if t else b, trains, shardings, frozen)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)


def base_params(config, model: UniImage, mesh, rules):
    """The parameters the stage reads (`step_params.for_stage`: no frozen weights that neither
    its step nor its sample sheets use) from converted weights or (tiny only) a random init,
    sharded."""
    abstract = abstract_params(model, mesh, rules, config)
    p = config.pretrained
    if p.tbac or p.mllm or p.dit or p.vae:
        from uniimage_jax.checkpoints.loader import load_pretrained_parts

        params = load_pretrained_parts(model, abstract, tbac=p.tbac, mllm=p.mllm, dit=p.dit,
                                       vae=p.vae, random_rest=config.model.preset == "tiny",
                                       seed=config.seed,
                                       select=lambda t: step_params.for_stage(t, config, model))
    elif config.model.preset == "tiny":
        params, _ = sharding.sharded_init(model.init_boxed, mesh, rules,
                                          jax.random.PRNGKey(config.seed),
                                          shardings=jax.tree.map(lambda a: a.sharding, abstract))
        params = step_params.for_stage(params, config, model)
    else:
        raise ConfigError(f"preset {config.model.preset!r} has no weights: set config.pretrained."
                          "tbac (a converted TBAC-UniImage) or pretrained.mllm/dit/vae (converted "
                          "component directories); random init is for the tiny preset only")
    return params


def split_params(params, config, model: UniImage):
    """(trainable, frozen) by `config.trainable` plus the LoRA adapters, the frozen towers stored
    in `config.frozen_dtype`. Arrays or (ahead-of-time) ShapeDtypeStructs alike."""
    frozen_dtype = compute_dtype(config.frozen_dtype, "config.frozen_dtype")
    trainable, frozen = partition_params(params, trainable_patterns(config, model))

    def store(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, frozen_dtype, sharding=x.sharding)
        return x.astype(frozen_dtype)
    return trainable, jax.tree.map(store, frozen)


def check_prompt_fits(config, model: UniImage, processor) -> None:
    """A fixed prompt length too short for the prompt without its caption stops the run now;
    longer captions are cut, counted and named as they come (never an error mid-run)."""
    if config.task == "caption":
        return
    from PIL import Image

    images = None
    if config.task == "ti2i":
        images = [Image.new("RGB", (config.data.source_image_size,) * 2)]
    try:
        room = check_prompt_room(processor, prompt_length_cap(config), images=images,
                                 num_metaqueries=model.config.num_metaqueries,
                                 system_prompt=model.config.system_prompt,
                                 pad_to_field=prompt_length_field(config))
    except ValueError as e:
        raise UserError(f"config.{e}") from None
    distributed.log_main("prompts: up to %d caption tokens fit (longer ones are cut, counted "
                         "and named)", min(room, model.config.max_caption_tokens), logger=log)


def on_mesh(tree, mesh):
    """Leaves not yet laid out on `mesh` (optimiser scalars, step, RNG) become replicated on it, so
    the jitted step sees the same input shardings on its first call as on every later one. They
    are made by a compiled constant rather than `device_put`, which on several processes checks
    that the values agree and so rejects NaN (the spike EMAs start as NaN)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
            return x
        value = np.asarray(jax.device_get(x))
        return jax.jit(lambda: jnp.asarray(value), out_shardings=replicated)()
    return jax.tree.map(put, tree)


def initial_state(trainable, tx, mesh, *, seed: int, ema: bool) -> TrainState:
    """Step 0 of a stage on `mesh`: fresh optimiser state laid out as `opt_state_shardings` says,
    the RNG from `seed`, an EMA copy of `trainable` when `ema`."""
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
    return on_mesh(TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                              opt_state=opt_state, rng=jax.random.PRNGKey(seed),
                              ema=ema_lib.init(trainable) if ema else None), mesh)


def opt_state_shardings(tx, trainable, mesh):
    """Where the optimiser state lives: every parameter-shaped leaf (AdamW's moments) exactly as
    its parameter, so `fsdp` splits the moments as it splits the weights; the counters and
    spike-skipping scalars replicated. Left to itself, `jax.jit(tx.init)` puts the moments (zeros
    that depend on no input) on every chip whole: 8 bytes per trainable parameter per chip.
    Works on arrays and ShapeDtypeStructs alike (the ahead-of-time compile uses it)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def like_param(_, param):
        s = getattr(param, "sharding", None)
        return s if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else replicated

    return optax.tree_map_params(tx, like_param, jax.eval_shape(tx.init, trainable), trainable,
                                 transform_non_params=lambda _: replicated)


def validate(config) -> UniImage:
    """Config errors before anything loads or compiles; returns the model."""
    if config.task not in TASKS:
        raise ConfigError(f"config.task must be one of {TASKS}, got {config.task!r}")
    if config.task == "caption" and config.data.caption_dropout:
        raise ConfigError(f"config.data.caption_dropout={config.data.caption_dropout}: a caption "
                          "stage learns the captions, none may be dropped (set it to 0)")
    sharding.frozen_rules((), config.frozen_sharding)  # the choices, checked before compiling
    for name in ("compute_dtype", "frozen_dtype"):
        compute_dtype(config[name], f"config.{name}")
    if isinstance(config.stop_check_every, bool) or not isinstance(
            config.stop_check_every, int) or config.stop_check_every < 1:
        raise ConfigError(f"config.stop_check_every must be a positive integer, got "
                          f"{config.stop_check_every!r}")
    if config.max_steps < 1:
        raise ConfigError(f"config.max_steps must be >= 1, got {config.max_steps}")
    profiling.check_config(config.profile)
    if check_prompt_buckets(config.data.prompt_buckets) and config.task == "caption":
        raise ConfigError("config.data.prompt_buckets is for t2i / ti2i stages; a caption stage "
                          "pads to config.model.max_prompt_tokens (set prompt_buckets=())")
    if config.sample_every and not (0 <= config.sample_guidance < float("inf")
                                    and config.sample_steps >= 1):  # else the first grid fails
        raise ConfigError(f"config.sample_guidance={config.sample_guidance} must be finite and "
                          f">= 0 and config.sample_steps={config.sample_steps} >= 1")
    ema_lib.check_config(config.ema)
    eval_loss.check_config(config)
    model = build_model(config)  # ladder / widths / LoRA targets validated before compiling
    patterns = trainable_patterns(config, model)
    if model.config.lora is not None:
        _check_lora_trainable(model, config.trainable)
    if config.task == "caption":
        _check_caption_trains_mllm(model, patterns)
    elif config.split_prompt:
        _check_split_prompt(model, patterns)
    return model


def _check_lora_trainable(model: UniImage, trainable_patterns) -> None:
    """With LoRA, `config.trainable` lists additions only: training an adapted kernel too would
    make its adapter pointless (and is almost always the default pattern left in place)."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    adapted = ["/".join(m) + "/kernel" for m in lora.target_modules(abstract, model.config.lora)]
    clash = [p for p in trainable_patterns if any(re.fullmatch(p, k) for k in adapted)]
    if clash:
        raise UserError(f"config.trainable patterns {clash} make LoRA-adapted base weights "
                         f"trainable (e.g. {adapted[0]}): with config.lora.rank > 0, "
                         "config.trainable lists only what trains besides the adapters, e.g. "
                         "('connector/.*', 'metaquery/.*')")


def _trainable_mllm_paths(model: UniImage, trainable_patterns) -> list[str]:
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    trainable, _ = partition_params(abstract, list(trainable_patterns))
    leaves = jax.tree_util.tree_flatten_with_path(trainable.get("mllm", {}))[0]
    return ["mllm/" + "/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]


def _check_caption_trains_mllm(model: UniImage, trainable_patterns) -> None:
    if not _trainable_mllm_paths(model, trainable_patterns):
        raise ConfigError(f"config.task='caption' trains the MLLM, but config.trainable="
                          f"{tuple(trainable_patterns)} matches no mllm/ parameter "
                          "(e.g. 'mllm/.*')")


def _check_split_prompt(model: UniImage, trainable_patterns) -> None:
    """split_prompt runs the prompt under stop_gradient: exact only while no MLLM parameter
    trains (the prompt's keys and values would otherwise need gradients too)."""
    names = _trainable_mllm_paths(model, trainable_patterns)
    if names:
        raise ConfigError(
            "config.split_prompt=True runs the prompt without gradients, which is exact only "
            f"while the MLLM is frozen, but config.trainable makes {len(names)} MLLM "
            f"parameters trainable (e.g. {', '.join(names[:3])}): set --config.split_prompt=False "
            "or freeze the MLLM")
