"""Parameter counts of the named model configs: ``python -m ctsliceinterp.models.sizes``."""

from __future__ import annotations

import torch

from .configs import CONFIGS, ModelConfig, get_config
from .unet import UNet3D
from .vae import SliceVAE


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts without allocating weights (meta device)."""
    with torch.device("meta"):
        unet = UNet3D(config.unet)
        vae = SliceVAE(config.vae)
    return {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "vae_decoder": sum(p.numel() for p in vae.decoder.parameters()),
    }


if __name__ == "__main__":
    for key in CONFIGS:
        counts = parameter_counts(get_config(key))
        print(f"{key:7s} U-Net {counts['unet'] / 1e6:8.2f} M   VAE {counts['vae'] / 1e6:6.2f} M (decoder {counts['vae_decoder'] / 1e6:.2f} M)")
