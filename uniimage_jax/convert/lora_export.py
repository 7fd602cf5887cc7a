"""The LoRA adapters of a training stage, for diffusers (the DiT's) and PEFT (the MLLM's).

    uniimage-convert export-lora --src STAGE_DIR [--weights auto|ema|raw] --dst OUT

Writes, for the adapters the stage has:
* `OUT/pytorch_lora_weights.safetensors`: the DiT's, in the layout diffusers' LoRA loaders read
  (`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`, PyTorch (out, in) layouts), with
  rank, alpha and target modules in the `lora_adapter_metadata` entry of the safetensors header,
  as `save_lora_weights` writes it. Load with `SanaTransformer2DModel.load_lora_adapter(OUT,
  weight_name="pytorch_lora_weights.safetensors", prefix="transformer")` or
  `SanaPipeline.load_lora_weights(OUT, weight_name="pytorch_lora_weights.safetensors")`.
* `OUT/mllm/{adapter_model.safetensors, adapter_config.json}`: the language model's, in PEFT's
  layout (`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`). Load
  with `peft.PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration..., OUT/mllm)`.

PyTorch module names come from the converters' own key maps (`key_plan.torch_module_name`), so
they are the names those converters read. Adapters stacked under `scan_layers` are written per
layer.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from uniimage_jax.checkpoints import converted
from uniimage_jax.convert import key_plan
from uniimage_jax.models import param_tree

DIT_FILE = "pytorch_lora_weights.safetensors"
DIT_PREFIX = "transformer"
MLLM_DIR = "mllm"
PEFT_PREFIX = "base_model.model"


def _per_layer(adapters) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{Flax module path (per-layer names): (A (in, r), B (r, out))}."""
    from uniimage_jax.models import lora

    flat = param_tree.flatten(adapters)
    out = {}
    for module in sorted({p[:-1] for p in flat}):
        a, b = np.asarray(flat[(*module, lora.LORA_A)]), np.asarray(flat[(*module, lora.LORA_B)])
        stacked = [i for i, p in enumerate(module) if p in lora.STACKED_SUBTREES]
        if not stacked:
            out[module] = (a, b)
            continue
        j = stacked[0]
        for layer in range(a.shape[0]):
            out[(*module[:j], f"{module[j]}_{layer}", *module[j + 1:])] = (a[layer], b[layer])
    return out


def _torch_adapters(adapters, model_config, abstract_params, keymap, list_modules, prefix,
                    lora_config):
    """The adapters under PyTorch module names, for both exports: ({'<prefix>.<module>.lora_A.
    weight': (r, in), ...lora_B...: (out, r)}, the LoRA fields of a PEFT config naming those
    modules). `abstract_params(config)` gives the model's parameter shapes, which the key map
    needs; adapters stacked under `scan_layers` are named per layer."""
    target = param_tree.target_shapes(abstract_params(dataclasses.replace(model_config,
                                                                          scan_layers=False)))
    tensors, names = {}, []
    for module, (a, b) in _per_layer(adapters).items():
        name = key_plan.torch_module_name(module, keymap, target, list_modules)
        tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
        tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
        names.append(name)
    fields = {"r": lora_config.rank, "lora_alpha": lora_config.alpha,
              "lora_dropout": lora_config.dropout, "target_modules": names, "bias": "none"}
    return tensors, fields


def dit_lora_state_dict(dit_adapters, dit_config, lora_config):
    """(tensors, safetensors metadata) of the DiT's adapters in diffusers' layout."""
    from uniimage_jax.convert import sana as sana_convert
    from uniimage_jax.models.sana import abstract_params

    tensors, peft_config = _torch_adapters(dit_adapters, dit_config, abstract_params,
                                           sana_convert.KEYMAP, sana_convert.LIST_MODULES,
                                           DIT_PREFIX, lora_config)
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"{DIT_PREFIX}.{k}": v for k, v in peft_config.items()}, indent=2, sort_keys=True)}
    return tensors, metadata


def mllm_peft_adapter(mllm_adapters, mllm_config, lora_config):
    """(tensors, adapter_config.json content) of the MLLM's adapters in PEFT's layout."""
    from uniimage_jax.convert import qwen2_5_vl as qwen_convert
    from uniimage_jax.models.qwen2_5_vl import abstract_params

    tensors, fields = _torch_adapters(mllm_adapters, mllm_config, abstract_params,
                                      qwen_convert.KEYMAP, qwen_convert.LIST_MODULES,
                                      PEFT_PREFIX, lora_config)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
              **fields, "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}
    return tensors, config


def export_lora(config, params, dst: str, overwrite: bool = False) -> list[str]:
    """Write the adapters of `params` (a UniImage tree with adapters) under `dst`; returns the
    files written."""
    from safetensors.numpy import save_file

    from uniimage_jax.models import lora

    _, adapters = lora.split_adapters(params)
    written = []
    with converted.atomic_directory(dst, overwrite) as tmp:
        if adapters.get("dit"):
            tensors, metadata = dit_lora_state_dict(adapters["dit"], config.dit, config.lora)
            save_file(tensors, os.path.join(tmp, DIT_FILE), metadata=metadata)
            written.append(DIT_FILE)
        if adapters.get("mllm"):
            tensors, peft_config = mllm_peft_adapter(adapters["mllm"], config.mllm, config.lora)
            os.makedirs(os.path.join(tmp, MLLM_DIR))
            save_file(tensors, os.path.join(tmp, MLLM_DIR, "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(tmp, MLLM_DIR, "adapter_config.json"), "w") as fh:
                json.dump(peft_config, fh, indent=2)
            written += [f"{MLLM_DIR}/adapter_model.safetensors", f"{MLLM_DIR}/adapter_config.json"]
    return written


