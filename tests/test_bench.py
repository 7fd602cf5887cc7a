"""`uniimage-bench`: the analytic FLOP counter against a count written out by hand for a tiny
config (every matmul listed below, not computed with the counter's helpers), an end-to-end run
of the `micro` preset whose last stdout line must be the JSON report with positive throughputs
(like-for-like and recipe), and the two JAX variants' inputs and samplers. Speed ratios are not
asserted (they depend on the machine and its load)."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from uniimage_jax.bench import bench_models, flops
from uniimage_jax.models.dc_ae import DCAEConfig
from tests.xla_env import with_devices


def _tiny_config():
    # micro preset with a 3-layer MLLM: ladder 'official' for 2 DiT blocks reads hidden states
    # [-3:-1] = indices 1, 2, so only decoder layers 0 and 1 are needed.
    c = bench_models.build(bench_models.PRESETS["micro"]).config
    return dataclasses.replace(c, mllm=dataclasses.replace(c.mllm, num_hidden_layers=3))


def test_train_flops_match_a_hand_count():
    c = _tiny_config()
    assert c.ladder_indices == (1, 2)
    # MLLM: D 32, 2 heads x 16, 1 KV head, MLP 48. Per layer and token:
    # q 32*32 + k 32*16 + v 32*16 + o 32*32 + gate/up/down 3*32*48 = 7680 weights.
    # Prompt: T 16 = 10 prompt tokens + 4 queries + 2 suffix; 2 layers needed.
    prompt = 2 * (2 * 7680 * 10 + 4 * (10 * 11 // 2) * 16 * 2)       # fwd; causal pairs 55
    queries = 2 * (2 * (2 * 7680 * 4) + 3 * 4 * (4 * 10 + 10) * 16 * 2)  # 4NT; pairs 4*10+10
    connector = 6 * (32 * 24 + 24 * 24) * (2 * 4)                     # 2 ladder contexts x 4
    # SANA: width 16 (2 heads x 8), cross 2 x 8, caption 24, FFN hidden 40, 12 channels,
    # 4x4 latents (16 tokens), 4 context tokens, 2 blocks.
    block = (4 * 2 * 16 * 16 * 16                 # self-attention q, k, v, out
             + 2 * 2 * (2 * 16 * 8 * 9)            # linear attention: 2 heads, K^T V and (.) Q, d+1
             + 2 * (2 * 16 * 16 * 16)              # cross q, out
             + 2 * (2 * 4 * 16 * 16)               # cross k, v over the 4 context tokens
             + 4 * 16 * 4 * 8 * 2                  # cross softmax core
             + 2 * 16 * 16 * 80                    # 1x1 conv to 2 x 40
             + 2 * 16 * 9 * 80                     # 3x3 depthwise over 80 channels
             + 2 * 16 * 40 * 16)                   # 1x1 conv back to 16
    dit_fwd = (2 * 16 * 12 * 16                   # patch_embed
               + 2 * (256 * 16 + 16 * 16 + 16 * 96)  # time embedding
               + 2 * 4 * 2 * (24 * 16 + 16 * 16)     # caption_projection, per block context
               + 2 * block
               + 2 * 16 * 16 * 12)                # proj_out
    got = flops.train_flops_per_sample(c, prompt_tokens=16)
    assert got["vae_encode"] == 0                 # pixel autoencoder
    assert got["mllm_prompt"] == prompt
    assert got["mllm_queries"] == queries
    assert got["connector"] == connector
    assert got["dit"] == got["dit_only"] == 3 * dit_fwd
    assert got["total"] == prompt + queries + connector + 3 * dit_fwd

    s = flops.sample_flops(c, 16, num_steps=30, num_images=3)
    mllm_full = 2 * (2 * 7680 * 16 + 4 * (16 * 17 // 2) * 16 * 2)
    cond = 2 * (mllm_full + 2 * (32 * 24 + 24 * 24) * 8)      # 2 guidance rows
    assert s["conditioning"] == cond
    assert s["denoise"] == 30 * 2 * 3 * dit_fwd
    assert s["per_image"] == (cond + 30 * 6 * dit_fwd) / 3


def test_dc_ae_encode_flops_match_a_hand_count():
    vae = DCAEConfig.from_diffusers({**bench_models._tiny_dc_ae((8, 16), 4), "attention_head_dim": 8})
    hand = (2 * 64 * 9 * 3 * 8                    # conv_in 3x3, 8x8 pixels
            + 2 * (2 * 64 * 9 * 8 * 8)            # ResBlock: two 3x3 convs
            + 2 * 16 * 9 * 8 * 16                 # stride-2 3x3 conv to 4x4
            + 3 * 2 * 16 * 16 * 16                # EfficientViT: q, k, v
            + 2 * 16 * 25 * 48                    # 5x5 depthwise over 3 x 16 channels
            + 2 * 16 * 48 * 8                     # grouped 1x1 (6 groups of 8)
            + 4 * 2 * (2 * 16 * 8 * 9)            # linear attention, 2 + 2 multiscale heads
            + 2 * 16 * 32 * 16                    # to_out
            + 2 * 16 * 16 * 128 + 2 * 16 * 9 * 128 + 2 * 16 * 64 * 16  # GLUMBConv (expand 4)
            + 2 * 16 * 9 * 16 * 4)                # conv_out to 4 latent channels
    assert flops.dc_ae_encode(vae, 8) == hand


def test_peak_table_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("TPU v4") == 275e12
    assert flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("TPU v5p") == 459e12
    assert flops.peak_flops("TPU v6 lite") == 918e12
    assert flops.peak_flops("cpu") is None
    assert flops.mfu(1e12, None) is None
    assert flops.mfu(494.5e12, 989e12) == 0.5


def test_micro_benchmark_runs_end_to_end():
    env = dict(os.environ)   # XLA_FLAGS: the suite's cheap compiles (tests/xla_env.py)
    proc = subprocess.run([sys.executable, "-m", "uniimage_jax.cli.bench", "--preset", "micro",
                           "--steps", "1", "--sample-batch", "1", "--sample-repeats", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    report = lines[-1]
    for key in ("preset", "device", "torch_train_samples_per_s",
                "jax_train_samples_per_s_like_for_like", "jax_train_samples_per_s_recipe",
                "train_speedup_like_for_like", "train_speedup_recipe",
                "torch_sample_images_per_s", "jax_sample_images_per_s_like_for_like",
                "jax_sample_images_per_s_recipe", "sample_speedup_like_for_like",
                "sample_speedup_recipe", "train_tflops_per_sample",
                "train_tflops_per_sample_recipe", "mfu", "mfu_recipe", "jax_train_compile_s",
                "jax_sample_compile_s", "train_tflops_per_sample_by_part", "memory"):
        assert key in report, key
    assert report["preset"] == "micro" and report["device"] == "cpu"
    for key in ("torch_train_samples_per_s", "jax_train_samples_per_s_like_for_like",
                "jax_train_samples_per_s_recipe", "torch_sample_images_per_s",
                "jax_sample_images_per_s_like_for_like", "jax_sample_images_per_s_recipe",
                "train_speedup_like_for_like", "train_speedup_recipe",
                "sample_speedup_like_for_like", "sample_speedup_recipe",
                "train_tflops_per_sample"):
        assert report[key] > 0, key
    assert report["jax_train_compile_s"]["like_for_like"] > 0
    assert report["jax_train_compile_s"]["recipe"] > 0
    assert report["mfu"] is None                  # no known peak for a CPU
    assert report["train_loss_finite"]
    c = bench_models.build(bench_models.PRESETS["micro"]).config
    assert report["train_tflops_per_sample"] == flops.train_flops_per_sample(c, 16)["total"] / 1e12
    assert report["train_tflops_per_sample_recipe"] == (
        flops.train_flops_per_sample(c, 12)["total"] / 1e12)   # pixel AE: no encode to drop
    # Every ratio is also a JSON line of its own, before the report, equal to the report's.
    speedups = {(r["what"], r["variant"], r["batch"]): r["speedup"] for r in lines[:-1]
                if r["measure"] == "speedup"}
    assert speedups == {(w, v, n): speedups[w, v, n] for w, v, n in (
        ("train", "like_for_like", 2), ("train", "recipe", 2), ("sample", "like_for_like", 1),
        ("sample", "recipe", 1))}
    assert speedups["train", "recipe", 2] == report["train_speedup_recipe"]
    assert speedups["sample", "like_for_like", 1] == report["sample_speedup_like_for_like"]


def test_train_inputs_of_the_two_variants():
    """Like-for-like: the fixed prompt length and the images (encoded in the step); recipe: the
    recipe's prompt bucket and the latents of the same images, encoded once."""
    import jax
    import numpy as np

    from uniimage_jax.bench import run
    from uniimage_jax.models.uniimage import UniImage

    built = bench_models.build(bench_models.PRESETS["micro"])
    c = built.config
    model = UniImage(c)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    target = np.random.default_rng(0).uniform(-1, 1, (2, c.image_size, c.image_size, 3)
                                              ).astype(np.float32)
    same = run.train_inputs(model, built, "like_for_like", target, params)
    recipe = run.train_inputs(model, built, "recipe", target, params)
    assert same["input_ids"].shape == (2, 16) and "latents" not in same
    np.testing.assert_array_equal(same["target"], target)
    assert recipe["input_ids"].shape == (2, 12) and "target" not in recipe
    assert recipe["position_ids"].shape[-1] == 12
    np.testing.assert_allclose(recipe["latents"], model.encode_images(params, target),
                               rtol=1e-6, atol=1e-6)


def test_like_for_like_and_recipe_samplers_compute_the_same_images():
    """The step-by-step sampler (context keys and values recomputed at every step, as torch
    does) and the sampler's fused loop (computed once) are the same arithmetic up to rounding:
    their 8-bit images agree within one level."""
    import jax
    import numpy as np

    from uniimage_jax.bench import run
    from uniimage_jax.models.uniimage import UniImage

    built = bench_models.build(bench_models.PRESETS["micro"])
    c = built.config
    model = UniImage(c)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    rows = run.sample_rows(built)
    noise = jax.random.normal(jax.random.PRNGKey(3), (2, c.latent_size, c.latent_size,
                                                      c.dit.in_channels))
    stepwise = run.stepwise_sampler(model)(params, rows, noise)
    fused = run.recipe_sampler(model)(params, rows, noise)
    assert stepwise.shape == fused.shape == (2, c.image_size, c.image_size, 3)
    assert stepwise.dtype == np.uint8
    diff = np.abs(stepwise.astype(int) - fused.astype(int))
    assert diff.max() <= 1, diff.max()
    assert np.unique(fused).size > 10          # not a blank image


def test_bad_arguments_fail_clearly(capsys):
    from uniimage_jax.cli.bench import main

    assert main(["--preset", "micro", "--batch", "0"]) == 2
    assert "batch must be >= 1" in capsys.readouterr().err


# What the GPU image lacks: the JAX side of the benchmark must not import any of these.
ABSENT_ON_GPU_IMAGE = ("diffusers", "grain", "ml_collections", "tensorflow_datasets", "tensorflow")


def test_no_reference_streams_json_lines_without_packages_the_gpu_image_lacks():
    """`--no-reference` on the micro preset with those packages made unimportable: every
    measurement is a JSON line printed as it is taken, then the report. On 2 (virtual) devices
    the sampling of `uniimage-sample` over all of them is timed too (as on a multi-GPU host)."""
    blocker = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU_IMAGE!r}:
            raise ImportError(f"{{name}} is not on the GPU image")
sys.meta_path.insert(0, Absent())
sys.argv = ["uniimage-bench", "--preset", "micro", "--no-reference", "--steps", "1",
            "--sample-batch", "2", "--sample-repeats", "1"]
runpy.run_module("uniimage_jax.cli.bench", run_name="__main__")
"""
    env = dict(os.environ, XLA_FLAGS=with_devices(2))
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    measured = [(r["side"], r["measure"], r["variant"], r["batch"]) for r in lines[:-1]]
    # The recipe first: on a device where the like-for-like step runs out of memory, its
    # figures are out before.
    assert measured == [("jax", "train", "recipe", 2), ("jax", "train", "like_for_like", 2),
                        ("jax", "sample", "recipe", 1), ("jax", "sample", "like_for_like", 1),
                        ("jax", "sample", "recipe", 2), ("jax", "sample", "like_for_like", 2),
                        ("jax", "sample_all_devices", "recipe", 4)]
    for r in lines[:-1]:
        assert r["seconds"] > 0 and r["preset"] == "micro"
    report = lines[-1]
    everywhere = report["sample_all_devices"]
    assert everywhere["devices"] == 2 and everywhere["images"] == 4
    assert everywhere["images_per_s"] == pytest.approx(4 / lines[-2]["seconds"])
    assert everywhere["images_per_s_per_device"] == pytest.approx(everywhere["images_per_s"] / 2)
    assert report["reference"] is False and report["torch_train_samples_per_s"] is None
    assert report["train_speedup_like_for_like"] is None
    assert report["sample_speedup_recipe"] is None
    assert report["jax_train_samples_per_s_recipe"] == lines[0]["samples_per_s"] > 0


def test_data_benchmark_times_the_input_side_without_a_model(capsys):
    """`uniimage-bench --data`: the pipeline + prepare_batch over generated JPEGs (ti2i exercises
    the image processor as well); no parameter is made. Figures are printed, never asserted."""
    from uniimage_jax.cli.bench import main

    assert main(["--data", "--preset", "tiny", "--task", "ti2i", "--batch", "2", "--steps", "2"]
                ) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mode"] == "data" and report["task"] == "ti2i" and report["batch"] == 2
    assert report["samples_per_s"] > 0 and report["mean_prompt_tokens"] > 0
    assert main(["--data", "--preset", "tiny", "--task", "sample"]) == 2
    assert "--task t2i or ti2i" in capsys.readouterr().err
    assert main(["--data", "--preset", "small", "--task", "t2i"]) == 2
    # a generated set of a published layout (WebDataset shards): start-up timed cold and cached
    assert main(["--data", "--preset", "tiny", "--task", "t2i", "--batch", "2", "--steps", "1",
                 "--data-layout", "wds", "--shards", "3", "--samples-per-shard", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["layout"] == "wds" and report["samples"] == 6 and report["shards"] == 3
    for start in (report["first_batch_cold"], report["first_batch_cached"]):
        assert set(start) == {"source_s", "order_s", "batch_s", "total_s"}
    assert report["peak_rss_bytes"] > 0 and report["rss_bytes"] > 0
    assert main(["--data", "--preset", "tiny", "--task", "t2i", "--gcs-emulator"]) == 2
    assert "--gcs-emulator reads a set of a published layout" in capsys.readouterr().err


def test_an_out_of_memory_variant_is_reported_and_the_rest_measured(monkeypatch):
    """On a GPU the like-for-like step (backward through the whole prompt) may not fit: its line
    says so and every other measurement still comes, the state rebuilt when the failed run had
    consumed the donated one. Anything but XLA's out-of-memory verdict still raises."""
    from uniimage_jax.bench import run

    real_compile = run._compile_train_step

    def compile_or_fail(model, tx, variant, state, *args, **kwargs):
        if variant == "like_for_like":
            jax.tree.map(lambda x: x.delete(), state)  # as a failed run leaves a donated state
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real_compile(model, tx, variant, state, *args, **kwargs)

    def failing_sampler(model):
        def sample(*args):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory")
        return sample

    monkeypatch.setattr(run, "_compile_train_step", compile_or_fail)
    monkeypatch.setattr(run, "stepwise_sampler", failing_sampler)
    lines = []
    report = run.run_benchmark("micro", steps=1, sample_batch=1, sample_repeats=1,
                               reference=False, log=lambda s: None, emit=lines.append)
    got = {(r["measure"], r["variant"]): r for r in lines}
    assert got["train", "like_for_like"]["error"] == "out of memory"
    assert got["train", "like_for_like"]["seconds"] is None
    assert got["sample", "like_for_like"]["error"] == "out of memory"
    assert got["train", "recipe"]["samples_per_s"] > 0
    assert got["sample", "recipe"]["images_per_s"] > 0     # measured with the rebuilt state
    assert report["jax_train_samples_per_s_like_for_like"] is None
    assert report["jax_train_samples_per_s_recipe"] > 0 and report["mfu"] is None

    def compile_with_a_bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(run, "_compile_train_step", compile_with_a_bug)
    with pytest.raises(ValueError, match="a bug"):
        run.run_benchmark("micro", steps=1, sample_batch=1, sample_repeats=1, reference=False,
                          log=lambda s: None)
