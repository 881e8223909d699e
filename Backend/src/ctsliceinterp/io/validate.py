"""Checks that a volume is a CT we can interpolate. Shared by every reader and the server."""

from __future__ import annotations

from ..errors import InputError
from ..volume import Volume


def validate_ct(volume: Volume, source: str = "input") -> None:
    """Raise ``InputError`` naming the problem: not 3-D, non-finite voxels, or a label map."""
    if volume.array.ndim != 3:
        raise InputError(f"{source} is not a 3-D volume")
    if min(volume.shape) < 2:
        raise InputError(f"{source} is a 2-D image (size {volume.shape[::-1]}): a 3-D CT volume is needed")
    volume.check_finite()
    # TODO(io helper): label-map detection (see issue 2 bad inputs).
