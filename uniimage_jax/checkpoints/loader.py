"""One loader for every place weights come from.

* `load_uniimage(dir, weights)`: a converted TBAC-UniImage directory (`uniimage-convert tbac`) or
  a training stage directory (`<workdir>/<stage>`, its latest step: the trainable tree from the
  checkpoint, the frozen towers from the weights the stage was trained from) -> (config, params).
  `weights` picks a stage's raw trainable parameters or their EMA (`resolve_weights`: 'auto' is
  the EMA when the stage kept one).
* `load_for_inference(dir, processor_dir)` -> (model, params, processor) for sampling and
  understanding.
* `load_pretrained_parts(...)`: the trainer's "converted pretrained weights" step: a converted
  TBAC-UniImage, or converted components (`uniimage-convert mllm/dit/vae`) on top of a random
  init of the rest (tiny preset) - every part checked against the architecture.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax import storage
from uniimage_jax.checkpoints import converted
from uniimage_jax.errors import ConversionError
from uniimage_jax.models import param_tree
from uniimage_jax.errors import UserError
from uniimage_jax.paths import absolute


def _is_converted(path: str) -> bool:
    return storage.exists(storage.join(path, converted.CONFIG_FILE))


def _check_shapes(name: str, params, abstract) -> None:
    got = param_tree.target_shapes(params)
    want = param_tree.target_shapes(abstract)
    if got != want:
        missing = sorted("/".join(p) for p in set(want) - set(got))
        unexpected = sorted("/".join(p) for p in set(got) - set(want))
        mismatched = sorted(f"{'/'.join(p)} {list(got[p])} != {list(want[p])}"
                            for p in set(got) & set(want) if got[p] != want[p])
        raise ConversionError(name, missing, unexpected, mismatched)


def _place(params, abstract):
    """device_put every leaf with the sharding of its abstract twin (if it has one)."""
    def put(x, a):
        s = getattr(a, "sharding", None)
        return jax.device_put(np.asarray(x, dtype=a.dtype), s) if s is not None \
            else jnp.asarray(x, dtype=a.dtype)
    return jax.tree.map(put, params, abstract)


def load_pretrained_parts(model, abstract, *, tbac="", mllm="", dit="", vae="",
                          random_rest=False, seed=0, select=None):
    """Parameters of `model` from converted directories, placed like `abstract` (unboxed
    ShapeDtypeStructs with shardings). A part (mllm, dit, vae) may also come from a training
    stage directory: that part of its latest parameters (e.g. the MLLM a 'caption' stage
    trained; its EMA when the stage kept one; LoRA adapters folded in). Parts not given come
    from a random init only when `random_rest`; otherwise their absence is an error naming
    them. When `abstract` holds LoRA adapters, they start fresh (B = 0) on top. `select` (a
    function of a whole parameter tree returning the part to keep) is applied after the checks
    and before anything is placed on a device: what it leaves out is never loaded there."""
    from uniimage_jax.models import lora

    select = select or (lambda tree: tree)
    abstract, abstract_adapters = lora.split_adapters(abstract)
    if abstract_adapters:  # converted weights have none: fresh adapters (B = 0) on top
        # The adapters follow the whole tree's layers, so `select` cuts the joined tree.
        params = load_pretrained_parts(model, abstract, tbac=tbac, mllm=mllm, dit=dit, vae=vae,
                                       random_rest=random_rest, seed=seed)
        adapters = model.init_adapters(abstract, jax.random.PRNGKey(seed))
        return select(lora.join(params, _place(adapters, abstract_adapters)))
    if tbac:
        config, params = converted.load_tbac(tbac)
        if _architecture(config) != _architecture(model.config):
            raise UserError(f"{tbac} holds a different architecture than the configured model; "
                            "use the matching preset (see uniimage_config.json there)")
        params = dict(params)
        for name in ("mllm", "dit"):
            params[name] = _to_layout(name, params[name], getattr(config, name),
                                      getattr(model.config, name))
        _check_shapes(tbac, params, abstract)
        return _place(select(params), select(abstract))
    parts = {"mllm": mllm, "dit": dit, "vae": vae}
    absent = [k for k, v in parts.items() if not v]
    if absent and not random_rest:
        raise UserError(f"no weights for {absent}: set config.pretrained."
                        f"{'/'.join(absent)} (converted or training stage directories) or "
                        "pretrained.tbac")
    params, _ = lora.split_adapters(jax.device_get(model.init(jax.random.PRNGKey(seed))))
    for name, path in parts.items():
        if path:
            params[name] = _read_part(model, name, path, abstract[name])
    return _place(select(params), select(abstract))


def load_pretrained_part(model, name: str, path: str, abstract):
    """One part of `model` ('mllm', 'dit' or 'vae') from a converted component directory or a
    training stage directory, as `load_pretrained_parts` reads it, placed like `abstract`
    (that part's abstract tree): e.g. the autoencoder alone, for encoding a latent cache."""
    return _place(_read_part(model, name, path, abstract), abstract)


def _read_part(model, name: str, path: str, abstract):
    from uniimage_jax.models import lora

    if _is_converted(path):
        cfg, part = _component_loaders()[name](path)
    else:  # a training stage directory (its latest step)
        stage_config, stage_params, _ = load_uniimage(path)
        if stage_config.lora is not None:  # the part as trained: adapters folded in
            stage_params = lora.merge(stage_params, stage_config.lora)
        cfg, part = getattr(stage_config, name), jax.device_get(stage_params[name])
    part = _to_layout(name, part, cfg, getattr(model.config, name))
    _check_shapes(path, part, abstract)
    return part


def _architecture(config) -> dict:
    """The model config without the options that only choose how layers run (stacked for
    `nn.scan` or not, rematerialised or not): a checkpoint loads into any of them."""
    plain = {"scan_layers": False, "remat": "none"}
    return dataclasses.replace(config, lora=None, mllm=dataclasses.replace(config.mllm, **plain),
                               dit=dataclasses.replace(config.dit, **plain)).to_dict()


def _to_layout(name: str, part, source, target):
    """The MLLM or DiT parameters `part`, stored in the layer layout of config `source` (layers
    apart, as converters write them, or stacked), in the layout of config `target`."""
    if name not in ("mllm", "dit") or source.scan_layers == target.scan_layers:
        return part
    if name == "mllm":
        from uniimage_jax.models import qwen2_5_vl as module
    else:
        from uniimage_jax.models import sana as module
    return module.scan_params(part, target) if target.scan_layers \
        else module.unscan_params(part, source)


def layers_apart(config, params):
    """(config, params) with the MLLM's and the DiT's layers stored apart (`scan_layers` off), the
    layout converters write and the official key names follow; a training stage of a scanned
    model keeps them stacked, so exports go through this first."""
    plain = dataclasses.replace(config,
                                mllm=dataclasses.replace(config.mllm, scan_layers=False),
                                dit=dataclasses.replace(config.dit, scan_layers=False))
    out = dict(params)
    for name in ("mllm", "dit"):
        if name in out:
            out[name] = _to_layout(name, out[name], getattr(config, name), getattr(plain, name))
    return plain, out


def _component_loaders():
    return {"mllm": converted.load_qwen, "dit": converted.load_sana, "vae": converted.load_dc_ae}


def _latest_stage_config(stage_dir: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    steps = (ocp.utils.checkpoint_steps(storage.path(stage_dir)) if storage.is_dir(stage_dir)
             else [])
    if not steps:
        raise FileNotFoundError(f"{stage_dir} is neither a converted checkpoint "
                                f"({converted.CONFIG_FILE}) nor a training stage directory with "
                                "saved steps")
    config_dir = storage.join(stage_dir, str(max(steps)), "config")
    path = storage.join(config_dir, "metadata")
    if not storage.exists(path):
        cands = [storage.join(config_dir, f) for f in storage.listdir(config_dir)]
        path = next((c for c in cands if storage.is_file(c)), path)
    return json.loads(storage.read_text(path))


def training_config(path: str):
    """The training config (a ConfigDict) of a training stage directory's latest step, or None
    for a converted checkpoint (it has no training settings). JSON only: no weights are read."""
    import ml_collections

    path = absolute(path)
    if _is_converted(path):
        return None
    return ml_collections.ConfigDict(_latest_stage_config(path))


def model_config(path: str):
    """The UniImageConfig of a converted TBAC-UniImage or a training stage directory, read from
    its JSON only (no weights): for checks that must come before anything loads."""
    from uniimage_jax.models import lora, presets
    from uniimage_jax.models.uniimage import UniImageConfig

    run = training_config(path)
    if run is None:
        meta = json.loads(storage.read_text(storage.join(absolute(path),
                                                         converted.CONFIG_FILE)))
        if meta.get("kind") != "tbac":
            raise UserError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a whole "
                            "TBAC-UniImage ('tbac')")
        return UniImageConfig.from_dict(meta["tbac"])
    return presets.build_model_config(run.model, lora.from_training_config(run.get("lora")))


WEIGHTS = ("auto", "ema", "raw")


def resolve_weights(path: str, weights: str = "auto") -> str:
    """'ema' or 'raw': which trainable weights `load_uniimage(path, weights)` reads. 'auto' is
    the EMA when `path` is a training stage that kept one (config.ema.enabled), else raw; asking
    for 'ema' where there is none is an error naming the checkpoint."""
    if weights not in WEIGHTS:
        raise UserError(f"weights={weights!r}: expected one of {WEIGHTS}")
    path = absolute(path)
    has_ema = False
    if not _is_converted(path):
        _latest_stage_config(path)  # a folder of neither kind is named as such, not as a stage
        from uniimage_jax.checkpoints.stage import EMA_KEY, stored_state_entries

        has_ema = EMA_KEY in stored_state_entries(path)
    if weights == "auto":
        return "ema" if has_ema else "raw"
    if weights == "ema" and not has_ema:
        raise UserError(f"{path} holds no EMA weights (a converted checkpoint, or a stage "
                        "trained with config.ema.enabled=False): ask for the raw weights")
    return weights


def load_uniimage(path: str, weights: str = "auto"):
    """(UniImageConfig, params, the converted TBAC directory it derives from or None).
    `weights`: see `resolve_weights` (only a training stage has EMA weights)."""
    path = absolute(path)  # Orbax restores from absolute paths only
    weights = resolve_weights(path, weights)
    if _is_converted(path):
        config, params = converted.load_tbac(path)
        return config, params, path
    import ml_collections

    from uniimage_jax.models import presets
    from uniimage_jax.models.uniimage import UniImage
    from uniimage_jax.checkpoints.stage import restore_params_only
    from uniimage_jax.checkpoints.partition import merge_params, partition_params

    from uniimage_jax.models import lora

    run = ml_collections.ConfigDict(_latest_stage_config(path))
    adapters = lora.from_training_config(run.get("lora"))
    model = UniImage(presets.build_model_config(run.model, adapters))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            jax.eval_shape(model.init, jax.random.PRNGKey(0)))
    p = run.pretrained
    params = load_pretrained_parts(model, abstract, tbac=p.tbac, mllm=p.mllm, dit=p.dit,
                                   vae=p.vae, random_rest=run.model.preset == "tiny",
                                   seed=run.seed)
    trainable, frozen = partition_params(params, lora.trainable_patterns(run.trainable, adapters))
    trainable = restore_params_only(path, trainable, params_key="ema" if weights == "ema"
                                    else "params")
    return model.config, merge_params(trainable, frozen), p.tbac or None


def load_for_inference(checkpoint: str, processor_dir: str | None = None, dtype=jnp.float32,
                       weights: str = "auto"):
    """(UniImage, params, processor with the metaquery tokens) ready for sampling; `weights` as
    in `load_uniimage`."""
    from uniimage_jax.models.uniimage import UniImage
    from uniimage_jax.processing import qwen as qwen_processing
    from uniimage_jax.processing.prompts import add_metaquery_tokens

    checkpoint, processor_dir = absolute(checkpoint), absolute(processor_dir)
    config, params, _ = load_uniimage(checkpoint, weights)
    model = UniImage(config, dtype=dtype)
    if processor_dir is None:
        processor_dir = _default_processor_dir(checkpoint)
    processor = qwen_processing.load_processor(processor_dir)
    add_metaquery_tokens(processor.tokenizer, config.mllm.vocab_size, config.num_metaqueries)
    return model, params, processor


def _default_processor_dir(checkpoint: str) -> str:
    """The tiny processor a tiny training run wrote next to its stages, if any."""
    checkpoint = absolute(checkpoint).rstrip("/")
    cand = storage.join(checkpoint.rsplit("/", 1)[0], "tiny_processor")
    if storage.is_dir(cand):
        return cand
    raise UserError(f"no processor directory given for {checkpoint}: pass --processor with the "
                    "local Qwen2.5-VL directory holding the tokenizer and preprocessor files")
