"""Benchmark: the learned methods against B-spline, time and peak memory, in one run.

    .venv/bin/python benchmarks/bench_regression.py [--repeats 3] [--json docs/quality/bench_regression.json]
    .venv/bin/python benchmarks/bench_regression.py --methods bspline,regression,residual_diffusion,residual_diffusion:samples=1 \
        --cases 1 --json docs/quality/bench_residual_diffusion.json

Each case runs ``ctsliceinterp interpolate`` in a fresh process (the peak resident memory is the
process's own, read from ``getrusage`` as it exits), B-spline and regression alternating,
``--repeats`` times; times are medians, memory the largest peak. A method ``NAME:samples=N`` runs
``--method NAME --samples N``. Cases (``--cases``: their numbers, default all):
- the bundled phantom (28 x 512 x 512, 5 mm) to 1 mm: the README's demo workload;
- the same to 0.45 mm (a 300-slice output): memory must stay bounded by the output, since the
  network runs a few slices at a time.
The machine is named in the JSON; on a shared machine the times are indicative.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))

from ctsliceinterp.evaluation.evaluate import machine_description  # noqa: E402

SAMPLE = REPO / "samples" / "phantom_head_thick_5mm.nii.gz"
CASES = (("phantom 5 mm -> 1 mm (136 slices)", 1.0), ("phantom 5 mm -> 0.45 mm (300 slices)", 0.45))
METHODS = ("bspline", "regression")
THREADS = "2"


PEAK_PROBE = (
    "import resource, runpy, sys\n"
    "sys.argv = ['ctsliceinterp'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('ctsliceinterp.cli', run_name='__main__')\n"
    "finally:\n    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def method_arguments(label: str) -> list[str]:
    """``residual_diffusion:samples=1`` -> ``--method residual_diffusion --samples 1`` (labels as ``evaluate``'s)."""
    from ctsliceinterp.evaluation.evaluate import parse_method_label

    name, options = parse_method_label(label)
    arguments = ["--method", name]
    for key, value in options.items():
        arguments += [f"--{key}", str(value)] if not isinstance(value, bool) else [f"--{'' if value else 'no-'}{key}"]
    return arguments


def run_once(method: str, spacing: float, out: Path) -> tuple[float, float]:
    """Seconds and peak resident memory (MiB) of one ``interpolate`` process."""
    command = [sys.executable, "-c", PEAK_PROBE, "interpolate", str(SAMPLE), "-o", str(out),
               *method_arguments(method), "--spacing", str(spacing), "--device", "cpu", "--no-progress"]
    env = {"OMP_NUM_THREADS": THREADS, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "Backend" / "src")}
    start = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peak_kib = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")]
    return seconds, int(peak_kib[-1]) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--cases", default=",".join(str(i + 1) for i in range(len(CASES))),
                        help="case numbers, comma-separated: " + "; ".join(f"{i + 1}: {c[0]}" for i, c in enumerate(CASES)))
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cases = [CASES[int(i) - 1] for i in args.cases.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, spacing in cases:
            runs = {m: {"seconds": [], "peak_mib": []} for m in methods}
            for _ in range(args.repeats):
                for index, method in enumerate(methods):  # alternating, so a slow spell of the machine hits all
                    seconds, peak = run_once(method, spacing, Path(tmp) / f"out{index}.nrrd")
                    runs[method]["seconds"].append(seconds)
                    runs[method]["peak_mib"].append(peak)
            row = {"case": label, "spacing_mm": spacing}
            for method in methods:
                row[method] = {"median_seconds": statistics.median(runs[method]["seconds"]),
                               "seconds": runs[method]["seconds"], "peak_mib": max(runs[method]["peak_mib"])}
            results.append(row)
            print(f"{label}: " + ", ".join(f"{m} {row[m]['median_seconds']:.1f} s (peak {row[m]['peak_mib']:.0f} MiB)"
                                           for m in methods))
    report = {"machine": {**machine_description(), "threads": THREADS}, "repeats": args.repeats, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
