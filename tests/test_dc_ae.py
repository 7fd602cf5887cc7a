"""DC-AE parity against diffusers' AutoencoderDC, the converter's strictness, and the full-size
key map (built on torch's meta device, so no memory)."""
import dataclasses
import inspect
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC as TorchAutoencoderDC
from diffusers.models.attention_processor import SanaMultiscaleLinearAttention as TorchLiteMLA
from diffusers.models.normalization import RMSNorm as TorchRMSNorm
from safetensors.torch import load_file, save_file

from tests.parity import assert_rel_close
from uniimage_jax.checkpoints import converted
from uniimage_jax.cli import convert as cli
from uniimage_jax.convert import key_plan
from uniimage_jax.models import param_tree
from uniimage_jax.convert import dc_ae as convert_dc
from uniimage_jax.models import dc_ae

# Every block type / option of the sana-1.0 config, tiny: ResBlock and EfficientViT stages with
# several layers, multi-scale (5x5) attention, strided-conv down / interpolate up with their
# channel shortcuts (group sizes 2 and 4), encoder-out / decoder-in shortcuts, RMSNorm -> ReLU out.
TINY = dict(
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
    encoder_layers_per_block=[2, 1, 2], decoder_layers_per_block=[1, 2, 2],
    encoder_qkv_multiscales=[[], [5], [5]], decoder_qkv_multiscales=[[], [5], [5]],
    downsample_block_type="conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", decoder_conv_act_fn="relu",
    scaling_factor=0.41407,
)
# The other published options: pixel-unshuffle / pixel-shuffle resampling, no in/out shortcuts.
PIXEL_SHUFFLE = dict(TINY, downsample_block_type="pixel_unshuffle",
                     upsample_block_type="pixel_shuffle", encoder_out_shortcut=False,
                     decoder_in_shortcut=False, decoder_act_fns="relu", scaling_factor=1.7)


def _save_random_torch_model(config: dict, path: str, seed: int = 0) -> TorchAutoencoderDC:
    torch.manual_seed(seed)
    model = TorchAutoencoderDC(**config).eval()
    with torch.no_grad():
        for m in model.modules():  # norms start at weight 1 / bias 0: make them matter
            if isinstance(m, TorchRMSNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcae_tiny"))
    torch_model = _save_random_torch_model(TINY, path)
    config, params = convert_dc.convert_dc_ae(path)
    return path, torch_model, config, params


class _PathCounter:
    """Counts which attention path ran, in diffusers and in our port."""

    def __init__(self, monkeypatch):
        self.torch = {"linear": 0, "quadratic": 0}
        self.ours = {"linear": 0, "quadratic": 0}
        for kind in ("linear", "quadratic"):
            t_fn = getattr(TorchLiteMLA, f"apply_{kind}_attention")
            o_fn = getattr(dc_ae, f"{kind}_attention")

            def t_wrap(self_, *a, _fn=t_fn, _k=kind):
                self.torch[_k] += 1
                return _fn(self_, *a)

            def o_wrap(*a, _fn=o_fn, _k=kind):
                self.ours[_k] += 1
                return _fn(*a)

            monkeypatch.setattr(TorchLiteMLA, f"apply_{kind}_attention", t_wrap)
            monkeypatch.setattr(dc_ae, f"{kind}_attention", o_wrap)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _encode_and_decode(model):
    """One jitted function for both directions (one compile per test: the CPU is shared)."""
    return jax.jit(lambda params, x, z: (model.apply({"params": params}, x, method="encode"),
                                         model.apply({"params": params}, z, method="decode")))


# EfficientViT stages run at 1/2 and 1/4 of the image size; attention is linear iff H*W > 8.
# (16, 16): 8x8 and 4x4 maps -> linear only.
# (8, 16): 4x8 maps linear, 2x4 = 8 maps quadratic (the strict `>` boundary).
@pytest.mark.parametrize("hw,paths", [((16, 16), {"linear"}), ((8, 16), {"linear", "quadratic"})])
def test_encode_decode_parity(tiny, hw, paths, monkeypatch):
    _, torch_model, config, params = tiny
    model = dc_ae.AutoencoderDC(config)
    rng = np.random.default_rng(hw[0] * 100 + hw[1])
    x = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    r = config.spatial_compression_ratio
    z = rng.normal(size=(2, hw[0] // r, hw[1] // r, config.latent_channels)).astype(np.float32)

    counter = _PathCounter(monkeypatch)
    with torch.no_grad():
        ref_latent = torch_model.encode(_nchw(x)).latent * TINY["scaling_factor"]
        ref_image = torch_model.decode(_nchw(z) / TINY["scaling_factor"]).sample
    latent, image = _encode_and_decode(model)(params, x, z)  # traced once: counts are per call

    # both implementations took the same attention paths, and the ones this size is meant for
    assert counter.ours == counter.torch, (counter.ours, counter.torch)
    assert {k for k, n in counter.torch.items() if n} == paths, counter.torch
    assert assert_rel_close(latent, _nhwc(ref_latent), 1e-4, f"encode {hw}") <= 1e-4
    assert assert_rel_close(image, _nhwc(ref_image), 1e-4, f"decode {hw}") <= 1e-4


def test_attention_path_rule_matches_diffusers():
    # the test sizes above rely on this rule; state it against diffusers' source
    src = inspect.getsource(
        __import__("diffusers.models.attention_processor",
                   fromlist=["x"]).SanaMultiscaleAttnProcessor2_0.__call__)
    assert "height * width > attn.attention_head_dim" in src
    assert dc_ae.uses_linear_attention(2, 4, 8) is False
    assert dc_ae.uses_linear_attention(3, 3, 8) is True


def test_pixel_shuffle_variant_parity(tmp_path):
    torch_model = _save_random_torch_model(PIXEL_SHUFFLE, str(tmp_path), seed=1)
    config, params = convert_dc.convert_dc_ae(str(tmp_path))
    assert config.downsample_by_pixel_unshuffle and not config.upsample_by_interpolation
    model = dc_ae.AutoencoderDC(config)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (1, 8, 16, 3)).astype(np.float32)
    z = rng.normal(size=(1, 2, 4, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        ref_latent = torch_model.encode(_nchw(x)).latent * PIXEL_SHUFFLE["scaling_factor"]
        ref_image = torch_model.decode(_nchw(z) / PIXEL_SHUFFLE["scaling_factor"]).sample
    latent, image = _encode_and_decode(model)(params, x, z)
    assert_rel_close(latent, _nhwc(ref_latent), 1e-4, "encode")
    assert_rel_close(image, _nhwc(ref_image), 1e-4, "decode")


def test_cli_roundtrip(tiny, tmp_path):
    path, _, config, params = tiny
    dst = str(tmp_path / "out")
    assert cli.main(["vae", "--src", path, "--dst", dst]) == 0
    loaded_config, loaded = converted.load_dc_ae(dst)
    assert loaded_config == config
    flat, flat_loaded = param_tree.flatten(params), param_tree.flatten(loaded)
    assert flat.keys() == flat_loaded.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat_loaded[k]), flat[k], err_msg=str(k))
    # an existing destination is not overwritten silently
    assert cli.main(["vae", "--src", path, "--dst", dst]) == 2


def test_sharded_checkpoint_converts_identically(tiny, tmp_path):
    path, torch_model, _, params = tiny
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="20KB")
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(tmp_path))
    _, sharded = convert_dc.convert_dc_ae(str(tmp_path))
    flat, flat_sharded = param_tree.flatten(params), param_tree.flatten(sharded)
    assert flat.keys() == flat_sharded.keys()
    for k in flat:
        np.testing.assert_array_equal(flat_sharded[k], flat[k], err_msg=str(k))


def test_unsupported_config_fails_cleanly(tiny, tmp_path, capsys):
    path, *_ = tiny
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, decoder_norm_types="batch_norm")))
    assert cli.main(["vae", "--src", str(tmp_path), "--dst", str(tmp_path / "out")]) == 2
    assert "decoder_norm_types" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_checkpoint_names_every_problem(tiny, tmp_path, capsys):
    path, *_ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(os.path.join(path, "config.json")) as fh:
        (bad / "config.json").write_text(fh.read())
    sd = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    removed = "decoder.up_blocks.1.2.attn.to_qkv_multiscale.0.proj_out.weight"
    renamed = "encoder.down_blocks.0.1.conv2.weight"
    reshaped = "encoder.down_blocks.2.0.conv_out.conv_depth.weight"
    del sd[removed]
    sd[renamed.replace("conv2", "conv3")] = sd.pop(renamed)
    sd[reshaped] = sd[reshaped][:-1].clone()
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    dst = tmp_path / "out"
    assert cli.main(["vae", "--src", str(bad), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "decoder/up_blocks_1_2/attn/to_qkv_multiscale_0/proj_out/kernel" in err  # missing
    assert "encoder/down_blocks_0_1/conv2/kernel" in err  # missing (renamed away)
    assert "encoder.down_blocks.0.1.conv3.weight" in err  # unexpected
    assert reshaped in err and "mis-shaped" in err
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temp dir left


def test_full_size_keys_map_exactly():
    """Every tensor of the real dc-ae-f32c32-sana-1.0 maps to a Flax param of the same shape."""
    config = dc_ae.DCAEConfig.dc_ae_f32c32_sana_1_0()
    with torch.device("meta"):
        torch_model = TorchAutoencoderDC(**config.to_dict())
    state = torch_model.state_dict()

    class MetaSource:
        path = "meta dc-ae-f32c32-sana-1.0"

        def keys(self):
            return sorted(state)

        def shape(self, key):
            return tuple(state[key].shape)

    abstract = convert_dc.abstract_params(config)
    for path, leaf in param_tree.flatten(abstract).items():  # logical axis names on every param
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path
    target = param_tree.target_shapes(abstract)
    plan = key_plan.plan_conversion(MetaSource(), convert_dc.KEYMAP, target)
    assert len(plan.entries) == len(state) == len(target)
    assert sum(int(np.prod(s)) for s in target.values()) == sum(
        p.numel() for p in torch_model.parameters())
    # the full-size forward is shape-consistent (traced only): 512px <-> 16x16x32 latents
    model = dc_ae.AutoencoderDC(config)
    image = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    latent = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode"),
                            abstract, image)
    assert latent.shape == (1, 16, 16, 32)
    decoded = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="decode"),
                             abstract, latent)
    assert decoded.shape == image.shape


def test_config_fields_and_validation():
    sig = inspect.signature(TorchAutoencoderDC.__init__).parameters
    fields = {f.name for f in dataclasses.fields(dc_ae.DCAEConfig)}
    assert fields == set(sig) - {"self"}
    # same defaults as diffusers (a config.json may omit fields)
    defaults = {k: v.default for k, v in sig.items() if k != "self"}
    assert dc_ae.DCAEConfig() == dc_ae.DCAEConfig(**defaults)
    legacy = {k: v for k, v in TINY.items() if not k.endswith("block_out_channels")}
    assert dc_ae.DCAEConfig.from_diffusers(dict(legacy, block_out_channels=[8, 16, 16])) == \
        dc_ae.DCAEConfig.from_diffusers(TINY)
    preset = dc_ae.DCAEConfig.dc_ae_f32c32_sana_1_0()
    assert preset.scaling_factor == 0.41407 and preset.spatial_compression_ratio == 32
    assert dc_ae.DCAEConfig.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    published = dict(preset.to_dict(), _class_name="AutoencoderDC", _diffusers_version="0.32.0",
                     downsample_block_type="Conv")
    assert dc_ae.DCAEConfig.from_diffusers(published).downsample_block_type == "Conv"
    with pytest.raises(NotImplementedError, match="decoder_norm_types"):
        dc_ae.DCAEConfig.from_diffusers(dict(TINY, decoder_norm_types="batch_norm"))
    with pytest.raises(NotImplementedError, match="use_magic"):
        dc_ae.DCAEConfig.from_diffusers(dict(TINY, use_magic=True))
    with pytest.raises(NotImplementedError, match="encoder_block_types"):
        dc_ae.DCAEConfig.from_diffusers(dict(TINY, encoder_block_types="ViTBlock"))
    model = dc_ae.AutoencoderDC(dc_ae.DCAEConfig.from_diffusers(TINY))
    with pytest.raises(ValueError, match="multiples of 4"):
        model.init(jax.random.PRNGKey(0), np.zeros((1, 6, 8, 3), np.float32))


def test_bf16_compute_keeps_linear_attention_fp32(monkeypatch):
    seen = []
    fp32_attention = dc_ae.linear_attention

    def recording(q, k, v, eps):
        seen.append({q.dtype, k.dtype, v.dtype})
        return fp32_attention(q, k, v, eps)

    monkeypatch.setattr(dc_ae, "linear_attention", recording)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 8, 16)), jnp.float32)
    attn32 = dc_ae.SanaMultiscaleLinearAttention(16, 8, (5,))
    attn16 = dc_ae.SanaMultiscaleLinearAttention(16, 8, (5,), dtype=jnp.bfloat16)
    rng = np.random.default_rng(4)  # random values for every param (norms included), no init jit
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32),
                          nn.meta.unbox(jax.eval_shape(attn32.init, jax.random.PRNGKey(0), x)))
    ref = jax.jit(attn32.apply)(params, x)
    seen.clear()
    out = jax.jit(attn16.apply)(params, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert seen == [{jnp.dtype(jnp.float32)}]  # the bf16 model's linear attention ran in fp32
    assert_rel_close(out.astype(jnp.float32), ref, 3e-2, "bf16 attention")
