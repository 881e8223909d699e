"""`interpolate --samples`: unset means the method's default output (residual_diffusion: the
posterior mean; diffusion: one sample), 1 one realistic sample, N > 1 the mean and the spread."""

from __future__ import annotations

import pytest

from ctsliceinterp.cli import build_parser
from ctsliceinterp.commands.interpolate import build_request
from ctsliceinterp.core.errors import InputError


def _request(*options):
    return build_request(build_parser().parse_args(["interpolate", "in.nrrd", "-o", "out.nrrd", *options]))


@pytest.mark.parametrize("options, samples", [((), None), (("--samples", "1"), 1), (("--samples", "3"), 3)])
def test_the_cli_sends_samples_only_when_given(options, samples):
    request = _request("--method", "residual_diffusion", *options)
    assert request.method == "residual_diffusion" and request.samples == samples
    assert request.to_params().get("samples") == samples and ("samples" in request.to_params()) == bool(options)


def test_a_residual_diffusion_folder_names_its_method_even_with_sampling_options(tmp_path):
    folder = tmp_path / "rd"
    folder.mkdir()
    (folder / "residual_diffusion.json").write_text("{}")  # the marker is all model_method reads
    request = _request("--model", str(folder), "--samples", "2", "--uncertainty", "std.nrrd")
    assert (request.method, request.samples) == ("residual_diffusion", 2)


@pytest.mark.parametrize("options", [(), ("--samples", "2"), ("--steps", "4")])
def test_a_model_without_a_method_on_a_server_leaves_the_method_to_the_server(options):
    """The server knows each served model's method (and checks the sampling options against it);
    a shipped name or not, the command line sends none (it used to send diffusion)."""
    for model in ("residual_diffusion", "regression", "my_folder"):
        request = _request("--server", "http://127.0.0.1:1", "--model", model, *options)
        assert request.method == "" and "method" not in request.to_params() and request.to_params()["model"] == model


@pytest.mark.parametrize("options, message", [
    (("--method", "residual_diffusion", "--uncertainty", "std.nrrd"), "--uncertainty needs --samples 2 or more"),
    (("--method", "residual_diffusion", "--samples", "1", "--uncertainty", "std.nrrd"), "--uncertainty needs --samples 2"),
    (("--method", "diffusion", "--samples", "0"), "--samples must be at least 1"),
    (("--method", "regression", "--samples", "1"), "^regression takes no samples: it applies to residual_diffusion, diffusion$"),
    (("--method", "regression", "--steps", "20"), "^regression takes no steps: it applies to residual_diffusion, diffusion$"),
    (("--method", "bspline", "--steps", "4", "--sampler", "ddim"), "^bspline takes no steps, sampler: they apply to"),
    (("--method", "regression", "--seed", "1", "--server", "http://127.0.0.1:1"), "^regression takes no seed"),  # before any upload
    (("--method", "bspline", "--model", "regression"), "^bspline takes no model"),
])
def test_sampling_options_a_request_cannot_honour_are_refused(options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _request(*options)


def test_the_help_says_which_output_is_which(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["interpolate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the posterior mean for residual_diffusion, one sample for diffusion" in text
    assert "1: one realistic sample" in text and "--samples 2 or more" in text


def test_sampling_options_alone_mean_latent_diffusion_v2_which_says_when_it_is_not_installed(tmp_path, monkeypatch):
    import ctsliceinterp.api as api

    assert _request("--samples", "1").method == "residual_diffusion"  # the shipped weights are in the package
    monkeypatch.setattr(api, "WEIGHTS_DIR", tmp_path)  # a package without them: still v2 (v1 ships no model)...
    request = _request("--steps", "4")
    assert request.method == "residual_diffusion"
    with pytest.raises(InputError, match="^the shipped model 'residual_diffusion' is not installed"):  # ...which says so
        api.load_model(request.method, request.model)


def test_an_asked_for_uncertainty_that_does_not_come_back_is_an_error_not_a_missing_file(tmp_path, monkeypatch, capsys):
    import numpy as np

    import ctsliceinterp.api as api
    from ctsliceinterp import cli
    from ctsliceinterp.core.volume import Volume
    from ctsliceinterp.io import write_volume

    ct = np.random.default_rng(0).normal(-200, 300, (4, 8, 8)).astype(np.float32)  # HU, not a label map
    thick = Volume.from_array(ct, (1.0, 1.0, 5.0), metadata={"slice_thickness": 5.0})
    write_volume(thick, tmp_path / "in.nrrd")
    real = api.interpolate
    # A backend that returns no uncertainty (as a server's method could): the run itself succeeds.
    monkeypatch.setattr(api, "interpolate",
                        lambda volume, request, progress=None: real(volume, api.InterpolationRequest(method="bspline")))
    code = cli.main(["interpolate", str(tmp_path / "in.nrrd"), "-o", str(tmp_path / "out.nrrd"), "--method",
                     "residual_diffusion", "--samples", "2", "--uncertainty", str(tmp_path / "std.nrrd"), "--no-progress"])
    assert code != 0 and "has no uncertainty volume" in capsys.readouterr().err
    assert (tmp_path / "out.nrrd").is_file() and not (tmp_path / "std.nrrd").exists()


@pytest.mark.parametrize("options", [("--samples", "2"), ("--steps", "4"), ("--sampler", "ddim")])
def test_sampling_options_without_a_method_mean_latent_diffusion_v2_locally_and_on_a_server(options, monkeypatch):
    """Not this install's default method (nor the server's): the same command is the same job anywhere."""
    import ctsliceinterp.commands.interpolate as command

    monkeypatch.setattr(command, "DEFAULT_METHOD", "diffusion")  # an install whose default samples
    for server in ((), ("--server", "http://127.0.0.1:1")):
        request = _request(*options, *server)
        assert request.method == "residual_diffusion" and request.to_params()["method"] == "residual_diffusion"
    assert _request("--server", "http://127.0.0.1:1").method == ""  # no option: the server's default


def test_the_help_says_what_sampling_options_alone_mean(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["interpolate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--uncertainty mean --method residual_diffusion, locally and with --server alike" in text
