"""Train the guided slice VAE (latent diffusion v2) around a frozen ``regression`` network.

    python Training/train_guided_vae.py --config Training/configs/guided_vae.yaml --out runs/guided_vae
    torchrun --nproc_per_node 4 Training/train_guided_vae.py --config ... --out ...   # multi-GPU
    python Training/train_guided_vae.py ... --resume                                   # continue exactly

Data: the ``regression`` training items (``regression_data.ThroughPlaneDataset``: thick slabs
simulated from real thin CT, in-plane self-supervision, real pairs), on large crops. The base of
each thin slice is made as inference makes it: the B-spline estimate plus the frozen regression
network's correction. The VAE encodes the residual thin - base and decodes it guided by the
base; the loss is L1 in HU / 1000 over the full range, weighted up in the 40/400 window (as the
regression loss), plus a small KL term. Its normalisation is size independent, so what it learns
on crops holds on whole slices.

Every epoch the monitor scores the EMA VAE's reconstruction (posterior mean) on fixed validation
crops against B-spline and against the base (regression) on the same crops, full range and
window (``gain_metrics``), and exports ``OUT/model``: the guided VAE with its measured latent
scales and the base network, the folder ``train_residual_diffusion.py`` takes as vae_checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

import loop
from loop import TrainingError, train_settings

from ctsliceinterp.evaluation.metrics import psnr, to_unit_range, window_to_unit_range

SCALE_ITEMS = 32  # training items the latent scales are measured on at export


def gain_metrics(truth_hu: np.ndarray, outputs: dict[str, np.ndarray], prefix: str = "val") -> dict[str, float]:
    """PSNR of every output (``bspline``, ``regression`` and the model's) on the same crops, in the
    full range (RPLHR-CT's [-1024, 2048] HU) and in the 40/400 window, and each model output's
    gain over B-spline and over regression. A gain over regression near 0 dB: the stage adds nothing."""
    values = {}
    for label, mapping in (("", to_unit_range), ("_window", window_to_unit_range)):
        truth = mapping(truth_hu)
        scores = {name: psnr(mapping(array), truth) for name, array in outputs.items()}
        for name, value in scores.items():
            values[f"{prefix}_{name}_psnr{label}"] = value
        for name, value in scores.items():
            if name not in ("bspline", "regression"):
                values[f"{prefix}_{name}_gain_over_bspline_db{label}"] = value - scores["bspline"]
                values[f"{prefix}_{name}_gain_over_regression_db{label}"] = value - scores["regression"]
    return values


def load_base_network(config: dict):
    """The frozen regression network (``regression_model``: a shipped name or a folder)."""
    from ctsliceinterp.pipelines.regression import RegressionInterpolator

    return RegressionInterpolator.load(config.get("regression_model") or "regression", device="cpu").net


def model_config(config: dict):
    """The named residual diffusion config (``model``), with ``vae`` overrides if given."""
    import dataclasses

    from ctsliceinterp.core.errors import InputError
    from ctsliceinterp.pipelines.residual_diffusion import named_config

    try:
        named = named_config(str(config.get("model", "default")))
        if config.get("vae"):
            named = dataclasses.replace(named, vae=dataclasses.replace(
                named.vae, **{k: tuple(v) if isinstance(v, list) else v for k, v in config["vae"].items()}))
        return named
    except (InputError, TypeError) as exc:
        raise TrainingError(f"bad model settings: {exc}") from None


class GuidedVAETask:
    name = "guided_vae"

    def __init__(self, config: dict, runtime: loop.Runtime, out: Path):
        from ctsliceinterp.models.guided_vae import GuidedSliceVAE
        from regression_data import ThroughPlaneDataset

        settings = train_settings(config)
        self.model_config = model_config(config)
        self.device = runtime.device
        self.regression = load_base_network(config).to(self.device).eval().requires_grad_(False)
        self.kl_weight = float((config.get("loss") or {}).get("kl", 1e-6))
        data = dict(config.get("data") or {})
        if int(data.get("crop", 96)) % self.model_config.vae.downsampling_factor:
            raise TrainingError(f"data.crop must be a multiple of {self.model_config.vae.downsampling_factor}")
        seed = int(settings["seed"])
        reg_config = self.regression.config
        self.train_dataset = ThroughPlaneDataset(data, "train", reg_config, seed)
        self.val_dataset = ThroughPlaneDataset(data, "val", reg_config, seed + 1, int(settings["val_items"]), fixed=True)
        self.scale_dataset = ThroughPlaneDataset(data, "train", reg_config, seed + 2, SCALE_ITEMS, fixed=True)
        self.model = GuidedSliceVAE(self.model_config.vae)

    def enable_gradient_checkpointing(self) -> None:
        pass  # slice by slice, small enough without it

    @torch.no_grad()
    def bases(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(truth, B-spline, base) in HU, (B, 1, H, W): base = B-spline + the regression correction."""
        truth = batch["truth"].to(device)
        bspline = truth - batch["delta"].to(device)
        base = bspline + self.regression(batch["inputs"].to(device)).float() * self.regression.config.hu_scale
        return truth, bspline, base

    def loss(self, model, batch: dict, device):
        from ctsliceinterp.models.guided_vae import guided_vae_loss
        from train_regression import WINDOW_WEIGHT, window_mask

        truth, _, base = self.bases(batch, device)
        reconstruction, posterior = model(truth, base)
        weight = 1.0 + WINDOW_WEIGHT * window_mask(truth)
        loss = guided_vae_loss(reconstruction, truth, posterior, self.model_config.vae.hu_scale, weight, self.kl_weight)
        return loss, {"l1_hu": (reconstruction.detach() - truth).abs().mean(), "kl": posterior.kl().detach()}

    def _batches(self, dataset, device, size: int = 8):
        items = [dataset[i] for i in range(len(dataset))]
        for start in range(0, len(items), size):
            yield self.bases(torch.utils.data.default_collate(items[start : start + size]), device)

    @torch.no_grad()
    def validate(self, model, epoch: int, out: Path, device) -> dict:
        model.eval()
        parts = {"truth": [], "bspline": [], "regression": [], "guided_vae": []}
        for truth, bspline, base in self._batches(self.val_dataset, device):
            reconstruction = model.decode(model.encode(truth, base).mean, base)
            for key, value in zip(parts, (truth, bspline, base, reconstruction)):
                parts[key].append(value.float().cpu().numpy())
        arrays = {key: np.concatenate(value) for key, value in parts.items()}
        return gain_metrics(arrays.pop("truth"), arrays)

    def export(self, model, folder: Path, info: dict) -> None:
        from ctsliceinterp.models.guided_vae import measure_scales
        from ctsliceinterp.pipelines.residual_diffusion import save_residual_model

        vae = copy.deepcopy(model).eval()
        device = next(vae.parameters()).device
        truths, bases = zip(*[(truth, base) for truth, _, base in self._batches(self.scale_dataset, device)])
        latent_scale, condition_scale = measure_scales(vae, torch.cat(truths), torch.cat(bases))
        vae.latent_scale.fill_(latent_scale)
        vae.condition_scale.fill_(condition_scale)
        save_residual_model(folder, vae, self.regression, self.model_config, None,
                            {"trained": "guided_vae", "trained_steps": info.get("step"), **info})


def build_task(config, runtime, out):
    return GuidedVAETask(config, runtime, out)


def main(argv=None) -> int:
    return loop.run_main(build_task, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
