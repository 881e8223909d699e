"""SimpleITK adapter: NRRD, NIfTI, MHA/MHD <-> Volume. Geometry passes through unchanged (LPS)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputError, OutputError
from ..core.volume import Geometry, Volume
from .atomic import WriteFailed

log = logging.getLogger(__name__)

ITK_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def volume_from_sitk(image: sitk.Image, metadata: dict | None = None, source: str = "image") -> Volume:
    if image.GetDimension() != 3 or (image.GetDimension() == 3 and image.GetSize()[2] == 1):
        raise InputError(f"{source} is a 2-D image (size {image.GetSize()}): a 3-D CT volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image): "
            "a scalar CT volume is needed"
        )
    array = sitk.GetArrayFromImage(image)
    if np.iscomplexobj(array):
        raise InputError(f"{source} has complex voxels: a scalar CT volume is needed")
    geometry = Geometry(array.shape, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return Volume(array, geometry, dict(metadata or {}))  # read_volume's validate_ct checks the voxels


def volume_to_sitk(volume: Volume, dtype=None) -> sitk.Image:
    array = volume.array if dtype is None else volume.array.astype(dtype)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def read_itk(path: str) -> Volume:
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        metadata = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {itk_message(exc)}") from None
    volume = volume_from_sitk(image, source=str(path))
    meta = {"source_format": "itk"}
    label_header = _label_map_header(metadata)
    if label_header:
        meta["label_map_header"] = label_header
    thickness = metadata.get("slice_thickness") or metadata.get("SliceThickness")
    if thickness:
        meta["slice_thickness"] = thickness
    return volume.replace(**meta)


def _label_map_header(header: dict) -> str | None:
    """Slicer segmentation NRRD keys, or a NIfTI label intent, mark a label map."""
    if any(key.startswith("Segment") and key.endswith("_ID") for key in header) or "Segmentation_MasterRepresentation" in header:
        return "the header is a Slicer segmentation"
    if str(header.get("intent_code", "")).strip() == "1002" or str(header.get("intent_name", "")).strip().lower() in ("label", "labels"):
        return "the NIfTI header declares a label intent"
    return None


def write_itk(volume: Volume, path: str, compress: bool = True) -> None:
    """Write with SimpleITK (integer voxels keep their type, floats are stored as float32), then read
    the file back and compare: on a full disk ITK reports success for a cut-short NIfTI, and reads a
    cut-short NIfTI back zero-filled. Raises ``WriteFailed`` (for ``io.atomic``) when the file is wrong."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        d = volume.geometry.direction_matrix
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            # NIfTI's qform/sform cannot hold a sheared grid: ITK would silently rotate it.
            raise OutputError(
                "this volume's axes are not orthogonal (e.g. a gantry-tilted grid), which NIfTI cannot "
                "store: write .nrrd or .mha instead"
            )
    image = volume_to_sitk(volume, dtype=storage_dtype(volume.array))
    if volume.metadata.get("slice_thickness"):
        image.SetMetaData("slice_thickness", str(volume.metadata["slice_thickness"]))
    with _library_stderr_held():
        try:
            sitk.WriteImage(image, str(path), useCompression=compress)
        except RuntimeError as exc:
            raise WriteFailed(f"ITK: {itk_message(exc)}") from None
        _check_written(image, str(path))


def _check_written(image: sitk.Image, path: str) -> None:
    try:
        written = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise WriteFailed(f"the written file does not read back (ITK: {itk_message(exc)})") from None
    same = (
        written.GetSize() == image.GetSize()
        and written.GetPixelID() == image.GetPixelID()
        and np.allclose(written.GetSpacing(), image.GetSpacing(), rtol=1e-5, atol=1e-6)
        and np.allclose(written.GetOrigin(), image.GetOrigin(), rtol=1e-5, atol=1e-3)
        and np.allclose(written.GetDirection(), image.GetDirection(), atol=1e-4)
        and np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image), equal_nan=True)
    )
    if not same:
        raise WriteFailed("the file read back differs from the volume written (cut short?)")


def itk_message(exc: BaseException) -> str:
    """ITK's exception text is a multi-line dump (file, line, object address, a chain of NRRD calls):
    keep its last line, the most specific one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    for prefix in ("Reason: ", "[nrrd] "):
        last = last.removeprefix(prefix)
    return last


@contextlib.contextmanager
def _library_stderr_held() -> Iterator[None]:
    """ITK's C libraries print straight to file descriptor 2 ("** ERROR: NWAD: wrote only ... bytes",
    "MetaImage: ... file stream is fail after write"), which would break the one-line error. Hold that
    text: after a success it is passed on unchanged, after a failure it is logged (shown with --debug)."""
    try:
        sink = tempfile.TemporaryFile()
    except OSError:  # no room even for this: let the libraries print
        yield
        return
    with sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text and failed:
                log.debug("ITK printed while writing: %s", text.strip())
            elif text:
                sys.stderr.write(text)


def storage_dtype(array: np.ndarray):
    """Keep integer types; store floats as float32 (interpolated HU keep their fractions)."""
    if np.issubdtype(array.dtype, np.integer):
        return array.dtype
    return np.float32
