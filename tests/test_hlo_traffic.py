"""`bench.hlo_traffic`: what it reads from a compiled program's text. A hand-written program in
the text form XLA prints (the expected figures worked out by hand from its shapes), and a real
TPU-topology compile."""

import pytest

from uniimage_jax.bench import hlo_traffic

# An ENTRY with the `/*index=N*/` comments XLA writes into long parameter lists and result
# tuples, a fusion with its body, a prefetch into on-chip memory (S(1)) and a layout copy.
_PROGRAM = """HloModule m

%fused_computation (param_0: f32[256,128], param_1: f32[256,128]) -> f32[256,128] {
  %param_0 = f32[256,128]{1,0:T(8,128)} parameter(0)
  %param_1 = f32[256,128]{1,0:T(8,128)} parameter(1)
  ROOT %add.1 = f32[256,128]{1,0:T(8,128)} add(%param_0, %param_1)
}

ENTRY %main (p0: f32[256,128], p1: f32[256,128], p2: f32[2], p3: f32[2], p4: f32[2], p5: f32[2]) -> (f32[256,128], f32[128,256], f32[2], f32[2], f32[2], /*index=5*/f32[2]) {
  %p0 = f32[256,128]{1,0:T(8,128)} parameter(0)
  %p1 = f32[256,128]{1,0:T(8,128)} parameter(1)
  %p2 = f32[2]{0} parameter(2)
  %p3 = f32[2]{0} parameter(3)
  %p4 = f32[2]{0} parameter(4)
  %p5 = f32[2]{0} parameter(5)
  %copy-start = (f32[256,128]{1,0:T(8,128)S(1)}, f32[256,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%p1)
  %copy-done = f32[256,128]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %fusion = f32[256,128]{1,0:T(8,128)} fusion(%p0, %copy-done), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(run)/jvp(Model)/block/add"}, backend_config={"estimated_cycles":"4096"}
  %copy = f32[128,256]{0,1:T(8,128)} copy(%fusion), metadata={op_name="jit(run)/transpose"}
  ROOT %tuple = (f32[256,128]{1,0:T(8,128)}, f32[128,256]{0,1:T(8,128)}, f32[2]{0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) tuple(%fusion, %copy, %p2, %p3, %p4, %p5)
}
"""
_ARRAY = 256 * 128 * 4


def test_a_hand_written_program():
    records = {r["name"]: r for r in hlo_traffic.traffic(_PROGRAM)}
    # The ENTRY is read despite the comments in its header; the fusion body is not an operation.
    assert set(records) == {"copy-start", "fusion", "copy"}
    assert records["fusion"]["kind"] == "other"
    assert records["fusion"]["bytes"] == 3 * _ARRAY          # two operands read, one written
    assert records["fusion"]["cycles"] == 4096
    assert records["fusion"]["group"] == "Model/block"
    # Staging an operand in on-chip memory moves it through HBM once and is not a layout copy.
    assert records["copy-start"]["kind"] == "prefetch"
    assert records["copy-start"]["bytes"] == _ARRAY
    assert records["copy"]["kind"] == "layout" and records["copy"]["bytes"] == 2 * _ARRAY
    assert records["copy"]["cycles"] is None


def test_a_tpu_compile_carries_time_estimates_for_its_operations():
    pytest.importorskip("libtpu", reason="TPU-topology compiles need the [aot] extra")
    import jax
    import jax.numpy as jnp

    from uniimage_jax.bench import topologies

    device = topologies.get("v5p:2x2x1").devices[0]

    def step(x, w, *rest):   # enough outputs for XLA to number them in its ENTRY header
        return (jnp.tanh(x @ w), *[r * 2 for r in rest])

    spec = jax.ShapeDtypeStruct((512, 512), jnp.float32,
                                sharding=jax.sharding.SingleDeviceSharding(device))
    small = jax.ShapeDtypeStruct((8,), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(device))
    text = jax.jit(step).lower(spec, spec, *[small] * 6).compile().as_text()
    assert "/*index=5*/" in text
    records = hlo_traffic.traffic(text)
    matmul = [r for r in records if r["kind"] == "matmul"]
    assert len(matmul) == 1 and matmul[0]["cycles"] > 0
    assert matmul[0]["bytes"] >= 3 * 512 * 512 * 4
