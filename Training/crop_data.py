"""Training data: random crops of thick/thin pairs, from the cache and/or thin volumes.

Two sources, both giving a ``PairSource`` (a thick and a thin HU ``Volume`` on one in-plane grid,
paired by physical slice position):

- the **cache** written by ``ctsliceinterp preprocess`` (memory-mapped int16: a crop reads only
  its own bytes), the cases of one split;
- **thin volumes** (NIfTI, NRRD, MHA, DICOM folders) listed in the config: the thick slices are
  simulated with the acquisition model (slab means) when the dataset is built.

Every sample is a pure function of (seed, epoch, index): ``__getitem__`` seeds its own generator
with them. So any process, any number of loader workers and a resumed run draw the same samples,
and the data position of a run is just its step (``loop.ResumableDistributedSampler.start``).

Intensities: HU are windowed and mapped to [-1, 1] by ``pipelines.diffusion.normalise`` with the model's
window, and the diffusion conditioning (thick latents resampled onto the thin positions, plus
the position channels) is built with ``pipelines.diffusion.thin_positions`` / ``resample_depth``:
the same functions as at inference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ctsliceinterp.core.volume import Volume
from ctsliceinterp.models.configs import IntensityWindow
from ctsliceinterp.pipelines.diffusion import normalise, thin_positions
from loop import TrainingError

AIR_HU = -1000.0


@dataclass
class PairSource:
    key: str
    thick: Volume
    thin: Volume


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_sources(data: dict[str, Any], split: str) -> list[PairSource]:
    """The pairs of ``split`` ("train" or "val"): cache cases listed in its splits.json plus the
    thin volumes of ``data.thin_volumes[split]`` (thick simulated, ``data.thickness_mm``)."""
    from ctsliceinterp.core.acquisition import simulate_thick
    from ctsliceinterp.data.cache import open_split
    from ctsliceinterp.io import read_volume
    from ctsliceinterp.data.preprocess import pair_by_position

    sources: list[PairSource] = []
    if data.get("cache"):
        split_name = data.get(f"{split}_split", split)
        for case in open_split(data["cache"], split_name):
            sources.append(PairSource(case.key, case.thick, case.thin))
    volumes = data.get("thin_volumes") or {}
    thickness = float(data.get("thickness_mm", 5.0))
    for path in _as_list(volumes.get(split) if isinstance(volumes, dict) else (volumes if split == "train" else None)):
        path = os.path.expandvars(os.path.expanduser(str(path)))
        thin = read_volume(path)
        thick, thin, _ = pair_by_position(simulate_thick(thin, thickness), thin)
        sources.append(PairSource(f"volume/{Path(path).name}", thick, thin))
    if not sources and split == "train":
        raise TrainingError("no training data: set data.cache (or --cache) and/or data.thin_volumes.train in the config")
    return sources


def _crop(array, zs: slice, y0: int, x0: int, size: int, pad: float) -> np.ndarray:
    """array[..., zs, y0:y0+size, x0:x0+size] as float32, padded with ``pad`` when the image is smaller."""
    part = np.asarray(array[..., zs, y0 : y0 + size, x0 : x0 + size], dtype=np.float32)
    ph, pw = size - part.shape[-2], size - part.shape[-1]
    if ph or pw:
        widths = [(0, 0)] * (part.ndim - 2) + [(0, ph), (0, pw)]
        part = np.pad(part, widths, constant_values=pad)
    return part


class _RandomCrops(Dataset):
    def __init__(self, sources: list[PairSource], crop: int, seed: int, length: int):
        if not sources:
            raise ValueError("no data sources")
        self.sources, self.crop, self.seed, self.length = sources, int(crop), int(seed), int(length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _corner(self, rng, height: int, width: int) -> tuple[int, int]:
        return int(rng.integers(0, max(1, height - self.crop + 1))), int(rng.integers(0, max(1, width - self.crop + 1)))


class SliceCropDataset(_RandomCrops):
    """VAE data: random 2-D crops (1, crop, crop) in [-1, 1] of thin slices, and of thick slices
    with probability ``thick_fraction`` (the encoder sees both at inference)."""

    def __init__(self, sources, crop: int, window: IntensityWindow, seed: int = 0, length: int = 1000, thick_fraction: float = 0.2):
        super().__init__(sources, crop, seed, length)
        self.window, self.thick_fraction = window, float(thick_fraction)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = self._rng(index)
        source = self.sources[int(rng.integers(len(self.sources)))]
        volume = source.thick if rng.random() < self.thick_fraction else source.thin
        k = int(rng.integers(volume.shape[0]))
        y0, x0 = self._corner(rng, volume.shape[1], volume.shape[2])
        hu = _crop(volume.array, slice(k, k + 1), y0, x0, self.crop, AIR_HU)
        return torch.from_numpy(normalise(hu, self.window))


class DepthCropDataset(_RandomCrops):
    """Diffusion data: a random run of ``depth`` thin slices (padded and masked when the case is
    shorter) with the thick slices that condition it, on one random in-plane crop.

    Items: ``thin`` (D, S, S) in [-1, 1]; ``thick`` (K, S, S) the thick slices lo..hi needed;
    ``x`` (D,) continuous index of each thin slice in that thick crop; ``positions`` (3, D);
    ``mask`` (D,) 1 for real slices. With ``latents`` (precomputed, see train_diffusion.py) the
    crops are taken from the latent arrays (C, D, h, w) instead, ``crop`` in latent pixels."""

    def __init__(self, sources, depth: int, crop: int, window: IntensityWindow, seed: int = 0, length: int = 1000,
                 latents: Optional[dict[str, tuple[np.ndarray, np.ndarray]]] = None):
        super().__init__(sources, crop, seed, length)
        self.depth, self.window, self.latents = int(depth), window, latents

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = self._rng(index)
        source = self.sources[int(rng.integers(len(self.sources)))]
        thin_g, thick_g = source.thin.geometry, source.thick.geometry
        n_thin, n_thick = thin_g.shape[0], thick_g.shape[0]
        d = min(self.depth, n_thin)
        s = int(rng.integers(0, n_thin - d + 1))
        target = thin_g.with_slices(float(thin_g.slice_positions()[s]), d, thin_g.slice_spacing)
        x, positions = thin_positions(thick_g, target)
        lo = min(int(math.floor(x.min())), max(0, n_thick - 2))
        hi = max(min(int(math.floor(x.max())) + 1, n_thick - 1), min(lo + 1, n_thick - 1))
        if self.latents is None:
            y0, x0 = self._corner(rng, thin_g.shape[1], thin_g.shape[2])
            thin = normalise(_crop(source.thin.array, slice(s, s + d), y0, x0, self.crop, AIR_HU), self.window)
            thick = normalise(_crop(source.thick.array, slice(lo, hi + 1), y0, x0, self.crop, AIR_HU), self.window)
            pad_value = -1.0
        else:
            thin_lat, thick_lat = self.latents[source.key]
            y0, x0 = self._corner(rng, thin_lat.shape[-2], thin_lat.shape[-1])
            thin = _crop(thin_lat, slice(s, s + d), y0, x0, self.crop, 0.0)
            thick = _crop(thick_lat, slice(lo, hi + 1), y0, x0, self.crop, 0.0)
            pad_value = 0.0
        mask = np.zeros(self.depth, dtype=np.float32)
        mask[:d] = 1.0
        extra = self.depth - d
        if extra:  # padded slices: masked out of the loss
            widths = [(0, 0)] * (thin.ndim - 3) + [(0, extra), (0, 0), (0, 0)]
            thin = np.pad(thin, widths, constant_values=pad_value)
            positions = np.pad(positions, ((0, 0), (0, extra)), mode="edge")
            x = np.pad(x, (0, extra), mode="edge")
        return {"thin": thin, "thick": thick, "x": (x - lo).astype(np.float32), "positions": positions, "mask": mask}

    @staticmethod
    def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Stack; thick crops of different lengths are padded by repeating their last slice
        (never read: ``x`` stays inside each item's own slices)."""
        k = max(item["thick"].shape[-3] for item in items)
        thick = []
        for item in items:
            t = item["thick"]
            extra = k - t.shape[-3]
            if extra:
                widths = [(0, 0)] * (t.ndim - 3) + [(0, extra), (0, 0), (0, 0)]
                t = np.pad(t, widths, mode="edge")
            thick.append(t)
        out = {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in ("thin", "x", "positions", "mask")}
        out["thick"] = torch.from_numpy(np.stack(thick))
        return out
