"""CTSliceInterp backend: thick-slice to thin-slice CT interpolation.

The public API is ``interpolate``, ``InterpolationRequest``, ``Volume``, ``read_volume`` and
``write_volume``. They are imported on first use, so ``import ctsliceinterp`` (and
``ctsliceinterp.serving.client``) stays free of heavy imports and works in any Python with numpy."""

__version__ = "0.1.0"

_PUBLIC = {
    "interpolate": "ctsliceinterp.api",
    "InterpolationRequest": "ctsliceinterp.api",
    "InterpolationResult": "ctsliceinterp.api",
    "Volume": "ctsliceinterp.core.volume",
    "Geometry": "ctsliceinterp.core.volume",
    "read_volume": "ctsliceinterp.io",
    "write_volume": "ctsliceinterp.io",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ctsliceinterp' has no attribute {name!r}")
