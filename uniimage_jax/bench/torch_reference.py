"""A PyTorch TBAC-UniImage built from transformers + diffusers exactly as the official
`models/model.py` and `models/tbacuniimage.py` build and run it: a Qwen2.5-VL with its embedding
table resized by N + 2 rows and lm_head replaced by Identity, the connector
Sequential(Linear, GELU(tanh), Linear, RMSNorm(sqrt(5.5))), SANA driven block by block with
per-block contexts from `hidden_states[-n-1:-1]` (LayerCondSanaTransformer2DModel.forward), and
DC-AE (or, for the tiny preset, the same space-to-depth pixel autoencoder we use).

The reference side of the parity tests and of the benchmark (`uniimage-bench`). Needs torch,
transformers and diffusers (the `test` extra); nothing here is used by the JAX code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderDC as TorchDCAE
from diffusers import DPMSolverMultistepScheduler
from diffusers import SanaTransformer2DModel as TorchSana
from diffusers.models.normalization import RMSNorm as TorchRMSNorm
from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwen


def randomise(module: torch.nn.Module, seed: int):
    """Re-draw every parameter (none left at a trivial 0 / 1) so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + 0.3 * torch.randn(p.shape, generator=g))


class PixelAE(torch.nn.Module):
    """Space-to-depth, NCHW, channel order matching `uniimage_jax.models.pixel_ae` (NHWC)."""

    def __init__(self, patch_size: int, scaling_factor: float = 1.0):
        super().__init__()
        self.p, self.scaling_factor = patch_size, scaling_factor

    def latents(self, x):
        b, c, h, w = x.shape
        p = self.p
        x = x.permute(0, 2, 3, 1).reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // p, w // p, p * p * c).permute(0, 3, 1, 2) * self.scaling_factor

    def decode(self, z):
        b, _, hp, wp = z.shape
        p = self.p
        z = (z / self.scaling_factor).permute(0, 2, 3, 1).reshape(b, hp, wp, p, p, -1)
        return z.permute(0, 1, 3, 2, 4, 5).reshape(b, hp * p, wp * p, -1).permute(0, 3, 1, 2)


class OfficialTBAC(torch.nn.Module):
    """The official model's structure and forward pass (see the module docstring).

    dcae: diffusers AutoencoderDC kwargs, or {"type": "pixel", "patch_size": p} for the pixel AE.
    """

    def __init__(self, hf_config, sana: dict, dcae: dict, num_metaqueries: int, seed: int = 0,
                 randomize: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.num_metaqueries = num_metaqueries
        self.mllm = TorchQwen(hf_config).eval()
        self.num_embeddings = self.mllm.get_input_embeddings().num_embeddings
        self.mllm.resize_token_embeddings(self.num_embeddings + num_metaqueries + 2,
                                          mean_resizing=False)
        self.mllm.lm_head = torch.nn.Identity()
        self.transformer = TorchSana(**sana).eval()
        d = hf_config.text_config.hidden_size
        c = sana["caption_channels"]
        norm = TorchRMSNorm(c, eps=1e-5, elementwise_affine=True)
        with torch.no_grad():
            norm.weight.fill_(math.sqrt(5.5))
        self.connector = torch.nn.Sequential(torch.nn.Linear(d, c), torch.nn.GELU("tanh"),
                                             torch.nn.Linear(c, c), norm)
        if dcae.get("type") == "pixel":
            self.vae = PixelAE(dcae["patch_size"], dcae.get("scaling_factor", 1.0))
        else:
            self.vae = TorchDCAE(**dcae).eval()
        if randomize:
            for i, m in enumerate([self.mllm, self.transformer, self.connector, self.vae]):
                randomise(m, seed + i)
        # Only the official trainable parts get gradients; the frozen table rows are zeroed by a
        # hook exactly as the official code does.
        self.requires_grad_(False)
        self.transformer.requires_grad_(True)
        self.connector.requires_grad_(True)
        table = self.mllm.get_input_embeddings().weight
        table.requires_grad_(True)
        n = self.num_embeddings

        def freeze_hook(grad):
            grad = grad.clone()
            grad[:n].zero_()
            return grad

        table.register_hook(freeze_hook)

    def state_dict_official(self):
        """Official key names, the MLLM in the legacy transformers layout."""
        out = {}
        for k, v in self.mllm.state_dict().items():
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            out["model.mllm_backbone." + k] = v
        parts = [("model.transformer.", self.transformer), ("model.connector.", self.connector)]
        if isinstance(self.vae, TorchDCAE):
            parts.append(("vae.", self.vae))
        for prefix, module in parts:
            out.update({prefix + k: v for k, v in module.state_dict().items()})
        return {k: v.contiguous().clone() for k, v in out.items()}

    def encode_condition(self, input_ids, attention_mask, pixel_values=None, grid=None, *,
                         vision_start, vision_end, image_token):
        """models/model.py `encode_condition` for the Qwen2.5-VL backbone."""
        # transformers 5 derives M-RoPE positions from the processor's mm_token_type_ids (the
        # official code ran transformers 4, which derived them from input_ids): same positions.
        extra = {} if pixel_values is None else {
            "mm_token_type_ids": (input_ids == image_token).to(torch.int32)}
        hs = self.mllm(input_ids=input_ids, attention_mask=attention_mask,
                       pixel_values=pixel_values, image_grid_thw=grid,
                       output_hidden_states=True, **extra).hidden_states
        hs = torch.stack(hs, 0)
        b, t = input_ids.shape
        boi = torch.stack([torch.where(r == vision_start)[0][-1] for r in input_ids])
        eoi = torch.stack([torch.where(r == vision_end)[0][-1] for r in input_ids])
        idx = torch.arange(t)[None].expand(b, -1)
        mask = (idx > boi[:, None]) & (idx < eoi[:, None])
        hs = hs[mask[None].expand(hs.shape[0], -1, -1)].view(hs.shape[0], b, -1, hs.shape[-1])
        attention_mask = attention_mask[mask].view(b, -1)
        hs = hs[-self.transformer.config.num_layers - 1:-1]
        return self.connector(hs), attention_mask

    def velocity(self, x, timestep, ctx, ctx_mask):
        """LayerCondSanaTransformer2DModel.forward (NCHW latents)."""
        tr = self.transformer
        bias = ((1 - ctx_mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        b, _, h, w = x.shape
        p = tr.config.patch_size
        hidden = tr.patch_embed(x)
        temb, embedded = tr.time_embed(timestep, batch_size=b, hidden_dtype=hidden.dtype)
        ctx = tr.caption_norm(tr.caption_projection(ctx))
        for block, c in zip(tr.transformer_blocks, ctx):
            hidden = block(hidden, None, c, bias, temb, h // p, w // p)
        hidden = tr.norm_out(hidden, embedded, tr.scale_shift_table)
        hidden = tr.proj_out(hidden)
        hidden = hidden.reshape(b, h // p, w // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return hidden.reshape(b, -1, h, w)

    def latents(self, target):
        """NCHW images in [-1, 1] -> scaled latents."""
        if isinstance(self.vae, PixelAE):
            return self.vae.latents(target)
        return self.vae.encode(target).latent * self.vae.config.scaling_factor

    def decode(self, latents):
        if isinstance(self.vae, PixelAE):
            return self.vae.decode(latents)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def loss(self, target, noise, timesteps, cond: dict, token_ids: dict):
        """tbacuniimage.py `forward` (flow loss) for given noise and timesteps (sigma = t/1000)."""
        with torch.no_grad():
            latents = self.latents(target)
        sig = (timesteps / 1000.0).reshape(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1.0 - sig) * latents + sig * noise
        ctx, mask = self.encode_condition(**cond, **token_ids)
        pred = self.velocity(noisy, timesteps, ctx, mask)
        target_v = noise - latents
        return torch.mean(((pred.float() - target_v.float()) ** 2).reshape(target.shape[0], -1),
                          1).mean()

    @torch.no_grad()
    def sample_latents(self, cond: dict, token_ids: dict, noise, *, num_steps: int,
                       guidance: float, image_guidance: float, k: int):
        """The denoising loop of tbacuniimage.py `sample_images` (CFG rows already in `cond`,
        k = 2 or 3 guidance rows, noise (n, C, h, w)), diffusers' SANA DPM-Solver++."""
        scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                prediction_type="flow_prediction")
        scheduler.set_timesteps(num_steps)
        ctx, mask = self.encode_condition(**cond, **token_ids)
        n = noise.shape[0]
        ctx = ctx.repeat_interleave(n, dim=1)
        mask = mask.repeat_interleave(n, dim=0)
        latents = noise
        for t in scheduler.timesteps:
            inp = torch.cat([latents] * k)
            v = self.velocity(inp, t.unsqueeze(0).expand(inp.shape[0]), ctx, mask)
            if k == 3:
                u, u_img, c = v.chunk(3)
                v = u + image_guidance * (u_img - u) + guidance * (c - u_img)
            else:
                u, c = v.chunk(2)
                v = u + guidance * (c - u)
            latents = scheduler.step(v, t, latents).prev_sample
        return latents
