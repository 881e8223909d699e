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


def test_each_model_knows_its_method_and_the_default_is_the_packages():
    assert model_method("regression") == "regression" and model_method("default") == "diffusion"
    with pytest.raises(InputError, match="not a shipped model"):
        model_method("no-such-model")
    with pytest.raises(InputError, match="not a shipped model"):
        ModelRegistry(["no-such-model"])
    registry = ModelRegistry(["default", "regression"], device="cpu")
    from ctsliceinterp.api import DEFAULT_METHOD

    assert registry.default_method() == DEFAULT_METHOD
    assert registry.check("regression", None) == "regression"
    with pytest.raises(InputError, match="unknown regression model 'default'"):
        registry.check("regression", "default")  # a diffusion model cannot run as regression


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
