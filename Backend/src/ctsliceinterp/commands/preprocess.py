"""`ctsliceinterp preprocess --dataset DIR --out CACHE [--workers N]`: a dataset of cases -> training cache."""

from __future__ import annotations

import os


def configure_parser(parser) -> None:
    parser.add_argument("--dataset", required=True, metavar="DIR",
                        help="dataset root: category folders of case ZIPs (case_X/1 thick, case_X/2 thin), "
                             "or of thin volumes / DICOM folders (thick simulated)")
    parser.add_argument("--out", required=True, metavar="CACHE", help="cache folder (created; re-runs skip finished cases)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="cases processed in parallel, one process each (default: min(4, CPUs))")
    parser.add_argument("--split", default="75,15,10", metavar="TRAIN,VAL,TEST",
                        help="patient-level split, stratified by category (default 75,15,10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--thickness", type=float, default=5.0, metavar="MM",
                        help="thin-only cases: simulated thick slab width (default 5 mm)")
    parser.add_argument("--thick-spacing", type=float, metavar="MM",
                        help="thin-only cases: distance between simulated thick slices (default: the thickness)")
    parser.add_argument("--force", action="store_true", help="redo cases that are already in the cache")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")


def main(args) -> int:
    from ..core.errors import InputError
    from ..data.preprocess import PreprocessOptions, preprocess_dataset, split_summary, summary_table

    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.thickness <= 0:
        raise InputError(f"--thickness must be positive, got {args.thickness}")
    options = PreprocessOptions(thickness_mm=args.thickness, thick_spacing_mm=args.thick_spacing, force=args.force)
    results = preprocess_dataset(args.dataset, args.out, args.workers, options, args.split, args.seed,
                                 progress=not args.no_progress)
    print(summary_table(results))
    print(f"split ({args.out}/splits.json): {split_summary(args.out)}")
    ok = sum(r.status in ("ok", "cached") for r in results)
    return 0 if ok else 1
