"""LoRA adapters (`uniimage_jax/models/lora.py`): the model, the trainer, merging and exports.

* B = 0 adapters leave the whole model's outputs bitwise equal to the base model (per-layer and
  scanned layouts, DiT and MLLM adapters);
* after a few training steps, the merged weights give the adapter model's velocity (1e-5);
* exported DiT adapters loaded into diffusers' `SanaTransformer2DModel.load_lora_adapter` give
  our adapter model's velocity, and exported MLLM adapters loaded with PEFT into transformers'
  Qwen2.5-VL give our hidden states (1e-4, fp32, highest precision; B drawn at random so the
  comparison can fail);
* the trainable parameter count and Adam state of LoRA rank 32 on `tbac_3b` vs the full recipe,
  from the abstract parameter tree.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.parity import assert_rel_close

MLLM_TARGETS = (r"model/language_model/layers(_\d+)?/self_attn/(q|k|v|o)_proj",
                r"model/language_model/layers(_\d+)?/mlp/(gate|up|down)_proj")


def _tiny_config(scan=False, mllm=False):
    from uniimage_jax.train.config import base_config

    c = base_config(stage="lora", task="t2i", preset="tiny")
    c.model.scan_layers = scan
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.lora.mllm_targets = MLLM_TARGETS if mllm else ()
    c.trainable = ("connector/.*", "metaquery/.*")
    c.split_prompt = not mllm
    c.batch_size = 2
    return c


def _batch(tmp_path, config, model):
    from uniimage_jax.data.pipeline import make_train_iterator
    from uniimage_jax.train import batches
    from uniimage_jax.train import stage_setup

    processor = stage_setup.load_processor_for(config, model, str(tmp_path))
    it = make_train_iterator(config.data, task="t2i", batch_size=2, seed=0,
                             image_size=model.config.image_size)

    def batch():
        arrays, _ = batches.prepare_batch(next(it), processor, model, config, "t2i")
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return batch


def _with_random_b(params, seed, scale=0.05):
    """Every lora_B drawn at random (a trained adapter), so the adapters change the outputs."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, x) in enumerate(leaves):
        if str(getattr(path[-1], "key", "")) == "lora_B":
            x = scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def _bitwise(a, b):
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_zero_b_adapters_leave_the_model_bitwise_unchanged(tmp_path, scan):
    from uniimage_jax.models import lora
    from uniimage_jax.models.uniimage import UniImage
    from uniimage_jax.train import stage_setup

    config = _tiny_config(scan=scan, mllm=True)
    model = stage_setup.build_model(config)
    params = model.init(jax.random.PRNGKey(0))
    base, adapters = lora.split_adapters(params)
    base_model = UniImage(dataclasses.replace(model.config, lora=None))
    assert set(adapters) == {"dit", "mllm"}
    a_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters)
                if str(p[-1].key) == "lora_A"]
    assert a_leaves and all(float(jnp.abs(a).max()) > 0 for a in a_leaves)   # A is drawn
    if scan:  # stacked with the kernels they adapt
        q = params["dit"]["transformer_blocks"]["attn1"]["to_q"]
        assert q["lora_A"].shape == (4, 64, 4) and q["lora_B"].shape == (4, 4, 64)
    batch = _batch(tmp_path, config, model)()
    rng = jax.random.PRNGKey(3)
    for split in (False, True):  # the full pass and the split-prompt path
        loss, aux = jax.jit(lambda p, b: model.loss(p, b, rng, split_prompt=split))(params, batch)
        loss0, aux0 = jax.jit(lambda p, b: base_model.loss(p, b, rng, split_prompt=split))(
            base, batch)
        assert np.asarray(loss).tobytes() == np.asarray(loss0).tobytes(), split
        assert _bitwise(aux["prediction"], aux0["prediction"]), split
    # and the comparison can fail: trained (non-zero) B changes the prediction
    moved = _with_random_b(params, seed=1)
    _, aux1 = jax.jit(lambda p, b: model.loss(p, b, rng, split_prompt=False))(moved, batch)
    assert not _bitwise(aux1["prediction"], aux0["prediction"])


def test_merged_checkpoint_equals_the_adapter_model_after_training(tmp_path):
    from uniimage_jax.models import lora
    from uniimage_jax.models.uniimage import UniImage
    from uniimage_jax.train import step as train_step
    from uniimage_jax.train import stage_setup
    from uniimage_jax.checkpoints.partition import merge_params, partition_params
    from uniimage_jax.train.optimizer import make_optimizer

    config = _tiny_config()
    config.optimizer.lr, config.optimizer.warmup_steps = 1e-2, 1
    model = stage_setup.build_model(config)
    stage_setup.validate(config)
    trainable, frozen = partition_params(model.init(jax.random.PRNGKey(0)),
                                         stage_setup.trainable_patterns(config, model))
    assert "dit" in trainable and all(k in ("lora_A", "lora_B") for k in
                                      trainable["dit"]["transformer_blocks_0"]["attn1"]["to_q"])
    assert "kernel" in frozen["dit"]["transformer_blocks_0"]["attn1"]["to_q"]
    tx = make_optimizer(config.optimizer)
    state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                               opt_state=tx.init(trainable), rng=jax.random.PRNGKey(0))
    step = jax.jit(train_step.make_train_step(model, tx, config), static_argnums=(3,))
    batch = _batch(tmp_path, config, model)
    for _ in range(3):
        state, _ = step(state, frozen, batch(), None)
    b = state.params["dit"]["transformer_blocks_0"]["attn1"]["to_q"]["lora_B"]
    assert float(jnp.abs(b).max()) > 0   # the adapters trained
    params = merge_params(state.params, frozen)
    merged = lora.merge(params, model.config.lora)
    assert not lora.split_adapters(merged)[1]
    plain = UniImage(dataclasses.replace(model.config, lora=None))

    b0 = batch()
    ctx, mask = model.condition(params, b0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 48))
    t = jnp.array([999.0, 300.0])
    v_adapter = model.velocity(params, x, t, ctx, mask)
    v_merged = plain.velocity(merged, x, t, ctx, mask)
    v_base = plain.velocity(lora.split_adapters(params)[0], x, t, ctx, mask)
    assert_rel_close(v_merged, v_adapter, rtol=1e-5, name="merged vs adapters")
    assert float(jnp.max(jnp.abs(v_adapter - v_base))) > 1e-4   # the adapters matter


def _adapted(tree, cfg, seed):
    """`tree` ({"dit": ...} or {"mllm": ...}) with fresh adapters whose B is drawn at random."""
    from uniimage_jax.models import lora

    return _with_random_b(lora.join(tree, lora.init_adapters(tree, cfg, jax.random.PRNGKey(seed))),
                          seed + 1)


def test_exported_dit_adapters_give_diffusers_the_same_velocity(tmp_path):
    import torch
    from diffusers import SanaTransformer2DModel as TorchSana
    from safetensors.numpy import save_file

    from tests.test_sana import TINY, _inputs, _nchw, _randomise
    from uniimage_jax.convert import lora_export
    from uniimage_jax.convert.sana import convert_sana
    from uniimage_jax.models import lora, sana

    torch.manual_seed(0)
    reference = TorchSana(**TINY).eval()
    _randomise(reference, seed=1)
    reference.save_pretrained(str(tmp_path / "transformer"))
    config, params = convert_sana(str(tmp_path / "transformer"))
    # every attention projection, and two layers whose torch names are not list entries
    cfg = lora.LoraConfig(rank=4, alpha=6.0, dit_targets=lora.DEFAULT_DIT_TARGETS + (
        "proj_out", "caption_projection/linear_1"))
    full = _adapted({"dit": params}, cfg, seed=7)
    x, t, ctx, mask = _inputs(config)
    with lora.adapters(cfg):
        ours = jax.jit(sana.SanaTransformer2DModel(config).apply)({"params": full["dit"]}, x, t,
                                                                   ctx, mask)

    def torch_velocity():
        with torch.no_grad():
            return reference(_nchw(x), torch.from_numpy(ctx), torch.from_numpy(t),
                             encoder_attention_mask=torch.from_numpy(mask)).sample.permute(
                0, 2, 3, 1)
    base = torch_velocity()
    adapters = lora.split_adapters(full)[1]["dit"]
    tensors, metadata = lora_export.dit_lora_state_dict(adapters, config, cfg)
    assert "transformer.transformer_blocks.1.attn2.to_out.0.lora_A.weight" in tensors
    assert "transformer.caption_projection.linear_1.lora_B.weight" in tensors
    out = tmp_path / "lora"
    os.makedirs(out)
    save_file(tensors, str(out / lora_export.DIT_FILE), metadata=metadata)
    reference.load_lora_adapter(str(out), weight_name=lora_export.DIT_FILE, prefix="transformer")
    adapted = torch_velocity()
    err = assert_rel_close(ours, adapted, 1e-4, "diffusers + exported adapters vs ours")
    print(f"DiT adapters: relative error {err:.2e}")
    assert float((adapted - base).abs().max()) > 1e-3   # the loaded adapters act
    # scan_layers: the stacked adapters export to the same per-block tensors
    stacked, _ = lora_export.dit_lora_state_dict(sana.scan_params(adapters, config),
                                                 dataclasses.replace(config, scan_layers=True),
                                                 cfg)
    assert sorted(stacked) == sorted(tensors)
    assert all(np.array_equal(stacked[k], tensors[k]) for k in tensors)


def test_exported_mllm_adapters_give_peft_the_same_hidden_states(tmp_path_factory):
    import copy

    import torch
    from peft import PeftModel
    from safetensors.numpy import save_file

    from tests.test_qwen2_5_vl import _get_setup, _image_batch, _jax_forward
    from uniimage_jax.convert import lora_export
    from uniimage_jax.models import lora

    setup = _get_setup("A", tmp_path_factory)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dit_targets=(), mllm_targets=MLLM_TARGETS)
    with pytest.raises(ValueError, match="outside the language model"):
        lora.target_modules({"mllm": setup.params},
                            dataclasses.replace(cfg, mllm_targets=(".*/qkv",)))
    full = _adapted({"mllm": setup.params}, cfg, seed=11)
    batch = _image_batch(setup.config, np.random.default_rng(5))
    with lora.adapters(cfg):
        hidden, logits = _jax_forward(setup.model, full["mllm"], batch)

    tensors, peft_config = lora_export.mllm_peft_adapter(lora.split_adapters(full)[1]["mllm"],
                                                         setup.config, cfg)
    out = tmp_path_factory.mktemp("peft")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(out / "adapter_config.json", "w") as fh:
        json.dump(peft_config, fh)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(setup.hf), str(out)).eval()
    assert peft_model.peft_config["default"].lora_alpha == 8.0
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                         attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                         position_ids=torch.from_numpy(batch["position_ids"]).long(),
                         pixel_values=torch.from_numpy(batch["pixel_values"]),
                         image_grid_thw=torch.tensor(batch["grids"]), output_hidden_states=True)
    base = setup.hf_forward(batch)
    assert len(ref.hidden_states) == hidden.shape[0]
    errs = [assert_rel_close(hidden[i], h, 1e-4, f"hidden state {i}")
            for i, h in enumerate(ref.hidden_states)]
    errs.append(assert_rel_close(logits, ref.logits, 1e-4, "logits"))
    print(f"MLLM adapters: max relative error {max(errs):.2e}")
    assert float((ref.hidden_states[-1] - base.hidden_states[-1]).abs().max()) > 1e-3


def test_lora_rank_32_on_tbac_3b_trains_a_fraction_of_the_full_recipe():
    """Counted from the abstract parameter tree (nothing materialised), against hand counts."""
    from uniimage_jax.bench.trainable import trainable_summary

    full = trainable_summary("tbac_3b", lora_rank=0)
    lora_32 = trainable_summary("tbac_3b", lora_rank=32)
    # hand count: 20 blocks x 8 projections (attn1 and attn2 q/k/v/out, all 2240 -> 2240)
    adapters = 20 * 8 * 32 * (2240 + 2240)
    assert lora_32["adapter_params"] == adapters == 22_937_600
    # the full recipe trains the whole DiT (~1.6B), the connector and 64 query rows
    assert 1.5e9 < full["trainable_params"] < 1.8e9
    extras = lora_32["trainable_params"] - adapters   # connector + metaqueries, as in full
    assert extras == full["trainable_params"] - full["dit_params"]
    assert lora_32["adam_state_bytes"] == 8 * lora_32["trainable_params"]
    assert full["adam_state_bytes"] == 8 * full["trainable_params"]
    print(f"full: {full}\nlora 32: {lora_32}")


def test_cli_lora_stage_samples_unmerged_merges_and_exports(tmp_path, capsys):
    """uniimage-train with config.lora, then sampling the adapter stage as it is, merge-lora,
    sampling the merged checkpoint (the same image), and export-lora. Training runs as its own
    process; the other commands run their `main` in this one (what their console scripts call),
    so both samplings share one compiled sampler."""
    from PIL import Image

    from tests.test_train import _run, _train_cmd
    from uniimage_jax.checkpoints.loader import load_uniimage
    from uniimage_jax.checkpoints.stage import stored_state_entries
    from uniimage_jax.cli import convert as convert_cli
    from uniimage_jax.cli import sample as sample_cli

    w = str(tmp_path / "w")
    stage = os.path.join(w, "lora")
    _run(_train_cmd(w, "--config.stage=lora", "--config.max_steps=3", "--config.batch_size=2",
                    "--config.optimizer.warmup_steps=1", "--config.lora.rank=4",
                    "--config.trainable=('connector/.*',)"))
    # the checkpoint holds the adapters and the connector only
    from etils import epath
    from orbax.checkpoint import PyTreeCheckpointHandler

    from uniimage_jax.models.param_tree import flatten
    meta = PyTreeCheckpointHandler().metadata(epath.Path(stage) / "3" / "state").tree
    stored = ["/".join(k) for k in flatten(meta["params"])]
    assert stored and all(k.startswith("connector/") or k.endswith(("lora_A", "lora_B"))
                          for k in stored), stored[:5]
    assert "ema" not in stored_state_entries(stage)
    config, params, _ = load_uniimage(stage)
    assert config.lora.rank == 4 and config.lora.alpha == 4.0

    def sample(ckpt, out):
        assert sample_cli.main(["--checkpoint", ckpt, "--processor",
                                os.path.join(w, "tiny_processor"), "--prompt", "a red circle",
                                "--steps", "2", "--num-images", "1", "--images-per-call", "1",
                                "--out", out, "--no-grid"]) == 0, capsys.readouterr().err[-2000:]
        return np.asarray(Image.open(os.path.join(out, "00000_00.png")), np.int32)

    merged_dir = str(tmp_path / "merged")
    assert convert_cli.main(["merge-lora", "--src", stage, "--dst", merged_dir]) == 0
    unmerged = sample(stage, str(tmp_path / "s_adapters"))
    merged = sample(merged_dir, str(tmp_path / "s_merged"))
    assert np.abs(unmerged - merged).max() <= 1   # uint8 rounding of ~1e-6 differences
    export = str(tmp_path / "export")
    assert convert_cli.main(["export-lora", "--src", stage, "--dst", export]) == 0
    assert os.listdir(export) == ["pytorch_lora_weights.safetensors"]
    # a stage without adapters is refused with a one-line error
    capsys.readouterr()
    assert convert_cli.main(["export-lora", "--src", merged_dir, "--dst",
                             str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not trained with LoRA" in err and err.count("\n") == 1, err[-2000:]
