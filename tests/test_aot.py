"""Ahead-of-time compilation for TPU topologies on this CPU host (`uniimage-bench --aot`).

Needs libtpu (the `[aot]` extra, installed by CI). The tiny preset's training step is compiled for
a v5p slice on a 2-axis mesh through the command itself; the published model is lowered with
abstract parameters and must not allocate them; bad topologies, meshes and a missing libtpu are
one-line errors with exit code 2.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libtpu", reason='TPU-topology compiles need the [aot] extra: '
                    'pip install -e ".[aot]"')

from uniimage_jax.bench import aot, topologies  # noqa: E402
from uniimage_jax.cli.bench import main  # noqa: E402
from tests.tiny_assets import TINY_DC_AE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's count exceeds the analytic model FLOPs by the elementwise work the model count leaves out
# (norms, activations, softmax, RoPE, the loss, the AdamW update): about 17% at the tiny preset's
# 64-wide layers, under 2% for tbac_3b. A part counted wrong (e.g. the DiT's backward missing,
# -2/3 of the DiT) falls outside this band.
TINY_XLA_OVER_ANALYTIC = (1.0, 1.3)


@pytest.fixture(scope="module", autouse=True)
def compiled_once():
    """Each distinct compile request (topology, stage config, task, per-chip batch, inputs) is
    compiled once in this module and its figures handed to every test that asks for it again
    (they read them, never change them): a tiny compile for a TPU topology costs ~20 s of CPU."""
    compiled = {}
    original = aot.compile_request

    def compile_request(topology, config, task, per_chip_batch, inputs=None):
        inputs = inputs or aot.step_inputs(config, "sample" if task == "sample" else config.task)
        key = (topology.name, json.dumps(config.to_dict(), sort_keys=True, default=repr), task,
               per_chip_batch, inputs)
        if key not in compiled:
            compiled[key] = original(topology, config, task, per_chip_batch, inputs)
        return compiled[key]

    aot.compile_request = compile_request
    yield
    aot.compile_request = original


def test_tiny_train_step_compiles_for_v5p_on_a_2_axis_mesh(capsys):
    rc = main(["--aot", "v5p:2x2x1", "--preset", "tiny", "--task", "t2i",
               "--per-chip-batch", "2", "--mesh", "data=2,fsdp=2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    r = json.loads(out[-1])
    assert r["topology"] == "v5p:2x2x1" and r["devices"] == 4
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert r["global_batch"] == 8 and r["per_chip_batch"] == 2
    for kind in ("argument", "temporary", "code", "total"):
        assert r["memory_bytes"][kind] > 0, kind
    assert r["hbm_bytes_per_chip"] == r["memory_bytes"]["total"]
    assert r["hbm_capacity_bytes"] == 95 * 2 ** 30 and r["fits"] is True
    lo, hi = TINY_XLA_OVER_ANALYTIC
    assert lo <= r["xla_flops_per_step"] / r["analytic_flops_per_step"] <= hi, r
    assert r["analytic_flops_per_step"] == pytest.approx(2 * r["analytic_tflops_per_sample"] * 1e12)
    assert r["estimated_step_s"] > 0 and 0 < r["estimated_mfu"] < 1
    assert r["estimated_samples_per_s"] == pytest.approx(8 / r["estimated_step_s"])
    assert r["estimated_samples_per_s_per_chip"] == pytest.approx(2 / r["estimated_step_s"])
    assert any(line.startswith("[aot] memory per chip") for line in out)
    assert any("compiler estimate" in line and
               f"({r['estimated_samples_per_s_per_chip']:.4g} per chip)" in line for line in out)


def test_tbac_3b_lowers_without_allocating_parameters():
    """Lowering (tracing with abstract state) is where weights would be materialised by mistake;
    compiling adds nothing on the host. In a fresh process: no live JAX array appears, and the
    peak resident memory stays far below the 3B model's ~22 GB of fp32 parameters."""
    code = """
import resource, jax
from uniimage_jax.bench import aot, topologies
before = len(jax.live_arrays())
topo = topologies.get("v5p:2x2x1")
config = aot.stage_config("tbac_3b", "t2i")
lowered, ctx = aot.lower_train_step(config, topo, 16)
assert "stablehlo" in lowered.as_text()[:20000] or lowered.as_text()
live = jax.live_arrays()
big = [a.shape for a in live if a.size > 1 << 20]
print("LIVE", len(live) - before, len(big), big[:5])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    live = next(line for line in out.stdout.splitlines() if line.startswith("LIVE"))
    rss_kb = int(next(line for line in out.stdout.splitlines()
                      if line.startswith("MAXRSS_KB")).split()[1])
    assert live.split()[2] == "0", live          # no array over 1M elements alive
    assert rss_kb < 6 * 2 ** 20, rss_kb           # < 6 GiB peak: the parameters were never made


@pytest.mark.parametrize("argv, message", [
    (["--aot", "v9:2x2"], "unknown TPU family"),
    (["--aot", "v5p:2x2"], "3 torus dimensions"),
    (["--aot", "v5p-8"], "expected FAMILY:DIMS"),
    (["--aot", "v5p:3x3x3"], "libtpu cannot describe this topology"),
    (["--aot", "v5p:2x2x1", "--mesh", "data=-1,fsdp=3"], "does not divide the 4 devices"),
    (["--aot", "v5p:2x2x1", "--per-chip-batch", "1", "--config.mesh.data=8"],
     "has 8 devices but 4"),
    (["--aot", "v5p:2x2x1", "--mesh", "data=2,tensor=3"], "has 6 devices but 4"),
    (["--aot", "v5p:2x2x1", "--mesh", "data"], "expected AXIS=SIZE"),
    (["--aot", "v5p:2x2x1", "--config.no_such_field=1"], "no such config field"),
    (["--aot", "v5p:2x2x1", "--per-chip-batch", "0"], "--per-chip-batch must be >= 1"),
    (["--aot", "v5p:2x2x1", "--task", "sample", "--per-chip-batch", "6"], "multiple of 4"),
    (["--aot", "v5p:2x2x1", "--task", "sample", "--find-max-batch"], "--find-max-batch searches"),
    (["--aot", "v5p:2x2x1", "--task", "sample", "--mesh", "data=3"], "has 3 devices but 4"),
])
def test_bad_requests_are_one_line_errors(capsys, argv, message):
    assert main([*argv, "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uniimage-bench: error: ") and message in err[0], err


def test_missing_libtpu_names_the_extra(capsys, monkeypatch):
    monkeypatch.setattr(topologies, "libtpu_available", lambda: False)
    assert main(["--aot", "v5e:2x2", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[aot]"' in err, err


def test_sample_compiles_what_uniimage_sample_runs_on_each_host():
    """--task sample on a 2-host slice (v5p:2x2x2): the mesh sampler's programs for one host's 4
    chips, laid out as `uniimage-sample` lays them out there (auto: replicated weights, data=4),
    the loop's cost scaled by its steps (XLA's count then agrees with the FLOP model), and the
    benchmark estimates from the call time: prompts dealt to 2 hosts, 4 chips x 2 prompts each
    per call (per-chip batch 8 = 2 prompts x 4 images)."""
    import math

    r = aot.run_aot("v5p:2x2x2", preset="tiny", task="sample", per_chip_batch=8,
                    log=lambda _: None)
    assert (r["hosts"], r["devices_per_host"], r["devices"]) == (2, 4, 8)
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and "replicated" in r["layout"]
    assert r["layers"] == "unrolled" and r["prompts_per_call"] == 2 and r["global_batch"] == 32
    assert 0.9 <= r["xla_over_analytic"] <= 1.3, r
    # Every weight stays on every chip between the calls (fp32 for the tiny preset).
    import jax

    from uniimage_jax.train import inference_layout, stage_setup
    model = stage_setup.build_model(aot.stage_config("tiny", "sample"))
    weights = inference_layout.weight_bytes(jax.eval_shape(model.init, jax.random.PRNGKey(0)),
                                            np.float32)
    assert r["memory_bytes"]["argument"] == weights
    assert r["hbm_bytes_per_chip"] == sum(r["memory_bytes"][k] for k in (
        "argument", "output", "temporary", "code"))
    call = r["estimated_step_s"]
    assert call > 0 and r["estimated_images_per_s_per_chip"] == pytest.approx(8 / call)
    assert r["geneval_estimated_s"] == pytest.approx(math.ceil(277 / 8) * call)
    assert r["dpg_estimated_s"] == pytest.approx(math.ceil(533 / 8) * call)
    roofline = max(r["xla_flops_per_step"] / 459e12, r["bytes_accessed_per_step"] / 2765e9)
    assert r["roofline_call_s"] == pytest.approx(roofline)
    assert r["geneval_roofline_s"] == pytest.approx(math.ceil(277 / 8) * roofline)
    assert any("images/s per chip" in line for line in aot.describe(r))


def test_overrides_reach_the_stage_config():
    c = aot.stage_config("tiny", "ti2i", overrides=["compute_dtype=bfloat16",
                                                    "optimizer.lr=0.5", "model.scan_layers=True"])
    assert c.task == "ti2i" and c.compute_dtype == "bfloat16"
    assert c.optimizer.lr == 0.5 and c.model.scan_layers is True


def test_topology_table():
    chip, dims = topologies.parse("v6e:2x4")
    assert chip.hbm_bytes == 32 * 2 ** 30 and chip.peak_bf16_flops == 918e12 and dims == (2, 4)
    assert topologies.parse("v5e:4x4")[0].hbm_bytes == 16 * 2 ** 30
    t = topologies.get("v5e:4x4")
    assert len(t.devices) == 16 and t.devices[0].device_kind == "TPU v5 lite"


def test_scanned_layers_report_the_unrolled_programs_cost():
    """Under scan XLA counts each scanned body once; the report's cost figures are the unrolled
    program's, extrapolated from small unrolled compiles: they must match a full unrolled compile
    of the tiny preset within 1%, where the scanned program's own count is far lower."""
    topo = topologies.get("v5p:2x2x1")
    unrolled_config = aot.stage_config("tiny", "t2i")
    scanned_config = aot.stage_config("tiny", "t2i", overrides=["model.scan_layers=True"])
    for config in (unrolled_config, scanned_config):
        # the tiny preset's own layout (all 4 chips on "data"), spelt as the scanned FSDP test
        # spells it, which then reuses this scanned program
        config.mesh = aot.parse_mesh("data=4")
    unrolled, _ = aot.compile_request(topo, unrolled_config, "t2i", 2)
    scanned, _ = aot.compile_request(topo, scanned_config, "t2i", 2)
    corrected, source = aot.full_depth_figures(topo, scanned_config, "t2i", 2, scanned)
    assert source.startswith("unrolled program, extrapolated"), source
    assert aot.full_depth_figures(topo, unrolled_config, "t2i", 2, unrolled) == (
        unrolled, "compiled program")
    assert corrected.memory == scanned.memory
    assert scanned.cost["flops"] < 0.8 * unrolled.cost["flops"], (scanned.cost, unrolled.cost)
    for key in ("flops", "bytes accessed", "optimal_seconds"):
        assert corrected.cost[key] == pytest.approx(unrolled.cost[key], rel=0.01), key




def test_prompt_tokens_and_latents_set_what_is_compiled_and_counted():
    """--prompt-tokens N pads the compiled prompts to N (XLA's flops follow, and the analytic
    count is the FLOP model at N); --latents feeds (B, L, L, C) latents instead of images, and
    both counts drop the autoencoder encode."""
    from uniimage_jax.bench import flops
    from uniimage_jax.models.dc_ae import DCAEConfig
    from uniimage_jax.train import stage_setup

    overrides = [f"model.vae={DCAEConfig(**TINY_DC_AE).to_dict()!r}"]
    runs = {(t, lat): aot.run_aot("v5p:2x2x1", preset="tiny", task="t2i", per_chip_batch=2,
                                  overrides=overrides, prompt_tokens=t, latents=lat,
                                  log=lambda s: 0)
            for t, lat in ((None, False), (96, False), (96, True))}
    full, short, cached = runs[None, False], runs[96, False], runs[96, True]
    # The default: the tiny preset has no buckets, so model.max_prompt_tokens.
    assert (full["prompt_tokens"], short["prompt_tokens"]) == (160, 96)
    assert (short["latents"], cached["latents"]) == (False, True)

    config = aot.stage_config("tiny", "t2i", overrides=overrides)
    model_config = stage_setup.build_model(config).config
    for r in runs.values():
        parts = flops.train_flops_per_sample(model_config, r["prompt_tokens"])
        expected = parts["total"] - (parts["vae_encode"] if r["latents"] else 0)
        assert r["analytic_tflops_per_sample"] * 1e12 == pytest.approx(expected, rel=1e-9)
        lo, hi = TINY_XLA_OVER_ANALYTIC
        assert lo <= r["xla_over_analytic"] <= hi, r
    assert short["xla_flops_per_step"] < 0.95 * full["xla_flops_per_step"]

    encode = 2 * flops.train_flops_per_sample(model_config, 96)["vae_encode"]  # per chip: batch 2
    assert encode > 0.1 * short["analytic_flops_per_step"]   # large enough to see
    # XLA also counts the encoder's norms, activations and shortcuts, which the FLOP model leaves
    # out: about 20% more at these 12-48-channel convolutions.
    drop = short["xla_flops_per_step"] - cached["xla_flops_per_step"]
    assert 1.0 <= drop / encode <= 1.35, (drop, encode)

    topo = topologies.get("v5p:2x2x1")
    mesh = aot._check_layout(config, topo, 2)
    batch, _ = aot.abstract_batch(config, stage_setup.build_model(config), 8, mesh,
                                  aot.StepInputs(96, latents=True))
    assert "target" not in batch and batch["latents"].shape == (8, 8, 8, 48)
    assert batch["input_ids"].shape == (8, 96)


def test_prompt_tokens_default_to_the_largest_bucket():
    config = aot.stage_config("tbac_3b", "t2i")
    assert aot.step_inputs(config, "t2i") == aot.StepInputs(384, False)
    assert aot.step_inputs(config, "t2i", 160, True) == aot.StepInputs(160, True)
    assert aot.step_inputs(aot.stage_config("tbac_3b", "ti2i"), "ti2i").prompt_tokens == 640
    assert aot.step_inputs(aot.stage_config("tbac_3b", "t2i", overrides=[
        "data.prompt_buckets=()"]), "t2i").prompt_tokens == 640   # model.max_prompt_tokens


@pytest.mark.parametrize("argv, message", [
    (["--prompt-tokens", "100", "--config.data.prompt_buckets=(128, 160)"],
     "--prompt-tokens 100: not one of config.data.prompt_buckets (128, 160)"),
    (["--prompt-tokens", "10"], "--prompt-tokens 10: must be in 11..160"),
    (["--prompt-tokens", "161"], "--prompt-tokens 161: must be in 11..160"),
    (["--task", "sample", "--latents"], "--latents feeds the training step"),
])
def test_bad_prompt_tokens_and_latents_are_one_line_errors(capsys, argv, message):
    assert main(["--aot", "v5p:2x2x1", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def _fake_compiles(monkeypatch, memory, verdict=lambda needed: needed):
    """compile_request replaced by a program whose per-chip total is memory(batch); one that
    does not fit reports verdict(total) as XLA does (its total, or a lower bound of it)."""
    calls = []

    def compile_request(topology, config, task, b, inputs=None):
        calls.append(b)
        total = int(memory(b))
        if total <= topology.hbm_bytes_per_device:
            return aot.Compiled({"total": total}, None, None, 0.0), {"batch": b}
        return aot.Compiled(None, int(verdict(total)), None, 0.0), {"batch": b}

    monkeypatch.setattr(aot, "compile_request", compile_request)
    return calls


class _Chip:
    def __init__(self, cap):
        self.hbm_bytes_per_device = cap


GIB = 2 ** 30


@pytest.mark.parametrize("start", [1, 4, 16, 40, 200])
@pytest.mark.parametrize("base, per_sample, cap", [
    (24.4, 3.68, 95), (6.2, 1.3, 95), (11.5, 0.83, 16), (1.0, 0.25, 32), (25.0, 1.0, 32),
    (14.0, 5.0, 16)])
def test_find_max_batch_on_affine_memory_is_exact_in_few_compiles(monkeypatch, start, base,
                                                                  per_sample, cap):
    calls = _fake_compiles(monkeypatch, lambda b: (base + per_sample * b) * GIB)
    best, figures, ctx = aot.find_max_batch(_Chip(cap * GIB), None, "t2i", start, log=lambda s: 0)
    truth = max((b for b in range(1, 1000) if base + per_sample * b <= cap), default=0)
    assert best == truth, (best, truth, calls)
    if truth:
        assert ctx == {"batch": truth} and figures.memory["total"] <= cap * GIB
    assert len(calls) <= 4, calls          # two points, the prediction, its neighbour
    assert len(set(calls)) == len(calls)   # nothing compiled twice


@pytest.mark.parametrize("seed", range(40))
def test_find_max_batch_is_exact_when_memory_is_not_affine(monkeypatch, seed):
    """Curved memory, and out-of-memory verdicts that give only a lower bound (XLA's
    temporaries alone): still the true maximum, in logarithmic time."""
    rng = np.random.default_rng(seed)
    base, lin, quad = rng.uniform(0, 30), rng.uniform(0.05, 4), rng.uniform(0, 0.05)
    cap, start = rng.uniform(16, 100), int(rng.integers(1, 64))
    share = rng.uniform(0.3, 1.0)

    def memory(b):
        return (base + lin * b + quad * b * b) * GIB
    calls = _fake_compiles(monkeypatch, memory, verdict=lambda total: share * total)
    best, _, _ = aot.find_max_batch(_Chip(cap * GIB), None, "t2i", start, log=lambda s: 0)
    truth = max((b for b in range(1, 5000) if memory(b) <= cap * GIB), default=0)
    assert best == truth, (best, truth, calls)
    assert len(calls) <= 12, calls


def test_scanned_fsdp_step_keeps_the_dit_activations_split_over_the_batch():
    """Under nn.scan with FSDP, XLA's sharding propagation followed the stacked DiT weights (split
    along "embed") and kept every chip's DiT activations for the whole global batch, so the
    temporaries grew with the number of FSDP shards (tbac_3b on v5p-8 at fsdp=4: 157 GiB). The
    tiny preset shows it too: 2.1x data-parallel's temporaries before the DiT blocks constrained
    their rows to the batch axes, the same as data-parallel after."""
    topo = topologies.get("v5p:2x2x1")
    temps = {}
    for mesh in ("data=4", "fsdp=4"):
        config = aot.stage_config("tiny", "t2i", overrides=["model.scan_layers=True"])
        config.mesh = aot.parse_mesh(mesh)
        figures, _ = aot.compile_request(topo, config, "t2i", 2)
        temps[mesh] = figures.memory["temporary"]
    assert temps["fsdp=4"] <= 1.2 * temps["data=4"], temps
