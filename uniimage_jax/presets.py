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
    """The model part of a training config for preset `name` (an `ml_collections.ConfigDict`).
    Component configs are stored as our own `to_dict()` forms (the published architectures come
    from the component presets)."""
    import ml_collections

    from uniimage_jax.models.dc_ae import DCAEConfig
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from uniimage_jax.models.sana import SanaConfig

    m = ml_collections.ConfigDict()
    m.preset = name
    m.system_prompt = DEFAULT_SYSTEM_PROMPT
    m.max_caption_tokens = 256   # captions are cut to this (official), with a warning naming them
    m.ladder = "official"        # 'official' | 'final' | 'uniform' | list of hidden-state indices
    # nn.scan over the MLLM and DiT layers: compile time flat in depth, so on for the published
    # model; the tiny one stays unrolled (cheap to compile, per-layer parameter names in tests).
    # Converted checkpoints store layers apart and are stacked on load.
    m.scan_layers = name == "tbac_3b"
    # Rematerialisation of the DiT blocks and the MLLM decoder layers (the query path is the
    # MLLM's only backward pass), by policy name: see uniimage_jax/models/remat.py.
    m.dit_remat = "none"
    m.mllm_remat = "none"
    if name == "tiny":
        from uniimage_jax.processing import tiny

        hf = tiny.tiny_qwen_hf_config(num_hidden_layers=TINY_QWEN_LAYERS, tie_word_embeddings=True)
        m.mllm = Qwen2_5_VLConfig.from_hf(hf.to_dict()).to_dict()
        m.dit = SanaConfig.from_diffusers(TINY_SANA).to_dict()
        m.vae = {"type": "pixel", "patch_size": 4, "in_channels": 3, "scaling_factor": 1.0}
        m.num_metaqueries = 8
        m.image_size = 32
        # Fixed prompt length (static shapes). Captions too long for it are cut to fit, counted
        # and named in a warning (processing/prompts.py); 54 caption tokens (~28 words) fit.
        m.max_prompt_tokens = 160
    elif name == "tbac_3b":
        m.mllm = Qwen2_5_VLConfig.qwen2_5_vl_3b().to_dict()
        m.dit = SanaConfig.sana_1600m_512().to_dict()
        m.vae = DCAEConfig.dc_ae_f32c32_sana_1_0().to_dict()
        m.num_metaqueries = 64
        m.image_size = 512
        m.max_prompt_tokens = 640    # system + 256 caption tokens + 256 image tokens + suffix
        #                              (a longer caption is cut to fit, with a warning)
    else:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {PRESETS}")
    return m


def build_model_config(m):
    """UniImageConfig from the model part of a training config (validated)."""
    import dataclasses

    from uniimage_jax.models import remat
    from uniimage_jax.models.dc_ae import DCAEConfig
    from uniimage_jax.models.pixel_ae import PixelAEConfig
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from uniimage_jax.models.sana import SanaConfig
    from uniimage_jax.models.uniimage import UniImageConfig

    def plain(x):
        return x.to_dict() if hasattr(x, "to_dict") else dict(x)

    mllm = Qwen2_5_VLConfig.from_dict(plain(m.mllm))
    dit = SanaConfig.from_dict(plain(m.dit))
    vae_d = plain(m.vae)
    vae = PixelAEConfig.from_dict(vae_d) if vae_d.get("type") == "pixel" \
        else DCAEConfig.from_dict(vae_d)
    # Stage configs saved before the remat fields existed have none: no remat.
    mllm = dataclasses.replace(mllm, scan_layers=mllm.scan_layers or bool(m.scan_layers),
                               remat=remat.policy_name(m.get("mllm_remat", "none"),
                                                       "config.model.mllm_remat"))
    dit = dataclasses.replace(dit, scan_layers=dit.scan_layers or bool(m.scan_layers),
                              remat=remat.policy_name(m.get("dit_remat", "none"),
                                                      "config.model.dit_remat"))
    ladder = m.ladder if isinstance(m.ladder, str) else tuple(m.ladder)
    return UniImageConfig(mllm=mllm, dit=dit, vae=vae, num_metaqueries=m.num_metaqueries,
                          ladder=ladder, image_size=m.image_size, system_prompt=m.system_prompt,
                          max_caption_tokens=m.max_caption_tokens)
