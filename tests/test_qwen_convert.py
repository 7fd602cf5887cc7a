"""Qwen2.5-VL checkpoint conversion: both key layouts, sharded and unsharded, strict failures
through the CLI, and the full 3B architecture checked key by key and shape by shape without
weights (torch `meta` device + `jax.eval_shape`)."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import tiny_assets
from tests.parity import assert_rel_close
from uniimage_jax.convert import key_plan
from uniimage_jax.models import param_tree
from uniimage_jax.convert import qwen2_5_vl as qconv
from uniimage_jax.models import qwen2_5_vl as qwen

# Key layouts: transformers 5.23's `save_pretrained` writes the legacy one (it reverts its own
# load-time renames on save); checkpoints saved by transformers 4.52-4.57 use the new one.
TO_LEGACY = ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."))
TO_NEW = ((r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
          (r"^visual\.", "model.visual."))


def _randomize(model, seed=0):
    """Non-trivial values everywhere (norm weights and biases included) so a misplaced tensor
    changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name or "ln_q" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def _rename(key, rules):
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _relayout(directory, rules):
    """Rewrite every tensor name of a saved directory (files and index) with `rules`."""
    from safetensors.torch import load_file, save_file

    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        if f.endswith(".safetensors"):
            tensors = load_file(path)
            save_file({_rename(k, rules): v for k, v in tensors.items()}, path,
                      metadata={"format": "pt"})
        elif f.endswith(".safetensors.index.json"):
            with open(path) as fh:
                index = json.load(fh)
            index["weight_map"] = {_rename(k, rules): v for k, v in index["weight_map"].items()}
            with open(path, "w") as fh:
                json.dump(index, fh)


def _stored_keys(directory):
    from safetensors import safe_open

    keys = set()
    for f in os.listdir(directory):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "np") as h:
                keys |= set(h.keys())
    return keys


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_assets.tiny_qwen_hf_config()).eval()
    _randomize(model)
    return model


def _save(hf_model, path, sharded, legacy):
    kw = {"max_shard_size": "60KB"} if sharded else {}
    hf_model.save_pretrained(path, **kw)
    files = os.listdir(path)
    if sharded:
        assert any(f.endswith(".safetensors.index.json") for f in files)
        assert sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert "model.safetensors" in files
    _relayout(str(path), TO_LEGACY if legacy else TO_NEW)
    keys = _stored_keys(str(path))
    if legacy:
        assert "visual.patch_embed.proj.weight" in keys and "model.layers.0.mlp.up_proj.weight" \
            in keys and not any(k.startswith("model.language_model.") for k in keys)
    else:
        assert "model.visual.patch_embed.proj.weight" in keys and not any(
            k.startswith(("visual.", "model.layers.", "model.embed_tokens.")) for k in keys)
    return str(path)


@pytest.fixture(scope="module")
def reference_params(hf_model, tmp_path_factory):
    """Conversion of the plain (new layout, one file) checkpoint."""
    return qconv.convert_qwen(_save(hf_model, tmp_path_factory.mktemp("plain"), False, False))


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("legacy", [False, True], ids=["new-keys", "legacy-keys"])
def test_layouts_convert_to_the_same_params(hf_model, reference_params, tmp_path, sharded,
                                            legacy):
    src = _save(hf_model, tmp_path / "hf", sharded, legacy)
    config, params = qconv.convert_qwen(src)
    ref_config, ref_params = reference_params
    assert config == ref_config
    flat, ref = param_tree.flatten(params), param_tree.flatten(ref_params)
    assert flat.keys() == ref.keys()
    for path in ref:
        np.testing.assert_array_equal(flat[path], ref[path], err_msg="/".join(path))


def test_converted_values_and_layouts(hf_model, reference_params):
    """Spot-check the layout transforms against the torch tensors."""
    _, params = reference_params
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    m = params["model"]
    np.testing.assert_array_equal(m["language_model"]["embed_tokens"]["embedding"],
                                  sd["model.language_model.embed_tokens.weight"])
    np.testing.assert_array_equal(m["language_model"]["layers_1"]["self_attn"]["k_proj"]["kernel"],
                                  sd["model.language_model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(m["visual"]["merger"]["mlp_2"]["kernel"],
                                  sd["model.visual.merger.mlp.2.weight"].T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    conv = sd["model.visual.patch_embed.proj.weight"]  # (O, C, t, h, w)
    flax_conv = param_tree.flatten(m["visual"]["patch_embed"])
    (leaf,) = [v for p, v in flax_conv.items() if p[-1] == "kernel"]
    np.testing.assert_array_equal(leaf, np.transpose(conv, (2, 3, 4, 1, 0)))


def test_converted_text_logits_match_transformers(hf_model, reference_params):
    """The converted tree drives the Flax model to HF's logits (text-only forward)."""
    config, params = reference_params
    ids = np.random.default_rng(0).integers(0, 300, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    pos, _ = qwen.get_rope_index(config, ids, None, mask)
    out = qwen.Qwen2_5_VLForConditionalGeneration(config).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    valid = mask.astype(bool)
    err = assert_rel_close(np.asarray(out.logits)[valid], ref[valid], 1e-4, "logits")
    print(f"converted tiny Qwen2.5-VL text logits: relative error {err:.2e}")


def test_bad_checkpoint_fails_naming_every_key_and_writes_nothing(hf_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from uniimage_jax.cli.convert import main

    src = _save(hf_model, tmp_path / "bad", False, False)
    f = os.path.join(src, "model.safetensors")
    tensors = load_file(f)
    removed = "model.language_model.layers.0.mlp.up_proj.weight"
    renamed = "model.visual.blocks.1.attn.proj.bias"
    reshaped = "model.language_model.layers.1.self_attn.k_proj.weight"
    del tensors[removed]
    tensors["model.visual.blocks.1.attn.prj.bias"] = tensors.pop(renamed)
    tensors[reshaped] = tensors[reshaped].T.contiguous()
    save_file(tensors, f, metadata={"format": "pt"})

    dst = tmp_path / "out" / "mllm"
    capsys.readouterr()
    rc = main(["mllm", "--src", src, "--dst", str(dst)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "model/language_model/layers_0/mlp/up_proj/kernel" in err  # missing (the removed one)
    assert "model.visual.blocks.1.attn.prj.bias" in err  # unexpected (the renamed one)
    assert "model/visual/blocks_1/attn/proj/bias" in err  # ... and its now-missing target
    assert reshaped in err  # mis-shaped
    assert not dst.exists()
    assert not (dst.parent.exists() and os.listdir(dst.parent)), "left files behind"


def _hf_3b_config():
    """Qwen2.5-VL-3B-Instruct's architecture (its published config.json) as a transformers config."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=128000, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [16, 24, 24]}),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048, hidden_act="silu",
            tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True)


class _ShapeOnlySource:
    """A conversion source that only reports keys and shapes (the planner reads nothing else)."""

    path = "Qwen2.5-VL-3B (meta device)"

    def __init__(self, shapes):
        self._shapes = shapes

    def keys(self):
        return sorted(self._shapes)

    def shape(self, key):
        return self._shapes[key]


@pytest.fixture(scope="module")
def full_size():
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_config = _hf_3b_config()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k != "lm_head.weight")
    config = qwen.Qwen2_5_VLConfig.from_hf(hf_config.to_dict())
    target = param_tree.target_shapes(qwen.abstract_params(config))
    return hf_config, config, shapes, n_params, target


def test_full_size_3b_config_is_the_preset(full_size):
    _, config, _, n_params, _ = full_size
    assert config == qwen.Qwen2_5_VLConfig.qwen2_5_vl_3b()
    assert 3.7e9 < n_params < 3.8e9  # Qwen2.5-VL-3B: 3.75B parameters (tied embeddings)


@pytest.mark.parametrize("legacy", [False, True], ids=["new-keys", "legacy-keys"])
def test_full_size_3b_every_key_maps_with_its_shape(full_size, legacy):
    hf_config, config, shapes, _, target = full_size
    if legacy:
        shapes = {_rename(k, TO_LEGACY): s for k, s in shapes.items()}
        assert "model.layers.35.mlp.up_proj.weight" in shapes
    # the keymap convert_qwen uses for a tied model (lm_head.weight is a copy of the embedding)
    keymap = qconv.TIED_KEYMAP if config.tie_word_embeddings else qconv.KEYMAP
    plan = key_plan.plan_conversion(_ShapeOnlySource(shapes), keymap, target)
    produced = {path for _, path, _ in plan.entries}
    assert produced == set(target), "Flax parameters left without a source tensor"
    dropped = set(shapes) - {k for k, _, _ in plan.entries}
    assert dropped <= {"lm_head.weight"}, f"source tensors not converted: {sorted(dropped)}"
    for key, path, fn in plan.entries:  # the planner checked shapes; make it visible here too
        assert key_plan._transformed_shape(fn, path, shapes[key]) == target[path], key
    assert sum(int(np.prod(s)) for s in target.values()) == sum(
        int(np.prod(shapes[k])) for k, _, _ in plan.entries)
