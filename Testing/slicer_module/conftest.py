"""Fixtures for the Slicer module's Lib on the slicer-core wheel (real MRML, no Qt).

This folder is not called ``Testing/slicer``: the slicer-core wheel makes ``slicer`` a namespace
package that imports every module of any ``slicer`` folder on ``sys.path`` (and ``Testing`` is
on it), so tests there would be imported as parts of Slicer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTSliceInterp"
sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed (pip install slicer-core)")


@pytest.fixture
def scene():
    """A scene set up like the application's: subject hierarchy, colour tables, the
    side-by-side views' slice and composite nodes, and a layout node."""
    scene = slicer.vtkMRMLScene()
    hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    hierarchy_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()  # registers the standard layouts, makes the slice nodes
    layout_logic.SetMRMLScene(scene)
    for name in ("Red", "Yellow", "Green"):  # the application's slice logics make these
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
    scene._keep_alive = (hierarchy_logic, color_logic, layout_logic)
    yield scene
    for logic in scene._keep_alive:  # detach first: clearing under an observing logic crashes
        logic.SetMRMLScene(None)
    scene.Clear(True)
