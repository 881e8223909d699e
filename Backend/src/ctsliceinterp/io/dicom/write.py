"""The DICOM series writer: a Volume as a new derived CT series (CT Image Storage, one file per slice,
Explicit VR Little Endian), ready for PACS, with every Type 1 and Type 2 attribute of the CT Image IOD."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import numpy as np

from ...core.errors import OutputError
from ...core.volume import Geometry, Volume
from .messages import pydicom_messages_to_debug
from .read import CARRIED_TAGS

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOFTWARE = "CTSliceInterp"
SLICE_FILE = re.compile(r"IM\d{4,}\.dcm")
LEGACY_MARKER = ".ctsliceinterp-series"  # the marker file earlier versions left in their output folders
# Set per series here, not carried from the source.
NOT_CARRIED = ("SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "SliceThickness", "SpecificCharacterSet", "Modality")
# Type 2 (and the Type 2C that apply to CT): present, empty when unknown.
EMPTY_WHEN_UNKNOWN = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "PatientPosition", "Manufacturer", "PositionReferenceIndicator", "KVP",
    "AcquisitionNumber",
)


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
        raise OutputError(f"the HU range {low}..{high} does not fit 16-bit DICOM: write NRRD or NIfTI instead")
    intercept = 0 if (low >= -32768 and high <= 32767) else low + 32768
    return (hu - intercept).astype(np.int16), intercept


def _slice_normal(g: Geometry) -> np.ndarray:
    """row x column of an orthonormal grid whose slice axis is perpendicular to its slices (DICOM can
    store nothing else; a k axis against row x column is written with the slices in reverse order)."""
    d = g.direction_matrix
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise OutputError("the volume's direction is not orthonormal: DICOM cannot store it; write NRRD or NIfTI instead")
    normal = np.cross(d[:, 0], d[:, 1])
    if abs(abs(float(np.dot(normal, d[:, 2]))) - 1) > 1e-4:
        raise OutputError("the volume's slice axis is not perpendicular to its slices: DICOM cannot store it")
    return normal


def _patient_and_study(base, source: dict, date: str, time: str) -> None:
    """Carried over from the source series (same patient, study and frame of reference), else new."""
    from pydicom.uid import generate_uid

    base.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: carried names keep their characters
    for key in CARRIED_TAGS:
        if key in source and key not in NOT_CARRIED and source[key] not in ("", [], None):
            setattr(base, key, source[key])
    for key in EMPTY_WHEN_UNKNOWN:
        if key not in base:
            setattr(base, key, "")
    if "Laterality" not in base and not base.get("BodyPartExamined"):
        base.Laterality = ""  # Type 2C: unknown body part, so unknown laterality (absent for a known unpaired part)
    if not source.get("StudyDate"):
        base.StudyDate, base.StudyTime = date, time
    base.StudyInstanceUID = source.get("StudyInstanceUID") or generate_uid()
    base.FrameOfReferenceUID = source.get("FrameOfReferenceUID") or generate_uid()
    if "WindowCenter" not in base:
        base.WindowCenter, base.WindowWidth = "40", "400"


def _derived_series(base, volume: Volume, source: dict, date: str, time: str) -> None:
    from pydicom.uid import generate_uid

    from ... import __version__

    try:
        series_number = int(source.get("SeriesNumber") or 0) + 1000
    except ValueError:
        series_number = 1000
    method = volume.metadata.get("method")
    derivation = f"Slice interpolation by {SOFTWARE} ({method})" if method else f"Derived by {SOFTWARE}"
    if source.get("SeriesInstanceUID"):
        derivation += f" from series {source['SeriesInstanceUID']}"
    base.Modality = "CT"  # only CT is read as CT
    base.SOPClassUID = CT_IMAGE_STORAGE
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = series_number
    base.SeriesDescription = _series_description(volume, str(source.get("SeriesDescription") or ""))
    base.SeriesDate = base.ContentDate = base.InstanceCreationDate = date
    base.SeriesTime = base.ContentTime = base.InstanceCreationTime = time
    base.DerivationDescription = derivation[:1024]
    base.SoftwareVersions = f"{SOFTWARE} {__version__}"
    base.BurnedInAnnotation = "NO"


def _plane_and_pixels(base, volume: Volume, intercept: int) -> None:
    g = volume.geometry
    d = g.direction_matrix
    base.ImageOrientationPatient = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
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


def _slice_dataset(base, k: int, g: Geometry, normal: np.ndarray, pixels: np.ndarray):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.update(base)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.InstanceNumber = k + 1
    position = g.index_to_physical((0, 0, k))
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(np.dot(normal, position)))
    ds.PixelData = np.ascontiguousarray(pixels).astype("<i2").tobytes()
    return ds


def write_dicom_series(volume: Volume, folder: str | os.PathLike) -> list[Path]:
    """Write ``volume`` as a new derived CT series, one file per slice, into ``folder``.

    HU are rounded to integers (DICOM CT is integer) and stored as int16 with RescaleSlope 1.
    Patient/study/frame-of-reference tags from ``metadata["dicom"]`` are carried over."""
    import pydicom
    from pydicom.dataset import Dataset

    folder, g = Path(folder), volume.geometry
    normal = _slice_normal(g)
    stored, intercept = _storage(volume.array)
    source = dict(volume.metadata.get("dicom") or {})
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    base = Dataset()
    _patient_and_study(base, source, date, time)
    _derived_series(base, volume, source, date, time)
    _plane_and_pixels(base, volume, intercept)
    written = []
    width = max(4, len(str(g.shape[0])))
    with pydicom_messages_to_debug():
        for k in range(g.shape[0]):
            target = folder / f"IM{k + 1:0{width}d}.dcm"
            pydicom.dcmwrite(target, _slice_dataset(base, k, g, normal, stored[k]), enforce_file_format=True)
            written.append(target)
    return written


def is_ctsliceinterp_series(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds only slices this writer wrote (``IMnnnn.dcm`` whose SoftwareVersions
    name CTSliceInterp): such a folder may be replaced as a whole; a scanner's series never is."""
    import pydicom

    for path in Path(folder).iterdir():
        if path.name == LEGACY_MARKER:
            continue
        if not (path.is_file() and SLICE_FILE.fullmatch(path.name)):
            return False
        try:
            software = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SoftwareVersions"]).get("SoftwareVersions", "")
        except Exception:  # noqa: BLE001 - unreadable: not ours
            return False
        if not str(software).startswith(SOFTWARE):
            return False
    return True
