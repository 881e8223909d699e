"""The guided slice VAE of latent diffusion v2: it starts at the base, it is size independent,
HU outside any window survive, it round-trips through its folder, and it learns on real CT."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from testsupport import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "Training"))

from ctsliceinterp.models.guided_vae import ChannelNorm, GuidedSliceVAE, GuidedVAEConfig  # noqa: E402

SAMPLE = REPO_ROOT / "samples" / "phantom_head_thick_5mm.nii.gz"
TINY = GuidedVAEConfig(widths=(8, 16, 16), guide_widths=(8, 8, 16))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample_slices() -> np.ndarray:
    from ctsliceinterp.io import read_volume

    return np.asarray(read_volume(SAMPLE).array[12:14], dtype=np.float32)  # two real 512 x 512 axial slices


def _acting(vae: GuidedSliceVAE) -> GuidedSliceVAE:
    """A decoder that changes things (the trained last layer is not zero)."""
    torch.manual_seed(3)
    for p in vae.head[-1].parameters():
        torch.nn.init.normal_(p, std=0.05)
    return vae.eval()


def test_untrained_decoder_returns_the_base_exactly_with_hu_outside_any_window():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.normal(40, 300, (2, 1, 32, 48)).astype(np.float32))
    base[:, :, :4] = -3024.0  # padding outside the scan circle
    base[:, :, -4:] = 3071.0  # metal
    thin = base + torch.from_numpy(rng.normal(0, 50, base.shape).astype(np.float32))
    vae = GuidedSliceVAE(TINY).eval()
    with torch.no_grad():
        out = vae.decode(vae.encode(thin, base).mean, base)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert out.min() == -3024.0 and out.max() == 3071.0
    assert vae.base_latent(base).shape == (2, 4, 4, 6)


def test_input_clipping_is_the_regression_networks():
    from ctsliceinterp.pipelines.regression import DIFFERENCE_LIMIT, ESTIMATE_RANGE

    assert GuidedVAEConfig().input_range == ESTIMATE_RANGE
    assert GuidedVAEConfig().residual_limit == DIFFERENCE_LIMIT


def _crop_versus_whole(vae: GuidedSliceVAE, thin: np.ndarray, base: np.ndarray, margin: int) -> float:
    """Largest |difference| in HU between the whole slice's output and a centred crop's output,
    more than ``margin`` pixels inside the crop."""
    t, b = (torch.from_numpy(a)[None, None] for a in (thin, base))
    c = slice(128, 384)  # 8-aligned, so the stride-2 grids coincide
    with torch.no_grad():
        whole = vae.decode(vae.encode(t, b).mean, b)[0, 0, c, c]
        crop = vae.decode(vae.encode(t[..., c, c], b[..., c, c]).mean, b[..., c, c])[0, 0]
    inner = slice(margin, -margin)
    return float((whole - crop)[inner, inner].abs().max())


def test_a_crop_and_the_whole_slice_decode_the_same_interior(sample_slices):
    thin, base = sample_slices  # the next real slice stands in for the base
    vae = _acting(GuidedSliceVAE(TINY))
    assert _crop_versus_whole(vae, thin, base, margin=96) < 0.05  # HU: float rounding only
    # The same network with GroupNorm (image-wide statistics, as the shipped VAE) fails it.
    for name, module in list(vae.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ChannelNorm):
                setattr(module, child_name, torch.nn.GroupNorm(1, child.weight.numel()))
    assert _crop_versus_whole(vae, thin, base, margin=96) > 1.0


def test_save_and_load_keep_the_weights_and_the_scales(tmp_path):
    vae = _acting(GuidedSliceVAE(TINY))
    vae.latent_scale.fill_(0.7)
    vae.condition_scale.fill_(1.3)
    vae.save_pretrained(tmp_path / "vae", info={"step": 5})
    loaded = GuidedSliceVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == TINY and float(loaded.latent_scale) == pytest.approx(0.7)
    x = torch.linspace(-1000, 1000, 2 * 32 * 32).reshape(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x, x * 0.9).mean, x * 0.9),
                                   vae.decode(vae.encode(x, x * 0.9).mean, x * 0.9))


def test_guided_vae_learns_on_real_ct():
    """In-plane self-supervision on the bundled thick phantom; the base is the shipped regression
    network. A few steps on a fixed pool of real crops: the reconstruction error of that pool falls
    well below the base's. (Beating the base on held-out crops takes longer: a training run.)"""
    import train_guided_vae
    from regression_data import ThroughPlaneDataset

    task = train_guided_vae.GuidedVAETask.__new__(train_guided_vae.GuidedVAETask)
    task.regression = train_guided_vae.load_base_network({}).eval()
    task.model_config = train_guided_vae.model_config({"model": "tiny"})
    task.kl_weight = 1e-6
    data = {"crop": 24, "in_plane_probability": 1.0, "real_pair_probability": 0.0,
            "thin_volumes": {"train": [str(SAMPLE)], "val": [str(SAMPLE)]}}
    task.val_dataset = ThroughPlaneDataset(data, "train", task.regression.config, seed=0, length=32, fixed=True)
    pool = [torch.utils.data.default_collate([task.val_dataset[b * 8 + i] for i in range(8)]) for b in range(4)]
    torch.manual_seed(0)
    model = GuidedSliceVAE(task.model_config.vae)

    def pool_loss() -> float:
        torch.manual_seed(1)  # the same posterior noise each time
        with torch.no_grad():
            return float(np.mean([task.loss(model, batch, "cpu")[0] for batch in pool]))

    before, loss_before = task.validate(model, 0, Path("."), "cpu"), pool_loss()
    assert abs(before["val_guided_vae_gain_over_regression_db"]) < 1e-9  # untrained: the base itself
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(60):
        model.train()
        loss, _ = task.loss(model, pool[step % len(pool)], "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, loss_after = task.validate(model, 1, Path("."), "cpu"), pool_loss()
    print(loss_before, loss_after, after)
    assert loss_after < 0.9 * loss_before
    assert after["val_guided_vae_gain_over_regression_db"] > 0.5, after
    assert after["val_guided_vae_gain_over_regression_db_window"] > 0.5, after
