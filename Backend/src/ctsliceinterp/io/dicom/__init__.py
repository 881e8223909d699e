"""DICOM adapter: a series folder, one file of a series, a DICOMDIR, or a ZIP (the dataset's case layout
``case_X/1`` thick / ``case_X/2`` thin included) <-> ``Volume``; and a DICOM series writer.

- ``sources``: folders, ZIPs (read in place, bounded inflation) and DICOMDIR indexes, as members;
- ``scan``: headers (a cheap probe first), one plane per image or Enhanced CT frame, the series choice;
- ``geometry``: named checks that the planes form one regular grid, and the de-tilted grid;
- ``pixels``: declared sizes checked before reading, decoding to HU, copies, de-tilting;
- ``read`` / ``write``: the readers and the writer; ``messages``: pydicom's warnings to the debug log.

Reading rules (docs/io.md): only CT is read; slices are ordered by ImagePositionPatient projected on the
slice normal, never by file name or InstanceNumber; RescaleSlope/Intercept are applied per plane (HU out);
non-uniform spacing, a missing slice, duplicate positions, gantry tilt (unless ``detilt``), mixed sizes or
orientations are errors that name the problem; nothing is resampled behind the user's back."""

from .read import read_case, read_dicom
from .write import is_ctsliceinterp_series, write_dicom_series

__all__ = ["is_ctsliceinterp_series", "read_case", "read_dicom", "write_dicom_series"]
