"""Score a residual diffusion model folder as the training monitor does, plus where its x0 head stands.

    PYTHONPATH=Training python Training/residual_monitor.py --model runs/residual_diffusion/model \
        --config Training/configs/residual_diffusion_images.yaml --json docs/quality/residual_monitor.json

- ``monitor``: ``ResidualDiffusionTask.validate`` on the model's U-Net (the config's validation runs,
  data and seed; the numbers a training run of that config logs, at this model's weights);
- ``latent_diagnostic``: on the same validation runs, the full-range PSNR gain over the base
  (``regression``) of the guided decode of three residual latents: zero, the x0 head's, and the
  encoder's latent of the true thin slices (the oracle). A head near the zero-latent line learned
  nothing; near 0 dB it returns the base; the oracle bounds what a perfect U-Net would give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

import loop
from train_guided_vae import gain_metrics


def latent_diagnostic(task, items: list[dict]) -> dict:
    pipeline, vae = task.pipeline, task.vae
    parts = {"truth": [], "bspline": [], "regression": [], "zero_latent": [], "x0_head": [], "true_latent": []}
    for item in items:
        base, truth = item["base"].numpy(), item["truth"].numpy()
        condition = pipeline.encoded_condition(base, item["thick"].numpy(), item["x"].numpy())
        positions = item["positions"][None].to(task.device)
        true_z = pipeline.in_slice_batches(lambda t, b: vae.encode(t, b).mean, [truth, base], 8)
        latents = {"zero_latent": torch.zeros((1, vae.config.latent_channels) + tuple(condition.shape[2:])),
                   "x0_head": pipeline.mean_residual(condition, positions),
                   "true_latent": (true_z * vae.latent_scale).permute(1, 0, 2, 3)[None]}
        parts["truth"].append(truth)
        parts["bspline"].append(item["bspline"].numpy())
        parts["regression"].append(base)
        for name, z in latents.items():
            parts[name].append(pipeline.decode(z.to(task.device), base))
    arrays = {k: np.stack(v) for k, v in parts.items()}
    metrics = gain_metrics(arrays.pop("truth"), arrays, prefix="diagnostic")
    return {k: v for k, v in metrics.items() if "gain_over_regression" in k}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a residual diffusion model folder (its U-Net is scored)")
    parser.add_argument("--config", required=True, help="the training config whose validation runs and settings are used")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    from ctsliceinterp.core.errors import InputError
    from ctsliceinterp.pipelines.residual_diffusion import load_residual_model
    from train_residual_diffusion import ResidualDiffusionTask

    try:
        config = yaml.safe_load(Path(args.config).read_text())
        model_config, _, _, unet = load_residual_model(args.model)
        config.update({"model": model_config.name, "init_unet": None, "vae_checkpoint": args.model})
        config["data"] = {**config.get("data", {}), "cache_runs": 0}
        task = ResidualDiffusionTask(config, loop.Runtime("cpu"), Path("."))
    except (OSError, InputError, loop.TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if task.model_config.unet != model_config.unet:  # score the folder's own U-Net, whatever its config
        task.model_config = model_config
        task.pipeline.config = model_config
    task.pipeline.unet = task.model = unet.to(task.device).eval()
    with torch.no_grad():
        report = {"model": args.model, "config": args.config,
                  "monitor": task.validate(task.model, 0, Path("."), task.device)}
        items = [task.val_dataset[i] for i in range(len(task.val_dataset))]
        report["latent_diagnostic"] = latent_diagnostic(task, items)
        report["latent_diagnostic"]["runs"] = len(items)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        from ctsliceinterp.io.atomic import atomic_file

        with atomic_file(Path(args.json)) as tmp:
            Path(tmp).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
