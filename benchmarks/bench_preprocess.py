"""Preprocessing one real case: this pipeline vs a straightforward reimplementation of the origin one.

Origin pipeline (reimplemented here): extract the ZIP to disk, read every DICOM with pydicom,
order by InstanceNumber, apply rescale, window to [-1, 1], save thick + thin as one float32
tensor file (torch.save). Ours: `preprocess_dataset` with 1 worker (read the ZIP in memory, each
file inflated once, pair by position, int16 HU memory-mappable cache). Same case, same process,
the two pipelines alternating, --repeat runs each; the median is the figure (all runs printed,
with the load average: on a shared machine the other jobs move both).

    .venv/bin/python benchmarks/bench_preprocess.py [--case ../shared/data/ape_layout/APE/case_phantom.zip]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Backend" / "src"))


def origin_pipeline(case_zip: Path, work: Path) -> Path:
    import numpy as np
    import pydicom
    import torch

    extracted = work / "extracted"
    with zipfile.ZipFile(case_zip) as archive:
        archive.extractall(extracted)
    tensors = {}
    for series, name in (("1", "thick"), ("2", "thin")):
        files = sorted(extracted.rglob(f"{series}/*.dcm"))
        datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
        hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]).astype(np.float32)
        tensors[name] = torch.from_numpy(np.clip((hu - 40.0) / 200.0, -1.0, 1.0))  # window 40/400 -> [-1, 1]
    out = work / "case.pt"
    torch.save(tensors, out)
    shutil.rmtree(extracted)
    return out


def ours(case_zip: Path, work: Path) -> Path:
    from ctsliceinterp.data.preprocess import preprocess_dataset

    dataset = work / "dataset" / "APE"
    dataset.mkdir(parents=True, exist_ok=True)
    link = dataset / case_zip.name
    if not link.exists():
        link.symlink_to(case_zip.resolve())
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    results = preprocess_dataset(dataset.parent, cache, workers=1, progress=False)
    assert results[0].status == "ok", results[0].reason
    return cache / "cases" / "APE" / case_zip.stem


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=str(ROOT.parent / "shared" / "data" / "ape_layout" / "APE" / "case_phantom.zip"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    case = Path(args.case)
    import pydicom  # noqa: F401  (imports outside the timings)
    import torch  # noqa: F401

    import statistics

    from ctsliceinterp.io.dicom.sources import _inflate

    times = {"origin": [], "ours": []}
    sizes = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=ROOT.parent if os.access(ROOT.parent, os.W_OK) else None) as tmp:
        for _ in range(args.repeat):
            for name, fn in (("origin", origin_pipeline), ("ours", ours)):
                work = Path(tmp) / name
                work.mkdir(exist_ok=True)
                t0 = time.perf_counter()
                out = fn(case, work)
                times[name].append(time.perf_counter() - t0)
                sizes[name] = size(out)
    median = {k: statistics.median(v) for k, v in times.items()}
    load_after = os.getloadavg()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"inflate with {_inflate()[0].__module__}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print(f"case: {case.name} ({case.stat().st_size / 1e6:.1f} MB ZIP)")
    print(f"{'pipeline':10s} {'median s':>9s} {'all runs (s)':>32s} {'output MB':>10s}")
    for k in ("origin", "ours"):
        print(f"{k:10s} {median[k]:9.2f} {' '.join(f'{t:.2f}' for t in times[k]):>32s} {sizes[k] / 1e6:10.1f}")
    print(f"speed-up (median) {median['origin'] / median['ours']:.2f}x, "
          f"size ratio ours/origin {sizes['ours'] / sizes['origin']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
