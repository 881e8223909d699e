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
    request = InterpolationRequest(method="diffusion", spacing=0.8, target=TARGET, model="default", steps=7,
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
            assert module.startswith("ctsliceinterp.pipelines.") and name and method.default_model


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
