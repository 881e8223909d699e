"""The Lib against a REAL backend server on 127.0.0.1, started by the Lib's own LocalBackend
(the code Slicer uses): B-spline and the tiny diffusion model end to end, cancel, and every
failure (unreachable server, bad token, backend crash) leaving the scene as it was."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

import slicer
from CTSliceInterpLib import layout, logic, nodes, testing
from CTSliceInterpLib.local_backend import LocalBackend
from slicerlib_helpers import add_volume_node

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the server extra (fastapi, uvicorn) is not installed")


def _scene_node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return testing.make_untrained_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def backend(tiny_model):
    """One warm local backend for the whole module, as in Slicer."""
    path, _ = tiny_model
    server = LocalBackend(python=sys.executable, models=[str(path)] if path else [], device="cpu",
                          startup_timeout=120, environment={"OMP_NUM_THREADS": "2"})
    server.ensure_started()
    yield server
    server.stop()
    assert not server.is_running()


@pytest.fixture
def interp(scene, backend):
    return logic.InterpolationLogic(scene=scene, local_backend_factory=lambda: backend)


def test_bspline_through_the_local_backend(scene, interp, backend):
    source = testing.add_synthetic_thick_node(scene)
    before = slicer.util.arrayFromVolume(source).copy()
    seen = []

    output = interp.process(source, spacing=1.0, method="bspline", progressCallback=seen.append, timeout=60)

    assert output.GetName() == "SyntheticThickCT_1mm"
    testing.check_output_geometry(source, output, 1.0)
    testing.check_output_values_bspline(source, output)
    testing.check_layout(scene, source, output)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), before)
    assert seen and seen[-1].state == "done"
    # Warm: the same child serves the next run.
    pid = backend.pid
    again = interp.process(source, spacing=2.5, method="bspline", timeout=60)
    assert backend.pid == pid
    testing.check_output_geometry(source, again, 2.5)


def test_existing_output_node_is_filled_not_duplicated(scene, interp):
    source = testing.add_synthetic_thick_node(scene)
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my result")
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    output = interp.process(source, target, spacing=1.25, method="linear", timeout=60)
    assert output is target and target.GetName() == "my result"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count
    testing.check_output_geometry(source, target, 1.25)


def test_tiny_diffusion_model_with_uncertainty(scene, interp, tiny_model):
    path, reason = tiny_model
    if path is None:
        pytest.skip(reason)
    methods = dict((value, label) for label, value in interp.availableMethods())
    assert "bspline" in methods and "tiny" in methods, methods  # the menu offers the served model
    source = testing.add_synthetic_thick_node(scene, shape=(6, 32, 32), spacing=(0.8, 0.8, 5.0))
    output = interp.process(source, spacing=1.0, method="tiny", steps=2, samples=2, seed=1, timeout=120)
    testing.check_output_geometry(source, output, 1.0)
    testing.check_output_values_plausible(source, output)
    uncertainty = output.GetNodeReference("CTSliceInterpUncertainty")
    assert uncertainty is not None and uncertainty.GetName() == "SyntheticThickCT_1mm_uncertainty"
    testing.check_output_geometry(source, uncertainty, 1.0)
    assert np.all(slicer.util.arrayFromVolume(uncertainty) >= 0)
    assert layout.composite_node(scene, "Yellow").GetForegroundVolumeID() == uncertainty.GetID()


def test_cancel_leaves_nothing(scene, interp, tiny_model, backend):
    path, _ = tiny_model
    source = testing.add_synthetic_thick_node(scene, shape=(12, 64, 64), spacing=(0.8, 0.8, 5.0))
    before = _scene_node_ids(scene)
    method = "tiny" if path else "lanczos"
    run = interp.start(source, spacing=0.25, method=method, steps=50)
    while run.poll().state in ("created", "starting", "uploading"):
        time.sleep(0.02)
    run.cancel()
    status = run.session.wait(timeout=30)
    assert status.state == "cancelled", status
    with pytest.raises(logic.ProcessingError, match="cancelled"):
        interp.finish(run)
    assert _scene_node_ids(scene) == before
    # The server dropped the job and its data.
    from ctsliceinterp.serving.client import Client, ClientError

    with pytest.raises(ClientError):
        Client(backend.url, token=backend.token).result(run.session.job_id)


def test_unreachable_server(scene, make_volume):
    source = add_volume_node(scene, make_volume())
    before = _scene_node_ids(scene)
    interp = logic.InterpolationLogic(scene=scene)
    with pytest.raises(logic.ProcessingError, match="cannot reach"):
        interp.process(source, server="http://127.0.0.1:9", token="x", timeout=60)  # port 9: discard, closed
    assert _scene_node_ids(scene) == before


def test_bad_token(scene, backend, make_volume):
    source = add_volume_node(scene, make_volume())
    before = _scene_node_ids(scene)
    interp = logic.InterpolationLogic(scene=scene)
    with pytest.raises(logic.ProcessingError, match="rejected the access token"):
        interp.process(source, server=backend.url, token="not-the-token", timeout=60)
    assert _scene_node_ids(scene) == before


def test_backend_crash_is_reported_and_recovered(scene, tiny_model, make_volume):
    """Kill the child mid-job: a clear message, no node; the next run starts a new child."""
    source = testing.add_synthetic_thick_node(scene, shape=(12, 64, 64), spacing=(0.8, 0.8, 5.0))
    before = _scene_node_ids(scene)
    server = LocalBackend(python=sys.executable, device="cpu", environment={"OMP_NUM_THREADS": "1"})
    interp = logic.InterpolationLogic(scene=scene, local_backend_factory=lambda: server)
    try:
        run = interp.start(source, spacing=0.1, method="lanczos")
        while run.poll().state in ("created", "starting"):
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)
        status = run.session.wait(timeout=60)
        if status.state == "done":
            pytest.skip("the job finished before the backend was killed")
        assert status.state == "failed"
        assert "stopped unexpectedly" in status.error
        with pytest.raises(logic.ProcessingError, match="stopped unexpectedly"):
            interp.finish(run)
        assert _scene_node_ids(scene) == before
        output = interp.process(source, spacing=2.5, method="linear", timeout=120)
        testing.check_output_geometry(source, output, 2.5)
    finally:
        server.stop()


def test_backend_that_cannot_start_gives_its_log(scene, make_volume):
    source = add_volume_node(scene, make_volume())
    before = _scene_node_ids(scene)
    broken = LocalBackend(python=sys.executable, extra_args=["--no-such-option"])
    interp = logic.InterpolationLogic(scene=scene, local_backend_factory=lambda: broken)
    with pytest.raises(logic.ProcessingError, match=r"exited during start-up \(exit code 2\)(.|\n)*no-such-option"):
        interp.process(source, timeout=60)
    assert _scene_node_ids(scene) == before
    broken.stop()


def test_cancel_while_the_result_downloads_creates_nothing(scene, interp, monkeypatch):
    """A cancel that arrives while the result comes down wins: no node is made from it."""
    from ctsliceinterp.serving.client import Client

    source = testing.add_synthetic_thick_node(scene)
    before = _scene_node_ids(scene)
    runs = []
    download = Client.result

    def result_then_cancel(self, *args, **kwargs):
        volumes = download(self, *args, **kwargs)
        runs[0].cancel()  # the user clicks Cancel as the download ends
        return volumes

    monkeypatch.setattr(Client, "result", result_then_cancel)
    runs.append(interp.start(source, spacing=1.0, method="bspline"))
    status = runs[0].session.wait(timeout=60)
    assert status.state == "cancelled", status
    with pytest.raises(logic.ProcessingError, match="cancelled"):
        interp.finish(runs[0])
    assert _scene_node_ids(scene) == before


def _slow_run(interp, scene):
    source = testing.add_synthetic_thick_node(scene, shape=(12, 64, 64), spacing=(0.8, 0.8, 5.0))
    run = interp.start(source, spacing=0.1, method="lanczos")
    while run.poll().state in ("created", "starting"):
        time.sleep(0.02)
    return source, run


def test_closing_the_scene_during_a_run_creates_nothing(scene, interp):
    """The widget cancels the run when the scene closes (a static check); a run that ends anyway
    (a console run) puts nothing into the new scene."""
    source, run = _slow_run(interp, scene)
    scene.Clear(False)  # File > Close scene
    run.session.wait(timeout=120)
    with pytest.raises(logic.ProcessingError, match="scene closed"):
        interp.finish(run)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_a_removed_input_or_output_gets_no_result(scene, interp):
    source, run = _slow_run(interp, scene)
    scene.RemoveNode(source)
    before = _scene_node_ids(scene)
    run.session.wait(timeout=120)
    with pytest.raises(logic.ProcessingError, match="input volume was removed"):
        interp.finish(run)
    assert _scene_node_ids(scene) == before

    source = testing.add_synthetic_thick_node(scene)
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my result")
    run = interp.start(source, target, spacing=1.0, method="linear")
    scene.RemoveNode(target)
    before = _scene_node_ids(scene)
    run.session.wait(timeout=60)
    with pytest.raises(logic.ProcessingError, match="output volume was removed"):
        interp.finish(run)
    assert _scene_node_ids(scene) == before


def test_cancel_during_the_upload_stops_it(scene, interp, monkeypatch):
    """A cancel while the volume goes up stops the upload (between 1 MiB slices), not after it."""
    import http.client

    source = testing.add_synthetic_thick_node(scene, shape=(24, 256, 256), spacing=(0.8, 0.8, 5.0))
    before = _scene_node_ids(scene)
    runs, sent = [], []
    send = http.client.HTTPConnection.send

    def send_and_cancel(self, data):
        deadline = time.monotonic() + 10
        while not runs and time.monotonic() < deadline:  # the worker may start before start() returns
            time.sleep(0.01)
        sent.append(len(data))
        if sum(sent) > 2**20:
            runs[0].cancel()  # the user clicks Cancel once 1 MiB has gone out
        return send(self, data)

    monkeypatch.setattr(http.client.HTTPConnection, "send", send_and_cancel)
    runs.append(interp.start(source, spacing=2.5, method="linear"))
    status = runs[0].session.wait(timeout=60)
    monkeypatch.undo()
    assert status.state == "cancelled", status
    volume_bytes = 24 * 256 * 256 * 2
    assert sum(sent) < volume_bytes / 2, f"{sum(sent)} of {volume_bytes} bytes were sent after the cancel"
    with pytest.raises(logic.ProcessingError, match="cancelled"):
        interp.finish(runs[0])
    assert _scene_node_ids(scene) == before
