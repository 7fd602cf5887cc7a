"""Frozen weights the training step never reads are left out of its arguments
(`train/step_params.py`): the autoencoder's encoder with cached latents, its decoder, the vision
tower of a t2i stage, the MLLM layers above the deepest one the ladder reads. The step's
abstract arguments hold none of them, and its loss and gradients are bitwise those of the
whole tree (the tiny preset)."""
import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.bench import aot
from uniimage_jax.checkpoints.partition import merge_params
from uniimage_jax.models import qwen2_5_vl
from uniimage_jax.models.dc_ae import DCAEConfig
from uniimage_jax.models.uniimage import rope_positions
from uniimage_jax.train import sharding, stage_setup, step_params
from uniimage_jax.train.optimizer import make_optimizer
from tests.tiny_assets import TINY_DC_AE

DC_AE = f"model.vae={DCAEConfig(**TINY_DC_AE).to_dict()!r}"


def _paths(tree) -> set[str]:
    return {"/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _vae_parts(paths) -> set[str]:
    return {p.split("/")[1] for p in paths if p.startswith("vae/")}


def test_step_arguments_hold_only_what_the_step_reads():
    config = aot.stage_config("tiny", "t2i", overrides=[DC_AE, "data.source='latents'"])
    model = stage_setup.validate(config)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh):
        state, frozen = aot.abstract_train_state(config, model, mesh,
                                                 make_optimizer(config.optimizer))
    frozen, trainable = _paths(frozen), _paths(state.params)
    # The official ladder of the 4-layer tiny MLLM reads hidden states 0..3: layers 0..2.
    assert model.config.ladder_indices == (0, 1, 2, 3)
    assert model.config.conditioning_depth == 3
    layers = {p.split("/")[3] for p in frozen if p.startswith("mllm/model/language_model/layers_")}
    assert layers == {"layers_0", "layers_1", "layers_2"}, layers
    assert not {p for p in frozen if p.startswith(("vae/", "mllm/model/visual/"))}, frozen
    assert "extra_embedding_rows" not in frozen
    assert "mllm/model/language_model/embed_tokens/embedding" in frozen   # the prompt reads it
    assert {p.split("/")[0] for p in trainable} == {"dit", "connector", "metaquery"}

    # The same model in other stages. Images encoded in the step: the encoder, never the
    # decoder; ti2i: the vision tower too; sample sheets decode: the stage keeps the decoder,
    # its step still does not get it. A scanned MLLM is cut along its layer axis.
    whole = jax.eval_shape(model.init, jax.random.PRNGKey(0))

    def kept(task, *overrides):
        c = aot.stage_config("tiny", task, overrides=[DC_AE, *overrides])
        stage = step_params.for_stage(whole, c, model)
        return _paths(stage), _paths(step_params.for_step(stage, c))
    stage, step = kept("ti2i")
    assert _vae_parts(step) == {"encoder"}
    assert any(p.startswith("mllm/model/visual/") for p in step)
    stage, step = kept("t2i", "sample_every=10")
    assert _vae_parts(stage) == {"encoder", "decoder"} and _vae_parts(step) == {"encoder"}
    scanned = qwen2_5_vl.scan_params(whole["mllm"], model.config.mllm)
    cut = qwen2_5_vl.keep_layers(scanned, 3)
    assert {x.shape[0] for x in jax.tree.leaves(cut["model"]["language_model"]["layers"])} == {3}
    assert qwen2_5_vl.num_decoder_layers(cut) == 3


def _tiny_batch(model, rows=2, tokens=24, seed=0):
    """Left-padded prompts ending in the metaqueries and the 2 suffix tokens, and latents."""
    c = model.config
    g = np.random.default_rng(seed)
    n = c.num_metaqueries
    ids = g.integers(0, 200, (rows, tokens))
    ids[:, tokens - n - 2:tokens - 2] = np.arange(c.mllm.vocab_size, c.mllm.vocab_size + n)
    mask = np.ones((rows, tokens), np.int64)
    mask[1, :5] = 0
    latents = g.standard_normal((rows, c.latent_size, c.latent_size, c.dit.in_channels))
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask),
            "position_ids": jnp.asarray(rope_positions(c, ids, mask)),
            "latents": jnp.asarray(latents, jnp.float32)}


def test_loss_and_gradients_are_bitwise_those_of_the_whole_tree():
    """The tiny preset fed from a latent cache (its DiT cut to 1 block: the DiT is the same
    in both programs), each tree compiled apart as the trainer compiles its step."""
    config = aot.stage_config("tiny", "t2i", overrides=[
        "data.source='latents'", "model.dit.num_layers=1"])
    model = stage_setup.validate(config)
    assert model.config.conditioning_depth == 3     # ladder (3,) of a 4-layer MLLM
    g = np.random.default_rng(1)
    params = jax.tree.map(lambda s: g.normal(0, 0.1, s.shape).astype(s.dtype),
                          jax.eval_shape(model.init, jax.random.PRNGKey(1)))
    trainable, frozen = stage_setup.split_params(params, config, model)
    pruned = step_params.for_step(
        stage_setup.split_params(step_params.for_stage(params, config, model), config, model)[1],
        config)
    assert qwen2_5_vl.num_decoder_layers(pruned["mllm"]) == 3
    batch = _tiny_batch(model)

    def loss_and_grads(trainable, frozen):
        def loss_fn(p):
            return model.loss(merge_params(p, frozen), batch, jax.random.PRNGKey(2),
                              latents=batch["latents"], split_prompt=True)[0]
        return jax.value_and_grad(loss_fn)(trainable)

    whole = jax.device_get(jax.jit(loss_and_grads)(trainable, frozen))
    cut = jax.device_get(jax.jit(loss_and_grads)(trainable, pruned))
    assert np.isfinite(whole[0]) and whole[0] > 0
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(cut)):
        np.testing.assert_array_equal(a, b)
    # The gradient reaches the metaqueries through the MLLM layers the cut tree holds.
    assert np.abs(whole[1]["metaquery"]["embedding"]).max() > 0


def test_a_weight_the_stage_never_holds_is_not_warned_about(caplog):
    """A parameter whose dimensions do not divide the mesh is named in a warning at start-up;
    the autoencoder's encoder with cached latents is not the stage's, so it is not named
    (compile-only TPU devices: nothing is allocated)."""
    import pytest
    pytest.importorskip("libtpu", reason="TPU-topology compiles need the [aot] extra")
    from uniimage_jax.bench import topologies

    devices = topologies.get("v5p:2x2x1").devices
    mesh = sharding.make_mesh({"fsdp": 4}, devices)

    def warned(source):
        config = aot.stage_config("tiny", "t2i", overrides=[DC_AE, f"data.source={source!r}"])
        model = stage_setup.validate(config)
        caplog.clear()
        stage_setup.abstract_params(model, mesh, sharding.rules_from_config(config.logical_rules),
                                    config)
        return " ".join(r.getMessage() for r in caplog.records if "do not divide" in r.getMessage())
    assert "['encoder']['conv_in']" in warned("images")
    assert "['encoder']" not in warned("latents")
