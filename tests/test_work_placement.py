"""Where the work runs: the ti2i vision tower per batch row, the step under the logical-axis rules,
frozen towers off the FSDP rules, scan by default for the published model, remat policies by name.

The device-count checks run in one subprocess (`python -m tests.test_work_placement <check>`)
because XLA_FLAGS=--xla_force_host_platform_device_count must be set before JAX starts.
"""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniimage_jax.models import presets
from uniimage_jax.errors import ConfigError
from uniimage_jax.models import remat
from uniimage_jax.models.uniimage import UniImage, rope_positions
from tests.xla_env import with_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = (1, 4, 4)          # one tiny source image: 16 patches, 4 merged tokens
ROWS = 2


def _tiny_model(**model_overrides) -> UniImage:
    m = presets.model_preset("tiny")
    for k, v in model_overrides.items():
        m[k] = v
    return UniImage(presets.build_model_config(m))


def _ti2i_batch(model: UniImage, rows: int = ROWS, seed: int = 0):
    """Left-padded prompts with one source image each, ending in the metaquery block."""
    c = model.config.mllm
    merged = GRID[0] * GRID[1] * GRID[2] // c.vision_config.spatial_merge_size ** 2
    queries = list(model.config.metaquery_token_ids)
    g = np.random.default_rng(seed)
    ids, mask = [], []
    for r in range(rows):
        text = list(g.integers(10, 60, size=3 + r))
        row = (text + [c.vision_start_token_id] + [c.image_token_id] * merged
               + [c.vision_end_token_id] + text[:2] + [c.vision_start_token_id] + queries
               + [c.vision_end_token_id, 5])
        ids.append(row)
    t = max(map(len, ids))
    mask = np.array([[0] * (t - len(r)) + [1] * len(r) for r in ids], np.int32)
    ids = np.array([[0] * (t - len(r)) + r for r in ids], np.int32)
    pos = rope_positions(model.config, ids, mask, (GRID,) * rows)
    n = GRID[0] * GRID[1] * GRID[2]
    pv = g.standard_normal((rows, n, c.vision_config.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "pixel_values": pv}


def test_ti2i_condition_per_row_equals_flat():
    """The conditioning with the vision tower run per row (the trainer's layout) equals the flat
    layout (every image's patches in one sequence) within 1e-6 in fp32, on both prompt paths."""
    model = _tiny_model()
    params = model.init(jax.random.PRNGKey(0))
    batch = _ti2i_batch(model)
    flat = dict(batch, pixel_values=batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1]))
    for split in (True, False):
        cond = jax.jit(lambda p, b, g: model.condition(p, dict(b, image_grid_thw=g),
                                                       split_prompt=split), static_argnums=2)
        per_row, _ = cond(params, batch, (GRID,))
        reference, _ = cond(params, flat, (GRID,) * ROWS)
        np.testing.assert_allclose(np.asarray(per_row), np.asarray(reference), rtol=0, atol=1e-6)
        # The images matter: a different image changes the conditioning.
        other = dict(batch, pixel_values=batch["pixel_values"][::-1].copy())
        changed, _ = cond(params, other, (GRID,))
        assert float(jnp.max(jnp.abs(changed - per_row))) > 1e-4


def _trainable_grads(model: UniImage, params, batch, latents, noise, t, sigmas):
    def loss(trainable):
        return model.loss_given_noise({**params, **trainable}, batch, latents, noise, t, sigmas)[0]
    trainable = {k: params[k] for k in ("dit", "connector", "metaquery")}
    return jax.jit(jax.grad(loss))(trainable)


def test_remat_policies_give_identical_gradients():
    """Every remat policy (DiT blocks and MLLM layers; also under scan) leaves the gradients of
    what trains unchanged to fp32 rounding: within 1e-5 of each leaf's scale (max(1, max |g|));
    the recomputed forward is the same arithmetic, fused differently (observed <= 2e-6)."""
    base = _tiny_model()
    params = base.init(jax.random.PRNGKey(1))
    batch = _ti2i_batch(base, seed=1)
    batch["image_grid_thw"] = (GRID,)
    ls, ch = base.config.latent_size, base.config.dit.in_channels
    g = np.random.default_rng(2)
    latents, noise = (g.standard_normal((ROWS, ls, ls, ch)).astype(np.float32) for _ in range(2))
    sigmas = np.array([0.3, 0.8], np.float32)
    t = sigmas * 1000
    reference = _trainable_grads(base, params, batch, latents, noise, t, sigmas)
    runs = [(name, False) for name in remat.POLICIES if name != "none"] + [("full", True)]
    for name, scan in runs:
        model = _tiny_model(dit_remat=name, mllm_remat=name, scan_layers=scan)
        assert model.config.dit.remat == name and model.config.mllm.remat == name
        p = params
        if scan:
            from uniimage_jax.models import qwen2_5_vl, sana

            p = dict(params, dit=sana.scan_params(params["dit"], model.config.dit),
                     mllm=qwen2_5_vl.scan_params(params["mllm"], model.config.mllm))
        grads = _trainable_grads(model, p, batch, latents, noise, t, sigmas)
        if scan:
            grads = dict(grads, dit=sana.unscan_params(grads["dit"], model.config.dit))
        worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    / max(1.0, float(np.abs(np.asarray(b)).max()))
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
        print(f"remat {name} scan={scan}: largest gradient difference {worst:.2e} of scale")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(reference)):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=0,
                                       atol=1e-5 * max(1.0, float(np.abs(b).max())),
                                       err_msg=f"{name} scan={scan} {jax.tree_util.keystr(path)}")


def test_unknown_remat_policy_names_the_field_and_choices():
    for field in ("dit_remat", "mllm_remat"):
        m = presets.model_preset("tiny")
        m[field] = "dots"
        with pytest.raises(ConfigError, match=rf"config\.model\.{field}='dots'.*dots_saveable"):
            presets.build_model_config(m)


def test_scan_is_the_default_for_the_published_model_only():
    assert presets.model_preset("tbac_3b").scan_layers
    assert not presets.model_preset("tiny").scan_layers
    config = presets.build_model_config(presets.model_preset("tbac_3b"))
    assert config.mllm.scan_layers and config.dit.scan_layers


def test_converted_checkpoint_loads_into_scanned_layers(tmp_path):
    """A converted TBAC-UniImage (layers stored apart) loads into a model with scanned layers:
    the same parameters, stacked."""
    from tests.tbac_fixture import build_tiny_tbac
    from uniimage_jax.checkpoints.converted import load_tbac
    from uniimage_jax.checkpoints import loader
    from uniimage_jax.models import qwen2_5_vl, sana

    root = str(tmp_path)
    built = build_tiny_tbac(root)
    config, stored = load_tbac(built["dst"])
    assert not config.mllm.scan_layers
    scanned = dataclasses.replace(config, mllm=dataclasses.replace(config.mllm, scan_layers=True),
                                  dit=dataclasses.replace(config.dit, scan_layers=True))
    model = UniImage(scanned)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    params = loader.load_pretrained_parts(model, abstract, tbac=built["dst"])
    back_dit = sana.unscan_params(jax.device_get(params["dit"]), scanned.dit)
    back_mllm = qwen2_5_vl.unscan_params(jax.device_get(params["mllm"]), scanned.mllm)
    for got, want in ((back_dit, stored["dit"]), (back_mllm, stored["mllm"])):
        assert jax.tree.structure(got) == jax.tree.structure(dict(want))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(dict(want))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------- 8 fake devices (subprocess)

EIGHT_DEVICE_CHECKS = ("vision_work_per_device", "step_constraints_act", "frozen_layout")


@pytest.fixture(scope="module")
def eight_device_run():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=with_devices(8))
    proc = subprocess.run([sys.executable, "-m", "tests.test_work_placement",
                           *EIGHT_DEVICE_CHECKS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("check", EIGHT_DEVICE_CHECKS)
def test_on_eight_cpu_devices(eight_device_run, check):
    returncode, out, err = eight_device_run
    assert f"PASS {check}" in out, f"rc={returncode}\nstdout:\n{out}\nstderr:\n{err[-4000:]}"


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _check_vision_work_per_device():
    """Per-device flops of the vision tower under mesh data=8 follow the LOCAL batch: global
    batch 8 costs each device what one image costs one device, and 16 twice that. (With the
    images flattened over the global batch, every device computed all of them: 8x.)"""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from uniimage_jax.models import qwen2_5_vl as qwen
    from uniimage_jax.train import sharding

    config = _tiny_model().config.mllm
    tower = qwen.Qwen2_5_VisionTransformer(config.vision_config)
    grid = ((1, 8, 8),)
    dim = config.vision_config.patch_dim
    params = tower.init(jax.random.PRNGKey(0), jnp.zeros((64, dim)), grid)
    mesh = sharding.make_mesh({"data": 8})
    rules = sharding.rules_from_config(())

    def compiled(rows: int, on_mesh: bool, per_row: bool = True):
        shape = (rows, 64, dim) if per_row else (rows * 64, dim)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        fn = lambda p, x: tower.apply(p, x, grid if per_row else grid * rows)
        if not on_mesh:
            return jax.jit(fn).lower(params, x).compile()
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()),
                                             NamedSharding(mesh, P(sharding.BATCH_AXES)))
                           ).lower(params, x).compile()

    one_image = _flops(compiled(1, False))
    per_device_8 = _flops(compiled(8, True))
    per_device_16 = _flops(compiled(16, True))
    flat_8 = _flops(compiled(8, True, per_row=False))
    print(f"vision flops: one image on one device {one_image:.3g}; per device at global batch "
          f"8: {per_device_8:.3g}, 16: {per_device_16:.3g}; flat layout at 8: {flat_8:.3g}")
    assert 0.8 < per_device_8 / one_image < 1.25, (per_device_8, one_image)
    assert 1.8 < per_device_16 / per_device_8 < 2.2, (per_device_16, per_device_8)
    # The flat layout (every image's patches in one sequence, as the step used to pass them)
    # does not split with the batch.
    assert flat_8 > 2 * per_device_8, (flat_8, per_device_8)


def _lowered_tiny_step(task: str, mesh_cfg: dict):
    from uniimage_jax.bench import aot
    from uniimage_jax.train import sharding, stage_setup
    from uniimage_jax.train import step as train_step
    from uniimage_jax.train.optimizer import make_optimizer

    config = aot.stage_config("tiny", task)
    config.mesh = mesh_cfg
    model = stage_setup.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    tx = make_optimizer(config.optimizer)
    with jax.set_mesh(mesh):
        state, frozen = aot.abstract_train_state(config, model, mesh, tx)
        batch, grid = aot.abstract_batch(config, model, 8, mesh)
        step = train_step.jit_train_step(model, tx, config,
                                         jax.tree.map(lambda x: x.sharding, state))
        return step.lower(state, frozen, batch, grid), model


def _check_step_constraints_act():
    """The trainer's step is traced under the logical-axis rules: the activation constraints of
    the model code (one per decoder layer, per vision block and row) reach the program. Without
    the rules they are no-ops and none would appear."""
    lowered, model = _lowered_tiny_step("ti2i", {"data": 8})
    text = lowered.as_text()
    count = text.count("sharding_constraint") + text.count("@Sharding")
    depth = model.config.mllm.num_hidden_layers + model.config.mllm.vision_config.depth
    print(f"sharding constraints in the lowered ti2i step: {count}")
    assert count >= depth, count
    # ... and the step compiles on the 8 devices with the vision tower per row.
    lowered.compile()


def _check_frozen_layout():
    """Under mesh fsdp=8 the DiT (trained) is FSDP-sharded while the frozen MLLM and autoencoder
    are replicated; with fsdp=4 x tensor=2 and 'tensor' they are split over "tensor" only."""
    from uniimage_jax.bench import aot
    from uniimage_jax.train import sharding, stage_setup

    def layouts(mesh_cfg, mode):
        config = aot.stage_config("tiny", "t2i")
        config.frozen_sharding = mode
        model = stage_setup.validate(config)
        mesh = sharding.make_mesh(mesh_cfg)
        rules = sharding.rules_from_config(())
        abstract = stage_setup.abstract_params(model, mesh, rules, config)
        return {k: [x.sharding.spec for x in jax.tree.leaves(v)] for k, v in abstract.items()}

    def axes(specs):
        return {a for spec in specs for dim in spec if dim is not None
                for a in ((dim,) if isinstance(dim, str) else dim)}

    for mode in ("replicated", "tensor"):
        got = layouts({"fsdp": 8}, mode)
        assert axes(got["dit"]) == {"fsdp"}, axes(got["dit"])
        for frozen in ("mllm", "vae"):
            assert axes(got[frozen]) == set(), (mode, frozen, axes(got[frozen]))
    got = layouts({"fsdp": 4, "tensor": 2}, "tensor")
    assert axes(got["dit"]) == {"fsdp", "tensor"}
    assert axes(got["mllm"]) == {"tensor"}, axes(got["mllm"])
    assert axes(layouts({"fsdp": 4, "tensor": 2}, "replicated")["mllm"]) == set()
    try:
        layouts({"fsdp": 8}, "fsdp")
    except ConfigError as e:
        assert "config.frozen_sharding='fsdp'" in str(e), str(e)
    else:
        raise AssertionError("frozen_sharding='fsdp' was accepted")


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    for name in sys.argv[1:]:
        globals()[f"_check_{name}"]()
        print(f"PASS {name}", flush=True)
