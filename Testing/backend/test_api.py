"""The request contract (to_params / from_params) and the method registry."""

import subprocess
import sys

import numpy as np
import pytest

from ctsliceinterp import api
from ctsliceinterp.api import METHODS, SERVER_DEFAULT, InterpolationRequest
from ctsliceinterp.core.classical import interpolation_matrix
from ctsliceinterp.core.errors import InputError
from ctsliceinterp.core.volume import Geometry

TARGET = Geometry((7, 4, 5), (0.5, 0.5, 1.25), (-10.0, 3.0, 2.5), (1, 0, 0, 0, 0, -1, 0, 1, 0))


def test_request_survives_the_round_trip_through_params():
    request = InterpolationRequest(method="diffusion", spacing=0.8, target=TARGET, model="my_v1", steps=7,
                                   sampler="ddim", samples=3, consistency=False, seed=11)
    back = InterpolationRequest.from_params(request.to_params(), device="cpu")
    assert back == InterpolationRequest(**{**request.__dict__, "device": "cpu"})


def test_server_default_is_left_to_the_server():
    params = InterpolationRequest(method=SERVER_DEFAULT).to_params()
    assert "method" not in params
    assert InterpolationRequest.from_params(params, default_method="bspline").method == "bspline"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"colour": "red"}, "unknown job parameter(s) 'colour'"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"method": 3}, "unknown method '3'"),
        ({"spacing": "1"}, "spacing must be a positive number"),
        ({"spacing": True}, "spacing must be a positive number"),
        ({"steps": 2.5}, "steps must be an integer from 1"),
        ({"samples": 0}, "samples must be an integer from 1"),
        ({"seed": -1}, "seed must be an integer from 0"),
        ({"consistency": "yes"}, "consistency must be true or false"),
        ({"model": "../../etc"}, "model must be a name"),
        ({"target": [1, 2]}, "target must be an object"),
        ({"target": {**TARGET.to_dict(), "shape": [7, 4]}}, "target shape must be 3 positive integers"),
        ({"target": {**TARGET.to_dict(), "spacing": [0, 1, 1]}}, "invalid target geometry"),
    ],
)
def test_from_params_is_strict(params, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InterpolationRequest.from_params(params)


def test_geometry_dict_and_affine():
    assert Geometry.from_dict(TARGET.to_dict()) == TARGET
    # Columns of the direction are the i, j, k axes: i = +x, j = +z, k = -y (LPS), by hand:
    # origin + 2 * 0.5 * i + 1 * 0.5 * j + 3 * 1.25 * k = (-10 + 1, 3 - 3.75, 2.5 + 0.5).
    ijk = np.array([2.0, 1.0, 3.0])
    assert np.allclose((TARGET.affine @ np.append(ijk, 1.0))[:3], [-9.0, -0.75, 3.0])
    assert np.allclose(TARGET.index_to_physical(ijk), [-9.0, -0.75, 3.0])


def test_registry_classical_methods_are_implemented_and_learned_ones_name_a_pipeline():
    assert api.DEFAULT_METHOD in METHODS and api.CLASSICAL_FALLBACK in api.CLASSICAL_METHODS
    for method in METHODS.values():
        if method.classical:
            weights = interpolation_matrix(method.name, 4, np.array([0.0, 1.5, 3.0]))
            assert np.allclose(weights.sum(axis=1), 1.0)
        else:
            module, _, name = method.pipeline.partition(":")
            assert module.startswith("ctsliceinterp.pipelines.") and name and method.checkpoint_file
    # Every learned method but latent diffusion v1 (superseded by v2; users train their own) ships a model.
    assert [m.name for m in METHODS.values() if not m.classical and not m.default_model] == [api.DIFFUSION_METHOD]


def test_api_imports_neither_torch_nor_scipy():
    code = "import sys, ctsliceinterp.api; print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_exports_the_public_api_on_first_use():
    code = ("import sys, ctsliceinterp; heavy = [m for m in ('torch', 'scipy', 'SimpleITK') if m in sys.modules]; "
            "from ctsliceinterp import InterpolationRequest, Volume, interpolate, read_volume, write_volume; "
            "from ctsliceinterp.api import interpolate as entry; from ctsliceinterp.io import read_volume as reader; "
            "print(heavy, interpolate is entry, read_volume is reader, Volume.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "True", "ctsliceinterp.core.volume"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import ctsliceinterp

        ctsliceinterp.nothing


# --- residual_diffusion: registered, and "samples unset" means the method's default -------------
def test_residual_diffusion_is_registered_and_its_folder_recognised(tmp_path):
    entry = api.get_method("residual_diffusion")
    assert entry.pipeline == "ctsliceinterp.pipelines.residual_diffusion:ResidualDiffusionInterpolator"
    assert entry.default_model == "residual_diffusion" and entry.checkpoint_file == "residual_diffusion.json"
    assert set(entry.options) == {"steps", "sampler", "samples", "consistency", "seed"}
    assert "posterior-mean estimate" in entry.description and "samples 1 one realistic sample" in entry.description
    assert "residual_diffusion" in api.SHIPPED_MODELS and "residual_diffusion" in api.available_methods()
    (tmp_path / "rd").mkdir()
    (tmp_path / "rd" / "residual_diffusion.json").write_text("{}")
    assert api.model_method(str(tmp_path / "rd")) == "residual_diffusion"


@pytest.mark.parametrize("samples", [None, 1, 3])
def test_samples_travel_only_when_set(samples):
    request = InterpolationRequest(method="residual_diffusion", spacing=1.0, samples=samples)
    params = request.to_params()
    assert ("samples" in params) == (samples is not None) and params.get("samples") == samples
    assert InterpolationRequest.from_params(params).samples == samples
    assert InterpolationRequest.from_params({**params, "samples": None}).samples is None
    assert InterpolationRequest().samples is None  # unset: the method's default output


class _Recorder:
    """A loaded model that records the options ``interpolate`` hands its ``run``."""

    def run(self, volume, target, reporter=None, **options):
        self.options = options
        return volume.derived(np.zeros(target.shape, np.float32), target)


@pytest.mark.parametrize("samples", [None, 2])
def test_interpolate_hands_samples_unset_to_the_pipeline(make_volume, samples):
    model = _Recorder()
    api.interpolate(make_volume(shape=(3, 8, 8)), InterpolationRequest(method="residual_diffusion", samples=samples),
                    interpolator=model)
    assert model.options["samples"] == samples and model.options["consistency"] is True


def _weights(tmp_path, monkeypatch, *installed):
    """A package weights folder holding only ``installed`` (each a marker file, no torch needed)."""
    for name in installed:
        marker = api.METHODS[name].checkpoint_file  # a shipped model is named after its method
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    monkeypatch.setattr(api, "WEIGHTS_DIR", tmp_path)


def test_a_shipped_model_without_weights_is_named_not_served(tmp_path, monkeypatch):
    _weights(tmp_path, monkeypatch, "regression")
    assert not api.shipped_model_available("residual_diffusion")
    for call in (lambda: api.model_method("residual_diffusion"), lambda: api.load_model("residual_diffusion"),
                 lambda: api.load_model("residual_diffusion", "residual_diffusion")):
        with pytest.raises(InputError, match="^the shipped model 'residual_diffusion' is not installed") as error:
            call()
        assert "\n" not in str(error.value)
    from ctsliceinterp.cli import build_parser
    from ctsliceinterp.commands.serve import server_config

    assert server_config(build_parser().parse_args(["serve"])).models == ["regression"]
    from ctsliceinterp.commands.interpolate import build_request

    args = build_parser().parse_args(["interpolate", "in.nrrd", "-o", "out.nrrd", "--model", "residual_diffusion"])
    assert build_request(args).method == "residual_diffusion"  # whose loader then says it is not installed


def test_a_shipped_model_is_picked_up_once_its_weights_are_there(tmp_path, monkeypatch):
    _weights(tmp_path, monkeypatch, "residual_diffusion")
    from ctsliceinterp.cli import build_parser
    from ctsliceinterp.commands.serve import server_config

    assert api.shipped_model_available("residual_diffusion") and api.model_method("residual_diffusion") == "residual_diffusion"
    assert server_config(build_parser().parse_args(["serve"])).models == ["residual_diffusion"]
    # The package's default learned method falls back to B-spline while its own model is absent.
    learned_model = api.METHODS[api.DEFAULT_LEARNED_METHOD].default_model
    expected = api.DEFAULT_LEARNED_METHOD if learned_model == "residual_diffusion" else api.CLASSICAL_FALLBACK
    assert api.default_method() == expected


def test_the_help_names_the_shipped_models_and_the_method_that_ships_none(capsys):
    from ctsliceinterp.cli import build_parser

    for command in ("serve", "interpolate"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the shipped models that are installed: 'regression', 'residual_diffusion')" in text
    assert "diffusion ships none: give your trained model's folder" in text


# --- a request's options are its method's: refused, never dropped -------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"method": "bspline", "steps": 20}, "bspline takes no steps: it applies to residual_diffusion, diffusion"),
    ({"method": "regression", "samples": 4}, "regression takes no samples: it applies to residual_diffusion, diffusion"),
    ({"method": "regression", "steps": 20, "samples": 4},
     "regression takes no steps, samples: they apply to residual_diffusion, diffusion"),
    ({"method": "regression", "seed": 0}, "regression takes no seed: it applies to residual_diffusion, diffusion"),
    ({"method": "linear", "model": "regression"}, "linear takes no model: it applies to regression, residual_diffusion, diffusion"),
])
def test_a_request_refuses_options_its_method_does_not_take(fields, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        InterpolationRequest(**fields)
    params = InterpolationRequest(method=SERVER_DEFAULT, **{k: v for k, v in fields.items() if k != "method"}).to_params()
    with pytest.raises(InputError, match=f"^{message}$"):  # a server's reading of the job, the method its default
        InterpolationRequest.from_params(params, default_method=fields["method"])


def test_options_left_unset_are_not_given_and_each_method_takes_its_own():
    for name, entry in METHODS.items():
        assert InterpolationRequest(method=name).method == name  # every option left at None
        taken = {key: {"model": "m", "sampler": "ddim", "consistency": False}.get(key, 2)
                 for key in api.OPTION_FIELDS if entry.takes(key)}
        assert InterpolationRequest(method=name, **taken).method == name
    assert InterpolationRequest(method="bspline", consistency=True).consistency  # every method offers it
    assert InterpolationRequest(method=SERVER_DEFAULT, steps=4).steps == 4  # the server checks once it has chosen


def test_options_shared_by_several_methods_go_to_those_that_take_them():
    shared = {"model": None, "seed": 0, "steps": 4, "device": "cpu"}
    assert api.shared_options("bspline", shared) == {"device": "cpu"}
    assert api.shared_options("regression", shared) == {"model": None, "device": "cpu"}
    assert api.shared_options("residual_diffusion", shared) == shared
