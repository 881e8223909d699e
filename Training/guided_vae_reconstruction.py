"""The guided VAE's reconstruction of held-out whole slices, against its base and B-spline.

    python Training/guided_vae_reconstruction.py --model runs/guided_vae/model \
        --thin ../shared/data/volumes/chest_ricord000082_1p25mm.nii.gz --thickness 5 --slices 40 \
        --json docs/quality/guided_vae_reconstruction.json

The thick slices are simulated from the whole reference as slab means (``evaluation.simulated_case``),
the base is the model folder's own regression network on the reference's slice positions (without
consistency, as inference makes it), and the middle ``slices`` reference slices are encoded
(posterior mean) and decoded at their full 512 x 512 size. Reported, on those slices: PSNR in the
40/400 window and over the protocol range of the reconstruction, of the base alone and of B-spline,
and the reconstruction's gains, and each one's through-plane gradient energy over the reference's.
It bounds what the residual diffusion can reach: the U-Net can at best predict the latent that this
reconstruction decodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

TRAINING_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TRAINING_DIR.parent / "Backend" / "src"))

from ctsliceinterp.api import InterpolationRequest, interpolate  # noqa: E402
from ctsliceinterp.evaluation.evaluate import simulated_case  # noqa: E402
from ctsliceinterp.evaluation.metrics import (  # noqa: E402
    psnr, through_plane_gradient_ratio, to_unit_range, window_to_unit_range)
from ctsliceinterp.io import read_volume  # noqa: E402
from ctsliceinterp.io.atomic import atomic_file  # noqa: E402
from ctsliceinterp.pipelines.regression import RegressionInterpolator  # noqa: E402
from ctsliceinterp.pipelines.residual_diffusion import load_residual_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a residual diffusion model folder (or a guided VAE export)")
    parser.add_argument("--thin", required=True, help="thin reference CT (HU)")
    parser.add_argument("--thickness", type=float, default=5.0, help="simulated slab thickness, mm (default 5)")
    parser.add_argument("--slices", type=int, default=40, help="middle reference slices reconstructed (default 40)")
    parser.add_argument("--json", help="write the result as JSON")
    args = parser.parse_args(argv)

    _, vae, regression, _ = load_residual_model(args.model, require_unet=False)
    case = simulated_case(read_volume(args.thin), args.thickness, name=Path(args.thin).name)
    target = case.reference.geometry
    base = RegressionInterpolator(regression, "cpu").run(case.thick, target, consistency=False).array
    bspline = interpolate(case.thick, InterpolationRequest(method="bspline", target=target)).volume.array
    n = target.shape[0]
    first = max(0, (n - args.slices) // 2)
    chosen = slice(first, min(n, first + args.slices))
    truth, base, bspline = (np.asarray(a[chosen], dtype=np.float32) for a in (case.reference.array, base, bspline))
    started = time.perf_counter()
    outputs = []
    with torch.inference_mode():
        for i in range(0, truth.shape[0], 4):
            t, b = (torch.from_numpy(a[i : i + 4, None]) for a in (truth, base))
            outputs.append(vae.decode(vae.encode(t, b).mean, b)[:, 0].float().numpy())
    seconds = time.perf_counter() - started
    reconstruction = np.concatenate(outputs)
    report = {"model": str(args.model), "volume": Path(args.thin).name, "thickness_mm": args.thickness,
              "slice_indices": [chosen.start, chosen.stop], "in_plane": list(truth.shape[1:])}
    for label, mapping in (("window", window_to_unit_range), ("full", to_unit_range)):
        scores = {name: psnr(mapping(a), mapping(truth)) for name, a in
                  (("guided_vae", reconstruction), ("base", base), ("bspline", bspline))}
        report[f"psnr_{label}_db"] = scores
        report[f"gain_over_base_{label}_db"] = scores["guided_vae"] - scores["base"]
        report[f"gain_over_bspline_{label}_db"] = scores["guided_vae"] - scores["bspline"]
    # How much of the through-plane detail the decoder returns from the ideal latent (what a sample can hope for).
    report["z_gradient_ratio"] = {name: through_plane_gradient_ratio(a, truth) for name, a in
                                  (("guided_vae", reconstruction), ("base", base), ("bspline", bspline))}
    report.update(seconds=round(seconds, 1), machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"torch {torch.__version__}", command="python " + " ".join(sys.argv))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with atomic_file(args.json) as tmp:
            Path(tmp).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
