"""Prompt construction against the official `MLLMInContext.tokenize` (models/model.py), written out
here step by step with transformers' own tokenizer / processor calls, for a tiny tokenizer whose
vocabulary is smaller than the MLLM's embedding table (so the official padding tokens are added)."""
import numpy as np
import pytest
from PIL import Image

from tests.tiny_assets import make_tiny_processor_dir, tiny_token_ids
from uniimage_jax.processing.prompts import (DEFAULT_SYSTEM_PROMPT, add_metaquery_tokens,
                                             build_generation_inputs, metaquery_positions)
from uniimage_jax.processing.qwen import load_processor

NUM_EMBEDDINGS = 396  # the MLLM's table; the tiny tokenizer has 377 tokens -> 19 pad tokens
N = 5


def _official_tokenize(processor, captions, images=None):
    """models/model.py, `tokenize` for the Qwen2.5-VL backbone (num_metaqueries > 0)."""
    tok = processor.tokenizer
    prefix = [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]}]
    suffix = "<|vision_start|>" + "".join(f"<|img{i}|>" for i in range(N)) + \
        "<|vision_end|><|im_end|>"
    captions = [tok.decode(processor(text=c, return_tensors="np", padding=False)
                           .input_ids[0, :256]) for c in captions]
    if images is not None:
        conversations = [prefix + [{"role": "user", "content": (
            [{"type": "image"} for _ in imgs] + [{"type": "text", "text": cap}]
            if imgs else [{"type": "text", "text": cap}])}]
            for cap, imgs in zip(captions, images)]
        kwargs = {"images": [imgs for imgs in images if imgs]}
    else:
        conversations = [prefix + [{"role": "user", "content": [{"type": "text", "text": cap}]}]
                         for cap in captions]
        kwargs = {}
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) + suffix
               for c in conversations]
    return processor(text=prompts, return_tensors="np", padding=True, **kwargs)


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    path = make_tiny_processor_dir(str(tmp_path_factory.mktemp("proc")))
    ours, official = load_processor(path), load_processor(path)
    # official: pad to the table size, then the metaquery tokens
    tok = official.tokenizer
    tok.padding_side = "left"
    tok.add_special_tokens({"additional_special_tokens": [
        f"<|pad_token_{i}|>" for i in range(NUM_EMBEDDINGS - len(tok))]})
    tok.add_special_tokens({"additional_special_tokens": [f"<|img{i}|>" for i in range(N)]})
    return ours, official


def test_metaquery_ids_equal_the_official_ones(processors):
    ours, official = processors
    assert len(ours.tokenizer) < NUM_EMBEDDINGS  # padding has work to do
    ids = add_metaquery_tokens(ours.tokenizer, NUM_EMBEDDINGS, N)
    assert ids == list(range(NUM_EMBEDDINGS, NUM_EMBEDDINGS + N))
    assert ids == official.tokenizer.convert_tokens_to_ids([f"<|img{i}|>" for i in range(N)])
    assert add_metaquery_tokens(ours.tokenizer, NUM_EMBEDDINGS, N) == ids  # idempotent
    with pytest.raises(ValueError, match="vocab_size"):
        add_metaquery_tokens(load_processor(ours.tokenizer.name_or_path).tokenizer, 100, N)


def test_text_prompts_equal_the_official_sequence(processors):
    ours, official = processors
    add_metaquery_tokens(ours.tokenizer, NUM_EMBEDDINGS, N)
    long_caption = " ".join(["a red circle to the left of a blue square"] * 40)  # > 256 tokens
    captions = ["a photo of a cat", long_caption, ""]
    got = build_generation_inputs(ours, captions, num_metaqueries=N)
    ref = _official_tokenize(official, captions)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    special = tiny_token_ids()
    tail = [special["<|vision_start|>"], *range(NUM_EMBEDDINGS, NUM_EMBEDDINGS + N),
            special["<|vision_end|>"], special["<|im_end|>"]]
    assert (got["input_ids"][:, -len(tail):] == tail).all()  # left padding: same tail every row
    assert got["attention_mask"][0, 0] == 0  # the short rows are left-padded
    pos = metaquery_positions(got["input_ids"], special["<|vision_start|>"],
                              special["<|vision_end|>"])
    t = got["input_ids"].shape[1]
    assert (pos == np.arange(t - N - 2, t - 2)).all()
    # the long caption was cut to 256 tokens
    assert got["attention_mask"][1].sum() < len(ours.tokenizer(long_caption)["input_ids"])
    padded = build_generation_inputs(ours, captions, num_metaqueries=N, pad_to=t + 7)
    np.testing.assert_array_equal(padded["input_ids"][:, 7:], got["input_ids"])
    assert (padded["attention_mask"][:, :7] == 0).all()
    # A fixed length too short for the longest prompt cuts that caption further (never an error
    # mid-run); only a length without room for any caption is an error.
    cut = build_generation_inputs(ours, captions, num_metaqueries=N, pad_to=t - 1)
    assert cut["attention_mask"][1].sum() <= t - 1
    np.testing.assert_array_equal(cut["input_ids"][[0, 2]], padded["input_ids"][[0, 2], 8:])
    with pytest.raises(ValueError, match="no room for a caption"):
        build_generation_inputs(ours, captions, num_metaqueries=N, pad_to=N + 4)


def test_the_callers_padding_side_is_left_as_it_was(processors):
    ours, official = processors
    fresh = load_processor(ours.tokenizer.name_or_path)  # a processor of the caller's own
    add_metaquery_tokens(fresh.tokenizer, NUM_EMBEDDINGS, N)
    fresh.tokenizer.padding_side = "right"
    captions = ["a photo of a cat", "a red circle to the left of a blue square"]
    got = build_generation_inputs(fresh, captions, num_metaqueries=N)
    assert fresh.tokenizer.padding_side == "right"
    ref = _official_tokenize(official, captions)  # left-padded, the official way
    assert ref["attention_mask"][0, 0] == 0  # the rows have different lengths
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])


def test_image_prompts_equal_the_official_sequence(processors):
    ours, official = processors
    add_metaquery_tokens(ours.tokenizer, NUM_EMBEDDINGS, N)
    g = np.random.default_rng(0)
    im = [Image.fromarray(g.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)) for i in (0, 1)]
    captions, images = ["make the circle blue", "remove the square"], [[im[0]], [im[1]]]
    got = build_generation_inputs(ours, captions, images, num_metaqueries=N)
    ref = _official_tokenize(official, captions, images)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])
    assert got["image_grid_thw"] == tuple(tuple(int(v) for v in g) for g in ref["image_grid_thw"])
    assert (got["input_ids"] == tiny_token_ids()["<|image_pad|>"]).sum() == \
        sum(t * h * w // 4 for t, h, w in got["image_grid_thw"])


def test_a_cut_prompt_is_named_by_its_first_80_characters(processors, caplog):
    """One rule for every cut prompt (the sampler's, the web app's, the trainer's): a warning
    with the token counts and the prompt's first 80 characters, never a whole long prompt, be it
    one 100,000-character word or thousands of words."""
    import logging

    from uniimage_jax.processing.prompts import prompt_name

    ours, _ = processors
    word = "x" * 100_000
    many = " ".join(["a red circle"] * 1000)
    with caplog.at_level(logging.WARNING, logger="uniimage_jax.prompts"):
        build_generation_inputs(ours, [word, many, "a red circle"], num_metaqueries=N)
    # (transformers' tokenizer may add its own once-per-process warning about the length)
    lines = [r.getMessage() for r in caplog.records if r.name == "uniimage_jax.prompts"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"prompt {'x' * 80!r} ... (1 word, 100000 characters): caption "
                               "cut from ")
    assert lines[1].startswith(f"prompt {many[:80]!r} ... (3000 words, 12999 characters): "
                               "caption cut from ")
    assert all("to 256 tokens to fit max_caption_tokens=256" in line and len(line) < 250
               for line in lines), lines
    assert prompt_name("a red  circle\n") == "prompt 'a red circle'"
