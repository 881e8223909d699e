"""`ctsliceinterp evaluate --thin REF [--thick REAL_THICK | --thickness 5] --methods ... --json OUT --report DIR`
and `ctsliceinterp evaluate --cache CACHE --split test [--model PATH] --report DIR` (every case of a split)."""

from __future__ import annotations

import shlex
import sys

from ..api import CLASSICAL_METHODS, available_methods
from ..models.configs import SAMPLERS

DEFAULT_METHODS = ",".join(CLASSICAL_METHODS)


def configure_parser(parser) -> None:
    parser.add_argument("--thin", metavar="REF", help="thin reference CT (file, DICOM folder or ZIP); required unless --cache")
    parser.add_argument("--cache", metavar="CACHE", help="evaluate every case of a split of a preprocessed cache (ctsliceinterp preprocess) instead")
    parser.add_argument("--split", default="test", help="with --cache: train, val, test (default) or all")
    parser.add_argument("--crop", type=int, metavar="PIXELS", help="with --cache: a centred in-plane crop of every case (quick look; not full-FOV scores)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--thick", metavar="REAL_THICK", help="the real thick series of the same scan (a real pair)")
    source.add_argument("--thickness", type=float, metavar="MM", help="simulate thick slices of this width from the reference (slab means)")
    parser.add_argument("--spacing", type=float, metavar="MM",
                        help="with --thickness: distance between simulated thick-slice centres (default: the thickness, contiguous slabs)")
    parser.add_argument("--thin-series", choices=["thick", "thin"], help="series of a case ZIP/folder to read for --thin (default: thin when --thin and --thick are the same case)")
    parser.add_argument("--thick-series", choices=["thick", "thin"], help="series of a case ZIP/folder to read for --thick (default: thick when --thin and --thick are the same case)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated methods (default {DEFAULT_METHODS}); a name ending in +consistency "
                             "(or -consistency) forces the thick-slice consistency correction on (off); "
                             "NAME:samples=N (or :steps=N) sets that option for that entry")
    parser.add_argument("--json", metavar="OUT.json", help="write the scores as JSON")
    parser.add_argument("--report", metavar="DIR", help="write axial/coronal/sagittal PNG figures and summary.md into DIR")
    parser.add_argument("--name", help="case name for the report (default: the reference file name)")
    model = parser.add_argument_group("model options (--model: the learned method's; the others: diffusion's)")
    model.add_argument("--model", help="model name or checkpoint folder of the one learned method evaluated")
    model.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    model.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the model's)")
    model.add_argument("--seed", type=int, default=0, help="random seed (default 0, so reruns are comparable)")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def request_options(args, methods: list[str]) -> dict:
    """Request fields shared by the methods, each of which gets those it takes
    (``api.shared_options``): ``--model`` is the one learned method's model."""
    from ..api import METHODS, get_method
    from ..core.errors import InputError
    from ..evaluation.evaluate import parse_method_label

    names = {parse_method_label(m)[0] for m in methods}
    learned = sorted(name for name in names if not get_method(name).classical)
    if args.model and len(learned) > 1:
        raise InputError(f"--model names one model, but {' and '.join(learned)} are both learned methods: "
                         "evaluate them in separate runs")
    # An option none of the methods takes is refused, not ignored (each method gets those it takes:
    # api.shared_options). --seed has a default, so it is never "given".
    for option in ("model", "steps", "sampler"):
        if getattr(args, option) is not None and not any(get_method(name).takes(option) for name in names):
            takers = [name for name, entry in METHODS.items() if entry.takes(option)]
            raise InputError(f"--{option} applies to {', '.join(takers)}, none of which is in --methods "
                             f"({', '.join(sorted(names))})")
    return {"device": args.device, "seed": args.seed, "model": args.model, "steps": args.steps, "sampler": args.sampler}


def main(args) -> int:
    from pathlib import Path

    from ..core.errors import InputError
    from ..evaluation.evaluate import evaluate_methods, format_table, real_pair_case, simulated_case, write_json, write_summary
    from ..io import read_volume
    from ..io.atomic import check_output_path
    from .common import TqdmProgress

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.cache:
        return _main_cache(args, methods)
    if not args.thin or not (args.thick or args.thickness):
        raise InputError("give --thin REF and --thick REAL_THICK or --thickness MM (or --cache CACHE --split test)")
    if args.crop is not None:
        raise InputError("--crop applies to --cache only")
    from ..evaluation.evaluate import parse_method_label

    unknown = [m for m in methods if parse_method_label(m)[0] not in available_methods()]
    if not methods or unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(available_methods())}")
    if args.spacing is not None and args.thick:
        raise InputError("--spacing applies to simulated thick slices (--thickness) only")
    inputs = [args.thin, args.thick]
    if args.json:
        check_output_path(args.json, inputs)
    report_dir = None
    if args.report:
        report_dir = Path(args.report)
        check_output_path(report_dir, inputs)
        report_dir.mkdir(exist_ok=True)

    # One case ZIP/folder for both (the dataset's case_X/1 thick, case_X/2 thin layout).
    same_case = bool(args.thick) and Path(args.thin).resolve() == Path(args.thick).resolve()
    reference = read_volume(args.thin, series=args.thin_series or ("thin" if same_case else None))
    name = args.name or Path(args.thin).name
    if args.thick:
        thick = read_volume(args.thick, series=args.thick_series or ("thick" if same_case else None))
        case = real_pair_case(thick, reference, name)
    else:
        case = simulated_case(reference, args.thickness, args.spacing, name)
    del reference

    options = request_options(args, methods)
    progress = TqdmProgress(enabled=not args.no_progress)
    try:
        evaluation = evaluate_methods(case, methods, options, progress=progress)
    finally:
        progress.close()

    d = case.describe()
    print(f"{name}: {d['kind']}, {d['thick']['slices']} thick slices every {d['thick']['spacing_mm']:g} mm -> "
          f"{d['reference']['slices']} reference slices every {d['reference']['spacing_mm']:g} mm "
          f"({d['evaluated_slices']} scored)")
    print(format_table(evaluation))
    if evaluation.reference_consistency_mae_hu is not None:
        print(f"(thick MAE of the real thin reference itself: {evaluation.reference_consistency_mae_hu:.2f} HU)")
    command = "ctsliceinterp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    if args.json:
        write_json(evaluation, args.json, {"command": command} if command else None)
        print(f"wrote {args.json}")
    if report_dir is not None:
        from ..evaluation.figures import evaluation_figures

        outputs = {m: r.output for m, r in evaluation.results.items()}
        figures = evaluation_figures(case.thick, outputs, case.reference, report_dir, title=name)
        reliability = {m: r.reliability for m, r in evaluation.results.items()
                       if r.reliability and r.reliability["correlation"] is not None}  # a zero-spread std has none
        if reliability:
            from ..evaluation.figures import reliability_figure

            figures.append(reliability_figure(reliability, report_dir / "uncertainty_reliability.png", title=name))
        summary = write_summary(evaluation, report_dir / "summary.md", command, figures)
        print(f"wrote {', '.join(figures)}, {summary}")
    return 0


def _main_cache(args, methods: list[str]) -> int:
    """``--cache CACHE --split S``: every case of the split, one report folder."""
    from pathlib import Path

    from ..core.errors import InputError
    from ..evaluation.evaluate_cache import evaluate_split
    from ..io.atomic import check_output_path
    from .common import TqdmProgress, method_of_model

    if args.thin or args.thick or args.thickness:
        raise InputError("--cache evaluates the cached pairs: leave out --thin, --thick and --thickness")
    if not args.report:
        raise InputError("--cache needs --report DIR for the report (JSON, CSV, figures, summary.md)")
    if args.model and args.methods == DEFAULT_METHODS:
        methods.append(method_of_model(args.model))  # --model given: the model runs beside the classical baselines
    from ..evaluation.evaluate import parse_method_label

    unknown = [m for m in methods if parse_method_label(m)[0] not in available_methods()]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(available_methods())}")
    if args.crop is not None and args.crop < 16:
        raise InputError(f"--crop must be at least 16 pixels, got {args.crop}")
    report_dir = check_output_path(Path(args.report), [args.cache])
    options = request_options(args, methods)
    command = "ctsliceinterp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    progress = TqdmProgress(enabled=not args.no_progress)

    def on_case(outcome) -> None:
        progress.close()
        if outcome.ok:
            best = max(outcome.evaluation.results.values(), key=lambda r: r.scores.psnr)
            print(f"{outcome.key}: {', '.join(f'{m} {r.scores.psnr:.2f} dB' for m, r in outcome.evaluation.results.items())} "
                  f"(best {best.method})")
        else:
            print(f"{outcome.key}: not evaluated: {outcome.error}")

    try:
        report = evaluate_split(args.cache, args.split, methods, report_dir, options, crop=args.crop,
                                progress=progress, command=command, on_case=on_case)
    finally:
        progress.close()
    for method, values in report.means().items():
        print(f"mean {method}: PSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.4f} over {values['cases']} case(s)"
              if values["psnr"] is not None else f"mean {method}: no case evaluated")
    print(f"wrote {report_dir / 'report.json'}, report.csv, summary.md, psnr_by_method.png and cases/*/")
    if args.json:
        import shutil

        from ..io.atomic import atomic_file

        with atomic_file(check_output_path(args.json, [args.cache]), suffix=".json") as tmp:
            shutil.copyfile(report_dir / "report.json", tmp)
    return 0 if report.evaluated else 1
