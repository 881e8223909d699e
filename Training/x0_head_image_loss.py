"""Experiment (issue 13, not shipped): fine-tune the residual U-Net's x0 head end to end through the
frozen guided decoder, on image-space L1, and see whether the default output then gains over
``regression``.

    PYTHONPATH=Training python Training/x0_head_image_loss.py --model residual_diffusion --minutes 20 \
        --json runs/x0_head_image_loss.json

The shipped head minimises latent MSE, which weighs latent components the decoder ignores as much as
the ones it uses; this loss is the image error itself (L1 in HU / 1000, x 2.5 in the 40/400 window, as
the other stages). Fresh runs from ``residual_data.ResidualRunDataset`` (the training volumes), batch 2;
every ``--eval-every`` steps the head's decoded output is scored on fixed validation runs of the
validation chest against B-spline and the base (``train_guided_vae.gain_metrics``). Prints and writes
the monitor; the U-Net is not saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loop  # noqa: E402
from train_guided_vae import gain_metrics  # noqa: E402
from train_regression import WINDOW_WEIGHT, window_mask  # noqa: E402

from ctsliceinterp.pipelines.regression import RegressionInterpolator  # noqa: E402
from ctsliceinterp.pipelines.residual_diffusion import ResidualDiffusionInterpolator  # noqa: E402


def decoded_head(model: ResidualDiffusionInterpolator, item: dict) -> torch.Tensor:
    """The x0 head's output for one run, decoded with its base: (D, H, W) HU, differentiable in the U-Net."""
    base = item["base"].numpy()
    condition = model.encoded_condition(base, item["thick"].numpy(), item["x"].numpy())
    latents = model.mean_residual(condition, item["positions"][None])
    z = (latents[0].permute(1, 0, 2, 3) / model.vae.latent_scale).contiguous()
    return model.vae.decode(z, item["base"][:, None])[:, 0]


def main(argv=None) -> int:
    from residual_data import ResidualRunDataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="residual_diffusion")
    parser.add_argument("--config", default="Training/configs/residual_diffusion.yaml", help="for the data section")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-runs", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = ResidualDiffusionInterpolator.load(args.model, device="cpu")
    model.vae.requires_grad_(False)
    model.unet.train()
    data = dict(loop.load_config(args.config).get("data") or {})
    data.pop("cache_runs", None)
    base = RegressionInterpolator(copy.deepcopy(model.regression.net), "cpu")
    train = ResidualRunDataset(data, "train", base, seed=7)
    val = ResidualRunDataset(data, "val", base, seed=8, length=args.val_runs, fixed=True)
    val_items = [val[i] for i in range(len(val))]
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=args.lr)

    def evaluate(step: int) -> dict:
        model.unet.eval()
        with torch.no_grad():
            outputs = {"bspline": [], "regression": [], "x0_head": []}
            for item in val_items:
                outputs["bspline"].append(item["bspline"].numpy())
                outputs["regression"].append(item["base"].numpy())
                outputs["x0_head"].append(decoded_head(model, item).numpy())
        model.unet.train()
        truth = np.stack([item["truth"].numpy() for item in val_items])
        return {"step": step, **gain_metrics(truth, {k: np.stack(v) for k, v in outputs.items()})}

    history = [evaluate(0)]
    print(json.dumps(history[-1]))
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < args.minutes * 60:
        items = [train[2 * step], train[2 * step + 1]]
        loss = 0.0
        for item in items:
            output, truth = decoded_head(model, item), item["truth"]
            weight = 1.0 + WINDOW_WEIGHT * window_mask(truth)
            loss = loss + ((output - truth).abs() / 1000.0 * weight).mean() / weight.mean() / len(items)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            history.append(evaluate(step))
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in history[-1].items()
                              if "gain" in k or k == "step"}), flush=True)
    history.append(evaluate(step))
    print(json.dumps(history[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "history": history,
                                               "steps_per_s": step / (time.perf_counter() - start)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
