"""The held-out loss during training: fixed examples, fixed noise, a fixed grid of noise levels,
so that the curve moves only when the weights do.

`config.eval` (off by default; `default_eval_config` comments every field):

    every_steps       0 = off; else after every multiple of it, after the stage's last step,
                      and before the first step of a fresh stage (step 0)
    data              where the held-out examples come from: the source fields of `config.data`
                      (source, path, tfds_*, synthetic_*, image sizes); the reading fields
                      (dropout, shuffle, buckets, threads) are not used
    start, num_examples   records [start, start + num_examples) of that source
    num_timesteps     noise levels per example: sigma_j nearest to (j + 0.5) / num_timesteps
    num_bands         equal bands of [0, 1] the levels are also averaged in (must divide it)
    seed              the fixed noise
    per_device_batch  examples per device per compiled call

What is measured. Each held-out example is read by the training pipeline's own reader (resized and
centre-cropped as training does, no CFG dropout: the caption and source image always given),
tokenised by the trainer's example encoder, and noised at every level of the grid with noise
drawn from (seed, example position, level) only; its loss at a level is the training loss of that
one sample (the flow-matching MSE, fp32). Logged per evaluation: `eval/loss` (the mean over
examples and levels) and `eval/loss_t{lo}-{hi}` per band of sigma (`t` is the noise level, 1 =
pure noise); with an EMA (`config.ema.enabled`) the same from the EMA weights as `eval/ema_loss*`.
They go to TensorBoard under those tags and to metrics.jsonl as records of their own (`step` and
the `eval/` keys; no `loss`, which marks the training records).

Where it runs. One `jax.jit` on the training mesh under the training rules: the weights where the
train state keeps them, the frozen towers as they are, each call's examples split over the batch
axes like a training batch. Only the per-example losses leave the devices (replicated, a few
floats); the means are taken on the host in float64, in the held-out set's order.

Reproducible bitwise. The examples, their prompt length (the prompt bucket of the longest prompt
of the whole set), the noise and the levels depend on the config alone. Each compiled call gives
every device `per_device_batch` consecutive examples of the set, so example i is always computed
at position i mod per_device_batch among the same neighbours, on one device or many, in one
process or several; a data- or fsdp-parallel mesh therefore gives the same losses bit for bit
(a tensor-parallel one splits each example's matrix products: equal to rounding only). A resumed
run evaluates the weights it restored, which are the uninterrupted run's, to the same bits.

A caption stage (`config.task='caption'`) is refused: its loss is next-token prediction, which
this measure is not about (the demo scores its captions instead).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.errors import ConfigError, UserError

log = logging.getLogger("uniimage_jax.train")

EVAL_INDEX = "eval_index"  # batch key: each row's position in the held-out set (its noise)


def default_eval_config(task: str):
    """The `config.eval` group (module docstring) for a stage of data task `task`."""
    import ml_collections

    from uniimage_jax.data.pipeline import default_data_config

    c = ml_collections.ConfigDict()
    c.every_steps = 0               # 0 = off; steps between held-out losses
    c.num_examples = 64             # held-out examples: records start .. start + num_examples - 1
    c.start = 0                     # ... of the source eval.data names
    # The held-out source: the fields of config.data (source, path, tfds_*, synthetic_*); set
    # eval.data.source and its path to your held-out manifest, TFDS split, latent cache...
    c.data = default_data_config(task)
    c.data.synthetic_seed = 1       # synthetic: other scenes than training's (seed 0)
    c.num_timesteps = 10            # noise levels per example, sigma ~ (j + 0.5) / num_timesteps
    c.num_bands = 5                 # eval/loss_t0.0-0.2 ... : equal sigma bands (divide the above)
    c.seed = 0                      # the fixed noise
    c.per_device_batch = 4          # examples per device per compiled call (same value: same bits)
    return c


def _int_field(group, name: str, minimum: int) -> int:
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"config.eval.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_config(config) -> None:
    """The eval fields, checked at start-up (one ConfigError naming the field)."""
    e = config.eval
    if not _int_field(e, "every_steps", 0):
        return
    if config.task not in ("t2i", "ti2i"):
        raise ConfigError(f"config.eval.every_steps={e.every_steps}: the held-out loss is the "
                          f"flow-matching loss of t2i / ti2i stages, and config.task="
                          f"{config.task!r} has none (set config.eval.every_steps=0)")
    for name, minimum in (("num_examples", 1), ("start", 0), ("num_timesteps", 1),
                          ("num_bands", 1), ("per_device_batch", 1), ("seed", 0)):
        _int_field(e, name, minimum)
    if e.seed >= 2**32:
        raise ConfigError(f"config.eval.seed must be < 2**32, got {e.seed}")
    if e.num_timesteps % e.num_bands:
        raise ConfigError(f"config.eval.num_bands={e.num_bands} must divide "
                          f"config.eval.num_timesteps={e.num_timesteps} (equal bands of levels)")
    if e.data.source == "synthetic" and config.data.source != "synthetic":
        raise ConfigError(f"config.eval.data.source='synthetic' (the default) but training reads "
                          f"config.data.source={config.data.source!r}: point config.eval.data "
                          "(source, path, ...) at your held-out examples")


def band_edges(num_bands: int) -> list[tuple[float, float]]:
    return [(b / num_bands, (b + 1) / num_bands) for b in range(num_bands)]


def band_names(prefix: str, num_bands: int) -> list[str]:
    """`{prefix}_t{lo}-{hi}` with the fewest decimals (at least one) that write the edges exactly
    (5 bands: t0.0-0.2, ..., t0.8-1.0)."""
    edges = [x for pair in band_edges(num_bands) for x in pair]
    decimals = next((d for d in (1, 2, 3) if all(abs(round(x, d) - x) < 1e-9 for x in edges)), 3)
    return [f"{prefix}_t{lo:.{decimals}f}-{hi:.{decimals}f}" for lo, hi in band_edges(num_bands)]


def summarise(losses: np.ndarray, prefix: str, num_bands: int) -> dict[str, float]:
    """{prefix: mean, band names: band means} of per-example losses (examples, levels), the
    levels in ascending sigma; float64 sums in a fixed order."""
    losses = np.asarray(losses, np.float64)
    per_band = losses.shape[1] // num_bands
    out = {prefix: float(losses.mean())}
    for b, name in enumerate(band_names(prefix, num_bands)):
        out[name] = float(losses[:, b * per_band:(b + 1) * per_band].mean())
    return out


# ---------------------------------------------------------------------------- the held-out set


@dataclasses.dataclass
class HeldOutSet:
    """This process's rows of every compiled call (numpy model inputs plus EVAL_INDEX), the
    static image grid of one row (ti2i), and the set's size."""

    calls: list[dict]
    image_grid: tuple | None
    num_examples: int
    description: str


def _read_example(source, reader, index: int, label: str) -> dict:
    from uniimage_jax.data.latent_records import LatentRecordSource

    if isinstance(source, LatentRecordSource):  # already decoded and cropped when cached
        record = source[index]
        example = {"latents": np.asarray(record["latents"], np.float32),
                   "caption": str(record["caption"]), "name": str(record["name"])}
        if "source_image" in record:
            example["source_image"] = record["source_image"]
        return example
    example = reader(index, index)
    if not isinstance(example, dict):  # the pipeline's marker of an unreadable example
        raise UserError(f"held-out example {index} of {label} is unreadable: {example.path} "
                        f"({example.reason}); the held-out set (config.eval.data) is read in full")
    return example


def load_held_out_set(config, model, processor, mesh) -> HeldOutSet | None:
    """This process's share of the held-out set, read and encoded once (None when off). The
    rows of call c are global rows [c * R, (c + 1) * R), R = per_device_batch x the mesh's batch
    shards, dealt to the processes in blocks as training batches are; the last call is filled
    with copies of the last example, whose losses are dropped."""
    from uniimage_jax.data.batch_keys import MODEL_INPUTS, target_key
    from uniimage_jax.data.pipeline import example_reader
    from uniimage_jax.data.mixture import make_training_source
    from uniimage_jax.processing.prompts import TruncationLog
    from uniimage_jax.train import sharding
    from uniimage_jax.train.batches import ExampleEncoder, assemble_batch

    e = config.eval
    if not e.every_steps:
        return None
    task = config.task
    source = make_training_source(e.data, task, int(e.data.image_size))
    n, start = int(e.num_examples), int(e.start)
    if start + n > len(source):
        raise ConfigError(f"config.eval.start={start} + config.eval.num_examples={n} is past the "
                          f"{len(source)} records of the held-out source {source!r}")
    rows = int(e.per_device_batch) * sharding.num_batch_shards(mesh)
    n_proc = jax.process_count()
    if rows % n_proc:
        raise ConfigError(f"config.eval.per_device_batch={e.per_device_batch}: {rows} rows per "
                          f"call do not divide over {n_proc} processes")
    local, num_calls = rows // n_proc, -(-n // rows)
    first = jax.process_index() * local
    mine = np.array([min(c * rows + first + k, n - 1) for c in range(num_calls)
                     for k in range(local)], np.int32)
    reader = example_reader(source, task, int(e.data.image_size), int(e.data.source_image_size))
    encoder = ExampleEncoder.for_stage(processor, model.config, config, task)
    encoded = {i: encoder(_read_example(source, reader, start + int(i), repr(source)))
               for i in sorted(set(mine.tolist()))}
    examples = [encoded[int(i)] for i in mine]
    key = target_key(examples[0])
    host = {key: np.stack([x[key] for x in examples]),
            "caption": np.array([x["caption"] for x in examples], dtype=np.str_),
            "name": np.array([x.get("name", "") for x in examples], dtype=np.str_),
            MODEL_INPUTS: {k: np.stack([x[MODEL_INPUTS][k] for x in examples])
                           for k in examples[0][MODEL_INPUTS]}}
    # One prompt length for the whole set (the bucket of its longest prompt, over processes).
    arrays, grid = assemble_batch(host, config, TruncationLog())
    arrays[EVAL_INDEX] = mine
    calls = [{k: (v[:, c * local:(c + 1) * local] if k == "position_ids"
                  else v[c * local:(c + 1) * local]) for k, v in arrays.items()}
             for c in range(num_calls)]
    description = (f"{n} examples of {source!r} x {e.num_timesteps} noise levels, "
                   f"{num_calls} call(s) of {rows} rows, every {e.every_steps} steps")
    return HeldOutSet(calls, tuple(grid[:1]) if grid is not None else None, n, description)


# ---------------------------------------------------------------------------------- computing


def make_eval_losses(model, config, mesh=None):
    """The pure function (trainable, frozen, batch, grid) -> per-example losses (B, levels),
    traced on `mesh` under the config's logical-axis rules, as the train step is."""
    import flax.linen as nn

    from uniimage_jax.checkpoints.partition import merge_params
    from uniimage_jax.diffusion import flow_matching
    from uniimage_jax.train import sharding

    split_prompt = config.split_prompt
    rules = sharding.rules_from_config(getattr(config, "logical_rules", ()))
    timesteps, sigmas = flow_matching.evaluation_timesteps(int(config.eval.num_timesteps))
    levels = (jnp.arange(len(timesteps)), jnp.asarray(timesteps), jnp.asarray(sigmas))
    seed = int(config.eval.seed)

    def eval_losses(trainable, frozen, batch, grid=None):
        if mesh is None:
            return _losses(trainable, frozen, batch, grid)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return _losses(trainable, frozen, batch, grid)

    def _losses(trainable, frozen, batch, grid):
        params = merge_params(trainable, frozen)
        batch = dict(batch)
        if grid is not None:
            batch["image_grid_thw"] = grid
        latents = batch.get("latents")
        if latents is None:
            latents = model.encode_images(params, batch["target"])
        latents = latents.astype(jnp.float32)
        rows = latents.shape[0]
        ctx, mask = model.condition(params, batch, split_prompt=split_prompt)
        context = model.precompute_context(params, ctx, mask)  # shared by every level
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch[EVAL_INDEX])

        def level(carry, inputs):
            j, t, s = inputs
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j),
                                                         latents.shape[1:], jnp.float32))(keys)
            noisy, target = flow_matching.noisy_latents_and_target(latents, noise,
                                                                   jnp.full((rows,), s))
            prediction = model.velocity(params, noisy, jnp.full((rows,), t), context)
            return carry, flow_matching.per_sample_loss(prediction, target)

        _, per_level = jax.lax.scan(level, None, levels)
        return per_level.T

    return eval_losses


class HeldOutLoss:
    """Evaluates a train state on the held-out set (every process calls it: collectives)."""

    def __init__(self, held_out: HeldOutSet, config, model, mesh, params_shardings):
        self.held_out, self.mesh = held_out, mesh
        self.num_bands = int(config.eval.num_bands)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.fn = jax.jit(make_eval_losses(model, config, mesh),
                          in_shardings=(params_shardings, None, None),
                          out_shardings=replicated, static_argnums=(3,))
        log.info("held-out loss: %s", held_out.description)

    def losses(self, params, frozen) -> np.ndarray:
        """(examples, levels) float32 losses of the weights `params` (the trainable tree)."""
        from uniimage_jax.models.uniimage import INPUT_BATCH_AXES
        from uniimage_jax.train import sharding

        out = [self.fn(params, frozen, sharding.shard_host_batch(
            arrays, self.mesh, batch_axes=INPUT_BATCH_AXES), self.held_out.image_grid)
            for arrays in self.held_out.calls]
        # Replicated: every process holds the whole (rows, levels) array of each call.
        host = np.concatenate([np.asarray(o.addressable_data(0)) for o in out])
        return host[:self.held_out.num_examples]

    def __call__(self, state, frozen) -> dict[str, float]:
        metrics = summarise(self.losses(state.params, frozen), "eval/loss", self.num_bands)
        if state.ema is not None:
            metrics.update(summarise(self.losses(state.ema, frozen), "eval/ema_loss",
                                     self.num_bands))
        return metrics


def make_evaluator(config, model, mesh, held_out: HeldOutSet | None, state_shardings
                   ) -> HeldOutLoss | None:
    return None if held_out is None else HeldOutLoss(held_out, config, model, mesh,
                                                     state_shardings.params)


def due(config, step: int, last_step: int) -> bool:
    """Whether the held-out loss is computed after `step` (0: before a fresh stage's first)."""
    every = int(config.eval.every_steps)
    return bool(every) and (step % every == 0 or step == last_step)
