"""Benchmark: our 1-D classical methods vs SimpleITK's generic 3-D ``Resample``.

A 50 x 512 x 512 thick volume (5 mm) goes to 1 mm (246 slices), with cubic B-spline and
Lanczos (a = 3), on 2 threads for everybody (numpy/OpenBLAS, torch, SimpleITK), in one run:

    .venv/bin/python benchmarks/bench_classical.py [--repeats 5] [--sitk-repeats 3]
        [--sitk-lanczos-repeats 1] [--json docs/evaluation/bench_classical.json] [--cli-memory]

The volume is real: the RICORD chest CT (1.25 mm, ../shared/data) averaged into 5 mm slabs by
the acquisition model and cut to its middle 50 slabs. ``--synthetic`` uses smooth random data
instead when the shared data are absent. Times are medians of the repeats; the output of both
implementations is compared in the interior (away from the first and last 3 thick slices, where
boundary conditions differ) as a sanity check that they compute the same interpolation.
"""

from __future__ import annotations

import os

THREADS = "2"
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_name] = THREADS  # before numpy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "volumes" / "chest_ricord000082_1p25mm.nii.gz"
THICK_SLICES = 50
THICKNESS_MM = 5.0
TARGET_MM = 1.0
BOUNDARY_SLICES = 3  # interior check: skip output within this many thick slices of each end


def thick_volume(data: Path, synthetic: bool):
    from ctsliceinterp.core.acquisition import simulate_thick
    from ctsliceinterp.core.volume import Volume

    if synthetic:
        from scipy import ndimage

        rng = np.random.default_rng(0)
        noise = rng.normal(0, 1, (THICK_SLICES, 512, 512)).astype(np.float32)
        array = ndimage.gaussian_filter(noise, (1, 4, 4)) * 2000 - 300
        return Volume.from_array(array.astype(np.float32), (0.7, 0.7, THICKNESS_MM)), "synthetic smooth noise"
    from ctsliceinterp.io import read_volume

    thin = read_volume(data)
    thick = simulate_thick(thin, THICKNESS_MM)
    if thick.shape[0] < THICK_SLICES:
        raise SystemExit(f"{data} gives only {thick.shape[0]} thick slices; {THICK_SLICES} are needed")
    start = (thick.shape[0] - THICK_SLICES) // 2
    positions = thick.geometry.slice_positions()
    geometry = thick.geometry.with_slices(float(positions[start]), THICK_SLICES, THICKNESS_MM)
    return thick.replace(array=np.ascontiguousarray(thick.array[start : start + THICK_SLICES]), geometry=geometry), (
        f"{data.name} averaged to {THICKNESS_MM:g} mm slabs, middle {THICK_SLICES}"
    )


def to_sitk(volume):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array.astype(np.float32))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def sitk_resample(image, target, interpolator):
    import SimpleITK as sitk

    return sitk.Resample(
        image,
        [target.shape[2], target.shape[1], target.shape[0]],
        sitk.Transform(),
        interpolator,
        target.origin,
        target.spacing,
        target.direction,
        0.0,
        sitk.sitkFloat32,
    )


def sitk_lanczos_kernel_check() -> dict:
    """What SimpleITK's sitkLanczosWindowedSinc computes, on a small random volume: it is a
    windowed sinc of radius 5 whose weights are not renormalised, while ours is Lanczos a = 3
    renormalised to sum 1 (a constant stays constant). The same 1-D matrix machinery with
    SimpleITK's kernel reproduces it, so the two differ by the filter, not by an error."""
    import SimpleITK as sitk

    from ctsliceinterp.core.classical import _kernel_matrix, interpolation_matrix
    from ctsliceinterp.core.grid import fractional_indices, thin_grid
    from ctsliceinterp.core.volume import Volume

    array = np.random.default_rng(1).normal(0, 300, (20, 8, 8)).astype(np.float32)
    volume = Volume.from_array(array, (1.0, 1.0, THICKNESS_MM))
    target = thin_grid(volume.geometry, TARGET_MM)
    theirs = sitk.GetArrayFromImage(sitk_resample(to_sitk(volume), target, sitk.sitkLanczosWindowedSinc))
    x = fractional_indices(volume.geometry, target)
    interior = slice(int(BOUNDARY_SLICES * THICKNESS_MM / TARGET_MM) + 5, -int(BOUNDARY_SLICES * THICKNESS_MM / TARGET_MM) - 5)

    def lanczos5(t):
        return np.where(np.abs(t) < 5, np.sinc(t) * np.sinc(t / 5), 0.0)

    radius5 = np.einsum("oi,iyx->oyx", _kernel_matrix(x, array.shape[0], 5, lanczos5), array)
    ours = np.einsum("oi,iyx->oyx", interpolation_matrix("lanczos", array.shape[0], x), array)
    return {
        "sitk_vs_radius5_unnormalised_max_abs": float(np.abs(radius5 - theirs)[interior].max()),
        "sitk_vs_ours_a3_max_abs": float(np.abs(ours - theirs)[interior].max()),
        "values_std": 300.0,
    }


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous output before the next run
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result


def cli_peak_memory(volume, method: str) -> dict:
    """Peak resident memory of ``ctsliceinterp interpolate`` on this volume, in a fresh process."""
    from ctsliceinterp.io import write_volume

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "thick.nii.gz"
        write_volume(volume.replace(array=np.round(volume.array).astype(np.int16)), source)
        env = dict(os.environ, PYTHONPATH=str(REPO / "Backend" / "src"))
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ctsliceinterp.cli", "interpolate", str(source), "-o", str(Path(tmp) / "thin.nii.gz"),
             "--method", method, "--no-progress"],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {"method": method, "peak_rss_mib": round(peak_kib / 1024, 1), "wall_seconds": round(seconds, 2),
            "note": "read .nii.gz (int16) + interpolate + write .nii.gz, one process"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="thin CT to average into the thick volume")
    parser.add_argument("--synthetic", action="store_true", help="use smooth random data instead of the real chest CT")
    parser.add_argument("--repeats", type=int, default=5, help="runs of our methods (median reported)")
    parser.add_argument("--sitk-repeats", type=int, default=3, help="runs of SimpleITK B-spline")
    parser.add_argument("--sitk-lanczos-repeats", type=int, default=1, help="runs of SimpleITK Lanczos (minutes each)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--cli-memory", action="store_true", help="also measure peak memory of `ctsliceinterp interpolate`")
    args = parser.parse_args(argv)

    import SimpleITK as sitk
    import torch

    from ctsliceinterp.core.grid import thin_grid
    from ctsliceinterp.api import InterpolationRequest, interpolate

    torch.set_num_threads(int(THREADS))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(THREADS))

    volume, source = thick_volume(args.data, args.synthetic)
    target = thin_grid(volume.geometry, TARGET_MM)
    image = to_sitk(volume)
    print(f"input: {source}; {volume.shape[0]} x {volume.shape[1]} x {volume.shape[2]} at {volume.spacing[2]:g} mm "
          f"-> {target.shape[0]} slices at {TARGET_MM:g} mm; {THREADS} threads", flush=True)

    # Interior of the output along z: at least BOUNDARY_SLICES thick slices from either end.
    positions = target.slice_positions()
    centres = volume.geometry.slice_positions()
    interior = (positions >= centres[BOUNDARY_SLICES]) & (positions <= centres[-1 - BOUNDARY_SLICES])

    rows = []
    for method, sitk_interpolator, sitk_name, sitk_repeats in (
        ("bspline", sitk.sitkBSpline, "sitkBSpline", args.sitk_repeats),
        ("lanczos", sitk.sitkLanczosWindowedSinc, "sitkLanczosWindowedSinc", args.sitk_lanczos_repeats),
    ):
        request = InterpolationRequest(method=method, spacing=TARGET_MM)
        ours_times, ours = timed(lambda: interpolate(volume, request).volume, args.repeats)
        print(f"  ours {method}: median {statistics.median(ours_times):.3f} s over {args.repeats}", flush=True)
        theirs_times, theirs = timed(lambda: sitk_resample(image, target, sitk_interpolator), sitk_repeats)
        print(f"  SimpleITK {sitk_name}: median {statistics.median(theirs_times):.2f} s over {sitk_repeats}", flush=True)
        theirs_array = sitk.GetArrayViewFromImage(theirs)
        difference = np.abs(ours.array[interior] - theirs_array[interior])
        rows.append({
            "method": method,
            "ours_median_s": statistics.median(ours_times),
            "ours_times_s": ours_times,
            "sitk_interpolator": sitk_name,
            "sitk_median_s": statistics.median(theirs_times),
            "sitk_times_s": theirs_times,
            "speedup": statistics.median(theirs_times) / statistics.median(ours_times),
            "interior_max_abs_diff_hu": float(difference.max()),
            "interior_mean_abs_diff_hu": float(difference.mean()),
        })
        del ours, theirs, theirs_array, difference

    print()
    header = f"{'method':8s} {'ours (s)':>9s} {'SimpleITK (s)':>14s} {'speed-up':>9s} {'max |diff| HU':>14s} {'mean |diff| HU':>15s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:8s} {r['ours_median_s']:9.3f} {r['sitk_median_s']:14.2f} {r['speedup']:8.0f}x "
              f"{r['interior_max_abs_diff_hu']:14.3g} {r['interior_mean_abs_diff_hu']:15.3g}")

    kernel = sitk_lanczos_kernel_check()
    print(f"\nSimpleITK's Lanczos is radius 5, not renormalised: on a small random volume (std 300) it matches "
          f"that kernel to {kernel['sitk_vs_radius5_unnormalised_max_abs']:.2g} and differs from our a = 3 "
          f"(renormalised) by up to {kernel['sitk_vs_ours_a3_max_abs']:.0f}")

    memory = None
    if args.cli_memory:
        memory = cli_peak_memory(volume, "bspline")
        print(f"\nctsliceinterp interpolate (bspline) end to end: peak RSS {memory['peak_rss_mib']} MiB, "
              f"{memory['wall_seconds']} s wall ({memory['note']})")

    if args.json:
        report = {
            "input": source,
            "shape_zyx": list(volume.shape),
            "target_slices": target.shape[0],
            "threads": int(THREADS),
            "repeats": {"ours": args.repeats, "sitk_bspline": args.sitk_repeats, "sitk_lanczos": args.sitk_lanczos_repeats},
            "results": rows,
            "sitk_lanczos_kernel_check": kernel,
            "cli_peak_memory": memory,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                        "numpy": np.__version__, "SimpleITK": sitk.Version.VersionString(), "torch": torch.__version__},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
