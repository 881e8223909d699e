"""Train the latent diffusion U-Net with the VAE frozen.

    python Training/train_diffusion.py --config Training/configs/small_diffusion.yaml --cache CACHE \
        --set vae_checkpoint=runs/small_vae/model --out runs/small_diffusion
    torchrun --nproc_per_node 8 Training/train_diffusion.py ...                      # multi-GPU
    python Training/train_diffusion.py ... --resume                                   # continue exactly

Each sample is a random run of ``depth`` thin slices (padded and masked when a case is shorter)
on a random in-plane crop. The thin slices are VAE-encoded as the target; the thick slices are
encoded and resampled onto the thin positions with the pipeline's own conditioning functions
(``thin_positions``, ``resample_depth``), so training and inference condition identically. The
loss is the min-SNR-weighted v/eps MSE, masked on padded slices (``diffusion_loss.py``).
``data.precompute_latents`` encodes every case once into ``OUT/latents`` and crops latents.

Every epoch: the validation loss (fixed crops and noise), a PNG (thick | model | thin) of the
full inference pipeline on a validation crop, and the EMA U-Net exported with the VAE as a
checkpoint (``OUT/model``) that ``ctsliceinterp interpolate --method diffusion --model`` loads.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

import loop
from loop import TrainingError, train_settings

from ctsliceinterp.models.configs import get_config  # noqa: E402


class DiffusionTask:
    name = "diffusion"

    def __init__(self, config: dict, runtime: loop.Runtime, out: Path):
        from ctsliceinterp.pipelines.checkpoint import load_checkpoint
        from diffusion_loss import training_scheduler
        from ctsliceinterp.models.unet import UNet3D

        from crop_data import DepthCropDataset, load_sources

        if not config.get("vae_checkpoint"):
            raise TrainingError("set vae_checkpoint (the VAE run's OUT/model folder) in the config or with --set vae_checkpoint=PATH")
        vae_checkpoint = load_checkpoint(config["vae_checkpoint"], device="cpu")
        named = get_config(config.get("model", vae_checkpoint.config.name))
        if named.vae != vae_checkpoint.config.vae:
            raise TrainingError(f"the VAE checkpoint's network ({vae_checkpoint.config.name}) differs from the '{named.name}' config's VAE")
        # The VAE's window and latent scale come with it; U-Net, schedule and inference from the named config.
        self.model_config = named.replace(window=vae_checkpoint.config.window)
        self.latent_scale = vae_checkpoint.latent_scale
        self.device = runtime.device
        self.vae = vae_checkpoint.vae.to(self.device).eval().requires_grad_(False)
        self.model = UNet3D(self.model_config.unet)
        self.scheduler = training_scheduler(self.model_config.diffusion)
        data = config["data"]
        settings = train_settings(config)
        self.seed = int(settings["seed"])
        self.depth = int(data.get("depth") or self.model_config.inference.chunk_depth)
        self.crop = int(data.get("crop", 128))
        self.val_crop = int(data.get("val_crop", self.crop))
        multiple = self.model_config.pixel_multiple
        for name, value in (("data.crop", self.crop), ("data.val_crop", self.val_crop)):
            if value % multiple:
                raise TrainingError(f"{name} ({value}) must be a multiple of {multiple} for the '{named.name}' model")
        window = self.model_config.window
        train_sources = load_sources(data, "train")
        self.val_sources = load_sources(data, "val") or train_sources
        self.precomputed = bool(data.get("precompute_latents", False))
        # Precomputed latents of a centred in-plane window only (null: the whole slice): the
        # encoder dominates the cost on a CPU, and training crops are much smaller than a slice.
        self.latent_crop = data.get("latent_crop")
        if self.latent_crop is not None and int(self.latent_crop) % self.model_config.vae.downsampling_factor:
            raise TrainingError(f"data.latent_crop ({self.latent_crop}) must be a multiple of {self.model_config.vae.downsampling_factor}")
        latents, crop = None, self.crop
        if self.precomputed:
            latents = self._precompute(train_sources + [s for s in self.val_sources if s not in train_sources], out, runtime)
            crop = self.crop // self.model_config.vae.downsampling_factor
        self.train_dataset = DepthCropDataset(train_sources, self.depth, crop, window, self.seed, latents=latents)
        self.val_dataset = DepthCropDataset(self.val_sources, self.depth, crop, window, self.seed + 1,
                                            int(settings["val_items"]), latents=latents)

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing(True)

    # --- latents ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
        """(B, D, H, W) in [-1, 1] -> scaled posterior means (B, C, D, h, w), as the pipeline encodes."""
        b, d, h, w = images.shape
        flat = images.reshape(b * d, 1, h, w).to(self.device, non_blocking=True)
        parts = []
        for start in range(0, flat.shape[0], batch):
            with loop.autocast(self.device, True):
                parts.append(self.vae.encode(flat[start : start + batch]).mean.float())
        z = torch.cat(parts) * self.latent_scale
        return z.reshape(b, d, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def _latent_window(self, volume) -> tuple[int, int, int]:
        """(y0, x0, size) of the centred in-plane window that is encoded; the same for a case's
        thick and thin volumes, which share one in-plane grid."""
        h, w = volume.shape[1], volume.shape[2]
        size = max(h, w) if self.latent_crop is None else int(self.latent_crop)
        return max(0, (h - size) // 2), max(0, (w - size) // 2), size

    def _precompute(self, sources, out: Path, runtime: loop.Runtime) -> dict:
        """Encode every whole case once (rank 0 writes OUT/latents/*.npy, float16), memory-map them."""
        from ctsliceinterp.io.atomic import atomic_file
        from ctsliceinterp.pipelines.diffusion import pad_in_plane, normalise

        folder = out / "latents"
        paths = {}
        for source in sources:
            name = source.key.replace("/", "__")
            paths[source.key] = (folder / f"{name}.thin.npy", folder / f"{name}.thick.npy")
        if runtime.main:
            folder.mkdir(parents=True, exist_ok=True)
            for source in sources:
                for volume, path in zip((source.thin, source.thick), paths[source.key]):
                    if path.exists():
                        continue
                    latents = []
                    y0, x0, size = self._latent_window(volume)
                    for start in range(0, volume.shape[0], 16):
                        hu = np.asarray(volume.array[start : start + 16, y0 : y0 + size, x0 : x0 + size])
                        x, _ = pad_in_plane(normalise(hu, self.model_config.window), self.model_config.vae.downsampling_factor)
                        latents.append(self.encode(torch.from_numpy(x)[None])[0].cpu())
                    with atomic_file(path, suffix=".npy") as tmp:
                        np.save(tmp, torch.cat(latents, dim=1).numpy().astype(np.float16))
        runtime.barrier()
        return {key: (np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")) for key, (a, b) in paths.items()}

    def _inputs(self, batch: dict):
        from ctsliceinterp.pipelines.diffusion import resample_depth

        if self.precomputed:
            target = batch["thin"].to(self.device).float()
            thick = batch["thick"].to(self.device).float()
        else:
            target = self.encode(batch["thin"])
            thick = self.encode(batch["thick"])
        condition = torch.cat([resample_depth(thick[i : i + 1], batch["x"][i].numpy()) for i in range(thick.shape[0])])
        return target, condition, batch["positions"].to(self.device), batch["mask"].to(self.device)

    def loss(self, model, batch: dict, device, generator=None):
        from diffusion_loss import diffusion_loss

        target, condition, positions, mask = self._inputs(batch)
        loss = diffusion_loss(model, target, condition, positions, self.scheduler, self.model_config.diffusion,
                              depth_mask=mask, generator=generator)
        return loss, {}

    # --- validation ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, unet, epoch: int, out: Path, device) -> dict:
        generator = torch.Generator(device=device).manual_seed(self.seed)
        items = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        losses = []
        for start in range(0, len(items), 4):
            batch = self.val_dataset.collate(items[start : start + 4])
            with loop.autocast(device, True):
                losses.append(float(self.loss(unet, batch, device, generator)[0]))
        metrics = {"val_loss": float(np.mean(losses))}
        metrics.update(self._sample_figure(unet, epoch, out))
        return metrics

    def _val_volumes(self):
        """A validation crop: the middle thick slices (at most depth/ratio + 1) on a centred
        in-plane crop, and the thin slices between the first and last of them."""
        from ctsliceinterp.evaluation.evaluate import covered_reference
        from ctsliceinterp.core.volume import Volume

        source = self.val_sources[0]
        thick, thin = source.thick, source.thin
        ratio = max(1, int(round(thick.geometry.slice_spacing / thin.geometry.slice_spacing)))
        count = min(thick.shape[0], max(2, self.depth // ratio + 1))
        k0 = (thick.shape[0] - count) // 2
        size = self.val_crop
        y0, x0 = max(0, (thick.shape[1] - size) // 2), max(0, (thick.shape[2] - size) // 2)

        def crop(volume, z0, z1):
            g = volume.geometry
            h, w = min(size, g.shape[1] - y0), min(size, g.shape[2] - x0)
            origin = g.index_to_physical((x0, y0, z0))
            geometry = type(g)((z1 - z0, h, w), g.spacing, tuple(origin), g.direction)
            return Volume(np.asarray(volume.array[z0:z1, y0 : y0 + h, x0 : x0 + w], dtype=np.float32), geometry,
                          {"slice_thickness": volume.slice_thickness})

        thick_crop = crop(thick, k0, k0 + count)
        reference = covered_reference(thick_crop, crop(thin, 0, thin.shape[0]))
        return thick_crop, reference

    def _sample_figure(self, unet, epoch: int, out: Path) -> dict:
        from ctsliceinterp.evaluation import metrics as ct_metrics
        from ctsliceinterp.pipelines.diffusion import Interpolator

        thick, reference = self._val_volumes()
        # Copies: the Interpolator converts memory formats, which must not touch the training modules.
        interpolator = Interpolator(copy.deepcopy(self.vae), copy.deepcopy(unet), self.model_config, self.latent_scale,
                                    device=self.device)
        output, _ = interpolator.run(thick, reference.geometry, seed=self.seed)
        value = ct_metrics.psnr(ct_metrics.to_unit_range(output.array), ct_metrics.to_unit_range(reference.array))
        self._figure(thick, output, reference, out / "samples" / f"diffusion_epoch_{epoch:04d}.png", epoch, value)
        return {"val_sample_psnr": float(value)}

    def _figure(self, thick, output, reference, path: Path, epoch: int, value: float) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ctsliceinterp.io.atomic import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        # Thick shown on the thin grid as the slab each thin slice falls in (nearest thick slice).
        positions = reference.geometry.slice_positions()
        centres = thick.geometry.slice_positions()
        nearest = np.abs(positions[:, None] - centres[None, :]).argmin(axis=1)
        thick_on_thin = np.asarray(thick.array)[nearest]
        # Axial slice: the thin slice farthest from any thick centre (where interpolation matters most).
        k = int(np.abs(positions[:, None] - centres[None, :]).min(axis=1).argmax())
        col = reference.shape[2] // 2
        aspect = reference.geometry.slice_spacing / reference.geometry.spacing[1]
        window = self.model_config.window
        kw = {"cmap": "gray", "vmin": window.low, "vmax": window.high}
        fig, axes = plt.subplots(2, 3, figsize=(9, 6))
        for c, (volume, title) in enumerate(((thick_on_thin, "thick"), (output.array, "model"), (reference.array, "thin"))):
            axes[0, c].imshow(np.asarray(volume)[k], **kw)
            axes[0, c].set_title(f"{title} (axial, {positions[k]:.1f} mm)", fontsize=8)
            axes[1, c].imshow(np.asarray(volume)[:, :, col], aspect=aspect, **kw)
            axes[1, c].set_title(f"{title} (coronal)", fontsize=8)
        for ax in axes.ravel():
            ax.set_axis_off()
        fig.suptitle(f"diffusion epoch {epoch}: validation crop, PSNR {value:.2f} dB (RPLHR range)", fontsize=9)
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)

    def export(self, unet, folder: Path, metadata: dict) -> None:
        from ctsliceinterp.pipelines.checkpoint import save_checkpoint

        save_checkpoint(folder, self.vae, unet, self.model_config, self.latent_scale, {"trained": "diffusion", **metadata})


def main(argv=None) -> int:
    return loop.run_main(DiffusionTask, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
