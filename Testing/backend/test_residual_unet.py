"""models.residual_unet: starting the image U-Net from a latents-only one (``load_latent_only_weights``)."""

from __future__ import annotations

import pytest
import torch

from ctsliceinterp.models.residual_unet import ResidualUNet3D
from ctsliceinterp.pipelines.residual_diffusion import named_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _without(name: str) -> dict:
    state = ResidualUNet3D(named_config("tiny").unet).state_dict()
    del state[name]
    return state


@pytest.mark.parametrize("state", [
    pytest.param(lambda: ResidualUNet3D(named_config("latents_only").unet).state_dict(), id="wider"),  # same conv_in
    pytest.param(lambda: ResidualUNet3D(named_config("tiny_images").unet).state_dict(), id="takes-images"),
    pytest.param(lambda: _without("conv_out.weight"), id="a-tensor-missing"),
    pytest.param(lambda: _without("conv_in.0.weight"), id="no-input-convolution"),
])
def test_a_unet_that_is_not_a_latents_only_one_of_this_size_is_refused_in_one_line_and_nothing_is_loaded(state):
    torch.manual_seed(0)
    unet = ResidualUNet3D(named_config("tiny_images").unet)
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="^the U-Net to start from ") as refused:
        unet.load_latent_only_weights(state())
    assert "\n" not in str(refused.value)
    changed = [name for name, value in unet.state_dict().items() if not torch.equal(value, before[name])]
    assert changed == []  # not half loaded: training would otherwise go on from a mixture
