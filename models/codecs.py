"""Latent codecs behind one interface: images (B, 3, H, W) in [-1, 1] ↔ latents (B, C, H/f, W/f).

* `PixelCodec` (the embedded default): space-to-depth by `patch` (C = 3·patch², f = patch), scaled to
  unit variance — no learned weights, exact inverse.
* `Flux2VAECodec`: `AutoencoderKLFlux2` from a local folder; encode with `latent_dist.mode()`, 2×2
  patchify to 128 channels at 1/16 resolution, normalise with the VAE's own `bn` running statistics
  (as `Flux2KleinPipeline` does; no scaling factor); decode inverts each step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class LatentCodec(nn.Module):
    channels: int
    factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class PixelCodec(LatentCodec):
    def __init__(self, patch: int = 4, scale: float = 2.0):
        super().__init__()
        self.patch, self.scale = patch, scale
        self.channels, self.factor = 3 * patch * patch, patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.patch) * self.scale  # (B, 3p², H/p, W/p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.scale, self.patch)  # (B, 3, H, W)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2), channel order as `Flux2KleinPipeline._patchify_latents`."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c4, h, w = latents.shape
    c = c4 // 4
    x = latents.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * 2, w * 2)


class Flux2VAECodec(LatentCodec):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.latent_channels * 4
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2

    @classmethod
    def from_path(cls, path: str | Path) -> Flux2VAECodec:
        from diffusers import AutoencoderKLFlux2

        if not Path(path).exists():
            raise FileNotFoundError(
                f"FLUX.2 VAE {path} not found (a local diffusers AutoencoderKLFlux2 folder)"
            )
        return cls(AutoencoderKLFlux2.from_pretrained(str(path), local_files_only=True))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like)
        return mean, std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = patchify(self.vae.encode(images).latent_dist.mode())
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return self.vae.decode(unpatchify(latents * std + mean)).sample
