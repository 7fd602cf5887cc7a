"""`layers.depthwise_conv`: each of its forms against torch's grouped `Conv2d` (values and
gradients, fp32; bfloat16 inputs summed in float32), and which form a program compiled for TPU or
for CPU runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.parity import assert_rel_close
from uniimage_jax.models import layers


def _torch_reference(x, kernel):
    """torch Conv2d(C, C, k, padding=k // 2, groups=C, bias=False) on NHWC arrays, its output
    and the gradients of sum(out * cotangent) for a fixed cotangent."""
    c, k = x.shape[-1], kernel.shape[0]
    conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False).double()
    with torch.no_grad():   # (k, k, 1, C) -> torch's (C, 1, k, k)
        conv.weight.copy_(torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1))))
    xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2))).requires_grad_(True)
    out = conv(xt)
    cot = torch.from_numpy(np.cos(np.arange(out.numel())).reshape(out.shape))
    (out * cot).sum().backward()
    to_nhwc = (lambda a: np.transpose(a.detach().numpy(), (0, 2, 3, 1)))
    return (to_nhwc(out), to_nhwc(xt.grad), np.transpose(conv.weight.grad.numpy(), (2, 3, 1, 0)),
            np.transpose(cot.numpy(), (0, 2, 3, 1)))


FORMS = [layers._grouped_depthwise, layers._shifted_depthwise, layers.depthwise_conv]
FORM_IDS = ["grouped", "shifted", "dispatch"]


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("k", [3, 5])
def test_each_form_matches_torch_grouped_conv2d(form, k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 7, 6, 12))
    kernel = rng.standard_normal((k, k, 1, 12))
    ref_out, ref_dx, ref_dk, cot = _torch_reference(x, kernel)
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(form, jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
        dx, dk = vjp(jnp.asarray(cot, jnp.float32))
    assert_rel_close(out, ref_out, 1e-5, "output")
    assert_rel_close(dx, ref_dx, 1e-5, "input gradient")
    assert_rel_close(dk, ref_dk, 1e-5, "kernel gradient")


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_bfloat16_inputs_are_summed_in_float32(form):
    """Each output is the exact sum of the k * k products rounded once to bfloat16 (bfloat16's
    unit roundoff, 2**-8 relative), as a convolution accumulates; summing in bfloat16 rounds
    after every product (up to several units here)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 64)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 64)), jnp.bfloat16)
    exact = _torch_reference(np.asarray(x, np.float64), np.asarray(kernel, np.float64))[0]
    out = np.asarray(form(x, kernel).astype(jnp.float32), np.float64)
    assert out.dtype == np.float64 and form(x, kernel).dtype == jnp.bfloat16
    err = np.abs(out - exact)
    assert np.all(err <= 2.0 ** -8 * np.abs(exact)), np.max(err / np.abs(exact))


def _compiled_text(devices):
    x = jax.ShapeDtypeStruct((2, 8, 8, 128), jnp.float32,
                             sharding=jax.sharding.SingleDeviceSharding(devices[0]))
    k = jax.ShapeDtypeStruct((3, 3, 1, 128), jnp.float32,
                             sharding=jax.sharding.SingleDeviceSharding(devices[0]))
    return jax.jit(jax.grad(lambda x, k: jnp.sum(layers.depthwise_conv(x, k) ** 2),
                            argnums=(0, 1))).lower(x, k).compile().as_text()


def test_a_tpu_program_runs_the_grouped_convolution_and_a_cpu_one_the_shifted_form():
    pytest.importorskip("libtpu", reason="TPU-topology compiles need the [aot] extra")
    from uniimage_jax.bench import topologies

    tpu = _compiled_text(topologies.get("v5p:2x2x1").devices)
    assert "feature_group_count=128" in tpu
    cpu = _compiled_text(jax.devices("cpu"))
    assert "convolution(" not in cpu and "feature_group_count" not in cpu
