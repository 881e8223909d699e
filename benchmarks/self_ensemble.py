"""How many in-plane transforms should the regression network average? Each count, measured.

    .venv/bin/python benchmarks/self_ensemble.py --json docs/quality/self_ensemble.json

The shipped ``regression`` network (or ``--model FOLDER``) on the validation chest
(``chest_lungfcp-0001_1mm``: never trained on; simulated 5 mm -> 1 mm), with its correction averaged
over 1, 2, 4 and 8 of ``models.regression.SELF_ENSEMBLE``'s flips and transposes, each followed by
the consistency correction as the method runs. B-spline is scored in the same run. The choice is
made here; the held-out chest is not used for it. Times are the interpolation alone, one process,
on whatever else the machine runs: read them as ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))
VALIDATION = REPO / "runs" / "data" / "extra" / "chest_lungfcp-0001_1mm.nii.gz"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="regression", help="regression model name or folder (default: the shipped one)")
    parser.add_argument("--thin", default=str(VALIDATION), help="thin reference (default: the validation chest)")
    parser.add_argument("--json", help="write the scores here")
    args = parser.parse_args(argv)
    if not Path(args.thin).is_file():
        parser.error(f"{args.thin} is missing: rebuild it with ../shared/data/extra/extract.sh runs/data/extra ...")

    from ctsliceinterp.core.classical import interpolate_classical
    from ctsliceinterp.evaluation import metrics
    from ctsliceinterp.evaluation.evaluate import machine_description, simulated_case
    from ctsliceinterp.io import read_volume
    from ctsliceinterp.models.regression import SELF_ENSEMBLE_COUNTS, ThroughPlaneNet
    from ctsliceinterp.pipelines.regression import RegressionInterpolator, resolve_model_folder

    case = simulated_case(read_volume(args.thin), 5.0)
    target = case.reference.geometry
    rows = [{"self_ensemble": 0, "method": "bspline",
             **metrics.score(interpolate_classical(case.thick, target, "bspline").array, case.reference.array).as_dict()}]
    network = ThroughPlaneNet.from_pretrained(resolve_model_folder(args.model))
    for count in SELF_ENSEMBLE_COUNTS:
        network.config = dataclasses.replace(network.config, self_ensemble=count)
        start = time.perf_counter()
        output = RegressionInterpolator(network, "cpu").run(case.thick, target)
        seconds = time.perf_counter() - start
        rows.append({"self_ensemble": count, "method": "regression", "seconds": seconds,
                     **metrics.score(output.array, case.reference.array).as_dict()})
        print(f"self_ensemble {count}: PSNR {rows[-1]['psnr']:.3f} dB, 40/400 {rows[-1]['psnr_soft_tissue']:.3f} dB, "
              f"SSIM {rows[-1]['ssim']:.4f}, {seconds:.1f} s", flush=True)
    if args.json:
        from ctsliceinterp.io.atomic import atomic_file

        report = {"command": "python " + " ".join(sys.argv), "case": "validation chest (LungFCP-01-0001), simulated 5 mm -> 1 mm",
                  "model": args.model, "machine": machine_description(), "rows": rows}
        with atomic_file(Path(args.json), suffix=".json") as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
