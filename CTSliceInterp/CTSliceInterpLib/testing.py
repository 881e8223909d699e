"""Checks shared by the Slicer self-test (``CTSliceInterpTest``) and pytest on slicer-core.

The synthetic thick volume has an oblique direction and a known analytic content: a smooth
function of the physical position along the slice normal, so an interpolated value can be
compared with the truth at the output slice's physical position, not with a stored number.
"""

from __future__ import annotations

import numpy as np

from .backend_path import ensure_backend_importable

ensure_backend_importable()

from ctsliceinterp.core.grid import thin_grid  # noqa: E402
from ctsliceinterp.core.volume import Geometry, Volume  # noqa: E402

from . import layout, nodes  # noqa: E402

# Truth along the normal: HU = BASE + AMPLITUDE * sin(2 pi s / PERIOD) inside a disc, air outside.
BASE_HU, AMPLITUDE_HU, PERIOD_MM = 40.0, 300.0, 60.0
AIR_HU = -1000.0


def oblique_lps_direction(angle_deg: float = 20.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]])
    return rz @ rx


def truth_along_normal(positions_mm: np.ndarray) -> np.ndarray:
    return BASE_HU + AMPLITUDE_HU * np.sin(2 * np.pi * np.asarray(positions_mm) / PERIOD_MM)


def body_mask(shape_yx) -> np.ndarray:
    ny, nx = shape_yx
    y, x = np.mgrid[0:ny, 0:nx]
    return ((y - (ny - 1) / 2) ** 2 + (x - (nx - 1) / 2) ** 2) < (min(ny, nx) / 2.5) ** 2


def synthetic_thick_volume(shape=(10, 24, 20), spacing=(0.8, 0.75, 5.0), origin=(-12.0, 30.0, 80.0),
                           angle_deg: float = 20.0) -> Volume:
    """Thick CT (int16 HU) with an oblique direction, sampled from the analytic truth."""
    geometry = Geometry(shape, spacing, origin, tuple(oblique_lps_direction(angle_deg).ravel()))
    profile = truth_along_normal(geometry.slice_positions())
    array = np.where(body_mask(shape[1:])[None], profile[:, None, None], AIR_HU)
    return Volume(np.round(array).astype(np.int16), geometry)


def add_synthetic_thick_node(scene, name: str = "SyntheticThickCT", **kwargs):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    nodes.update_node_from_volume(node, synthetic_thick_volume(**kwargs))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400.0, 40.0)
    return node


def check_output_geometry(input_node, output_node, spacing: float) -> Geometry:
    """The output has the thin grid of the input: same in-plane grid and direction, slices every
    ``spacing`` mm from the first to the last input slice centre (physical positions)."""
    thick = nodes.geometry_from_node(input_node)
    expected = thin_grid(thick, spacing)
    got = nodes.geometry_from_node(output_node)
    assert got.shape == expected.shape, f"output shape {got.shape} != expected {expected.shape}"
    np.testing.assert_allclose(got.spacing, expected.spacing, atol=1e-6)
    np.testing.assert_allclose(got.direction_matrix, thick.direction_matrix, atol=1e-9)
    np.testing.assert_allclose(got.origin, expected.origin, atol=1e-6)
    np.testing.assert_allclose(got.slice_positions()[[0, -1]], thick.slice_positions()[[0, -1]], atol=1e-6)
    # IJKToRAS of the output: its first/last voxel centres are the same RAS points as the input's.
    first_ras = nodes.ijk_to_ras_from_geometry(got) @ np.array([0, 0, 0, 1.0])
    input_first = nodes.ijk_to_ras_from_geometry(thick) @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(first_ras, input_first, atol=1e-6)
    return got


def check_output_values_bspline(input_node, output_node, interior_tolerance_hu: float = 3.0) -> float:
    """B-spline output against the analytic truth at each output slice's physical position.

    - Where an output slice lies on an input slice centre, it equals that input slice (an
      interpolating spline passes through its samples), so a slice shift would show here.
    - Between the third and the third-to-last input slice, it is within
      ``interior_tolerance_hu`` of the truth. The two outermost intervals at each end are held to
      10 % of the amplitude only: the spline's mirror boundary flattens the profile there.
    - Air outside the body stays air (no invented values).
    Returns the largest interior error in HU."""
    import slicer

    thick = nodes.geometry_from_node(input_node)
    geometry = nodes.geometry_from_node(output_node)
    source = slicer.util.arrayFromVolume(input_node).astype(float)
    array = slicer.util.arrayFromVolume(output_node).astype(float)
    inside = body_mask(geometry.shape[1:])
    positions = geometry.slice_positions()
    thick_positions = thick.slice_positions()
    for k, position in enumerate(positions):
        matches = np.flatnonzero(np.abs(thick_positions - position) < 1e-3)
        if matches.size:
            np.testing.assert_allclose(array[k], source[matches[0]], atol=1.0,
                                       err_msg=f"output slice {k} differs from the input slice at the same position")
    errors = np.abs(array[:, inside] - truth_along_normal(positions)[:, None]).max(axis=1)
    interior = (positions >= thick_positions[2] - 1e-6) & (positions <= thick_positions[-3] + 1e-6)
    assert errors[interior].max() < interior_tolerance_hu, (
        f"B-spline error up to {errors[interior].max():.2f} HU inside (tolerance {interior_tolerance_hu})")
    assert errors.max() < 0.1 * AMPLITUDE_HU, f"B-spline error up to {errors.max():.2f} HU near the ends"
    np.testing.assert_allclose(array[:, ~inside], AIR_HU, atol=1.0)
    return float(errors[interior].max())


def check_output_values_plausible(input_node, output_node) -> None:
    """Any method: finite HU, nothing beyond the input's range by more than the range itself."""
    import slicer

    source = slicer.util.arrayFromVolume(input_node).astype(float)
    out = slicer.util.arrayFromVolume(output_node).astype(float)
    assert np.all(np.isfinite(out)), "the output contains NaN or infinite values"
    span = source.max() - source.min()
    assert out.min() >= source.min() - span and out.max() <= source.max() + span, (
        f"output range [{out.min():.0f}, {out.max():.0f}] HU is far outside the input's "
        f"[{source.min():.0f}, {source.max():.0f}]"
    )


def check_layout(scene, input_node, output_node) -> None:
    arrangement = scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement()
    assert arrangement == layout.SIDE_BY_SIDE, f"layout is {arrangement}, not side by side"
    left = layout.composite_node(scene, layout.LEFT_VIEW)
    right = layout.composite_node(scene, layout.RIGHT_VIEW)
    assert left.GetBackgroundVolumeID() == input_node.GetID(), "the input is not in the left view"
    assert right.GetBackgroundVolumeID() == output_node.GetID(), "the output is not in the right view"
    assert left.GetLinkedControl() and right.GetLinkedControl(), "the slice views are not linked"


def interpolate_in_process(scene, input_node, spacing: float = 1.0, method: str = "bspline"):
    """A classical method run in this process (numpy and scipy, both in a stock Slicer), through
    the module's own node conversion, request, output node and layout: what the self-test checks
    on a Slicer where nothing is installed and no network is reached. Returns the output node."""
    from ctsliceinterp.api import interpolate

    from .logic import job_request

    volume, target = nodes.prepare_input(input_node, spacing)
    result = interpolate(volume, job_request(method, spacing))
    output = nodes.write_output(scene, input_node, result.volume, name=nodes.output_name(input_node.GetName(), spacing),
                                expected=target)
    layout.show_side_by_side(scene, input_node, output)
    return output


def make_untrained_tiny_model(folder):
    """Write an *untrained* model of the ``tiny`` config to ``folder``; return ``(folder, None)``
    or ``(None, reason)`` when this build has no diffusion model code. It exercises the diffusion
    path, the server and the geometry end to end; it says nothing about image quality."""
    try:
        import torch

        from ctsliceinterp.pipelines.checkpoint import save_checkpoint
        from ctsliceinterp.models.configs import get_config
        from ctsliceinterp.models.unet import UNet3D
        from ctsliceinterp.models.vae import SliceVAE
    except ImportError as exc:
        return None, f"the diffusion model code is not available: {exc}"
    config = get_config("tiny")
    torch.manual_seed(0)
    try:
        save_checkpoint(folder, SliceVAE(config.vae), UNet3D(config.unet), config, latent_scale=1.0,
                        metadata={"note": "untrained, for tests only"})
    except TypeError as exc:  # model constructors changed
        return None, f"cannot build the tiny model with this code: {exc}"
    return folder, None
