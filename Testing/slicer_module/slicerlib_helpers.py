"""Helpers shared by the Slicer module tests (slicer-core: real MRML, no Qt)."""

from __future__ import annotations

import numpy as np

import slicer


def add_volume_node(scene, volume, name="thick", class_name="vtkMRMLScalarVolumeNode", study=True):
    """A volume node holding ``volume`` (LPS) through the Lib's own conversion, in a study."""
    from CTSliceInterpLib import nodes

    node = scene.AddNewNodeByClass(class_name, name)
    nodes.update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display.IsA("vtkMRMLScalarVolumeDisplayNode") and not display.IsA("vtkMRMLLabelMapVolumeDisplayNode"):
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(400.0, 40.0)
    if study:
        hierarchy = scene.GetSubjectHierarchyNode()
        patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
        study_item = hierarchy.CreateStudyItem(patient, "Study")
        hierarchy.CreateItem(study_item, node)
    return node


def set_ijk_to_ras(node, matrix):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r][c]))
    node.SetIJKToRASMatrix(m)


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
