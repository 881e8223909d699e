"""The shipped models: regression is the default method (the best on held-out CT), latent diffusion
v2 (residual_diffusion) runs end to end on the bundled sample through the API, and latent diffusion
v1 ships no model (a v1 request must name a trained folder)."""

import numpy as np
import pytest

from ctsliceinterp import api
from ctsliceinterp.core.acquisition import consistency_mae
from ctsliceinterp.core.errors import InputError
from ctsliceinterp.core.volume import Geometry, Volume
from ctsliceinterp.io import read_volume


def needs_shipped(name):
    return pytest.mark.skipif(not api.shipped_model_available(name), reason=f"this build ships no {name} weights")


@needs_shipped(api.REGRESSION_MODEL)
def test_default_method_is_the_shipped_regression_network():
    assert api.DEFAULT_METHOD == api.REGRESSION_METHOD
    assert api.InterpolationRequest().method == api.REGRESSION_METHOD


def sample_crop(repo_root) -> Volume:
    """6 slices x 64 x 64 px of the bundled 5 mm phantom from voxel (i, j) = (200, 200): the origin moves there."""
    thick = read_volume(repo_root / "samples" / "phantom_head_thick_5mm.nii.gz")
    origin = thick.geometry.index_to_physical([200, 200, 0])
    return Volume(np.ascontiguousarray(thick.array[:6, 200:264, 200:264]),
                  Geometry((6, 64, 64), thick.spacing, tuple(origin), thick.direction), dict(thick.metadata))


@needs_shipped(api.RESIDUAL_DIFFUSION_MODEL)
def test_shipped_residual_diffusion_interpolates_a_crop_of_the_sample(repo_root, one_torch_thread):
    crop = sample_crop(repo_root)
    model = api.load_model(api.RESIDUAL_DIFFUSION_METHOD, device="cpu")  # the shipped model, by default
    request = api.InterpolationRequest(method=api.RESIDUAL_DIFFUSION_METHOD)
    mean = api.interpolate(crop, request, interpolator=model)  # the posterior mean: no uncertainty
    request.samples, request.steps, request.seed = 2, 2, 0
    spread = api.interpolate(crop, request, interpolator=model)  # the mean of 2 samples and their spread
    for result in (mean, spread):
        out = result.volume
        assert out.shape == (26, 64, 64)
        assert np.allclose(out.geometry.index_to_physical([0, 0, 5]), crop.geometry.index_to_physical([0, 0, 1]))
        assert np.all(np.isfinite(out.array))
        assert consistency_mae(crop, out) <= 1.0 + 1e-3
    assert mean.uncertainty is None
    std = spread.uncertainty.array
    assert spread.uncertainty.geometry == spread.volume.geometry
    assert np.all(std >= 0) and std.max() > 0  # two seeded draws differ somewhere


def test_latent_diffusion_v1_ships_no_model_and_says_how_to_get_one(make_volume):
    from ctsliceinterp.models import WEIGHTS_DIR

    entry = api.get_method(api.DIFFUSION_METHOD)
    assert entry.default_model is None and not (WEIGHTS_DIR / "default").exists()
    assert api.DIFFUSION_METHOD not in api.SHIPPED_MODELS and "default" not in api.SHIPPED_MODELS
    request = api.InterpolationRequest(method=api.DIFFUSION_METHOD, steps=2)
    with pytest.raises(InputError, match="^diffusion has no shipped model: give --model FOLDER .*model.json.*"
                                         "or use --method residual_diffusion$") as error:
        api.interpolate(make_volume(shape=(3, 8, 8)), request)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="not a shipped model nor a folder"):
        api.model_method("default")  # the old shipped name is gone
