"""Benchmark of the diffusion pipeline: per-stage time, peak memory and FLOPs (not a test).

Workloads (random weights of each config: speed does not depend on training):
- ``full``: a 50 x 512 x 512 thick volume (5 mm slabs simulated from the real 1.25 mm chest CT)
  to 1 mm, at 20 DDIM steps and at 8 DPM-Solver++ steps, next to the B-spline baseline;
- ``phantom``: the real 28-slice 5 mm head phantom to 1 mm with the config's default sampler
  (the CPU target for ``small``: <= 2 minutes on 2 cores).

Configs: tiny and small on CPU; medium too when CUDA is available (bf16 autocast).

    .venv/bin/python benchmarks/bench_diffusion.py --output bench.json
    .venv/bin/python benchmarks/bench_diffusion.py --configs small --workloads phantom
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))
DATA = Path(os.environ.get("CTSLICEINTERP_SHARED_DATA", REPO.parent / "shared" / "data"))

from ctsliceinterp.core.acquisition import consistency_mae, simulate_thick  # noqa: E402
from ctsliceinterp.core.classical import interpolate_classical  # noqa: E402
from ctsliceinterp.core.grid import thin_grid  # noqa: E402
from ctsliceinterp.io import read_volume  # noqa: E402
from ctsliceinterp.models.configs import get_config  # noqa: E402
from ctsliceinterp.models.unet import UNet3D  # noqa: E402
from ctsliceinterp.models.vae import SliceVAE  # noqa: E402
from ctsliceinterp.pipelines.depth_chunks import chunk_starts  # noqa: E402
from ctsliceinterp.pipelines.diffusion import Interpolator  # noqa: E402
from ctsliceinterp.core.volume import Volume  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) for the fraction-of-peak figure.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def full_workload() -> Volume:
    """50 x 512 x 512 at 5 mm: 4-slice means of the real chest CT (1.25 mm), first 50 slabs."""
    path = DATA / "volumes" / "chest_ricord000082_1p25mm.nii.gz"
    if path.exists():
        thick = simulate_thick(read_volume(path), 5.0)
        return Volume(thick.array[:50].copy(), thick.geometry.with_slices(thick.geometry.slice_positions()[0], 50, 5.0), thick.metadata)
    rng = np.random.default_rng(0)  # no shared data: same size, synthetic content
    return Volume.from_array(rng.normal(40, 100, (50, 512, 512)).astype(np.float32), spacing=(0.7, 0.7, 5.0))


def phantom_workload() -> Volume:
    return read_volume(DATA / "volumes" / "phantom_head_thick_5mm.nii.gz")


def reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def count_flops(config, depth: int, height: int, width: int, steps: int) -> dict[str, float]:
    """FLOPs of one volume (meta tensors: nothing is computed or allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    inference = config.inference
    lat_h, lat_w = height // 8, width // 8
    with torch.device("meta"):
        unet, vae = UNet3D(config.unet).eval(), SliceVAE(config.vae).eval()
        flops = {}
        with torch.no_grad():
            for name, fn in {
                "encode_per_slice": lambda: vae.encode(torch.zeros(1, 1, height, width)),
                "decode_per_slice": lambda: vae.decode(torch.zeros(1, 4, lat_h, lat_w)),
            }.items():
                with FlopCounterMode(display=False) as counter:
                    fn()
                flops[name] = counter.get_total_flops()
            unet_calls = 0
            unet_flops = 0
            for start in chunk_starts(depth, inference.chunk_depth, inference.chunk_overlap):
                d = min(depth, start + inference.chunk_depth) - start
                x = torch.zeros(1, 4, d, lat_h, lat_w)
                with FlopCounterMode(display=False) as counter:
                    unet(x, torch.zeros(1), x, torch.zeros(1, 3, d))
                unet_flops += counter.get_total_flops()
                unet_calls += 1
    return {"unet_per_step": unet_flops, "unet_calls_per_step": unet_calls, **flops}


def run_case(config_name, workload_name, volume, sampler, steps, device, compile_model) -> dict:
    config = get_config(config_name)
    torch.manual_seed(0)
    interpolator = Interpolator(SliceVAE(config.vae), UNet3D(config.unet), config, 1.0, device, compile=compile_model)
    target = thin_grid(volume.geometry)
    if interpolator.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    start = time.perf_counter()
    output, _ = interpolator.run(volume, target, steps=steps, sampler=sampler, seed=0)
    if interpolator.device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    h, w = volume.shape[1], volume.shape[2]
    hp, wp = -(-h // config.pixel_multiple) * config.pixel_multiple, -(-w // config.pixel_multiple) * config.pixel_multiple
    flops = count_flops(config, target.shape[0], hp, wp, steps)
    total_flops = (
        flops["encode_per_slice"] * volume.shape[0]
        + flops["unet_per_step"] * steps
        + flops["decode_per_slice"] * target.shape[0]
    )
    row = {
        "config": config_name,
        "workload": workload_name,
        "input": f"{volume.shape[0]}x{h}x{w}",
        "output_slices": target.shape[0],
        "sampler": sampler,
        "steps": steps,
        "device": str(interpolator.device),
        "seconds_total": round(total, 2),
        "seconds": {k: round(v, 2) for k, v in interpolator.last_timings.items()},
        "peak_cpu_rss_gib": round(peak_rss_gib(), 2),
        "tflops_per_volume": round(total_flops / 1e12, 3),
        "consistency_mae_hu": round(consistency_mae(volume, output), 3),
    }
    if interpolator.device.type == "cuda":
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            row["fraction_of_bf16_peak"] = round(total_flops / total / (peak * 1e12), 4)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, help="default: tiny small (+ medium on CUDA)")
    parser.add_argument("--workloads", nargs="+", default=["phantom", "full"], choices=["phantom", "full"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net and decoder")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--flops-only", action="store_true", help="only count FLOPs per volume (meta device, any machine)")
    args = parser.parse_args(argv)
    if args.flops_only:
        for name in args.configs or ["tiny", "small", "medium"]:
            config = get_config(name)
            for thick_slices, label in ((28, "phantom 28 slices"), (50, "full 50 slices")):
                thin = (thick_slices - 1) * 5 + 1
                steps = config.inference.steps
                f = count_flops(config, thin, 512, 512, steps)
                total = f["encode_per_slice"] * thick_slices + f["unet_per_step"] * steps + f["decode_per_slice"] * thin
                print(
                    f"{name:6s} {label:18s} -> {thin} x 512 x 512: U-Net {f['unet_per_step'] / 1e12:.2f} TFLOP/step "
                    f"({f['unet_calls_per_step']} chunks), encode {f['encode_per_slice'] / 1e9:.1f} GFLOP/slice, "
                    f"decode {f['decode_per_slice'] / 1e9:.1f} GFLOP/slice; {steps} steps: {total / 1e12:.1f} TFLOP/volume"
                )
        return 0
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    configs = args.configs or (["tiny", "small", "medium"] if cuda else ["tiny", "small"])
    machine = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "load_average_at_start": os.getloadavg(),
    }
    print(json.dumps(machine))
    rows = []
    for workload in args.workloads:
        volume = phantom_workload() if workload == "phantom" else full_workload()
        start = time.perf_counter()
        interpolate_classical(volume, thin_grid(volume.geometry), "bspline")
        rows.append({"config": "bspline", "workload": workload, "seconds_total": round(time.perf_counter() - start, 2)})
        print(json.dumps(rows[-1]), flush=True)
        for name in configs:
            if name == "medium" and not cuda:
                continue
            cases = [(get_config(name).inference.sampler, get_config(name).inference.steps)]
            if workload == "full":
                cases = [("ddim", 20), ("dpmpp", 8)]
            for sampler, steps in cases:
                rows.append(run_case(name, workload, volume, sampler, steps, args.device, args.compile))
                print(json.dumps(rows[-1]), flush=True)
    machine["load_average_at_end"] = os.getloadavg()
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
