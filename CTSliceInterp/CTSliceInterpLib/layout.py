"""Side-by-side review: input on the left, output on the right, slice views linked (MRML only).

The Red and Yellow views of Slicer's "Side by side" layout get the thick input and the thin
output as background. Linked control is switched on for all slice views, so scrolling, zooming
and panning one moves the other; each keeps its own volume because programmatic changes to a
composite node are not broadcast to linked views (only interactive ones are). The uncertainty
map, when there is one and it is asked for, is a semi-transparent colour foreground on the
output. It is thresholded: voxels whose spread is below ``UNCERTAINTY_THRESHOLD_HU`` are
transparent (the display node's threshold sets their alpha to 0), so the output is tinted only
where the samples disagree, not blended with the colour table's black everywhere. Both views are rotated to the input's slice plane, so an oblique acquisition is read
in its own plane.
"""

from __future__ import annotations

LEFT_VIEW = "Red"
RIGHT_VIEW = "Yellow"
SIDE_BY_SIDE = 29  # vtkMRMLLayoutNode.SlicerLayoutSideBySideView
UNCERTAINTY_OPACITY = 0.5
# Spread (HU) below which the overlay is transparent: about the noise of a CT image.
UNCERTAINTY_THRESHOLD_HU = 10.0
# First one present wins; the file-based tables exist in the application, the last one in any scene.
UNCERTAINTY_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)


def composite_node(scene, layout_name: str):
    for node in _nodes(scene, "vtkMRMLSliceCompositeNode"):
        if node.GetLayoutName() == layout_name:
            return node
    return None


def slice_node(scene, layout_name: str):
    for node in _nodes(scene, "vtkMRMLSliceNode"):
        if node.GetLayoutName() == layout_name:
            return node
    return None


def _nodes(scene, class_name: str):
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def show_uncertainty(scene, uncertainty_node, visible: bool = True) -> None:
    """Show (or hide) ``uncertainty_node`` as a colour overlay in the right view."""
    right = composite_node(scene, RIGHT_VIEW)
    if right is None:
        return
    if visible and uncertainty_node is not None:
        display = uncertainty_node.GetDisplayNode()
        if display is None:
            uncertainty_node.CreateDefaultDisplayNodes()
            display = uncertainty_node.GetDisplayNode()
        for color_id in UNCERTAINTY_COLOR_NODE_IDS:
            if scene.GetNodeByID(color_id) is not None:
                display.SetAndObserveColorNodeID(color_id)
                break
        _threshold_overlay(uncertainty_node, display)
        right.SetForegroundVolumeID(uncertainty_node.GetID())
        right.SetForegroundOpacity(UNCERTAINTY_OPACITY)
    else:
        right.SetForegroundVolumeID(None)
        right.SetForegroundOpacity(0.0)


def _threshold_overlay(uncertainty_node, display) -> None:
    """Transparent below ``UNCERTAINTY_THRESHOLD_HU``; the colours span the threshold to the
    largest spread."""
    image = uncertainty_node.GetImageData()
    largest = image.GetScalarRange()[1] if image is not None else UNCERTAINTY_THRESHOLD_HU
    top = max(largest, UNCERTAINTY_THRESHOLD_HU + 1.0)
    display.SetAutoThreshold(False)
    display.SetThreshold(UNCERTAINTY_THRESHOLD_HU, top + 1.0)
    display.SetApplyThreshold(True)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(UNCERTAINTY_THRESHOLD_HU, top)


def show_side_by_side(scene, input_node, output_node, uncertainty_node=None, show_uncertainty_overlay=True) -> None:
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(SIDE_BY_SIDE)
    for view, node in ((LEFT_VIEW, input_node), (RIGHT_VIEW, output_node)):
        composite = composite_node(scene, view)
        if composite is None:
            continue
        composite.SetBackgroundVolumeID(node.GetID() if node is not None else None)
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        plane = slice_node(scene, view)
        if plane is not None and input_node is not None:
            plane.RotateToVolumePlane(input_node)
    show_uncertainty(scene, uncertainty_node, show_uncertainty_overlay and uncertainty_node is not None)
    for composite in _nodes(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetLinkedControl(True)
