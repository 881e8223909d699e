"""The DICOM readers: one series (``read_dicom``) or both series of a dataset case (``read_case``)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from ...core.errors import InputError
from ...core.volume import Volume
from .geometry import series_geometry
from .messages import pydicom_messages_to_debug
from .pixels import check_declared_sizes, check_pixel_kind, detilt_stack, drop_identical_copies, stack_hu, transfer_syntax
from .scan import Slice, check_modality, choose_series, scan, scan_member
from .sources import Member, directory_members, folder_members, is_directory_file, members_of

# Patient / study / frame-of-reference tags carried over to a derived series (write-back to PACS).
CARRIED_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "PatientPosition", "OtherPatientIDs", "PatientComments", "EthnicGroup",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "InstitutionName",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "BodyPartExamined", "Laterality",
    "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel",
    "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "SliceThickness",
    "WindowCenter", "WindowWidth", "SpecificCharacterSet",
)


def _text(value) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return str(value)


def _metadata(chosen: list[Slice], series: str | None) -> dict[str, Any]:
    header = chosen[0].header
    tags = {key: _text(header.get(key)) for key in CARRIED_TAGS if key in header}
    if chosen[0].thickness and "SliceThickness" not in tags:
        tags["SliceThickness"] = f"{chosen[0].thickness:g}"  # an Enhanced CT keeps it in its pixel measures
    metadata: dict[str, Any] = {
        "source_format": "dicom",
        "dicom": tags,
        "series_instance_uid": tags.get("SeriesInstanceUID", ""),
        "series_description": tags.get("SeriesDescription", ""),
        "dicom_files": len({s.member.name for s in chosen}),
        "transfer_syntax": transfer_syntax(header),
    }
    if chosen[0].thickness and chosen[0].thickness > 0:
        metadata["slice_thickness"] = chosen[0].thickness
    if series:
        metadata["case_series"] = series
    return metadata


def _series_volume(chosen: list[Slice], source: str, series: str | None, detilt: bool = False) -> Volume:
    """Check, sort and decode one chosen series into a Volume in HU with its DICOM metadata."""
    check_modality(chosen, source)
    for s in chosen:
        check_pixel_kind(s)
    check_declared_sizes(chosen)  # before any pixel is inflated or read whole
    chosen = drop_identical_copies(chosen)
    chosen, geometry, tilt = series_geometry(chosen, source, detilt=detilt)
    array = stack_hu(chosen)
    metadata = _metadata(chosen, series)
    if tilt is not None:
        padding = float(array.min())  # what the scanner wrote outside its field of view (air or padding)
        array = detilt_stack(array, tilt, geometry, padding)
        metadata.update(gantry_tilt_degrees=tilt.degrees, detilt_padding_hu=padding)
    return Volume(array, geometry, metadata)


def read_dicom(path: str | os.PathLike, series: str | None = None, series_uid: str | None = None,
               detilt: bool = False) -> Volume:
    """Read one DICOM CT series as a Volume in HU (LPS geometry).

    ``path``: a folder (searched recursively), one file of a series (its folder is read and the file's
    series kept), a DICOMDIR (the files it lists), or a ZIP (read in memory, never extracted).
    ``series``: "thick" or "thin" for the case layout; ``series_uid`` picks a series among several;
    ``detilt``: resample a gantry-tilted series onto an orthogonal grid instead of refusing it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input not found: {p}")
    with pydicom_messages_to_debug():
        if p.is_dir() or p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
            with members_of(p) as (members, kind):
                return _read_series(members, kind, p, series, series_uid, detilt)
        if is_directory_file(p):
            return _read_series(directory_members(p), "DICOM directory", p, series, series_uid, detilt)
        # One file of a series: read its folder and keep the file's series.
        single = scan_member(Member(p.name, lambda: open(p, "rb"), str(p), p.stat().st_size))
        if not single:
            raise InputError(f"{p} is not a DICOM image")
        return _read_series(folder_members(p.parent, recursive=False), "folder", p, series,
                            series_uid or single[0].series_uid, detilt)


def _read_series(members: list[Member], kind: str, p: Path, series: str | None, series_uid: str | None,
                 detilt: bool) -> Volume:
    slices = scan(members)
    if not slices:
        raise InputError(f"no DICOM images found in the {kind} {p} ({len(members)} files looked at)")
    chosen = choose_series(slices, str(p), series, series_uid)
    return _series_volume(chosen, str(p), series, detilt)


def read_case(path: str | os.PathLike) -> tuple[Volume, Volume]:
    """Both series of one case in the dataset's layout (``case_X/1`` thick, ``case_X/2`` thin),
    from a ZIP or a folder, as (thick, thin) Volumes in HU.

    The same result as ``read_dicom(path, series="thick")`` and ``series="thin"``, but every file
    is read (inflated) once, headers and pixels from the same bytes, in parallel threads."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input not found: {p}")
    with pydicom_messages_to_debug(), members_of(p) as (members, kind):
        slices = scan(members, keep_data=True)
        if not slices:
            raise InputError(f"no DICOM images found in the {kind} {p} ({len(members)} files looked at)")
        thick = _series_volume(choose_series(slices, str(p), "thick", None), str(p), "thick")
        thin = _series_volume(choose_series(slices, str(p), "thin", None), str(p), "thin")
    return thick, thin
