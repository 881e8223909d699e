"""Volume nodes <-> Volume: geometry against known physical positions, bad inputs, output nodes."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import slicer
from CTSliceInterpLib import layout, logic, nodes
from ctsliceinterp.core.errors import InputError, OutputError
from ctsliceinterp.core.volume import Volume
from slicerlib_helpers import add_volume_node, ijk_to_ras, set_ijk_to_ras

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def oblique_ras_directions(flip: bool = False) -> np.ndarray:
    a = np.deg2rad(25.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a / 3), -np.sin(a / 3), 0], [np.sin(a / 3), np.cos(a / 3), 0], [0, 0, 1]])
    d = rz @ rx
    return d @ np.diag([1, -1, 1]) if flip else d


CASES = {
    # DICOM axial (LPS identity): Slicer shows negative x and y columns.
    "axial": np.diag([-1.0, -1.0, 1.0]),
    "oblique": oblique_ras_directions(),
    "flipped": oblique_ras_directions(flip=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_node_geometry_matches_known_physical_positions(scene, case):
    spacing = np.array([0.7, 0.8, 5.0])
    origin_ras = np.array([12.5, -30.0, 44.0])
    matrix = np.eye(4)
    matrix[:3, :3] = CASES[case] * spacing
    matrix[:3, 3] = origin_ras
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "thick")
    array = np.random.default_rng(1).integers(-1000, 1500, size=(6, 9, 7)).astype(np.int16)
    slicer.util.updateVolumeFromArray(node, array)
    set_ijk_to_ras(node, matrix)

    volume = nodes.volume_from_node(node)

    assert volume.shape == (6, 9, 7)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.array.dtype == np.int16
    np.testing.assert_allclose(volume.spacing, spacing)
    # Every corner voxel lands on the LPS point of its RAS position.
    for ijk in [(0, 0, 0), (6, 0, 0), (0, 8, 0), (0, 0, 5), (6, 8, 5), (3, 4, 2)]:
        ras = matrix @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(volume.geometry.index_to_physical(ijk), RAS_TO_LPS @ ras[:3], atol=1e-9)
    # Back to a node: the same IJKToRAS, the same voxels.
    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    nodes.update_node_from_volume(copy, volume)
    np.testing.assert_allclose(ijk_to_ras(copy), matrix, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), array)


def test_flip_is_its_own_inverse_and_flips_first_two_rows():
    direction = oblique_ras_directions()
    origin = np.array([1.0, 2.0, 3.0])
    o, d = nodes.flip_ras_lps(origin, direction)
    np.testing.assert_allclose(o, [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(d[:2], -direction[:2])
    np.testing.assert_allclose(d[2], direction[2])
    o2, d2 = nodes.flip_ras_lps(o, d)
    np.testing.assert_allclose(o2, origin)
    np.testing.assert_allclose(d2, direction)


def test_dicom_axial_volume_known_ijk_to_ras(scene, make_volume):
    thick = make_volume(origin=(10.0, 20.0, 30.0))  # LPS, identity direction
    node = add_volume_node(scene, thick)
    expected = np.array([[-0.8, 0, 0, -10.0], [0, -0.7, 0, -20.0], [0, 0, 5.0, 30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(ijk_to_ras(node), expected, atol=1e-12)


def _scene_node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_bad_inputs_are_refused_before_anything_is_made(scene, make_volume):
    thick = make_volume()
    good = add_volume_node(scene, thick, "good")
    label = add_volume_node(scene, thick.replace(array=(thick.array > 0).astype(np.uint8)), "labels",
                            class_name="vtkMRMLLabelMapVolumeNode", study=False)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((3, 8, 8, 3), np.uint8))
    flat = add_volume_node(scene, Volume.from_array(np.zeros((1, 8, 8), np.int16), (1, 1, 5)), "single slice",
                           study=False)
    thin = add_volume_node(scene, make_volume(spacing=(0.8, 0.7, 1.0)), "thin", study=False)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    before_ids = _scene_node_ids(scene)
    before = slicer.util.arrayFromVolume(good).copy()
    lg = logic.InterpolationLogic(scene=scene, local_backend_factory=lambda: pytest.fail("no backend for bad input"))

    cases = [
        (None, None, "no input volume"),
        (label, None, "label map"),
        (rgb, None, "vector/colour"),
        (flat, None, "2-D image"),
        (thin, None, "already at or below"),
        (empty, None, "no image data"),
        (good, good, "output volume is the input"),
        (good, label, "must be a scalar volume"),
    ]
    for input_node, output_node, message in cases:
        with pytest.raises(InputError, match=message):
            lg.start(input_node, output_node, spacing=1.0)
    assert lg.localBackend is None
    assert _scene_node_ids(scene) == before_ids
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(good), before)


def test_output_node_name_geometry_display_and_hierarchy(scene, make_volume):
    from ctsliceinterp.core.grid import thin_grid


    thick = make_volume(direction=tuple((RAS_TO_LPS @ oblique_ras_directions()).ravel()))
    source = add_volume_node(scene, thick, "CT thick")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    source.SetAndObserveTransformNodeID(transform.GetID())
    target = thin_grid(thick.geometry, 1.25)
    result = Volume(np.zeros(target.shape, np.float32), target)

    out = nodes.write_output(scene, source, result, name=nodes.output_name("CT thick", 1.25), expected=target)

    assert out.GetName() == "CT thick_1.25mm"
    got = nodes.geometry_from_node(out)
    assert got.shape == target.shape
    np.testing.assert_allclose(got.spacing, (0.8, 0.7, 1.25))
    np.testing.assert_allclose(got.direction_matrix, thick.geometry.direction_matrix, atol=1e-12)
    np.testing.assert_allclose(got.origin, thick.origin, atol=1e-9)  # first thin slice = first thick slice
    assert out.GetDisplayNode().GetWindow() == 400.0 and out.GetDisplayNode().GetLevel() == 40.0
    hierarchy = scene.GetSubjectHierarchyNode()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(out)) == hierarchy.GetItemParent(
        hierarchy.GetItemByDataNode(source))
    assert out.GetParentTransformNode().GetID() == transform.GetID()


def test_result_on_the_wrong_grid_leaves_no_node(scene, make_volume):
    from ctsliceinterp.core.grid import thin_grid

    thick = make_volume()
    source = add_volume_node(scene, thick)
    target = thin_grid(thick.geometry, 1.0)
    wrong = Volume(np.zeros((target.shape[0] - 1,) + target.shape[1:], np.float32),
                   target.with_slices(0.0, target.shape[0] - 1, 1.0))
    before = _scene_node_ids(scene)
    with pytest.raises(OutputError, match="different grid"):
        nodes.write_output(scene, source, wrong, expected=target)
    assert _scene_node_ids(scene) == before


def test_side_by_side_layout(scene, make_volume):
    thick = make_volume()
    left = add_volume_node(scene, thick, "in")
    right = add_volume_node(scene, thick, "out", study=False)
    spread = add_volume_node(scene, thick, "unc", study=False)
    layout.show_side_by_side(scene, left, right, spread)
    assert scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement() == layout.SIDE_BY_SIDE
    red, yellow = layout.composite_node(scene, "Red"), layout.composite_node(scene, "Yellow")
    assert red.GetBackgroundVolumeID() == left.GetID()
    assert yellow.GetBackgroundVolumeID() == right.GetID()
    assert yellow.GetForegroundVolumeID() == spread.GetID() and yellow.GetForegroundOpacity() > 0
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    layout.show_uncertainty(scene, spread, False)
    assert yellow.GetForegroundVolumeID() is None


def test_job_parameters():
    """The menu's choice becomes an InterpolationRequest, sent as its to_params() (the one request
    contract): the server reads back the same request."""
    from ctsliceinterp.api import InterpolationRequest

    def sent(*args, **kwargs):
        params = logic.job_parameters(*args, **kwargs)
        assert params == logic.job_request(*args, **kwargs).to_params()
        return InterpolationRequest.from_params(params)

    request = sent("bspline", 1.0)
    assert (request.method, request.spacing, request.model) == ("bspline", 1.0, None)
    request = sent("tiny", 0.5, steps=4, samples=3, consistency=False, seed=2)
    assert (request.method, request.model, request.steps, request.samples, request.consistency, request.seed) == (
        "diffusion", "tiny", 4, 3, False, 2)
    assert sent("diffusion", 1.0).model is None
    with pytest.raises(InputError):
        logic.job_parameters("tiny", 1.0, samples=0)


def test_uncertainty_overlay_is_transparent_where_the_samples_agree(scene, make_volume):
    """A spread under UNCERTAINTY_THRESHOLD_HU shows nothing: the display node's threshold makes
    those voxels transparent, so the output is not blended with the colour table's black."""
    thick = make_volume()
    left = add_volume_node(scene, thick, "in")
    right = add_volume_node(scene, thick, "out", study=False)
    spread = add_volume_node(scene, thick.replace(array=np.abs(thick.array).astype(np.float32) / 10), "unc",
                             study=False)
    layout.show_side_by_side(scene, left, right, spread)
    display = spread.GetDisplayNode()
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == layout.UNCERTAINTY_THRESHOLD_HU > 0
    assert display.GetUpperThreshold() >= spread.GetImageData().GetScalarRange()[1]
    assert display.GetWindowLevelMin() == layout.UNCERTAINTY_THRESHOLD_HU


def test_uncertainty_checkbox_after_a_run(scene, make_volume):
    """``showUncertainty`` (the widget's checkbox) hides and shows the overlay of a finished run."""
    thick = make_volume()
    source = add_volume_node(scene, thick, "in")
    output = add_volume_node(scene, thick, "out", study=False)
    spread = add_volume_node(scene, thick, "out_uncertainty", study=False)
    output.SetNodeReferenceID(logic.UNCERTAINTY_REFERENCE, spread.GetID())
    layout.show_side_by_side(scene, source, output, spread)
    interp = logic.InterpolationLogic(scene=scene)
    yellow = layout.composite_node(scene, "Yellow")
    assert interp.showUncertainty(output, False) and yellow.GetForegroundVolumeID() is None
    assert interp.showUncertainty(output, True) and yellow.GetForegroundVolumeID() == spread.GetID()
    assert not interp.showUncertainty(source, True)  # no uncertainty volume: nothing to show


def test_first_ct_volume_skips_label_maps(scene, make_volume):
    """The input pre-selected by the widget: a label map loaded first does not hide the CT."""
    volume = make_volume()
    assert nodes.first_ct_volume(scene) is None
    add_volume_node(scene, volume.replace(array=(volume.array > 0).astype(np.uint8)), "labels",
                    class_name="vtkMRMLLabelMapVolumeNode")
    ct = add_volume_node(scene, volume, "CT")
    assert nodes.first_ct_volume(scene) is ct


def test_the_self_tests_in_process_classical_path(scene):
    """What CTSliceInterpTest runs on a stock Slicer (nothing installed, no network)."""
    from CTSliceInterpLib import testing

    source = testing.add_synthetic_thick_node(scene)
    output = testing.interpolate_in_process(scene, source, spacing=1.0, method="bspline")
    assert output.GetName() == "SyntheticThickCT_1mm"
    testing.check_output_geometry(source, output, 1.0)
    testing.check_output_values_bspline(source, output)
    testing.check_layout(scene, source, output)


def test_job_parameters_follow_the_method_registry():
    """Each method gets the options its registry entry takes; one it does not take is refused with
    the registry's words, not dropped (``logic.process(node, method="regression", samples=4)`` in
    the console used to run one regression silently)."""
    from ctsliceinterp.api import METHODS, InterpolationRequest

    given = {"steps": 3, "samples": 2, "seed": 5}
    for name, entry in METHODS.items():
        taken = {key: value for key, value in given.items() if key in entry.options}
        request = InterpolationRequest.from_params(logic.job_parameters(name, 1.0, **taken))
        assert request.method == name
        assert {key: getattr(request, key) for key in given} == {key: taken.get(key) for key in given}
        for key in set(given) - set(taken):
            with pytest.raises(InputError, match=f"{name} takes no {key}"):
                logic.job_request(name, 1.0, **{key: given[key]})


def test_the_widget_enables_the_options_the_method_takes():
    assert logic.method_options("bspline") == ()
    assert {"steps", "samples", "consistency"} <= set(logic.method_options("tiny"))  # a diffusion model
    assert set(logic.method_options("diffusion")) == set(logic.method_options("my_v1"))  # a served v1 model's name


def test_a_session_ends_only_once_its_result_is_stored(make_volume):
    """Client.run reports "done" before it returns the volumes: the session must not look
    finished to the GUI's timer until ``result`` is there."""
    from ctsliceinterp.serving.client import JobProgress

    from CTSliceInterpLib.session import ProcessingSession, ServerTarget

    session = ProcessingSession(make_volume(), {}, ServerTarget(url="http://127.0.0.1:9"))
    session._on_progress(JobProgress("done", 1, 1, state="done", message="done", job_id="j"))
    assert not session.poll().finished and session.result is None
    assert session.job_id == "j"


@pytest.mark.parametrize("samples", [None, 1, 3])
def test_samples_unset_is_left_to_the_method(samples):
    """The widget's 0 ("Posterior mean (default)") is sent as None: no samples field, so the
    server's pipeline gives the method's default output (residual_diffusion: the posterior mean)."""
    from ctsliceinterp.api import InterpolationRequest

    for method in ("residual_diffusion", "tiny"):
        params = logic.job_parameters(method, 1.0, samples=samples)
        assert params.get("samples") == samples and ("samples" in params) == (samples is not None)
        assert InterpolationRequest.from_params(params).samples == samples
    assert logic.job_request("residual_diffusion", 1.0, samples=samples).method == "residual_diffusion"


def test_the_samples_box_says_which_output_is_which():
    assert logic.samples_default_label("residual_diffusion") == "Posterior mean (default)"
    assert logic.samples_default_label("tiny") == "1 sample (default)"  # a diffusion model: one sample
    assert "1: one realistic sample" in logic.samples_help("residual_diffusion")
    assert "posterior-mean estimate" in logic.samples_help("residual_diffusion")
    assert "one realistic sample" not in logic.samples_help("tiny")
    assert logic.samples_help("bspline") == "This method takes no samples."


def test_the_method_menu_offers_a_served_residual_model_with_its_outputs_named():
    class FakeTarget:
        timeout = None

        def connect(self, cancel):
            client = types.SimpleNamespace()
            client.models = lambda: [
                {"name": "bspline", "method": "bspline", "device": "cpu"},
                {"name": "tiny", "method": "diffusion", "device": "cpu"},
                {"name": "residual_diffusion", "method": "residual_diffusion", "device": "cpu"},
            ]
            return client

    methods = logic.InterpolationLogic._methods_of(FakeTarget(), 5.0, None)
    labels = {value: label for label, value in methods}
    assert set(labels) == {"bspline", "tiny", "residual_diffusion"}
    assert labels["residual_diffusion"] == ("residual_diffusion (residual_diffusion, cpu): posterior mean by default; "
                                            "Samples 1: one realistic sample")
    assert labels["tiny"] == "tiny (diffusion, cpu)"


def test_the_local_backend_serves_every_installed_model_and_skips_absent_weights(tmp_path, monkeypatch):
    from CTSliceInterpLib import local_backend

    weights = tmp_path / "src" / "ctsliceinterp" / "models" / "weights"
    for name, marker in (("regression", "regression.json"), ("residual_diffusion", None)):
        (weights / name).mkdir(parents=True)
        if marker:
            (weights / name / marker).write_text("{}")
    extra, v1 = tmp_path / "my_rd", tmp_path / "my_v1"  # the user's own models (v1 ships none)
    for folder, marker in ((extra, "residual_diffusion.json"), (v1, "model.json")):
        folder.mkdir()
        (folder / marker).write_text("{}")
    monkeypatch.setattr(local_backend, "backend_source_dir", lambda: tmp_path / "src")
    monkeypatch.setenv(local_backend.MODELS_ENVIRONMENT_VARIABLE,
                       os.pathsep.join([str(extra), str(tmp_path / "none"), str(v1)]))
    assert local_backend.local_model_specs() == [str(weights / "regression"), str(extra), str(v1)]
    (weights / "residual_diffusion" / "residual_diffusion.json").write_text("{}")  # its weights arrive
    assert str(weights / "residual_diffusion") in local_backend.local_model_specs()


def test_the_bundled_backend_serves_the_shipped_models_and_no_v1_model(monkeypatch):
    """The local backend's menu lists what it serves: regression and residual_diffusion, not v1's
    former 'default' (no longer shipped)."""
    from CTSliceInterpLib import local_backend

    monkeypatch.delenv(local_backend.MODELS_ENVIRONMENT_VARIABLE, raising=False)
    names = [os.path.basename(spec) for spec in local_backend.local_model_specs()]
    assert names == ["regression", "residual_diffusion"]
