"""The diffusion ``Interpolator``: thick HU volume in, thin HU volume out.

The ``diffusion`` method of ``ctsliceinterp.api`` (the CLI, the server and Slicer reach it through
``api.interpolate``). In order:

1. window and normalise (the model sees ``config.window`` mapped to [-1, 1]);
2. VAE-encode the thick slices in batches (posterior mean, times the stored latent scale);
3. condition: the thick latent resampled linearly onto the thin slice positions, plus position
   channels saying where each thin slice stands between acquired slices;
4. sample (diffusers DDIM or DPM-Solver++) in overlapping depth chunks whose predictions are
   blended with cosine ramps at every step (``depth_chunks``): any depth, memory bounded by the chunk length;
5. VAE-decode in slice batches; 6. de-normalise;
7. HU blend: where the value is outside the model's window (air, lung, bone) the output is the
   classical B-spline interpolation, with a smooth ramp at the window edges: nothing is clipped;
8. thick-slice consistency: re-average the output with the acquisition model (slab means) and
   back-project the residual until the mean residual is <= 1 HU.

``samples > 1`` gives the voxel-wise mean and a standard-deviation (uncertainty) volume.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np
import torch

from .device import resolve_device
from ..core.acquisition import consistency_correction
from .checkpoint import Checkpoint, load_checkpoint
from .depth_chunks import blend_over_depth
from ..core.classical import interpolate_classical
from ..schedulers import sample, sampling_scheduler
from ..core.errors import GeometryError, InputError
from ..core.grid import fractional_indices
from ..models.configs import SAMPLERS, IntensityWindow, ModelConfig
from ..core.progress import Reporter, as_reporter
from ..core.volume import Geometry, Volume

# Width of the ramp (fraction of the window width) over which the output passes from the model
# to the classical interpolation at each window edge.
WINDOW_EDGE_FRACTION = 0.1


# --- intensity ------------------------------------------------------------------------------
def normalise(hu: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """HU -> [-1, 1] inside the window (values outside saturate: only the model sees this)."""
    x = (np.asarray(hu, dtype=np.float32) - window.low) * (2.0 / window.width) - 1.0
    return np.clip(x, -1.0, 1.0)


def denormalise(x: np.ndarray, window: IntensityWindow) -> np.ndarray:
    return (np.asarray(x, dtype=np.float32) + 1.0) * (window.width / 2.0) + window.low


def window_weight(hu: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """1 well inside the window, 0 at and beyond its edges, smoothstep ramps in between."""
    margin = WINDOW_EDGE_FRACTION * window.width
    lo = np.clip((hu - window.low) / margin, 0.0, 1.0)
    hi = np.clip((window.high - hu) / margin, 0.0, 1.0)
    smooth = lambda t: t * t * (3.0 - 2.0 * t)  # noqa: E731
    return (smooth(lo) * smooth(hi)).astype(np.float32)


def blend_with_classical(model_hu: np.ndarray, classical_hu: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Model inside the window, classical outside it. The weight needs both to be inside: the
    classical value says where the anatomy is air or bone, the model's saturated output says
    where it sees values past the window edge."""
    w = window_weight(classical_hu, window) * window_weight(model_hu, window)
    return classical_hu + w * (model_hu - classical_hu)


# --- conditioning ---------------------------------------------------------------------------
def thin_positions(thick: Geometry, target: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Continuous thick-slice index of every target slice (clamped to the thick range) and the
    position channels (3, D): fractional offset from the previous acquired slice in [0, 1),
    distance to the nearest acquired slice (0 on it, 1 midway), thin/thick spacing ratio."""
    n_thick = thick.shape[0]
    x = np.clip(fractional_indices(thick, target), 0.0, n_thick - 1.0)
    frac = x - np.floor(x)
    nearest = 2.0 * np.minimum(frac, 1.0 - frac)
    ratio = np.full_like(x, target.slice_spacing / thick.slice_spacing)
    return x, np.stack([frac, nearest, ratio]).astype(np.float32)


def resample_depth(latents: torch.Tensor, x: np.ndarray) -> torch.Tensor:
    """Linear interpolation of (B, C, D_thick, H, W) at continuous depth indices ``x``."""
    n = latents.shape[2]
    i0 = np.clip(np.floor(x).astype(np.int64), 0, max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    f = torch.as_tensor(x - i0, dtype=latents.dtype, device=latents.device)[None, None, :, None, None]
    a = latents.index_select(2, torch.as_tensor(i0, device=latents.device))
    b = latents.index_select(2, torch.as_tensor(i1, device=latents.device))
    return a + f * (b - a)


def pad_in_plane(array: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Edge-pad (D, H, W) up to multiples of ``multiple`` in-plane (what the VAE needs); returns the
    padded array and the original (H, W) to crop back to. Training pads the same way."""
    h, w = array.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        array = np.pad(array, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return array, (h, w)


class Interpolator:
    """A loaded latent diffusion model. ``Interpolator.load(path_or_name)``, then ``run``."""

    def __init__(self, vae, unet, config: ModelConfig, latent_scale: float, device="auto", compile: bool = False, name: str = ""):
        if unet is None:
            raise InputError("the model has no trained U-Net (a VAE-only checkpoint): it cannot interpolate")
        self.config = config
        self.latent_scale = float(latent_scale)
        self.device = resolve_device(device)
        self.name = name or config.name
        self.vae = vae.to(self.device).eval().to(memory_format=torch.channels_last)
        self.unet = unet.to(self.device).eval()
        self._unet_call = torch.compile(self.unet) if compile else self.unet
        self._decode_call = torch.compile(self.vae.decode) if compile else self.vae.decode
        self.last_timings: dict[str, float] = {}
        self.last_consistency: list[list[float]] = []

    @classmethod
    def load(cls, path_or_name, device="auto", compile: bool = False) -> "Interpolator":
        checkpoint: Checkpoint = load_checkpoint(path_or_name, device="cpu", require_unet=True)
        name = checkpoint.path.name if checkpoint.path else checkpoint.config.name
        return cls(checkpoint.vae, checkpoint.unet, checkpoint.config, checkpoint.latent_scale, device, compile, name)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- stages ------------------------------------------------------------------------
    def encode(self, normalised: np.ndarray, reporter: Reporter) -> torch.Tensor:
        """(D, H, W) in [-1, 1] -> scaled latents (1, C, D, H/8, W/8)."""
        batch = self.config.inference.encode_batch
        n = normalised.shape[0]
        parts = []
        reporter.update("encode", 0, n)
        for start in range(0, n, batch):
            x = torch.from_numpy(np.ascontiguousarray(normalised[start : start + batch]))[:, None].to(self.device)
            with self._autocast():
                parts.append(self.vae.encode(x.contiguous(memory_format=torch.channels_last)).mean.float())
            reporter.update("encode", min(start + batch, n), n)
        return (torch.cat(parts) * self.latent_scale).permute(1, 0, 2, 3)[None].contiguous()

    def decode(self, latents: torch.Tensor, size: tuple[int, int], reporter: Reporter, done: int, total: int) -> np.ndarray:
        """Scaled latents (1, C, D, h, w) -> HU (D, H, W) cropped to ``size`` (before HU blend)."""
        batch = self.config.inference.decode_batch
        depth = latents.shape[2]
        out = np.empty((depth,) + tuple(size), dtype=np.float32)
        for start in range(0, depth, batch):
            z = latents[0, :, start : start + batch].permute(1, 0, 2, 3) / self.latent_scale
            with self._autocast():
                image = self._decode_call(z.contiguous(memory_format=torch.channels_last))
            out[start : start + batch] = image[:, 0, : size[0], : size[1]].float().cpu().numpy()
            reporter.update("decode", done + min(start + batch, depth), total)
        return denormalise(out, self.config.window)

    def sample_latents(self, condition: torch.Tensor, positions: torch.Tensor, sampler: str, steps: int, generator: torch.Generator, on_step) -> torch.Tensor:
        inference = self.config.inference
        scheduler = sampling_scheduler(sampler, self.config.diffusion)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            def one_chunk(start: int, stop: int) -> torch.Tensor:
                with self._autocast():
                    return self._unet_call(
                        x_t[:, :, start:stop].contiguous(memory_format=torch.channels_last_3d),
                        t,
                        condition[:, :, start:stop].contiguous(memory_format=torch.channels_last_3d),
                        positions[:, :, start:stop],
                    )

            return blend_over_depth(one_chunk, tuple(x_t.shape), inference.chunk_depth, inference.chunk_overlap, self.device)

        return sample(denoise, tuple(condition.shape), scheduler, steps, generator, self.device, on_step)

    # --- the whole pipeline --------------------------------------------------------------
    def run(
        self,
        volume: Volume,
        target: Geometry,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        samples: Optional[int] = None,
        consistency: bool = True,
        seed: Optional[int] = None,
        reporter=None,
    ) -> tuple[Volume, Optional[Volume]]:
        """Interpolate ``volume`` (HU) onto ``target`` (same in-plane grid). Returns the HU volume
        and, when ``samples > 1``, the per-voxel standard deviation over the samples.
        ``samples`` None (the request's "method default"): one sample."""
        reporter = as_reporter(reporter)
        samples = 1 if samples is None else int(samples)
        steps, sampler = self._check(volume, target, steps, sampler, samples)
        timings = {"encode": 0.0, "sample": 0.0, "decode": 0.0, "consistency": 0.0, "classical": 0.0}
        self.last_consistency = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            condition, positions, size = self._condition(volume, target, reporter)
            timings["encode"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            classical = interpolate_classical(volume, target, "bspline").array
            timings["classical"] += time.perf_counter() - t0
            moments = RunningMoments()
            for k in range(samples):
                moments.add(self._sample_once(volume, target, condition, positions, classical, size, sampler, steps,
                                              None if seed is None else int(seed) + k, consistency,
                                              (k, samples), reporter, timings))
        self.last_timings = timings
        output = volume.derived(moments.mean, target, method="diffusion", model=self.name, sampler=sampler,
                                steps=steps, samples=samples)
        uncertainty = None
        if samples > 1:
            uncertainty = output.replace(moments.std(), quantity="standard deviation (HU)")
        return output, uncertainty

    def _check(self, volume: Volume, target: Geometry, steps, sampler, samples: int) -> tuple[int, str]:
        """The sampling steps and sampler to use; an error for anything this model cannot do."""
        config, inference = self.config, self.config.inference
        steps = int(steps or inference.steps)
        sampler = sampler or inference.sampler
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= config.diffusion.num_train_timesteps:
            raise InputError(f"steps must be between 1 and {config.diffusion.num_train_timesteps}, got {steps}")
        if samples < 1:
            raise InputError(f"samples must be at least 1, got {samples}")
        if tuple(target.shape[1:]) != tuple(volume.shape[1:]):
            raise GeometryError("the target grid must share the input's in-plane grid")
        return steps, sampler

    def _condition(self, volume: Volume, target: Geometry, reporter: Reporter) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode the thick slices once: the latent condition on the thin positions, the
        position channels and the unpadded in-plane size."""
        normalised, size = pad_in_plane(normalise(volume.array, self.config.window), self.config.pixel_multiple)
        thick_latents = self.encode(normalised, reporter)
        x, positions = thin_positions(volume.geometry, target)
        condition = resample_depth(thick_latents, x)
        return condition, torch.from_numpy(positions)[None].to(self.device), size

    def _sample_once(self, volume: Volume, target: Geometry, condition, positions, classical: np.ndarray, size,
                     sampler: str, steps: int, seed: Optional[int], consistency: bool, sample_of: tuple[int, int],
                     reporter: Reporter, timings: dict[str, float]) -> np.ndarray:
        """One sample in HU: sample the latents, decode, blend with B-spline outside the model's
        window, then the consistency correction. ``sample_of``: (k, samples) for progress."""
        k, samples = sample_of
        depth = target.shape[0]
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        t0 = time.perf_counter()
        latents = self.sample_latents(condition, positions, sampler, steps, generator,
                                      lambda i, n: reporter.update("sample", k * steps + i, samples * steps))
        timings["sample"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        model_hu = self.decode(latents, size, reporter, k * depth, samples * depth)
        timings["decode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        result = blend_with_classical(model_hu, classical, self.config.window)
        if consistency:
            inference = self.config.inference
            result, history = consistency_correction(
                result, target, volume.array, volume.geometry, volume.slice_thickness,
                inference.consistency_tolerance_hu, inference.consistency_max_iterations, reporter,
            )
            self.last_consistency.append(history)
        timings["consistency"] += time.perf_counter() - t0
        return result


class RunningMoments:
    """Voxel-wise running mean and variance (Welford): K samples never held in memory at once."""

    def __init__(self):
        self.count = 0
        self.mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None

    def add(self, x: np.ndarray) -> None:
        self.count += 1
        if self.mean is None:
            self.mean, self._m2 = x.astype(np.float32), np.zeros_like(x, dtype=np.float32)
            return
        delta = x - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (x - self.mean)

    def std(self) -> np.ndarray:
        """Sample standard deviation (needs two samples or more)."""
        return np.sqrt(self._m2 / (self.count - 1)).astype(np.float32)
