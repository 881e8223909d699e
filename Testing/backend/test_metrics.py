"""Metrics against hand-computed cases and against scikit-image's SSIM."""

import math

import numpy as np
import pytest

from ctsliceinterp.core.errors import InputError
from ctsliceinterp.evaluation.metrics import (
    body_mask,
    protocol_crop,
    psnr,
    score,
    ssim,
    ssim_map,
    to_unit_range,
    window_to_unit_range,
)


def test_unit_range_mapping_is_the_protocol_one():
    hu = np.array([-3024, -1024, 512, 2048, 3000], dtype=np.int16)
    assert to_unit_range(hu).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    # Soft-tissue window 40/400 -> [-160, 240].
    assert window_to_unit_range(np.array([-1000, -160, 40, 240, 1000])).tolist() == pytest.approx([0, 0, 0.5, 1, 1])


def test_psnr_of_a_constant_offset():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.2, 0.8, (4, 16, 16))
    # MSE = 0.01^2 -> PSNR = 10 log10(1 / 1e-4) = 40 dB exactly.
    assert psnr(ref + 0.01, ref) == pytest.approx(40.0, abs=1e-9)
    assert psnr(ref - 0.1, ref) == pytest.approx(20.0, abs=1e-9)


def test_psnr_identical_is_infinite_and_mask_selects_voxels():
    ref = np.zeros((2, 3, 3))
    assert psnr(ref, ref) == math.inf
    pred = ref.copy()
    pred[0, 0, 0] = 0.5  # only this voxel differs
    mask = np.zeros_like(ref, dtype=bool)
    mask[0, :, 0] = True  # 3 voxels, one of them wrong: MSE = 0.25 / 3
    assert psnr(pred, ref, mask=mask) == pytest.approx(10 * math.log10(3 / 0.25))
    assert psnr(pred, ref) == pytest.approx(10 * math.log10(18 / 0.25))
    with pytest.raises(InputError, match="shapes"):
        psnr(pred[:1], ref)


def test_ssim_identical_is_one_and_constant_images_by_hand():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, (3, 32, 32))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Two constant images 0.5 and 0.4, away from the zero-padded border: variances and
    # covariance are 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.4 + c1) / (0.5**2 + 0.4**2 + c1)
    s = ssim_map(np.full((32, 32), 0.5), np.full((32, 32), 0.4))
    assert s[5:-5, 5:-5] == pytest.approx(np.full((22, 22), expected), rel=1e-9)


def test_ssim_pixel_by_hand_with_numpy_formulas():
    """One SSIM map pixel computed from the definition: 11x11 Gaussian weights, sigma 1.5."""
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (15, 15))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    pa, pb = a[2:13, 2:13], b[2:13, 2:13]  # window centred on pixel (7, 7)
    ma, mb = (w * pa).sum(), (w * pb).sum()
    va, vb = (w * pa**2).sum() - ma**2, (w * pb**2).sum() - mb**2
    cov = (w * pa * pb).sum() - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    assert ssim_map(a, b)[7, 7] == pytest.approx(expected, rel=1e-10)
    # Near the border the protocol zero-pads: pixel (0, 0) sees zeros outside the image.
    za, zb = np.pad(a, 5), np.pad(b, 5)
    pa, pb = za[0:11, 0:11], zb[0:11, 0:11]
    ma, mb = (w * pa).sum(), (w * pb).sum()
    va, vb = (w * pa**2).sum() - ma**2, (w * pb**2).sum() - mb**2
    cov = (w * pa * pb).sum() - ma * mb
    expected = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    assert ssim_map(a, b)[0, 0] == pytest.approx(expected, rel=1e-10)


def test_ssim_interior_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    a = ndimage_smooth(rng.uniform(0, 1, (48, 40)))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    mean_sk, full_sk = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True
    )
    ours = ssim_map(a, b)
    # Same 11x11 window: identical maps away from the borders, and skimage's mean is the mean
    # of the interior (5 pixels cropped each side).
    assert ours[5:-5, 5:-5] == pytest.approx(full_sk[5:-5, 5:-5], abs=1e-10)
    assert mean_sk == pytest.approx(ours[5:-5, 5:-5].mean(), abs=1e-10)
    # The protocol averages the whole zero-padded map instead.
    assert ssim(a[None], b[None]) == pytest.approx(ours.mean())
    assert ssim(a[None], b[None]) != pytest.approx(mean_sk, abs=1e-6)


def ndimage_smooth(x):
    from scipy import ndimage

    return ndimage.gaussian_filter(x, 2.0)


def test_body_mask_drops_table_and_fills_lungs():
    hu = np.full((6, 40, 40), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:40, :40]
    body = (yy - 18) ** 2 + (xx - 20) ** 2 < 14**2
    lung = (yy - 18) ** 2 + (xx - 14) ** 2 < 4**2
    hu[:, body] = 40
    hu[:, lung] = -850  # air-like lung inside the body
    hu[:, 36:38, 5:35] = 200  # the table: separate and smaller
    mask = body_mask(hu)
    assert mask[:, body].all()  # lungs filled
    assert not mask[:, 36:38, :].any()  # table dropped
    assert not mask[:, 0, 0].any()
    with pytest.raises(InputError, match="body"):
        body_mask(np.full((2, 4, 4), -1000))


def test_score_drops_edge_slices_and_reports_known_values():
    rng = np.random.default_rng(5)
    ref = rng.integers(-1000, 1000, (14, 24, 24)).astype(np.float32)
    pred = ref + 3072 * 0.01  # offset of 0.01 in protocol units everywhere
    pred[:5] += 5000  # garbage in the first 5 slices must not count
    pred[-5:] -= 5000
    s = score(pred, ref)
    assert s.psnr == pytest.approx(40.0, abs=1e-3)
    assert s.psnr_body == pytest.approx(40.0, abs=1e-3)
    assert 0.0 < s.ssim < 1.0
    # Soft-tissue window: offset 30.72 HU over a 400 HU window, only for voxels not clipped.
    win_ref = window_to_unit_range(protocol_crop(ref))
    win_pred = window_to_unit_range(protocol_crop(pred))
    assert s.psnr_soft_tissue == pytest.approx(psnr(win_pred, win_ref))
    assert score(ref, ref).ssim == pytest.approx(1.0)
    with pytest.raises(InputError, match="slices"):
        score(ref[:10], ref[:10])


def _flat_phantom(seed: int = 0) -> np.ndarray:
    """Soft tissue at 40 HU with 4 HU noise and a bright block (not flat) in the middle."""
    rng = np.random.default_rng(seed)
    ref = (40.0 + rng.normal(0, 4.0, (24, 32, 32))).astype(np.float32)
    ref[8:16, 10:20, 10:20] = 600.0
    return ref


def test_local_std_in_slice_chunks_equals_the_whole_volume_computation():
    from scipy import ndimage

    from ctsliceinterp.evaluation.metrics import local_std

    hu = np.random.default_rng(5).normal(40, 30, (23, 12, 10)).astype(np.float32)
    a = hu.astype(np.float64)
    mean = ndimage.uniform_filter(a, 5)
    whole = np.sqrt(np.maximum(ndimage.uniform_filter(a * a, 5) - mean * mean, 0.0))
    for chunk in (1, 4, 7, 23, 64):
        np.testing.assert_allclose(local_std(hu, 5, chunk_slices=chunk), whole, rtol=1e-6, atol=1e-4)


def test_flat_texture_ratio_flags_invented_noise_and_smoothing():
    from scipy import ndimage

    from ctsliceinterp.evaluation.metrics import flat_texture_ratio

    ref = _flat_phantom()
    noisy = ref + np.random.default_rng(5).normal(0, 8.0, ref.shape).astype(np.float32)
    assert flat_texture_ratio(ref, ref) == pytest.approx(1.0)
    assert flat_texture_ratio(noisy, ref) > 1.5  # sqrt(4^2 + 8^2) / 4 = 2.2
    assert flat_texture_ratio(ndimage.uniform_filter(ref, 3), ref) < 0.8  # the block's blurred edges count too
    plain = ref[:8]  # no block: smoothing 3 x 3 x 3 divides iid noise by about 5
    assert flat_texture_ratio(ndimage.uniform_filter(plain, 3), plain) < 0.4
    assert flat_texture_ratio(ref, np.full_like(ref, 3000.0)) is None  # no soft tissue at all


def test_through_plane_gradient_ratio_is_one_for_the_truth_below_for_blur_above_for_noise():
    from scipy import ndimage

    from ctsliceinterp.evaluation.metrics import through_plane_gradient_ratio

    ref = _flat_phantom(1)
    assert through_plane_gradient_ratio(ref, ref) == pytest.approx(1.0)
    assert through_plane_gradient_ratio(ndimage.uniform_filter1d(ref, 3, axis=0), ref) < 0.9
    plain = ref[:8]  # soft tissue only: 6 HU of added noise over 4 HU of texture
    assert through_plane_gradient_ratio(plain + np.random.default_rng(2).normal(0, 6.0, plain.shape), plain) > 2.5
    assert score(ref, ref).through_plane_gradient_ratio == pytest.approx(1.0)


def test_uncertainty_reliability_correlates_a_standard_deviation_that_tracks_the_error():
    from ctsliceinterp.evaluation.metrics import uncertainty_reliability

    rng = np.random.default_rng(3)
    ref = np.full((20, 24, 24), 40.0, dtype=np.float32)
    std = rng.uniform(1.0, 30.0, ref.shape).astype(np.float32)
    tracking = ref + rng.normal(0, 1, ref.shape).astype(np.float32) * std
    good = uncertainty_reliability(std, tracking, ref)
    bad = uncertainty_reliability(rng.permutation(std.ravel()).reshape(std.shape), tracking, ref)
    assert good["correlation"] > 0.5 and abs(bad["correlation"]) < 0.1
    rms = [b["rms_error_hu"] for b in good["bins"]]
    assert len(good["bins"]) == 10 and rms == sorted(rms)  # error grows with the predicted std
    assert good["bins"][-1]["rms_error_hu"] == pytest.approx(good["bins"][-1]["mean_std_hu"], rel=0.15)


def test_texture_metrics_have_no_ratio_without_texture_in_the_reference():
    from ctsliceinterp.evaluation.metrics import flat_texture_ratio, through_plane_gradient_ratio, uncertainty_reliability

    flat = np.full((12, 16, 16), 40.0, dtype=np.float32)
    noisy = flat + np.random.default_rng(0).normal(0, 5, flat.shape).astype(np.float32)
    assert flat_texture_ratio(noisy, flat) is None and through_plane_gradient_ratio(noisy, flat) is None
    assert uncertainty_reliability(np.zeros_like(flat), noisy, flat) == {"correlation": None, "bins": []}
