"""Header scan: which members are DICOM images (one Slice per image, one per frame of a multi-frame
Enhanced CT), and which series to read."""

from __future__ import annotations

import io
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ...core.errors import InputError
from .messages import short
from .sources import MEDIA_STORAGE_DIRECTORY, Member, member_bytes

CASE_SERIES_FOLDERS = {"thick": "1", "thin": "2"}
CT_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
# A file of these modalities without Rows/Columns is a broken image, not a report or a DICOMDIR.
IMAGE_MODALITIES = {"CT", "MR", "PT", "NM", "CR", "DX", "XA", "RF", "US", "OT", "MG"}
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
SCAN_THREADS = 4
KEEP_DATA_MAX_BYTES = 64 << 20  # read_case keeps whole files up to this size; larger ones are streamed
DEFER_BYTES = 1 << 20  # header values larger than this are not read (pixels come later, checked)
# Value representations, for the probe of files without the DICM marker.
VALUE_REPRESENTATIONS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
    b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
    b"UR", b"US", b"UT", b"UV",
}
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass
class Slice:
    """One image plane: a single-frame image, or one frame of a multi-frame object."""

    member: Member
    header: Any  # pydicom Dataset without pixel data
    series_uid: str
    sop_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slope: float = 1.0
    intercept: float = 0.0
    thickness: float | None = None
    frames: int = 1  # NumberOfFrames of the object
    frame: int | None = None  # this plane's frame (0-based) in a multi-frame object
    data: bytes | None = None  # the whole file, when the scan read it (``read_case``)
    pixel_offset: int | None = None  # where the PixelData element starts in the file
    pixel_length: int | None = None  # the length the PixelData element declares (None: undefined)

    @property
    def name(self) -> str:
        return self.member.name if self.frame is None else f"{self.member.name} (frame {self.frame + 1})"

    @property
    def display(self) -> str:
        return self.member.display if self.frame is None else f"{self.member.display} (frame {self.frame + 1})"

    @property
    def instance_key(self) -> tuple[str, int]:
        return (self.sop_uid or self.member.name, self.frame or 0)

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "") or "").strip().upper()


# ---------------------------------------------------------------------------------------------
# Probe: is this file worth a full parse?
# ---------------------------------------------------------------------------------------------
def probe(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) can start a DICOM file: the DICM marker after the
    128-byte preamble, or, for files without a preamble, a first element of group 0002 or 0008 and
    ascending tags after it. 32 MiB of zeros took pydicom 27 s to force-parse; this takes microseconds."""
    return head[128:132] == b"DICM" or _elements_ascend(head, explicit=True) or _elements_ascend(head, explicit=False)


def _elements_ascend(head: bytes, explicit: bool) -> bool:
    position, previous, seen = 0, -1, 0
    while seen < 4 and position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        tag = group << 16 | element
        if tag <= previous or (seen == 0 and group not in (0x0002, 0x0008)):
            return False
        if explicit:
            vr = head[position + 4 : position + 6]
            if vr not in VALUE_REPRESENTATIONS:
                return False
            if vr in LONG_LENGTH_VRS:
                if position + 12 > len(head):
                    break
                (length,), position = struct.unpack_from("<I", head, position + 8), position + 12
            else:
                (length,), position = struct.unpack_from("<H", head, position + 6), position + 8
        else:
            (length,), position = struct.unpack_from("<I", head, position + 4), position + 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length: plausible, stop here
            return True
        position, previous, seen = position + length, tag, seen + 1
    return seen >= 1


# ---------------------------------------------------------------------------------------------
# One member -> its image planes
# ---------------------------------------------------------------------------------------------
def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _number(value, default: float | None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if np.isfinite(number) else default


def _parse_header(stream, claims_dicom: bool):
    """(dataset, pixel offset, declared pixel length) with pydicom, stopping before the pixels."""
    import pydicom

    ds = pydicom.dcmread(stream, stop_before_pixels=True, force=True, defer_size=DEFER_BYTES)
    offset = stream.tell()  # pydicom stops with the stream at the start of the PixelData element
    element = stream.read(12)
    if not claims_dicom and not ds.get("SOPClassUID") and not ds.get("Rows"):
        raise ValueError("no DICOM elements")  # force-parsed junk: not a DICOM file
    if element[:4] != PIXEL_DATA_TAG or len(element) < 12:
        return ds, None, None
    explicit = element[4:6] in (b"OB", b"OW")
    (length,) = struct.unpack_from("<I", element, 8 if explicit else 4)
    return ds, offset, (None if length == 0xFFFFFFFF else length)


def _open(member: Member, keep_data: bool):
    """The member as a stream, and its whole bytes when ``keep_data`` (and it is not huge)."""
    try:
        if keep_data and member.size <= KEEP_DATA_MAX_BYTES:
            data = member_bytes(member)
            return io.BytesIO(data), data
        return member.opener(), None
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unsupported compression.
        raise InputError(f"cannot read {member.display}: {short(exc)} (corrupted ZIP or file?)") from None


def scan_member(member: Member, keep_data: bool = False) -> list[Slice]:
    """The image planes of one member. [] for files that are not DICOM images (README, DICOMDIR,
    reports); InputError for a file that claims to be DICOM (``.dcm`` or the DICM marker) but cannot
    be read. ``keep_data``: read the whole file once and keep it, so the pixels need no second read."""
    stream, data = _open(member, keep_data)
    with stream:
        try:
            head = stream.read(512)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"cannot read {member.display}: {short(exc)} (corrupted ZIP or file?)") from None
        claims_dicom = member.name.lower().endswith((".dcm", ".dicom")) or head[128:132] == b"DICM"
        if not probe(head):
            if claims_dicom:
                raise InputError(f"{member.display} is not a DICOM file (no DICM marker, no DICOM elements): corrupted?")
            return []
        try:
            stream.seek(0)
            ds, pixel_offset, pixel_length = _parse_header(stream, claims_dicom)
            rows, columns = ds.get("Rows"), ds.get("Columns")
        except Exception as exc:  # noqa: BLE001 - a parser failure of any kind means "not readable"
            if claims_dicom:
                raise InputError(f"cannot read DICOM file {member.display}: {short(exc)} (corrupted or truncated?)") from None
            return []
    if _is_directory(ds):
        return []  # DICOMDIR, Philips DIRFILE: an index, whatever its name
    if rows is None or columns is None:
        looks_like_image = "PixelData" in ds or "ImagePositionPatient" in ds or str(ds.get("Modality", "")) in IMAGE_MODALITIES
        if claims_dicom and (looks_like_image or not ds.get("SOPClassUID")):
            raise InputError(f"DICOM file {member.display} has no Rows/Columns: corrupted or truncated")
        return []  # structured report, presentation state...: not an image
    first = Slice(
        member=member, header=ds, series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""), rows=int(rows), columns=int(columns),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6), position=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2), slope=_number(ds.get("RescaleSlope"), 1.0) or 1.0,
        intercept=_number(ds.get("RescaleIntercept"), 0.0), thickness=_number(ds.get("SliceThickness"), None),
        frames=max(1, int(_number(ds.get("NumberOfFrames"), 1))), data=data, pixel_offset=pixel_offset,
        pixel_length=pixel_length,
    )
    return _frames(first) if "PerFrameFunctionalGroupsSequence" in ds else [first]


def _is_directory(ds) -> bool:
    meta = getattr(ds, "file_meta", None) or {}
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


def _functional(item, shared, sequence: str, keyword: str):
    """A value from a functional-group macro: the frame's own group first, else the shared one."""
    for group in (item, shared):
        macro = group.get(sequence) if group is not None else None
        if macro and keyword in macro[0]:
            return macro[0].get(keyword)
    return None


def _frames(first: Slice) -> list[Slice]:
    """The planes of an Enhanced (multi-frame) CT: position, orientation, pixel measures and rescale
    of each frame from its per-frame functional groups, or from the shared ones."""
    ds = first.header
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared_items = ds.get("SharedFunctionalGroupsSequence") or [None]
    shared = shared_items[0]
    if len(per_frame) != first.frames:
        raise InputError(f"{first.member.display} declares {first.frames} frames but describes {len(per_frame)}: corrupted?")
    planes = []
    for k, item in enumerate(per_frame):
        planes.append(Slice(
            member=first.member, header=ds, series_uid=first.series_uid, sop_uid=first.sop_uid,
            rows=first.rows, columns=first.columns,
            orientation=_floats(_functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            position=_floats(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
            pixel_spacing=_floats(_functional(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
            slope=_number(_functional(item, shared, "PixelValueTransformationSequence", "RescaleSlope"), 1.0) or 1.0,
            intercept=_number(_functional(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0),
            thickness=_number(_functional(item, shared, "PixelMeasuresSequence", "SliceThickness"), None),
            frames=first.frames, frame=k, data=first.data, pixel_offset=first.pixel_offset,
            pixel_length=first.pixel_length,
        ))
    return planes


def scan(members: list[Member], keep_data: bool = False) -> list[Slice]:
    if len(members) > 8:
        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            found = list(pool.map(lambda m: scan_member(m, keep_data), members))
    else:
        found = [scan_member(m, keep_data) for m in members]
    return [plane for planes in found for plane in planes]


# ---------------------------------------------------------------------------------------------
# Choosing the series
# ---------------------------------------------------------------------------------------------
def _case_roots(slices: list[Slice]) -> dict[str, dict[str, list[Slice]]] | None:
    """``{case_root: {"1": [...], "2": [...]}}`` when every image sits in a folder named 1 or 2
    (the dataset's case layout), else None."""
    roots: dict[str, dict[str, list[Slice]]] = {}
    for s in slices:
        parts = PurePosixPath(s.member.name).parts
        if len(parts) < 2 or parts[-2] not in ("1", "2"):
            return None
        root = "/".join(parts[:-2]) or "."
        roots.setdefault(root, {}).setdefault(parts[-2], []).append(s)
    return roots or None


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def _spacing_summary(group: list[Slice]) -> str:
    usable = [s for s in group if s.position and s.orientation]
    if len(usable) < 2:
        return "1 slice" if len(group) == 1 else "spacing unknown"
    normal = slice_normal(usable[0].orientation)
    steps = np.diff(np.sort([np.dot(normal, s.position) for s in usable]))
    return f"slice spacing {np.median(steps):.3g} mm"


def _describe_series(uid: str, group: list[Slice]) -> str:
    header = group[0].header
    description = str(header.get("SeriesDescription", "") or "").strip() or "(no description)"
    number = header.get("SeriesNumber", "")
    files = len({s.member.name for s in group})
    planes = f"{files} files" if files == len(group) else f"{files} files, {len(group)} frames"
    return f"  {uid}  #{number} '{description}'  {group[0].modality or 'no modality'}, {planes}, {_spacing_summary(group)}"


def _by_series(slices: list[Slice]) -> dict[str, list[Slice]]:
    groups: dict[str, list[Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return groups


def _case_series(slices: list[Slice], cases, source: str, series: str) -> list[Slice]:
    if series not in CASE_SERIES_FOLDERS:
        raise InputError(f"--series must be 'thick' or 'thin', got {series!r}")
    if cases is None:
        raise InputError(
            f"--series {series} applies to the case layout (case_X/1 thick, case_X/2 thin) and {source} "
            "is not one: leave --series out, or pick a series with --series-uid"
        )
    if len(cases) > 1:
        raise InputError(f"{source} holds {len(cases)} cases ({', '.join(sorted(cases))}): pass one case folder")
    root, folders = next(iter(cases.items()))
    folder = CASE_SERIES_FOLDERS[series]
    if folder not in folders:
        raise InputError(f"{source} has no {series} series: the folder {root}/{folder} holds no DICOM images")
    return folders[folder]


def choose_series(slices: list[Slice], source: str, series: str | None, series_uid: str | None) -> list[Slice]:
    if series_uid:
        groups = _by_series(slices)
        if series_uid not in groups:
            listing = "\n".join(_describe_series(uid, g) for uid, g in groups.items())
            raise InputError(f"no series with SeriesInstanceUID {series_uid} in {source}; it holds:\n{listing}")
        return groups[series_uid]
    cases = _case_roots(slices)
    if series is not None:
        slices = _case_series(slices, cases, source, series)
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


def check_modality(slices: list[Slice], source: str) -> None:
    """Only CT is read as CT: HU, CT Image Storage out. Modality is Type 1; an image without it counts
    as CT only when its SOP class is a CT one."""
    for s in slices:
        sop_class = str(s.header.get("SOPClassUID", "") or "")
        if s.modality != "CT" and not (s.modality == "" and sop_class in CT_STORAGE_CLASSES):
            raise InputError(
                f"{s.display} is not a CT image (Modality {s.modality or 'missing'}, SOP class {sop_class or 'missing'}): "
                "a CT series in HU is needed"
            )
