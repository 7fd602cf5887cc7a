"""The tiny offline tokenizer / processor / Qwen config builders now live in the package (the
tiny preset and the demo use them); re-exported here for the tests."""
from uniimage_jax.processing.tiny import (QWEN2_5_VL_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS,  # noqa: F401
                                          TINY_BPE_VOCAB, make_tiny_processor,
                                          make_tiny_processor_dir, make_tiny_tokenizer,
                                          make_tiny_tokenizer_dir, tiny_qwen_hf_config,
                                          tiny_token_ids)


# A DC-AE small enough for the tiny preset (32 px -> 8 x 8 x 48 latents, the tiny DiT's input):
# its encoder has parameters and real convolutions, where the tiny preset's pixel autoencoder is a
# parameter-free reshape (0 FLOPs) and could not show the encoder leaving the step.
TINY_DC_AE = {"latent_channels": 48, "attention_head_dim": 8,
              "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
              "encoder_block_out_channels": (12, 24, 48),
              "decoder_block_out_channels": (12, 24, 48),
              "encoder_layers_per_block": (1, 1, 1), "decoder_layers_per_block": (1, 1, 1),
              "encoder_qkv_multiscales": ((), (), ()), "decoder_qkv_multiscales": ((), (), ())}
