"""The training cache: one folder per case, raw int16 HU arrays that open memory-mapped.

Layout of a cache (written by ``ctsliceinterp preprocess``)::

    CACHE/
        cache.json                        format name/version, dataset, options of the last run
        cases/<category>/<case_id>/       one case (written atomically: a folder rename)
            thick.npy                     int16 HU (z, y, x), the acquired (or simulated) thick slices
            thin.npy                      int16 HU (z, y, x), the thin slices over the same z range
            case.json                     geometry of both (LPS), slice thickness, overlap, source...
        splits.json                       patient-level train/val/test lists of case keys
        report.json                       the last run's per-case status (ok / failed + reason)
        .lock                             held by the run writing the cache (one run at a time)

Arrays are plain ``.npy`` (no compression) so ``np.load(mmap_mode="r")`` reads a random crop
without touching the rest of the volume. Intensities stay in HU: a window is applied at load
time, so a different window needs no re-run. A case key is ``<category>/<case_id>``.

A case counts as finished only when its manifest is there and each array's header and length match
the manifest's geometry (a truncated copy is not taken for a finished case).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ..core.errors import CTSliceInterpError
from ..io.atomic import atomic_directory, atomic_file
from ..core.volume import Geometry, Volume

FORMAT_NAME = "ctsliceinterp-cache"
FORMAT_VERSION = 1
CASES_DIR = "cases"
CASE_MANIFEST = "case.json"
CACHE_MANIFEST = "cache.json"
SPLITS_FILE = "splits.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"
SPLIT_NAMES = ("train", "val", "test")
INT16_RANGE = (-32768, 32767)


class CacheError(CTSliceInterpError):
    """A cache folder or case is missing, incomplete or of another format version."""


def to_int16_hu(array: np.ndarray, what: str) -> tuple[np.ndarray, float]:
    """HU as int16. Fractional HU (slab means, resampled volumes) are rounded (error <= 0.5 HU,
    returned); values outside the int16 range are an error, never clipped."""
    if array.dtype == np.int16:
        return array, 0.0
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CacheError(f"the {what} volume holds NaN or infinite values")
    if low < INT16_RANGE[0] - 0.5 or high > INT16_RANGE[1] + 0.5:
        raise CacheError(f"the {what} volume spans {low:g}..{high:g}, outside the int16 HU range: not a CT in HU?")
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int16), 0.0
    rounded = np.rint(values).astype(np.int16)
    error = float(np.max(np.abs(rounded.astype(np.float32) - values.astype(np.float32)))) if values.size else 0.0
    return rounded, error


def case_key(category: str, case_id: str) -> str:
    return f"{category}/{case_id}"


def case_folder(cache: str | os.PathLike, category: str, case_id: str) -> Path:
    return Path(cache) / CASES_DIR / category / case_id


def write_case(folder: str | os.PathLike, thick: Volume, thin: Volume, info: dict[str, Any]) -> Path:
    """Write one case atomically (a temporary folder renamed into place, manifest last).

    ``info`` carries the metadata: category, case_id, overlap, source... (JSON-serialisable)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    thick_array, thick_rounding = to_int16_hu(thick.array, "thick")
    thin_array, thin_rounding = to_int16_hu(thin.array, "thin")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **info,
        "thick": {"geometry": thick.geometry.to_dict(), "slice_thickness_mm": thick.slice_thickness,
                  "rounding_error_hu": thick_rounding},
        "thin": {"geometry": thin.geometry.to_dict(), "slice_thickness_mm": thin.slice_thickness,
                 "rounding_error_hu": thin_rounding},
        "dtype": "int16",
        "units": "HU",
    }
    with atomic_directory(folder) as tmp:
        np.save(tmp / "thick.npy", np.ascontiguousarray(thick_array))
        np.save(tmp / "thin.npy", np.ascontiguousarray(thin_array))
        (tmp / CASE_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def case_problem(folder: str | os.PathLike) -> Optional[str]:
    """Why ``folder`` is not a finished, intact case, or None when it is: no manifest (unfinished),
    another format version, or an array whose header or length does not match the manifest."""
    try:
        manifest = _read_manifest(Path(folder))
    except CacheError as exc:
        return str(exc)
    return _arrays_problem(Path(folder), manifest)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / CASE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{folder} is not a cached case ({CASE_MANIFEST} missing: unfinished?)") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {exc}") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} case; re-run ctsliceinterp preprocess")
    return manifest


def _arrays_problem(folder: Path, manifest: dict[str, Any]) -> Optional[str]:
    for which in ("thick", "thin"):
        problem = _array_problem(folder / f"{which}.npy", tuple(manifest[which]["geometry"]["shape"]))
        if problem:
            return problem
    return None


def _array_problem(path: Path, shape: tuple[int, ...]) -> Optional[str]:
    """The .npy header must say int16 of the manifest's shape, and the file hold exactly that many bytes."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            stored_shape, fortran, dtype = read_header(f)
            data_start = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as exc:
        return f"{path.name} is not a readable .npy array ({exc})"
    if tuple(stored_shape) != shape or dtype != np.int16 or fortran:
        return f"{path.name} holds {dtype} {tuple(stored_shape)}, the manifest says int16 {shape}"
    expected = data_start + math.prod(shape) * 2
    if size != expected:
        return f"{path.name} is {'truncated' if size < expected else 'too long'}: {size} bytes instead of {expected}"
    return None


def is_complete(folder: str | os.PathLike) -> bool:
    """A finished, intact case (see ``case_problem``)."""
    return case_problem(folder) is None


@contextlib.contextmanager
def cache_lock(cache: str | os.PathLike) -> Iterator[None]:
    """Held while a run writes the cache: a second run would have its half-written cases removed as
    leftovers. The lock goes with the process, also when it is killed."""
    import fcntl

    path = Path(cache) / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another ctsliceinterp preprocess is writing {cache}: wait for it to end or choose another --out") from None
        yield


def remove_leftovers(cache: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted run left half-written: the temporary case folders of the atomic
    writes (``cases/<category>/.<case_id>.*.partial`` and ``.old``) and temporary files of the cache's
    JSON files. Call it holding ``cache_lock``. Returns what was removed."""
    cache = Path(cache)
    leftovers = [p for p in cache.glob(".*.partial*") if p.is_file()]
    for category in (p for p in (cache / CASES_DIR).glob("*") if p.is_dir() and not p.name.startswith(".")):
        leftovers += [p for p in category.glob(".*") if p.is_dir() and p.name.endswith((".partial", ".old"))]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


@dataclass
class CachedCase:
    """One case of the cache. ``thick``/``thin`` are Volumes over memory-mapped int16 arrays."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "CachedCase":
        folder = Path(folder)
        manifest = _read_manifest(folder)
        problem = _arrays_problem(folder, manifest)
        if problem:
            raise CacheError(f"the cached case {folder} is damaged ({problem}): re-run ctsliceinterp preprocess")
        return cls(folder, manifest)

    @property
    def key(self) -> str:
        return case_key(self.category, self.case_id)

    @property
    def category(self) -> str:
        return str(self.manifest["category"])

    @property
    def case_id(self) -> str:
        return str(self.manifest["case_id"])

    def array(self, which: str, mmap: bool = True) -> np.ndarray:
        if which not in ("thick", "thin"):
            raise ValueError(which)
        return np.load(self.folder / f"{which}.npy", mmap_mode="r" if mmap else None)

    def geometry(self, which: str) -> Geometry:
        return Geometry.from_dict(self.manifest[which]["geometry"], f"the cached {which} geometry")

    def volume(self, which: str, mmap: bool = True) -> Volume:
        meta = {"slice_thickness": self.manifest[which]["slice_thickness_mm"], "case": self.key}
        return Volume(self.array(which, mmap), self.geometry(which), meta)

    @property
    def thick(self) -> Volume:
        return self.volume("thick")

    @property
    def thin(self) -> Volume:
        return self.volume("thin")


def iter_cases(cache: str | os.PathLike) -> Iterator[CachedCase]:
    """Every finished case of a cache, sorted by key (temporary folders are skipped; a damaged case
    raises ``CacheError``)."""
    root = Path(cache) / CASES_DIR
    if not root.is_dir():
        raise CacheError(f"{cache} is not a training cache ({CASES_DIR}/ missing): run ctsliceinterp preprocess first")
    for category in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in sorted(p for p in category.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (folder / CASE_MANIFEST).exists():
                yield CachedCase.open(folder)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return path


# --- split ----------------------------------------------------------------------------------
def parse_fractions(text: str | Iterable[float]) -> tuple[float, float, float]:
    """"75,15,10" (percent or fractions) -> (0.75, 0.15, 0.10)."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise CacheError(f"the split must be three non-negative numbers train,val,test (e.g. 75,15,10), got {text!r}")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def make_split(cases: Iterable[dict[str, str]], fractions=(0.75, 0.15, 0.10), seed: int = 0) -> dict[str, Any]:
    """Patient-level split, stratified by category and deterministic for a seed.

    ``cases``: dicts with ``key``, ``category`` and ``patient`` (cases of one patient always land
    in the same split). Within each category, patients are sorted, shuffled with a generator
    seeded by (seed, category), and cut by the fractions (largest remainders); so the split does
    not depend on the order the cases were processed in."""
    import hashlib
    import random

    fractions = parse_fractions(fractions)
    by_category: dict[str, dict[str, list[str]]] = {}
    for case in cases:
        by_category.setdefault(case["category"], {}).setdefault(case["patient"], []).append(case["key"])
    split: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for category in sorted(by_category):
        patients = sorted(by_category[category])
        digest = hashlib.sha256(f"{seed}:{category}".encode()).hexdigest()
        random.Random(int(digest[:16], 16)).shuffle(patients)
        counts = _largest_remainder(len(patients), fractions)
        start = 0
        for name, count in zip(SPLIT_NAMES, counts):
            for patient in patients[start : start + count]:
                split[name].extend(sorted(by_category[category][patient]))
            start += count
    return {"seed": seed, "fractions": dict(zip(SPLIT_NAMES, fractions)), "level": "patient",
            "stratified_by": "category", **{name: sorted(keys) for name, keys in split.items()}}


def _largest_remainder(n: int, fractions) -> list[int]:
    raw = [n * f for f in fractions]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def read_split(cache: str | os.PathLike, split: str) -> list[str]:
    if split not in SPLIT_NAMES and split != "all":
        raise CacheError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)} or all")
    if split == "all":
        return [case.key for case in iter_cases(cache)]
    path = Path(cache) / SPLITS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: run ctsliceinterp preprocess on the dataset first") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {exc}") from None
    return list(data.get(split, []))


def open_split(cache: str | os.PathLike, split: str) -> list[CachedCase]:
    cases = []
    for key in read_split(cache, split):
        category, _, case_id = key.partition("/")
        folder = case_folder(cache, category, case_id)
        cases.append(CachedCase.open(folder))
    return cases

