"""Volume nodes <-> ``ctsliceinterp.core.volume.Volume`` (MRML only, no Qt).

Slicer speaks RAS (IJKToRAS), the backend speaks LPS. The one place where the two meet is
``flip_ras_lps``: every conversion in this module goes through it, and nowhere else in the
module or the Lib is a sign flipped.
"""

from __future__ import annotations

import logging

import numpy as np

from .backend_path import ensure_backend_importable

ensure_backend_importable()

from ctsliceinterp.core.errors import InputError, OutputError  # noqa: E402
from ctsliceinterp.core.grid import thin_grid  # noqa: E402
from ctsliceinterp.core.volume import Geometry, Volume  # noqa: E402

from .i18n import tr as _  # noqa: E402

# RAS <-> LPS: negate the first two physical axes. The matrix is its own inverse.
_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


def flip_ras_lps(origin, direction):
    """Convert an (origin, direction) pair between RAS and LPS (either way: the flip is an
    involution). ``direction`` is 3x3 with the i, j, k axes as columns; flipping its first two
    *rows* flips the physical coordinates of each axis, which is what changes between spaces."""
    origin = _RAS_LPS @ np.asarray(origin, dtype=float).reshape(3)
    direction = _RAS_LPS @ np.asarray(direction, dtype=float).reshape(3, 3)
    return origin, direction


def _vtk_matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def geometry_from_node(node) -> Geometry:
    """The node's voxel grid in LPS (its own IJKToRAS; a parent transform is not applied)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _vtk_matrix_to_numpy(matrix)
    spacing = np.asarray(node.GetSpacing(), dtype=float)
    direction_ras = ijk_to_ras[:3, :3] / spacing  # columns scaled by spacing in IJKToRAS
    origin_lps, direction_lps = flip_ras_lps(ijk_to_ras[:3, 3], direction_ras)
    nx, ny, nz = node.GetImageData().GetDimensions()
    return Geometry((nz, ny, nx), tuple(spacing), tuple(origin_lps), tuple(direction_lps.ravel()))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """4x4 IJKToRAS for an LPS geometry."""
    origin_ras, direction_ras = flip_ras_lps(geometry.origin, geometry.direction_matrix)
    matrix = np.eye(4)
    matrix[:3, :3] = direction_ras * np.asarray(geometry.spacing)  # scale columns
    matrix[:3, 3] = origin_ras
    return matrix


def check_input_node(node) -> None:
    """Raise ``InputError`` naming why ``node`` cannot be interpolated (kind of node only;
    the slice spacing is checked against the target in ``volume_from_node``)."""
    if node is None:
        raise InputError(_("no input volume selected: load a thick-slice CT and select it as the input"))
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(_("'{name}' is a label map (segmentation), not a CT image: select a scalar CT volume").format(
            name=name))
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode"):
        raise InputError(_("'{name}' is a vector/colour (RGB) volume, not a CT image: select a scalar CT "
                           "volume").format(name=name))
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(_("'{name}' is a {kind}, not a scalar CT volume").format(name=name, kind=node.GetClassName()))
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(_("'{name}' has no image data").format(name=name))
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(_("'{name}' has {count} components per voxel (colour/vector image): select a scalar CT "
                             "volume").format(name=name, count=image.GetNumberOfScalarComponents()))
    nx, ny, nz = image.GetDimensions()
    if nz < 2 or ny < 2 or nx < 2:
        raise InputError(_("'{name}' is a 2-D image ({nx} x {ny} x {nz} voxels): a 3-D volume with at least 2 slices "
                             "is needed").format(name=name, nx=nx, ny=ny, nz=nz))


def first_ct_volume(scene):
    """The first scalar volume of ``scene`` that is not a label map (the input to pre-select), or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


def _dicom_slice_thickness(node):
    """SliceThickness (0018,0050) from Slicer's DICOM database when the node came from DICOM."""
    try:
        import slicer

        database = getattr(slicer, "dicomDatabase", None)
        uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
        if database is None or not uids:
            return None
        value = float(database.instanceValue(uids[0], "0018,0050"))
        return value if value > 0 else None
    except Exception:  # noqa: BLE001 - optional metadata: never fail the conversion for it
        return None


def volume_from_node(node) -> Volume:
    """A copy of the node's voxels (HU, ``[k, j, i]``) with its LPS geometry."""
    import slicer

    check_input_node(node)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    metadata = {"name": node.GetName()}
    thickness = _dicom_slice_thickness(node)
    if thickness is not None:
        metadata["slice_thickness"] = thickness
    return Volume(array, geometry_from_node(node), metadata)


def prepare_input(node, spacing: float):
    """Check the node and the requested spacing; return ``(volume, target_geometry)``.

    Raises ``InputError`` (with the node's name) before anything is sent or created."""
    volume = volume_from_node(node)
    try:
        target = thin_grid(volume.geometry, spacing)
    except InputError as exc:
        raise InputError(f"'{node.GetName()}': {exc}") from None
    volume.check_finite()
    return volume, target


def output_name(input_name: str, spacing: float) -> str:
    """``<input>_<spacing>mm``, e.g. ``CT_1mm`` or ``CT_0.5mm``."""
    return f"{input_name}_{float(spacing):g}mm"


def update_node_from_volume(node, volume: Volume) -> None:
    """Write voxels and geometry into an existing scalar volume node."""
    import slicer

    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.SetIJKToRASMatrix(_numpy_to_vtk_matrix(ijk_to_ras_from_geometry(volume.geometry)))
    node.Modified()


def copy_display(source, target) -> None:
    """Window/level and colour table of ``source`` onto ``target`` (display nodes created if needed)."""
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    src, dst = source.GetDisplayNode(), target.GetDisplayNode()
    if src is None or dst is None:
        return
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())
    dst.SetAutoWindowLevel(False)
    dst.SetWindowLevel(src.GetWindow(), src.GetLevel())


def place_next_to(scene, node, reference) -> None:
    """Put ``node`` under the same subject-hierarchy parent (study) as ``reference``."""
    hierarchy = scene.GetSubjectHierarchyNode()
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # a scene without the subject hierarchy plugins (slicer-core) does not add items itself
        hierarchy.CreateItem(parent, node)


def write_output(scene, input_node, volume: Volume, output_node=None, name: str | None = None,
                 expected: Geometry | None = None, copy_display_from_input: bool = True):
    """Create (or fill) the output node from a result ``volume``; return the node.

    A new node is added to the scene only once the result is complete and valid, and is removed
    again if filling it fails, so an error never leaves a half-made node behind."""
    if expected is not None and not _same_geometry(volume.geometry, expected):
        raise OutputError(_("the server returned a volume on a different grid than requested: got {got}, expected "
                            "{expected}").format(got=volume.geometry.describe(), expected=expected.describe()))
    if output_node is not None and input_node is not None and output_node.GetID() == input_node.GetID():
        raise OutputError(_("the output volume is the input volume: choose a new output so the input is kept"))
    created = output_node is None
    node = output_node
    try:
        if created:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or "CTSliceInterp output")
        update_node_from_volume(node, volume)
        if input_node is not None:
            if input_node.GetParentTransformNode() is not None:
                node.SetAndObserveTransformNodeID(input_node.GetParentTransformNode().GetID())
            if copy_display_from_input:
                copy_display(input_node, node)
            if created:
                place_next_to(scene, node, input_node)
        elif node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    except Exception:
        if created and node is not None:
            remove_node(scene, node)
        raise
    return node


def remove_node(scene, node) -> None:
    """Remove a node we created, with its display and storage nodes."""
    try:
        for i in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                scene.RemoveNode(display)
        scene.RemoveNode(node)
    except Exception:  # noqa: BLE001 - cleanup must not mask the original error
        logging.exception("could not remove node %s", node.GetID())


def _same_geometry(a: Geometry, b: Geometry, tolerance_mm: float = 1e-3) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, atol=1e-5)
        and np.allclose(a.origin, b.origin, atol=tolerance_mm)
        and np.allclose(a.direction_matrix, b.direction_matrix, atol=1e-5)
    )
