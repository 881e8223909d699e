"""SimpleITK adapter: NRRD, NIfTI, MHA/MHD <-> Volume. Geometry passes through unchanged (LPS)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Geometry, Volume

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
    volume = Volume(array, geometry, dict(metadata or {}))
    volume.check_finite()
    return volume


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
        raise InputError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None
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
    """Write with SimpleITK: integer voxels keep their type, floats are stored as float32."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        d = volume.geometry.direction_matrix
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            # NIfTI's qform/sform cannot hold a sheared grid: ITK would silently rotate it.
            from ..errors import OutputError

            raise OutputError(
                "this volume's axes are not orthogonal (e.g. a gantry-tilted grid), which NIfTI cannot "
                "store: write .nrrd or .mha instead"
            )
    image = volume_to_sitk(volume, dtype=storage_dtype(volume.array))
    if volume.metadata.get("slice_thickness"):
        image.SetMetaData("slice_thickness", str(volume.metadata["slice_thickness"]))
    sitk.WriteImage(image, str(path), useCompression=compress)


def storage_dtype(array: np.ndarray):
    """Keep integer types; store floats as float32 (interpolated HU keep their fractions)."""
    if np.issubdtype(array.dtype, np.integer):
        return array.dtype
    return np.float32
