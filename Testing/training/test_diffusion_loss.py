"""The diffusion training loss (Training/diffusion_loss.py): min-SNR weights, padding masked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ctsliceinterp.models.configs import get_config
from ctsliceinterp.models.unet import UNet3D

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Training"))

from diffusion_loss import diffusion_loss, min_snr_weight, snr, training_scheduler  # noqa: E402

# diffusers builds its sigmas with np.array(tensor) (harmless under numpy 2).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_min_snr_weighting_and_masked_loss():
    config = get_config("tiny").diffusion
    scheduler = training_scheduler(config)
    t = torch.tensor([0, 500, 999])
    s = snr(scheduler, t)
    assert s[0] > s[1] > s[2] > 0  # cosine schedule: SNR falls with t
    w_v = min_snr_weight(s, 5.0, "v_prediction")
    w_eps = min_snr_weight(s, 5.0, "epsilon")
    torch.testing.assert_close(w_v, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    assert w_eps[2] == pytest.approx(1.0)  # low SNR: gamma does not clip
    assert w_eps[0] == pytest.approx(5.0 / s[0].item())

    # A fresh U-Net predicts exactly 0 (zero-initialised output conv), so the loss is the
    # weighted target energy of the real slices: padded slices must not count.
    unet = UNet3D(get_config("tiny").unet)
    latents = torch.randn(2, 4, 6, 8, 8)
    mask = torch.ones(2, 6)
    mask[:, 4:] = 0
    losses = []
    for pad_value in (0.0, 1e3):
        padded = latents.clone()
        padded[:, :, 4:] = pad_value
        generator = torch.Generator().manual_seed(1)
        losses.append(diffusion_loss(unet, padded, torch.zeros_like(padded), torch.zeros(2, 3, 6), scheduler, config, mask, generator))
    assert torch.isfinite(losses[0])
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
