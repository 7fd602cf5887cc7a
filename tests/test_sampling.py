"""Sampling against the official procedure, and the `uniimage-sample` / `uniimage-understand` CLIs.

The tiny TBAC-UniImage of `tests/tbac_fixture.py` (built the official way in PyTorch, converted
with `uniimage-convert tbac`) samples the same latents as `OfficialTBAC.sample_latents` (the
official `sample_images` loop with diffusers' DPM-Solver++) from the same initial noise, with the
guidance rows built here in the official order: [negative, caption] for text, [(negative, black
image), (negative, image), (caption, image)] with an input image. Our sampler left-pads prompts
to a length bucket; the reference gets them unpadded.

The CLI tests check bitwise reproducibility (a prompt alone vs in a file; sample i for any
--num-images), the exact GenEval / DPG-Bench layouts, and the errors for bad input.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from tests.parity import assert_rel_close, rel_err
from tests.tbac_fixture import build_tiny_tbac
from uniimage_jax.cli import sample as sample_cli
from uniimage_jax.cli import understand
from uniimage_jax.checkpoints.loader import load_for_inference
from uniimage_jax.processing.prompts import build_generation_inputs
from uniimage_jax.sampling.sampler import (SamplingConfig, initial_noise, latents_to_uint8,
                                           sample_latents, sample_prompts_latents)

CAPTION = "a red cube on top of a blue sphere"
PROMPTS = ["a red cube", "two cats watch from the window", "a green cylinder",
           "the quick brown fox jumps over the lazy dog"]
CLI_STEPS = "6"  # and 2 images per prompt: the compilation of the parity test is reused


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tb = build_tiny_tbac(str(tmp_path_factory.mktemp("tbac")))
    model, params, processor = load_for_inference(tb["dst"], tb["processor"])
    return {**tb, "processor_dir": tb["processor"], "model": model, "params": params,
            "processor": processor}


def _input_image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (60, 70, 3), np.uint8))


def _official_latents(tiny, image, noise, *, steps, guidance, image_guidance):
    """OfficialTBAC.sample_latents with the guidance rows in the official order."""
    if image is None:
        captions, images, k = ["", CAPTION], None, 2
    else:
        black = Image.new("RGB", image.size)
        captions, images, k = ["", "", CAPTION], [[black], [image], [image]], 3
    c = tiny["model"].config
    enc = build_generation_inputs(tiny["processor"], captions, images,
                                  num_metaqueries=c.num_metaqueries)
    cond = {"input_ids": torch.from_numpy(enc["input_ids"]).long(),
            "attention_mask": torch.from_numpy(enc["attention_mask"]).long()}
    if images:
        cond.update(pixel_values=torch.from_numpy(enc["pixel_values"]),
                    grid=torch.tensor(enc["image_grid_thw"]))
    ids = tiny["ids"]
    token_ids = {"vision_start": ids["<|vision_start|>"], "vision_end": ids["<|vision_end|>"],
                 "image_token": ids["<|image_pad|>"]}
    out = tiny["torch"].sample_latents(cond, token_ids, torch.from_numpy(noise).permute(0, 3, 1, 2),
                                       num_steps=steps, guidance=guidance,
                                       image_guidance=image_guidance, k=k)
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_sampling_matches_official(tiny, with_image):
    image = _input_image() if with_image else None
    noise = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    cfg = SamplingConfig(num_steps=6, guidance_scale=4.0, image_guidance_scale=1.5)
    ours = sample_latents(tiny["model"], tiny["params"], tiny["processor"], CAPTION, image,
                          cfg=cfg, noise=jnp.asarray(noise))
    ref = _official_latents(tiny, image, noise, steps=6, guidance=4.0, image_guidance=1.5)
    err = assert_rel_close(ours, ref, 1e-4, f"latents ({'image' if with_image else 'text'})")
    print(f"sampled latents vs official, 6 steps: rel err {err:.2e}")
    # Guidance matters: without it the result is far from the guided one.
    unguided = sample_latents(tiny["model"], tiny["params"], tiny["processor"], CAPTION, image,
                              cfg=SamplingConfig(num_steps=6, guidance_scale=1.0,
                                                 image_guidance_scale=1.5),
                              noise=jnp.asarray(noise))
    assert rel_err(unguided, ref) > 1e-2
    if with_image:
        # Image guidance exactly 1 drops the black-image row: same as the official 3 rows.
        two_rows = sample_latents(tiny["model"], tiny["params"], tiny["processor"], CAPTION,
                                  image, cfg=SamplingConfig(num_steps=6, guidance_scale=4.0,
                                                            image_guidance_scale=1.0),
                                  noise=jnp.asarray(noise))
        ref_1 = _official_latents(tiny, image, noise, steps=6, guidance=4.0, image_guidance=1.0)
        assert_rel_close(two_rows, ref_1, 1e-4, "latents (image guidance 1, two rows)")
        # ... and that comparison can fail: the image guidance changes the result by far more
        # than the tolerance.
        assert rel_err(ref_1, ref) > 1e-3


def test_thirty_steps_match_official(tiny):
    noise = np.asarray(initial_noise(3, 2, (4, 4, 4)))
    cfg = SamplingConfig(num_steps=30, guidance_scale=7.5)
    ours = sample_latents(tiny["model"], tiny["params"], tiny["processor"], CAPTION,
                          num_images=2, seed=3, cfg=cfg)
    ref = _official_latents(tiny, None, noise, steps=30, guidance=7.5, image_guidance=1.5)
    err = assert_rel_close(ours, ref, 1e-4, "latents (30 steps)")
    print(f"sampled latents vs official, 30 steps: rel err {err:.2e}")


def test_sample_i_does_not_depend_on_num_images(tiny):
    cfg = SamplingConfig(num_steps=6, guidance_scale=4.0, images_per_call=2)
    args = (tiny["model"], tiny["params"], tiny["processor"], CAPTION)
    np.testing.assert_array_equal(initial_noise(5, 2, (4, 4, 4))[:1],
                                  initial_noise(5, 1, (4, 4, 4)))
    # Sample i is always denoised in group i // 2 at slot i % 2: bitwise the same for any count
    # (1 and 2 images share one group; 3 images run two, the last one filled up).
    one = np.asarray(sample_latents(*args, num_images=1, seed=5, cfg=cfg))
    two = np.asarray(sample_latents(*args, num_images=2, seed=5, cfg=cfg))
    three = np.asarray(sample_latents(*args, num_images=3, seed=5, cfg=cfg))
    assert one.shape[0] == 1 and two.shape[0] == 2 and three.shape[0] == 3
    np.testing.assert_array_equal(two[:1], one)
    np.testing.assert_array_equal(three[:2], two)
    assert rel_err(two[1], two[0]) > 0.1 and rel_err(three[2], three[1]) > 0.1  # samples differ
    # The third sample is the one the official loop draws from the same noise.
    ref = _official_latents(tiny, None, np.asarray(initial_noise(5, 3, (4, 4, 4))), steps=6,
                            guidance=4.0, image_guidance=1.5)
    assert_rel_close(three, ref, 1e-4, "three samples in groups of 2 vs official")
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_latents(*args, cfg=cfg, noise=jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"images_per_call must be >= 1 \(an integer\)"):
        SamplingConfig(images_per_call=0)


def test_prompts_per_call_is_batch_invariant_and_official(tiny):
    """Several prompts per compiled call: 3 prompts x 2 groups of 2 samples = 6 slots in calls of
    4 (the last one filled up). Each prompt's images are bitwise those it gets alone (then in a
    call of its own 2 groups and 2 fillers), and the official loop's from the same noise."""
    cfg = SamplingConfig(num_steps=6, guidance_scale=4.0, images_per_call=2, prompts_per_call=4)
    prompts = [PROMPTS[1], CAPTION, PROMPTS[3]]
    args = (tiny["model"], tiny["params"], tiny["processor"])
    together = [np.asarray(x) for x in sample_prompts_latents(*args, prompts, num_images=3,
                                                              seed=5, cfg=cfg)]
    assert [x.shape for x in together] == [(3, 4, 4, 4)] * 3
    for prompt, latents in zip(prompts, together):
        alone = np.asarray(sample_latents(*args, prompt, num_images=3, seed=5, cfg=cfg))
        np.testing.assert_array_equal(latents, alone)
    assert rel_err(together[0], together[1]) > 0.1  # the prompts really differ
    ref = _official_latents(tiny, None, np.asarray(initial_noise(5, 3, (4, 4, 4))), steps=6,
                            guidance=4.0, image_guidance=1.5)
    assert_rel_close(together[1], ref, 1e-4, "prompt 2 of 3 in calls of 4 groups vs official")
    with pytest.raises(ValueError, match=r"prompts_per_call must be >= 1 \(an integer\)"):
        SamplingConfig(prompts_per_call=0)


def test_batched_decoding_is_batch_invariant(tiny):
    """`latents_to_uint8` decodes fixed-size chunks: an image's pixels are the same bits in any
    place of a chunk and for any number of images; they are the official decoder's."""
    import jax

    model, params = tiny["model"], tiny["params"]
    latents = initial_noise(7, 5, (4, 4, 4))
    five = latents_to_uint8(model, params, latents, batch=4)      # chunks of 4: 4 + (1 + 3 fill)
    one = latents_to_uint8(model, params, latents[3:4], batch=4)  # alone, 3 fillers
    reordered = latents_to_uint8(model, params, latents[::-1], batch=4)[::-1]
    assert five.shape == (5, 16, 16, 3) and five.dtype == np.uint8
    np.testing.assert_array_equal(one[0], five[3])
    np.testing.assert_array_equal(reordered, five)
    assert not np.array_equal(five[0], five[1])
    with torch.no_grad():
        ref = tiny["torch"].vae.decode(torch.from_numpy(np.asarray(latents)).permute(0, 3, 1, 2)
                                       / 0.41407).sample.permute(0, 2, 3, 1).numpy()
    ours = np.asarray(jax.jit(model.decode_latents)(params, latents[:4]))
    assert_rel_close(ours, ref[:4], 1e-4, "batched decode vs diffusers")


def test_non_square_sampling_is_batch_invariant_and_official(tiny):
    """At 16 x 32 pixels (4 x 8 latents): sample i is bitwise the same for any count, and the
    latents are those the official loop gives from the same noise (SANA has no positional
    embedding, so a non-square latent needs nothing else)."""
    cfg = SamplingConfig(num_steps=6, guidance_scale=4.0, images_per_call=2)
    args = (tiny["model"], tiny["params"], tiny["processor"], CAPTION)
    one = np.asarray(sample_latents(*args, num_images=1, seed=5, cfg=cfg, height=16, width=32))
    three = np.asarray(sample_latents(*args, num_images=3, seed=5, cfg=cfg, height=16, width=32))
    assert one.shape == (1, 4, 8, 4) and three.shape == (3, 4, 8, 4)
    np.testing.assert_array_equal(three[:1], one)
    assert rel_err(three[1], three[0]) > 0.1
    ref = _official_latents(tiny, None, np.asarray(initial_noise(5, 3, (4, 8, 4))), steps=6,
                            guidance=4.0, image_guidance=1.5)
    assert_rel_close(three, ref, 1e-4, "16 x 32 latents vs official")
    with pytest.raises(ValueError, match="image size 16x30 .* multiples of 4"):
        sample_latents(*args, cfg=cfg, height=16, width=30)


def _cli(tiny, out, *extra):
    return sample_cli.main(["--checkpoint", tiny["dst"], "--processor", tiny["processor_dir"],
                            "--steps", CLI_STEPS, "--seed", "11", "--out", str(out), *extra])


def _png(path):
    return np.asarray(Image.open(path))


def _files(folder):
    """The files under `folder` (relative paths, sorted), without the run's manifest."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                  for f in fs if f != "manifest.json"
                  and not os.path.relpath(d, folder).startswith("manifest"))


def test_cli_image_is_the_same_alone_or_in_a_file(tiny, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    batch, alone = tmp_path / "batch", tmp_path / "alone"
    # 3 prompts per compiled call: the file runs [0, 1, 2] then [3 + fillers], the prompt alone
    # [2 + fillers]; its images are bitwise the same.
    assert _cli(tiny, batch, "--prompts-file", str(prompts_file), "--num-images", "2",
                "--prompts-per-call", "3") == 0
    assert _cli(tiny, alone, "--prompt", PROMPTS[2], "--num-images", "2",
                "--prompts-per-call", "3") == 0
    names = sorted(os.listdir(batch))
    assert names == sorted([f"{i:05d}_{j:02d}.png" for i in range(4) for j in range(2)]
                           + [f"{i:05d}_grid.png" for i in range(4)]
                           + ["settings.json", "manifest.json", "manifest"])
    for j in range(2):
        a, b = _png(batch / f"00002_{j:02d}.png"), _png(alone / f"00000_{j:02d}.png")
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_png(batch / "00002_00.png"), _png(batch / "00002_01.png"))
    assert not np.array_equal(_png(batch / "00001_00.png"), _png(batch / "00002_00.png"))
    settings = json.loads((batch / "settings.json").read_text())
    assert settings["checkpoint"] == os.path.abspath(tiny["dst"])
    assert settings["args"]["prompts_file"] == str(prompts_file)
    assert settings["args"]["seed"] == 11 and settings["sampling"]["num_steps"] == 6
    assert settings["sampling"]["prompts_per_call"] == 3
    assert settings["args"]["dtype"] == "float32"  # the default on this CPU backend
    assert settings["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert settings["scheduler"]["flow_shift"] == 3.0


def test_benchmark_layouts(tiny, tmp_path):
    from uniimage_jax.data.synthetic import prompts as synthetic_prompts

    items = synthetic_prompts(3)
    lines = [json.dumps(meta) for _, meta in items]
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("\n".join(lines) + "\n")
    geneval = tmp_path / "geneval"
    assert _cli(tiny, geneval, "--benchmark", "geneval", "--metadata", str(metadata)) == 0
    found = _files(geneval)
    expected = ["settings.json"] + [f"{i:05d}/{f}" for i in range(3) for f in
                                    ["grid.png", "metadata.jsonl"]
                                    + [f"samples/{j:04d}.png" for j in range(4)]]
    assert found == sorted(expected)
    for i, line in enumerate(lines):
        assert (geneval / f"{i:05d}" / "metadata.jsonl").read_text() == line + "\n"

    prompts_dir = tmp_path / "dpg_prompts"
    prompts_dir.mkdir()
    item_ids = ["partiprompts7", "countbench12", "whoops3"]
    for item_id, (caption, _) in zip(item_ids, items):
        (prompts_dir / f"{item_id}.txt").write_text(caption + "\n")
    (prompts_dir / "README.md").write_text("not a prompt")
    dpg = tmp_path / "dpg"
    assert _cli(tiny, dpg, "--benchmark", "dpg", "--prompts-dir", str(prompts_dir)) == 0
    assert _files(dpg) == sorted([f"{i}.png" for i in item_ids] + ["settings.json"])
    # Each DPG image is the 2x2 grid (no padding) of the same 4 samples GenEval got.
    for i, item_id in enumerate(item_ids):
        grid = _png(dpg / f"{item_id}.png")
        assert grid.shape == (32, 32, 3)
        for j in range(4):
            r, c = divmod(j, 2)
            np.testing.assert_array_equal(grid[16 * r:16 * r + 16, 16 * c:16 * c + 16],
                                          _png(geneval / f"{i:05d}" / "samples" / f"{j:04d}.png"))

    # --skip-existing resumes: nothing is rewritten.
    before = os.path.getmtime(dpg / f"{item_ids[0]}.png")
    assert _cli(tiny, dpg, "--benchmark", "dpg", "--prompts-dir", str(prompts_dir),
                "--skip-existing") == 0
    assert os.path.getmtime(dpg / f"{item_ids[0]}.png") == before

    # TIIF-Bench: one image per description, named by the prompt's line in its .jsonl file.
    tiif_dir = tmp_path / "tiif_prompts"
    tiif_dir.mkdir()
    records = [{"type": "2d_spatial_relation", "short_description": items[0][0],
                "long_description": items[1][0]},
               {"type": "2d_spatial_relation", "short_description": items[2][0],
                "long_description": "x"},
               {"type": "color", "short_description": "y", "long_description": items[2][0]}]
    (tiif_dir / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    (tiif_dir / "b.jsonl").write_text(json.dumps(records[2]) + "\n")
    tiif = tmp_path / "tiif"
    assert _cli(tiny, tiif, "--benchmark", "tiif", "--prompts-dir", str(tiif_dir),
                "--model-name", "ours") == 0
    found = _files(tiif)
    assert found == sorted(["settings.json"] + [
        f"2d_spatial_relation/ours/{kind}/{i}.png" for i in range(2)
        for kind in ("short_description", "long_description")] + [
        "color/ours/short_description/0.png", "color/ours/long_description/0.png"])
    # Sample 0 of a prompt is the same image in every layout.
    for path, i in (("2d_spatial_relation/ours/short_description/0.png", 0),
                    ("2d_spatial_relation/ours/long_description/0.png", 1),
                    ("color/ours/long_description/0.png", 2)):
        np.testing.assert_array_equal(_png(tiif / path),
                                      _png(geneval / f"{i:05d}" / "samples" / "0000.png"))


def test_cli_errors_name_the_problem(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    no_prompts = tmp_path / "no_prompts"
    no_prompts.mkdir()
    good = {"type": "color", "short_description": "a", "long_description": "b"}
    tiif_bad, tiif_clash = tmp_path / "tiif_bad", tmp_path / "tiif_clash"
    tiif_bad.mkdir()
    tiif_clash.mkdir()
    (tiif_bad / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(
        {"type": "color", "short_description": "a"}) + "\n")
    for name in ("one.jsonl", "two.jsonl"):   # the same type in two files: line 0 twice
        (tiif_clash / name).write_text(json.dumps(good) + "\n")
    cases = [
        (["--prompt", "x", "--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--prompts-file", str(empty)], "has no prompts"),
        (["--prompts-file", str(tmp_path / "absent.txt")], "absent.txt"),
        (["--prompt", "x", "--prompts-file", str(empty)], "exactly one of --prompt"),
        ([], "exactly one of --prompt"),
        (["--benchmark", "geneval"], "needs --metadata"),
        (["--benchmark", "dpg", "--prompts-dir", str(tmp_path), "--num-images", "3"],
         "must be 4"),
        (["--benchmark", "dpg", "--prompts-dir", str(no_prompts)], "no .txt prompt files"),
        (["--benchmark", "dpg", "--prompts-dir", str(tmp_path)], "empty.txt' is empty"),
        (["--prompt", "x", "--num-images", "0"], "--num-images"),
        (["--prompt", "x", "--images-per-call", "0"], "--images-per-call"),
        (["--prompt", "x", "--prompts-per-call", "0"], "--prompts-per-call must be >= 1"),
        (["--benchmark", "tiif"], "needs --prompts-dir"),
        (["--benchmark", "tiif", "--prompts-dir", str(no_prompts)], "no .jsonl prompts"),
        (["--benchmark", "tiif", "--prompts-dir", str(tiif_bad), "--num-images", "4"],
         "must be 1"),
        (["--benchmark", "tiif", "--prompts-dir", str(tiif_bad)],
         "bad.jsonl:2 has no \"long_description\""),
        (["--benchmark", "tiif", "--prompts-dir", str(tiif_clash)], "both map to"),
        (["--prompt", "x", "--mesh", "rows=2"], "expected 'auto' or AXIS=SIZE"),
        (["--prompt", "x", "--mesh", "data=3"], "--mesh data=3: mesh {'data': 3} has 3 devices"),
    ]
    for extra, needle in cases:
        assert _cli(tiny, tmp_path / "never", *extra) == 2, extra
        assert needle in capsys.readouterr().err, extra
    assert sample_cli.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x",
                            "--out", str(tmp_path / "never")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_understand_cli_with_a_tbac_checkpoint(tiny, tmp_path, capsys):
    """The frozen MLLM inside the converted TBAC checkpoint answers as transformers' generate
    does with the same weights (the official table minus the metaquery rows, lm_head tied)."""
    from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwen

    from uniimage_jax.processing.qwen import load_processor
    from uniimage_jax.processing.tiny import tiny_qwen_hf_config
    from uniimage_jax.sampling.text_generation import default_eos_token_ids
    from tests.tbac_fixture import MLLM_LAYERS

    official = tiny["torch"].mllm
    hf = TorchQwen(tiny_qwen_hf_config(num_hidden_layers=MLLM_LAYERS,
                                       tie_word_embeddings=True)).eval()
    state = {k: v for k, v in official.state_dict().items()}
    vocab = hf.config.text_config.vocab_size
    table = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[table] = state[table][:vocab]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()

    question = "What is in this picture? Describe the image."
    image_path = tmp_path / "x.png"
    _input_image().save(image_path)
    proc = load_processor(tiny["processor_dir"])
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
    enc = proc(text=[text], images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    eos = default_eos_token_ids(proc.tokenizer)
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                          pad_token_id=proc.tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
    expected = proc.tokenizer.decode(new, skip_special_tokens=True).strip()

    capsys.readouterr()
    assert understand.main(["--checkpoint", tiny["dst"], "--processor", tiny["processor_dir"],
                            "--image", str(image_path), "--question", question,
                            "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == expected and printed
