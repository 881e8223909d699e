"""Stage timings of latent diffusion v2's pipeline (``pipelines/residual_diffusion.py``): a trained
model folder (``--model``), or untrained networks of a named size (``--config``: the cost does not
depend on the weights, so it can be measured before training; the base is the shipped ``regression``).

    .venv/bin/python benchmarks/bench_residual_diffusion.py --model residual_diffusion --slices 28
    .venv/bin/python benchmarks/bench_residual_diffusion.py --config default --slices 8 --samples 1 --steps 8

Input: ``--slices`` thick slices from the middle of the bundled phantom (512 x 512, 5 mm; 28 is all of
it), to 1 mm. ``--samples`` unset: the default output (the x0 head). Prints the stage timings (s) as
JSON. End-to-end time and peak memory against B-spline: ``benchmarks/bench_regression.py --methods``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctsliceinterp.core.grid import thin_grid
from ctsliceinterp.core.volume import Volume
from ctsliceinterp.io import read_volume
from ctsliceinterp.models.guided_vae import GuidedSliceVAE
from ctsliceinterp.models.residual_unet import ResidualUNet3D
from ctsliceinterp.pipelines.regression import RegressionInterpolator
from ctsliceinterp.pipelines.residual_diffusion import ResidualDiffusionInterpolator, named_config

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "phantom_head_thick_5mm.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", choices=["tiny", "tiny_images", "default", "images"])
    parser.add_argument("--slices", type=int, default=8, help="thick slices (the phantom has 28)")
    parser.add_argument("--model", help="a trained model folder or shipped name (default: untrained --config networks)")
    parser.add_argument("--samples", type=int, help="default: the model's default output")
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model = ResidualDiffusionInterpolator.load(args.model, device=args.device)
    else:
        config = named_config(args.config)
        regression = RegressionInterpolator.load("regression", device="cpu").net
        model = ResidualDiffusionInterpolator(GuidedSliceVAE(config.vae), ResidualUNet3D(config.unet), regression, config, args.device)
    thick = read_volume(SAMPLE)
    k0 = (thick.shape[0] - args.slices) // 2
    g = thick.geometry
    geometry = type(g)((args.slices,) + g.shape[1:], g.spacing, tuple(g.index_to_physical([0, 0, k0])), g.direction)
    volume = Volume(np.asarray(thick.array[k0 : k0 + args.slices], dtype=np.float32), geometry, {"slice_thickness": 5.0})
    target = thin_grid(volume.geometry, 1.0)
    start = time.perf_counter()
    model.run(volume, target, samples=args.samples, steps=args.steps, seed=0)
    report = {"model": args.model or f"untrained {args.config}", "input": list(volume.shape), "output": list(target.shape), "samples": args.samples,
              "steps": args.steps, "threads": args.threads, "total_s": round(time.perf_counter() - start, 1),
              **{f"{k}_s": round(v, 1) for k, v in model.last_timings.items()}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
