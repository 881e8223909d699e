"""The server serves every learned method's shipped model: regression jobs run through it and give
what the same request gives in process; a model is only ever named, never a path from a client."""

from __future__ import annotations

import numpy as np
import pytest

from testsupport import oblique_direction
from ctsliceinterp.api import InterpolationRequest, interpolate
from ctsliceinterp.core.errors import InputError
from ctsliceinterp.core.volume import Volume
from ctsliceinterp.serving.client import Client, InputRejected
from ctsliceinterp.api import model_method
from ctsliceinterp.serving.server.models import ModelRegistry
from live_server import start_server  # noqa: F401 - fixture
from test_server import assert_same_volume


def _thick() -> Volume:
    rng = np.random.default_rng(3)
    array = rng.normal(40, 200, (5, 24, 20)).astype(np.float32)
    return Volume.from_array(array, (0.7, 0.7, 5.0), (-3.0, 4.0, 50.0), oblique_direction(15.0), {"slice_thickness": 5.0})


def _tiny_v1_model(folder):
    """A tiny, untrained latent diffusion v1 folder (v1 ships no model: users train their own)."""
    import torch

    from ctsliceinterp.models.configs import get_config
    from ctsliceinterp.models.unet import UNet3D
    from ctsliceinterp.models.vae import SliceVAE
    from ctsliceinterp.pipelines.checkpoint import save_checkpoint

    config = get_config("tiny")
    torch.manual_seed(0)
    return save_checkpoint(folder, SliceVAE(config.vae), UNet3D(config.unet), config, latent_scale=1.0)


def test_each_model_knows_its_method_and_the_default_is_the_packages(tmp_path):
    v1 = str(_tiny_v1_model(tmp_path / "my_v1"))
    assert model_method("regression") == "regression" and model_method(v1) == "diffusion"
    with pytest.raises(InputError, match="not a shipped model"):
        model_method("no-such-model")
    with pytest.raises(InputError, match="not a shipped model"):
        ModelRegistry(["no-such-model"])
    registry = ModelRegistry([v1, "regression"], device="cpu")
    from ctsliceinterp.api import DEFAULT_METHOD

    assert registry.default_method() == DEFAULT_METHOD
    assert registry.check("regression", None) == "regression" and registry.check("diffusion", None) == "my_v1"
    with pytest.raises(InputError, match="unknown regression model 'my_v1'"):
        registry.check("regression", "my_v1")  # a diffusion model cannot run as regression


def test_regression_job_through_the_server_matches_in_process(start_server):
    server = start_server(models=["regression"], device="cpu")
    client = Client(server.url)
    listed = {m["name"]: m for m in client.models()}
    assert listed["regression"]["method"] == "regression" and listed["regression"]["kind"] == "regression"
    thick = _thick()
    thin, _ = client.run(thick, {"method": "regression", "spacing": 1.0}, poll_interval=0.05)
    local = interpolate(thick, InterpolationRequest(method="regression", spacing=1.0, device="cpu")).volume
    assert_same_volume(thin, local)
    with pytest.raises(InputRejected, match="no diffusion model"):
        client.submit(thick, {"method": "diffusion"})


# --- residual_diffusion ---------------------------------------------------------------------
def _tiny_residual_model(folder):
    """A tiny, untrained residual diffusion model folder whose heads act (a zero head would return
    the regression base whatever the sampling)."""
    import torch

    from ctsliceinterp.models.guided_vae import GuidedSliceVAE
    from ctsliceinterp.models.regression import RegressionConfig, ThroughPlaneNet
    from ctsliceinterp.models.unet import UNet3D
    from ctsliceinterp.pipelines.residual_diffusion import named_config, save_residual_model

    config = named_config("tiny")
    torch.manual_seed(0)
    vae, unet = GuidedSliceVAE(config.vae), UNet3D(config.unet)
    regression = ThroughPlaneNet(RegressionConfig(widths=(8, 8, 8)))
    for p in (*vae.head[-1].parameters(), *unet.conv_out.parameters(), *regression.head.parameters()):
        torch.nn.init.normal_(p, std=0.02)
    return save_residual_model(folder, vae, regression, config, unet)


@pytest.mark.usefixtures("one_torch_thread")
def test_residual_diffusion_through_the_server_default_and_two_samples(start_server, tmp_path, capsys):
    from ctsliceinterp.cli import main
    from ctsliceinterp.io import read_volume, write_volume

    folder = _tiny_residual_model(tmp_path / "rd_tiny")
    server = start_server(models=[str(folder)], device="cpu")
    client = Client(server.url)
    listed = {m["name"]: m for m in client.models()}
    assert listed["rd_tiny"]["method"] == "residual_diffusion"
    thick = _thick()
    # The default output: the posterior mean (the x0 head), no uncertainty, as in process.
    thin, uncertainty = client.run(thick, {"method": "residual_diffusion", "spacing": 1.0}, poll_interval=0.05,
                                   busy_timeout=30, deadline=60)  # a broken server fails the test, not hangs it
    local = interpolate(thick, InterpolationRequest(method="residual_diffusion", model=str(folder), spacing=1.0,
                                                    device="cpu"))
    assert uncertainty is None and local.uncertainty is None
    assert_same_volume(thin, local.volume)
    # --samples 2 through the CLI and the client: the mean and its standard deviation.
    write_volume(thick, tmp_path / "thick.nrrd")
    code = main(["interpolate", str(tmp_path / "thick.nrrd"), "-o", str(tmp_path / "mean.nrrd"), "--server", server.url,
                 "--method", "residual_diffusion", "--samples", "2", "--seed", "0", "--uncertainty",
                 str(tmp_path / "std.nrrd"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    mean, std = read_volume(tmp_path / "mean.nrrd"), read_volume(tmp_path / "std.nrrd")
    assert std.shape == mean.shape == thin.shape and float(std.array.max()) > 0.0
    assert not np.allclose(mean.array, thin.array, atol=1e-2)  # two samples' mean is not the x0 head's


@pytest.mark.usefixtures("one_torch_thread")
def test_a_model_named_without_a_method_runs_its_own_method_on_the_server(start_server, tmp_path, capsys):
    """``interpolate --server URL --model NAME`` sends no method: the server runs NAME's method
    (the command line used to send diffusion's, and this server's default is regression), checks
    the sampling options against it, and names the models it serves when NAME is none of them."""
    from ctsliceinterp.cli import main
    from ctsliceinterp.io import read_volume, write_volume

    folder = _tiny_residual_model(tmp_path / "rd_tiny")
    server = start_server(models=["regression", str(folder)], device="cpu")
    thick = _thick()
    write_volume(thick, tmp_path / "thick.nrrd")
    code = main(["interpolate", str(tmp_path / "thick.nrrd"), "-o", str(tmp_path / "out.nrrd"), "--server", server.url,
                 "--model", "rd_tiny", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    local = interpolate(thick, InterpolationRequest(method="residual_diffusion", model=str(folder), spacing=1.0, device="cpu"))
    assert_same_volume(read_volume(tmp_path / "out.nrrd"), local.volume)
    client = Client(server.url)
    with pytest.raises(InputRejected, match="regression takes no samples: it applies to residual_diffusion, diffusion"):
        client.submit(thick, {"model": "regression", "samples": 2})
    with pytest.raises(InputRejected, match="this server serves no model 'nope'; it serves regression, rd_tiny"):
        client.submit(thick, {"model": "nope"})
    code = main(["interpolate", str(tmp_path / "thick.nrrd"), "-o", str(tmp_path / "bad.nrrd"), "--server", server.url,
                 "--model", "regression", "--steps", "4", "--no-progress"])
    assert code != 0 and "regression takes no steps: it applies to residual_diffusion" in capsys.readouterr().err
    assert not (tmp_path / "bad.nrrd").exists()


def test_a_server_without_a_residual_model_names_it(start_server):
    server = start_server(models=["regression"], device="cpu")
    with pytest.raises(InputRejected, match="serves no residual_diffusion model"):
        Client(server.url).submit(_thick(), {"method": "residual_diffusion"})


def _residual_marker(folder, inference):
    """A residual_diffusion folder holding only its config (what the registry reads; no torch)."""
    import json

    folder.mkdir()
    (folder / "residual_diffusion.json").write_text(json.dumps({"config": {"inference": inference}}))
    return str(folder)


@pytest.mark.parametrize("estimator, samples, voxels, volumes", [
    ("x0_head", None, 1, 1), ("x0_head", 1, 1, 1), ("x0_head", 3, 3, 2),
    # A model whose default output is the mean of its mean_samples samples returns their spread too.
    ("samples", None, 3, 2), ("samples", 1, 1, 1),
])
def test_a_job_counts_the_samples_and_volumes_its_model_will_return(tmp_path, estimator, samples, voxels, volumes):
    from ctsliceinterp.core.grid import thin_grid
    from ctsliceinterp.serving.server.intake import VolumeTooLarge, _check_output_size
    from ctsliceinterp.serving.server.jobs import Job

    registry = ModelRegistry([_residual_marker(tmp_path / "rd", {"mean_estimator": estimator, "mean_samples": 3})])
    request = InterpolationRequest(method="residual_diffusion", samples=samples)
    request.model = registry.check("residual_diffusion", None)
    runs = registry.samples(request)
    target = thin_grid(_thick().geometry, 1.0)
    job = Job("id", request, None, target, samples=runs)
    size = int(np.prod(target.shape))
    assert runs == voxels and job.output_voxels == voxels * size and job.result_bytes == volumes * 4 * size
    _check_output_size(target.shape, runs, voxels * size)  # at the limit: accepted
    with pytest.raises(VolumeTooLarge):
        _check_output_size(target.shape, runs, voxels * size - 1)


def test_the_default_samples_come_from_each_models_config(tmp_path):
    from ctsliceinterp.api import MAX_SAMPLES
    from ctsliceinterp.serving.server.models import default_samples, inference_settings

    def samples(spec, method="residual_diffusion"):
        return default_samples(inference_settings(spec, method))

    assert samples(_residual_marker(tmp_path / "a", {"mean_estimator": "samples", "mean_samples": 5})) == 5
    assert samples(_residual_marker(tmp_path / "b", {"mean_estimator": "samples"})) == MAX_SAMPLES  # not said: the most
    assert samples(_residual_marker(tmp_path / "c", {"mean_estimator": "x0_head"})) == 1
    assert samples("residual_diffusion") == 1  # the shipped model: the x0 head
    assert samples("regression", "regression") == 1
    assert inference_settings(str(tmp_path / "missing"), "residual_diffusion") == {}


def test_sampling_options_alone_for_an_x0_head_model_are_a_400_before_it_is_queued(start_server):
    """The shipped residual model's default output is the x0 head: steps or a sampler without samples
    would fail in the worker after the model loads; they are refused at intake, with the pipeline's words."""
    server = start_server(models=["residual_diffusion"], device="cpu")
    client = Client(server.url)
    for extra in ({"steps": 8}, {"sampler": "ddim"}):
        with pytest.raises(InputRejected, match="x0 head.*takes no steps or sampler") as refused:
            client.submit(_thick(), {"method": "residual_diffusion", "spacing": 1.0, **extra})
        assert refused.value.status == 400
    assert server.manager.counts()["held"] == 0


def test_a_server_counts_a_default_job_of_a_sampling_mean_model_as_mean_and_spread(start_server, tmp_path, monkeypatch):
    """The held-results limit counts what the job will hold (the mean and the spread: 2 volumes)
    and refuses it before it is queued; one sample (1 volume) still fits. It used to count both as one."""
    from ctsliceinterp.core.grid import thin_grid
    from ctsliceinterp.serving.client import ServerBusy

    monkeypatch.setattr(ModelRegistry, "preload", lambda self: None)  # the folder holds a config, no weights
    folder = _residual_marker(tmp_path / "rd_mean", {"mean_estimator": "samples", "mean_samples": 2})
    thick = _thick()
    one_volume = int(np.prod(thin_grid(thick.geometry, 1.0).shape)) * 4
    server = start_server(models=[folder], device="cpu", max_held_result_bytes=2 * one_volume)
    client = Client(server.url)
    client.submit(thick, {"method": "bspline", "spacing": 1.0})  # holds one volume until downloaded
    with pytest.raises(ServerBusy, match="this job's"):
        client.submit(thick, {"method": "residual_diffusion", "spacing": 1.0})
    assert server.manager.counts()["held"] == 1
    client.submit(thick, {"method": "residual_diffusion", "spacing": 1.0, "samples": 1})
    assert server.manager.counts()["held"] == 2


@pytest.mark.parametrize("params, message", [
    ({"method": "bspline", "steps": 20}, "bspline takes no steps: it applies to residual_diffusion, diffusion"),
    ({"method": "regression", "samples": 4, "steps": 8},
     "regression takes no steps, samples: they apply to residual_diffusion, diffusion"),
    ({"samples": 4}, "bspline takes no samples"),  # no method: this server's default, B-spline, is checked
])
def test_a_job_with_options_its_method_does_not_take_is_a_400_before_it_is_queued(start_server, params, message):
    server = start_server()
    with pytest.raises(InputRejected, match=f": {message}") as refused:
        Client(server.url).submit(_thick(), {"spacing": 1.0, **params})
    assert refused.value.status == 400 and server.manager.counts()["held"] == 0
