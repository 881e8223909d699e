"""The ``regression`` method: B-spline, then a learned through-plane correction, then consistency.

In order:
1. the classical B-spline estimate of every thin slice (full HU range, nothing clipped);
2. for each thin slice, ``network_inputs``: the estimate, the differences between the thick slices
   around it and the estimate, and where it stands between them (the same function builds the
   training inputs, so training and inference cannot drift apart);
3. the network's correction is added to the estimate, a few slices at a time (memory stays bounded
   by the output itself);
4. the thick-slice consistency correction.

Only the network's *input* is clipped to a working range; the output is estimate + correction, so
HU outside any window (air padding at -3024, metal) pass through as B-spline has them.
"""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np
import torch

from ..core.acquisition import consistency_correction
from ..core.classical import interpolate_classical
from ..core.errors import GeometryError, InputError
from ..core.grid import check_slices, fractional_indices
from ..core.progress import as_reporter
from ..core.volume import Geometry, Volume
from ..models import WEIGHTS_DIR
from .device import resolve_device
from ..models.regression import CONFIG_FILE, SELF_ENSEMBLE, RegressionConfig, ThroughPlaneNet, transform_in_plane

ESTIMATE_RANGE = (-1.5, 3.5)  # network units (HU / hu_scale) the estimate channel is clipped to
DIFFERENCE_LIMIT = 3.0
REFERENCE_SPACING_MM = 5.0


def neighbour_indices(x: np.ndarray, n_thick: int, neighbours: int) -> np.ndarray:
    """(n_target, neighbours) indices of the thick slices around each continuous index ``x``:
    neighbours // 2 at or below it and as many above, clamped to the volume."""
    offsets = np.arange(-(neighbours // 2) + 1, neighbours // 2 + 1)
    return np.clip(np.floor(x).astype(np.int64)[:, None] + offsets[None, :], 0, n_thick - 1)


def network_inputs(
    thick_hu: np.ndarray,
    x: np.ndarray,
    estimate_hu: np.ndarray,
    thickness_mm: float,
    thick_spacing_mm: float,
    config: RegressionConfig,
) -> np.ndarray:
    """(n_target, in_channels, H, W) float32 inputs for the thin slices at continuous thick indices
    ``x`` whose classical estimates are ``estimate_hu`` (n_target, H, W)."""
    n_target = len(x)
    scale = np.float32(config.hu_scale)
    height, width = estimate_hu.shape[-2:]
    out = np.empty((n_target, config.in_channels, height, width), dtype=np.float32)
    estimate = np.asarray(estimate_hu, dtype=np.float32) / scale
    np.clip(estimate, *ESTIMATE_RANGE, out=out[:, 0])
    index = neighbour_indices(x, thick_hu.shape[0], config.neighbours)
    for k in range(config.neighbours):
        diff = np.asarray(thick_hu[index[:, k]], dtype=np.float32) / scale - estimate
        np.clip(diff, -DIFFERENCE_LIMIT, DIFFERENCE_LIMIT, out=out[:, 1 + k])
    c = 1 + config.neighbours
    out[:, c] = (x - np.floor(x)).astype(np.float32)[:, None, None]
    out[:, c + 1] = np.float32(thickness_mm / thick_spacing_mm - 1.0)
    out[:, c + 2] = np.float32(thick_spacing_mm / REFERENCE_SPACING_MM - 1.0)
    return out


def resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A shipped model's name (``regression``) or a folder holding ``regression.json``."""
    candidate = Path(name_or_path).expanduser()
    if (candidate / CONFIG_FILE).is_file():
        return candidate
    shipped = WEIGHTS_DIR / str(name_or_path)
    if (shipped / CONFIG_FILE).is_file():
        return shipped
    raise InputError(
        f"no regression model {str(name_or_path)!r}: give a shipped name or a folder holding {CONFIG_FILE}"
    )


class RegressionInterpolator:
    """A loaded through-plane network. ``RegressionInterpolator.load(name_or_path)``, then ``run``."""

    def __init__(self, net: ThroughPlaneNet, device: str | torch.device = "auto", name: str = ""):
        self.device = resolve_device(device)
        # channels-last convolutions are faster on CPU (oneDNN) and compute the same numbers
        self.net = net.to(self.device, memory_format=torch.channels_last).eval()
        self.config = net.config
        self.name = name

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device="auto") -> "RegressionInterpolator":
        folder = resolve_model_folder(name_or_path)
        return cls(ThroughPlaneNet.from_pretrained(folder), device, name=str(name_or_path))

    @torch.inference_mode()
    def correct(self, inputs: np.ndarray) -> np.ndarray:
        """Network correction in HU for a batch of ``network_inputs``, averaged over the config's
        ``self_ensemble`` in-plane transforms."""
        tensor = torch.from_numpy(inputs).to(self.device)
        total = None
        for transform in SELF_ENSEMBLE[: self.config.self_ensemble]:
            moved = transform_in_plane(tensor, *transform).contiguous(memory_format=torch.channels_last)
            correction = transform_in_plane(self.net(moved)[:, 0].float(), *transform, inverse=True)
            total = correction if total is None else total + correction
        return (total * (self.config.hu_scale / self.config.self_ensemble)).cpu().numpy()

    def run(self, volume: Volume, target: Geometry, consistency: bool = True, reporter=None,
            batch_slices: int = 4) -> Volume:
        reporter = as_reporter(reporter)
        check_slices(volume.geometry)
        if tuple(target.shape[1:]) != tuple(volume.shape[1:]):
            raise GeometryError("the target grid must share the input's in-plane grid")
        thick_hu = np.asarray(volume.array, dtype=np.float32)
        out = interpolate_classical(volume, target, "bspline").array  # corrected in place below
        x = np.clip(fractional_indices(volume.geometry, target), 0.0, volume.shape[0] - 1.0)
        thickness = float(volume.slice_thickness)
        depth = target.shape[0]
        reporter.update("regression", 0, depth)
        for start in range(0, depth, batch_slices):
            stop = min(depth, start + batch_slices)
            inputs = network_inputs(thick_hu, x[start:stop], out[start:stop], thickness,
                                    volume.geometry.slice_spacing, self.config)
            out[start:stop] += self.correct(inputs)
            reporter.update("regression", stop, depth)
        if consistency:
            out, _ = consistency_correction(out, target, thick_hu, volume.geometry, thickness, reporter=reporter)
        return volume.derived(out, target, method="regression", model=self.name)
