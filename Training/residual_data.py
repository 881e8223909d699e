"""Training data for the residual diffusion U-Net: runs of consecutive thin slices with their base.

Each item is a run of ``depth`` consecutive thin slices on an in-plane crop, made as inference
makes it: thick slabs simulated from a thin block by the acquisition model
(``core.acquisition.simulate_thick``, the model validated on the real phantom pair), then the base
by the ``regression`` pipeline itself (``RegressionInterpolator.run`` without consistency) on the
run's thin positions, and B-spline for the monitor. Thick volumes, thicknesses and data settings
are those of ``regression_data.py`` (the same YAML ``data`` section and volume loader):
- a slab thickness in ``thickness_mm``, a spacing equal to it or (``overlap_probability``) below
  it, a random block start (the slab offset);
- with ``in_plane_probability`` the slabs run along a row or column axis (SR4ZCT-style
  self-supervision from high-resolution in-plane data);
- flips and a small HU scale. Every item is a pure function of (seed, epoch, index).

Items differ in their number of thick slices, so ``collate`` stacks the fixed-size fields and
keeps ``thick`` and ``x`` (continuous thick index of each thin slice) as lists.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ctsliceinterp.core.acquisition import simulate_thick
from ctsliceinterp.core.classical import interpolate_classical
from ctsliceinterp.core.volume import Volume
from ctsliceinterp.pipelines.diffusion import thin_positions
from ctsliceinterp.pipelines.regression import RegressionInterpolator

from regression_data import MAX_DRAWS, MIN_CROP_STD_HU, SeededDataset, _split, data_settings, load_thin_volumes

CONTEXT_SLABS = 2  # thick slices beyond the run on each side (B-spline and the network see past it)
# A run misses often (slabs along a row need as many slices as the crop is wide, and a run needs
# thick slices past both ends) and a miss costs no network call, so draws are many: with MAX_DRAWS,
# a fresh-run training found no run for one item and stopped at step 658.
RUN_DRAWS = 8 * MAX_DRAWS
RUN_DEFAULTS = {"depth": 16}


class ResidualRunDataset(SeededDataset):
    """Items: {"truth", "base", "bspline": (D, crop, crop) HU; "thick": (K, crop, crop) HU;
    "x": (D,) thick indices; "positions": (3, D); "mask": (D,) ones}."""

    def __init__(self, data: dict[str, Any], split: str, regression: RegressionInterpolator, seed: int,
                 length: int = 1000, fixed: bool = False):
        data = dict(data)
        self.depth = int(data.pop("depth", RUN_DEFAULTS["depth"]))
        self.settings = data_settings(data)
        self.volumes = load_thin_volumes(_split(self.settings["thin_volumes"], split))
        if not self.volumes:
            from loop import TrainingError

            raise TrainingError(f"no thin volumes for the {split} split (data.thin_volumes.{split})")
        super().__init__(seed, length, fixed)
        self.regression = regression
        self.crop = int(self.settings["crop"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        item = None
        for _ in range(RUN_DRAWS):
            item = self._run(rng) or item
            if item is not None and float(item["truth"].std()) >= MIN_CROP_STD_HU:
                break
        if item is None:
            from loop import TrainingError

            raise TrainingError(f"no run of {self.depth} thin slices on a {self.crop}-pixel crop fits the volumes: "
                                "lower data.depth or data.crop, or add larger volumes")
        return item

    def _run(self, rng: np.random.Generator):
        volume = self.volumes[int(rng.integers(len(self.volumes)))]
        array, (sx, sy, sz) = volume.array, volume.spacing
        axis = int(rng.integers(1, 3)) if rng.random() < self.settings["in_plane_probability"] else 0
        if axis == 1:
            array, thin_spacing, pixel = array.transpose(1, 0, 2), sy, (sx, sz)
        elif axis == 2:
            array, thin_spacing, pixel = array.transpose(2, 1, 0), sx, (sz, sy)
        else:
            thin_spacing, pixel = sz, (sx, sy)
        low, high = self.settings["thickness_mm"]
        thickness = float(rng.uniform(max(low, 2.0 * thin_spacing), max(high, 2.8 * thin_spacing)))
        spacing = thickness
        if rng.random() < self.settings["overlap_probability"]:
            spacing = float(rng.uniform(max(0.6 * thickness, 1.5 * thin_spacing), thickness))
        slabs = int(math.ceil(self.depth * thin_spacing / spacing)) + 1 + 2 * CONTEXT_SLABS
        n_needed = int(math.ceil(((slabs - 1) * spacing + thickness) / thin_spacing)) + 1
        if n_needed > array.shape[0] or min(array.shape[1:]) < self.crop:
            return None
        z0 = int(rng.integers(0, array.shape[0] - n_needed + 1))
        y0 = int(rng.integers(0, array.shape[1] - self.crop + 1))
        x0 = int(rng.integers(0, array.shape[2] - self.crop + 1))
        block = np.asarray(array[z0 : z0 + n_needed, y0 : y0 + self.crop, x0 : x0 + self.crop], dtype=np.float32)
        block = block * np.float32(1.0 + float(rng.uniform(-1, 1)) * self.settings["hu_scale_range"])
        if rng.random() < 0.5:
            block = block[:, ::-1]
        if rng.random() < 0.5:
            block = block[:, :, ::-1]
        thin = Volume.from_array(np.ascontiguousarray(block), (pixel[0], pixel[1], thin_spacing))
        thick = simulate_thick(thin, thickness, spacing)
        thin_pos, centres = thin.geometry.slice_positions(), thick.geometry.slice_positions()
        # The run starts CONTEXT_SLABS slabs in, so every thin slice has thick slices on both sides.
        first = int(np.searchsorted(thin_pos, centres[CONTEXT_SLABS]))
        if first + self.depth > len(thin_pos) or thin_pos[first + self.depth - 1] > centres[-1 - CONTEXT_SLABS] + 1e-6:
            return None
        target = thin.geometry.with_slices(float(thin_pos[first]), self.depth, thin_spacing)
        base = self.regression.run(thick, target, consistency=False).array
        bspline = interpolate_classical(thick, target, "bspline").array
        x, positions = thin_positions(thick.geometry, target)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        return {"truth": as_tensor(block[first : first + self.depth]), "base": as_tensor(base),
                "bspline": as_tensor(bspline), "thick": as_tensor(thick.array), "x": as_tensor(x),
                "positions": as_tensor(positions), "mask": torch.ones(self.depth)}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key not in ("thick", "x")}
        batch["thick"] = [item["thick"] for item in items]
        batch["x"] = [item["x"] for item in items]
        return batch


class LatentRunCache(SeededDataset):
    """A fixed pool of ``ResidualRunDataset`` runs, encoded once: items are {"target", "condition",
    "positions", "mask"} of a run drawn from the pool by (seed, epoch, index).

    Making a run (slab simulation, the regression base, the VAE's encodes) costs far more on a CPU
    than the U-Net's step, so the pool is built once, saved atomically to ``path`` and reused by
    ``--resume`` when it was built from the same runs and the same guided VAE weights."""

    def __init__(self, runs: ResidualRunDataset, encode, path, key: dict, seed: int, length: int = 1000):
        import json

        from tqdm import tqdm

        from ctsliceinterp.io.atomic import atomic_file

        super().__init__(seed, length)
        key = json.loads(json.dumps(key, sort_keys=True, default=str))
        cached = None
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
            except Exception:  # noqa: BLE001 - unreadable in any way (truncated, another format): built again below
                cached = None
        if isinstance(cached, dict) and cached.get("key") == json.dumps(key, sort_keys=True):
            self.pool = cached["pool"]
            return
        parts: dict[str, list] = {"target": [], "condition": [], "positions": [], "mask": []}
        for start in tqdm(range(0, len(runs), 4), desc="encoding the training runs", unit="batch", mininterval=30):
            batch = runs.collate([runs[i] for i in range(start, min(start + 4, len(runs)))])
            target, condition = encode(batch)
            # The condition in half precision: with full-resolution images it is most of the pool.
            for name, value in zip(parts, (target, condition.half(), batch["positions"], batch["mask"])):
                parts[name].append(value.cpu())
        self.pool = {name: torch.cat(values) for name, values in parts.items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                torch.save({"key": json.dumps(key, sort_keys=True), "pool": self.pool}, tmp)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        j = int(self.rng(index).integers(self.pool["target"].shape[0]))
        return {name: value[j].float() for name, value in self.pool.items()}
