"""One training stage: model + parameters (resume order), mesh, jitted step, data, checkpoints.

Tasks (`config.task`): 't2i' and 'ti2i' train generation with the official flow-matching loss;
'caption' trains the MLLM to describe images (`train/captioning.py`; the demo's understanding
stage: not part of the official recipe, whose MLLM is pretrained and frozen).

Resume order (first that applies):
  1. this stage's latest checkpoint under `<workdir>/<stage>/` (trainable params, optimiser state,
     step, RNG, data iterator);
  2. `init_from`: a previous stage's directory (its latest step, trainable params only);
  3. converted pretrained weights (`pretrained.tbac`, or the `pretrained.mllm/dit/vae` parts);
  4. random initialisation (allowed for the tiny preset only).
Frozen parameters (the MLLM, the autoencoder) always come from 3 / 4: stage checkpoints hold the
trainable tree only, so they stay small and the frozen towers are never copied per stage.

The step is one `jax.jit` with explicit in/out shardings and the state donated. The per-step RNG
is `fold_in(state.rng, step)` and the data iterator is checkpointed, so a resumed run repeats the
uninterrupted one bitwise (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniimage_jax import presets
from uniimage_jax.errors import ConfigError, UserError
from uniimage_jax.models import lora
from uniimage_jax.models.uniimage import UniImage, rope_positions
from uniimage_jax.paths import absolute
from uniimage_jax.processing.prompts import (
    TruncationLog,
    add_metaquery_tokens,
    build_generation_inputs,
    check_prompt_room,
)
from uniimage_jax.train import captioning, distributed, lineage, profiling, sharding, workdir_lock
from uniimage_jax.train import checkpoint as ckpt_lib
from uniimage_jax.train import ema as ema_lib
from uniimage_jax.train.config_paths import check_paths_exist, make_paths_absolute
from uniimage_jax.train.metric_window import MetricWindow, report_skips
from uniimage_jax.train.optimizer import (
    apply_updates_or_skip,
    learning_rate_schedule,
    make_optimizer,
    merge_params,
    partition_params,
    spike_metrics,
)

log = logging.getLogger("uniimage_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TASKS = ("t2i", "ti2i", "caption")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any        # the trainable tree only
    opt_state: Any
    rng: jax.Array
    ema: Any = None    # EMA of `params` when config.ema.enabled (train/ema.py), else None


# ------------------------------------------------------------------------------------ pieces


def build_model(config) -> UniImage:
    model_config = dataclasses.replace(presets.build_model_config(config.model),
                                       lora=lora.from_training_config(config.lora))
    return UniImage(model_config, dtype=DTYPES[config.compute_dtype])


def trainable_patterns(config, model: UniImage) -> list[str]:
    """`config.trainable`, plus the LoRA adapters when `config.lora.rank` > 0."""
    return lora.trainable_patterns(config.trainable, model.config.lora)


def load_processor_for(config, model: UniImage, workdir: str):
    """The tokenizer/processor, extended with the metaquery tokens."""
    from uniimage_jax.processing import qwen as qwen_processing

    path = config.processor_dir
    if not path:
        if config.model.preset != "tiny":
            raise ConfigError("config.processor_dir is empty: set it to the local Qwen2.5-VL "
                              "directory holding the tokenizer and preprocessor files")
        from uniimage_jax.processing import tiny

        path = os.path.join(workdir, "tiny_processor")
        if jax.process_index() == 0 and not os.path.exists(path):
            tiny.make_tiny_processor_dir(path)
        distributed.sync("tiny_processor")
    processor = qwen_processing.load_processor(path)
    add_metaquery_tokens(processor.tokenizer, model.config.mllm.vocab_size,
                         model.config.num_metaqueries)
    return processor


def abstract_params(model: UniImage, mesh, rules):
    """Every parameter as a ShapeDtypeStruct with its sharding on `mesh`: nothing is allocated."""
    boxed = jax.eval_shape(model.init_boxed, jax.random.PRNGKey(0))
    shardings = sharding.logical_to_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)


def base_params(config, model: UniImage, mesh, rules):
    """All parameters from converted weights or (tiny only) a random init, sharded."""
    abstract = abstract_params(model, mesh, rules)
    p = config.pretrained
    if p.tbac or p.mllm or p.dit or p.vae:
        from uniimage_jax.models.loader import load_pretrained_parts

        params = load_pretrained_parts(model, abstract, tbac=p.tbac, mllm=p.mllm, dit=p.dit,
                                       vae=p.vae, random_rest=config.model.preset == "tiny",
                                       seed=config.seed)
    elif config.model.preset == "tiny":
        init = jax.jit(model.init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))
        params = init(jax.random.PRNGKey(config.seed))
    else:
        raise ConfigError(f"preset {config.model.preset!r} has no weights: set config.pretrained."
                          "tbac (a converted TBAC-UniImage) or pretrained.mllm/dit/vae (converted "
                          "component directories); random init is for the tiny preset only")
    return params


def split_params(params, config, model: UniImage):
    """(trainable, frozen) by `config.trainable` plus the LoRA adapters, the frozen towers stored
    in `config.frozen_dtype`. Arrays or (ahead-of-time) ShapeDtypeStructs alike."""
    frozen_dtype = DTYPES[config.frozen_dtype]
    trainable, frozen = partition_params(params, trainable_patterns(config, model))

    def store(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, frozen_dtype, sharding=x.sharding)
        return x.astype(frozen_dtype)
    return trainable, jax.tree.map(store, frozen)


def jit_train_step(model: UniImage, tx, config, state_shardings):
    """The compiled step: the state laid out as `state_shardings` and donated; the frozen tree and
    the batch keep the shardings they arrive with; the image grid (ti2i) is static."""
    return jax.jit(make_train_step(model, tx, config),
                   in_shardings=(state_shardings, None, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,),
                   static_argnums=(3,))


def make_train_step(model: UniImage, tx, config):
    split_prompt = config.split_prompt
    scheme = config.timestep_sampling
    captioning_task = config.task == "caption"

    def train_step(state: TrainState, frozen, batch, grid=None):
        rng = jax.random.fold_in(state.rng, state.step)
        batch = dict(batch)
        batch["position_ids"] = jnp.transpose(batch["position_ids"], (1, 0, 2))
        if grid is not None:
            pv = batch["pixel_values"]
            batch["pixel_values"] = pv.reshape(-1, pv.shape[-1])
            batch["image_grid_thw"] = grid

        def loss_fn(trainable):
            params = merge_params(trainable, frozen)
            if captioning_task:
                with lora.adapters(model.config.lora):
                    return captioning.caption_loss(model.mllm, params["mllm"], batch)
            loss, _ = model.loss(params, batch, rng, split_prompt=split_prompt,
                                 timestep_sampling=scheme)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
        params = apply_updates_or_skip(state.params, updates, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   **spike_metrics(opt_state)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def prepare_batch(host_batch: dict, processor, model: UniImage, config, task: str,
                  truncations: TruncationLog | None = None):
    """Tokenize on the host: numpy arrays with a leading batch axis, and the static image grid.
    Captions too long for the fixed prompt length are cut, counted in `truncations` and named
    (the record's file:line) in a warning."""
    mc = model.config
    if task == "caption":
        from PIL import Image

        # The target images back to uint8 (exact: the pipeline mapped uint8 x to x / 127.5 - 1).
        images = [Image.fromarray(np.round((np.asarray(x) + 1.0) * 127.5).astype(np.uint8))
                  for x in host_batch["target"]]
        captions = [str(c) for c in host_batch["caption"]]
        return captioning.build_caption_inputs(processor, mc.mllm, images, captions,
                                               question=config.caption_question,
                                               pad_to=config.model.max_prompt_tokens,
                                               names=_names(host_batch), truncations=truncations)
    captions = [str(c) for c in host_batch["caption"]]
    images = None
    if task == "ti2i":
        from PIL import Image

        images = [[Image.fromarray(np.asarray(x))] for x in host_batch["source_image"]]
    enc = build_generation_inputs(processor, captions, images,
                                  num_metaqueries=mc.num_metaqueries,
                                  system_prompt=mc.system_prompt,
                                  max_caption_tokens=mc.max_caption_tokens,
                                  pad_to=config.model.max_prompt_tokens,
                                  names=_names(host_batch), truncations=truncations)
    grid = enc.get("image_grid_thw")
    pos = rope_positions(mc, enc["input_ids"], enc["attention_mask"], grid)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "position_ids": np.transpose(pos, (1, 0, 2)),
           "target": np.asarray(host_batch["target"], np.float32)}
    if grid is not None:
        b = len(captions)
        out["pixel_values"] = enc["pixel_values"].reshape(b, -1, enc["pixel_values"].shape[-1])
        if len(set(grid)) != 1:
            raise ValueError(f"source images of one batch must share one size, got grids {grid}")
    return out, grid


def _names(host_batch: dict) -> list[str] | None:
    """The batch's records as messages name them (a manifest's file:line)."""
    return [str(n) for n in host_batch["name"]] if "name" in host_batch else None


# ------------------------------------------------------------------------------------ loop


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: list[float]       # the logged losses (each the mean over its log window)
    stage_dir: str
    skipped_steps: int = 0    # steps of this stage skipped as spikes (parameters unchanged)

    def summary(self, max_steps: int) -> str:
        """The console's last line: where the stage got to and what it skipped."""
        skipped = (f" ({self.skipped_steps} skipped as loss/gradient spikes, the parameters "
                   "left unchanged)" if self.skipped_steps else "")
        return (f"{os.path.basename(self.stage_dir)}: step {self.step} of {max_steps}{skipped}, "
                f"checkpoints in {self.stage_dir}")


def train(config, workdir: str) -> TrainResult:
    """Run (or resume) one stage until `config.max_steps`. Its paths are made absolute first
    (they are stored with the checkpoints), and the stage directory is locked against a second
    run while this one trains."""
    make_paths_absolute(config)
    check_paths_exist(config)
    workdir = absolute(workdir)
    from uniimage_jax.data.pipeline import check_training_data

    check_training_data(config)  # data and batch errors in seconds, before any model is built
    distributed.maybe_initialize_distributed()
    model = _validate(config)
    with workdir_lock.hold(os.path.join(workdir, config.stage)):
        return _train_stage(config, workdir, model)


def _train_stage(config, workdir: str, model: UniImage) -> TrainResult:
    from uniimage_jax.data.pipeline import make_train_iterator

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.logical_rules)
    n_proc, proc = jax.process_count(), jax.process_index()
    global_batch = config.batch_size
    sharding.check_batch_divisible(global_batch, mesh)
    if global_batch % n_proc:
        raise ConfigError(f"batch_size={global_batch} does not divide over {n_proc} processes")

    task = config.task
    stage_dir = os.path.join(workdir, config.stage)
    processor = load_processor_for(config, model, workdir)
    _check_prompt_room(config, model, processor)

    with mesh:
        params = base_params(config, model, mesh, rules)
        trainable, frozen = split_params(params, config, model)
        tx = make_optimizer(config.optimizer)
        state = initial_state(trainable, tx, mesh, seed=config.seed, ema=config.ema.enabled)
        checkpointer = ckpt_lib.StageCheckpointer(workdir, config.stage,
                                                  keep=config.checkpoint.keep,
                                                  save_every=config.checkpoint.every_steps,
                                                  async_save=config.checkpoint.async_save)
        data_state = None
        if checkpointer.latest_step() is not None:
            state, data_state = ema_lib.resume(
                state, checkpointer.stored_state_keys(), config.ema,
                lambda target: checkpointer.restore(abstract_state=target))
            log.info("resumed %s at step %d", stage_dir, int(state.step))
        elif config.init_from:
            restored = ckpt_lib.restore_params_only(config.init_from, state.params)
            state = initial_state(restored, tx, mesh, seed=config.seed, ema=config.ema.enabled)
            if proc == 0:
                lineage.record(stage_dir, config.init_from)
            log.info("initialised trainable parameters from %s", config.init_from)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)

        # A caption stage reads (image, caption) pairs like text-to-image.
        data_task = "t2i" if task == "caption" else task
        it = make_train_iterator(config.data, task=data_task, batch_size=global_batch // n_proc,
                                 seed=config.seed, process_index=proc, process_count=n_proc,
                                 image_size=model.config.image_size,
                                 size_multiple=model.config.pixel_multiple, cache_dir=workdir)
        if data_state is not None:
            it.set_state(data_state)

        step_fn = jit_train_step(model, tx, config, state_shardings)
        ema_step = jax.jit(ema_lib.make_state_update(config.ema),
                           in_shardings=(state_shardings, None), out_shardings=state_shardings,
                           donate_argnums=(0,))
        batch_sh = sharding.batch_sharding(mesh)
        schedule = learning_rate_schedule(config.optimizer)
        writer = _Writer(stage_dir) if proc == 0 else None
        if writer and it.bucket_histogram:
            writer.buckets(int(state.step), it.bucket_histogram)
        flag = ckpt_lib.install_sigterm_handler()
        trace = profiling.StepTrace(config.profile, stage_dir)
        losses: list[float] = []
        step = int(state.step)
        start = step
        progress = _progress(start, config.max_steps, proc == 0)
        window = MetricWindow(global_batch)
        truncations = TruncationLog()
        skipped_steps = int(jax.device_get(spike_metrics(state.opt_state)).get(
            "spike/num_skipped", 0))
        try:
            while step < config.max_steps:
                host = next(it)
                arrays, grid = prepare_batch(host, processor, model, config, task, truncations)
                batch = {k: sharding.shard_host_batch(v, mesh, batch_sh) for k, v in arrays.items()}
                grid = tuple(grid[:1]) * global_batch if grid is not None else None
                trace.before_step(step)
                state, metrics = step_fn(state, frozen, batch, grid)
                if state.ema is not None:
                    state = ema_step(state, jnp.zeros((), jnp.uint32))
                step += 1
                trace.after_step(step, metrics)
                progress.update(1)
                window.add(metrics)
                if step % config.log_every == 0 or step == config.max_steps:
                    m = window.record(metrics)
                    m["lr"] = float(schedule(step - 1))
                    m["skipped_samples"] = float(host.get("num_skipped", 0))
                    m["truncated_captions"] = float(truncations.count)
                    losses.append(m["loss"])
                    skipped_steps = report_skips(progress, m, step, skipped_steps)
                    if writer:
                        writer.scalars(step, m)
                checkpointer.save(step, state, it.get_state(), config.to_dict(),
                                  force=step == config.max_steps)
                if config.sample_every and step % config.sample_every == 0 and writer:
                    _sample_grid(model, merge_params(_sampling_weights(state), frozen),
                                 processor, config, stage_dir, step)
                if flag.any_host_requested():
                    log.warning("SIGTERM: saving step %d and stopping", step)
                    checkpointer.save(step, state, it.get_state(), config.to_dict(), force=True)
                    break
        finally:
            trace.close()
            progress.close()
            checkpointer.wait()
            checkpointer.close()
            flag.uninstall()
            if writer:
                writer.close()
    return TrainResult(step=step, losses=losses, stage_dir=stage_dir,
                       skipped_steps=skipped_steps)


def _check_prompt_room(config, model: UniImage, processor) -> None:
    """A fixed prompt length too short for the prompt without its caption stops the run now;
    longer captions are cut, counted and named as they come (never an error mid-run)."""
    if config.task == "caption":
        return
    from PIL import Image

    images = None
    if config.task == "ti2i":
        images = [Image.new("RGB", (config.data.source_image_size,) * 2)]
    try:
        room = check_prompt_room(processor, config.model.max_prompt_tokens, images=images,
                                 num_metaqueries=model.config.num_metaqueries,
                                 system_prompt=model.config.system_prompt)
    except ValueError as e:
        raise UserError(f"config.model.{e}") from None
    distributed.log_main("prompts: up to %d caption tokens fit (longer ones are cut, counted "
                         "and named)", min(room, model.config.max_caption_tokens), logger=log)


def _sampling_weights(state: TrainState):
    """The in-training sample grids use the EMA when there is one."""
    log.info("sample grid at step %d from the %s weights", int(state.step),
             "EMA" if state.ema is not None else "raw")
    return state.params if state.ema is None else state.ema


def initial_state(trainable, tx, mesh, *, seed: int, ema: bool) -> TrainState:
    """Step 0 of a stage on `mesh`: fresh optimiser state laid out as `opt_state_shardings` says,
    the RNG from `seed`, an EMA copy of `trainable` when `ema`."""
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
    return _on_mesh(TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
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


def _on_mesh(tree, mesh):
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


def _validate(config) -> UniImage:
    """Config errors before anything loads or compiles; returns the model."""
    if config.task not in TASKS:
        raise ConfigError(f"config.task must be one of {TASKS}, got {config.task!r}")
    if config.task == "caption" and config.data.caption_dropout:
        raise ConfigError(f"config.data.caption_dropout={config.data.caption_dropout}: a caption "
                          "stage learns the captions, none may be dropped (set it to 0)")
    for name in ("compute_dtype", "frozen_dtype"):
        if config[name] not in DTYPES:
            raise ConfigError(f"config.{name}={config[name]!r}: expected one of {list(DTYPES)}")
    if config.max_steps < 1:
        raise ConfigError(f"config.max_steps must be >= 1, got {config.max_steps}")
    profiling.check_config(config.profile)
    if config.sample_every and not (0 <= config.sample_guidance < float("inf")
                                    and config.sample_steps >= 1):  # else the first grid fails
        raise ConfigError(f"config.sample_guidance={config.sample_guidance} must be finite and "
                          f">= 0 and config.sample_steps={config.sample_steps} >= 1")
    ema_lib.check_config(config.ema)
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
    import re

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


class _Writer:
    """TensorBoard scalars + a metrics.jsonl beside them (process 0 only)."""

    def __init__(self, stage_dir: str):
        from tensorboardX import SummaryWriter

        os.makedirs(stage_dir, exist_ok=True)
        self.stage_dir = stage_dir
        self.tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"))
        self.jsonl = open(os.path.join(stage_dir, "metrics.jsonl"), "a")

    def scalars(self, step: int, metrics: dict):
        for k, v in metrics.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def buckets(self, step: int, histogram: dict):
        """The aspect-bucket histogram ({"HxW": examples}): TensorBoard and buckets.json."""
        for label, count in histogram.items():
            self.tb.add_scalar(f"data/bucket_examples/{label}", count, step)
        with open(os.path.join(self.stage_dir, "buckets.json"), "w") as fh:
            json.dump({"step": step, "examples_per_bucket": histogram}, fh, indent=1)

    def close(self):
        self.tb.close()
        self.jsonl.close()


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
                dynamic_ncols=True)


def _sample_grid(model, params, processor, config, stage_dir: str, step: int):
    from uniimage_jax.sampling.grid import save_grid
    from uniimage_jax.sampling.sampler import SamplingConfig, generate

    cfg = SamplingConfig(num_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                         max_prompt_tokens=config.model.max_prompt_tokens)
    images = []
    for i, prompt in enumerate(config.sample_prompts):
        images += generate(model, params, processor, prompt, num_images=1, seed=i, cfg=cfg)
    save_grid(images, os.path.join(stage_dir, "samples", f"step_{step:07d}.png"),
              cols=len(images))
