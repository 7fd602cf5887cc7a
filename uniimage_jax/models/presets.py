"""Model size presets, apart from the training recipes in `configs/`.

A preset is an `ml_collections.ConfigDict` whose component configs are written in their source
formats (an HF Qwen2.5-VL config.json dict, a diffusers SANA / DC-AE config dict, or our pixel
autoencoder), so a published `config.json` can be pasted in unchanged.

  tiny     a ~1M-parameter model for CPU tests and the demo: 4-layer MLLM, 4-block ladder DiT,
           32 px images through a space-to-depth pixel autoencoder (no pretrained VAE needed)
  tbac_3b  the published model: Qwen2.5-VL-3B-Instruct + SANA-1600M 512px + DC-AE f32c32
"""

from __future__ import annotations

from uniimage_jax.errors import ConfigError

from uniimage_jax.processing.prompts import DEFAULT_SYSTEM_PROMPT

PRESETS = ("tiny", "tbac_3b")

# The tiny MLLM (`uniimage_jax.processing.tiny`): shaped like Qwen2.5-VL (GQA, M-RoPE with unequal
# sections, windowed vision with a full-attention block) so every code path of the real model
# runs; its token ids are those of the tiny offline tokenizer.
TINY_QWEN_LAYERS = 4

TINY_SANA = {
    "in_channels": 48, "out_channels": 48, "num_attention_heads": 4, "attention_head_dim": 16,
    "num_layers": 4, "num_cross_attention_heads": 4, "cross_attention_head_dim": 16,
    "cross_attention_dim": 64, "caption_channels": 64, "mlp_ratio": 2.5, "dropout": 0.0,
    "attention_bias": False, "sample_size": 8, "patch_size": 1,
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": None,
}


def model_preset(name: str):
    """The model part of a training config for preset `name` (an `ml_collections.ConfigDict` of
    `preset_model_dict(name)`)."""
    import ml_collections

    return ml_collections.ConfigDict(preset_model_dict(name))


def preset_model_dict(name: str) -> dict:
    """The model part of preset `name` as a plain dict (no ml_collections: the benchmark builds
    from it too). Component configs are stored as our own `to_dict()` forms (the published
    architectures come from the component presets)."""
    from uniimage_jax.models.dc_ae import DCAEConfig
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from uniimage_jax.models.sana import SanaConfig

    m = {"preset": name, "system_prompt": DEFAULT_SYSTEM_PROMPT,
         "max_caption_tokens": 256,  # captions are cut to this (official), with a warning
         "ladder": "official",       # 'official' | 'final' | 'uniform' | hidden-state indices
         # nn.scan over the MLLM and DiT layers: compile time flat in depth, so on for the
         # published model; the tiny one stays unrolled (cheap to compile, per-layer parameter
         # names in tests). Converted checkpoints store layers apart and are stacked on load.
         "scan_layers": name == "tbac_3b",
         # Rematerialisation of the DiT blocks and of the MLLM decoder layers (the query path
         # is the MLLM's only backward pass), by policy name (models/remat.py). tbac_3b keeps
         # the DiT's matmul outputs and recomputes only its elementwise work: compiled for a
         # v5p-8 (t2i, 16 per chip, 384-token prompts) that needs 36 GiB of temporaries per
         # chip against about 53 without remat (compiled at fsdp=4), with no extra flops in
         # XLA's count; 'full' needs 25 GiB but recomputes the DiT forward (~11% more flops,
         # ~7% slower).
         "dit_remat": "dots_saveable" if name == "tbac_3b" else "none", "mllm_remat": "none"}
    if name == "tiny":
        from uniimage_jax.processing import tiny

        hf = tiny.tiny_qwen_hf_config(num_hidden_layers=TINY_QWEN_LAYERS, tie_word_embeddings=True)
        m["mllm"] = Qwen2_5_VLConfig.from_hf(hf.to_dict()).to_dict()
        m["dit"] = SanaConfig.from_diffusers(TINY_SANA).to_dict()
        m["vae"] = {"type": "pixel", "patch_size": 4, "in_channels": 3, "scaling_factor": 1.0}
        m["num_metaqueries"] = 8
        m["image_size"] = 32
        # Fixed prompt length (static shapes). Captions too long for it are cut to fit, counted
        # and named in a warning (processing/prompts.py); 54 caption tokens (~28 words) fit.
        m["max_prompt_tokens"] = 160
    elif name == "tbac_3b":
        m["mllm"] = Qwen2_5_VLConfig.qwen2_5_vl_3b().to_dict()
        m["dit"] = SanaConfig.sana_1600m_512().to_dict()
        m["vae"] = DCAEConfig.dc_ae_f32c32_sana_1_0().to_dict()
        m["num_metaqueries"] = 64
        m["image_size"] = 512
        # system + 256 caption tokens + 256 image tokens + suffix (a longer caption is cut to
        # fit, with a warning)
        m["max_prompt_tokens"] = 640
    else:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {PRESETS}")
    return m


# The keys of a model part that are `UniImageConfig` fields as they stand. The others either shape
# the training batches (`preset`, `max_prompt_tokens`) or are folded into the component configs
# (`scan_layers`, `dit_remat`, `mllm_remat`).
_MODEL_FIELDS = ("num_metaqueries", "ladder", "image_size", "system_prompt", "max_caption_tokens")


def model_config_dict(m) -> dict:
    """The `UniImageConfig.from_dict` form of a model part: a preset's ConfigDict, or any mapping
    with its keys (the benchmark builds one). `scan_layers` true turns scanning on in both stacks;
    a field left out keeps `UniImageConfig`'s default."""
    def plain(x):
        return x.to_dict() if hasattr(x, "to_dict") else dict(x)

    from uniimage_jax.models import remat

    scan = {"scan_layers": True} if m.get("scan_layers") else {}
    # Stage configs saved before the remat fields existed have none: no remat.
    mllm_remat = remat.policy_name(m.get("mllm_remat", "none"), "config.model.mllm_remat")
    dit_remat = remat.policy_name(m.get("dit_remat", "none"), "config.model.dit_remat")
    d = {"mllm": {**plain(m["mllm"]), **scan, "remat": mllm_remat},
         "dit": {**plain(m["dit"]), **scan, "remat": dit_remat}, "vae": plain(m["vae"])}
    d.update({k: m[k] for k in _MODEL_FIELDS if k in m})
    return d


def build_model_config(m, adapters=None):
    """UniImageConfig (validated) of a model part and optional LoRA adapters (a `LoraConfig`),
    through `UniImageConfig.from_dict`, the one place a model dict becomes a config."""
    from uniimage_jax.models.uniimage import UniImageConfig

    d = model_config_dict(m)
    if adapters is not None:
        d["lora"] = adapters.to_dict()
    return UniImageConfig.from_dict(d)
