"""The latent diffusion model's training schedule and loss.

- ``DDPMScheduler`` (diffusers) with the model's schedule (cosine, ``squaredcos_cap_v2``, 1000 steps);
- the loss is the MSE of the U-Net's v (or epsilon) prediction with min-SNR-gamma weighting
  (Hang et al. 2023), masked on padded depth.

Sampling (inference) is in ``ctsliceinterp.schedulers``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ctsliceinterp.models.configs import DiffusionConfig


def training_scheduler(config: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
    )



def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer ``timesteps``."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon targets; min(SNR, gamma) / (SNR + 1) for v targets."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values


def diffusion_loss(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    condition: torch.Tensor,
    positions: torch.Tensor,
    scheduler,
    config: DiffusionConfig,
    depth_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Min-SNR-weighted MSE of the U-Net's prediction, averaged over real (unpadded) slices.

    latents, condition: (B, C, D, H, W) scaled latents; positions: (B, P, D);
    depth_mask: (B, D) with 1 for real slices and 0 for padding (None: all real)."""
    b = latents.shape[0]
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, config.num_train_timesteps, (b,), device=device, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, condition, positions)
    error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 3, 4))  # (B, D)
    if depth_mask is None:
        depth_mask = torch.ones(error.shape, device=device)
    depth_mask = depth_mask.to(error.dtype)
    per_sample = (error * depth_mask).sum(dim=1) / depth_mask.sum(dim=1).clamp(min=1.0)
    weights = min_snr_weight(snr(scheduler, timesteps).float(), config.min_snr_gamma, config.prediction_type)
    return (weights * per_sample).mean()
