"""Train the ``regression`` through-plane network on thick slices simulated from real thin CT.

    python Training/train_regression.py --config Training/configs/regression.yaml --out runs/regression
    torchrun --nproc_per_node 4 Training/train_regression.py --config ... --out ...   # multi-GPU
    python Training/train_regression.py ... --resume                                   # continue exactly

The loss is L1 on the correction, weighted up inside the 40/400 soft-tissue window. Every epoch the
monitor scores the EMA network against its own starting point, B-spline, on the same fixed crops of
the validation volumes: the PSNR gain over B-spline in the full range (RPLHR-CT's [-1024, 2048] HU)
and in the 40/400 window. A gain near 0 dB is a network that learned nothing; below 0, harm. The
EMA weights are exported to ``OUT/model`` (``ThroughPlaneNet.save_pretrained``) each epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import loop
from loop import TrainingError, train_settings

from ctsliceinterp.evaluation.metrics import psnr, to_unit_range, window_bounds, window_to_unit_range
from ctsliceinterp.models.configs import ConfigError
from ctsliceinterp.models.regression import RegressionConfig, ThroughPlaneNet, parameter_count

WINDOW_WEIGHT = 1.5  # extra L1 weight on voxels whose truth lies in the soft-tissue window


def window_mask(hu: torch.Tensor) -> torch.Tensor:
    low, high = window_bounds()
    return ((hu >= low) & (hu <= high)).float()


def monitor_metrics(estimate_hu: np.ndarray, output_hu: np.ndarray, truth_hu: np.ndarray) -> dict[str, float]:
    """PSNR of B-spline and of the network on the same crops, full range and 40/400 window."""
    values = {}
    for label, mapping in (("", to_unit_range), ("_window", window_to_unit_range)):
        base = psnr(mapping(estimate_hu), mapping(truth_hu))
        model = psnr(mapping(output_hu), mapping(truth_hu))
        values[f"val_bspline_psnr{label}"] = base
        values[f"val_psnr{label}"] = model
        values[f"val_gain_db{label}"] = model - base
    return values


class RegressionTask:
    name = "regression"

    def __init__(self, config: dict, runtime: loop.Runtime, out: Path):
        from regression_data import ThroughPlaneDataset

        settings = train_settings(config)
        model_section = dict(config.get("model") or {})
        try:
            self.model_config = RegressionConfig.from_dict(model_section)
        except (TypeError, ConfigError) as exc:
            raise TrainingError(f"bad model section: {exc}") from None
        data = config.get("data") or {}
        seed = int(settings["seed"])
        self.train_dataset = ThroughPlaneDataset(data, "train", self.model_config, seed)
        self.val_dataset = ThroughPlaneDataset(data, "val", self.model_config, seed + 1, int(settings["val_items"]), fixed=True)
        self.model = ThroughPlaneNet(self.model_config)
        self.scale = self.model_config.hu_scale
        print(f"regression network: {parameter_count(self.model):,} parameters; "
              f"{len(self.train_dataset.volumes)} training volumes, {len(self.train_dataset.pairs)} real pairs")

    def enable_gradient_checkpointing(self) -> None:
        pass  # small enough without it

    def loss(self, model, batch: dict, device):
        inputs = batch["inputs"].to(device, non_blocking=True)
        delta = batch["delta"].to(device) / self.scale
        weight = 1.0 + WINDOW_WEIGHT * window_mask(batch["truth"].to(device))
        error = (model(inputs).float() - delta).abs()
        l1 = (error * weight).mean() / weight.mean()
        return l1, {"l1_hu": error.mean().detach() * self.scale}

    @torch.no_grad()
    def predict(self, model, inputs: torch.Tensor, device) -> np.ndarray:
        parts = [model(inputs[i : i + 16].to(device)).float().cpu() for i in range(0, len(inputs), 16)]
        return torch.cat(parts).numpy() * self.scale

    @torch.no_grad()
    def validate(self, model, epoch: int, out: Path, device) -> dict:
        items = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        inputs = torch.stack([item["inputs"] for item in items])
        truth = torch.stack([item["truth"] for item in items]).numpy()
        estimate = truth - torch.stack([item["delta"] for item in items]).numpy()
        model.eval()
        output = estimate + self.predict(model, inputs, device)
        return monitor_metrics(estimate, output, truth)

    def export(self, model, folder: Path, info: dict) -> None:
        model.save_pretrained(folder, info={"trained_steps": info.get("step"), **info})


def build_task(config, runtime, out):
    return RegressionTask(config, runtime, out)


def main(argv=None) -> int:
    return loop.run_main(build_task, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
