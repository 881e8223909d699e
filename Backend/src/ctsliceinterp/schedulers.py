"""Sampler wrappers for the latent diffusion model (the training schedule and loss are in
``Training/diffusion_loss.py``).

Schedulers come from diffusers (no hand-written samplers): ``DDIMScheduler`` (20-50 steps) or
``DPMSolverMultistepScheduler`` (DPM-Solver++, 2nd order, <= 10 steps; ``dpmpp_sde`` its stochastic
form, which draws fresh noise at each step), all with "trailing"
timestep spacing so that sampling starts from pure noise even at few steps. Prediction type is
``v_prediction`` by default (``epsilon`` also supported).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .core.errors import InputError
from .models.configs import SAMPLERS, DiffusionConfig


def sampling_scheduler(name: str, config: DiffusionConfig):
    """A fresh diffusers scheduler for ``name`` in ``SAMPLERS``."""
    common = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing="trailing",
    )
    if name == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if name in ("dpmpp", "dpmpp_sde"):
        from diffusers import DPMSolverMultistepScheduler

        algorithm = "sde-dpmsolver++" if name == "dpmpp_sde" else "dpmsolver++"
        return DPMSolverMultistepScheduler(algorithm_type=algorithm, solver_order=2, lower_order_final=True, **common)
    raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


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
        x = scheduler.step(prediction, t, x, generator=generator, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x
