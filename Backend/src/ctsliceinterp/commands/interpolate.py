"""`ctsliceinterp interpolate INPUT -o OUTPUT [--method NAME] [--spacing 1.0 | --like REF] ...`"""

from __future__ import annotations

import sys

from ..api import DEFAULT_METHOD, METHODS, RESIDUAL_DIFFUSION_METHOD, SERVER_DEFAULT, available_methods
from ..core.grid import DEFAULT_SPACING_MM
from ..models.configs import SAMPLERS
from .common import TqdmProgress, add_input_arguments, method_of_model


def configure_parser(parser) -> None:
    add_input_arguments(parser, "input", "thick CT: volume file, DICOM folder or ZIP")
    parser.add_argument("-o", "--output", required=True, help="output file (.nrrd, .nii.gz, .mha) or a new folder for a DICOM series")
    parser.add_argument("--method", default=None, choices=available_methods(), help=f"interpolation method (default {DEFAULT_METHOD})")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--spacing", type=float, default=DEFAULT_SPACING_MM, help="target slice spacing in mm (default 1.0)")
    grid.add_argument("--like", metavar="REF", help="put the output on the slice positions of this reference volume")
    parser.add_argument("--like-series", choices=["thick", "thin"], help="series of a case ZIP/folder given to --like")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)")
    model = parser.add_argument_group(
        "model options (learned methods; the sampling ones are the diffusion methods')",
        "A method refuses an option it does not take. Without --method or --model, --steps, --sampler, --samples "
        f"and --uncertainty mean --method {RESIDUAL_DIFFUSION_METHOD}, locally and with --server alike.")
    unshipped = ", ".join(name for name, entry in METHODS.items() if not entry.classical and not entry.default_model)
    model.add_argument("--model", help="model name or checkpoint folder (default: the method's shipped model; "
                                        f"{unshipped} ships none: give your trained model's folder); "
                                        "without --method it names its own method")
    model.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    model.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the model's)")
    model.add_argument("--samples", type=int, default=None, metavar="N",
                       help="default: the method's default output (the posterior mean for residual_diffusion, one "
                            "sample for diffusion); 1: one realistic sample; N > 1: the mean of N samples, with their "
                            "per-voxel standard deviation as an uncertainty map")
    model.add_argument("--uncertainty", metavar="PATH", help="write the per-voxel standard deviation of the samples (needs --samples 2 or more): "
                            "where samples disagree; it ranks the error but is several times smaller (docs/quality.md), "
                            "not an error bar")
    agree = parser.add_mutually_exclusive_group()
    agree.add_argument("--consistency", dest="consistency", action="store_const", const=True, default=None,
                       help="correct the output until re-averaging it gives the thick slices back (default for the "
                            "learned methods; a classical method gets it only when asked)")
    agree.add_argument("--no-consistency", dest="consistency", action="store_const", const=False,
                       help="skip the thick-slice consistency correction")
    model.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    remote = parser.add_argument_group("remote server")
    remote.add_argument("--server", metavar="URL", help="run on a CTSliceInterp server (e.g. https://gpu-host:8000)")
    remote.add_argument("--token-file", metavar="F", help="file holding the server's bearer token")
    parser.add_argument("--figure", metavar="PNG", help="also write a comparison picture: input | output | B-spline")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")


def build_request(args, reference_geometry=None):
    from ..core.errors import InputError
    from ..api import InterpolationRequest

    if args.samples is not None and args.samples < 1:
        raise InputError("--samples must be at least 1")
    # Without --method: a --model names its own method (on a server the method is not sent: the
    # server knows which method each of its models has, and checks the options against it);
    # sampling options mean latent diffusion v2, the sampling method with a shipped model (its
    # loader says so when its weights are absent), whatever this install's or the server's default
    # (so a command means the same job locally and remotely); else the default, a server's own.
    # The request itself refuses the options its method does not take (InterpolationRequest).
    sampling = args.steps or args.sampler or args.samples is not None or args.uncertainty
    if args.method:
        method = args.method
    elif args.model:
        method = SERVER_DEFAULT if args.server else method_of_model(args.model)
    elif sampling:
        method = RESIDUAL_DIFFUSION_METHOD
    else:
        method = SERVER_DEFAULT if args.server else DEFAULT_METHOD
    if args.uncertainty and (args.samples or 0) < 2:
        raise InputError("--uncertainty needs --samples 2 or more")
    return InterpolationRequest(
        method=method,
        spacing=args.spacing,
        target=reference_geometry,
        model=args.model,
        steps=args.steps,
        sampler=args.sampler,
        samples=args.samples,
        consistency=args.consistency,
        seed=args.seed,
        device=args.device,
    )


def main(args) -> int:
    from ..core.errors import InputError
    from ..io import read_volume, write_volume
    from ..io.atomic import check_output_path
    from ..api import interpolate

    inputs = [args.input, args.like]
    check_output_path(args.output, inputs)
    if args.uncertainty:
        check_output_path(args.uncertainty, inputs + [args.output])
    volume = read_volume(args.input, series=args.series, series_uid=args.series_uid, detilt=args.detilt)
    reference = read_volume(args.like, series=args.like_series).geometry if args.like else None
    request = build_request(args, reference)
    progress = TqdmProgress(enabled=not args.no_progress)
    try:
        if args.server:
            from ..serving.client import interpolate_remote

            result = interpolate_remote(args.server, volume, request, token_file=args.token_file, progress=progress)
        else:
            result = interpolate(volume, request, progress=progress)
    finally:
        progress.close()
    out = write_volume(result.volume, args.output, inputs=inputs)
    if args.uncertainty:
        if result.uncertainty is None:  # e.g. a server's method gave none: say so rather than skip the file
            raise InputError(f"the {result.method} result has no uncertainty volume: {args.uncertainty} was not written "
                             f"(the output {out} was)")
        write_volume(result.uncertainty, args.uncertainty, inputs=inputs)
    if args.figure:
        write_comparison_figure(volume, result, args.figure, inputs)
    g = result.volume.geometry
    print(
        f"wrote {out}: {g.shape[0]} slices every {g.spacing[2]:g} mm ({result.method}, {result.seconds:.1f} s)",
        file=sys.stdout,
    )
    return 0


def write_comparison_figure(thick, result, path, inputs) -> None:
    """thick | method output | B-spline (computed here when the method is not B-spline)."""
    from ..core.classical import interpolate_classical
    from ..evaluation.figures import comparison_figure
    from ..io.atomic import check_output_path

    check_output_path(path, inputs)
    volumes = {"input (thick)": thick, result.method: result.volume}
    if result.method != "bspline":
        volumes["bspline"] = interpolate_classical(thick, result.volume.geometry, "bspline")
    comparison_figure(volumes, path)
    print(f"wrote {path}")
