"""Slice-wise KL autoencoder: every CT slice is encoded on its own with 2-D convolutions.

No compression in depth: a volume of D slices becomes D latent slices of ``latent_channels`` x
H/8 x W/8. It is a KL-regularised VAE (as in latent diffusion): the encoder predicts a mean and a
log-variance, training samples from that posterior with a small KL weight, and inference uses the
posterior mean (deterministic encoding). The latent scaling factor (1 / std of the latents) is
measured on data and stored in the checkpoint, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import VAEConfig
from .layers import group_norm


class ResBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder2D(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        chans, g = config.encoder_channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        layers: list[nn.Module] = []
        current = chans[0]
        for level, width in enumerate(chans):
            for _ in range(config.encoder_blocks):
                layers.append(ResBlock2D(current, width, g))
                current = width
            layers.append(nn.Conv2d(current, current, 3, stride=2, padding=1))  # downsample
        self.blocks = nn.Sequential(*layers)
        self.mid = ResBlock2D(current, current, g)
        self.norm_out = group_norm(current, g)
        self.conv_out = nn.Conv2d(current, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder2D(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        chans, g = config.decoder_channels, config.norm_groups
        current = chans[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, current, 3, padding=1)
        self.mid = ResBlock2D(current, current, g)
        layers: list[nn.Module] = []
        for level in reversed(range(len(chans))):
            for _ in range(config.decoder_blocks):
                layers.append(ResBlock2D(current, chans[level], g))
                current = chans[level]
            # The upsampling conv already narrows to the next (finer) level's width: the
            # full-resolution level is where a light decoder saves its time.
            nxt = chans[max(level - 1, 0)]
            layers.append(Upsample2D(current, nxt))
            current = nxt
        self.blocks = nn.Sequential(*layers)
        self.norm_out = group_norm(current, g)
        self.conv_out = nn.Conv2d(current, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class LatentDistribution:
    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), mean over all elements."""
        return 0.5 * torch.mean(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


class SliceVAE(nn.Module):
    """Encode/decode batches of 2-D slices (N, 1, H, W) in [-1, 1]; H, W multiples of 8."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder2D(config)
        self.decoder = Decoder2D(config)

    def _check(self, x: torch.Tensor, factor: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"{what}: expected (N, C, H, W) with H, W multiples of {factor}, got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        self._check(x, self.config.downsampling_factor, "VAE encode")
        moments = self.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def vae_loss(reconstruction: torch.Tensor, target: torch.Tensor, posterior: LatentDistribution, kl_weight: float = 1e-6) -> torch.Tensor:
    """L1 reconstruction + a small KL term (keeps the latent space smooth and bounded)."""
    return F.l1_loss(reconstruction, target) + kl_weight * posterior.kl()


@torch.no_grad()
def measure_latent_scale(vae: SliceVAE, slices: torch.Tensor, batch: int = 8) -> float:
    """1 / std of the posterior means over ``slices`` (N, 1, H, W): latents scaled by it have unit
    variance, which is what the diffusion schedule assumes."""
    means = [vae.encode(slices[i : i + batch]).mean.float() for i in range(0, slices.shape[0], batch)]
    std = torch.cat(means).std().item()
    return 1.0 / max(std, 1e-6)
