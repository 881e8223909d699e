"""Train the residual diffusion U-Net (latent diffusion v2) with the guided VAE and the base frozen.

    python Training/train_residual_diffusion.py --config Training/configs/residual_diffusion.yaml \
        --set vae_checkpoint=runs/guided_vae/model --out runs/residual_diffusion
    torchrun --nproc_per_node 4 Training/train_residual_diffusion.py ...            # multi-GPU
    python Training/train_residual_diffusion.py ... --resume                          # continue exactly

Each item is a run of thin slices with its base, made as inference makes it
(``residual_data.ResidualRunDataset``). The target is the guided VAE's residual latent of the run
(posterior mean, times the measured latent scale); the condition is the base's latent and the thick
slices' latents resampled onto the thin positions, plus the full-resolution images when the U-Net
takes them, with the pipeline's own functions (``ResidualDiffusionInterpolator.condition``).
``init_unet: FOLDER`` starts the U-Net from a trained model folder's (a latents-only U-Net's weights
start one that also takes images: the image features enter at zero). The loss is ``diffusion_loss.diffusion_loss``: the
min-SNR-weighted v (or eps) MSE on the cosine 1000-step DDPM schedule, masked on padded slices,
plus ``loss.mean_head`` times the x0 head's unweighted MSE (``ResidualUNet3D.posterior_mean``: the
one-pass posterior mean the default output uses).

Every epoch: the validation loss (fixed items and noise), then the monitor runs the sampler on fixed
validation runs and scores the x0 head, the mean of ``monitor.samples`` samples and one sample against
B-spline and against the base (regression) on the same runs, full range and 40/400 window
(``train_guided_vae.gain_metrics``), and the correlation between the samples' per-voxel standard
deviation and the mean's absolute error (does the uncertainty track the error?). The EMA U-Net is exported with the VAE and the base network
to ``OUT/model``, which ``ResidualDiffusionInterpolator.load`` reads.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

import loop
from loop import TrainingError, train_settings

MONITOR_DEFAULTS = {"items": 4, "samples": 2, "steps": 8, "sampler": "dpmpp"}


class ResidualDiffusionTask:
    name = "residual_diffusion"

    def __init__(self, config: dict, runtime: loop.Runtime, out: Path):
        from ctsliceinterp.core.errors import InputError
        from ctsliceinterp.models.residual_unet import ResidualUNet3D
        from ctsliceinterp.pipelines.regression import RegressionInterpolator
        from ctsliceinterp.pipelines.residual_diffusion import ResidualDiffusionInterpolator, load_residual_model, named_config
        from diffusion_loss import training_scheduler
        from residual_data import ResidualRunDataset

        if not config.get("vae_checkpoint"):
            raise TrainingError("set vae_checkpoint (the guided VAE run's OUT/model folder) in the config or with "
                                "--set vae_checkpoint=PATH")
        try:
            vae_config, vae, regression, _ = load_residual_model(config["vae_checkpoint"], require_unet=False)
            named = named_config(str(config.get("model", vae_config.name)))
        except InputError as exc:
            raise TrainingError(str(exc)) from None
        # The VAE is the checkpoint's (with any overrides it was trained with); U-Net, schedule and
        # inference settings come from the named config.
        try:
            self.model_config = dataclasses.replace(named, vae=vae_config.vae)
        except InputError as exc:
            raise TrainingError(str(exc)) from None
        self.device = runtime.device
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.regression_net = regression
        self.model = ResidualUNet3D(self.model_config.unet)
        if config.get("init_unet"):
            self._start_from(Path(config["init_unet"]))
        self.scheduler = training_scheduler(self.model_config.diffusion)
        # The pipeline's own conditioning (and, for the monitor, sampling and decoding) functions.
        self.pipeline = ResidualDiffusionInterpolator(self.vae, self.model, copy.deepcopy(regression), self.model_config,
                                                      device=self.device)
        self.monitor = {**MONITOR_DEFAULTS, **(config.get("monitor") or {})}
        self.mean_head_weight = float((config.get("loss") or {}).get("mean_head", 1.0))
        settings = train_settings(config)
        data = dict(config.get("data") or {})
        if int(data.get("crop", 96)) % self.model_config.pixel_multiple:
            raise TrainingError(f"data.crop must be a multiple of {self.model_config.pixel_multiple} for this model")
        self.seed = int(settings["seed"])
        cache_runs = int(data.pop("cache_runs", 0))
        base_network = RegressionInterpolator(copy.deepcopy(regression), "cpu")  # for the data workers
        self.val_dataset = ResidualRunDataset(data, "val", base_network, self.seed + 1, int(settings["val_items"]), fixed=True)
        if not cache_runs:
            self.train_dataset = ResidualRunDataset(data, "train", base_network, self.seed)
        else:  # a fixed pool of encoded runs (residual_data.LatentRunCache)
            from residual_data import LatentRunCache

            if runtime.distributed:
                raise TrainingError("data.cache_runs is a single-process CPU economy: set data.cache_runs=0 under torchrun")
            runs = ResidualRunDataset(data, "train", base_network, self.seed + 2, cache_runs, fixed=True)
            key = {"runs": cache_runs, "seed": self.seed, "data": data, "weights": _weights_digest(Path(config["vae_checkpoint"])),
                   "condition": self.model_config.unet.raw_condition_channels}
            self.train_dataset = LatentRunCache(runs, self.latents, out / "latent_cache.pt", key, self.seed)

    def _start_from(self, folder: Path) -> None:
        """``init_unet``: the U-Net of a trained residual model folder (the same size; a latents-only
        one when this U-Net also takes images, which then enter at zero)."""
        from safetensors.torch import load_file

        from ctsliceinterp.pipelines.residual_diffusion import UNET_FILE

        path = folder / UNET_FILE
        if not path.is_file():
            raise TrainingError(f"init_unet: no {UNET_FILE} in {folder}")
        state = load_file(str(path))
        own = self.model.state_dict()
        try:
            if self.model.image_encoder is not None and not any(k.startswith("image_encoder.") for k in state):
                self.model.load_latent_only_weights(state)
            elif set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
                raise ValueError(f"its U-Net is not of this config's size ({len(state)} tensors, this one {len(own)}; "
                                 "model= must name the config it was trained with, or default -> images)")
            else:
                self.model.load_state_dict(state)
        except ValueError as exc:
            raise TrainingError(f"init_unet {folder}: {exc}") from None

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing(True)

    @torch.no_grad()
    def latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(target residual latents, condition), each (B, C, D, h, w), scaled as the pipeline scales."""
        targets, conditions = [], []
        for i in range(batch["truth"].shape[0]):
            truth, base = batch["truth"][i].numpy(), batch["base"][i].numpy()
            z = self.pipeline.in_slice_batches(lambda t, b: self.vae.encode(t, b).mean, [truth, base], 8)
            targets.append((z * self.vae.latent_scale).permute(1, 0, 2, 3)[None])
            conditions.append(self.pipeline.condition(base, batch["thick"][i].numpy(), batch["x"][i].numpy()))
        return torch.cat(targets), torch.cat(conditions)

    def loss(self, model, batch: dict, device, generator=None):
        from diffusion_loss import diffusion_loss

        target, condition = (batch["target"], batch["condition"]) if "target" in batch else self.latents(batch)
        target, condition = target.to(device), condition.to(device)
        positions, mask = batch["positions"].to(device), batch["mask"].to(device)
        steps = self.model_config.diffusion.num_train_timesteps
        heads = {}

        def predict(noisy, t, condition, positions):  # the x0 head from the same forward (one image encoding)
            prediction, heads["mean"] = model(noisy, t, condition, positions, num_train_timesteps=steps)
            return prediction

        loss = diffusion_loss(predict if self.mean_head_weight else model, target, condition, positions, self.scheduler,
                              self.model_config.diffusion, depth_mask=mask, generator=generator)
        if not self.mean_head_weight:
            return loss, {}
        # The x0 head (the default output): unweighted MSE of the one-pass posterior mean, masked.
        error = (heads["mean"].float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # (B, D), averaged as diffusion_loss does
        mean_loss = ((error * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
        return loss + self.mean_head_weight * mean_loss, {"diffusion_loss": loss.detach(), "mean_head_loss": mean_loss.detach()}

    @torch.no_grad()
    def validate(self, unet, epoch: int, out: Path, device) -> dict:
        unet.eval()
        generator = torch.Generator(device=device).manual_seed(self.seed)
        items = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        losses = [float(self.loss(unet, self.val_dataset.collate(items[s : s + 4]), device, generator)[0])
                  for s in range(0, len(items), 4)]
        metrics = {"val_loss": float(np.mean(losses))}
        metrics.update(self.sample_metrics(unet, items[: int(self.monitor["items"])]))
        return metrics

    def sample_metrics(self, unet, items: list[dict]) -> dict:
        """The sampler on whole validation runs: posterior mean and one sample vs B-spline and base."""
        from train_guided_vae import gain_metrics

        pipeline = copy.copy(self.pipeline)
        pipeline.unet = unet
        steps, sampler, count = int(self.monitor["steps"]), str(self.monitor["sampler"]), int(self.monitor["samples"])
        parts = {"truth": [], "bspline": [], "regression": [], "x0_head": [], "mean": [], "sample": [], "std": []}
        for index, item in enumerate(items):
            base = item["base"].numpy()
            condition = pipeline.encoded_condition(base, item["thick"].numpy(), item["x"].numpy())
            positions = item["positions"][None].to(self.device)
            head = pipeline.decode(pipeline.mean_residual(condition, positions), base)
            decoded = []
            for k in range(count):
                generator = torch.Generator().manual_seed(self.seed + 1000 * index + k)
                decoded.append(pipeline.decode(pipeline.sample_residual(condition, positions, sampler, steps, generator), base))
            for key, value in zip(parts, (item["truth"].numpy(), item["bspline"].numpy(), base, head,
                                          np.mean(decoded, axis=0), decoded[0],
                                          np.std(decoded, axis=0, ddof=min(1, count - 1)))):
                parts[key].append(value)
        arrays = {key: np.stack(value) for key, value in parts.items()}
        metrics = gain_metrics(arrays["truth"], {k: v for k, v in arrays.items() if k not in ("truth", "std")},
                               prefix="val")
        if count > 1 and arrays["std"].std() > 0:  # does the uncertainty track the error? (issue 13 point 4)
            error = np.abs(arrays["mean"] - arrays["truth"]).ravel()
            metrics["val_std_error_correlation"] = float(np.corrcoef(arrays["std"].ravel(), error)[0, 1])
        return metrics

    def export(self, unet, folder: Path, info: dict) -> None:
        from ctsliceinterp.pipelines.residual_diffusion import save_residual_model

        config = self.model_config
        if not self.mean_head_weight:  # an untrained x0 head must not be the default output
            config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, mean_estimator="samples"))
        save_residual_model(folder, self.vae, self.regression_net, config, unet,
                            {"trained": "residual_diffusion", "trained_steps": info.get("step"), **info})


def _weights_digest(folder: Path) -> str:
    """SHA-256 of the guided VAE's and its base network's weights: a pool of runs encoded with them
    (targets, conditions and bases) is valid for these only."""
    import hashlib

    from ctsliceinterp.models.guided_vae import WEIGHTS_FILE
    from ctsliceinterp.pipelines.residual_diffusion import REGRESSION_FOLDER

    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes())
    for path in sorted((folder / REGRESSION_FOLDER).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_task(config, runtime, out):
    return ResidualDiffusionTask(config, runtime, out)


def main(argv=None) -> int:
    return loop.run_main(build_task, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
