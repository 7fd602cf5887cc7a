"""`uniimage-bench --aot TOPOLOGY --parts` and `--per-bucket`: the step's parts, compiled apart,
add up to the whole step (XLA's flop counts, the tiny preset compiled for this host's CPU: the
decomposition is backend-independent and the CPU compiles faster); the per-bucket estimate
reuses the DiT's per-block cost across buckets exactly as the depth extrapolation would."""
import jax
import pytest

from uniimage_jax.bench import aot, bucket_costs, step_parts, topologies


def test_the_parts_add_up_to_the_whole_step():
    topo = topologies.Topology("cpu", topologies.CHIPS["v5p"], 1, tuple(jax.devices()[:1]))
    config = aot.stage_config("tiny", "t2i", overrides=[
        "model.mllm.num_hidden_layers=2", "model.dit.num_layers=1", "mesh.data=1"])
    lowered = step_parts._lower_parts(config, topo, 2, aot.StepInputs(32, True))
    assert set(lowered) == {*step_parts.PARTS, "whole"}
    flops = {name: aot.compile_and_analyse(low).cost["flops"] for name, low in lowered.items()}
    parts = sum(flops[p] for p in step_parts.PARTS)
    assert parts == pytest.approx(flops["whole"], rel=0.01), flops
    # Each part is a real share of the work: none is empty, the DiT's forward and backward
    # the largest at this size.
    assert min(flops[p] for p in step_parts.PARTS) > 0
    assert max(step_parts.PARTS, key=flops.get) == "dit"


def test_bucket_costs_reuse_the_dit_block_cost(monkeypatch):
    """With probe costs affine in (MLLM layers, DiT blocks) and the prompt length, the
    per-bucket figures equal the depth extrapolation at each bucket, from two probes per
    bucket after the first."""
    calls = []

    def probe(config, topology, task, batch, inputs, depth):
        calls.append((inputs.prompt_tokens, depth))
        layers, blocks = depth
        t = inputs.prompt_tokens
        value = 5.0 + layers * (2.0 + 0.01 * t) + blocks * 7.0 + 0.001 * t
        return {"flops": value, "bytes accessed": 2 * value, "optimal_seconds": value / 100}
    monkeypatch.setattr(bucket_costs, "_probe_cost", probe)
    config = aot.stage_config("tbac_3b", "t2i")
    out = bucket_costs.bucket_costs(config, None, "t2i", 16, (128, 384), True,
                                    log=lambda s: None)
    L, n = config.model.mllm.num_hidden_layers, config.model.dit.num_layers
    for t in (128, 384):
        assert out[t]["flops"] == pytest.approx(5.0 + L * (2.0 + 0.01 * t) + n * 7.0 + 0.001 * t)
    assert len(calls) == 5 and {d for t, d in calls if t == 128} == set(aot.DEPTH_PROBES[:2])


def test_histogram_mean_weights_step_times():
    result = {"per_chip_batch": 16, "buckets": [
        {"prompt_tokens": 160, "estimated_step_s": 0.2},
        {"prompt_tokens": 384, "estimated_step_s": 0.3}]}
    m = bucket_costs.histogram_mean(result, {160: 3, 384: 1})
    assert m["mean_step_s"] == pytest.approx(0.225)
    assert m["mean_samples_per_s_per_chip"] == pytest.approx(16 / 0.225)
    assert m["mean_prompt_tokens"] == pytest.approx(216)
    with pytest.raises(aot.AotError, match=r"\[192\]"):
        bucket_costs.histogram_mean(result, {192: 1})


def test_parts_extrapolate_with_the_probe_depths_of_the_whole_step():
    """A figure affine in (MLLM layers, DiT blocks), sampled at the probe depths, extrapolates
    exactly to the full depth: the same formula as `aot.depth_extrapolated_cost`."""
    def figure(layers, blocks):
        return 5.0 + 3.0 * layers + 7.0 * blocks
    values = [figure(*d) for d in aot.DEPTH_PROBES]
    assert step_parts._extrapolate(values, (36, 20)) == pytest.approx(figure(36, 20))
