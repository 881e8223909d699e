"""Readers and writers. Each converts between a file format and ``Volume`` and does nothing else.

- ``read_volume(path)``: NRRD, NIfTI, MHA/MHD, a DICOM series folder, a ZIP of DICOM (including
  the dataset's case layout ``case_X/1`` thick / ``case_X/2`` thin, chosen with ``series``).
- ``write_volume(volume, path)``: NRRD, NIfTI, MHA by suffix; a path without a suffix (or ending
  in ``/``) becomes a DICOM series folder. Every write is atomic and never replaces an input.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import InputError, OutputError
from ..core.volume import Volume
from .atomic import atomic_directory, atomic_file, atomic_header_and_data, check_output_path
from .itk import ITK_SUFFIXES, read_itk, write_itk


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(ITK_SUFFIXES + (".zip", ".dcm"), key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    """DICOM files often have no extension (IM0001, 1.2.840...): look for the DICM marker."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_volume(path: str | os.PathLike, series: str | None = None, series_uid: str | None = None,
                detilt: bool = False) -> Volume:
    """Read a CT volume in HU with its geometry (LPS). See the module docstring for formats.

    ``series``: "thick" or "thin" for the case layout; ``series_uid`` picks one series when a
    folder or ZIP holds several; ``detilt``: resample a gantry-tilted DICOM series (else refused)."""
    from .validate import validate_ct

    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input not found: {p}")
    suffix = _suffix(p)
    if p.is_dir() or suffix in (".zip", ".dcm") or (suffix not in ITK_SUFFIXES and _is_dicom_file(p)):
        from .dicom import read_dicom  # pydicom is imported only when DICOM is read

        volume = read_dicom(p, series=series, series_uid=series_uid, detilt=detilt)
    elif suffix in ITK_SUFFIXES:
        if series or series_uid or detilt:
            raise InputError("--series, --series-uid and --detilt apply to DICOM input only")
        volume = read_itk(str(p))
    else:
        raise InputError(
            f"unsupported input {p.name}: use NRRD, NIfTI (.nii/.nii.gz), MHA/MHD, a DICOM folder or a ZIP of DICOM"
        )
    validate_ct(volume, source=str(p))
    return volume.replace(source_path=str(p))


def is_dicom_output(path: str | os.PathLike) -> bool:
    p = Path(path)
    return str(path).endswith(("/", os.sep)) or (p.is_dir()) or _suffix(p) == ""


def write_volume(volume: Volume, path: str | os.PathLike, inputs=()) -> Path:
    """Write ``volume`` atomically. ``inputs`` are paths that must never be overwritten."""
    out = check_output_path(str(path).rstrip("/") or str(path), inputs)
    if is_dicom_output(path):
        from .dicom import is_ctsliceinterp_series, write_dicom_series

        if out.exists() and any(out.iterdir()) and not is_ctsliceinterp_series(out):
            raise OutputError(f"the output folder {out} exists and is not empty: choose a new folder for the DICOM series")
        with atomic_directory(out) as tmp:
            write_dicom_series(volume, tmp)
        return out
    suffix = _suffix(out)
    if suffix not in ITK_SUFFIXES:
        raise OutputError(f"unsupported output {out.name}: use .nrrd, .nii, .nii.gz, .mha, or a folder for DICOM")
    writer = atomic_header_and_data if suffix in (".mhd", ".nhdr") else atomic_file
    with writer(out) as tmp:
        write_itk(volume, str(tmp))
    return out


__all__ = ["read_volume", "write_volume", "atomic_file", "atomic_directory", "check_output_path"]
