"""Named model configurations: ``tiny`` (tests), ``default`` (the CPU-trained v1 model once shipped), ``small`` (CPU inference, GPU-trained), ``medium`` (origin design).

A ``ModelConfig`` fully describes the networks, the intensity window, the diffusion schedule and
the inference defaults. It is stored as JSON in every checkpoint (``to_dict`` / ``from_dict``), so
a checkpoint can always rebuild the exact networks it was trained with.

``python -m ctsliceinterp.models.sizes`` prints the parameter counts of each config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import CTSliceInterpError


class ConfigError(CTSliceInterpError):
    """A model configuration is unknown or inconsistent."""


@dataclass(frozen=True)
class VAEConfig:
    """Slice-wise KL autoencoder: 2-D convs applied to every slice, no compression in depth.

    ``encoder_channels`` has one entry per resolution level; every level but the last is followed
    by a stride-2 downsampling, plus one more before the bottleneck, so len(channels) levels give
    len(channels) downsamplings (64 -> 128 -> 256: 512 px -> 64 latent px)."""

    in_channels: int = 1
    latent_channels: int = 4
    encoder_channels: tuple[int, ...] = (64, 128, 256)
    # The decoder may be lighter than the encoder: it runs on every thin slice at inference.
    decoder_channels: tuple[int, ...] = (64, 128, 256)
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    norm_groups: int = 32

    @property
    def downsampling_factor(self) -> int:
        return 2 ** len(self.encoder_channels)


@dataclass(frozen=True)
class UNetConfig:
    """Depth-preserving 3-D U-Net on latents (D, H, W); down/upsampling in-plane only.

    Input channels: noisy latent + thick latent resampled on the thin grid + position channels."""

    latent_channels: int = 4
    position_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # 0-based levels with attention along depth
    attention_middle: bool = True
    attention_head_channels: int = 64
    # "3d": full 3x3x3 convs (origin design). "2+1d": (1,3,3) in-plane then (3,1,1) along depth,
    # about half the FLOPs, used by the CPU-friendly small model.
    conv: str = "3d"
    norm_groups: int = 32
    dropout: float = 0.0

    @property
    def in_channels(self) -> int:
        return 2 * self.latent_channels + self.position_channels

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # the cosine schedule (Nichol & Dhariwal)
    prediction_type: str = "v_prediction"  # or "epsilon"
    min_snr_gamma: float = 5.0


@dataclass(frozen=True)
class InferenceConfig:
    sampler: str = "dpmpp"  # "ddim" or "dpmpp"
    steps: int = 8
    chunk_depth: int = 32  # thin slices per U-Net call (bounded memory, any depth)
    chunk_overlap: int = 8  # blended with a cosine ramp
    encode_batch: int = 8  # slices per VAE call
    decode_batch: int = 4
    consistency_tolerance_hu: float = 1.0
    consistency_max_iterations: int = 50


@dataclass(frozen=True)
class IntensityWindow:
    """The model sees HU in [center - width/2, center + width/2] mapped to [-1, 1]."""

    center: float = 40.0
    width: float = 400.0

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    window: IntensityWindow = field(default_factory=IntensityWindow)

    def __post_init__(self) -> None:
        if self.unet.latent_channels != self.vae.latent_channels:
            raise ConfigError(
                f"U-Net latent channels ({self.unet.latent_channels}) differ from the VAE's ({self.vae.latent_channels})"
            )
        if self.diffusion.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction type must be 'epsilon' or 'v_prediction', got {self.diffusion.prediction_type!r}")
        if self.unet.conv not in ("3d", "2+1d"):
            raise ConfigError(f"U-Net conv must be '3d' or '2+1d', got {self.unet.conv!r}")
        if self.inference.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.inference.sampler!r}")
        if not 0 <= self.inference.chunk_overlap < self.inference.chunk_depth:
            raise ConfigError("chunk overlap must be >= 0 and smaller than the chunk depth")

    @property
    def pixel_multiple(self) -> int:
        """In-plane image sizes must be multiples of this (the pipeline pads to it)."""
        return self.vae.downsampling_factor * self.unet.downsampling_factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        try:
            parts = {
                "vae": _build(VAEConfig, data.get("vae", {})),
                "unet": _build(UNetConfig, data.get("unet", {})),
                "diffusion": _build(DiffusionConfig, data.get("diffusion", {})),
                "inference": _build(InferenceConfig, data.get("inference", {})),
                "window": _build(IntensityWindow, data.get("window", {})),
            }
        except TypeError as exc:
            raise ConfigError(f"invalid model configuration: {exc}") from exc
        return cls(name=str(data.get("name", "custom")), **parts)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


SAMPLERS = ("ddim", "dpmpp", "dpmpp_sde")


def _build(kind, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} fields: {', '.join(sorted(unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**values)


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vae=VAEConfig(encoder_channels=(16, 32, 32), decoder_channels=(16, 32, 32), encoder_blocks=1, decoder_blocks=1, norm_groups=8),
        unet=UNetConfig(
            base_channels=16, channel_mult=(1, 2), blocks_per_level=1, attention_levels=(1,),
            attention_head_channels=16, norm_groups=8,
        ),
        inference=InferenceConfig(steps=4, chunk_depth=16, chunk_overlap=4),
    )


def _small() -> ModelConfig:
    return ModelConfig(
        name="small",
        # Encoder as in the origin design; decoder a quarter of the width at full resolution
        # because it runs on every thin slice (5x more than the encoder) on a CPU.
        vae=VAEConfig(encoder_channels=(64, 128, 256), decoder_channels=(32, 64, 128), encoder_blocks=1, decoder_blocks=1),
        unet=UNetConfig(
            base_channels=32, channel_mult=(1, 2, 4), blocks_per_level=1, attention_levels=(1, 2),
            attention_head_channels=32, conv="2+1d",
        ),
        inference=InferenceConfig(steps=8, chunk_depth=72, chunk_overlap=8),
    )


def _default() -> ModelConfig:
    # The v1 model trained on a CPU and once shipped as weights/default (its MODEL_CARD.md is in git history): 'small'
    # at half width (VAE 32/64/128, U-Net base 16), 3-4x fewer FLOPs per step and per volume.
    return ModelConfig(
        name="default",
        vae=VAEConfig(encoder_channels=(32, 64, 128), decoder_channels=(32, 64, 128), encoder_blocks=1, decoder_blocks=1),
        unet=UNetConfig(
            base_channels=16, channel_mult=(1, 2, 4), blocks_per_level=1, attention_levels=(1, 2),
            attention_head_channels=16, conv="2+1d", norm_groups=8,
        ),
        # Chunks as deep as the training samples (Training/configs/default_diffusion.yaml: depth 32).
        inference=InferenceConfig(steps=8, chunk_depth=32, chunk_overlap=8),
    )


def _medium() -> ModelConfig:
    return ModelConfig(
        name="medium",
        vae=VAEConfig(),
        unet=UNetConfig(),
        inference=InferenceConfig(sampler="dpmpp", steps=10, chunk_depth=64, chunk_overlap=16, encode_batch=16, decode_batch=16),
    )


CONFIGS = {"tiny": _tiny, "default": _default, "small": _small, "medium": _medium}

# Stated parameter ranges (U-Net, VAE), tested in Testing/backend/test_models.py.
PARAMETER_RANGES = {
    "tiny": {"unet": (0.05e6, 0.5e6), "vae": (0.02e6, 0.3e6)},
    "default": {"unet": (0.5e6, 2e6), "vae": (1e6, 3e6)},
    "small": {"unet": (2e6, 12e6), "vae": (2e6, 8e6)},
    "medium": {"unet": (243e6, 297e6), "vae": (3e6, 15e6)},
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ConfigError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}") from None
