"""The guided slice VAE of latent diffusion v2: the latent holds what the base lacks.

Every thin slice has a *base*, the regression estimate of that slice (``pipelines.regression``,
without consistency). The encoder sees the thin slice and its base and encodes their residual into
a KL-regularised latent (8x in-plane compression, ``latent_channels`` channels, slice by slice,
no depth compression). The decoder takes that latent plus the base at every scale, through a light
guide encoder, and returns ``base + correction`` in HU. Its last layer starts at zero, so an
untrained decoder returns the base exactly: detail the base already has at full resolution never
has to pass through the 8x latent (Zhu et al. 2023's asymmetric decoder, conditioned on a base).

- **Full HU range.** No display window: network units are HU / ``hu_scale``. Only the network's
  *inputs* are clipped, by the rule of ``pipelines.regression.network_inputs`` (the base to
  ``input_range``, the residual to +-``residual_limit``); the output is the unclipped base plus a
  correction, so air padding at -3024 HU or metal pass through.
- **Size independent.** Normalisation is a LayerNorm over channels at each pixel (no batch or
  spatial statistics), so a crop and the whole slice give the same pixels away from the crop's
  borders: what the model learns on crops holds on whole slices. (GroupNorm's statistics span
  the image, a measured defect of the v1 VAE.)
- **The base's latent.** The guide encoder's coarsest output, ``latent_channels`` channels at 1/8,
  is what the decoder starts from next to the latent; the residual diffusion U-Net is conditioned on
  it (``base_latent``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .folders import read_folder, save_folder
from .vae import LatentDistribution

WEIGHTS_FILE = "guided_vae.safetensors"
CONFIG_FILE = "guided_vae.json"
LOGVAR_INIT = -4.0


@dataclass(frozen=True)
class GuidedVAEConfig:
    """Explicit architecture config (saved next to the weights)."""

    latent_channels: int = 4
    widths: tuple[int, int, int] = (32, 64, 128)  # encoder/decoder channels at 1/2, 1/4, 1/8
    guide_widths: tuple[int, int, int] = (16, 32, 64)  # guide encoder channels at 1/2, 1/4, 1/8
    blocks: int = 1  # residual blocks per scale
    hu_scale: float = 1000.0  # HU per network unit, in and out
    # The regression network's input rule (pipelines.regression: ESTIMATE_RANGE, DIFFERENCE_LIMIT).
    input_range: tuple[float, float] = (-1.5, 3.5)
    residual_limit: float = 3.0
    # Residuals are tens of HU: the encoder sees them, and the decoder's correction comes out, in
    # units of hu_scale / residual_gain (100 HU), so that a latent that small is not drowned in the
    # posterior's noise, and a first optimiser step does not move the output by hundreds of HU.
    residual_gain: float = 10.0

    @property
    def downsampling_factor(self) -> int:
        return 8  # fold 2, then two stride-2 stages

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "GuidedVAEConfig":
        names = set(cls.__dataclass_fields__)
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown guided VAE settings: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel, with a learned per-channel scale and shift:
    no statistic crosses pixels or samples, so the result does not depend on the image size."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = ChannelNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = ChannelNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _blocks(cin: int, cout: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(cin if i == 0 else cout, cout) for i in range(max(1, count))])


class GuideEncoder(nn.Module):
    """Base image (B, 1, H, W), network units -> features at 1/2, 1/4 and the base latent at 1/8."""

    def __init__(self, config: GuidedVAEConfig):
        super().__init__()
        g0, g1, g2 = config.guide_widths
        self.fold = nn.PixelUnshuffle(2)
        self.stem = nn.Conv2d(4, g0, 3, padding=1)
        self.down1 = nn.Sequential(nn.SiLU(), nn.Conv2d(g0, g1, 3, stride=2, padding=1), ResBlock(g1, g1))
        self.down2 = nn.Sequential(nn.SiLU(), nn.Conv2d(g1, g2, 3, stride=2, padding=1), ResBlock(g2, g2))
        self.to_latent = nn.Sequential(ChannelNorm(g2), nn.SiLU(), nn.Conv2d(g2, config.latent_channels, 1))

    def forward(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f0 = self.stem(self.fold(base))
        f1 = self.down1(f0)
        return f0, f1, self.to_latent(self.down2(f1))


class GuidedSliceVAE(nn.Module):
    """Slices in HU, (N, 1, H, W) with H and W multiples of 8. ``encode(thin, base)`` -> posterior
    of the residual latent; ``decode(z, base)`` -> HU; ``base_latent(base)`` -> (N, C, H/8, W/8).

    ``latent_scale`` and ``condition_scale`` (buffers, saved with the weights) are 1 / std of the
    residual latents and of the base latents, measured on data when a training run exports."""

    def __init__(self, config: GuidedVAEConfig = GuidedVAEConfig()):
        super().__init__()
        self.config = config
        w0, w1, w2 = config.widths
        g0, g1, _ = config.guide_widths
        c = config.latent_channels
        self.guide = GuideEncoder(config)
        # Encoder: (residual, base) folded 2x2 -> 1/2 -> 1/4 -> 1/8 -> mean and log-variance.
        self.encode_fold = nn.PixelUnshuffle(2)
        self.encoder = nn.Sequential(
            nn.Conv2d(8, w0, 3, padding=1), _blocks(w0, w0, config.blocks),
            nn.Conv2d(w0, w1, 3, stride=2, padding=1), _blocks(w1, w1, config.blocks),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), _blocks(w2, w2, config.blocks),
            ChannelNorm(w2), nn.SiLU(), nn.Conv2d(w2, 2 * c, 3, padding=1),
        )
        # Decoder: latent + base latent at 1/8, then the guide's features joined at 1/4 and 1/2.
        self.decode_in = nn.Conv2d(2 * c, w2, 3, padding=1)
        self.decode_mid = _blocks(w2, w2, config.blocks)
        self.up1 = nn.Conv2d(w2, w1, 3, padding=1)
        self.decode1 = _blocks(w1 + g1, w1, config.blocks)
        self.up0 = nn.Conv2d(w1, w0, 3, padding=1)
        self.decode0 = _blocks(w0 + g0, w0, config.blocks)
        self.head = nn.Sequential(ChannelNorm(w0), nn.SiLU(), nn.Conv2d(w0, 4, 3, padding=1))
        self.unfold = nn.PixelShuffle(2)
        # The posterior starts narrow (std 0.14), so the latent's signal is not lost in its noise.
        nn.init.constant_(self.encoder[-1].bias[c:], LOGVAR_INIT)
        nn.init.zeros_(self.head[-1].weight)  # an untrained decoder returns the base
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("condition_scale", torch.ones(()))

    # --- intensities: HU in, network units inside --------------------------------------------
    def _base_units(self, base_hu: torch.Tensor) -> torch.Tensor:
        return (base_hu.float() / self.config.hu_scale).clamp(*self.config.input_range)

    def _check(self, x: torch.Tensor, what: str) -> None:
        m = self.config.downsampling_factor
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"guided VAE {what}: expected (N, 1, H, W) with H, W multiples of {m}, got {tuple(x.shape)}")

    def encode(self, thin_hu: torch.Tensor, base_hu: torch.Tensor) -> LatentDistribution:
        self._check(thin_hu, "encode")
        limit = self.config.residual_limit
        residual = ((thin_hu.float() - base_hu.float()) / self.config.hu_scale).clamp(-limit, limit)
        residual = residual * self.config.residual_gain
        inputs = torch.cat([self.encode_fold(residual), self.encode_fold(self._base_units(base_hu))], dim=1)
        mean, logvar = self.encoder(inputs).chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def base_latent(self, base_hu: torch.Tensor) -> torch.Tensor:
        self._check(base_hu, "base latent")
        return self.guide(self._base_units(base_hu))[2]

    def decode(self, z: torch.Tensor, base_hu: torch.Tensor) -> torch.Tensor:
        """Residual latent (N, C, H/8, W/8) and base (N, 1, H, W) in HU -> the thin slice in HU."""
        self._check(base_hu, "decode")
        f0, f1, base_z = self.guide(self._base_units(base_hu))
        if z.shape[-2:] != base_z.shape[-2:]:
            raise ValueError(f"guided VAE decode: latent {tuple(z.shape)} does not match the base {tuple(base_hu.shape)}")
        h = self.decode_mid(self.decode_in(torch.cat([z.to(base_z.dtype), base_z], dim=1)))
        h = self.decode1(torch.cat([self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest")), f1], dim=1))
        h = self.decode0(torch.cat([self.up0(F.interpolate(h, scale_factor=2.0, mode="nearest")), f0], dim=1))
        # The correction comes out in the encoder's residual units (about 100 HU), as it went in.
        correction = self.unfold(self.head(h)).float() * (self.config.hu_scale / self.config.residual_gain)
        return base_hu.float() + correction  # the base unclipped: HU outside any range survive

    def forward(self, thin_hu: torch.Tensor, base_hu: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction in HU, posterior)."""
        posterior = self.encode(thin_hu, base_hu)
        return self.decode(posterior.sample(generator), base_hu), posterior

    # --- the save/load pair (models/folders.py, as models.regression) ------------------------------
    def save_pretrained(self, folder: str | Path, info: dict | None = None) -> Path:
        """Weights (safetensors, with the two scales) and config (JSON), each written atomically,
        the weights read back before they replace anything."""
        meta = {"config": self.config.to_dict(), "latent_scale": float(self.latent_scale),
                "condition_scale": float(self.condition_scale), "info": info or {}}
        return save_folder(folder, self, WEIGHTS_FILE, CONFIG_FILE, meta)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GuidedSliceVAE":
        meta, state = read_folder(folder, WEIGHTS_FILE, CONFIG_FILE)
        model = cls(GuidedVAEConfig.from_dict(meta["config"]))
        model.load_state_dict(state)
        return model.eval()


def guided_vae_loss(reconstruction_hu: torch.Tensor, thin_hu: torch.Tensor, posterior: LatentDistribution,
                    hu_scale: float, weight: torch.Tensor | None = None, kl_weight: float = 1e-6) -> torch.Tensor:
    """L1 in network units (optionally weighted per pixel) + a small KL term."""
    error = ((reconstruction_hu - thin_hu.float()) / hu_scale).abs()
    l1 = error.mean() if weight is None else (error * weight).mean() / weight.mean()
    return l1 + kl_weight * posterior.kl()


@torch.no_grad()
def measure_scales(vae: GuidedSliceVAE, thin_hu: torch.Tensor, base_hu: torch.Tensor, batch: int = 8) -> tuple[float, float]:
    """1 / std of the residual posterior means and of the base latents over (N, 1, H, W) slices:
    scaled by them, both have unit variance, which the diffusion schedule assumes."""
    means, bases = [], []
    for i in range(0, thin_hu.shape[0], batch):
        means.append(vae.encode(thin_hu[i : i + batch], base_hu[i : i + batch]).mean.float())
        bases.append(vae.base_latent(base_hu[i : i + batch]).float())
    return 1.0 / max(torch.cat(means).std().item(), 1e-6), 1.0 / max(torch.cat(bases).std().item(), 1e-6)
