"""Text generation against transformers' `generate` on a tiny random Qwen2.5-VL, and the
`uniimage-understand` CLI end to end.

The tiny model is built in PyTorch with random weights re-drawn at a large scale (so greedy output
is a varied token sequence, not one repeated token), saved with `save_pretrained`, converted with
our converter, and both sides generate from the same processor output.
"""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_assets
from uniimage_jax.processing.qwen import encode_chat, load_processor
from uniimage_jax.sampling.text_generation import answer, default_eos_token_ids, generate_tokens

MAX_NEW = 20
QUESTIONS = ["What is in this picture? Describe the image.", "How many?"]


def _randomize(model: "torch.nn.Module", seed: int) -> None:
    """Re-draw every parameter so logits have a wide spread (HF's 0.02-std init gives nearly flat
    logits and a repeated greedy token): matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm weights ~ 1 + N(0, 0.2), biases ~ N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name or "ln_q" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))


def _build(tmp_path_factory, name, seed, **config_kw):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from uniimage_jax.convert.qwen2_5_vl import convert_qwen
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as FlaxQwen

    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(tiny_assets.tiny_qwen_hf_config(**config_kw)).eval()
    _randomize(hf, seed)
    src = tmp_path_factory.mktemp(f"{name}_hf")
    hf.save_pretrained(src)
    config, params = convert_qwen(str(src))
    return hf, src, FlaxQwen(config), params


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = tiny_assets.make_tiny_processor_dir(str(tmp_path_factory.mktemp("processor")))
    return path, load_processor(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Untied lm_head (like the other Qwen2.5-VL sizes)."""
    return _build(tmp_path_factory, "untied", 0)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    """Tied embeddings (like Qwen2.5-VL-3B)."""
    return _build(tmp_path_factory, "tied", 1, tie_word_embeddings=True)


def _images():
    rng = np.random.default_rng(0)
    return [[Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8))],
            [Image.fromarray(rng.integers(0, 256, (112, 100, 3), np.uint8))]]


def _hf_generate(hf, processor, images, eos, pad, max_new=MAX_NEW):
    """transformers' greedy generate on the same prompts; (B, max_new) padded with `pad`."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * (len(im) if im else 0)
          + [{"type": "text", "text": q}]}], add_generation_prompt=True)
        for q, im in zip(QUESTIONS, images or [None] * len(QUESTIONS))]
    kw = {"images": [i for row in images for i in row or []]} if images else {}
    enc = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kw)
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                          pad_token_id=pad)
    new = out[:, enc["input_ids"].shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad), enc


@pytest.mark.parametrize("with_images, query_block", [(False, None), (True, None), (True, 16)],
                         ids=["text", "image", "image-in-causal-blocks-of-16"])
def test_greedy_matches_transformers_generate(tiny, processor, with_images, query_block,
                                              monkeypatch):
    """`query_block`: the prefill's queries attend in causal blocks of this many (several, a
    short last one) instead of one block of the whole prompt. End to end only (blocks out of
    order fail it; the tokens would not see a block shown one key too few, which the hidden
    states against transformers in test_qwen2_5_vl do)."""
    from uniimage_jax.models import qwen2_5_vl

    if query_block:
        monkeypatch.setattr(qwen2_5_vl, "CAUSAL_QUERY_BLOCK", query_block)
        jax.clear_caches()  # the compiled loop of the default block size would be reused
    hf, _, model, params = tiny
    _, proc = processor
    images = _images() if with_images else None
    eos = default_eos_token_ids(proc.tokenizer)  # <|im_end|>, <|endoftext|>
    pad = proc.tokenizer.pad_token_id
    assert sorted(eos) == sorted([tiny_assets.tiny_token_ids()[t]
                                  for t in ("<|im_end|>", "<|endoftext|>")])
    expected, enc = _hf_generate(hf, proc, images, eos, pad)
    inputs = encode_chat(proc, QUESTIONS, images)
    # the prompts really are left-padded to different lengths
    assert (inputs["attention_mask"].sum(1)[0] != inputs["attention_mask"].sum(1)[1])
    np.testing.assert_array_equal(inputs["input_ids"], enc["input_ids"].numpy())
    if query_block:
        blocks = qwen2_5_vl.causal_query_blocks(inputs["input_ids"].shape[1], 0, 10 ** 6)
        assert len(blocks) >= 3 and blocks[-1][1] - blocks[-1][0] < query_block, blocks
    try:
        got = generate_tokens(model, params, inputs, max_new_tokens=MAX_NEW, eos_token_ids=eos,
                              pad_token_id=pad)
    finally:
        if query_block:   # no later test may reuse the loop compiled with small blocks
            jax.clear_caches()
    # the test can fail: the generated text is varied and runs the full length
    assert len(set(expected[0].tolist())) >= 5 and not np.isin(expected, eos).any()
    np.testing.assert_array_equal(got, expected)


def test_encode_chat_output_gives_transformers_our_positions_and_logits(tiny, processor):
    """encode_chat keeps the processor's mm_token_type_ids: fed as is to transformers' model,
    the M-RoPE positions and logits are ours (without the key transformers falls back to 1-D
    positions, which this checks too, so the comparison can fail)."""
    from tests.parity import assert_rel_close, rel_err
    from uniimage_jax.models.qwen2_5_vl import get_rope_index

    hf, _, model, params = tiny
    _, proc = processor
    images = _images()
    inputs = encode_chat(proc, QUESTIONS, images)
    _, enc = _hf_generate(hf, proc, images, [0], 0, max_new=1)  # the processor's own output
    np.testing.assert_array_equal(inputs["mm_token_type_ids"], enc["mm_token_type_ids"].numpy())
    assert inputs["mm_token_type_ids"].any()
    ids, mask, grid = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    torch_inputs = {k: torch.as_tensor(np.asarray(v)).long() if k != "pixel_values"
                    else torch.from_numpy(v) for k, v in inputs.items()}
    hf_pos, _ = hf.model.get_rope_index(
        input_ids=torch_inputs["input_ids"], mm_token_type_ids=torch_inputs["mm_token_type_ids"],
        image_grid_thw=torch_inputs["image_grid_thw"],
        attention_mask=torch_inputs["attention_mask"])
    pos, _ = get_rope_index(model.config, ids, grid, mask)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos.numpy()[:, valid])
    assert (pos[1:, valid] != pos[0, valid]).any()  # real 3-D positions on the image tokens

    ours = np.asarray(model.apply({"params": params}, ids, mask, pos,
                                  pixel_values=inputs["pixel_values"], image_grid_thw=grid).logits)
    with torch.no_grad():
        theirs = hf(**torch_inputs).logits.numpy()
        without = hf(**{k: v for k, v in torch_inputs.items()
                        if k != "mm_token_type_ids"}).logits.numpy()
    assert_rel_close(ours[valid], theirs[valid], 1e-4, "logits")
    assert rel_err(ours[valid], without[valid]) > 1e-2


def test_follow_up_question_matches_transformers_generate(tiny, processor):
    """A second turn: the conversation written as Qwen2.5-VL's documented messages (the image in
    the first user turn, the earlier answer as an assistant turn) gives transformers the same
    prompt as `encode_chat(..., histories=...)`, and greedy generation the same tokens."""
    hf, _, model, params = tiny
    _, proc = processor
    images = _images()[:1]
    earlier = ("What is in this picture?", "a red square and a blue circle")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": earlier[0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": earlier[1]}]},
                {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<|im_start|>user") == 2 and earlier[1] in text
    enc = proc(text=[text], images=images[0], return_tensors="pt")
    eos, pad = default_eos_token_ids(proc.tokenizer), proc.tokenizer.pad_token_id
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                          pad_token_id=pad)
    expected = out[:, enc["input_ids"].shape[1]:].numpy()
    expected = np.pad(expected, ((0, 0), (0, MAX_NEW - expected.shape[1])), constant_values=pad)
    inputs = encode_chat(proc, [QUESTIONS[1]], images, histories=[[earlier]])
    np.testing.assert_array_equal(inputs["input_ids"], enc["input_ids"].numpy())
    got = generate_tokens(model, params, inputs, max_new_tokens=MAX_NEW, eos_token_ids=eos,
                   pad_token_id=pad)
    np.testing.assert_array_equal(got, expected)
    # ... and the earlier turn matters: without it the prompt is another one.
    alone = encode_chat(proc, [QUESTIONS[1]], images)
    assert alone["input_ids"].shape != inputs["input_ids"].shape


def test_greedy_stops_and_pads_after_eos_like_transformers(tiny_tied, processor):
    """Tied embeddings; several EOS ids; rows stop at different steps and are padded. The batch
    mixes a row with two images and a text-only row."""
    hf, _, model, params = tiny_tied
    _, proc = processor
    images = [_images()[1] + _images()[0], None]
    pad = tiny_assets.tiny_token_ids()["<|endoftext|>"]
    free, _ = _hf_generate(hf, proc, images, [pad], pad)
    # pick EOS ids among the tokens greedy decoding produces: row 0 stops early at step 6,
    # row 1 at its own first occurrence of another token (or runs to the end).
    eos = [int(free[0, 6]), int(free[1, 12])]
    expected, _ = _hf_generate(hf, proc, images, eos, pad)
    assert (expected == pad).any(), "no row stopped early: the EOS path is not exercised"
    inputs = encode_chat(proc, QUESTIONS, images)
    got = generate_tokens(model, params, inputs, max_new_tokens=MAX_NEW, eos_token_ids=eos,
                   pad_token_id=pad)
    np.testing.assert_array_equal(got, expected)


def test_sampling_is_deterministic_per_key_and_varies_across_keys(tiny, processor):
    _, _, model, params = tiny
    _, proc = processor
    inputs = encode_chat(proc, QUESTIONS)
    ids = tiny_assets.tiny_token_ids()
    kw = dict(max_new_tokens=MAX_NEW, eos_token_ids=default_eos_token_ids(proc.tokenizer),
              pad_token_id=ids["<|endoftext|>"], temperature=1.0, top_p=0.9)
    a = generate_tokens(model, params, inputs, rng=jax.random.PRNGKey(1), **kw)
    b = generate_tokens(model, params, inputs, rng=jax.random.PRNGKey(1), **kw)
    c = generate_tokens(model, params, inputs, rng=jax.random.PRNGKey(2), **kw)
    greedy = generate_tokens(model, params, inputs, max_new_tokens=MAX_NEW,
                      eos_token_ids=kw["eos_token_ids"],
                      pad_token_id=kw["pad_token_id"])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    # a nucleus this small keeps only the most likely token: sampling becomes greedy
    tiny_p = generate_tokens(model, params, inputs, rng=jax.random.PRNGKey(3),
                      **{**kw, "top_p": 1e-6})
    np.testing.assert_array_equal(tiny_p, greedy)


def test_top_p_filter_matches_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    from uniimage_jax.sampling.text_generation import _top_p_filter

    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    for p in (0.3, 0.8, 0.95):
        expected = TopPLogitsWarper(p)(None, torch.from_numpy(logits)).numpy()
        got = np.asarray(_top_p_filter(jax.numpy.asarray(logits), p))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))


def test_answer_and_bad_inputs(tiny, processor):
    _, _, model, params = tiny
    _, proc = processor
    texts = answer(model, params, proc, _images(), QUESTIONS, max_new_tokens=MAX_NEW)
    tokens = generate_tokens(model, params, encode_chat(proc, QUESTIONS, _images()),
                      max_new_tokens=MAX_NEW, eos_token_ids=default_eos_token_ids(proc.tokenizer),
                      pad_token_id=proc.tokenizer.pad_token_id)
    assert texts == [proc.tokenizer.decode(r, skip_special_tokens=True).strip() for r in tokens]
    assert all(texts)
    inputs = encode_chat(proc, QUESTIONS)
    with pytest.raises(ValueError, match="PRNG key"):
        generate_tokens(model, params, inputs, max_new_tokens=4, eos_token_ids=[0], pad_token_id=0,
                 temperature=0.7)
    right = encode_chat(proc, QUESTIONS, padding_side="right")
    with pytest.raises(ValueError, match="left-padded"):
        generate_tokens(model, params, right, max_new_tokens=4, eos_token_ids=[0], pad_token_id=0)


def test_understand_cli_end_to_end(tiny, processor, tmp_path, capsys):
    from uniimage_jax.cli import understand
    from uniimage_jax.cli.convert import main as convert_main

    hf, src, model, params = tiny
    proc_dir, proc = processor
    ckpt = tmp_path / "mllm"
    assert convert_main(["mllm", "--src", str(src), "--dst", str(ckpt)]) == 0
    image = tmp_path / "x.png"
    _images()[0][0].save(image)
    capsys.readouterr()
    rc = understand.main(["--checkpoint", str(ckpt), "--processor", proc_dir, "--image",
                          str(image), "--question", QUESTIONS[0], "--max-new-tokens", "12"])
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    expected = answer(model, params, proc, [[Image.open(image).convert("RGB")]], [QUESTIONS[0]],
                      max_new_tokens=12)[0]
    assert printed == expected and printed

    assert understand.main(["--checkpoint", str(ckpt), "--processor", proc_dir, "--image",
                            str(tmp_path / "missing.png"), "--question", "q"]) != 0
    assert "missing.png" in capsys.readouterr().err
    assert understand.main(["--checkpoint", str(tmp_path / "nope"), "--processor", proc_dir,
                            "--question", "q"]) != 0
    assert "nope" in capsys.readouterr().err
    # Batch mode's input is checked before anything loads.
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "a?"}\n{"image": "x.png"}\n')
    base = ["--checkpoint", str(ckpt), "--processor", proc_dir]
    for argv, needle in (
            (["--question", "q", "--questions", str(questions)], "exactly one of --question"),
            (["--questions", str(questions)], "--questions and --out go together"),
            (["--questions", str(questions), "--out", str(tmp_path / "a.jsonl")],
             'q.jsonl:2 has no "question"')):
        assert understand.main(base + argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
    questions.write_text('{"question": "a?", "image": "missing.png"}\n')
    assert understand.main(base + ["--questions", str(questions), "--out",
                                   str(tmp_path / "a.jsonl")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_tiny_assets_load_offline_like_qwen(processor, tmp_path):
    from uniimage_jax.processing.qwen import load_tokenizer

    path, proc = processor
    tok = load_tokenizer(path)
    ids = tiny_assets.tiny_token_ids()
    assert len(tok) == len(proc.tokenizer) == 377 and len(tok) % 8
    assert tok.convert_tokens_to_ids(list(ids)) == list(ids.values())
    assert proc.image_token_id == ids["<|image_pad|>"]
    assert tiny_assets.tiny_qwen_hf_config().image_token_id == ids["<|image_pad|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_processor(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        load_processor(str(tmp_path))


def test_caption_loss_matches_transformers_labels_loss(tiny_tied, processor):
    """The 'caption' training objective equals transformers' loss with `labels` = the answer
    tokens (-100 elsewhere), on a left-padded batch of two images and captions of different
    lengths; and it is the answer tokens that count."""
    from uniimage_jax.processing.qwen import chat_messages
    from uniimage_jax.train.captioning import build_caption_inputs, caption_loss

    hf, _, model, params = tiny_tied
    _, proc = processor
    images = [_images()[0][0], _images()[0][0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    captions = ["a photo of three red circles", "a photo of a blue square that is yellow"]
    batch, grid = build_caption_inputs(proc, model.config, images, captions, pad_to=None)
    assert batch["attention_mask"][0, 0] == 0  # the shorter caption is really left-padded
    prompt = proc.apply_chat_template(chat_messages("Describe the image.", 1),
                                      add_generation_prompt=True)
    enc = proc(text=[prompt + c + "<|im_end|>" for c in captions], images=images, padding=True,
               padding_side="left", return_tensors="pt")
    np.testing.assert_array_equal(batch["input_ids"], enc["input_ids"].numpy())
    labels = enc["input_ids"].clone()
    labels[torch.from_numpy(batch["loss_mask"]) == 0] = -100
    n_answer = [len(proc.tokenizer(c + "<|im_end|>")["input_ids"]) for c in captions]
    assert batch["loss_mask"].sum(1).tolist() == n_answer
    with torch.no_grad():
        expected = float(hf(**enc, labels=labels).loss)

    def ours(b):
        b = dict(b, pixel_values=b["pixel_values"].reshape(-1, b["pixel_values"].shape[-1]),
                 image_grid_thw=grid)
        return float(caption_loss(model, params, b))

    got = ours(batch)
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)
    # Padding to a fixed length changes nothing; labelling the whole prompt changes the loss.
    padded, _ = build_caption_inputs(proc, model.config, images, captions,
                                     pad_to=batch["input_ids"].shape[1] + 7)
    assert abs(ours(padded) - expected) <= 1e-5 * abs(expected)
    everything = dict(batch, loss_mask=batch["attention_mask"].astype(np.float32))
    assert abs(ours(everything) - expected) > 1e-2 * abs(expected)
