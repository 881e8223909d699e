"""Interpolation over HTTP: the NRRD-bytes wire format, the client (numpy + standard library
only, imported by Slicer) and ``server/`` (FastAPI, imported only by the server process)."""
