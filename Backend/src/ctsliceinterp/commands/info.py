"""`ctsliceinterp info PATH`: geometry and an intensity summary."""

from __future__ import annotations

import json

import numpy as np

from .common import add_input_arguments


def configure_parser(parser) -> None:
    add_input_arguments(parser, "path")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> int:
    from ..io import read_volume

    volume = read_volume(args.path, series=args.series, series_uid=args.series_uid, detilt=args.detilt)
    g = volume.geometry
    a = volume.array
    positions = g.slice_positions()
    summary = {
        "path": args.path,
        "size_xyz": [g.shape[2], g.shape[1], g.shape[0]],
        "spacing_mm": list(g.spacing),
        "slice_thickness_mm": volume.slice_thickness,
        "origin_lps": list(g.origin),
        "direction": list(g.direction),
        "slice_positions_mm": [float(positions[0]), float(positions[-1])],
        "dtype": str(a.dtype),
        "hu": {
            "min": float(a.min()),
            "p1": float(np.percentile(a, 1)),
            "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99)),
            "max": float(a.max()),
            "mean": float(a.mean()),
        },
    }
    series = volume.metadata.get("series_description")
    if series:
        summary["series_description"] = series
    for key in ("series_instance_uid", "transfer_syntax", "dicom_files"):
        if volume.metadata.get(key):
            summary[key] = volume.metadata[key]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.path}")
    if volume.metadata.get("source_format") == "dicom":
        print(f"  DICOM series     {volume.metadata.get('series_instance_uid', '')} '{series or ''}' "
              f"({volume.metadata.get('dicom_files', '?')} files, transfer syntax {volume.metadata.get('transfer_syntax', '?')})")
    print(f"  size (x, y, z)   {summary['size_xyz'][0]} x {summary['size_xyz'][1]} x {summary['size_xyz'][2]}")
    print(f"  spacing          {g.spacing[0]:.4g} x {g.spacing[1]:.4g} x {g.spacing[2]:.4g} mm")
    print(f"  slice thickness  {volume.slice_thickness:.4g} mm")
    print(f"  origin (LPS)     {g.origin[0]:.2f}, {g.origin[1]:.2f}, {g.origin[2]:.2f} mm")
    d = g.direction_matrix
    print(f"  direction        {' '.join(f'{v:+.4f}' for v in d[:, 0])} | {' '.join(f'{v:+.4f}' for v in d[:, 1])} | {' '.join(f'{v:+.4f}' for v in d[:, 2])}")
    print(f"  slices along normal  {positions[0]:.2f} .. {positions[-1]:.2f} mm")
    h = summary["hu"]
    print(f"  HU               min {h['min']:.0f}, p1 {h['p1']:.0f}, median {h['median']:.0f}, p99 {h['p99']:.0f}, max {h['max']:.0f} ({a.dtype})")
    return 0
