"""Turn a dataset of CT cases into the training cache (``cache.py``), in parallel and resumable.

Dataset layout: category folders (``APE/``, ``non-APE/``, any names) under a root. In each:

- **paired cases**: case ZIPs (or unzipped case folders) in the origin layout ``case_X/1/*.dcm``
  (thick) and ``case_X/2/*.dcm`` (thin). Thick and thin are paired by physical slice position:
  only the z range covered by both is kept and recorded, never an index or a centre crop;
- **thin-only cases**: NIfTI / NRRD / MHA files or DICOM series folders; the thick slices are
  simulated with the acquisition model (slab means, ``acquisition.simulate_thick``).

Each case is read, checked, paired and written by a worker process; a broken case (corrupted
ZIP, missing ``1/`` or ``2/``, nested folders, extra series, mismatched in-plane geometry...)
is reported with its reason and skipped. Finished cases are skipped on a re-run (their source's
size and modification time are recorded; a case whose arrays do not match its manifest, e.g. a
truncated copy, is redone), and every write is atomic. Workers die with the run, even a ``kill -9``
of it, and the next run removes what a killed run left half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import cache as cache_format
from ..core.errors import CTSliceInterpError, GeometryError, InputError
from ..core.volume import Geometry, Volume
from ..io.atomic import check_writable_folder, write_error

THICK_FOLDER, THIN_FOLDER = "1", "2"
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DEFAULT_CATEGORY = "uncategorized"
POSITION_TOLERANCE_MM = 0.05
log = logging.getLogger(__name__)


class CaseError(CTSliceInterpError):
    """A case of the dataset cannot be used; the message is the reason shown in the summary."""


@dataclass(frozen=True)
class CaseSource:
    category: str
    case_id: str
    path: str
    kind: str  # "pair" (thick 1/ + thin 2/) or "thin" (thick simulated)

    @property
    def key(self) -> str:
        return cache_format.case_key(self.category, self.case_id)


@dataclass
class PreprocessOptions:
    thickness_mm: float = 5.0  # simulated slab width for thin-only cases
    thick_spacing_mm: Optional[float] = None  # simulated slab spacing (default: contiguous)
    force: bool = False  # redo finished cases


@dataclass
class CaseResult:
    key: str
    category: str
    case_id: str
    status: str  # "ok", "cached" or "failed"
    reason: str = ""
    kind: str = ""
    thick_slices: int = 0
    thin_slices: int = 0
    overlap_mm: Optional[list[float]] = None
    seconds: float = 0.0
    bytes: int = 0
    patient: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- discovery -------------------------------------------------------------------------------
def _volume_stem(name: str) -> Optional[str]:
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _classify(path: Path, category: str) -> Optional[CaseSource]:
    if path.name.startswith("."):
        return None
    if path.is_file() and path.suffix.lower() == ".zip":
        return CaseSource(category, path.stem, str(path), "pair")
    if path.is_file() and _volume_stem(path.name):
        return CaseSource(category, _volume_stem(path.name), str(path), "thin")
    if path.is_dir():
        children = {p.name for p in path.iterdir()}
        kind = "pair" if children & {THICK_FOLDER, THIN_FOLDER} else "thin"
        return CaseSource(category, path.name, str(path), kind)
    return None  # README, spreadsheets...


def discover_cases(dataset: str | os.PathLike) -> list[CaseSource]:
    """Cases under ``dataset``: its sub-folders are categories; loose files form the category
    ``uncategorized``. Sorted by key, so every run sees the same order."""
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise InputError(f"the dataset {root} is not a folder (expected category folders of case ZIPs)")
    sources: list[CaseSource] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not ({p.name for p in entry.iterdir()} & {THICK_FOLDER, THIN_FOLDER}):
            sources.extend(s for s in (_classify(p, entry.name) for p in sorted(entry.iterdir())) if s)
        else:
            source = _classify(entry, DEFAULT_CATEGORY)
            if source:
                sources.append(source)
    keys = [s.key for s in sources]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise InputError(f"several cases share the id(s) {', '.join(duplicates)} in one category: rename them")
    return sorted(sources, key=lambda s: s.key)


# --- layout checks ---------------------------------------------------------------------------
def _visible(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not (name.startswith("__MACOSX/") or any(p.startswith(".") for p in parts))


def check_case_layout(names: Iterable[str], source: str) -> str:
    """Check the relative file names of a case (ZIP members or files of a folder) against the
    origin layout ``[case_X/]1/*`` and ``[case_X/]2/*``; returns the case root. Raises CaseError
    naming nested folders, extra series folders, several cases, or a missing series."""
    roots, nested, extra = set(), set(), set()
    found = {THICK_FOLDER: 0, THIN_FOLDER: 0}
    for name in names:
        if not _visible(name):
            continue
        parts = PurePosixPath(name).parts
        if len(parts) == 1:
            continue  # a loose file next to the case folder (README): not a series
        series_at = next((i for i, p in enumerate(parts[:-1]) if p in found), None)
        if series_at is None:
            extra.add("/".join(parts[:-1]) + "/")
            continue
        root = "/".join(parts[:series_at])
        roots.add(root)
        if series_at > 1:
            nested.add("/".join(parts[: series_at + 1]) + "/")
        elif series_at < len(parts) - 2:
            nested.add("/".join(parts[:-1]) + "/")
        else:
            found[parts[series_at]] += 1
    extra -= {f"{root}/" for root in roots}  # loose files next to 1/ and 2/ (README): not a series
    if nested:
        raise CaseError(f"nested folders {', '.join(sorted(nested)[:3])} (expected case_X/1/*.dcm and case_X/2/*.dcm)")
    if len(roots) > 1:
        raise CaseError(f"several case folders in one case ({', '.join(sorted(r or '.' for r in roots)[:4])})")
    if extra:
        raise CaseError(f"extra series folder(s) {', '.join(sorted(extra)[:3])} (only 1/ thick and 2/ thin are expected)")
    missing = [f"{folder}/ ({what})" for folder, what in ((THICK_FOLDER, "thick"), (THIN_FOLDER, "thin")) if not found[folder]]
    if missing:
        raise CaseError(f"missing series folder {' and '.join(missing)} in {Path(source).name}")
    return next(iter(roots))


def _member_names(path: Path) -> list[str]:
    if path.is_dir():
        return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    try:
        with zipfile.ZipFile(path) as archive:
            return [i.filename for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise CaseError(f"corrupted ZIP ({exc})") from None


# --- pairing by physical position -----------------------------------------------------------
def reverse_slices(volume: Volume) -> Volume:
    """The same voxels with the slice axis reversed (normal flipped): a physical no-op."""
    g = volume.geometry
    direction = g.direction_matrix.copy()
    direction[:, 2] *= -1
    last = g.index_to_physical((0, 0, g.shape[0] - 1))
    geometry = Geometry(g.shape, g.spacing, tuple(last), tuple(direction.ravel()))
    return Volume(volume.array[::-1], geometry, dict(volume.metadata))


def crop_slices(volume: Volume, start: int, stop: int) -> Volume:
    g = volume.geometry
    geometry = g.with_slices(float(g.slice_positions()[start]), stop - start, g.slice_spacing)
    return Volume(volume.array[start:stop], geometry, dict(volume.metadata))


def pair_by_position(thick: Volume, thin: Volume) -> tuple[Volume, Volume, dict[str, Any]]:
    """Keep the z range both series cover, by physical slice position along the normal.

    Thick slices are kept when their centre lies inside the thin coverage; thin slices when they
    lie inside the thick coverage (first slab start .. last slab end). Returns both crops and
    the overlap record."""
    from ..core.grid import like_grid

    if np.dot(thick.geometry.normal, thin.geometry.normal) < -0.5:
        thin = reverse_slices(thin)  # stored in the opposite slice order: same voxels, same positions
    try:
        like_grid(thick.geometry, thin.geometry)
    except GeometryError as exc:
        raise CaseError(f"mismatched geometry between 1/ and 2/: {exc}") from None
    t_pos, s_pos = thick.geometry.slice_positions(), thin.geometry.slice_positions()
    t_half, s_half = thick.slice_thickness / 2, thin.geometry.slice_spacing / 2
    if thin.geometry.slice_spacing >= thick.geometry.slice_spacing * (1 - 1e-3):
        raise CaseError(
            f"the thin series spacing ({thin.geometry.slice_spacing:g} mm) is not finer than the thick series "
            f"spacing ({thick.geometry.slice_spacing:g} mm): are 1/ and 2/ swapped?"
        )
    lo = max(t_pos[0] - t_half, s_pos[0] - s_half)
    hi = min(t_pos[-1] + t_half, s_pos[-1] + s_half)
    tol = POSITION_TOLERANCE_MM
    keep_thick = np.flatnonzero((t_pos >= s_pos[0] - s_half - tol) & (t_pos <= s_pos[-1] + s_half + tol))
    keep_thin = np.flatnonzero((s_pos >= t_pos[0] - t_half - tol) & (s_pos <= t_pos[-1] + t_half + tol))
    if keep_thick.size < 2 or keep_thin.size < 2:
        raise CaseError(
            f"thick ({t_pos[0]:.1f}..{t_pos[-1]:.1f} mm) and thin ({s_pos[0]:.1f}..{s_pos[-1]:.1f} mm) series "
            "overlap by fewer than 2 thick slices along the normal"
        )
    thick_c = crop_slices(thick, int(keep_thick[0]), int(keep_thick[-1]) + 1)
    thin_c = crop_slices(thin, int(keep_thin[0]), int(keep_thin[-1]) + 1)
    info = {
        "overlap_mm": [float(lo), float(hi)],
        "thick_slices": {"source": len(t_pos), "kept": int(keep_thick.size), "first_kept": int(keep_thick[0])},
        "thin_slices": {"source": len(s_pos), "kept": int(keep_thin.size), "first_kept": int(keep_thin[0])},
    }
    return thick_c, thin_c, info


# --- one case --------------------------------------------------------------------------------
def _source_stamp(path: Path) -> dict[str, Any]:
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return {"bytes": sum(p.stat().st_size for p in files), "files": len(files),
                "mtime": max((p.stat().st_mtime for p in files), default=0.0)}
    stat = path.stat()
    return {"bytes": stat.st_size, "files": 1, "mtime": stat.st_mtime}


def _patient_key(volume: Volume, fallback: str) -> str:
    """A pseudonymous patient key (hash of PatientID): keeps patients in one split without
    copying the identifier into the cache."""
    patient = str((volume.metadata.get("dicom") or {}).get("PatientID", "") or "").strip()
    if not patient:
        return fallback
    return "pid-" + hashlib.sha256(patient.encode()).hexdigest()[:16]


def _dicom_info(volume: Volume) -> dict[str, Any]:
    tags = volume.metadata.get("dicom") or {}
    keep = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "KVP", "BodyPartExamined", "SeriesDescription")
    return {k: tags[k] for k in keep if k in tags}


def read_pair(source: CaseSource) -> tuple[Volume, Volume]:
    from ..io.dicom import read_case

    path = Path(source.path)
    check_case_layout(_member_names(path), source.path)
    try:
        return read_case(path)  # both series in one pass over the files
    except InputError as exc:
        raise CaseError(str(exc)) from None


def process_case(source: CaseSource, cache: str, options: PreprocessOptions) -> CaseResult:
    """Read, check, pair and write one case. Never raises: failures come back as results."""
    t0 = time.perf_counter()
    result = CaseResult(source.key, source.category, source.case_id, "failed", kind=source.kind)
    folder = cache_format.case_folder(cache, source.category, source.case_id)
    try:
        path = Path(source.path)
        stamp = _source_stamp(path)
        reuse = folder.exists() and not options.force
        damage = cache_format.case_problem(folder) if reuse else None
        if reuse and damage is None:
            case = cache_format.CachedCase.open(folder)
            if case.manifest.get("source", {}).get("stamp") == stamp:
                return _result_from_case(result, case, "cached", time.perf_counter() - t0)
        if source.kind == "pair":
            thick, thin = read_pair(source)
            thick, thin, pairing = pair_by_position(thick, thin)
            origin = "real pair"
        else:
            from ..core.acquisition import simulate_thick
            from ..io import read_volume

            try:
                thin = read_volume(path)
                thick = simulate_thick(thin, options.thickness_mm, options.thick_spacing_mm)
            except InputError as exc:
                raise CaseError(str(exc)) from None
            thick, thin, pairing = pair_by_position(thick, thin)
            origin = "simulated"
        info = {
            "category": source.category,
            "case_id": source.case_id,
            "patient": _patient_key(thin, source.key),
            "origin": origin,
            "source": {"path": str(path), "kind": source.kind, "stamp": stamp},
            "pairing": pairing,
            "acquisition": {"thick_slice_thickness_mm": thick.slice_thickness,
                            "thick_spacing_mm": thick.geometry.slice_spacing,
                            "thin_spacing_mm": thin.geometry.slice_spacing,
                            "pixel_spacing_mm": list(thin.spacing[:2])},
            "dicom": _dicom_info(thin),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        cache_format.write_case(folder, thick, thin, info)
        if damage:
            result.reason = f"redone, the cached copy was damaged: {damage}"
        return _result_from_case(result, cache_format.CachedCase.open(folder), "ok", time.perf_counter() - t0)
    except CTSliceInterpError as exc:
        result.reason = str(exc).splitlines()[0]
    except MemoryError:
        result.reason = "out of memory while reading the case"
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the dataset
        result.reason = f"unexpected {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    return result


def _result_from_case(result: CaseResult, case: cache_format.CachedCase, status: str, seconds: float) -> CaseResult:
    m = case.manifest
    result.status = status
    result.thick_slices = m["thick"]["geometry"]["shape"][0]
    result.thin_slices = m["thin"]["geometry"]["shape"][0]
    result.overlap_mm = m.get("pairing", {}).get("overlap_mm")
    result.patient = m.get("patient", case.key)
    result.bytes = sum(p.stat().st_size for p in case.folder.iterdir())
    result.seconds = seconds
    return result


def _process_case_args(args) -> CaseResult:
    # Worker entry point (module-level so process pools can pickle it).
    return process_case(*args)


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer. A pool's workers outlive a parent killed with ``kill -9`` (they wait on
    its queue for ever, or go on writing to the cache), so each worker ends when its parent does:
    on Linux the kernel sends it SIGKILL (PR_SET_PDEATHSIG; workers are started by the thread that
    runs the pool, which lives as long as the pool); elsewhere a thread checks the parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before this worker could ask to follow it
        os._exit(1)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# --- the dataset -----------------------------------------------------------------------------
def preprocess_dataset(
    dataset: str | os.PathLike,
    cache: str | os.PathLike,
    workers: int = 1,
    options: Optional[PreprocessOptions] = None,
    fractions="75,15,10",
    seed: int = 0,
    progress: bool = True,
    on_result: Optional[Callable[[CaseResult], None]] = None,
) -> list[CaseResult]:
    """Process every case of ``dataset`` into ``cache`` with ``workers`` processes, then write
    the split (``splits.json``) over the successful cases and the report (``report.json``)."""
    options = options or PreprocessOptions()
    fractions = cache_format.parse_fractions(fractions)
    sources = discover_cases(dataset)
    if not sources:
        raise InputError(f"no cases found in {dataset} (expected category folders of case ZIPs, volumes or DICOM folders)")
    cache = Path(cache).expanduser()
    if Path(dataset).resolve() == cache.resolve() or Path(dataset).resolve() in cache.resolve().parents:
        raise InputError("the cache must not be inside the dataset folder: choose another --out")
    try:
        (cache / cache_format.CASES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(cache, exc) from None
    check_writable_folder(cache)
    with cache_format.cache_lock(cache):
        left = cache_format.remove_leftovers(cache)
        if left:
            log.warning("removed %d half-written folder(s) or file(s) left in %s by an interrupted run", len(left), cache)
        cache_format.write_json(cache / cache_format.CACHE_MANIFEST, {
            "format": cache_format.FORMAT_NAME, "format_version": cache_format.FORMAT_VERSION,
            "dataset": str(Path(dataset).resolve()), "options": asdict(options), "cases": len(sources),
        })

        from tqdm import tqdm

        jobs = [(s, str(cache), options) for s in sources]
        results: list[CaseResult] = []
        bar = tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress)
        try:
            if workers <= 1:
                iterator = map(_process_case_args, jobs)
                for r in iterator:
                    _collect(r, results, bar, on_result)
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor, as_completed

                # spawn: workers start clean (no inherited threads or locks from the parent).
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
                    futures = [pool.submit(_process_case_args, job) for job in jobs]
                    try:
                        for future in as_completed(futures):
                            _collect(future.result(), results, bar, on_result)
                    except KeyboardInterrupt:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
        finally:
            bar.close()
        results.sort(key=lambda r: r.key)

        usable = [{"key": r.key, "category": r.category, "patient": r.patient} for r in results if r.status in ("ok", "cached")]
        split = cache_format.make_split(usable, fractions, seed)
        cache_format.write_json(cache / cache_format.SPLITS_FILE, split)
        cache_format.write_json(cache / cache_format.REPORT_FILE, {"dataset": str(dataset), "cases": [asdict(r) for r in results]})
        return results


def _collect(result: CaseResult, results: list, bar, on_result) -> None:
    results.append(result)
    bar.update(1)
    if result.status == "failed":
        bar.write(f"{result.key}: failed: {result.reason}")
    if on_result is not None:
        on_result(result)


def summary_table(results: list[CaseResult]) -> str:
    """Plain-text table, one row per case, failures with their reason; totals at the end."""
    header = ["case", "status", "thick", "thin", "overlap (mm)", "MB", "time (s)", "reason"]
    rows = []
    for r in results:
        overlap = f"{r.overlap_mm[0]:.1f}..{r.overlap_mm[1]:.1f}" if r.overlap_mm else "-"
        rows.append([r.key, r.status, str(r.thick_slices or "-"), str(r.thin_slices or "-"), overlap,
                     f"{r.bytes / 1e6:.1f}" if r.bytes else "-", f"{r.seconds:.2f}", r.reason])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "cached", "failed")}
    lines.append(f"{len(results)} cases: {counts['ok']} processed, {counts['cached']} already cached, {counts['failed']} failed")
    return "\n".join(lines)


def split_summary(cache: str | os.PathLike) -> str:
    data = json.loads((Path(cache) / cache_format.SPLITS_FILE).read_text())
    return ", ".join(f"{name} {len(data.get(name, []))}" for name in cache_format.SPLIT_NAMES)
