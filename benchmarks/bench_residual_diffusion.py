"""Cost of latent diffusion v2's pipeline (``pipelines/residual_diffusion.py``) with untrained
networks of a named size: the cost does not depend on the weights, so it can be measured before
training. The base is the shipped ``regression`` network.

    .venv/bin/python benchmarks/bench_residual_diffusion.py --config default --slices 8 --samples 1 --steps 8

Input: ``--slices`` thick slices from the middle of the bundled phantom (512 x 512, 5 mm), to 1 mm.
Prints the stage timings (s) as JSON.
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
from ctsliceinterp.models.unet import UNet3D
from ctsliceinterp.pipelines.regression import RegressionInterpolator
from ctsliceinterp.pipelines.residual_diffusion import ResidualDiffusionInterpolator, named_config

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "phantom_head_thick_5mm.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", choices=["tiny", "default"])
    parser.add_argument("--slices", type=int, default=8, help="thick slices (the phantom has 28)")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = named_config(args.config)
    regression = RegressionInterpolator.load("regression", device="cpu").net
    model = ResidualDiffusionInterpolator(GuidedSliceVAE(config.vae), UNet3D(config.unet), regression, config, args.device)
    thick = read_volume(SAMPLE)
    k0 = (thick.shape[0] - args.slices) // 2
    g = thick.geometry
    geometry = type(g)((args.slices,) + g.shape[1:], g.spacing, tuple(g.index_to_physical([0, 0, k0])), g.direction)
    volume = Volume(np.asarray(thick.array[k0 : k0 + args.slices], dtype=np.float32), geometry, {"slice_thickness": 5.0})
    target = thin_grid(volume.geometry, 1.0)
    start = time.perf_counter()
    model.run(volume, target, samples=args.samples, steps=args.steps, seed=0)
    report = {"config": args.config, "input": list(volume.shape), "output": list(target.shape), "samples": args.samples,
              "steps": args.steps, "threads": args.threads, "total_s": round(time.perf_counter() - start, 1),
              **{f"{k}_s": round(v, 1) for k, v in model.last_timings.items()}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
