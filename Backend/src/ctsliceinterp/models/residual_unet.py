"""The residual diffusion U-Net of latent diffusion v2: ``models.unet``'s U-Net with a richer condition.

The condition tensor is (B, condition_channels + image_inputs * fold**2, D, h, w) at latent
resolution:
- ``condition_channels``: the base's latent and the thick latents (the guided VAE's guide encoder);
- then, when ``image_inputs`` > 0, full-resolution images of every thin slice (the base and the
  thick slices on either side of it, ``pipelines.residual_diffusion.image_condition``) packed
  space-to-depth by ``fold`` (8, the VAE's factor), so depth chunking and the training pool treat
  them as any latent-resolution channel. ``ImageEncoder`` unpacks them and learns full-resolution
  features, strided down to the latent grid: the 4-channel latents alone cannot tell the U-Net what
  the regression estimate missed (issue 13: the x0 head tied with ``regression`` on them).

``encode_condition`` runs the image encoder once per volume at inference (it does not depend on the
noise or the timestep); ``forward`` does it on every call, for training, where it also gives the x0
head (``posterior_mean``, the default output) from the same encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configs import UNetConfig
from .unet import UNet3D


@dataclass(frozen=True)
class ResidualUNetConfig(UNetConfig):
    condition_channels: int = 8  # the base latent and the thick latent
    image_inputs: int = 0  # full-resolution images in the condition (0: latents only)
    image_fold: int = 8
    image_widths: tuple[int, int, int] = (16, 32, 48)  # image encoder channels at 1/2, 1/4, 1/8

    @property
    def encoded_condition_channels(self) -> int:
        return self.condition_channels + (self.image_widths[-1] if self.image_inputs else 0)

    @property
    def raw_condition_channels(self) -> int:
        return self.condition_channels + self.image_inputs * self.image_fold**2

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.encoded_condition_channels + self.position_channels


class ImageEncoder(nn.Module):
    """Packed images (B, n * fold**2, D, h, w) -> features (B, widths[-1], D, h, w), slice by slice."""

    def __init__(self, config: ResidualUNetConfig):
        super().__init__()
        if config.image_fold != 8:
            raise ValueError("the image encoder folds 2 then strides twice: image_fold must be 8")
        w0, w1, w2 = config.image_widths
        self.fold = config.image_fold
        self.layers = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(4 * config.image_inputs, w0, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w0, w0, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w0, w1, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(w1, w1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(w2, w2, 3, padding=1),
        )

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = packed.shape
        slices = packed.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        features = self.layers(F.pixel_shuffle(slices, self.fold))
        return features.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)


def pack_images(images: torch.Tensor, fold: int) -> torch.Tensor:
    """(D, n, H, W) images -> (1, n * fold**2, D, H / fold, W / fold), the inverse of the encoder's unpacking."""
    return F.pixel_unshuffle(images, fold).permute(1, 0, 2, 3)[None]


class ResidualUNet3D(UNet3D):
    """``forward(noisy, timesteps, condition, positions)`` with the raw condition (module docstring);
    ``forward_encoded`` with ``encode_condition``'s output. With ``image_inputs = 0`` it is
    ``UNet3D`` exactly (same weights, same outputs)."""

    def __init__(self, config: ResidualUNetConfig):
        super().__init__(config)
        self.image_encoder = ImageEncoder(config) if config.image_inputs else None

    def encode_condition(self, condition: torch.Tensor) -> torch.Tensor:
        if self.image_encoder is None:
            return condition
        latents = self.config.condition_channels
        features = self.image_encoder(condition[:, latents:].to(self.conv_out.weight.dtype))
        return torch.cat([condition[:, :latents].to(features.dtype), features], dim=1)

    def forward_encoded(self, noisy: torch.Tensor, timesteps, condition: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(noisy, timesteps, condition, positions)

    def posterior_mean(self, condition: torch.Tensor, positions: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """The x0 head, from an encoded condition: minus the U-Net's v at the last timestep on a
        zero latent, (B, C, D, h, w).

        At t = T the noisy latent carries no signal, so v = -x0 up to the noise, which a zero input
        removes; trained with an unweighted MSE against the encoder's latent (min-SNR weights vanish
        at t = T), it is the posterior mean of the residual latent in one pass."""
        shape = (condition.shape[0], self.config.latent_channels) + tuple(condition.shape[2:])
        t = torch.full((condition.shape[0],), num_train_timesteps - 1, device=condition.device, dtype=torch.long)
        return -self.forward_encoded(torch.zeros(shape, device=condition.device, dtype=condition.dtype), t, condition, positions)

    def forward(self, noisy: torch.Tensor, timesteps, condition: torch.Tensor, positions: torch.Tensor,
                num_train_timesteps: Optional[int] = None):
        """The prediction from a raw condition; with ``num_train_timesteps``, ``(prediction,
        posterior_mean)`` from one image encoding (training's two loss terms, one DDP forward)."""
        encoded = self.encode_condition(condition)
        prediction = self.forward_encoded(noisy, timesteps, encoded, positions)
        if num_train_timesteps is None:
            return prediction
        return prediction, self.posterior_mean(encoded, positions, num_train_timesteps)

    def load_latent_only_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a trained latents-only U-Net (``image_inputs = 0``, same sizes otherwise): its
        weights, and the image features enter at zero, so this U-Net computes what it computed.
        A U-Net of another size is a one-line ``ValueError`` and leaves this one unchanged: every
        name and shape is checked before anything is copied (``load_state_dict`` would copy the
        matching tensors, then raise)."""
        state = dict(state)
        own = self.state_dict()
        key = "conv_in.0.weight" if "conv_in.0.weight" in own else "conv_in.weight"
        old = state.get(key)
        head = self.config.latent_channels + self.config.condition_channels
        if old is None or old.shape[1] != head + self.config.position_channels or old.shape[0] != own[key].shape[0]:
            found = "no input convolution" if old is None else f"an input convolution of shape {tuple(old.shape)}"
            raise ValueError(f"the U-Net to start from has {found}; a latents-only one of this size has "
                             f"{own[key].shape[0]} filters over {head + self.config.position_channels} channels")
        new = torch.zeros_like(own[key])
        new[:, :head] = old[:, :head]
        new[:, new.shape[1] - self.config.position_channels:] = old[:, head:]
        state[key] = new
        missing = [name for name in own if name not in state and not name.startswith("image_encoder.")]
        unexpected = [name for name in state if name not in own]
        reshaped = [name for name in state if name in own and state[name].shape != own[name].shape]
        if missing or unexpected or reshaped:
            problems = [f"{len(names)} {what} (first {names[0]})" for names, what in
                        ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if names]
            raise ValueError(f"the U-Net to start from is not a latents-only one of this size: tensors {', '.join(problems)}")
        self.load_state_dict(state, strict=False)
