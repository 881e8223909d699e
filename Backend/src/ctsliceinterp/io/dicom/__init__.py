"""DICOM adapter: a series folder, one file of a series, or a ZIP (the dataset's case layout
``case_X/1`` thick / ``case_X/2`` thin included) <-> ``Volume``; and a DICOM series writer.

Reading rules (see docs/io.md):
- headers are scanned with pydicom (``stop_before_pixels``); uncompressed little-endian pixels
  are read straight from the file's bytes with numpy (as pydicom would, unused high bits
  included); other transfer syntaxes are decoded by pydicom, with pylibjpeg for compressed ones
  (JPEG Lossless, JPEG-LS, JPEG 2000...);
- slices are ordered by ImagePositionPatient projected on the slice normal (the cross product
  of the ImageOrientationPatient rows), never by file name or InstanceNumber;
- RescaleSlope/Intercept are applied per slice (HU out); int16 when the HU fit, else float32;
- non-uniform spacing, a missing slice, duplicate positions, gantry tilt, mixed sizes or
  orientations are errors that name the problem; nothing is resampled behind the user's back.

The geometry is LPS (as DICOM): direction columns = row direction, column direction, normal;
origin = ImagePositionPatient of the first slice after sorting.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import mmap
import os
import struct
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

import numpy as np

from ...core.errors import GeometryError, InputError, OutputError
from ...core.volume import Geometry, Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CASE_SERIES_FOLDERS = {"thick": "1", "thin": "2"}

# Patient / study / frame-of-reference tags carried over to a derived series (write-back to PACS).
CARRIED_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "PatientPosition", "OtherPatientIDs", "PatientComments", "EthnicGroup",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "InstitutionName",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "BodyPartExamined",
    "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel",
    "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "SliceThickness",
    "WindowCenter", "WindowWidth", "SpecificCharacterSet",
)

# Relative tolerances on slice positions (IPP is often written with 2 decimals).
POSITION_TOLERANCE_MM = 0.02
SPACING_RELATIVE_TOLERANCE = 0.01
# In-plane drift of the slice origins, as a fraction of the pixel size, that still counts as no tilt.
TILT_TOLERANCE_PIXELS = 0.1

SCAN_THREADS = 4
# Uncompressed little-endian transfer syntaxes: pixels are read with numpy, no decoder needed.
NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
# A file of these modalities without Rows/Columns is a broken image, not a report or a DICOMDIR.
IMAGE_MODALITIES = {"CT", "MR", "PT", "NM", "CR", "DX", "XA", "RF", "US", "OT", "MG"}


# ---------------------------------------------------------------------------------------------
# Where the files are: a folder or a ZIP, both seen as named members that can be opened.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Member:
    name: str  # relative POSIX path inside the folder or ZIP (what the user sees in errors)
    opener: Callable[[], Any]  # returns a binary file object
    display: str  # full name for messages
    reader: Callable[[], bytes] | None = None  # the whole file at once, when faster than opener().read()


def _member_bytes(member: _Member) -> bytes:
    if member.reader is not None:
        return member.reader()
    with member.opener() as f:
        return f.read()


def _folder_members(folder: Path, recursive: bool = True) -> list[_Member]:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    members = []
    for p in sorted(paths):
        rel = p.relative_to(folder).as_posix()
        # Hidden files and folders (.DS_Store, a crashed write's .partial folder) are not the series.
        if p.is_file() and not any(part.startswith(".") for part in PurePosixPath(rel).parts):
            members.append(_Member(rel, lambda p=p: open(p, "rb"), str(p)))
    return members


def _zip_members(archive: zipfile.ZipFile, zip_path: Path, raw: mmap.mmap | None = None) -> list[_Member]:
    """``raw``: the ZIP file memory-mapped; whole members are then inflated in one call from it
    (``_inflate_member``) instead of through zipfile's streams."""
    members = []
    for info in archive.infolist():
        name = info.filename
        hidden = any(part.startswith(".") for part in PurePosixPath(name).parts)
        if info.is_dir() or name.startswith("__MACOSX/") or hidden:
            continue
        # ZipExtFile streams are seekable; pydicom reads headers without inflating the pixels.
        opener = lambda info=info: archive.open(info)  # noqa: E731
        reader = None
        if raw is not None:
            reader = lambda info=info, opener=opener: _inflate_member(raw, info, opener)  # noqa: E731
        members.append(_Member(name, opener, f"{zip_path}:{name}", reader))
    return members


def _inflate():
    """The fastest raw-deflate decoder at hand: ISA-L (``isal``, 2-3x zlib) when installed, else
    zlib. Both release the GIL, so members inflate in parallel threads."""
    try:
        from isal import isal_zlib

        return isal_zlib.decompress, isal_zlib.crc32
    except ImportError:
        return zlib.decompress, zlib.crc32


def _inflate_member(raw: mmap.mmap, info: zipfile.ZipInfo, opener: Callable[[], Any]) -> bytes:
    """One ZIP member, inflated in one call from the memory-mapped archive and checked against
    its CRC-32. Anything but a plain stored or deflated member (encrypted, bzip2, LZMA, an odd
    local header) goes through zipfile instead."""
    offset = info.header_offset
    header = raw[offset : offset + 30]
    plain = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not info.flag_bits & 0x1
    if not plain or len(header) < 30 or header[:4] != b"PK\x03\x04":
        with opener() as f:
            return f.read()
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = offset + 30 + name_length + extra_length
    compressed = raw[start : start + info.compress_size]
    decompress, crc32 = _inflate()
    try:
        data = compressed if info.compress_type == zipfile.ZIP_STORED else decompress(compressed, -15, max(info.file_size, 1))
    except Exception as exc:  # noqa: BLE001 - zlib.error / isal error: a damaged member
        raise zipfile.BadZipFile(f"cannot inflate {info.filename}: {exc}") from None
    if len(data) != info.file_size or crc32(data) & 0xFFFFFFFF != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 or size for {info.filename}: the ZIP is corrupted")
    return data


# ---------------------------------------------------------------------------------------------
# Header scan
# ---------------------------------------------------------------------------------------------
@dataclass
class _Slice:
    member: _Member
    header: Any  # pydicom Dataset without pixel data
    series_uid: str
    sop_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    frames: int
    data: bytes | None = None  # the whole file, when the scan read it (``read_case``)
    pixel_offset: int | None = None  # where the PixelData element starts in ``data``


def _looks_like_dicom(member: _Member) -> bool:
    with member.opener() as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _scan_member(member: _Member, keep_data: bool = False) -> _Slice | None:
    """Parse one header. Returns None for files that are not DICOM images (README, DICOMDIR,
    reports); raises InputError for a file that claims to be DICOM but cannot be read.

    ``keep_data``: read the whole file once and keep it, so the pixels need no second read."""
    import pydicom

    data = pixel_offset = None
    if keep_data:
        try:
            data = _member_bytes(member)
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as exc:
            # RuntimeError: an encrypted member; NotImplementedError: an unsupported compression.
            raise InputError(f"cannot read {member.display}: {_short(exc)} (corrupted ZIP or file?)") from None
        claims_dicom = member.name.lower().endswith((".dcm", ".dicom")) or data[128:132] == b"DICM"
    else:
        claims_dicom = member.name.lower().endswith((".dcm", ".dicom")) or _looks_like_dicom(member)
    try:
        if data is not None:
            stream = io.BytesIO(data)
            ds = pydicom.dcmread(stream, stop_before_pixels=True, force=not claims_dicom)
            # pydicom stops with the stream at the start of the PixelData element.
            if data[stream.tell() : stream.tell() + 4] == PIXEL_DATA_TAG:
                pixel_offset = stream.tell()
        else:
            with member.opener() as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=not claims_dicom)
                pixel_offset = f.tell()  # checked against the bytes when the pixels are read
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        rows, columns = ds.get("Rows"), ds.get("Columns")
    except Exception as exc:  # noqa: BLE001 - a parser failure of any kind means "not readable"
        if claims_dicom:
            raise InputError(f"cannot read DICOM file {member.display}: {_short(exc)} (corrupted or truncated?)") from None
        return None
    if rows is None or columns is None:
        looks_like_image = "PixelData" in ds or "ImagePositionPatient" in ds or str(ds.get("Modality", "")) in IMAGE_MODALITIES
        if claims_dicom and (looks_like_image or not ds.get("SOPClassUID")):
            raise InputError(f"DICOM file {member.display} has no Rows/Columns: corrupted or truncated")
        return None  # DICOMDIR, structured report, presentation state...: not an image slice
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return _Slice(
        member=member,
        header=ds,
        series_uid=series_uid,
        sop_uid=sop_uid,
        rows=int(rows),
        columns=int(columns),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=spacing,
        frames=frames,
        data=data,
        pixel_offset=pixel_offset,
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _scan(members: list[_Member], keep_data: bool = False) -> list[_Slice]:
    if len(members) > 8:
        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            found = list(pool.map(lambda m: _scan_member(m, keep_data), members))
    else:
        found = [_scan_member(m, keep_data) for m in members]
    return [s for s in found if s is not None]


# ---------------------------------------------------------------------------------------------
# Choosing the series
# ---------------------------------------------------------------------------------------------
def _case_roots(slices: list[_Slice]) -> dict[str, dict[str, list[_Slice]]] | None:
    """``{case_root: {"1": [...], "2": [...]}}`` when every image sits in a folder named 1 or 2
    (the dataset's case layout), else None."""
    roots: dict[str, dict[str, list[_Slice]]] = {}
    for s in slices:
        parts = PurePosixPath(s.member.name).parts
        if len(parts) < 2 or parts[-2] not in ("1", "2"):
            return None
        root = "/".join(parts[:-2]) or "."
        roots.setdefault(root, {}).setdefault(parts[-2], []).append(s)
    return roots or None


def _spacing_summary(group: list[_Slice]) -> str:
    usable = [s for s in group if s.position and s.orientation]
    if len(usable) < 2:
        return "1 slice" if len(group) == 1 else "spacing unknown"
    normal = _normal(usable[0].orientation)
    positions = np.sort([np.dot(normal, s.position) for s in usable])
    steps = np.diff(positions)
    return f"slice spacing {np.median(steps):.3g} mm"


def _describe_series(uid: str, group: list[_Slice]) -> str:
    header = group[0].header
    description = str(header.get("SeriesDescription", "") or "").strip() or "(no description)"
    number = header.get("SeriesNumber", "")
    return f"  {uid}  #{number} '{description}'  {len(group)} files, {_spacing_summary(group)}"


def _by_series(slices: list[_Slice]) -> dict[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return groups


def _choose_series(slices: list[_Slice], source: str, series: str | None, series_uid: str | None) -> list[_Slice]:
    if series_uid:
        groups = _by_series(slices)
        if series_uid not in groups:
            listing = "\n".join(_describe_series(uid, g) for uid, g in groups.items())
            raise InputError(f"no series with SeriesInstanceUID {series_uid} in {source}; it holds:\n{listing}")
        return groups[series_uid]
    cases = _case_roots(slices)
    if series is not None:
        if series not in CASE_SERIES_FOLDERS:
            raise InputError(f"--series must be 'thick' or 'thin', got {series!r}")
        if cases is None:
            raise InputError(
                f"--series {series} applies to the case layout (case_X/1 thick, case_X/2 thin) and {source} "
                "is not one: leave --series out, or pick a series with --series-uid"
            )
        if len(cases) > 1:
            raise InputError(
                f"{source} holds {len(cases)} cases ({', '.join(sorted(cases))}): pass one case folder"
            )
        root, folders = next(iter(cases.items()))
        folder = CASE_SERIES_FOLDERS[series]
        if folder not in folders:
            raise InputError(f"{source} has no {series} series: the folder {root}/{folder} holds no DICOM images")
        slices = folders[folder]
    elif cases is not None:
        listing = ", ".join(f"{root}/{k} ({len(v)} files)" for root, f in sorted(cases.items()) for k, v in sorted(f.items()))
        raise InputError(
            f"{source} is a case layout with a thick (case_X/1) and a thin (case_X/2) series: "
            f"pass --series thick or --series thin [{listing}]"
        )
    groups = _by_series(slices)
    if len(groups) > 1:
        listing = "\n".join(_describe_series(uid, g) for uid, g in sorted(groups.items(), key=lambda kv: -len(kv[1])))
        raise InputError(f"{source} holds {len(groups)} series (mixed series); choose one with --series-uid UID:\n{listing}")
    return slices


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def _series_geometry(slices: list[_Slice], source: str) -> tuple[list[_Slice], Geometry]:
    """Sort the slices along the normal and check that they form one regular grid."""
    first = slices[0]
    for s in slices:
        if s.position is None or s.orientation is None:
            raise InputError(
                f"{s.member.display} has no ImagePositionPatient/ImageOrientationPatient: "
                "not a CT slice with geometry (secondary capture or scout?)"
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(
                f"mixed image sizes in one series of {source}: {first.member.name} is "
                f"{first.columns}x{first.rows}, {s.member.name} is {s.columns}x{s.rows}"
            )
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise GeometryError(
                f"mixed orientations in one series of {source}: {first.member.name} has "
                f"ImageOrientationPatient {list(first.orientation)}, {s.member.name} has {list(s.orientation)}"
            )
        if s.pixel_spacing is None or s.pixel_spacing != first.pixel_spacing:
            raise GeometryError(
                f"missing or mixed PixelSpacing in one series of {source} ({first.member.name}: "
                f"{first.pixel_spacing}, {s.member.name}: {s.pixel_spacing})"
            )
    row = np.asarray(first.orientation[:3], float)
    col = np.asarray(first.orientation[3:], float)
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(np.dot(row, col)) > 1e-3:
        raise GeometryError(f"ImageOrientationPatient {list(first.orientation)} in {source} is not two orthonormal vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    # Same SOP instance twice (a copied file) is harmless; keep one.
    unique: dict[str, _Slice] = {}
    for s in slices:
        unique.setdefault(s.sop_uid or s.member.name, s)
    slices = sorted(unique.values(), key=lambda s: float(np.dot(normal, s.position)))
    if len(slices) < 2:
        raise InputError(
            f"{source} holds a single slice ({first.columns}x{first.rows}): a 2-D image; a 3-D CT series is needed"
        )
    positions = np.array([np.dot(normal, s.position) for s in slices])
    steps = np.diff(positions)
    duplicates = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    if duplicates.size:
        k = int(duplicates[0])
        raise GeometryError(
            f"duplicate slice position {positions[k]:.2f} mm in {source}: {slices[k].member.name} and "
            f"{slices[k + 1].member.name} (two acquisitions mixed in one series?)"
        )
    spacing = float(np.median(steps))
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * spacing)
    bad = np.flatnonzero(np.abs(steps - spacing) > tolerance)
    if bad.size:
        k = int(bad[0])
        ratio = steps[k] / spacing
        if abs(ratio - round(ratio)) * spacing <= tolerance and round(ratio) >= 2:
            raise GeometryError(
                f"missing slice in {source}: a gap of {steps[k]:.3g} mm between positions {positions[k]:.2f} "
                f"and {positions[k + 1]:.2f} mm ({slices[k].member.name}, {slices[k + 1].member.name}) "
                f"where the spacing is {spacing:.3g} mm ({int(round(ratio)) - 1} slice(s) missing)"
            )
        raise GeometryError(
            f"non-uniform slice spacing in {source}: steps from {steps.min():.3g} to {steps.max():.3g} mm "
            f"(median {spacing:.3g} mm; first irregular step between {slices[k].member.name} and "
            f"{slices[k + 1].member.name}); resample to a uniform spacing first"
        )
    # Gantry tilt: the slice origins move within the slice plane as the position advances.
    origins = np.array([s.position for s in slices], float)
    offsets = origins - origins[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    pixel = min(first.pixel_spacing)
    if drift > max(POSITION_TOLERANCE_MM, TILT_TOLERANCE_PIXELS * pixel):
        span = positions[-1] - positions[0]
        angle = np.degrees(np.arctan2(drift, span))
        raise GeometryError(
            f"gantry tilt in {source}: the slices shift {drift:.2f} mm within their plane over {span:.1f} mm "
            f"(about {angle:.1f} degrees; GantryDetectorTilt {first.header.get('GantryDetectorTilt', 'not given')}); "
            "the slice grid is sheared and cannot be interpolated as is: de-tilt (resample) the series first"
        )
    spacing = float((positions[-1] - positions[0]) / (len(positions) - 1))
    row_spacing, column_spacing = first.pixel_spacing  # DICOM: between rows (y), between columns (x)
    geometry = Geometry(
        shape=(len(slices), first.rows, first.columns),
        spacing=(column_spacing, row_spacing, spacing),
        origin=tuple(origins[0]),
        direction=tuple(np.column_stack([row, col, normal]).ravel()),
    )
    return slices, geometry


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------
def _check_pixel_kind(s: _Slice) -> None:
    ds = s.header
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise InputError(
            f"{s.member.display} is a colour image ({photometric}, {samples} samples per pixel): "
            "a greyscale CT in HU is needed"
        )
    if s.frames > 1:
        raise InputError(
            f"{s.member.display} is a multi-frame image ({s.frames} frames): export the series as "
            "single-frame (classic) CT images"
        )


def _native_pixels(s: _Slice, data: bytes, offset: int | None) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian 16-bit slice, read from the file's bytes with
    numpy (a view, no copy), or None when this file needs pydicom's decoders. Unused high bits
    are corrected as pydicom does (masked when unsigned, sign-extended when signed)."""
    ds = s.header
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if offset is None or syntax not in NATIVE_LITTLE_ENDIAN or int(ds.get("BitsAllocated", 0) or 0) != 16:
        return None
    if data[offset : offset + 4] != PIXEL_DATA_TAG:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    if syntax == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        (length,), start = struct.unpack("<I", data[offset + 4 : offset + 8]), offset + 8
    elif data[offset + 4 : offset + 6] in (b"OW", b"OB"):  # explicit VR: tag, VR, 2 reserved, length
        (length,), start = struct.unpack("<I", data[offset + 8 : offset + 12]), offset + 12
    else:
        return None
    count = s.rows * s.columns
    if length != 2 * count or start + length > len(data) or not 1 <= bits_stored <= 16:
        return None  # undefined length (encapsulated) or a size pydicom should judge
    pixels = np.frombuffer(data, "<i2" if signed else "<u2", count, start).reshape(s.rows, s.columns)
    if bits_stored < 16:
        shift = 16 - bits_stored
        if signed and (pixels.min() < -(1 << (bits_stored - 1)) or pixels.max() >= 1 << (bits_stored - 1)):
            pixels = (pixels << shift) >> shift
        elif not signed and pixels.max() >= 1 << bits_stored:
            pixels = pixels & np.uint16((1 << bits_stored) - 1)
    return pixels


def _read_slice_pixels(s: _Slice) -> tuple[np.ndarray, float, float]:
    import pydicom

    try:
        if s.data is not None:
            data, offset = s.data, s.pixel_offset
        else:
            data = _member_bytes(s.member)  # one read: ZIP inflation runs outside the GIL, in parallel
            offset = s.pixel_offset
        pixels = _native_pixels(s, data, offset)
        ds = s.header
        if pixels is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupted file for the user
        raise InputError(f"cannot decode the pixels of {s.member.display}: {_short(exc)} (corrupted or unsupported compression?)") from None
    if pixels.shape != (s.rows, s.columns):
        raise InputError(f"{s.member.display}: pixel data of shape {pixels.shape} does not match Rows x Columns {s.rows}x{s.columns}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels, slope, intercept


def _read_slice_range(s: _Slice) -> tuple[np.ndarray, float, float, float, float]:
    """Pixels, slope, intercept and the slice's HU range."""
    pixels, slope, intercept = _read_slice_pixels(s)
    lo, hi = float(pixels.min()), float(pixels.max())
    if slope < 0:
        lo, hi = hi, lo
    return pixels, slope, intercept, lo * slope + intercept, hi * slope + intercept


def _stack_hu(slices: list[_Slice]) -> np.ndarray:
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        decoded = list(pool.map(_read_slice_range, slices))
    slopes = np.array([d[1] for d in decoded])
    intercepts = np.array([d[2] for d in decoded])
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    low = min(d[3] for d in decoded)
    high = max(d[4] for d in decoded)
    if integral and -32768 <= low and high <= 32767:
        dtype = np.int16
    elif integral and -(2**31) <= low and high < 2**31:
        dtype = np.int32
    else:
        dtype = np.float32  # non-integer slope or intercept: keep the fractions
    out = np.empty((len(decoded),) + decoded[0][0].shape, dtype=dtype)

    def convert(k: int) -> None:
        pixels, slope, intercept = decoded[k][:3]
        if dtype == np.float32:
            out[k] = pixels.astype(np.float64) * slope + intercept
        elif slope == 1 and pixels.dtype.itemsize <= 2:
            # The common CT case, in one pass: 16-bit storage + intercept, computed in int32
            # (exact) and stored in the output type, which the range above says holds it.
            np.add(pixels, np.int32(intercept), out=out[k], casting="unsafe")
        else:
            out[k] = pixels.astype(np.int64) * int(slope) + int(intercept)

    with ThreadPoolExecutor(SCAN_THREADS) as pool:  # numpy releases the GIL
        list(pool.map(convert, range(len(decoded))))
    for s in slices:
        s.data = None  # the file bytes kept by the scan are no longer needed
    return out


# ---------------------------------------------------------------------------------------------
# Public reader
# ---------------------------------------------------------------------------------------------
def _text(value) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return str(value)


def _carried_tags(header) -> dict[str, Any]:
    return {key: _text(header.get(key)) for key in CARRIED_TAGS if key in header}


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom warns (and logs) about every oddity of a non-DICOM or damaged file; the errors we
    raise already name the file and the problem, so keep the terminal clean while scanning."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _members_of(p: Path):
    """The files of a folder or a ZIP as members; a ZIP stays open (and memory-mapped, so whole
    members inflate in one call) until the block ends."""
    if p.is_dir():
        yield _folder_members(p), "folder"
        return
    try:
        archive = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{p} is not a valid ZIP file ({_short(exc)})") from None
    with archive, open(p, "rb") as f:
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield _zip_members(archive, p, raw), "ZIP"
        finally:
            raw.close()


def _series_volume(chosen: list[_Slice], source: str, series: str | None) -> Volume:
    """Check, sort and decode one chosen series into a Volume in HU with its DICOM metadata."""
    for s in chosen:
        _check_pixel_kind(s)
    chosen, geometry = _series_geometry(chosen, source)
    with _quiet_pydicom():
        array = _stack_hu(chosen)
    header = chosen[0].header
    tags = _carried_tags(header)
    metadata: dict[str, Any] = {
        "source_format": "dicom",
        "dicom": tags,
        "series_instance_uid": tags.get("SeriesInstanceUID", ""),
        "series_description": tags.get("SeriesDescription", ""),
        "dicom_files": len(chosen),
        "transfer_syntax": str(getattr(header, "file_meta", {}).get("TransferSyntaxUID", "")),
    }
    thickness = header.get("SliceThickness")
    try:
        if thickness not in (None, "") and float(thickness) > 0:
            metadata["slice_thickness"] = float(thickness)
    except (TypeError, ValueError):
        pass
    if series:
        metadata["case_series"] = series
    return Volume(array, geometry, metadata)


def read_dicom(path: str | os.PathLike, series: str | None = None, series_uid: str | None = None) -> Volume:
    """Read one DICOM CT series as a Volume in HU (LPS geometry).

    ``path``: a folder (searched recursively), one .dcm file of a series (its folder is read and
    the file's series kept), or a ZIP (read in memory, never extracted). ``series``: "thick" or
    "thin" for the case layout; ``series_uid`` picks a series among several."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input not found: {p}")
    if not p.is_dir() and not (p.suffix.lower() == ".zip" or zipfile.is_zipfile(p)):
        # One file of a series: read its folder and keep the file's series.
        single = _scan_member(_Member(p.name, lambda: open(p, "rb"), str(p)))
        if single is None:
            raise InputError(f"{p} is not a DICOM image")
        members = _folder_members(p.parent, recursive=False)
        series_uid = series_uid or single.series_uid
        return _read_series(members, "folder", p, series, series_uid)
    with _members_of(p) as (members, kind):
        return _read_series(members, kind, p, series, series_uid)


def _read_series(members: list[_Member], kind: str, p: Path, series: str | None, series_uid: str | None) -> Volume:
    with _quiet_pydicom():
        slices = _scan(members)
    if not slices:
        raise InputError(f"no DICOM images found in the {kind} {p} ({len(members)} files looked at)")
    chosen = _choose_series(slices, str(p), series, series_uid)
    return _series_volume(chosen, str(p), series)


def read_case(path: str | os.PathLike) -> tuple[Volume, Volume]:
    """Both series of one case in the dataset's layout (``case_X/1`` thick, ``case_X/2`` thin),
    from a ZIP or a folder, as (thick, thin) Volumes in HU.

    The same result as ``read_dicom(path, series="thick")`` and ``series="thin"``, but every file
    is read (inflated) once, headers and pixels from the same bytes, in parallel threads."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input not found: {p}")
    with _members_of(p) as (members, kind):
        with _quiet_pydicom():
            slices = _scan(members, keep_data=True)
        if not slices:
            raise InputError(f"no DICOM images found in the {kind} {p} ({len(members)} files looked at)")
        thick = _series_volume(_choose_series(slices, str(p), "thick", None), str(p), "thick")
        thin = _series_volume(_choose_series(slices, str(p), "thin", None), str(p), "thin")
    return thick, thin


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------
def _series_description(volume: Volume, original: str) -> str:
    thickness = volume.slice_thickness
    source_thickness = volume.metadata.get("dicom", {}).get("SliceThickness")
    try:
        source_thickness = float(source_thickness)
    except (TypeError, ValueError):
        source_thickness = None
    kind = ""
    if source_thickness:
        kind = "thin " if thickness < source_thickness - 1e-6 else ("thick " if thickness > source_thickness + 1e-6 else "")
    suffix = f"{kind}{thickness:g}mm (CTSliceInterp)"
    original = original.strip()
    room = 64 - len(suffix) - 1  # LO holds 64 characters
    return f"{original[:room].rstrip()} {suffix}" if original else suffix


def _storage(array: np.ndarray) -> tuple[np.ndarray, int]:
    """Round HU to integers and choose a RescaleIntercept so that int16 holds them (slope 1)."""
    hu = np.rint(array).astype(np.int64) if np.issubdtype(array.dtype, np.floating) else array.astype(np.int64)
    low, high = int(hu.min()), int(hu.max())
    if high - low > 65535:
        raise OutputError(
            f"the HU range {low}..{high} does not fit 16-bit DICOM: write NRRD or NIfTI instead"
        )
    intercept = 0 if (low >= -32768 and high <= 32767) else low + 32768
    return (hu - intercept).astype(np.int16), intercept


def write_dicom_series(volume: Volume, folder: str | os.PathLike) -> list[Path]:
    """Write ``volume`` as a new derived CT series, one file per slice, into ``folder``.

    HU are rounded to integers (DICOM CT is integer) and stored as int16 with RescaleSlope 1.
    Patient/study/frame-of-reference tags from ``metadata["dicom"]`` are carried over."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    from ... import __version__

    folder = Path(folder)
    g = volume.geometry
    d = g.direction_matrix
    row, col, k_axis = d[:, 0], d[:, 1], d[:, 2]
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise OutputError("the volume's direction is not orthonormal: DICOM cannot store it; write NRRD or NIfTI instead")
    normal = np.cross(row, col)
    if abs(abs(float(np.dot(normal, k_axis))) - 1) > 1e-4:
        raise OutputError("the volume's slice axis is not perpendicular to its slices: DICOM cannot store it")
    stored, intercept = _storage(volume.array)

    source = dict(volume.metadata.get("dicom") or {})
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series_uid = generate_uid()
    study_uid = source.get("StudyInstanceUID") or generate_uid()
    frame_uid = source.get("FrameOfReferenceUID") or generate_uid()
    try:
        series_number = int(source.get("SeriesNumber") or 0) + 1000
    except ValueError:
        series_number = 1000
    method = volume.metadata.get("method")
    derivation = f"Slice interpolation by CTSliceInterp ({method})" if method else "Derived by CTSliceInterp"
    if source.get("SeriesInstanceUID"):
        derivation += f" from series {source['SeriesInstanceUID']}"

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: carried names keep their characters
    for key in CARRIED_TAGS:
        if key in source and key not in ("SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "SliceThickness", "SpecificCharacterSet"):
            value = source[key]
            if value not in ("", [], None):
                setattr(base, key, value)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if key not in base:
            setattr(base, key, "")  # type 2: present, may be empty
    if not source.get("StudyDate"):
        base.StudyDate, base.StudyTime = date, time
    base.Modality = source.get("Modality") or "CT"
    base.SOPClassUID = CT_IMAGE_STORAGE
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.FrameOfReferenceUID = frame_uid
    base.SeriesNumber = series_number
    base.SeriesDescription = _series_description(volume, str(source.get("SeriesDescription") or ""))
    base.SeriesDate = base.ContentDate = base.InstanceCreationDate = date
    base.SeriesTime = base.ContentTime = base.InstanceCreationTime = time
    base.DerivationDescription = derivation[:1024]
    base.SoftwareVersions = f"CTSliceInterp {__version__}"
    base.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "") or ""
    base.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    base.PixelSpacing = [_ds(g.spacing[1]), _ds(g.spacing[0])]
    base.SliceThickness = _ds(volume.slice_thickness)
    base.SpacingBetweenSlices = _ds(g.spacing[2])
    base.Rows, base.Columns = g.shape[1], g.shape[2]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    base.RescaleIntercept = _ds(intercept)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.KVP = source.get("KVP", "") or ""
    if "WindowCenter" not in base:
        base.WindowCenter, base.WindowWidth = "40", "400"
    base.BurnedInAnnotation = "NO"

    written = []
    width = max(4, len(str(g.shape[0])))
    for k in range(g.shape[0]):
        ds = Dataset()
        ds.update(base)
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        position = g.index_to_physical((0, 0, k))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(np.dot(normal, position)))
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        target = folder / f"IM{k + 1:0{width}d}.dcm"
        pydicom.dcmwrite(target, ds, enforce_file_format=True)
        written.append(target)
    return written


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) with as much precision as fits."""
    value = float(value)
    if value == 0:
        return "0"
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


__all__ = ["read_case", "read_dicom", "write_dicom_series"]
