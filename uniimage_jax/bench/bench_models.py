"""The benchmark's models: its presets (`micro`, `small`, `tbac_3b`), each built once as our JAX
model (through the same `UniImageConfig.from_dict` path as training) and as the official-style
PyTorch model with the same architecture, plus the synthetic prompts both sides are timed on."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from uniimage_jax.bench import flops as flops_lib

@dataclasses.dataclass(frozen=True)
class BenchPreset:
    """A model size and its default benchmark shapes.

    mllm: keyword arguments of `processing.tiny.tiny_qwen_hf_config`, or "qwen2_5_vl_3b".
    sana: diffusers `SanaTransformer2DModel` kwargs. vae: diffusers `AutoencoderDC` kwargs or
    {"type": "pixel", "patch_size": p}.
    """

    name: str
    mllm: dict | str
    sana: dict
    vae: dict
    num_metaqueries: int
    image_size: int
    prompt_tokens: int       # padded prompt length (static shapes), queries and suffix included
    # The recipe comparison's prompt length on our side: the prompt bucket a typical caption's
    # batch is padded to, where the official code pads every prompt to `prompt_tokens`.
    recipe_prompt_tokens: int
    batch: int               # training batch
    sample_batch: int        # the larger sampling batch (the other is 1)
    steps: int               # timed training steps
    sample_repeats: int      # timed sampling calls per batch size
    scan_layers: bool = False  # the JAX side scans MLLM and DiT layers (flat compile time)


def _sana(width_heads: int, head_dim: int, layers: int, caption: int, channels: int,
          latent: int) -> dict:
    d = width_heads * head_dim
    return dict(in_channels=channels, out_channels=channels, num_attention_heads=width_heads,
                attention_head_dim=head_dim, num_layers=layers,
                num_cross_attention_heads=width_heads, cross_attention_head_dim=head_dim,
                cross_attention_dim=d, caption_channels=caption, mlp_ratio=2.5,
                attention_bias=False, sample_size=latent, patch_size=1,
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)


def _tiny_dc_ae(widths, latent_channels: int) -> dict:
    n = len(widths)
    types = ["ResBlock"] + ["EfficientViTBlock"] * (n - 1)
    scales = [[]] + [[5]] * (n - 1)
    return dict(in_channels=3, latent_channels=latent_channels, attention_head_dim=16,
                encoder_block_types=types, decoder_block_types=types,
                encoder_block_out_channels=list(widths), decoder_block_out_channels=list(widths),
                encoder_layers_per_block=[1] * n, decoder_layers_per_block=[1] * n,
                encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
                downsample_block_type="conv", upsample_block_type="interpolate",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)


PRESETS: dict[str, BenchPreset] = {
    # Seconds on a CPU: the tests' end-to-end run.
    "micro": BenchPreset(
        name="micro", mllm=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=48, vision_depth=1,
                                vision_hidden_size=16, vision_heads=1,
                                vision_intermediate_size=16, fullatt_block_indexes=(0,)),
        sana=_sana(2, 8, 2, 24, 12, 4), vae={"type": "pixel", "patch_size": 2},
        num_metaqueries=4, image_size=8, prompt_tokens=16, recipe_prompt_tokens=12, batch=2,
        sample_batch=2, steps=2, sample_repeats=1),
    # Between tiny and real, about a minute per side on a 2-core CPU: a 4-layer 256-wide MLLM,
    # a 4-block 256-wide ladder SANA on 16x16 latents of a small DC-AE (128 px, f8). Its prompts
    # have no chat template, only the 19 tokens of the metaquery suffix: the recipe's 64 leave
    # room for 45 caption tokens, a typical COCO-like caption (20-52 tokens).
    "small": BenchPreset(
        name="small", mllm=dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=704),
        sana=_sana(8, 32, 4, 256, 16, 16), vae=_tiny_dc_ae((32, 64, 64, 128), 16),
        num_metaqueries=16, image_size=128, prompt_tokens=96, recipe_prompt_tokens=64,
        batch=4, sample_batch=4, steps=3, sample_repeats=1),
    # The published architecture with random weights (GPUs / TPUs): Qwen2.5-VL-3B, SANA-1600M,
    # DC-AE f32c32; the training config's 640-token prompt, the official 16 samples per GPU; the
    # recipe's 160-token t2i prompt bucket, where batches of COCO-like captions land.
    "tbac_3b": BenchPreset(
        name="tbac_3b", mllm="qwen2_5_vl_3b", sana="sana_1600m_512", vae="dc_ae_f32c32",
        num_metaqueries=64, image_size=512, prompt_tokens=640, recipe_prompt_tokens=160,
        batch=16, sample_batch=8, steps=10, sample_repeats=3, scan_layers=True),
}


def hf_qwen_config(c):
    """A transformers `Qwen2_5_VLConfig` for our `Qwen2_5_VLConfig` (round trip checked)."""
    from transformers import Qwen2_5_VLConfig as HFConfig

    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    v = c.vision_config
    hf = HFConfig(
        text_config=dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            max_position_embeddings=32768, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                             "mrope_section": list(c.mrope_section)},
            tie_word_embeddings=c.tie_word_embeddings),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, hidden_act="silu",
            intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            in_channels=v.in_channels, patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size, out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second),
        image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
        tie_word_embeddings=c.tie_word_embeddings)
    back = Qwen2_5_VLConfig.from_hf(hf.to_dict())
    ours = dataclasses.replace(c, scan_layers=False, remat=False)
    if back != ours:
        raise ValueError(f"the PyTorch Qwen2.5-VL config does not reproduce ours:\n{back}\n{ours}")
    return hf


@dataclasses.dataclass
class Built:
    preset: BenchPreset
    config: Any                    # UniImageConfig
    sana: dict                     # diffusers kwargs
    vae: dict                      # diffusers kwargs or pixel


def build(preset: BenchPreset) -> Built:
    """The JAX model config and the PyTorch constructor arguments of one preset. The config goes
    through the trainer's path: a model dict with the keys of a training preset's model part,
    made a config by `presets.build_model_config`."""
    from uniimage_jax.models import presets

    config = presets.build_model_config(model_dict(preset))
    for tokens in (preset.prompt_tokens, preset.recipe_prompt_tokens):  # validates the lengths
        flops_lib.train_flops_per_sample(config, tokens)
    if preset.sana == "sana_1600m_512":
        sana = config.dit.to_diffusers()
    else:
        sana = dict(preset.sana)
    vae = config.vae.to_dict() if isinstance(preset.vae, str) else dict(preset.vae)
    return Built(preset=preset, config=config, sana=sana, vae=vae)


def model_dict(preset: BenchPreset) -> dict:
    """The model part of a training config for a benchmark preset: `tbac_3b` is the training
    preset's own; the smaller ones have its keys, with components in our `to_dict()` forms. No
    system prompt (the synthetic prompts are token ids)."""
    from uniimage_jax.models import presets
    from uniimage_jax.models.dc_ae import DCAEConfig
    from uniimage_jax.models.pixel_ae import PixelAEConfig
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
    from uniimage_jax.models.sana import SanaConfig
    from uniimage_jax.processing import tiny

    if preset.name == "tbac_3b":
        m = presets.preset_model_dict("tbac_3b")
    else:
        vae = (PixelAEConfig.from_dict(preset.vae) if preset.vae.get("type") == "pixel"
               else DCAEConfig.from_diffusers(preset.vae))
        m = {"mllm": Qwen2_5_VLConfig.from_hf(tiny.tiny_qwen_hf_config(**preset.mllm).to_dict())
             .to_dict(), "dit": SanaConfig.from_diffusers(preset.sana).to_dict(),
             "vae": vae.to_dict(), "ladder": "official"}
    return {**m, "num_metaqueries": preset.num_metaqueries, "image_size": preset.image_size,
            "system_prompt": None, "scan_layers": preset.scan_layers}


def synthetic_prompts(config, rows: int, prompt_tokens: int, seed: int):
    """(input_ids, attention_mask) int32 (rows, T): random prompt tokens, then
    <|vision_start|> metaqueries <|vision_end|> and one more token, no padding."""
    m = config.mllm
    n = config.num_metaqueries
    g = np.random.default_rng(seed)
    body = g.integers(0, min(m.vocab_size, m.vision_start_token_id), (rows, prompt_tokens - n - 3))
    tail = np.array([m.vision_start_token_id, *config.metaquery_token_ids,
                     m.vision_end_token_id, 0])
    ids = np.concatenate([body, np.broadcast_to(tail, (rows, n + 3))], axis=1).astype(np.int32)
    return ids, np.ones_like(ids)


def torch_model(built: Built, device: str, seed: int = 0):

    from uniimage_jax.bench.torch_reference import OfficialTBAC

    tm = OfficialTBAC(hf_qwen_config(built.config.mllm), built.sana, built.vae,
                      built.config.num_metaqueries, seed=seed)
    return tm.to("cuda" if device == "gpu" else "cpu")
