"""A tiny TBAC-UniImage checkpoint built the official way, for tests that need a whole model.

The recipe of `tests/test_uniimage.py`: `OfficialTBAC` (transformers Qwen2.5-VL with the embedding
table resized by N + 2 rows, the connector, diffusers SANA and DC-AE) with every parameter re-drawn
at a non-trivial scale, its state dict saved with the official key names and converted with
`uniimage-convert tbac`. The MLLM uses the tiny offline tokenizer's vocabulary, so the tiny
processor (`make_tiny_processor_dir`) plus the metaquery tokens that `load_for_inference` adds
tokenizes prompts for it.
"""
from __future__ import annotations

import json
import os

from uniimage_jax.processing.tiny import make_tiny_processor_dir, tiny_qwen_hf_config, \
    tiny_token_ids

N_QUERIES = 4
N_BLOCKS = 3
MLLM_LAYERS = 4
SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            num_layers=N_BLOCKS, num_cross_attention_heads=2, cross_attention_head_dim=8,
            cross_attention_dim=16, caption_channels=24, mlp_ratio=2.5, attention_bias=False,
            sample_size=4, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=None)
DCAE = dict(in_channels=3, latent_channels=4, attention_head_dim=8,
            encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
            decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
            encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
            encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
            encoder_qkv_multiscales=[[], [5], [5]], decoder_qkv_multiscales=[[], [5], [5]],
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
SOURCE_METADATA = {"format": "pt"}
SOURCE_CONFIG = {"architectures": ["TBACUniImage"], "model_type": "tbac_uniimage",
                 "num_metaqueries": N_QUERIES, "mllm_id": "Qwen/Qwen2.5-VL-3B-Instruct",
                 "diffusion_model_id": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
                 "input_size": 4, "in_channels": 4, "vae_downsample_f": 32,
                 "noise_scheduler_id": None, "_gradient_checkpointing": True,
                 "loss_weights": {"flow": 1.0}, "torch_dtype": "bfloat16",
                 "transformers_version": "4.51.3"}
IMAGE = 16  # pixels; the DC-AE above compresses 4x -> 4x4 latents = SANA sample_size


def build_tiny_tbac(root: str, seed: int = 0) -> dict:
    """Write under `root`: the official-style state dict (`tbac/`), its conversion (`converted/`)
    and a tiny processor (`processor/`). Returns {"torch": OfficialTBAC, "dst", "src",
    "processor", "ids" (special token ids + "vocab")}."""
    from diffusers import AutoencoderDC as TorchDCAE
    from diffusers import SanaTransformer2DModel as TorchSana
    from safetensors.torch import save_file

    from uniimage_jax.cli import convert as cli
    from uniimage_jax.bench.torch_reference import OfficialTBAC

    hf_config = tiny_qwen_hf_config(num_hidden_layers=MLLM_LAYERS, tie_word_embeddings=True)
    ids = {**tiny_token_ids(), "vocab": hf_config.text_config.vocab_size}
    mllm_dir, dit_dir, vae_dir, src, dst, proc = (
        os.path.join(root, n) for n in ("mllm", "dit", "vae", "tbac", "converted", "processor"))
    hf_config.save_pretrained(mllm_dir)
    torch_model = OfficialTBAC(hf_config, SANA, DCAE, N_QUERIES, seed=seed)
    TorchSana(**SANA).save_config(dit_dir)
    TorchDCAE(**DCAE).save_config(vae_dir)
    os.makedirs(src)
    # The header metadata transformers' save_pretrained writes, and a config.json with the kind of
    # fields the official training config carries: export-tbac must give both back unchanged.
    save_file(torch_model.state_dict_official(), os.path.join(src, "model.safetensors"),
              metadata=SOURCE_METADATA)
    with open(os.path.join(src, "config.json"), "w") as fh:
        json.dump(SOURCE_CONFIG, fh)
    rc = cli.main(["tbac", "--src", src, "--mllm", mllm_dir, "--dit", dit_dir, "--vae", vae_dir,
                   "--dst", dst])
    if rc != 0:
        raise RuntimeError("converting the tiny TBAC checkpoint failed")
    make_tiny_processor_dir(proc)
    return dict(torch=torch_model, dst=dst, src=src, processor=proc, ids=ids)
