"""Checks that a volume is a CT we can interpolate. Shared by every reader and the server."""

from __future__ import annotations

import numpy as np

from ..core.errors import InputError
from ..core.volume import Volume

# A label map is integral, non-negative and holds few distinct values; a CT in HU has air
# (about -1000) and thousands of distinct values. These bounds leave every real CT alone.
LABEL_MAP_MAX_VALUES = 64
LABEL_MAP_MAX_LABEL = 1000


def validate_ct(volume: Volume, source: str = "input") -> None:
    """Raise ``InputError`` naming the problem: not 3-D, non-finite voxels, or a label map."""
    if volume.array.ndim != 3:
        raise InputError(f"{source} is not a 3-D volume")
    if min(volume.shape) < 2:
        raise InputError(f"{source} is a 2-D image (size {volume.shape[::-1]}): a 3-D CT volume is needed")
    try:
        volume.check_finite()
    except InputError as exc:
        raise InputError(f"{source}: {exc}: a CT in HU must be finite everywhere") from None
    reason = label_map_reason(volume)
    if reason:
        raise InputError(f"{source} looks like a label map ({reason}): a CT in HU is needed")


def label_map_reason(volume: Volume) -> str | None:
    """Why ``volume`` looks like a segmentation / label map, or None when it looks like a CT."""
    header = volume.metadata.get("label_map_header")
    if header:
        return header
    array = volume.array
    if array.dtype == bool:
        return "boolean voxels"
    low, high = array.min(), array.max()
    if low < 0 or high > LABEL_MAP_MAX_LABEL:
        return None  # HU below zero (air) or beyond the label range: a CT
    if np.issubdtype(array.dtype, np.floating):
        sample = array.ravel()[:: max(1, array.size // 100_000)]
        if not np.all(sample == np.round(sample)) or not np.all(array == np.round(array)):
            return None
    counts = np.bincount(np.asarray(array, dtype=np.int64).ravel(), minlength=1)
    distinct = int(np.count_nonzero(counts))
    if distinct <= LABEL_MAP_MAX_VALUES:
        return f"{distinct} distinct non-negative integer values in 0..{int(high)} and no negative HU"
    return None
