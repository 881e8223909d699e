"""Exceptions with messages meant for the user (the CLI prints them on one line)."""


class CTSliceInterpError(Exception):
    """Base class: anything the user can act on. The message names the problem."""


class InputError(CTSliceInterpError):
    """The input volume or file cannot be used (missing, corrupted, wrong kind of image...)."""


class GeometryError(CTSliceInterpError):
    """Geometry that the product cannot handle (non-uniform spacing, tilt, non-parallel grids...)."""


class OutputError(CTSliceInterpError):
    """The output cannot be written where asked (e.g. it would overwrite the input)."""


class Cancelled(CTSliceInterpError):
    """The user cancelled the work."""
