"""The unified model against a tiny PyTorch TBAC-UniImage built the way the official
`models/model.py` builds it (`uniimage_jax.bench.torch_reference.OfficialTBAC`: transformers Qwen2.5-VL
with its embedding table resized by N + 2 rows and lm_head replaced by Identity, the connector, a
diffusers SANA driven block by block with per-block contexts from `hidden_states[-n-1:-1]`, a
diffusers DC-AE). Its state dict is saved with the official key names, converted with `uniimage-convert
tbac`, and the velocity predictions and the loss are compared for the same latents, noise and
timesteps (text-only and with an input image). Export back to the official keys is exact; the
no-grad-prompt path equals the full backward.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

from tests.parity import assert_rel_close, rel_err
from tests.tbac_fixture import N_QUERIES, build_tiny_tbac
from uniimage_jax.cli import convert as cli
from uniimage_jax.checkpoints.converted import load_tbac
from uniimage_jax.models.uniimage import UniImage, rope_positions
from uniimage_jax.checkpoints.partition import merge_params, partition_params

IMAGE = 16  # pixels; the tiny DC-AE of tests/tbac_fixture.py compresses 4x -> 4x4 latents


def _prompt(ids, rows, image_tokens=0):
    """Left-padded token batch ending in <vision_start> q_0..q_{N-1} <vision_end> <im_end>."""
    rng = np.random.default_rng(7)
    lengths = [9, 6][:rows]
    t = max(lengths) + image_tokens + (2 if image_tokens else 0) + N_QUERIES + 3
    input_ids = np.full((rows, t), ids["<|endoftext|>"], np.int64)
    mask = np.zeros((rows, t), np.int64)
    queries = list(range(ids["vocab"], ids["vocab"] + N_QUERIES))
    for r, n in enumerate(lengths):
        body = list(rng.integers(0, 300, n))
        if image_tokens:
            body = body[:3] + [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * image_tokens \
                + [ids["<|vision_end|>"]] + body[3:]
        row = body + [ids["<|vision_start|>"]] + queries + [ids["<|vision_end|>"], ids["<|im_end|>"]]
        input_ids[r, t - len(row):] = row
        mask[r, t - len(row):] = 1
    return input_ids, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built = build_tiny_tbac(str(tmp_path_factory.mktemp("tbac")))
    config, params = load_tbac(built["dst"])
    official = {k: v.numpy() for k, v in built["torch"].state_dict_official().items()}
    return {**built, "config": config, "params": params, "official": official}


def _batch(tiny, image: bool):
    ids = tiny["ids"]
    cfg = tiny["config"]
    g = np.random.default_rng(3)
    if image:
        grid = ((1, 4, 6), (1, 4, 6))  # 2 images, 4x6 patches each -> 6 merged tokens each
        input_ids, mask = _prompt(ids, 2, image_tokens=6)
        patch_dim = 3 * 2 * 14 * 14
        pixel_values = g.standard_normal((48, patch_dim)).astype(np.float32)
    else:
        grid, pixel_values = None, None
        input_ids, mask = _prompt(ids, 2)
    pos = rope_positions(cfg, input_ids, mask, grid)
    batch = {"input_ids": jnp.asarray(input_ids, jnp.int32),
             "attention_mask": jnp.asarray(mask, jnp.int32), "position_ids": jnp.asarray(pos)}
    if image:
        batch.update(pixel_values=jnp.asarray(pixel_values), image_grid_thw=grid)
    target = g.uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
    return batch, input_ids, mask, pixel_values, grid, target


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_velocity_and_loss_match_official(tiny, image):
    batch, input_ids, mask, pixel_values, grid, target = _batch(tiny, image)
    ids, tm = tiny["ids"], tiny["torch"]
    model = UniImage(tiny["config"])
    params = tiny["params"]
    g = np.random.default_rng(5)
    noise = g.standard_normal((2, 4, 4, 4)).astype(np.float32)
    timesteps = np.array([999.0, 250.0], np.float32)
    sigmas = timesteps / 1000.0

    with torch.no_grad():
        t_target = torch.from_numpy(target).permute(0, 3, 1, 2)
        latents = tm.latents(t_target)
        ctx, ctx_mask = tm.encode_condition(
            torch.from_numpy(input_ids), torch.from_numpy(mask),
            None if pixel_values is None else torch.from_numpy(pixel_values),
            None if grid is None else torch.tensor(grid),
            vision_start=ids["<|vision_start|>"], vision_end=ids["<|vision_end|>"],
            image_token=ids["<|image_pad|>"])
        t_noise = torch.from_numpy(noise).permute(0, 3, 1, 2)
        s = torch.from_numpy(sigmas)[:, None, None, None]
        noisy = (1.0 - s) * latents + s * t_noise
        ref_v = tm.velocity(noisy, torch.from_numpy(timesteps), ctx, ctx_mask)
        ref_loss = torch.mean(((ref_v.float() - (t_noise - latents).float()) ** 2)
                              .reshape(2, -1), 1).mean()

    our_latents = model.encode_images(params, jnp.asarray(target))
    assert_rel_close(our_latents, latents.permute(0, 2, 3, 1), 1e-4, "latents")
    for split in (False, True):
        loss, aux = model.loss_given_noise(params, batch, our_latents, jnp.asarray(noise),
                                           jnp.asarray(timesteps), jnp.asarray(sigmas),
                                           split_prompt=split)
        assert_rel_close(aux["prediction"], ref_v.permute(0, 2, 3, 1), 1e-4,
                         f"velocity (split_prompt={split})")
        assert_rel_close(loss, ref_loss, 1e-4, f"loss (split_prompt={split})")


def test_split_prompt_equals_full_backward(tiny):
    batch, *_ , target = _batch(tiny, image=True)
    model = UniImage(tiny["config"])
    trainable, frozen = partition_params(tiny["params"], ["dit/.*", "connector/.*", "metaquery/.*"])
    rng = jax.random.PRNGKey(0)

    def loss_fn(tr, split):
        loss, _ = model.loss(merge_params(tr, frozen), {**batch, "target": jnp.asarray(target)},
                             rng, split_prompt=split)
        return loss

    full, g_full = jax.value_and_grad(loss_fn)(trainable, False)
    split, g_split = jax.value_and_grad(loss_fn)(trainable, True)
    assert abs(float(full) - float(split)) <= 1e-6 * max(1.0, abs(float(full)))
    flat_full = jax.tree_util.tree_leaves_with_path(g_full)
    flat_split = dict(jax.tree_util.tree_leaves_with_path(g_split))
    assert flat_full and len(flat_full) == len(flat_split)
    scale = max(float(jnp.max(jnp.abs(g))) for _, g in flat_full)
    for path, g in flat_full:
        name = jax.tree_util.keystr(path)
        if float(jnp.max(jnp.abs(g))) < 1e-6 * scale:
            # Mathematically zero (a bias added to every softmax key): rounding noise on both
            # paths, compared absolutely.
            assert float(jnp.max(jnp.abs(flat_split[path]))) < 1e-6 * scale, name
            assert "to_k" in name, f"unexpected vanishing gradient at {name}"
            continue
        assert rel_err(flat_split[path], g) <= 1e-5, name
    assert float(jnp.max(jnp.abs(g_full["metaquery"]["embedding"]))) > 0


def _scan_lengths(jaxpr) -> list[int]:
    """The lengths of every scan in a jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _scan_lengths(sub)
    return out


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_the_prompt_cache_runs_its_top_layer_only_to_its_keys_and_values(tiny, scan, image):
    """The split prompt's cache equals the conditioning MLLM's own KV-cache pass over the
    prompt, while its top layer runs no attention or MLP (their output is never read): under
    scan the stacked layers run one time fewer."""
    import dataclasses

    from uniimage_jax.models import qwen2_5_vl

    batch, *_ = _batch(tiny, image)
    config, params = tiny["config"], tiny["params"]
    model = UniImage(config)
    depth = config.conditioning_depth
    mllm_params = qwen2_5_vl.keep_layers(params["mllm"], depth)
    if scan:
        mllm = dataclasses.replace(config.mllm, scan_layers=True)
        config = dataclasses.replace(config, mllm=mllm)
        mllm_params = qwen2_5_vl.scan_params(mllm_params, dataclasses.replace(
            mllm, num_hidden_layers=depth))
        model = UniImage(config)
    params = {**params, "mllm": mllm_params}
    with jax.default_matmul_precision("highest"):
        cache = model.prompt_cache(params, batch)
        # The reference: the whole conditioning MLLM over the prompt, writing its own cache.
        t = batch["input_ids"].shape[1]
        q0 = t - N_QUERIES - 2
        ids = batch["input_ids"][:, :q0]
        whole, _ = model._conditioning_mllm(mllm_params)
        images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
        ref = whole.apply({"params": mllm_params}, ids, batch["attention_mask"][:, :q0 + N_QUERIES],
                          batch["position_ids"][:, :, :q0], inputs_embeds=model.embed(params, ids),
                          kv_cache=qwen2_5_vl.init_kv_cache(whole.config, 2, q0 + N_QUERIES),
                          cache_index=0, compute_logits=False, **images).kv_cache
    for name in ("k", "v"):
        assert cache[name].shape == ref[name].shape == (depth, 2, q0 + N_QUERIES,
                                                        config.mllm.num_key_value_heads,
                                                        config.mllm.head_dim)
        assert_rel_close(cache[name], ref[name], 1e-6, f"cached {name}")
    if scan and not image:
        lengths = _scan_lengths(jax.make_jaxpr(model.prompt_cache)(params, batch).jaxpr)
        assert depth - 1 in lengths and depth not in lengths, lengths


def _read_config_and_metadata(directory):
    from safetensors import safe_open

    with open(os.path.join(directory, "config.json")) as fh:
        config = json.load(fh)
    with safe_open(os.path.join(directory, "model.safetensors"), framework="numpy") as f:
        return config, f.metadata()


def test_export_reproduces_the_official_state_dict(tiny, tmp_path):
    out = str(tmp_path / "export")
    assert cli.main(["export-tbac", "--src", tiny["dst"], "--dst", out]) == 0
    exported = load_np(os.path.join(out, "model.safetensors"))
    official = load_np(os.path.join(tiny["src"], "model.safetensors"))
    assert sorted(exported) == sorted(official) == sorted(tiny["official"])
    for k, v in official.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert exported[k].tobytes() == v.tobytes(), k
    # config.json (every field) and the safetensors header metadata come back unchanged
    source_config, source_metadata = _read_config_and_metadata(tiny["src"])
    assert len(source_config) > 5 and source_metadata == {"format": "pt"}
    assert _read_config_and_metadata(out) == (source_config, source_metadata)


def test_export_of_a_scanned_stage_unstacks_its_layers(tiny, tmp_path, monkeypatch):
    """A stage trained with scanned layers (the tbac_3b default) holds its MLLM layers and DiT
    blocks stacked; export-tbac must still write the official per-layer keys, byte for byte."""
    import dataclasses

    from uniimage_jax.models import qwen2_5_vl, sana

    config, params = tiny["config"], tiny["params"]
    scanned = dataclasses.replace(config,
                                  mllm=dataclasses.replace(config.mllm, scan_layers=True),
                                  dit=dataclasses.replace(config.dit, scan_layers=True))
    stacked = {**params, "mllm": qwen2_5_vl.scan_params(params["mllm"], scanned.mllm),
               "dit": sana.scan_params(params["dit"], scanned.dit)}
    assert "transformer_blocks" in stacked["dit"]  # the layout really is the scanned one
    monkeypatch.setattr("uniimage_jax.checkpoints.loader.load_uniimage",
                        lambda src, weights: (scanned, stacked, tiny["dst"]))
    out = str(tmp_path / "export")
    assert cli.main(["export-tbac", "--src", tiny["dst"], "--dst", out]) == 0
    exported = load_np(os.path.join(out, "model.safetensors"))
    official = load_np(os.path.join(tiny["src"], "model.safetensors"))
    assert sorted(exported) == sorted(official)
    for k, v in official.items():
        assert exported[k].tobytes() == v.tobytes(), k


def _untied_head_tbac(root):
    """The 7B layout in small: tie_word_embeddings false and the head kept in the state dict,
    grown with the table by resize_token_embeddings (vocab + N + 2 rows)."""
    from diffusers import AutoencoderDC as TorchDCAE
    from diffusers import SanaTransformer2DModel as TorchSana

    from tests.tbac_fixture import DCAE, MLLM_LAYERS, SANA
    from uniimage_jax.processing.tiny import tiny_qwen_hf_config
    from uniimage_jax.bench.torch_reference import OfficialTBAC, randomise

    hf_config = tiny_qwen_hf_config(num_hidden_layers=MLLM_LAYERS, tie_word_embeddings=False)
    dirs = {n: os.path.join(root, n) for n in ("mllm", "dit", "vae", "tbac", "converted")}
    hf_config.save_pretrained(dirs["mllm"])  # before the resize below grows its vocab_size
    model = OfficialTBAC(hf_config, SANA, DCAE, N_QUERIES, seed=5)
    rows = model.num_embeddings + N_QUERIES + 2
    model.mllm.lm_head = torch.nn.Linear(hf_config.text_config.hidden_size, rows, bias=False)
    randomise(model.mllm.lm_head, seed=9)
    TorchSana(**SANA).save_config(dirs["dit"])
    TorchDCAE(**DCAE).save_config(dirs["vae"])
    os.makedirs(dirs["tbac"])
    save_file(model.state_dict_official(), os.path.join(dirs["tbac"], "model.safetensors"))
    return model, dirs


def test_untied_lm_head_is_kept_and_matches_transformers(tmp_path, capsys):
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    model, dirs = _untied_head_tbac(str(tmp_path))
    assert "model.mllm_backbone.lm_head.weight" in model.state_dict_official()
    assert cli.main(["tbac", "--src", dirs["tbac"], "--mllm", dirs["mllm"], "--dit", dirs["dit"],
                     "--vae", dirs["vae"], "--dst", dirs["converted"]]) == 0
    assert f"dropping the {N_QUERIES + 2} rows" in capsys.readouterr().out
    config, params = load_tbac(dirs["converted"])
    vocab = model.num_embeddings
    assert not config.mllm.tie_word_embeddings
    assert params["mllm"]["lm_head"]["kernel"].shape == (config.mllm.hidden_size, vocab)

    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, vocab, (2, 7))
    mask = np.ones_like(input_ids)
    mask[1, :2] = 0  # left padding
    ours = Qwen2_5_VLForConditionalGeneration(config.mllm).apply(
        {"params": params["mllm"]}, jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(mask, jnp.int32), jnp.asarray(rope_positions(config, input_ids, mask))).logits
    with torch.no_grad():
        theirs = model.mllm(input_ids=torch.from_numpy(input_ids),
                            attention_mask=torch.from_numpy(mask)).logits.numpy()
    # Text generation samples the text vocabulary: the first `vocab` logits are the model's.
    assert_rel_close(np.asarray(ours)[mask == 1], theirs[..., :vocab][mask == 1], 1e-5, "logits")

    # Exported back, the kept rows are the source's; the dropped rows come back as zeros.
    out = str(tmp_path / "export")
    assert cli.main(["export-tbac", "--src", dirs["converted"], "--dst", out]) == 0
    head = load_np(os.path.join(out, "model.safetensors"))["model.mllm_backbone.lm_head.weight"]
    source = model.mllm.lm_head.weight.detach().numpy()
    assert head.shape == source.shape and np.array_equal(head[:vocab], source[:vocab])
    assert not head[vocab:].any()


def test_bad_checkpoint_names_every_problem(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    sd = load_file(os.path.join(tiny["src"], "model.safetensors"))
    del sd["model.connector.2.bias"]
    sd["model.transformer.renamed.weight"] = sd.pop("model.transformer.proj_out.weight")
    sd["vae.encoder.conv_in.bias"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    dst = tmp_path / "never"
    root = os.path.dirname(tiny["src"])
    rc = cli.main(["tbac", "--src", str(bad), "--mllm", os.path.join(root, "mllm"),
                   "--dit", os.path.join(root, "dit"), "--vae", os.path.join(root, "vae"),
                   "--dst", str(dst)])
    err = capsys.readouterr().err
    assert rc != 0
    for needle in ("connector/linear_2/bias", "model.transformer.renamed.weight",
                   "dit/proj_out/kernel", "vae.encoder.conv_in.bias"):
        assert needle in err, needle
    assert not dst.exists()


def test_every_convert_subcommand_is_offered_none_skipped(monkeypatch):
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(cli.SUBCOMMANDS)
    # a registered subcommand whose module is gone is a packaging error, not a hidden command
    monkeypatch.setitem(cli.SUBCOMMANDS, "gone", ("uniimage_jax.convert.no_such_module", "x",
                                                  cli._dit_arguments, cli._run_dit))
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()
