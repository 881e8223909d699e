"""The shipped models: regression is the default method (the best on held-out CT), and the shipped
diffusion model runs end to end on the bundled sample."""

import numpy as np
import pytest

from ctsliceinterp import api
from ctsliceinterp.core.acquisition import consistency_mae
from ctsliceinterp.io import read_volume

pytestmark = pytest.mark.skipif(not api.shipped_model_available(), reason="this build ships no default model weights")


def test_default_method_is_the_shipped_regression_network():
    assert api.shipped_model_available(api.REGRESSION_MODEL)
    assert api.DEFAULT_METHOD == api.REGRESSION_METHOD
    assert api.InterpolationRequest().method == api.REGRESSION_METHOD


def test_shipped_model_loads_and_interpolates_a_crop_of_the_sample(repo_root):
    from ctsliceinterp.pipelines.checkpoint import load_checkpoint, resolve_model

    checkpoint = load_checkpoint(resolve_model(api.DEFAULT_MODEL), device="cpu")  # validates checksums and shapes
    assert checkpoint.unet is not None, "the shipped default must carry a trained U-Net, not only a VAE"
    thick = read_volume(repo_root / "samples" / "phantom_head_thick_5mm.nii.gz")
    from ctsliceinterp.core.volume import Geometry, Volume

    # 6 slices x 64 x 64 px starting at voxel (i, j) = (200, 200): the origin moves there.
    origin = thick.geometry.index_to_physical([200, 200, 0])
    crop = Volume(np.ascontiguousarray(thick.array[:6, 200:264, 200:264]),
                  Geometry((6, 64, 64), thick.spacing, tuple(origin), thick.direction))
    result = api.interpolate(crop, api.InterpolationRequest(method=api.DIFFUSION_METHOD, steps=2, seed=0))
    out = result.volume
    assert out.shape == (26, 64, 64)
    assert np.allclose(out.geometry.index_to_physical([0, 0, 5]), crop.geometry.index_to_physical([0, 0, 1]))
    assert np.all(np.isfinite(out.array))
    assert consistency_mae(crop, out) <= 1.0 + 1e-3
