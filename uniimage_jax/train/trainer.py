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

The step (`train/step.py`) is one `jax.jit` with explicit in/out shardings and the state donated.
The per-step RNG is `fold_in(state.rng, step)` and the data iterator is checkpointed, so a resumed
run repeats the uninterrupted one bitwise (on CPU). Reading order: `train` (checks, lock),
`_train_stage` (mesh, processor, held-out set, state, data), `StageLoop` (one step, then log /
save / held-out loss / sample / stop).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from uniimage_jax.checkpoints import stage as ckpt_lib
from uniimage_jax.checkpoints.partition import merge_params
from uniimage_jax.data.batch_keys import MODEL_INPUTS, target_key
from uniimage_jax.data.manifest import data_task
from uniimage_jax.errors import ConfigError
from uniimage_jax.models.uniimage import INPUT_BATCH_AXES, UniImage
from uniimage_jax.paths import absolute
from uniimage_jax.processing.prompts import TruncationLog
from uniimage_jax.train import distributed, lineage, profiling, sharding, step_params, workdir_lock
from uniimage_jax.train import ema as ema_lib
from uniimage_jax.train import eval_loss
from uniimage_jax.train.batches import ExampleEncoder, assemble_batch, prepare_batch
from uniimage_jax.train.compiled_memory import (
    abstract_like,
    describe_memory,
    device_memory_limit,
    executable_memory,
)
from uniimage_jax.train.config_paths import check_paths_exist, make_paths_absolute
from uniimage_jax.train.latent_cache import check_cache_fits_model
from uniimage_jax.train.metric_window import MetricWindow, report_skips
from uniimage_jax.train.optimizer import learning_rate_schedule, make_optimizer, spike_metrics
from uniimage_jax.train.run_log import MetricsWriter, progress_bar
from uniimage_jax.train.stage_setup import (
    base_params,
    check_prompt_fits,
    initial_state,
    load_processor_for,
    split_params,
    validate,
)
from uniimage_jax.train.step import TrainState, jit_train_step

log = logging.getLogger("uniimage_jax.train")


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
    run while this one trains. A SIGTERM, from start-up on, saves and stops the run early (all
    processes at the same step; `train/distributed.py`): the result's step is then short of
    max_steps."""
    with distributed.watch_sigterm():
        return _start(config, workdir)


def _start(config, workdir: str) -> TrainResult:
    make_paths_absolute(config)
    check_paths_exist(config)
    workdir = absolute(workdir)
    from uniimage_jax.data.pipeline import check_training_data

    check_training_data(config)  # data and batch errors in seconds, before any model is built
    distributed.maybe_initialize_distributed()
    model = validate(config)
    check_cache_fits_model(config, model)  # data.source='latents': encoded for this model
    with workdir_lock.hold(os.path.join(workdir, config.stage)):
        return _train_stage(config, workdir, model)


def _train_stage(config, workdir: str, model: UniImage) -> TrainResult:
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.logical_rules)
    sharding.check_batch_divisible(config.batch_size, mesh)
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} does not divide over "
                          f"{jax.process_count()} processes")
    stage_dir = os.path.join(workdir, config.stage)
    processor = load_processor_for(config, model, workdir)
    check_prompt_fits(config, model, processor)
    held_out = eval_loss.load_held_out_set(config, model, processor, mesh)  # before the weights
    with jax.set_mesh(mesh):
        tx = make_optimizer(config.optimizer)
        checkpointer = ckpt_lib.StageCheckpointer(workdir, config.stage,
                                                  keep=config.checkpoint.keep,
                                                  save_every=config.checkpoint.every_steps,
                                                  async_save=config.checkpoint.async_save)
        trainable, frozen = split_params(base_params(config, model, mesh, rules), config, model)
        state, data_state = _initial_state(config, trainable, tx, mesh, checkpointer, stage_dir)
        it = _train_iterator(config, model, workdir, data_state, processor)
        loop = StageLoop(config, model, mesh, processor, stage_dir, checkpointer, it, frozen,
                         jax.tree.map(lambda x: x.sharding, state), tx, held_out)
        return loop.run(state)


def _initial_state(config, trainable, tx, mesh, checkpointer, stage_dir: str):
    """(state, data iterator state or None) by the resume order of the module docstring."""
    def fresh(params):
        return initial_state(params, tx, mesh, seed=config.seed, ema=config.ema.enabled)

    state = fresh(trainable)
    if checkpointer.latest_step() is not None:
        state, data_state = ema_lib.resume(
            state, checkpointer.stored_state_keys(), config.ema,
            lambda target: checkpointer.restore(abstract_state=target))
        log.info("resumed %s at step %d", stage_dir, int(state.step))
        return state, data_state
    if config.init_from:
        state = fresh(ckpt_lib.restore_params_only(config.init_from, state.params))
        if jax.process_index() == 0:
            lineage.record(stage_dir, config.init_from)
        log.info("initialised trainable parameters from %s", config.init_from)
    return state, None


def _train_iterator(config, model: UniImage, workdir: str, data_state, processor):
    """This process's share of the data, positioned where the checkpoint left it. For t2i and
    ti2i the examples are tokenised (and ti2i's source images processed) where grain reads them,
    off the main thread; the caption stage builds its prompts per batch on the main thread."""
    from uniimage_jax.data.pipeline import make_train_iterator
    from uniimage_jax.processing.caption_tokens import CaptionTokenCounter

    n_proc = jax.process_count()
    encoder = (None if config.task == "caption" else
               ExampleEncoder.for_stage(processor, model.config, config, config.task))
    counter = None if encoder is None else CaptionTokenCounter(processor.tokenizer)
    it = make_train_iterator(config.data, task=data_task(config.task),
                             batch_size=config.batch_size // n_proc, seed=config.seed,
                             process_index=jax.process_index(), process_count=n_proc,
                             image_size=model.config.image_size,
                             size_multiple=model.config.pixel_multiple, cache_dir=workdir,
                             example_encoder=encoder, count_caption_tokens=counter)
    if isinstance(data_state, ckpt_lib.StatesOfOtherProcessCount):
        from uniimage_jax.data.iterator_state import deal_again

        data_state = deal_again(data_state.states, global_batch=config.batch_size,
                                process_index=jax.process_index(), process_count=n_proc)
    if data_state is not None:
        it.set_state(data_state)
    return it


@dataclasses.dataclass
class StageLoop:
    """The loop of one stage: a step, then what follows it (log, save, sample, stop)."""
    config: Any
    model: UniImage
    mesh: Any
    processor: Any
    stage_dir: str
    checkpointer: Any
    it: Any
    frozen: Any
    state_shardings: Any
    tx: Any
    held_out: Any = None  # eval_loss.HeldOutSet, or None when config.eval is off

    def __post_init__(self):
        c = self.config
        self.step_fn = jit_train_step(self.model, self.tx, c, self.state_shardings)
        self.step_frozen = step_params.for_step(self.frozen, c)  # sample sheets use the rest
        self.ema_step = jax.jit(ema_lib.make_state_update(c.ema),
                                in_shardings=(self.state_shardings, None),
                                out_shardings=self.state_shardings, donate_argnums=(0,))
        self.schedule = learning_rate_schedule(c.optimizer)
        self.primary = jax.process_index() == 0
        self.writer = MetricsWriter(self.stage_dir) if self.primary else None
        self.window = MetricWindow(c.batch_size)
        self.truncations = TruncationLog()
        self.losses: list[float] = []
        self.compiled_for: set = set()   # batch shapes the step has compiled for
        self.memory_limit = device_memory_limit(jax.local_devices()[0])
        self.evaluator = eval_loss.make_evaluator(c, self.model, self.mesh, self.held_out,
                                                  self.state_shardings)

    def run(self, state: TrainState) -> TrainResult:
        c = self.config
        step = int(state.step)
        if self.writer and self.it.bucket_histogram:
            self.writer.buckets(step, self.it.bucket_histogram)
        self.skipped_steps = int(jax.device_get(spike_metrics(state.opt_state)).get(
            "spike/num_skipped", 0))
        trace = profiling.StepTrace(c.profile, self.stage_dir)
        self.progress = progress_bar(step, c.max_steps, self.primary)
        try:
            if step < c.max_steps and distributed.stop_requested(step, every=1):
                log.warning("SIGTERM during start-up: stopping at step %d before training", step)
                return self._result(step)
            if step == 0:
                self._evaluate(step, state)
            while step < c.max_steps:
                trace.before_step(step)
                state, metrics, host, arrays = self._step(state)
                step += 1
                trace.after_step(step, metrics)
                self.progress.update(1)
                self.window.add(metrics)
                if step % c.log_every == 0 or step == c.max_steps:
                    self._log(step, metrics, host, arrays)
                self._save(step, state, force=step == c.max_steps)
                self._evaluate(step, state)
                if c.sample_every and step % c.sample_every == 0 and self.primary:
                    self._sample(state, step)
                if distributed.stop_requested(step, c.stop_check_every):
                    log.warning("SIGTERM: saving step %d and stopping", step)
                    self._save(step, state, force=True)
                    break
        finally:
            trace.close()
            self._close()
        return self._result(step)

    def _result(self, step: int) -> TrainResult:
        return TrainResult(step=step, losses=self.losses, stage_dir=self.stage_dir,
                           skipped_steps=self.skipped_steps)

    def _step(self, state: TrainState):
        """One optimiser step (and EMA update) on the next host batch."""
        host = next(self.it)
        if MODEL_INPUTS in host:  # encoded where grain read it (see _train_iterator)
            arrays, image_grid = assemble_batch(host, self.config, self.truncations)
        else:
            arrays, image_grid = prepare_batch(host, self.processor, self.model, self.config,
                                               self.config.task, self.truncations)
        batch = sharding.shard_host_batch(arrays, self.mesh, batch_axes=INPUT_BATCH_AXES)
        # One image per row: the vision tower runs per row, each device on its own rows.
        image_grid = tuple(image_grid[:1]) if image_grid is not None else None
        shapes = (tuple(sorted((k, v.shape) for k, v in arrays.items())), image_grid)
        compiles = shapes not in self.compiled_for   # this call compiles the step for them
        abstract = abstract_like((state, self.step_frozen, batch)) if compiles else None
        if compiles and jax.process_count() > 1:
            # Compile first (the call below finds it in jit's cache), then meet: a process that
            # reaches the step's first collective long after the others makes them give up.
            self.step_fn.lower(*abstract, image_grid).compile()
            distributed.barrier("step compiled")
        t0 = time.perf_counter()
        state, metrics = self.step_fn(state, self.step_frozen, batch, image_grid)
        if compiles:
            self._log_compiled(abstract, image_grid, arrays, time.perf_counter() - t0)
            self.compiled_for.add(shapes)
        if state.ema is not None:
            state = self.ema_step(state, jnp.zeros((), jnp.uint32))
        return state, metrics, host, arrays

    def _log_compiled(self, abstract: tuple, image_grid, arrays: dict, seconds: float) -> None:
        """One line when the step compiles for a new batch shape (each prompt bucket, aspect
        bucket): the shape, the first call's time and XLA's per-device memory for it."""
        if not self.primary:
            return
        memory = executable_memory(self.step_fn, abstract, image_grid)
        shape = f"prompts of {arrays['input_ids'].shape[1]} tokens"
        key = target_key(arrays)
        if key in arrays:  # not in the caption stage
            shape += f", {key} {arrays[key].shape[1]}x{arrays[key].shape[2]}"
        log.info("step compiled for %s (first call %.1f s): %s", shape, seconds,
                 describe_memory(memory, self.memory_limit) if memory else
                 "no memory figures from this backend")

    def _log(self, step: int, metrics, host: dict, arrays: dict) -> None:
        """The log window's means and the run's counters: console, TensorBoard, metrics.jsonl."""
        m = self.window.record(metrics)
        m["lr"] = float(self.schedule(step - 1))
        m["skipped_samples"] = float(host.get("num_skipped", 0))
        m["truncated_captions"] = float(self.truncations.count)
        m["prompt_tokens"] = float(arrays["input_ids"].shape[1])  # its prompt-length bucket
        self.losses.append(m["loss"])
        self.skipped_steps = report_skips(self.progress, m, step, self.skipped_steps)
        if self.writer:
            self.writer.scalars(step, m)

    def _evaluate(self, step: int, state: TrainState) -> None:
        """The held-out loss when it is due (every process computes it; process 0 writes it)."""
        if self.evaluator is None or not eval_loss.due(self.config, step, self.config.max_steps):
            return
        metrics = self.evaluator(state, self.frozen)
        if self.writer:
            self.writer.scalars(step, metrics, prefix="")
            log.info("step %d: held-out loss %.5f%s", step, metrics["eval/loss"],
                     f" (EMA {metrics['eval/ema_loss']:.5f})" if "eval/ema_loss" in metrics
                     else "")

    def _save(self, step: int, state: TrainState, force: bool) -> None:
        saved = self.checkpointer.save(step, state, self.it.get_state(), self.config.to_dict(),
                                       force=force)
        if saved and self.writer:  # what was logged up to this checkpoint made durable
            self.writer.sync()

    def _sample(self, state: TrainState, step: int) -> None:
        """A sheet of `config.sample_prompts`, from the EMA weights when the stage keeps them."""
        log.info("sample sheet at step %d from the %s weights", step,
                 "EMA" if state.ema is not None else "raw")
        weights = state.params if state.ema is None else state.ema
        _save_sample_sheet(self.model, merge_params(weights, self.frozen), self.processor,
                     self.config, self.stage_dir, step)

    def _close(self) -> None:
        self.progress.close()
        self.checkpointer.wait()
        self.checkpointer.close()
        if self.writer:
            self.writer.close()


def _save_sample_sheet(model, params, processor, config, stage_dir: str, step: int):
    from uniimage_jax.sampling.image_tiles import save_tiled
    from uniimage_jax.sampling.sampler import SamplingConfig, generate

    cfg = SamplingConfig(num_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                         max_prompt_tokens=config.model.max_prompt_tokens)
    images = []
    for i, prompt in enumerate(config.sample_prompts):
        images += generate(model, params, processor, prompt, num_images=1, seed=i, cfg=cfg)
    save_tiled(images, os.path.join(stage_dir, "samples", f"step_{step:07d}.png"),
              cols=len(images))
