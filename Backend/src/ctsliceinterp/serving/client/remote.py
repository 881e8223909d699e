"""The command line's way to a server: ``interpolate_remote`` takes and returns what
``api.interpolate`` does, so ``ctsliceinterp interpolate --server URL`` writes the same files as
a local run."""

from __future__ import annotations

import time

from ..access import read_token
from .calls import Client


def interpolate_remote(url, volume, request, token_file=None, token=None, progress=None, cancel=None, **client_options):
    """``api.interpolate`` on a server: same request in, same ``InterpolationResult`` out.

    The token is ``token``, else the first line of ``token_file``, else ``$CTSLICEINTERP_TOKEN``.
    Only voxels and geometry are sent; the input's metadata (DICOM tags) goes back onto the result
    here, as the local path does."""
    from ...api import InterpolationResult  # not needed by GUI users of Client

    client = Client(url, token=token or read_token(token_file), **client_options)
    start = time.perf_counter()
    thin, uncertainty = client.run(volume, request.to_params(), progress=progress, cancel=cancel)
    thin = volume.derived(thin.array, thin.geometry, **thin.metadata)
    if uncertainty is not None:
        uncertainty = volume.derived(uncertainty.array, uncertainty.geometry, **uncertainty.metadata)
    return InterpolationResult(thin, uncertainty, seconds=time.perf_counter() - start, method=request.method or "server default")
