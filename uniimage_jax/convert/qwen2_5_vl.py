"""Qwen2.5-VL: a Hugging Face `Qwen2_5_VLForConditionalGeneration` directory -> Orbax checkpoint.

The source directory holds `config.json` and `model.safetensors` (or shards with an index). Two key
layouts exist across transformers versions and both are accepted:

* transformers >= 4.52 / 5: `model.language_model.*`, `model.visual.*`, `lm_head.weight`;
* older checkpoints (e.g. the published Qwen2.5-VL-3B-Instruct files): `model.layers.*`,
  `model.embed_tokens.*`, `model.norm.*`, `visual.*`, `lm_head.weight`.

The Flax port (`uniimage_jax.models.qwen2_5_vl`) mirrors the new layout, so the legacy keys are
rewritten onto it and the package naming convention does the rest (`merger.mlp.0` ->
`merger/mlp_0`, weight -> kernel / scale / embedding, Conv3d patch embedding -> (t, h, w, C, O)).
With tied embeddings the Flax tree has no `lm_head`; a stored copy of the tied matrix is ignored.

    uniimage-convert mllm --src DIR --dst OUT [--overwrite] [--scan-layers]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from uniimage_jax.convert import key_plan
from uniimage_jax.convert import sources
from uniimage_jax.models import qwen2_5_vl as qwen

KEYMAP = key_plan.KeyMap(
    rewrites=(
        (r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
        (r"^visual\.", r"model.visual."),
    ),
    # rotary inverse frequencies are non-persistent buffers, recomputed from the config
    ignore=(r".*rotary_(pos_)?emb\.(original_)?inv_freq",),
)

# The transformers ModuleLists of the language model (`layers_3` is `layers.3`): for naming
# exported LoRA adapters.
LIST_MODULES = ("layers",)

# A tied checkpoint may still store lm_head.weight (a copy of embed_tokens); it has no Flax leaf.
TIED_KEYMAP = dataclasses.replace(KEYMAP, ignore=(*KEYMAP.ignore, r"lm_head\.weight"))


def read_config(src_dir: str, **overrides) -> qwen.Qwen2_5_VLConfig:
    path = os.path.join(src_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{src_dir} is not a Hugging Face Qwen2.5-VL directory: "
                                "config.json is missing")
    with open(path) as fh:
        return qwen.Qwen2_5_VLConfig.from_hf(json.load(fh), **overrides)


def convert_qwen(src_dir: str, progress: bool = False, scan_layers: bool = False
                 ) -> tuple[qwen.Qwen2_5_VLConfig, dict[str, Any]]:
    """(config, params) from an HF directory; params is the "params" collection as a nested dict of
    fp32 numpy arrays (scan layout if `scan_layers`). Raises ConversionError naming every bad
    key."""
    return convert_qwen_source(sources.SafetensorsSource(src_dir), read_config(src_dir),
                               progress=progress, scan_layers=scan_layers)


def convert_qwen_source(source, config: qwen.Qwen2_5_VLConfig, progress: bool = False,
                        scan_layers: bool = False
                        ) -> tuple[qwen.Qwen2_5_VLConfig, dict[str, Any]]:
    """As `convert_qwen`, from any source (`sources.SafetensorsSource`, or a `sources.SourceView` of
    a larger checkpoint that embeds Qwen2.5-VL) and an explicit config. The result is in the scan
    layout if `scan_layers` or `config.scan_layers`."""
    keymap = TIED_KEYMAP if config.tie_word_embeddings else KEYMAP
    per_layer = dataclasses.replace(config, scan_layers=False)  # checkpoints store layers apart
    params = key_plan.convert(source, keymap, qwen.abstract_params(per_layer), progress=progress)
    if scan_layers or config.scan_layers:
        config = dataclasses.replace(config, scan_layers=True)
        params = qwen.scan_params(params, config)
    return config, params


