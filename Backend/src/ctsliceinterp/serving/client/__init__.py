"""Client for the CTSliceInterp server: the standard library and numpy only.

It runs in Slicer's Python as is (no torch, SimpleITK or requests). Only geometry and voxels
leave the machine: the NRRD it sends holds no metadata (DICOM tags and patient identifiers stay
local, and ``interpolate_remote`` puts them back on the result).

    client = Client("https://gpu-host:8000", token=read_token("token"))
    thin, uncertainty = client.run(thick, {"method": "bspline", "spacing": 1.0}, progress=print)

- ``transport``: HTTP/1.1 with retries, per-call deadlines, bounded bodies, 100-continue uploads
- ``calls``: ``Client``, one method per API call, and ``run``; results checked against the request
- ``progress``: ``JobProgress``, what ``run`` reports
- ``errors``: one exception per failure
- ``remote``: ``interpolate_remote``, the command line's entry
"""

from ..access import TOKEN_ENV, InsecureTokenFile, is_loopback, read_token
from .calls import API, PARAMS_HEADER, Client, check_result_grid, expected_grid
from .errors import (
    AuthenticationFailed,
    ClientError,
    InputRejected,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ServerBusy,
    ServerUnreachable,
)
from .progress import JobProgress
from .remote import interpolate_remote

__all__ = [
    "API", "PARAMS_HEADER", "TOKEN_ENV", "AuthenticationFailed", "InsecureTokenFile", "Client", "ClientError", "InputRejected",
    "JobCancelled", "JobFailed", "JobNotFound", "JobProgress", "ServerBusy", "ServerUnreachable",
    "check_result_grid", "expected_grid", "interpolate_remote", "is_loopback", "read_token",
]
