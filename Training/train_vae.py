"""Train the slice VAE: L1/MSE + SSIM (MS-SSIM optional) + a small KL term on random 2-D crops.

    python Training/train_vae.py --config Training/configs/small_vae.yaml --cache CACHE --out runs/small_vae
    torchrun --nproc_per_node 4 Training/train_vae.py --config ... --out ...      # multi-GPU
    python Training/train_vae.py ... --resume                                      # continue exactly

Every epoch: validation PSNR on fixed crops of the val split, a PNG (input | reconstruction |
error) in ``OUT/samples``, and the EMA weights exported as a VAE-only checkpoint in ``OUT/model``
(``checkpoint.py`` format, with the measured latent scale) for ``train_diffusion.py``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import loop
from loop import TrainingError, train_settings

from ctsliceinterp.models.configs import get_config  # noqa: E402

LOSS_DEFAULTS = {"l1": 1.0, "mse": 0.0, "ssim": 0.2, "ms_ssim": 0.0, "kl": 1e-6, "perceptual": 0.0}


def _gaussian(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_parts(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term over valid 11x11 Gaussian windows (Wang 2004)."""
    w = _gaussian(device=a.device).to(a.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return (luminance * cs).mean(), cs.mean()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    return _ssim_parts(a, b, data_range)[0]


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, scales: int = 3) -> torch.Tensor:
    """MS-SSIM over as many scales as the crop allows (>= 11 px at the coarsest), weights of
    Wang 2003 renormalised. Contrast terms are clamped positive so the product stays defined."""
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], device=a.device)
    scales = max(1, min(scales, 5, int(torch.log2(torch.tensor(min(a.shape[-2:]) / 11.0)).item()) + 1))
    weights = weights[:scales] / weights[:scales].sum()
    value = torch.ones((), device=a.device)
    for i in range(scales):
        s, cs = _ssim_parts(a, b, data_range)
        term = s if i == scales - 1 else cs
        value = value * term.clamp(min=1e-6) ** weights[i]
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return value


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = float(F.mse_loss(a.float(), b.float()))
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


class VAETask:
    name = "vae"

    def __init__(self, config: dict, runtime: loop.Runtime, out: Path):
        from ctsliceinterp.models.vae import SliceVAE

        from crop_data import SliceCropDataset, load_sources

        self.model_config = get_config(config.get("model", "tiny"))
        data = config["data"]
        settings = train_settings(config)
        self.loss_weights = {**LOSS_DEFAULTS, **(config.get("loss") or {})}
        unknown = set(self.loss_weights) - set(LOSS_DEFAULTS)
        if unknown:
            raise TrainingError(f"unknown loss terms: {', '.join(sorted(unknown))}")
        if self.loss_weights["perceptual"]:
            raise TrainingError("the perceptual loss is not implemented (it needs pretrained 2-D weights): keep loss.perceptual 0")
        crop = int(data.get("crop", 128))
        factor = self.model_config.vae.downsampling_factor
        if crop % factor:
            raise TrainingError(f"data.crop ({crop}) must be a multiple of the VAE's downsampling factor {factor}")
        window = self.model_config.window
        seed = int(settings["seed"])
        train_sources = load_sources(data, "train")
        val_sources = load_sources(data, "val")
        if not val_sources:
            warnings.warn("no validation data (val split empty): validating on training cases", stacklevel=1)
            val_sources = train_sources
        thick_fraction = float(data.get("thick_fraction", 0.2))
        self.train_dataset = SliceCropDataset(train_sources, crop, window, seed, thick_fraction=thick_fraction)
        self.val_dataset = SliceCropDataset(val_sources, crop, window, seed + 1, int(settings["val_items"]), thick_fraction)
        self.scale_dataset = SliceCropDataset(train_sources, crop, window, seed + 2, 64, thick_fraction)
        self.model = SliceVAE(self.model_config.vae)

    def enable_gradient_checkpointing(self) -> None:
        warnings.warn("the slice VAE has no gradient checkpointing: train.grad_checkpointing ignored", stacklevel=1)

    def loss(self, model, batch: torch.Tensor, device):
        x = batch.to(device, non_blocking=True)
        reconstruction, posterior = model(x)
        reconstruction = reconstruction.float()
        w = self.loss_weights
        terms = {"l1": F.l1_loss(reconstruction, x), "kl": posterior.kl().float()}
        total = w["l1"] * terms["l1"] + w["kl"] * terms["kl"]
        if w["mse"]:
            terms["mse"] = F.mse_loss(reconstruction, x)
            total = total + w["mse"] * terms["mse"]
        if w["ssim"]:
            terms["ssim"] = ssim(reconstruction, x)
            total = total + w["ssim"] * (1 - terms["ssim"])
        if w["ms_ssim"]:
            terms["ms_ssim"] = ms_ssim(reconstruction, x)
            total = total + w["ms_ssim"] * (1 - terms["ms_ssim"])
        return total, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def _reconstruct(self, vae, x: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(x).mean).float().clamp(-1, 1)

    @torch.no_grad()
    def validate(self, vae, epoch: int, out: Path, device) -> dict:
        inputs = torch.stack([self.val_dataset[i] for i in range(len(self.val_dataset))]).to(device)
        outputs = torch.cat([self._reconstruct(vae, inputs[i : i + 16]) for i in range(0, len(inputs), 16)])
        metrics = {"val_psnr": psnr(outputs, inputs), "val_l1": float(F.l1_loss(outputs, inputs)),
                   "val_ssim": float(ssim(outputs, inputs))}
        self._figure(inputs[:4].cpu(), outputs[:4].cpu(), out / "samples" / f"vae_epoch_{epoch:04d}.png", epoch, metrics)
        return metrics

    def _figure(self, inputs, outputs, path: Path, epoch: int, metrics: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ctsliceinterp.io.atomic import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        rows = inputs.shape[0]
        fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
        for r in range(rows):
            for c, (image, title, kw) in enumerate((
                (inputs[r, 0], "input", {"cmap": "gray", "vmin": -1, "vmax": 1}),
                (outputs[r, 0], "reconstruction", {"cmap": "gray", "vmin": -1, "vmax": 1}),
                ((outputs[r, 0] - inputs[r, 0]).abs(), "|error|", {"cmap": "magma", "vmin": 0, "vmax": 0.25}),
            )):
                axes[r, c].imshow(image.numpy(), **kw)
                axes[r, c].set_axis_off()
                if r == 0:
                    axes[r, c].set_title(title, fontsize=8)
        fig.suptitle(f"VAE epoch {epoch}: val PSNR {metrics['val_psnr']:.2f} dB (window {self.model_config.window.center:g}/"
                     f"{self.model_config.window.width:g})", fontsize=8)
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)

    def export(self, vae, folder: Path, metadata: dict) -> None:
        from ctsliceinterp.pipelines.checkpoint import save_checkpoint
        from ctsliceinterp.models.vae import measure_latent_scale

        device = next(vae.parameters()).device
        crops = torch.stack([self.scale_dataset[i] for i in range(len(self.scale_dataset))]).to(device)
        scale = measure_latent_scale(vae, crops)
        save_checkpoint(folder, vae, None, self.model_config, scale, {"trained": "vae", **metadata})


def main(argv=None) -> int:
    return loop.run_main(VAETask, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
