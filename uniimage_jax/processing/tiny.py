"""Tiny, fully offline stand-ins for the Qwen2.5-VL tokenizer, processor and config (tests, the
tiny preset and the demo).

Tests never download anything: the tokenizer is a byte-level BPE trained here (with the
`tokenizers` library) on a few sentences, then wrapped in transformers' `Qwen2Tokenizer` together
with Qwen's special tokens and the Qwen2.5-VL chat template, so that `AutoTokenizer` /
`AutoProcessor.from_pretrained(dir)` load it like the real one. The special tokens keep Qwen's
relative order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ..., `<|vision_start|>`,
`<|vision_end|>`, `<|vision_pad|>`, `<|image_pad|>`, `<|video_pad|>`) right after the BPE vocab,
and the total vocabulary size is deliberately not a multiple of 64 (or of 8) so that code padding
the embedding table has real work to do.

`tiny_qwen_hf_config` returns a small `transformers.Qwen2_5_VLConfig` whose token ids match that
tokenizer.
"""

from __future__ import annotations

import os

# Qwen2's pre-tokenisation regex (same as transformers' Qwen2Tokenizer).
_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                      r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5-VL's special tokens, in the order of their ids in the real tokenizer (151643..151656).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen2.5-VL-Instruct chat template (images/videos become
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "You will be given an image or its caption. Please describe the content of the image in "
    "detail in your own words.",
    "What is in this picture? Describe the image.",
    "A red cube sits on top of a blue sphere next to a green cylinder.",
    "The quick brown fox jumps over the lazy dog while two cats watch from the window.",
    "How many objects are there? There are three objects: a cube, a sphere and a cylinder.",
    "user assistant system image picture photo color shape left right above below",
    "Answer the question briefly. 0 1 2 3 4 5 6 7 8 9 yes no",
] + [
    # The words of the built-in synthetic captions (`uniimage_jax.data.synthetic`), frequent
    # enough that each becomes one token, as common words are in Qwen's real vocabulary: a
    # character-level caption would hide its meaning from a 4-layer MLLM (the demo trains on them).
    "a photo of a an and that is to the left of right above below one two three four "
    "red orange yellow green blue purple white circle square triangle diamond "
    "circles squares triangles diamonds",
] * 6

# Number of byte-level BPE tokens (256 byte symbols + merges). With the 14 special tokens the
# vocabulary has TINY_BPE_VOCAB + 14 = 377 entries: not a multiple of 8, 64 or 128.
TINY_BPE_VOCAB = 363


def _train_bpe(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def make_tiny_tokenizer(vocab_size: int = TINY_BPE_VOCAB):
    """A transformers `Qwen2Tokenizer` with a tiny trained BPE vocab + Qwen's special tokens.

    vocab_size: number of BPE tokens (256 bytes + merges); the special tokens follow, so the
    tokenizer has vocab_size + 14 entries and `tiny_token_ids(vocab_size)` gives their ids.
    """
    import json

    from transformers import Qwen2Tokenizer

    bpe = _train_bpe(vocab_size)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    if len(vocab) != vocab_size:  # the corpus ran out of merges: ids would not match tiny_token_ids
        raise ValueError(f"the tiny corpus yields a BPE vocab of {len(vocab)} tokens, not "
                         f"{vocab_size}; pass a smaller vocab_size (>= 256)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for t in QWEN_SPECIAL_TOKENS:  # append in Qwen's order so ids are consecutive after the BPE
        vocab[t] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
                               model_max_length=32768)
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer


def make_tiny_tokenizer_dir(path: str, vocab_size: int = TINY_BPE_VOCAB) -> str:
    """Save the tiny tokenizer (AutoTokenizer-loadable, offline) to `path`; returns `path`."""
    os.makedirs(path, exist_ok=True)
    make_tiny_tokenizer(vocab_size).save_pretrained(path)
    return path


def make_tiny_processor(vocab_size: int = TINY_BPE_VOCAB, min_pixels: int = 56 * 56,
                        max_pixels: int = 112 * 112):
    """A Qwen2.5-VL processor over the tiny tokenizer with a small-image Qwen2-VL image processor.

    With the defaults an image becomes at most 8x8 patches of 14 px (16 merged image tokens).
    Without torchvision transformers cannot build a video processor, so this is the image-only
    variant from `uniimage_jax.processing.qwen` (see there); it saves the same files.
    """
    from uniimage_jax.processing.qwen import image_only_processor

    tokenizer = make_tiny_tokenizer(vocab_size)
    return image_only_processor(_image_processor(min_pixels, max_pixels), tokenizer,
                                chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def _image_processor(min_pixels: int, max_pixels: int):
    # The torchvision-backed class when torchvision is installed, else the PIL one; both are what
    # AutoImageProcessor would pick for this environment.
    try:
        import torchvision  # noqa: F401

        from transformers import Qwen2VLImageProcessor as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessorPil as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
               temporal_patch_size=2, merge_size=2)


def make_tiny_processor_dir(path: str, vocab_size: int = TINY_BPE_VOCAB,
                            min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> str:
    """Save a tiny processor directory laid out like the real Qwen2.5-VL one; returns `path`.

    `uniimage_jax.processing.qwen.load_processor(path)` loads it offline; with torchvision
    installed so does `AutoProcessor.from_pretrained(path)` (a stock `Qwen2_5_VLProcessor`).
    """
    import json

    os.makedirs(path, exist_ok=True)
    make_tiny_processor(vocab_size, min_pixels, max_pixels).save_pretrained(path)
    # Record the stock class (as the published checkpoints do), not the image-only subclass.
    for name in os.listdir(path):
        if name.endswith(".json"):
            f = os.path.join(path, name)
            with open(f) as fh:
                cfg = json.load(fh)
            if isinstance(cfg, dict) and "processor_class" in cfg:
                cfg["processor_class"] = "Qwen2_5_VLProcessor"
                with open(f, "w") as fh:
                    json.dump(cfg, fh, indent=2)
    return path


def tiny_token_ids(vocab_size: int = TINY_BPE_VOCAB) -> dict[str, int]:
    """Ids of the special tokens in the tiny tokenizer, by their Qwen name."""
    return {t: vocab_size + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}


def tiny_qwen_hf_config(vocab_size: int = TINY_BPE_VOCAB + len(QWEN_SPECIAL_TOKENS), *,
                        bpe_vocab_size: int = TINY_BPE_VOCAB, hidden_size: int = 64,
                        num_hidden_layers: int = 2, num_attention_heads: int = 4,
                        num_key_value_heads: int = 2, intermediate_size: int = 96,
                        vision_depth: int = 2, vision_hidden_size: int = 32,
                        vision_heads: int = 2, vision_intermediate_size: int = 48,
                        fullatt_block_indexes=(1,), window_size: int = 56,
                        tie_word_embeddings: bool = False):
    """A small `transformers.Qwen2_5_VLConfig` whose special token ids match the tiny tokenizer.

    vocab_size: rows of the embedding table (>= the tokenizer size); the default is exactly the
    tiny tokenizer's size (377). head_dim = hidden_size / heads (16 by default); the M-RoPE
    sections split head_dim/2 as (2, 3, 3) scaled, like Qwen's (16, 24, 24) of 64. window_size 56
    px = 2x2 merged tokens, so the 8x8-patch images of the tiny processor need several windows.
    """
    from transformers import Qwen2_5_VLConfig

    ids = tiny_token_ids(bpe_vocab_size)
    head_dim = hidden_size // num_attention_heads
    half = head_dim // 2
    t = half // 4 if half >= 8 else 1
    mrope_section = [t, (half - t) // 2, half - t - (half - t) // 2]
    text_config = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie_word_embeddings,
    )
    vision_config = dict(
        depth=vision_depth, hidden_size=vision_hidden_size, hidden_act="silu",
        intermediate_size=vision_intermediate_size, num_heads=vision_heads, in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
        out_hidden_size=hidden_size, fullatt_block_indexes=list(fullatt_block_indexes),
    )
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
