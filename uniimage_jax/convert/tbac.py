"""The published TBAC-UniImage checkpoint (one state dict, safetensors) -> Orbax.

    uniimage-convert tbac --src TBAC_DIR [--mllm QWEN_DIR] [--dit SANA_DIR] [--vae DCAE_DIR] --dst OUT

Key layout of the official `TBACUniImage` state dict:

    model.mllm_backbone.*   Qwen2.5-VL (legacy or new key layout, no lm_head: the official code
                            replaces it by Identity); `model.embed_tokens.weight` resized to
                            vocab_size + num_metaqueries + 2 rows; an untied `lm_head.weight`
                            (tie_word_embeddings false, the 7B layout) when the head was kept
    model.transformer.*     SANA (diffusers names)
    model.connector.{0,2,3} Linear, Linear, RMSNorm
    vae.*                   DC-AE (diffusers names)

The resized embedding table is split by rows: the first vocab_size rows are the frozen MLLM
table, the next num_metaqueries rows become `metaquery/embedding` (their own trainable
parameter), and the remaining (never used) rows are kept as `extra_embedding_rows` so an export
reproduces the checkpoint. num_metaqueries comes from the checkpoint's config.json when it has
one, else from the table size (rows - vocab_size - 2).

An untied head is kept (text generation reads it; image generation does not). `transformers`'
`resize_token_embeddings` grows an untied head with the table, so a kept head may have the same
extra rows: only its first vocab_size rows are converted (the tokens text generation may emit),
the rest, logits of the metaquery and boi/eoi tokens that no text decoder samples, are dropped
with a note, and `export-tbac` writes them back as zeros.

The record written beside the parameters (`source_keys.json`) holds, besides the per-tensor key
layout, the source's `config.json` (every field, unchanged) and its safetensors header metadata,
so that `export-tbac` writes them back as they were.

The architecture of each component is read from `--mllm` (an HF Qwen2.5-VL directory), `--dit` (a
diffusers transformer directory) and `--vae` (a diffusers vae directory); each defaults to the
published 3B preset. Strict like every converter: all missing / unexpected / mis-shaped tensors of
all components are reported together and nothing is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

from uniimage_jax.errors import ConversionError
from uniimage_jax.convert import key_plan
from uniimage_jax.models import param_tree
from uniimage_jax.convert import sources
from uniimage_jax.errors import UserError
from uniimage_jax.convert import dc_ae as dc_ae_convert
from uniimage_jax.convert import qwen2_5_vl as qwen_convert
from uniimage_jax.convert import sana as sana_convert
from uniimage_jax.models.connector import Connector
from uniimage_jax.models.dc_ae import DCAEConfig
from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
from uniimage_jax.models.qwen2_5_vl import abstract_params as qwen_abstract
from uniimage_jax.models.sana import SanaConfig
from uniimage_jax.models.sana import abstract_params as sana_abstract
from uniimage_jax.models.uniimage import UniImageConfig

KIND = "tbac"
MLLM_PREFIX = "model.mllm_backbone."
PREFIXES = {"mllm": MLLM_PREFIX, "dit": "model.transformer.", "connector": "model.connector.",
            "vae": "vae."}
EMBED_KEYS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
LM_HEAD = "lm_head.weight"  # under MLLM_PREFIX

CONNECTOR_KEYMAP = key_plan.KeyMap(rewrites=(
    (r"^0\.", "linear_1."), (r"^2\.", "linear_2."), (r"^3\.weight$", "scale")))


def component_configs(mllm_dir=None, dit_dir=None, vae_dir=None):
    mllm = qwen_convert.read_config(mllm_dir) if mllm_dir else Qwen2_5_VLConfig.qwen2_5_vl_3b()
    dit = sana_convert.read_config(dit_dir) if dit_dir else SanaConfig.sana_1600m_512()
    vae = dc_ae_convert.read_config(vae_dir) if vae_dir else DCAEConfig.dc_ae_f32c32_sana_1_0()
    return mllm, dit, vae


def source_config(src: str) -> dict[str, Any] | None:
    """The checkpoint's own `config.json` (None when `src` is a file or has none)."""
    cfg_path = os.path.join(src, "config.json") if os.path.isdir(src) else ""
    if not (cfg_path and os.path.exists(cfg_path)):
        return None
    try:
        with open(cfg_path) as fh:
            return json.load(fh)
    except ValueError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e})") from None


def _num_metaqueries(src: str, table_rows: int, vocab: int) -> int:
    n = (source_config(src) or {}).get("num_metaqueries")
    return int(n) if n is not None else table_rows - vocab - 2


def _keep_untied_head(source, views, vocab: int, progress: bool) -> None:
    """Map the untied head's first `vocab` rows onto the MLLM's `lm_head` (see the module
    docstring for why the rows after them are dropped)."""
    rows = source.shape(MLLM_PREFIX + LM_HEAD)[0]
    if rows <= vocab:
        return  # the head as the MLLM has it; a wrong size is reported as mis-shaped
    views["mllm"].entries[LM_HEAD] = (MLLM_PREFIX + LM_HEAD, slice(0, vocab))
    if progress:
        print(f"note: {MLLM_PREFIX + LM_HEAD} has {rows} rows; keeping the {vocab} rows of the "
              f"text vocabulary, dropping the {rows - vocab} rows of the added tokens (never "
              "sampled as text)")


def convert_tbac(src: str, mllm_dir=None, dit_dir=None, vae_dir=None, progress: bool = False
                 ) -> tuple[UniImageConfig, dict[str, Any], list[dict[str, Any]]]:
    """(config, params, source key record). Raises ConversionError naming every bad key."""
    import jax

    mllm_cfg, dit_cfg, vae_cfg = component_configs(mllm_dir, dit_dir, vae_dir)
    source = sources.SafetensorsSource(src)
    keys = source.keys()
    table_key = next((MLLM_PREFIX + k for k in EMBED_KEYS if MLLM_PREFIX + k in keys), None)
    if table_key is None:
        raise ConversionError(src, missing=[MLLM_PREFIX + EMBED_KEYS[0]])
    rows, width = source.shape(table_key)
    vocab = mllm_cfg.vocab_size
    n = _num_metaqueries(src, rows, vocab)
    extra = rows - vocab - n
    if n < 1 or extra < 0:
        raise ConversionError(src, other=[
            f"{table_key} has {rows} rows: not vocab_size {vocab} + num_metaqueries {n} + extra "
            "rows; is --mllm the right architecture?"])
    config = UniImageConfig(mllm=mllm_cfg, dit=dit_cfg, vae=vae_cfg, num_metaqueries=n,
                            image_size=dit_cfg.sample_size * vae_cfg.spatial_compression_ratio,
                            extra_embedding_rows=extra)

    # One view per component (prefix stripped), the embedding table split by rows.
    views = {name: sources.SourceView.with_prefix(source, prefix)
             for name, prefix in PREFIXES.items()}
    mllm_table = table_key[len(MLLM_PREFIX):]
    views["mllm"].entries[mllm_table] = (table_key, slice(0, vocab))
    if not mllm_cfg.tie_word_embeddings and MLLM_PREFIX + LM_HEAD in keys:
        _keep_untied_head(source, views, vocab, progress)
    views["metaquery"] = sources.SourceView(source, {"embedding": (table_key, slice(vocab, vocab + n))})
    views["extra_embedding_rows"] = sources.SourceView(
        source, {"extra_embedding_rows": (table_key, slice(vocab + n, rows))})
    d_mllm = mllm_cfg.hidden_size
    targets = {
        "mllm": (qwen_convert.TIED_KEYMAP if mllm_cfg.tie_word_embeddings else
                 qwen_convert.KEYMAP, qwen_abstract(mllm_cfg)),
        "dit": (sana_convert.KEYMAP, sana_abstract(dit_cfg)),
        "connector": (CONNECTOR_KEYMAP, jax.eval_shape(
            lambda: Connector(dit_cfg.caption_channels).init(
                jax.random.PRNGKey(0), jax.numpy.zeros((1, d_mllm))))["params"]),
        "vae": (dc_ae_convert.KEYMAP, dc_ae_convert.abstract_params(vae_cfg)),
        "metaquery": (key_plan.KeyMap(), {"embedding": jax.ShapeDtypeStruct((n, width), "float32")}),
        "extra_embedding_rows": (key_plan.KeyMap(), {"extra_embedding_rows": jax.ShapeDtypeStruct(
            (extra, width), "float32")}),
    }
    covered = {k for v in views.values() for k, _ in v.entries.values()}
    unexpected = [f"{k} {list(source.shape(k))}" for k in keys if k not in covered]
    plans, missing, bad_unexpected, mismatched, other = {}, [], list(unexpected), [], []
    for name, (keymap, abstract) in targets.items():
        try:
            plans[name] = key_plan.plan_conversion(views[name], keymap,
                                                 param_tree.target_shapes(abstract),
                                                 param_prefix=f"{name}/")
        except ConversionError as e:
            prefix = PREFIXES.get(name, "")
            missing += e.missing
            bad_unexpected += [prefix + u for u in e.unexpected]
            mismatched += [prefix + m for m in e.mismatched]
            other += e.other
    if missing or bad_unexpected or mismatched or other:
        raise ConversionError(src, missing, bad_unexpected, mismatched, other)

    params: dict[str, Any] = {}
    record: list[dict[str, Any]] = []
    for name, plan in plans.items():
        part = param_tree.unflatten(key_plan.execute(views[name], plan, progress=progress))
        params.update(part if name == "extra_embedding_rows" else {name: part})
        prefix = () if name == "extra_embedding_rows" else (name,)
        record += key_plan.source_keys(views[name], plan, prefix)
    return config, params, record


def source_record(src: str, tensors: list[dict[str, Any]]) -> dict[str, Any]:
    """What `export-tbac` needs to write the checkpoint back as it was: the per-tensor layout
    (`key_plan.source_keys`), the source's config.json and its safetensors header metadata."""
    return {"tensors": tensors, "config_json": source_config(src),
            "safetensors_metadata": sources.SafetensorsSource(src).metadata()}


