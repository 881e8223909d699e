"""CTSliceInterp backend: thick-slice to thin-slice CT interpolation.

Kept free of heavy imports so that ``ctsliceinterp.client`` works in any Python with numpy."""

__version__ = "0.1.0"
