"""A parameter-free pixel-space "autoencoder" for the tiny preset: space-to-depth.

`encode` folds each f x f patch of an NHWC image in [-1, 1] into channels (H/f, W/f, 3 f^2) and
multiplies by `scaling_factor`; `decode` inverts it exactly. It stands in for DC-AE where no
pretrained VAE is available (CPU demo, tests) and exposes the same `encode` / `decode` methods, so
the unified model and the trainer treat both alike.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PixelAEConfig:
    patch_size: int = 8
    in_channels: int = 3
    scaling_factor: float = 1.0

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    def to_dict(self) -> dict:
        return {"type": "pixel", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "PixelAEConfig":
        d = {k: v for k, v in d.items() if k != "type"}
        return cls(**d)


class PixelAutoencoder(nn.Module):
    config: PixelAEConfig
    dtype: jnp.dtype = jnp.float32

    def encode(self, x):
        b, h, w, c = x.shape
        f = self.config.patch_size
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {f}")
        x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // f, w // f, f * f * c).astype(self.dtype) * \
            self.config.scaling_factor

    def decode(self, z):
        b, hf, wf, _ = z.shape
        f, c = self.config.patch_size, self.config.in_channels
        z = (z / self.config.scaling_factor).reshape(b, hf, wf, f, f, c)
        return z.transpose(0, 1, 3, 2, 4, 5).reshape(b, hf * f, wf * f, c)

    def __call__(self, x):
        return self.decode(self.encode(x))
