"""Reading speed: the 168-file phantom case ZIP (thick and thin series), the JPEG Lossless ZIP,
and the thick NIfTI, each read N times; the median is reported. For reference, SimpleITK's
GDCM series reader on the same thin series extracted to a folder.

    .venv/bin/python benchmarks/bench_io.py [--repeats 7] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up: imports, file cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from ctsliceinterp.io import read_volume

    case_zip = args.data / "ape_layout" / "APE" / "case_phantom.zip"
    jpeg_zip = args.data / "dicom_chest_ricord000082_24slices_jpeg_lossless.zip"
    thick_nifti = args.data / "volumes" / "phantom_head_thick_5mm.nii.gz"
    for path in (case_zip, jpeg_zip, thick_nifti):
        if not path.exists():
            print(f"missing {path}: pass --data ../shared/data", file=sys.stderr)
            return 1

    rows = []

    def bench(label, fn, files):
        seconds, volume = median_seconds(fn, args.repeats)
        shape = volume.shape if hasattr(volume, "shape") else volume
        rows.append((label, files, "x".join(str(n) for n in shape[::-1]), seconds))

    bench("case ZIP, --series thick (ctsliceinterp)", lambda: read_volume(case_zip, series="thick"), "168 scanned, 28 decoded")
    bench("case ZIP, --series thin (ctsliceinterp)", lambda: read_volume(case_zip, series="thin"), "168 scanned, 140 decoded")
    bench("JPEG Lossless ZIP (ctsliceinterp)", lambda: read_volume(jpeg_zip), "24")
    bench("thick NIfTI .nii.gz (ctsliceinterp)", lambda: read_volume(thick_nifti), "1")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(case_zip) as z:
            z.extractall(tmp)
        thin_folder = next(Path(tmp).rglob("2"))

        def itk_series():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(thin_folder)))
            return sitk.GetArrayFromImage(reader.Execute())

        bench("thin folder, extracted (ctsliceinterp)", lambda: read_volume(thin_folder), "140")
        bench("thin folder, extracted (SimpleITK/GDCM, reference)", itk_series, "140")

    cores = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {cores} CPU cores visible, load average {load}; "
          f"median of {args.repeats} reads after one warm-up (files in the OS cache)")
    print(f"| {'what':<50} | {'files':<24} | {'size (x,y,z)':<12} | median s |")
    print(f"|{'-' * 52}|{'-' * 26}|{'-' * 14}|----------|")
    for label, files, size, seconds in rows:
        print(f"| {label:<50} | {files:<24} | {size:<12} | {seconds:8.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
