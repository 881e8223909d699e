"""DICOM adapter (implemented by the I/O work of issue 2)."""
