"""The tiny offline tokenizer / processor / Qwen config builders now live in the package (the
tiny preset and the demo use them); re-exported here for the tests."""
from uniimage_jax.processing.tiny import (QWEN2_5_VL_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS,  # noqa: F401
                                          TINY_BPE_VOCAB, make_tiny_processor,
                                          make_tiny_processor_dir, make_tiny_tokenizer,
                                          make_tiny_tokenizer_dir, tiny_qwen_hf_config,
                                          tiny_token_ids)
