"""Training data for the ``regression`` network: thick slices simulated from real thin CT.

Each item is one thin slice crop: the network inputs (``pipelines.regression.network_inputs``, the
function inference uses) and the correction the network should predict (thin truth minus the
B-spline estimate), plus the truth itself for the window-weighted loss and the monitor.

How a thick acquisition is simulated, per item (a pure function of (seed, epoch, index), so any
process, worker count or resumed run draws the same items):
- a slab thickness T (``thickness_mm`` range, at least twice the thin spacing), a spacing S = T, or
  below T with ``overlap_probability`` (overlapping reconstructions), and a random slab offset;
- the thick slices are slab means of the thin volume (``core.acquisition.slab_weights``, the model
  validated on the real phantom pair), the estimate is B-spline of them
  (``core.classical.interpolation_matrix``);
- with ``in_plane_probability`` the slabs are taken along a row or column axis instead of the slice
  axis (the SR4ZCT idea: in-plane data are high resolution, so any volume gives through-plane
  examples at its pixel spacing);
- real thick/thin pairs (the phantom) are used as they are, with ``real_pair_probability``;
- flips, an in-plane transpose and a small HU scale.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ctsliceinterp.core.acquisition import slab_weights
from ctsliceinterp.core.classical import interpolation_matrix
from ctsliceinterp.models.regression import RegressionConfig
from ctsliceinterp.pipelines.regression import network_inputs

THICK_SLICES = 8  # thick slices simulated around the targets (B-spline's prefilter sees past the 4 neighbours)
MIN_CROP_STD_HU = 30.0  # crops flatter than this (air, padding) are drawn again
MAX_DRAWS = 8
DATA_DEFAULTS = {
    "crop": 96, "thickness_mm": [3.0, 7.0], "overlap_probability": 0.3, "in_plane_probability": 0.25,
    "real_pair_probability": 0.1, "hu_scale_range": 0.03, "thin_volumes": {}, "real_pairs": {},
}


@dataclass
class ThinVolume:
    """A thin CT as int16 HU [z, y, x] with its spacing (x, y, z) in mm."""

    name: str
    array: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class RealPair:
    name: str
    thick: np.ndarray
    thin: np.ndarray
    thick_positions: np.ndarray
    thin_positions: np.ndarray
    thick_spacing: float
    thin_spacing: float
    thickness: float


def data_settings(data: dict[str, Any]) -> dict[str, Any]:
    from loop import TrainingError

    unknown = set(data) - set(DATA_DEFAULTS)
    if unknown:
        raise TrainingError(f"unknown data settings: {', '.join(sorted(unknown))}")
    return {**DATA_DEFAULTS, **data}


def _path(item: str) -> str:
    return os.path.expandvars(os.path.expanduser(str(item)))


def load_thin_volumes(paths: list[str]) -> list[ThinVolume]:
    from ctsliceinterp.io import read_volume

    volumes = []
    for path in paths:
        volume = read_volume(_path(path))
        array = np.asarray(volume.array)
        if array.dtype != np.int16:
            array = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
        volumes.append(ThinVolume(Path(path).name, array, volume.geometry.spacing))
    return volumes


def load_real_pairs(pairs: list[list[str]]) -> list[RealPair]:
    from ctsliceinterp.io import read_volume

    out = []
    for thick_path, thin_path in pairs:
        thick, thin = read_volume(_path(thick_path)), read_volume(_path(thin_path))
        out.append(RealPair(
            Path(thick_path).name, np.asarray(thick.array, dtype=np.float32), np.asarray(thin.array, dtype=np.int16),
            thick.geometry.slice_positions(), thin.geometry.slice_positions(), thick.geometry.slice_spacing,
            thin.geometry.slice_spacing, float(thick.slice_thickness),
        ))
    return out


def _split(section: Any, split: str) -> list:
    if isinstance(section, dict):
        return list(section.get(split) or [])
    return list(section or []) if split == "train" else []


class SeededDataset(Dataset):
    """Items that are a pure function of (seed, epoch, index): ``rng(index)`` is the item's own
    generator. ``fixed`` datasets (validation) draw the same items every epoch."""

    def __init__(self, seed: int, length: int, fixed: bool = False):
        self.seed, self.length, self.fixed = int(seed), int(length), bool(fixed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0 if self.fixed else self.epoch, int(index)])


class ThroughPlaneDataset(SeededDataset):
    """Items: {"inputs": (C, crop, crop), "delta": (1, crop, crop), "truth": (1, crop, crop)}, in HU
    for delta and truth."""

    def __init__(self, data: dict[str, Any], split: str, config: RegressionConfig, seed: int, length: int = 1000,
                 fixed: bool = False):
        settings = data_settings(data)
        self.volumes = load_thin_volumes(_split(settings["thin_volumes"], split))
        self.pairs = load_real_pairs(_split(settings["real_pairs"], split))
        if not self.volumes:
            from loop import TrainingError

            raise TrainingError(f"no thin volumes for the {split} split (data.thin_volumes.{split})")
        super().__init__(seed, length, fixed)
        self.settings, self.config = settings, config
        self.crop = int(settings["crop"])
        sizes = np.array([v.array.size for v in self.volumes], dtype=float)
        self.volume_weights = np.sqrt(sizes) / np.sqrt(sizes).sum()  # big volumes a little more often

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        item = None
        for _ in range(MAX_DRAWS):
            if self.pairs and rng.random() < self.settings["real_pair_probability"]:
                drawn = self._real_pair_item(rng)
            else:
                drawn = self._simulated_item(rng)
            item = drawn or item
            if item is not None and float(item[2].std()) >= MIN_CROP_STD_HU:
                break
        if item is None:
            from loop import TrainingError

            raise TrainingError(f"no {self.crop}-pixel crop fits the volumes: lower data.crop or add larger volumes")
        return self._finish(rng, *item)

    # --- one acquisition ----------------------------------------------------------------------
    def _simulated_item(self, rng: np.random.Generator):
        volume = self.volumes[int(rng.choice(len(self.volumes), p=self.volume_weights))]
        array, (sx, sy, sz) = volume.array, volume.spacing
        axis = 0
        if rng.random() < self.settings["in_plane_probability"]:
            axis = int(rng.integers(1, 3))
        if axis == 1:  # slabs along rows: (y, z, x)
            array, thin_spacing = array.transpose(1, 0, 2), sy
        elif axis == 2:  # slabs along columns: (x, y, z) -> in-plane (y, z)
            array, thin_spacing = array.transpose(2, 1, 0), sx
        else:
            thin_spacing = sz
        low, high = self.settings["thickness_mm"]
        low, high = max(low, 2.0 * thin_spacing), max(high, 2.8 * thin_spacing)
        thickness = float(rng.uniform(low, high))
        spacing = thickness
        if rng.random() < self.settings["overlap_probability"]:
            spacing = float(rng.uniform(max(0.6 * thickness, 1.5 * thin_spacing), thickness))
        n_thin = array.shape[0]
        span_mm = (THICK_SLICES - 1) * spacing + thickness
        n_needed = int(math.ceil(span_mm / thin_spacing)) + 1
        if n_needed > n_thin:
            return None
        z0 = int(rng.integers(0, n_thin - n_needed + 1))
        y0 = int(rng.integers(0, max(1, array.shape[1] - self.crop + 1)))
        x0 = int(rng.integers(0, max(1, array.shape[2] - self.crop + 1)))
        block = np.asarray(array[z0 : z0 + n_needed, y0 : y0 + self.crop, x0 : x0 + self.crop], dtype=np.float32)
        if block.shape[1:] != (self.crop, self.crop):
            return None
        positions = np.arange(n_needed) * thin_spacing
        first = float(rng.uniform(-thin_spacing / 2, positions[-1] + thin_spacing / 2 - span_mm)) + thickness / 2
        centres = first + np.arange(THICK_SLICES) * spacing
        weights = slab_weights(positions, thin_spacing, centres, thickness)
        thick = np.tensordot(weights.astype(np.float32), block, axes=1)
        inside = np.flatnonzero((positions >= centres[0]) & (positions <= centres[-1]))
        j = int(rng.choice(inside))
        x = np.array([(positions[j] - centres[0]) / spacing])
        return thick, x, block[j], thickness, spacing

    def _real_pair_item(self, rng: np.random.Generator):
        pair = self.pairs[int(rng.integers(len(self.pairs)))]
        k0 = int(rng.integers(0, pair.thick.shape[0] - THICK_SLICES + 1))
        height, width = pair.thick.shape[1:]
        y0 = int(rng.integers(0, max(1, height - self.crop + 1)))
        x0 = int(rng.integers(0, max(1, width - self.crop + 1)))
        thick = pair.thick[k0 : k0 + THICK_SLICES, y0 : y0 + self.crop, x0 : x0 + self.crop]
        centres = pair.thick_positions[k0 : k0 + THICK_SLICES]
        inside = np.flatnonzero((pair.thin_positions >= centres[0]) & (pair.thin_positions <= centres[-1]))
        if thick.shape[1:] != (self.crop, self.crop) or len(inside) == 0:
            return None
        j = int(rng.choice(inside))
        truth = pair.thin[j, y0 : y0 + self.crop, x0 : x0 + self.crop].astype(np.float32)
        x = np.array([(pair.thin_positions[j] - centres[0]) / pair.thick_spacing])
        return thick, x, truth, pair.thickness, pair.thick_spacing

    def _finish(self, rng, thick, x, truth, thickness, spacing) -> dict[str, torch.Tensor]:
        scale = 1.0 + float(rng.uniform(-1, 1)) * self.settings["hu_scale_range"]
        thick, truth = thick * scale, truth * scale
        if rng.random() < 0.5:
            thick, truth = thick[:, ::-1], truth[::-1]
        if rng.random() < 0.5:
            thick, truth = thick[:, :, ::-1], truth[:, ::-1]
        if rng.random() < 0.5:
            thick, truth = thick.transpose(0, 2, 1), truth.T
        thick = np.ascontiguousarray(thick, dtype=np.float32)
        truth = np.ascontiguousarray(truth, dtype=np.float32)
        weights = interpolation_matrix("bspline", thick.shape[0], x).astype(np.float32)
        estimate = np.tensordot(weights, thick, axes=1)
        inputs = network_inputs(thick, x, estimate, thickness, spacing, self.config)[0]
        return {
            "inputs": torch.from_numpy(inputs),
            "delta": torch.from_numpy((truth - estimate[0])[None]),
            "truth": torch.from_numpy(truth[None]),
        }
