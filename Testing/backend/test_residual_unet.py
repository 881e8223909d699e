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
    pytest.param(lambda: ResidualUNet3D(named_config("default").unet).state_dict(), id="wider"),  # same conv_in
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


def test_forward_with_the_x0_head_equals_the_two_separate_calls():
    """Training's one forward (one image encoding) gives what the pipeline's two calls give."""
    config = named_config("tiny_images")
    torch.manual_seed(0)
    unet = ResidualUNet3D(config.unet)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.02)
    torch.nn.init.normal_(unet.conv_in[0].weight, std=0.1)
    condition = torch.randn(2, config.unet.raw_condition_channels, 5, 4, 4)
    noisy, positions, t = torch.randn(2, 4, 5, 4, 4), torch.rand(2, 3, 5), torch.tensor([10, 900])
    with torch.no_grad():
        prediction, mean = unet(noisy, t, condition, positions, num_train_timesteps=1000)
        torch.testing.assert_close(prediction, unet(noisy, t, condition, positions))
        zero_t = torch.full((2,), 999)
        torch.testing.assert_close(mean, -unet(torch.zeros_like(noisy), zero_t, condition, positions))
        assert mean.abs().max() > 0
