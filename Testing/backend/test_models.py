"""Model configs, networks, samplers and the VAE learning on real CT (CPU, seconds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ctsliceinterp.schedulers import sample, sampling_scheduler
from ctsliceinterp.models.configs import CONFIGS, PARAMETER_RANGES, SAMPLERS, ConfigError, ModelConfig, get_config
from ctsliceinterp.models.sizes import parameter_counts
from ctsliceinterp.models.unet import UNet3D
from ctsliceinterp.models.vae import SliceVAE, measure_latent_scale, vae_loss


# diffusers builds its sigmas with np.array(tensor) (harmless under numpy 2).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin-wait on each other and
    run these small kernels up to 15x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_within_stated_ranges(name):
    counts = parameter_counts(get_config(name))  # meta device: nothing allocated
    print(f"{name}: U-Net {counts['unet'] / 1e6:.2f} M, VAE {counts['vae'] / 1e6:.2f} M")
    for part in ("unet", "vae"):
        low, high = PARAMETER_RANGES[name][part]
        assert low <= counts[part] <= high, f"{name} {part}: {counts[part]} not in [{low}, {high}]"


def test_medium_is_the_origin_design_size():
    counts = parameter_counts(get_config("medium"))
    assert abs(counts["unet"] - 270e6) <= 0.1 * 270e6
    config = get_config("medium")
    assert config.unet.base_channels == 128 and config.unet.channel_mult == (1, 2, 4, 4)
    assert config.vae.encoder_channels == (64, 128, 256) and config.vae.downsampling_factor == 8
    assert config.vae.latent_channels == 4


def test_config_round_trip_and_rejects_unknown_fields():
    for name in CONFIGS:
        config = get_config(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    data = get_config("tiny").to_dict()
    data["unet"]["not_a_field"] = 1
    with pytest.raises(ConfigError, match="not_a_field"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match="unknown model config"):
        get_config("huge")


@pytest.mark.parametrize("depth", [1, 5, 16, 17])
def test_unet_keeps_depth_and_vae_keeps_slices(depth):
    torch.manual_seed(0)
    config = get_config("tiny")
    unet = UNet3D(config.unet).eval()
    x = torch.randn(2, 4, depth, 8, 8)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 900]), torch.randn_like(x), torch.rand(2, 3, depth))
    assert out.shape == x.shape
    vae = SliceVAE(config.vae).eval()
    with torch.no_grad():
        z = vae.encode(torch.rand(depth, 1, 32, 48) * 2 - 1).mean
        assert z.shape == (depth, 4, 4, 6)
        assert vae.decode(z).shape == (depth, 1, 32, 48)


def test_depth_attention_mixes_only_along_depth():
    """An in-plane position's output must not depend on other in-plane positions through the
    attention layer: it attends over D only."""
    from ctsliceinterp.models.unet import DepthAttention

    torch.manual_seed(0)
    attention = DepthAttention(16, 8, 8)
    torch.nn.init.normal_(attention.proj.weight, std=0.2)
    x = torch.randn(1, 16, 6, 4, 4)
    y = x.clone()
    y[:, :, :, 0, 0] += 5.0  # change one column of slices
    with torch.no_grad():
        changed = (attention(y) - attention(x)).abs().sum(dim=(0, 1, 2))
    # GroupNorm statistics are per sample over all positions, so other columns can move a
    # little; the changed column moves a lot more.
    assert changed[0, 0] > 20 * changed.flatten()[1:].max()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = get_config("tiny")
    unet = UNet3D(config.unet)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x, c, p = torch.randn(1, 4, 5, 8, 8), torch.randn(1, 4, 5, 8, 8), torch.rand(1, 3, 5)
    grads = []
    for enabled in (False, True):
        unet.zero_grad()
        unet.enable_gradient_checkpointing(enabled)
        unet(x, torch.tensor([3]), c, p).square().mean().backward()
        grads.append(unet.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_run_from_noise_with_diffusers(sampler):
    config = get_config("tiny").diffusion
    scheduler = sampling_scheduler(sampler, config)
    assert type(scheduler).__module__.startswith("diffusers")
    seen = []
    # The ideal v-prediction denoiser for data that is exactly 0: x0 = sqrt(a) x_t - sqrt(1-a) v
    # is 0 for v = sqrt(a / (1 - a)) x_t, with a = alpha_bar(t).
    alphas = scheduler.alphas_cumprod

    def denoise(x, t):
        a = alphas[int(t)]
        return x * torch.sqrt(a / (1 - a))

    x = sample(denoise, (1, 4, 3, 4, 4), scheduler, 6, torch.Generator().manual_seed(0), torch.device("cpu"), lambda i, n: seen.append((i, n)))
    assert seen[-1] == (6, 6)
    # Started from unit noise; ends at the data up to the last step's tiny noise level.
    assert x.abs().max() < 0.05


def test_stochastic_sampler_draws_its_step_noise_from_the_seeded_generator():
    """dpmpp_sde adds fresh noise at every step: from the caller's generator, so a seed repeats
    the sample exactly, whatever the global RNG did in between."""
    config = get_config("tiny").diffusion

    def run(seed, global_seed):
        denoise = lambda x, t: 0.5 * x  # noqa: E731  a denoiser that leaves noise to the sampler
        torch.manual_seed(global_seed)
        return sample(denoise, (1, 4, 3, 4, 4), sampling_scheduler("dpmpp_sde", config), 5,
                      torch.Generator().manual_seed(seed), torch.device("cpu"))

    first, again, other = run(0, global_seed=1), run(0, global_seed=2), run(1, global_seed=1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_tiny_vae_learns_real_ct(shared_data):
    """A few hundred steps on real CT crops (chest + heart) must reconstruct held-out crops of
    another scan (a head CT) far better than at initialisation and than a flat image."""
    from ctsliceinterp.io import read_volume
    from ctsliceinterp.pipelines.diffusion import normalise

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = get_config("tiny")
    size = 32

    def crops(name, count):
        array = read_volume(shared_data(f"volumes/{name}")).array
        out = []
        for _ in range(count):
            z = rng.integers(0, array.shape[0])
            y = rng.integers(array.shape[1] // 4, 3 * array.shape[1] // 4 - size)
            x = rng.integers(array.shape[2] // 4, 3 * array.shape[2] // 4 - size)
            out.append(array[z, y : y + size, x : x + size])
        return torch.from_numpy(normalise(np.stack(out), config.window))[:, None]

    train = torch.cat([crops("chest_totalseg_crop_1p5mm.nii.gz", 256), crops("heart_totalseg_crop_1p5mm.nii.gz", 256)])
    test = crops("head_invesalius0051_1p5mm.nii.gz", 32)

    def psnr(prediction):
        return float(10 * torch.log10(4.0 / torch.mean((prediction - test) ** 2)))  # range [-1, 1]

    vae = SliceVAE(config.vae)

    def reconstruction_psnr():
        vae.eval()
        with torch.no_grad():
            value = psnr(vae.decode(vae.encode(test).mean))
        vae.train()
        return value

    before = reconstruction_psnr()
    flat = psnr(test.mean(dim=(2, 3), keepdim=True).expand_as(test))
    optimiser = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(400):
        batch = train[torch.randint(0, train.shape[0], (16,))]
        reconstruction, posterior = vae(batch)
        loss = vae_loss(reconstruction, batch, posterior)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = reconstruction_psnr()
    print(f"held-out PSNR: init {before:.1f} dB, flat image {flat:.1f} dB, trained {after:.1f} dB")
    assert after > before + 6.0
    assert after > flat + 3.0
    scale = measure_latent_scale(vae.eval(), test)
    assert np.isfinite(scale) and scale > 0
