"""Image-quality metrics for thick-to-thin CT, following the RPLHR-CT protocol.

RPLHR-CT (Yu et al., MICCAI 2022, github.com/smilenaxx/RPLHR-CT, ``code/test.py`` and
``code/utils/non_model.py``) evaluates 5 mm -> 1 mm like this, and so do we:

- HU clipped to [-1024, 2048] and mapped linearly to [0, 1]; the whole field of view;
- the first and last 5 thin slices dropped (``EDGE_SLICES``);
- PSNR over the whole remaining volume with a peak of 1;
- SSIM in 2-D on each axial slice, averaged over slices. The window is the 11 x 11 Gaussian of
  sigma 1.5 (normalised), C1 = 0.01^2, C2 = 0.03^2, population (biased) variances, the filter
  applied with zero padding and the SSIM map averaged over the *whole* slice. That is the
  reference implementation (the classic ``pytorch-ssim``). scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`` uses the same 11 x 11 window and gives the same SSIM map inside the image, but
  it reflects at the borders and then averages only the interior (5 pixels cropped on each
  side); on a 512 x 512 CT that changes the mean in the third decimal, so the protocol's border
  handling is implemented here and the interior is tested against scikit-image.

Also reported (not part of RPLHR-CT):

- ``psnr_soft_tissue``: PSNR with HU mapped through the soft-tissue window (centre 40, width
  400, i.e. [-160, 240] HU -> [0, 1], clipped), peak 1; it weighs errors in the range
  radiologists read most.
- ``psnr_body``: the protocol PSNR ([-1024, 2048] -> [0, 1]) with the mean squared error taken
  only over voxels inside the body (``body_mask``), so air around the patient does not inflate it.
- ``consistency_mae_hu``: ``acquisition.consistency_mae``, the mean absolute HU difference between
  the input thick slices and the output re-averaged by the slab-mean acquisition model.
- ``flat_texture_ratio``: in flat soft tissue (reference in the 40/400 window with a local standard
  deviation over 5 x 5 x 5 voxels below ``FLAT_STD_HU``), the output's mean local standard deviation
  over the reference's. Above 1: texture the reference lacks (invented noise); below: smoothing.
- ``through_plane_gradient_ratio``: the energy of the output's slice-to-slice differences over the
  reference's (HU clipped to the protocol range). 1 is the truth, below is blur, above is noise.
- ``uncertainty_reliability`` (for outputs with a per-voxel standard deviation): its correlation
  with the absolute error, and the RMS error in bins of the standard deviation.

Identical volumes have an infinite PSNR; it is returned as ``math.inf`` (RPLHR-CT's code returns
40 instead) and written to JSON as ``null``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..core.errors import InputError

PROTOCOL_HU_RANGE = (-1024.0, 2048.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # centre, width (HU)
EDGE_SLICES = 5  # thin slices dropped at each end of the volume
BODY_THRESHOLD_HU = -500.0
FLAT_STD_HU = 10.0  # the reference's local standard deviation below which tissue counts as flat
LOCAL_STD_SIZE = 5  # voxels per side of the local standard deviation's cube

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit_range(hu: np.ndarray, low: float = PROTOCOL_HU_RANGE[0], high: float = PROTOCOL_HU_RANGE[1]) -> np.ndarray:
    """HU clipped to [low, high] and mapped to [0, 1] (float32). Metrics only: outputs keep HU."""
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def window_bounds(window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> tuple[float, float]:
    """(low, high) HU of a (centre, width) display window."""
    centre, width = window
    return centre - width / 2, centre + width / 2


def window_to_unit_range(hu: np.ndarray, window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> np.ndarray:
    return to_unit_range(hu, *window_bounds(window))


def psnr(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None, peak: float = 1.0) -> float:
    """10 log10(peak^2 / MSE) over all voxels (or those where ``mask`` is true); inf when equal."""
    prediction = np.asarray(prediction, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if prediction.shape != reference.shape:
        raise InputError(f"cannot compare volumes of shapes {prediction.shape} and {reference.shape}")
    diff = prediction - reference
    if mask is not None:
        if mask.shape != diff.shape:
            raise InputError(f"mask shape {mask.shape} does not match the volume shape {diff.shape}")
        diff = diff[mask]
    if diff.size == 0:
        raise InputError("no voxels to compare (empty volume or mask)")
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 2-D filter of the last two axes with zero padding ('same' size)."""
    out = ndimage.correlate1d(image, window, axis=-1, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, window, axis=-2, mode="constant", cval=0.0)


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """SSIM map of 2-D images (or a stack of them along axis 0), protocol window, zero padding."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    w = _gaussian_window_1d()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    var_a = _filter(a * a, w) - mu_a * mu_a
    var_b = _filter(b * b, w) - mu_b * mu_b
    cov = _filter(a * b, w) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))


def ssim_per_slice(prediction: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Mean SSIM of each axial slice (axis 0) of two (z, y, x) volumes already in [0, 1]."""
    if prediction.ndim != 3:
        raise InputError(f"expected (z, y, x) volumes, got shape {prediction.shape}")
    # A few slices at a time: the float64 intermediates of a 512 x 512 slice are ~2 MB each.
    values = [ssim_map(prediction[k : k + 8], reference[k : k + 8], data_range).mean(axis=(1, 2)) for k in range(0, prediction.shape[0], 8)]
    return np.concatenate(values)


def ssim(prediction: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    return float(np.mean(ssim_per_slice(prediction, reference, data_range)))


def body_mask(reference_hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The patient (or phantom): voxels above ``threshold`` HU, the largest 3-D connected
    component (drops the table, cushions and noise), with holes filled slice by slice in 2-D so
    that lungs, airways and sinuses count as body. Not eroded."""
    above = np.asarray(reference_hu) > threshold
    labels, count = ndimage.label(above)
    if count == 0:
        raise InputError(f"no voxel of the reference is above {threshold:g} HU: cannot find the body")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def protocol_crop(array: np.ndarray, edge: int = EDGE_SLICES) -> np.ndarray:
    """Drop ``edge`` slices at each end of the slice axis (axis 0)."""
    if array.shape[0] <= 2 * edge:
        raise InputError(f"the compared volume has {array.shape[0]} slices; more than {2 * edge} are needed (the first and last {edge} are dropped)")
    return array[edge : array.shape[0] - edge]


@dataclass
class Scores:
    psnr: float
    ssim: float
    psnr_soft_tissue: float
    psnr_body: float
    flat_texture_ratio: float | None = None
    through_plane_gradient_ratio: float | None = None
    consistency_mae_hu: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def local_std(hu: np.ndarray, size: int = LOCAL_STD_SIZE, chunk_slices: int = 32) -> np.ndarray:
    """Standard deviation over a ``size``-cube around each voxel (population, reflected borders).

    In float64 (E[x^2] - E[x]^2 cancels badly in float32), ``chunk_slices`` slices at a time with
    ``size // 2`` slices of margin, so the result equals the whole-volume one while the float64
    temporaries stay a few hundred MB on a 300 x 512 x 512 volume instead of several GB."""
    margin = size // 2
    out = np.empty(hu.shape, dtype=np.float32)
    for start in range(0, hu.shape[0], chunk_slices):
        stop = min(hu.shape[0], start + chunk_slices)
        low, high = max(0, start - margin), min(hu.shape[0], stop + margin)
        a = hu[low:high].astype(np.float64)
        mean = ndimage.uniform_filter(a, size)
        std = np.sqrt(np.maximum(ndimage.uniform_filter(a * a, size) - mean * mean, 0.0))
        out[start:stop] = std[start - low : stop - low]
    return out


def flat_texture_ratio(prediction_hu: np.ndarray, reference_hu: np.ndarray) -> float | None:
    """Mean local standard deviation of the prediction over the reference's in flat soft tissue
    (None when the reference has no flat soft tissue)."""
    low, high = window_bounds()
    reference_std = local_std(reference_hu)
    flat = (reference_std < FLAT_STD_HU) & (reference_hu >= low) & (reference_hu <= high)
    reference_texture = float(reference_std[flat].mean()) if flat.any() else 0.0
    if reference_texture < 1e-3:  # no flat soft tissue, or a noise-free one: no ratio to speak of
        return None
    return float(local_std(prediction_hu)[flat].mean() / reference_texture)


def through_plane_gradient_ratio(prediction_hu: np.ndarray, reference_hu: np.ndarray) -> float | None:
    """Energy of slice-to-slice differences, prediction over reference (protocol HU range); None
    for a reference constant along the slices."""
    low, high = PROTOCOL_HU_RANGE
    energy = lambda a: float(np.square(np.diff(np.clip(a, low, high).astype(np.float64), axis=0)).sum())  # noqa: E731
    reference = energy(reference_hu)
    return energy(prediction_hu) / reference if reference > 0 else None


def uncertainty_reliability(std_hu: np.ndarray, prediction_hu: np.ndarray, reference_hu: np.ndarray,
                            bins: int = 10, edge: int = EDGE_SLICES) -> dict:
    """Does the standard deviation track the error? Over the body (protocol crop): Pearson's
    correlation of std with |error|, and per std decile (mean std, RMS error, voxels), HU; tied
    quantiles merge, so a std with few distinct values has fewer bins."""
    std, pred, ref = (protocol_crop(a, edge) for a in (std_hu, prediction_hu, reference_hu))
    inside = body_mask(ref)
    std, error = std[inside].astype(np.float64), (pred[inside] - ref[inside]).astype(np.float64)
    if std.size < bins or std.std() == 0:
        return {"correlation": None, "bins": []}
    edges = np.unique(np.quantile(std, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, std, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            rows.append({"mean_std_hu": float(std[sel].mean()), "rms_error_hu": float(np.sqrt(np.mean(error[sel] ** 2))),
                         "voxels": int(sel.sum())})
    return {"correlation": float(np.corrcoef(std, np.abs(error))[0, 1]), "bins": rows}


def score(prediction_hu: np.ndarray, reference_hu: np.ndarray, edge: int = EDGE_SLICES) -> Scores:
    """All image metrics for a prediction on the reference's slice positions (both in HU,
    (z, y, x), same shape); the first and last ``edge`` slices are dropped first."""
    if prediction_hu.shape != reference_hu.shape:
        raise InputError(f"prediction {prediction_hu.shape} and reference {reference_hu.shape} are not on the same grid")
    pred_hu = protocol_crop(prediction_hu, edge)
    ref_hu = protocol_crop(reference_hu, edge)
    pred, ref = to_unit_range(pred_hu), to_unit_range(ref_hu)
    return Scores(
        psnr=psnr(pred, ref),
        ssim=ssim(pred, ref),
        psnr_soft_tissue=psnr(window_to_unit_range(pred_hu), window_to_unit_range(ref_hu)),
        psnr_body=psnr(pred, ref, mask=body_mask(ref_hu)),
        flat_texture_ratio=flat_texture_ratio(pred_hu, ref_hu),
        through_plane_gradient_ratio=through_plane_gradient_ratio(pred_hu, ref_hu),
    )
