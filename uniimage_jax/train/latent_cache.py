"""Encode a stage's training targets once with its frozen autoencoder (`uniimage-cache-latents`).

The official target crop is deterministic and the autoencoder frozen, so the encoder's work at
every step (~17% of a `tbac_3b` t2i sample's FLOPs) gives the same latents each time. This
writes them to a latent cache (data/latent_records.py); `data.source = "latents"` with
`data.path = <cache>` then trains from it and the step never runs the encoder.

- The stage's source is read in order, without shuffling and without CFG dropout (captions and
  ti2i source images are stored as they are; dropout draws at training time, as from images).
  Each record is decoded, resized and cropped by the training pipeline's own transform
  (`pipeline.example_reader`); unreadable images are skipped, counted and named in the log as in
  training.
- The autoencoder is the trainer's (`pretrained.vae`, else `pretrained.tbac`, else the tiny
  preset's random init from `config.seed`), stored in `config.frozen_dtype` and run in
  `config.compute_dtype`; batches are split over this process's devices under one jit.
- Resumable: each shard is written under a temporary name and renamed, then marked complete; a
  rerun of the same command skips the complete shards. `out_dir` may be on Cloud Storage:
  shards are then written locally and uploaded one by one (data/latent_records.py). A
  directory holding a cache of other data (task, image size, source, autoencoder) is refused.
- Several processes (`jax.distributed`): process p encodes shards p, p + P, ... into the same
  directory; process 0 writes the metadata once all are done. The shards do not depend on P.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax import storage
from uniimage_jax.data import latent_records as records
from uniimage_jax.data.manifest import data_task
from uniimage_jax.errors import ConfigError
from uniimage_jax.paths import absolute
from uniimage_jax.train import distributed, sharding
from uniimage_jax.train.config_paths import check_paths_exist, make_paths_absolute
from uniimage_jax.train.run_log import progress_bar

log = logging.getLogger("uniimage_jax.train")

DEFAULT_SHARD_SIZE = 1024  # examples per shard: ~32 MiB of tbac_3b latents (16 x 16 x 32 fp32)
# Fields of the metadata that must match for a rerun to continue a cache.
_IDENTITY = ("task", "image_size", "source_image_size", "latent_shape", "scaling_factor",
             "model", "source", "shard_size", "num_shards")


@dataclasses.dataclass
class CacheResult:
    out_dir: str
    num_examples: int         # examples in the complete shards
    num_skipped: int          # unreadable examples skipped in them
    shards_written: int       # by this process, in this run
    complete: bool
    num_shards: int
    shards_done: int

    def summary(self) -> str:
        state = ("complete" if self.complete else
                 f"incomplete: {self.shards_done} of {self.num_shards} shards; rerun the same "
                 "command to continue")
        return (f"{self.out_dir}: {self.num_examples} examples encoded, {self.num_skipped} "
                f"unreadable skipped, {self.shards_written} shards written now ({state})")


def cache_latents(config, out_dir: str, *, batch_size: int | None = None,
                  shard_size: int = DEFAULT_SHARD_SIZE,
                  max_shards: int | None = None) -> CacheResult:
    """Encode the targets of `config`'s data into `out_dir` (module docstring).

    batch_size: images per encoder call on this process (default: the per-process training
      batch); a multiple of the local device count.
    shard_size: examples of the source per shard (fixed for the life of a cache).
    max_shards: stop after writing this many shards (None: all); a rerun continues.
    """
    from uniimage_jax.data.pipeline import check_training_data, example_reader
    from uniimage_jax.data.mixture import make_training_source
    from uniimage_jax.train.stage_setup import build_model

    make_paths_absolute(config)
    check_paths_exist(config)
    out_dir = _check_out_dir(out_dir)
    task = _check_config(config)
    check_training_data(config)
    distributed.maybe_initialize_distributed()
    model = build_model(config)
    _check_autoencoder_frozen(config, model)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"--shard_size must be a positive integer, got {shard_size!r}")
    image_size = int(model.config.image_size)
    source_image_size = int(config.data.source_image_size)
    # A WebDataset set's member index is cached beside the latents, built once for all processes.
    source = make_training_source(config.data, task, image_size, cache_dir=out_dir,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    num_shards = math.ceil(len(source) / shard_size)
    existing = records.read_metadata(out_dir)
    # What is known before any weight is read: a wrong --out fails in seconds.
    _check_same_cache(existing, {"task": task, "image_size": image_size, "source_image_size":
                                 source_image_size if task == "ti2i" else None,
                                 "shard_size": shard_size, "num_shards": num_shards}, out_dir)
    mesh = sharding.make_mesh({"data": -1}, devices=jax.local_devices())
    batch_size = _check_batch(batch_size, config, mesh)
    encoder = _Encoder(model, _autoencoder_params(config, model, mesh), mesh, batch_size)
    meta = _cache_identity(config, model, encoder, source, task, shard_size, num_shards)
    _check_same_cache(existing, meta, out_dir)

    primary = jax.process_index() == 0
    if primary:
        storage.makedirs(out_dir)
    distributed.sync("latent_cache_dir")
    done = records.completed_shards(out_dir, num_shards)
    if primary:
        _write_metadata(out_dir, meta, done)
    mine = [k for k in range(num_shards)
            if k % jax.process_count() == jax.process_index() and k not in done]
    if max_shards is not None:
        mine = mine[:max(0, int(max_shards))]
    if done:
        distributed.log_main("%s: %d of %d shards already complete, continuing", out_dir,
                             len(done), num_shards, logger=log)
    reader = example_reader(source, task, image_size, source_image_size)
    _write_shards(out_dir, mine, meta, reader, encoder, config.data, primary)
    distributed.sync("latent_cache_done")
    done = records.completed_shards(out_dir, num_shards)
    if primary:
        _write_metadata(out_dir, meta, done)
    return CacheResult(out_dir=out_dir, num_examples=sum(s["examples"] for s in done.values()),
                       num_skipped=sum(len(s["skipped"]) for s in done.values()),
                       shards_written=len(mine), complete=len(done) == num_shards,
                       num_shards=num_shards, shards_done=len(done))


def _cache_identity(config, model, encoder, source, task: str, shard_size: int,
                    num_shards: int) -> dict:
    """The metadata that says what the cache holds (a rerun must match it to continue)."""
    image_size = int(model.config.image_size)
    meta = {"format": records.FORMAT, "task": task, "image_size": image_size,
            "source_image_size": (int(config.data.source_image_size) if task == "ti2i"
                                  else None),
            "latent_shape": encoder.latent_shape(image_size), "latent_dtype": "float32",
            "scaling_factor": float(getattr(model.config.vae, "scaling_factor", 1.0)),
            "model": _model_identity(config, model),
            "source": {"kind": config.data.source, "description": repr(source),
                       "num_examples": len(source),
                       # a manifest's bytes (a rewritten manifest is other data)
                       "content_key": (source.content_key() if hasattr(source, "content_key")
                                       else None)},
            "shard_size": shard_size, "num_shards": num_shards}
    return json.loads(json.dumps(meta))  # as read back (tuples become lists)


def _write_shards(out_dir: str, shards: list[int], meta: dict, reader, encoder, data_cfg,
                  primary: bool) -> None:
    """Encode and write `shards` of the source, each marked complete once written."""
    from uniimage_jax.data.pipeline import SkipLog

    n, size = meta["source"]["num_examples"], meta["shard_size"]
    skip_log = SkipLog()
    ranges = {k: _shard_range(k, size, n) for k in shards}
    bar = progress_bar(0, sum(stop - start for start, stop in ranges.values()), primary,
                       desc="encode", unit="image")
    try:
        for k in shards:
            start, stop = ranges[k]
            count = records.write_shard(out_dir, k, _encode_shard(
                reader, range(start, stop), encoder, skip_log, data_cfg, bar))
            skipped = [[i, *skip_log.entries[i]] for i in range(start, stop)
                       if i in skip_log.entries]
            records.mark_complete(out_dir, k, {"file": records.shard_file(k), "start": start,
                                               "stop": stop, "examples": count,
                                               "skipped": skipped})
            if primary:  # the others' shards are gathered at the end (and by any rerun)
                _write_metadata(out_dir, meta, records.completed_shards(out_dir,
                                                                        meta["num_shards"]))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------- checks


def check_cache_fits_model(config, model) -> None:
    """At a stage's start, with data.source='latents': the cache was encoded by this model's
    autoencoder (its architecture) at a size whose latents this DiT takes; otherwise a one-line
    error now instead of a shape error inside the compiled step."""
    if config.data.source != "latents" or not config.data.path:
        return
    meta = records.read_metadata(config.data.path)
    if meta is None:
        return  # the data check names a missing cache
    vae = json.loads(json.dumps(dataclasses.asdict(model.config.vae)))
    if meta["model"].get("vae") != vae:
        raise ConfigError(f"data.path={config.data.path!r}: the latent cache was encoded by "
                          "another autoencoder than config.model.vae (cache it again with this "
                          "config)")
    size = int(model.config.image_size) // int(model.config.vae_downsample)
    want = [size, size, int(model.config.dit.in_channels)]
    if list(meta["latent_shape"]) != want:
        raise ConfigError(f"data.path={config.data.path!r} holds latents of shape "
                          f"{meta['latent_shape']}; this model's DiT takes {want}")


def _check_out_dir(out_dir: str) -> str:
    if not out_dir:
        raise ConfigError("--out is required: the directory to write the latent cache to")
    out_dir = absolute(out_dir)
    if storage.is_file(out_dir):
        raise ConfigError(f"--out {out_dir}: exists and is not a directory")
    return out_dir


def _check_config(config) -> str:
    if config.task not in ("t2i", "ti2i"):
        raise ConfigError(f"config.task={config.task!r}: latents are cached for the t2i and ti2i "
                          "stages (a caption stage reads the images themselves)")
    if config.data.source == "latents":
        raise ConfigError("config.data.source='latents': that is already a latent cache; name "
                          "the images' source (synthetic, jsonl or tfds)")
    if config.data.aspect_buckets:
        raise ConfigError(f"config.data.aspect_buckets={config.data.aspect_buckets!r}: a latent "
                          "cache holds square crops of data.image_size; aspect buckets with a "
                          "latent cache are not supported (set data.aspect_buckets='')")
    if any(isinstance(c, dict) and "weight" in c for c in config.data.mixture):
        raise ConfigError("config.data.mixture weights: a latent cache holds every example of "
                          "every component once; cache each component on its own and train "
                          "from a mixture of the caches with these weights")
    return data_task(config.task)


def _check_autoencoder_frozen(config, model) -> None:
    from uniimage_jax.checkpoints.partition import partition_params
    from uniimage_jax.train.stage_setup import trainable_patterns

    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    trainable, _ = partition_params(abstract, trainable_patterns(config, model))
    if "vae" in trainable:
        raise ConfigError(f"config.trainable={tuple(config.trainable)} trains the autoencoder: "
                          "its latents change as it trains and cannot be cached")


def _check_batch(batch_size, config, mesh) -> int:
    devices = mesh.devices.size
    if batch_size is None:
        per_process = max(1, int(config.batch_size) // jax.process_count())
        return math.ceil(per_process / devices) * devices
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 \
            or batch_size % devices:
        raise ConfigError(f"--batch={batch_size}: must be a positive multiple of this process's "
                          f"{devices} device(s)")
    return batch_size


def _model_identity(config, model) -> dict:
    """What decides the latents: the autoencoder's weights and the dtypes it runs in."""
    p = config.pretrained
    return {"preset": config.model.preset, "vae": dataclasses.asdict(model.config.vae),
            "pretrained_tbac": p.tbac, "pretrained_vae": p.vae,
            "init_seed": None if (p.tbac or p.vae) else int(config.seed),
            "compute_dtype": config.compute_dtype, "frozen_dtype": config.frozen_dtype}


def _check_same_cache(existing: dict | None, meta: dict, out_dir: str) -> None:
    if existing is None:
        return
    differ = [k for k in _IDENTITY if k in meta and existing.get(k) != meta[k]]
    if differ:
        k = differ[0]
        raise ConfigError(f"--out {out_dir} holds a latent cache of other data ({k}: "
                          f"{existing.get(k)!r} there, {meta[k]!r} here); use another --out "
                          "or remove it")


def _write_metadata(out_dir: str, meta: dict, done: dict[int, dict]) -> None:
    shards = [done[k] for k in sorted(done)]
    records.write_json(storage.join(out_dir, records.METADATA_FILE), {
        **meta, "shards": shards,
        "num_examples": sum(s["examples"] for s in shards),
        "num_skipped": sum(len(s["skipped"]) for s in shards),
        "complete": len(shards) == meta["num_shards"]})


# ------------------------------------------------------------------------------------- encoding


def _shard_range(k: int, shard_size: int, n: int) -> tuple[int, int]:
    return k * shard_size, min((k + 1) * shard_size, n)


def _autoencoder_params(config, model, mesh):
    """The frozen autoencoder as the trainer loads it, in `config.frozen_dtype`, replicated on
    this process's devices. A `pretrained.vae` directory is read alone; otherwise the whole
    model is loaded as the trainer does (`pretrained.tbac`, or the tiny preset's random init)."""
    from uniimage_jax.models.layers import compute_dtype
    from uniimage_jax.train.stage_setup import abstract_params, base_params

    rules = sharding.rules_from_config(config.logical_rules)
    p = config.pretrained
    if p.vae and not p.tbac:  # the trainer's precedence: a converted TBAC wins over parts
        from uniimage_jax.checkpoints.loader import load_pretrained_part

        vae = load_pretrained_part(model, "vae", p.vae,
                                   abstract_params(model, mesh, rules, config)["vae"])
    elif not (p.tbac or p.mllm or p.dit):
        if config.model.preset != "tiny":
            raise ConfigError(f"preset {config.model.preset!r} has no autoencoder weights: set "
                              "config.pretrained.vae (a converted DC-AE) or pretrained.tbac; "
                              "random init is for the tiny preset only")
        # The trainer's random init from config.seed, without the towers it does not need.
        vae = jax.jit(lambda key: nn.meta.unbox(model.init_autoencoder(key)))(
            jax.random.PRNGKey(config.seed))
    else:
        vae = base_params(config, model, mesh, rules).get("vae", {})
    dtype = compute_dtype(config.frozen_dtype, "config.frozen_dtype")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, vae),
        replicated)


class _Encoder:
    """Images (B, S, S, 3) in [-1, 1] -> float32 scaled latents, B split over the devices."""

    def __init__(self, model, vae_params, mesh, batch_size: int):
        self.params, self.batch_size = vae_params, batch_size
        self.sharding = sharding.batch_sharding(mesh)
        self._fn = jax.jit(lambda p, x: model.encode_images({"vae": p}, x).astype(jnp.float32),
                           out_shardings=self.sharding)

    def latent_shape(self, image_size: int) -> list[int]:
        x = jax.ShapeDtypeStruct((self.batch_size, image_size, image_size, 3), jnp.float32)
        return list(jax.eval_shape(self._fn, self.params, x).shape[1:])

    def __call__(self, images: list[np.ndarray]):
        """Dispatches the encode (asynchronous); a short last batch is padded with its last
        image, and the padding's latents are dropped by `rows`."""
        rows = len(images)
        x = np.stack(images + [images[-1]] * (self.batch_size - rows))
        return self._fn(self.params, jax.device_put(x, self.sharding)), rows


def _encode_shard(reader, indices: range, encoder: _Encoder, skip_log, data_cfg, bar):
    """The records of `indices`' readable examples, in order, as they are encoded. Decoding runs
    in grain's read threads while the device encodes the previous batch."""
    import grain

    ds = grain.MapDataset.range(indices.start, indices.stop).map(lambda i: reader(i, i))
    examples = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=max(1, int(data_cfg.read_threads)),
        prefetch_buffer_size=max(1, int(data_cfg.prefetch_buffer_size))))
    pending = None
    for batch in _chunks(_readable(examples, skip_log, bar), encoder.batch_size):
        call = encoder([e.pop("target") for e in batch])  # dispatched, not awaited
        if pending is not None:
            yield from _finish(*pending)
        pending = (call, batch)
    if pending is not None:
        yield from _finish(*pending)


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _readable(examples, skip_log, bar):
    for example in examples:
        bar.update(1)
        if isinstance(example, dict):
            yield example
        else:  # unreadable: logged and counted as in training
            skip_log.add(example)


def _finish(call, examples):
    latents, rows = call
    latents = np.asarray(jax.device_get(latents))[:rows]
    for lat, e in zip(latents, examples):
        yield records.encode_record(lat, e["caption"], e["name"], int(e["index"]),
                                    e.get("source_image"))
