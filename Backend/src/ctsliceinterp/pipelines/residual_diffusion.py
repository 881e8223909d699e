"""Latent diffusion v2: residual diffusion around the regression estimate (``--method residual_diffusion``).

In order (``ResidualDiffusionInterpolator.run``):
1. the base: the ``regression`` method's output on the thin grid, without its consistency
   correction (``RegressionInterpolator.run``), full HU range;
2. the condition, per thin slice: the guided VAE's latent of the base, plus the thick slices'
   latents (the same guide encoder) resampled linearly onto the thin positions, the position
   channels (``pipelines.diffusion.thin_positions``) and, for a U-Net with ``image_inputs``, the
   base and the thick slices on either side at full resolution (``image_condition``), encoded once
   by the U-Net's image encoder;
3. the depth-preserving 3-D U-Net (``models.residual_unet.ResidualUNet3D``) gives the *residual*
   latent in overlapping depth chunks (``depth_chunks.blend_over_depth``):
   its posterior mean by the x0 head, or samples;
4. the guided decode: base + the decoder's correction, in HU, slice batches;
5. the thick-slice consistency correction (``core.acquisition.consistency_correction``); nothing
   is clipped anywhere (HU in, HU out).

Outputs: by default the **posterior mean**, by the x0 head (``ResidualUNet3D.posterior_mean``: one U-Net
pass, no uncertainty) or, with ``inference.mean_estimator = "samples"``, the voxel-wise mean of
``inference.mean_samples`` samples; ``samples=1`` is **one realistic sample**; ``samples=N`` the
mean of N samples with their per-voxel standard deviation as the uncertainty. An untrained U-Net
predicts zero, so the residual latent is zero and, with an untrained decoder, the output is the base.

A model folder holds ``residual_diffusion.json`` + ``residual_unet.safetensors`` (the U-Net and the
schedule), the guided VAE (``guided_vae.json`` / ``.safetensors``, with its measured latent
scales) and ``regression/`` (the base network it was trained with), so it is self-contained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..api import sampling_refused
from ..core.acquisition import consistency_correction
from ..core.errors import GeometryError, InputError
from ..core.progress import as_reporter
from ..core.volume import Geometry, Volume
from ..models.configs import SAMPLERS, DiffusionConfig
from ..models.guided_vae import GuidedSliceVAE, GuidedVAEConfig
from ..models.regression import ThroughPlaneNet
from ..models.residual_unet import ResidualUNet3D, ResidualUNetConfig, pack_images
from .depth_chunks import blend_over_depth
from .device import resolve_device
from .diffusion import RunningMoments, pad_in_plane, resample_depth, thin_positions
from .regression import RegressionInterpolator, network_inputs

CONFIG_FILE = "residual_diffusion.json"
UNET_FILE = "residual_unet.safetensors"
REGRESSION_FOLDER = "regression"
IMAGE_INPUTS = 3  # the base and the thick slices on either side (image_condition)


MEAN_ESTIMATORS = ("x0_head", "samples")


@dataclass(frozen=True)
class ResidualInferenceConfig:
    sampler: str = "dpmpp"
    steps: int = 8
    # The default output, the posterior mean: "x0_head" (one U-Net pass, ``ResidualUNet3D.posterior_mean``)
    # or "samples" (the mean of ``mean_samples`` samples, with their standard deviation).
    mean_estimator: str = "x0_head"
    mean_samples: int = 4
    chunk_depth: int = 32
    chunk_overlap: int = 8
    batch_slices: int = 4  # slices per guided VAE call
    consistency_tolerance_hu: float = 1.0
    consistency_max_iterations: int = 50


@dataclass(frozen=True)
class ResidualDiffusionConfig:
    name: str = "custom"
    vae: GuidedVAEConfig = field(default_factory=GuidedVAEConfig)
    unet: ResidualUNetConfig = field(default_factory=ResidualUNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    inference: ResidualInferenceConfig = field(default_factory=ResidualInferenceConfig)

    def __post_init__(self) -> None:
        if self.unet.latent_channels != self.vae.latent_channels:
            raise InputError(f"U-Net latent channels ({self.unet.latent_channels}) differ from the VAE's ({self.vae.latent_channels})")
        if self.unet.condition_channels != 2 * self.vae.latent_channels:
            raise InputError("the U-Net's condition is the base latent and the thick latent: "
                             f"condition_channels must be {2 * self.vae.latent_channels}")
        if self.unet.image_inputs not in (0, IMAGE_INPUTS) or self.unet.image_fold != self.vae.downsampling_factor:
            raise InputError(f"the U-Net's image inputs are 0 or {IMAGE_INPUTS} images (image_condition), folded by the "
                             f"VAE's factor {self.vae.downsampling_factor}: got {self.unet.image_inputs}, fold {self.unet.image_fold}")
        if self.inference.mean_estimator not in MEAN_ESTIMATORS:
            raise InputError(f"mean_estimator must be one of {', '.join(MEAN_ESTIMATORS)}, got {self.inference.mean_estimator!r}")
        if self.inference.mean_estimator == "x0_head" and self.diffusion.prediction_type != "v_prediction":
            raise InputError("the x0 head needs v_prediction (at t = T, v is minus x0)")
        if self.inference.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.inference.sampler!r}")
        if not 0 <= self.inference.chunk_overlap < self.inference.chunk_depth:
            raise InputError("chunk overlap must be >= 0 and smaller than the chunk depth")

    @property
    def pixel_multiple(self) -> int:
        return self.vae.downsampling_factor * self.unet.downsampling_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ResidualDiffusionConfig":
        def build(kind, values):
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in (values or {}).items()})

        try:
            return cls(name=str(data.get("name", "custom")), vae=GuidedVAEConfig.from_dict(data.get("vae") or {}),
                       unet=build(ResidualUNetConfig, data.get("unet")), diffusion=build(DiffusionConfig, data.get("diffusion")),
                       inference=build(ResidualInferenceConfig, data.get("inference")))
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid residual diffusion configuration: {exc}") from None


def named_config(name: str) -> ResidualDiffusionConfig:
    """``tiny`` and ``tiny_images`` (tests); ``default`` (the shipped model, trained on a CPU) and
    ``images`` (the same with the full-resolution image inputs: stage 2b, started from ``default``'s
    U-Net; measured no better, docs/quality.md)."""
    if name in ("tiny", "tiny_images"):
        return ResidualDiffusionConfig(
            name=name,
            vae=GuidedVAEConfig(widths=(8, 16, 16), guide_widths=(8, 8, 16)),
            unet=ResidualUNetConfig(base_channels=16, channel_mult=(1, 2), blocks_per_level=1, attention_levels=(1,),
                                    attention_head_channels=16, norm_groups=8, conv="2+1d",
                                    image_inputs=IMAGE_INPUTS if name == "tiny_images" else 0, image_widths=(8, 8, 8)),
            inference=ResidualInferenceConfig(steps=4, mean_samples=3, chunk_depth=16, chunk_overlap=4),
        )
    if name in ("default", "images"):
        # U-Net 2+1-D, base 16; VAE light at 1/2 because the decoder runs on every thin slice of
        # every sample.
        return ResidualDiffusionConfig(
            name=name,
            vae=GuidedVAEConfig(widths=(24, 48, 96), guide_widths=(16, 24, 48)),
            unet=ResidualUNetConfig(base_channels=16, channel_mult=(1, 2, 4), blocks_per_level=1, attention_levels=(1, 2),
                                    attention_head_channels=16, conv="2+1d", norm_groups=8,
                                    image_inputs=IMAGE_INPUTS if name == "images" else 0),
        )
    raise InputError(f"unknown residual diffusion config {name!r}; choose tiny, tiny_images, default or images")


def image_condition(base_hu: np.ndarray, thick_hu: np.ndarray, x: np.ndarray, regression_config) -> np.ndarray:
    """(D, 3, H, W) network-unit images of the thin slices at thick indices ``x``: the base, and the
    differences to it of the thick slices at or below and above, by the regression network's own
    input rule (``network_inputs``: the same units and clipping)."""
    two_neighbours = dataclasses.replace(regression_config, neighbours=2)
    return network_inputs(thick_hu, x, base_hu, 1.0, 1.0, two_neighbours)[:, :IMAGE_INPUTS]


# --- the model folder --------------------------------------------------------------------------
def save_residual_model(folder: str | Path, vae: GuidedSliceVAE, regression: ThroughPlaneNet,
                        config: ResidualDiffusionConfig, unet: Optional[ResidualUNet3D] = None, info: dict | None = None) -> Path:
    """The guided VAE, its base network and (when trained) the U-Net, each file atomic."""
    from ..models.folders import save_json, save_weights

    folder = Path(folder)
    vae.save_pretrained(folder, info=info)
    regression.save_pretrained(folder / REGRESSION_FOLDER)
    if unet is not None:
        save_weights(folder / UNET_FILE, unet)
    save_json(folder / CONFIG_FILE, {"config": config.to_dict(), "has_unet": unet is not None, "info": info or {}})
    return folder


def load_residual_model(folder: str | Path, require_unet: bool = True):
    """(config, guided VAE, regression network, U-Net or None) from a model folder or the name of a
    shipped one (``models/weights/<name>``)."""
    from safetensors.torch import load_file

    from ..models import WEIGHTS_DIR

    given = str(folder)
    folder = Path(folder).expanduser()
    if not (folder / CONFIG_FILE).is_file() and (WEIGHTS_DIR / given / CONFIG_FILE).is_file():
        folder = WEIGHTS_DIR / given
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(f"no residual diffusion model {given!r}: give a shipped name or a folder holding {CONFIG_FILE}")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    config = ResidualDiffusionConfig.from_dict(meta["config"])
    vae = GuidedSliceVAE.from_pretrained(folder)
    if vae.config != config.vae:
        raise InputError(f"{folder}: the guided VAE's config differs from {CONFIG_FILE}'s")
    regression = ThroughPlaneNet.from_pretrained(folder / REGRESSION_FOLDER)
    unet = None
    if (folder / UNET_FILE).is_file():
        unet = ResidualUNet3D(config.unet)
        unet.load_state_dict(load_file(str(folder / UNET_FILE)))
        unet.eval()
    elif require_unet:
        raise InputError(f"{folder} holds a guided VAE without a trained U-Net: it cannot interpolate")
    return config, vae, regression, unet


# --- the pipeline ------------------------------------------------------------------------------
class ResidualDiffusionInterpolator:
    """A loaded residual latent diffusion model. ``load(folder)``, then ``run``."""

    def __init__(self, vae: GuidedSliceVAE, unet: ResidualUNet3D, regression: ThroughPlaneNet, config: ResidualDiffusionConfig,
                 device="auto", name: str = ""):
        self.config = config
        self.device = resolve_device(device)
        self.name = name or config.name
        self.vae = vae.to(self.device).eval()
        self.unet = unet.to(self.device).eval()
        self.regression = RegressionInterpolator(regression, self.device, name=f"{self.name}/regression")
        self.last_timings: dict[str, float] = {}

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device="auto") -> "ResidualDiffusionInterpolator":
        config, vae, regression, unet = load_residual_model(name_or_path)
        return cls(vae, unet, regression, config, device, name=Path(name_or_path).name)

    # --- stages on arrays (the training monitor calls them too) --------------------------------
    def in_slice_batches(self, fn, arrays: list[np.ndarray], batch: int) -> torch.Tensor:
        """``fn`` on (D, H, W) arrays in slice batches -> results concatenated along dim 0."""
        parts = []
        for start in range(0, arrays[0].shape[0], batch):
            tensors = [torch.from_numpy(np.ascontiguousarray(a[start : start + batch], dtype=np.float32))[:, None]
                       .to(self.device) for a in arrays]
            parts.append(fn(*tensors).float())
        return torch.cat(parts)

    def latent_condition(self, base_hu: np.ndarray, thick_hu: np.ndarray, x: np.ndarray) -> torch.Tensor:
        """(1, 2C, D, h, w): the scaled latents of the base slices and of the thick slices, the
        latter resampled at continuous thick indices ``x``. Arrays padded to ``pixel_multiple``."""
        batch, scale = self.config.inference.batch_slices, self.vae.condition_scale
        base_z = self.in_slice_batches(self.vae.base_latent, [base_hu], batch) * scale
        thick_z = self.in_slice_batches(self.vae.base_latent, [thick_hu], batch) * scale
        thick_z = resample_depth(thick_z.permute(1, 0, 2, 3)[None], x)
        return torch.cat([base_z.permute(1, 0, 2, 3)[None], thick_z], dim=1)

    def _packed_images(self, base_hu: np.ndarray, thick_hu: np.ndarray, x: np.ndarray) -> torch.Tensor:
        images = image_condition(base_hu, thick_hu, x, self.regression.config)
        return pack_images(torch.from_numpy(images).to(self.device), self.config.unet.image_fold)

    def condition(self, base_hu: np.ndarray, thick_hu: np.ndarray, x: np.ndarray) -> torch.Tensor:
        """The U-Net's raw condition (``models.residual_unet``): the latent condition, then the
        packed full-resolution images when the U-Net takes them (what training stores)."""
        latents = self.latent_condition(base_hu, thick_hu, x)
        if not self.config.unet.image_inputs:
            return latents
        return torch.cat([latents, self._packed_images(base_hu, thick_hu, x)], dim=1)

    def encoded_condition(self, base_hu: np.ndarray, thick_hu: np.ndarray, x: np.ndarray) -> torch.Tensor:
        """``condition`` through the U-Net's image encoder, once, in slice batches (the packed
        images of a whole volume would be three volumes' worth of memory)."""
        latents = self.latent_condition(base_hu, thick_hu, x)
        if not self.config.unet.image_inputs:
            return latents
        batch = 4 * self.config.inference.batch_slices
        parts = [self.unet.encode_condition(torch.cat([latents[:, :, a : a + batch],
                                                       self._packed_images(base_hu[a : a + batch], thick_hu, x[a : a + batch])], dim=1))
                 for a in range(0, len(x), batch)]
        return torch.cat(parts, dim=2)

    def _over_depth(self, fn, condition: torch.Tensor) -> torch.Tensor:
        """``fn(start, stop)`` -> a (1, C, chunk, h, w) latent, blended over overlapping depth chunks."""
        inference = self.config.inference
        shape = (1, self.config.vae.latent_channels) + tuple(condition.shape[2:])
        return blend_over_depth(fn, shape, inference.chunk_depth, inference.chunk_overlap, self.device)

    # ``condition`` below is ``encoded_condition``'s.
    def sample_residual(self, condition: torch.Tensor, positions: torch.Tensor, sampler: str, steps: int,
                        generator: torch.Generator, on_step=None) -> torch.Tensor:
        from ..schedulers import sample, sampling_scheduler

        scheduler = sampling_scheduler(sampler, self.config.diffusion)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._over_depth(lambda a, b: self.unet.forward_encoded(x_t[:, :, a:b], t, condition[:, :, a:b],
                                                                           positions[:, :, a:b]), condition)

        shape = (1, self.config.vae.latent_channels) + tuple(condition.shape[2:])
        return sample(denoise, shape, scheduler, steps, generator, self.device, on_step)

    def mean_residual(self, condition: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The posterior mean of the scaled residual latent by the x0 head, in depth chunks."""
        steps = self.config.diffusion.num_train_timesteps
        return self._over_depth(lambda a, b: self.unet.posterior_mean(condition[:, :, a:b], positions[:, :, a:b], steps),
                                condition)

    def decode(self, latents: torch.Tensor, base_hu: np.ndarray) -> np.ndarray:
        """Scaled residual latents (1, C, D, h, w) and the padded base (D, H, W) -> HU (D, H, W)."""
        batch = self.config.inference.batch_slices
        z = (latents[0].permute(1, 0, 2, 3) / self.vae.latent_scale).contiguous()
        out = np.empty(base_hu.shape, dtype=np.float32)
        for start in range(0, base_hu.shape[0], batch):
            base = torch.from_numpy(np.ascontiguousarray(base_hu[start : start + batch], dtype=np.float32))[:, None]
            out[start : start + batch] = self.vae.decode(z[start : start + batch], base.to(self.device))[:, 0].cpu().numpy()
        return out

    # --- the whole pipeline ------------------------------------------------------------------
    def run(self, volume: Volume, target: Geometry, steps: Optional[int] = None, sampler: Optional[str] = None,
            samples: Optional[int] = None, consistency: bool = True, seed: Optional[int] = None,
            reporter=None) -> tuple[Volume, Optional[Volume]]:
        """``samples`` None: the default output, the posterior mean (``inference.mean_estimator``:
        the x0 head, no uncertainty; or the mean of ``inference.mean_samples`` samples with their
        per-voxel standard deviation). ``samples=1``: one realistic sample; ``samples=N``: the
        mean of N samples with their standard deviation."""
        reporter = as_reporter(reporter)
        inference = self.config.inference
        head = samples is None and inference.mean_estimator == "x0_head"
        refused = sampling_refused(inference.mean_estimator, samples, steps, sampler)
        if refused:
            raise InputError(refused)
        steps = int(steps or inference.steps)
        sampler = sampler or inference.sampler
        samples = 1 if head else int(inference.mean_samples if samples is None else samples)
        self._check(volume, target, steps, sampler, samples)
        timings = dict.fromkeys(("base", "condition", "sample", "decode", "consistency"), 0.0)
        with torch.inference_mode():
            t0 = time.perf_counter()
            base = self.regression.run(volume, target, consistency=False, reporter=reporter).array
            timings["base"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            multiple = self.config.pixel_multiple
            base_padded, (height, width) = pad_in_plane(base, multiple)
            thick_padded, _ = pad_in_plane(np.asarray(volume.array, dtype=np.float32), multiple)
            x, positions = thin_positions(volume.geometry, target)
            condition = self.encoded_condition(base_padded, thick_padded, x)
            positions = torch.from_numpy(positions)[None].to(self.device)
            timings["condition"] = time.perf_counter() - t0
            moments = RunningMoments()
            for k in range(samples):
                generator = torch.Generator()
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(int(seed) + k)
                t0 = time.perf_counter()
                if head:
                    latents = self.mean_residual(condition, positions)
                else:
                    latents = self.sample_residual(condition, positions, sampler, steps, generator,
                                                   lambda i, n, k=k: reporter.update("sample", k * steps + i, samples * steps))
                timings["sample"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                result = self.decode(latents, base_padded)[:, :height, :width]
                timings["decode"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if consistency:
                    result, _ = consistency_correction(result, target, volume.array, volume.geometry, volume.slice_thickness,
                                                       inference.consistency_tolerance_hu,
                                                       inference.consistency_max_iterations, reporter)
                timings["consistency"] += time.perf_counter() - t0
                moments.add(result)
        self.last_timings = timings
        if head:
            kind, details = "posterior mean", {"estimator": "x0 head"}
        else:
            kind = "posterior mean" if samples > 1 else "one sample"
            details = {"sampler": sampler, "steps": steps, "samples": samples}
        output = volume.derived(moments.mean, target, method="residual_diffusion", model=self.name, output=kind, **details)
        uncertainty = output.replace(moments.std(), quantity="standard deviation (HU)") if samples > 1 else None
        return output, uncertainty

    def _check(self, volume: Volume, target: Geometry, steps: int, sampler: str, samples: int) -> None:
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= self.config.diffusion.num_train_timesteps:
            raise InputError(f"steps must be between 1 and {self.config.diffusion.num_train_timesteps}, got {steps}")
        if samples < 1:
            raise InputError(f"samples must be at least 1, got {samples}")
        if volume.shape[0] < 2:
            raise InputError("the input has a single slice: at least 2 slices are needed")
        if tuple(target.shape[1:]) != tuple(volume.shape[1:]):
            raise GeometryError("the target grid must share the input's in-plane grid")
