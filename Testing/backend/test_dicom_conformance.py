"""The DICOM series we write against the CT Image IOD (PS3.3 A.3): every Type 1 attribute present with a
value, every Type 2 attribute present (possibly empty), module by module; and dciodvfy (dicom3tools) with
no errors where it is installed (`apt-get install dicom3tools`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from test_io_dicom import hu_volume, write_series
from ctsliceinterp.core.volume import Volume
from ctsliceinterp.io import read_volume, write_volume

# Module -> (Type 1 keywords, Type 2 keywords), for CT Image Storage as we write it. The Type 2C
# attributes that apply to every CT image are listed with Type 2 (PatientPosition: CT Image Storage
# without a Patient Orientation Code Sequence; Laterality: dciodvfy cannot tell a paired body part).
CT_IMAGE_IOD = {
    "SOP Common": (("SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet"), ()),
    "Patient": ((), ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")),
    "General Study": (("StudyInstanceUID",), ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")),
    "General Series": (("Modality", "SeriesInstanceUID"), ("SeriesNumber", "PatientPosition", "Laterality")),
    "Frame of Reference": (("FrameOfReferenceUID",), ("PositionReferenceIndicator",)),
    "General Equipment": ((), ("Manufacturer",)),
    "General Image": ((), ("InstanceNumber",)),
    "Image Plane": (("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"), ("SliceThickness",)),
    "Image Pixel": (("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
                     "HighBit", "PixelRepresentation", "PixelData"), ()),
    "CT Image": (("ImageType", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                  "RescaleIntercept", "RescaleSlope"), ("KVP", "AcquisitionNumber")),
}


def _outputs(tmp_path):
    """A series written from a non-DICOM volume, one derived from a DICOM input (tags carried over), and
    one from a real Philips export (BodyPartExamined BRAIN: an unpaired part, so no Laterality)."""
    plain = Volume.from_array(hu_volume((3, 10, 12)).astype(np.float32), (0.7, 0.8, 2.0))
    write_series(tmp_path / "src", hu_volume((3, 10, 12)))
    derived = read_volume(tmp_path / "src")
    philips = read_volume(Path(__file__).resolve().parents[1] / "data" / "dicom" / "philips_tilted_8slices.zip", detilt=True)
    return {"from NRRD-like input": write_volume(plain, tmp_path / "plain"),
            "from a DICOM series": write_volume(derived.replace(method="linear"), tmp_path / "derived"),
            "from a real Philips series": write_volume(philips, tmp_path / "philips")}


def test_written_series_has_every_type_1_and_type_2_attribute(tmp_path):
    for label, folder in _outputs(tmp_path).items():
        for path in sorted(folder.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            for module, (type1, type2) in CT_IMAGE_IOD.items():
                for keyword in type1:
                    assert keyword in ds and ds[keyword].value not in (None, "", b""), f"{label} {path.name}: {module} {keyword} (Type 1)"
                for keyword in type2:
                    if keyword == "Laterality" and ds.get("BodyPartExamined") == "BRAIN":
                        assert keyword not in ds, f"{label} {path.name}: Laterality of an unpaired body part"
                        continue
                    assert keyword in ds, f"{label} {path.name}: {module} {keyword} (Type 2) missing"
            assert ds.Modality == "CT"
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (apt-get install dicom3tools)")
def test_written_series_passes_dciodvfy(tmp_path):
    for label, folder in _outputs(tmp_path).items():
        for path in sorted(folder.glob("*.dcm")):
            report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{label} {path.name}: {errors}"
