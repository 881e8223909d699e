"""`ctsliceinterp simulate-thick THIN -o THICK --thickness 5`."""

from __future__ import annotations

from .common import add_input_arguments


def configure_parser(parser) -> None:
    add_input_arguments(parser, "thin", "thin CT to average")
    parser.add_argument("-o", "--output", required=True, help="output file (.nrrd, .nii.gz, .mha) or folder for DICOM")
    parser.add_argument("--thickness", type=float, default=5.0, help="slab width in mm (default 5)")
    parser.add_argument("--spacing", type=float, help="distance between thick slice centres (default: the thickness)")


def main(args) -> int:
    from ..core.acquisition import simulate_thick
    from ..io import read_volume, write_volume
    from ..io.atomic import check_output_path

    check_output_path(args.output, [args.thin])
    thin = read_volume(args.thin, series=args.series, series_uid=args.series_uid, detilt=args.detilt)
    thick = simulate_thick(thin, args.thickness, args.spacing)
    out = write_volume(thick, args.output, inputs=[args.thin])
    print(f"wrote {out}: {thick.shape[0]} slices of {args.thickness:g} mm every {thick.spacing[2]:g} mm")
    return 0
