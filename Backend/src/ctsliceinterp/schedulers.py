"""Noise schedule, training loss and sampler wrappers for the latent diffusion model.

Schedulers come from diffusers (no hand-written samplers):
- training: ``DDPMScheduler`` with the cosine schedule (``squaredcos_cap_v2``), 1000 steps;
- sampling: ``DDIMScheduler`` (20-50 steps) or ``DPMSolverMultistepScheduler`` (DPM-Solver++,
  2nd order, <= 10 steps), both with "trailing" timestep spacing so that sampling starts from
  pure noise even at few steps.

Prediction type is ``v_prediction`` by default (``epsilon`` also supported); the loss uses
min-SNR-gamma weighting (Hang et al. 2023) and is masked on padded depth.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .core.errors import InputError
from .models.configs import SAMPLERS, DiffusionConfig


def training_scheduler(config: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
    )


def sampling_scheduler(name: str, config: DiffusionConfig):
    """A fresh diffusers scheduler for ``name`` in ("ddim", "dpmpp")."""
    common = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing="trailing",
    )
    if name == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if name == "dpmpp":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, **common)
    raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


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


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(
    denoise: Denoiser,
    shape: tuple[int, ...],
    scheduler,
    steps: int,
    generator: torch.Generator,
    device: torch.device,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Run ``scheduler`` for ``steps`` from Gaussian noise; ``denoise(x_t, t)`` returns the model
    prediction (eps or v) for the whole tensor. Noise is drawn on the CPU generator so a seed gives
    the same start on every device."""
    if steps < 1:
        raise InputError(f"the number of sampling steps must be at least 1, got {steps}")
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    x = x * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, t)
        prediction = denoise(model_input, t).float()
        x = scheduler.step(prediction, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x
