"""Qwen2.5-VL port: parity with transformers' Qwen2_5_VLForConditionalGeneration at fp32.

Tiny random HF models are saved with `save_pretrained`, converted with our converter, and compared
layer by layer (HF `output_hidden_states`) and on logits. Config A exercises several windows with
a merged grid that is not a multiple of the window, a full-attention block, GQA, untied lm_head and
unequal M-RoPE sections; config B a tied lm_head, no GQA, the legacy checkpoint key layout.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.parity import assert_rel_close, to_numpy
from uniimage_jax.models import param_tree
from uniimage_jax.convert import qwen2_5_vl as conv
from uniimage_jax.models import qwen2_5_vl as qwen

IMAGE, VIDEO, VSTART, VEND = 100, 101, 98, 99
PAD = 0

CONFIGS = {
    "A": dict(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                           out_hidden_size=32, fullatt_block_indexes=[1]),
        tie_word_embeddings=False),
    "B": dict(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                          "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=20, num_heads=4, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                           out_hidden_size=32, fullatt_block_indexes=[0]),
        tie_word_embeddings=True),
}
# Two non-square images; merged grids 3x5 and 5x2 are not multiples of config A's 2x2 window.
GRIDS = ((1, 6, 10), (1, 10, 4))


def _randomise(model: torch.nn.Module, seed: int):
    """Non-trivial weights: HF initialises norms to one and biases to zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                std = 1.0 if "embed_tokens" in name else fan_in ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _save_legacy_layout(model, path):
    """Re-save a model with the pre-4.52 key names (model.layers.*, visual.*)."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        sd[k] = v.contiguous()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    os.remove(os.path.join(path, "model.safetensors"))
    save_file(sd, os.path.join(path, "model.safetensors"))


class Setup:
    def __init__(self, name, tmp_path_factory):
        from transformers import Qwen2_5_VLConfig as HFConfig
        from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

        hf_cfg = HFConfig(**CONFIGS[name], image_token_id=IMAGE, video_token_id=VIDEO,
                          vision_start_token_id=VSTART, vision_end_token_id=VEND)
        torch.manual_seed(0)
        self.hf = HFModel(hf_cfg).eval()
        # eager attention: on left-padding rows (which attend to nothing) it spreads attention
        # uniformly, as ours does, so every position can be compared; sdpa differs there only.
        self.hf.set_attn_implementation("eager")
        _randomise(self.hf, seed=ord(name))
        self.dir = str(tmp_path_factory.mktemp(f"qwen_{name}"))
        self.hf.save_pretrained(self.dir)
        if name == "B":
            _save_legacy_layout(self.hf, self.dir)
        self.config, self.params = conv.convert_qwen(self.dir)
        self.model = qwen.Qwen2_5_VLForConditionalGeneration(self.config)
        self.name = name
        self.cache = {}  # results shared between tests (each costs a compilation)

    def hf_forward(self, batch):
        kw = {}
        if batch.get("grids"):
            kw = dict(pixel_values=torch.from_numpy(batch["pixel_values"]),
                      image_grid_thw=torch.tensor(batch["grids"]))
        with torch.no_grad():
            return self.hf(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                           attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                           position_ids=torch.from_numpy(batch["position_ids"]).long(),
                           output_hidden_states=True, **kw)


_SETUPS: dict[str, Setup] = {}


def _get_setup(name, tmp_path_factory) -> Setup:
    if name not in _SETUPS:
        _SETUPS[name] = Setup(name, tmp_path_factory)
    return _SETUPS[name]


@pytest.fixture(scope="module", params=["A", "B"])
def setup(request, tmp_path_factory):
    return _get_setup(request.param, tmp_path_factory)  # tiny models: kept for setup_a


@pytest.fixture(scope="module")
def setup_a(tmp_path_factory):
    """Config A only, for checks one configuration covers (each costs a compilation)."""
    return _get_setup("A", tmp_path_factory)


def _left_pad(rows):
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), PAD, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


def _text_batch(config, rng):
    rows = [rng.integers(1, 90, size=9), rng.integers(1, 90, size=6)]
    ids, mask = _left_pad(rows)
    pos, _ = qwen.get_rope_index(config, ids, None, mask)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos, grids=None)


def _image_batch(config, rng):
    v = config.vision_config
    rows = []
    for t, h, w in GRIDS:
        n = t * h * w // v.spatial_merge_size ** 2
        rows.append([*rng.integers(1, 90, size=3), VSTART, *[IMAGE] * n, VEND,
                     *rng.integers(1, 90, size=4)])
    rows[1] = rows[1] + list(rng.integers(1, 90, size=3))  # unequal lengths: left padding
    ids, mask = _left_pad(rows)
    n_patches = sum(t * h * w for t, h, w in GRIDS)
    pixel_values = rng.standard_normal((n_patches, v.patch_dim)).astype(np.float32)
    pos, _ = qwen.get_rope_index(config, ids, GRIDS, mask)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos, grids=GRIDS,
                pixel_values=pixel_values)


def _jax_forward(model, params, batch):
    """(hidden states (L+1, B, T, D), logits) from one jitted forward pass."""
    grids = batch.get("grids")

    @jax.jit
    def f(params, ids, mask, pos, pv):
        kw = dict(pixel_values=pv, image_grid_thw=grids) if grids else {}
        hs, out = qwen.hidden_states(model, params, ids, mask, pos, return_output=True, **kw)
        return hs, out.logits

    return f(params, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
             batch.get("pixel_values"))


def _image_batch_and_forward(setup):
    """The image batch and our unscanned forward on it, computed once per config."""
    if "images" not in setup.cache:
        batch = _image_batch(setup.config, np.random.default_rng(3))
        setup.cache["images"] = batch, _jax_forward(setup.model, setup.params, batch)
    return setup.cache["images"]


def _check_against_hf(setup, batch, ours, tol=1e-4, at=None):
    """Our hidden states and logits against transformers', at every position or at the
    (batch, position) entries where the boolean array `at` is True."""
    ref = setup.hf_forward(batch)
    hs, logits = ours
    assert hs.shape[0] == len(ref.hidden_states) == setup.config.num_hidden_layers + 1
    pick = to_numpy if at is None else (lambda a: to_numpy(a)[at])
    errs = [assert_rel_close(pick(hs[i]), pick(h), tol, f"{setup.name} hidden state {i}")
            for i, h in enumerate(ref.hidden_states)]
    errs.append(assert_rel_close(pick(logits), pick(ref.logits), tol, f"{setup.name} logits"))
    print(f"config {setup.name}: max relative error {max(errs):.2g}")
    return max(errs)


def test_text_only_left_padded(setup):
    batch = _text_batch(setup.config, np.random.default_rng(1))
    _check_against_hf(setup, batch, _jax_forward(setup.model, setup.params, batch))


def test_rope_index_matches_hf(setup):
    cfg = setup.config
    batch = _image_batch(cfg, np.random.default_rng(2))
    ids = torch.from_numpy(batch["input_ids"]).long()
    types = (ids == IMAGE).int()
    ref_pos, ref_delta = setup.hf.model.get_rope_index(
        ids, types, image_grid_thw=torch.tensor(GRIDS),
        attention_mask=torch.from_numpy(batch["attention_mask"]))
    np.testing.assert_array_equal(batch["position_ids"], ref_pos.numpy())
    _, delta = qwen.get_rope_index(cfg, batch["input_ids"], GRIDS, batch["attention_mask"])
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_images_left_padded(setup):
    batch, ours = _image_batch_and_forward(setup)
    _check_against_hf(setup, batch, ours)


def test_vision_tower(setup):
    # Includes a 2-frame grid (temporal axis) and the two image sizes of the batch test.
    grids = ((1, 6, 10), (2, 4, 6), (1, 10, 4))
    v = setup.config.vision_config
    n = sum(t * h * w for t, h, w in grids)
    pv = np.random.default_rng(4).standard_normal((n, v.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = setup.hf.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor(grids))
    ref = ref.pooler_output
    out = jax.jit(lambda p, x: setup.model.apply({"params": p}, x, grids,
                                                 method="get_image_features"))(setup.params, pv)
    assert_rel_close(out, ref, 1e-4, f"{setup.name} vision tower")


def test_scanned_equals_unscanned(setup_a):
    setup = setup_a
    cfg = dataclasses.replace(setup.config, scan_layers=True)
    params = qwen.scan_params(setup.params, cfg)
    lm = params["model"]["language_model"]
    assert "layers_0" not in lm and lm["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == \
        cfg.num_hidden_layers
    back = qwen.unscan_params(params, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, setup.params)
    batch, (hs0, lg0) = _image_batch_and_forward(setup)
    hs1, lg1 = _jax_forward(qwen.Qwen2_5_VLForConditionalGeneration(cfg), params, batch)
    assert_rel_close(hs1, hs0, 1e-6, "scanned hidden states")
    assert_rel_close(lg1, lg0, 1e-6, "scanned logits")
    # the abstract scanned tree is what scan_params produces
    shapes = param_tree.target_shapes(qwen.abstract_params(cfg))
    assert shapes == param_tree.target_shapes(params)


def test_kv_cache_two_chunks(setup):
    """Prefill (with the images) then a second chunk through the cache == one full forward.
    Config A runs it with scanned layers (the cache is scanned along the layer axis)."""
    scan = setup.name == "A"
    cfg = dataclasses.replace(setup.config, scan_layers=scan)
    params = qwen.scan_params(setup.params, cfg) if scan else setup.params
    model = qwen.Qwen2_5_VLForConditionalGeneration(cfg)
    batch, (_, full) = _image_batch_and_forward(setup)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    b, t = ids.shape
    size = t + 3
    cache = qwen.init_kv_cache(cfg, b, size)
    cache_mask = np.concatenate([mask, np.ones((b, size - t), np.int32)], 1)
    split = t - 3  # the images are in the first chunk
    step = jax.jit(lambda p, i, m, q, c, ci, **kw: model.apply({"params": p}, i, m, q, kv_cache=c,
                                                               cache_index=ci, **kw),
                   static_argnames=("image_grid_thw",))
    out1 = step(params, ids[:, :split], cache_mask, pos[:, :, :split], cache, jnp.int32(0),
                pixel_values=batch["pixel_values"], image_grid_thw=GRIDS)
    out2 = step(params, ids[:, split:], cache_mask, pos[:, :, split:], out1.kv_cache,
                jnp.int32(split))
    valid = mask.astype(bool)
    got = np.concatenate([np.asarray(out1.logits), np.asarray(out2.logits)], 1)
    assert_rel_close(got[valid], np.asarray(full)[valid], 1e-5, "cached logits")
    assert out2.kv_cache["k"].shape == (cfg.num_hidden_layers, b, size, cfg.num_key_value_heads,
                                        cfg.head_dim)


def test_causal_query_blocks_cover_each_query_with_the_keys_it_may_see():
    block = qwen.CAUSAL_QUERY_BLOCK
    assert qwen.causal_query_blocks(318, 0, 382) == [(0, block, block), (block, 2 * block,
                                                                         2 * block),
                                                    (2 * block, 318, 318)]
    assert qwen.causal_query_blocks(64, 318, 382) == [(0, 64, 382)]   # the metaqueries
    assert qwen.causal_query_blocks(3, 5, 40) == [(0, 3, 8)]


def test_causal_query_blocks_match_transformers(setup_a, monkeypatch):
    """Blocks of 5 queries (against prompts of 20-odd tokens, so several blocks, the last one
    short): one forward pass against transformers, and prefill + second chunk through the cache
    at offsets known when tracing (the split prompt's form) against the same logits. At the
    tokens only: a left-padding position sees no key, and its output (read by nothing) is the
    mean of the values it is shown, fewer of them in a block."""
    monkeypatch.setattr(qwen, "CAUSAL_QUERY_BLOCK", 5)
    setup = setup_a
    batch = _image_batch(setup.config, np.random.default_rng(3))
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    valid = mask.astype(bool)
    assert ids.shape[1] > 3 * 5 and not valid.all()
    _, full = ours = _jax_forward(setup.model, setup.params, batch)
    _check_against_hf(setup, batch, ours, at=valid)
    b, t = ids.shape
    size, split = t + 3, t - 3   # the images in the first chunk
    cache = qwen.init_kv_cache(setup.config, b, size)
    cache_mask = np.concatenate([mask, np.ones((b, size - t), np.int32)], 1)

    def chunk(params, ids, pos, cache, index, **images):
        return setup.model.apply({"params": params}, ids, cache_mask, pos, kv_cache=cache,
                                 cache_index=index, **images)
    out1 = jax.jit(lambda p, i, q, c, pv: chunk(p, i, q, c, 0, pixel_values=pv,
                                                image_grid_thw=GRIDS))(
        setup.params, ids[:, :split], pos[:, :, :split], cache, batch["pixel_values"])
    out2 = jax.jit(lambda p, i, q, c: chunk(p, i, q, c, split))(
        setup.params, ids[:, split:], pos[:, :, split:], out1.kv_cache)
    got = np.concatenate([np.asarray(out1.logits), np.asarray(out2.logits)], 1)
    assert_rel_close(got[valid], np.asarray(full)[valid], 1e-5, "cached logits in blocks")


def test_config_round_trip_and_hf_parse(setup):
    cfg = setup.config
    assert qwen.Qwen2_5_VLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with open(os.path.join(setup.dir, "config.json")) as fh:
        nested = json.load(fh)
    # the older flat layout: text fields at the top level, rope_scaling + rope_theta
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    text.pop("model_type")
    rope = text.pop("rope_parameters")
    flat.update(text, rope_theta=rope["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    assert qwen.Qwen2_5_VLConfig.from_hf(flat) == cfg
    assert cfg.tie_word_embeddings == (setup.name == "B")
    assert ("lm_head" in setup.params) == (setup.name == "A")


# The published Qwen2.5-VL-3B-Instruct config.json (legacy flat layout), minus unused fields.
LEGACY_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
    "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                      "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def test_3b_config_parses_in_both_layouts():
    from transformers import Qwen2_5_VLConfig as HFConfig

    preset = qwen.Qwen2_5_VLConfig.qwen2_5_vl_3b()
    assert qwen.Qwen2_5_VLConfig.from_hf(LEGACY_3B_CONFIG) == preset
    # transformers 5 reads the legacy file and writes the nested layout
    assert qwen.Qwen2_5_VLConfig.from_hf(HFConfig(**LEGACY_3B_CONFIG).to_dict()) == preset


def test_3b_preset():
    c = qwen.Qwen2_5_VLConfig.qwen2_5_vl_3b()
    v = c.vision_config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size) == (2048, 36, 16, 2, 128, 11008, 151936)
    assert c.mrope_section == (16, 24, 24) and c.tie_word_embeddings and c.rope_theta == 1e6
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.window_size,
            v.fullatt_block_indexes, v.out_hidden_size) == (32, 1280, 16, 3420, 112,
                                                            (7, 15, 23, 31), 2048)


def test_bad_inputs_are_named(setup):
    cfg = setup.config
    batch = _image_batch(cfg, np.random.default_rng(7))
    with pytest.raises(ValueError, match="image tokens"):
        qwen.get_rope_index(cfg, batch["input_ids"], GRIDS[:1], batch["attention_mask"])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        setup.model.apply({"params": setup.params}, batch["pixel_values"][:-4], GRIDS,
                          method="get_image_features")
    with pytest.raises(ValueError, match="mrope_section"):
        dataclasses.replace(cfg, mrope_section=(1, 1, 1))


def test_bf16_remat_scan_runs_close(setup_a):
    """Accelerator settings (bf16 compute, remat, scan) run and stay near the fp32 result."""
    setup = setup_a
    cfg = dataclasses.replace(setup.config, scan_layers=True, remat=True)
    model = qwen.Qwen2_5_VLForConditionalGeneration(cfg, dtype=jnp.bfloat16)
    batch, (_, ref_logits) = _image_batch_and_forward(setup)
    out = jax.jit(lambda p, pv: model.apply(
        {"params": p}, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
        pixel_values=pv, image_grid_thw=GRIDS))(qwen.scan_params(setup.params, cfg),
                                                batch["pixel_values"])
    assert out.logits.dtype == jnp.float32 and out.last_hidden_state.dtype == jnp.bfloat16
    assert_rel_close(out.logits, ref_logits, 5e-2, "bf16 logits")


def test_every_parameter_has_logical_axes():
    import flax.linen as nn

    for scan in (False, True):
        cfg = qwen.Qwen2_5_VLConfig.from_hf(dict(CONFIGS["A"], image_token_id=IMAGE),
                                            scan_layers=scan)
        leaves = jax.tree_util.tree_flatten_with_path(
            qwen.abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
        for path, leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no axes"
            assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
            named = [n for n in leaf.names if n is not None]
            assert len(set(named)) == len(named), f"{jax.tree_util.keystr(path)}: {leaf.names}"
            if scan and "layers" in jax.tree_util.keystr(path) and "visual" not in \
                    jax.tree_util.keystr(path):
                assert leaf.names[0] == "layers", jax.tree_util.keystr(path)


def test_vision_tower_per_row(setup):
    """Batched form (rows of one fixed grid, the training layout): each row equals HF's tower on
    that row's image, and the rows together equal the flat form within 1e-6 (fp32)."""
    grid, rows = ((1, 6, 10),), 3
    v = setup.config.vision_config
    n = 60
    pv = np.random.default_rng(5).standard_normal((rows, n, v.patch_dim)).astype(np.float32)
    features = jax.jit(lambda p, x, g: setup.model.apply({"params": p}, x, g,
                                                         method="get_image_features"),
                       static_argnums=2)
    batched = np.asarray(features(setup.params, pv, grid))
    flat = np.asarray(features(setup.params, pv.reshape(rows * n, -1), grid * rows))
    assert batched.shape == (rows, n // 4, v.out_hidden_size)
    np.testing.assert_allclose(batched.reshape(flat.shape), flat, rtol=0, atol=1e-6)
    for r in range(rows):
        with torch.no_grad():
            ref = setup.hf.model.visual(torch.from_numpy(pv[r]), grid_thw=torch.tensor(grid))
        assert_rel_close(batched[r], ref.pooler_output, 1e-4, f"{setup.name} vision row {r}")
