"""DICOM series rules beyond the basics of test_io_dicom.py: non-CT modalities, Enhanced CT built from a
classic series, duplicates with different pixels, tilt together with irregular spacing, the de-tilt
itself on analytic data, pydicom's warnings, path-traversal ZIP members, and the output folder rules."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from test_io_dicom import hu_volume, write_series
from testsupport import oblique_direction
from ctsliceinterp.core.errors import GeometryError, InputError, OutputError
from ctsliceinterp.io import read_volume, write_volume

REPO = Path(__file__).resolve().parents[2]
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


# --- modality -------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality, sop_class", [("MR", "1.2.840.10008.5.1.4.1.1.4"), ("PT", "1.2.840.10008.5.1.4.1.1.128")])
def test_images_that_are_not_ct_are_refused_naming_the_modality(tmp_path, modality, sop_class):
    paths = write_series(tmp_path / "s", hu_volume())
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SOPClassUID = modality, sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path)
    with pytest.raises(InputError, match=f"Modality {modality}.*CT"):
        read_volume(tmp_path / "s")


def test_pydicom_mr_test_file_is_refused_as_mr(tmp_path):
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("MR_small.dcm"))
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "MR_small.dcm").write_bytes(source.read_bytes())
    with pytest.raises(InputError, match="Modality MR"):
        read_volume(tmp_path / "mr")


def test_series_listing_names_each_modality(tmp_path):
    write_series(tmp_path / "mix", hu_volume(), series_uid="1.2.826.0.1.1")
    paths = write_series(tmp_path / "mix", hu_volume(), series_uid="1.2.826.0.1.2", names=[f"mr{k}.dcm" for k in range(6)])
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "mix")
    lines = str(err.value).splitlines()
    assert any("1.2.826.0.1.1 " in line and " CT, 6 files" in line for line in lines)
    assert any("1.2.826.0.1.2 " in line and " MR, 6 files" in line for line in lines)


# --- Enhanced CT built from a classic series ---------------------------------------------------------
def _group(**values) -> Sequence:
    """A functional-group macro: a sequence of one item holding ``values``."""
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return Sequence([item])


def enhanced_from_classic(paths: list[Path], target: Path, *, order=None, per_frame_rescale=False) -> Path:
    """One Enhanced CT object holding the classic files' frames (in ``order``), with their geometry in
    the functional groups (orientation and pixel measures shared; position per frame; rescale shared or
    per frame), as a scanner exports it."""
    classic = [pydicom.dcmread(p) for p in paths]
    order = list(order) if order is not None else list(range(len(classic)))
    first = classic[0]
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT_STORAGE, meta.MediaStorageSOPInstanceUID
    for key in ("Modality", "PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                "SeriesDescription", "SeriesNumber", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, key, getattr(first, key))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    shared.PlaneOrientationSequence = _group(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PixelMeasuresSequence = _group(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = _group(RescaleIntercept=first.RescaleIntercept,
                                                         RescaleSlope=first.RescaleSlope, RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for n, k in enumerate(order):
        item = Dataset()
        item.PlanePositionSequence = _group(ImagePositionPatient=classic[k].ImagePositionPatient)
        item.FrameContentSequence = _group(InStackPositionNumber=n + 1, StackID="1")
        if per_frame_rescale:
            item.PixelValueTransformationSequence = _group(RescaleIntercept=classic[k].RescaleIntercept,
                                                           RescaleSlope=classic[k].RescaleSlope, RescaleType="HU")
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(classic[k].PixelData for k in order)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_enhanced_ct_built_from_a_classic_series_reads_the_same(tmp_path):
    hu = hu_volume((7, 10, 12))
    paths = write_series(tmp_path / "classic", hu, (0.7, 0.8, 2.5), (-10, 20, 100), oblique_direction(20))
    classic = read_volume(tmp_path / "classic")
    (tmp_path / "enh").mkdir()
    shuffled = np.random.default_rng(4).permutation(len(paths))  # frames in any order: sorted by position
    enhanced = read_volume(enhanced_from_classic(paths, tmp_path / "enh" / "mf.dcm", order=shuffled))
    np.testing.assert_array_equal(enhanced.array, classic.array)
    assert enhanced.geometry == classic.geometry
    assert enhanced.metadata["slice_thickness"] == classic.metadata["slice_thickness"]


def test_enhanced_ct_per_frame_rescale_and_the_same_geometry_checks(tmp_path):
    hu = hu_volume((5, 10, 12))
    folder = tmp_path / "classic"
    write_series(folder, hu[:2], names=["a0.dcm", "a1.dcm"], intercept=-1024.0)
    paths = sorted(folder.glob("*.dcm"))
    write_series(folder, hu[2:] + 500, names=["b0.dcm", "b1.dcm", "b2.dcm"], positions=[10.0, 15.0, 20.0],
                 series_uid=pydicom.dcmread(paths[0]).SeriesInstanceUID, intercept=-524.0)  # stored = HU + 1024, shifted
    paths = sorted(folder.glob("*.dcm"))
    (tmp_path / "enh").mkdir()
    volume = read_volume(enhanced_from_classic(paths, tmp_path / "enh" / "mf.dcm", per_frame_rescale=True))
    expected = hu.copy()
    expected[2:] = hu[2:] + 1000  # (HU + 500 + 1024) - 524
    np.testing.assert_array_equal(volume.array, expected)
    # A missing frame position is the same error as a missing classic slice.
    (tmp_path / "gap").mkdir()
    with pytest.raises(GeometryError, match="missing slice"):
        read_volume(enhanced_from_classic(paths, tmp_path / "gap" / "mf.dcm", order=[0, 1, 3, 4]))


# --- duplicates, tilt + irregular -------------------------------------------------------------------
def test_same_sop_instance_with_different_pixels_is_an_error(tmp_path):
    paths = write_series(tmp_path / "s", hu_volume())
    copy = tmp_path / "s" / "copy_of_slice002.dcm"
    copy.write_bytes(paths[2].read_bytes())
    assert read_volume(tmp_path / "s").shape == (6, 10, 12)  # an identical copy is harmless
    ds = pydicom.dcmread(copy)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 7
    ds.PixelData = pixels.tobytes()
    ds.save_as(copy)
    with pytest.raises(InputError, match=r"same SOPInstanceUID.*different pixels.*/copy_of_slice002\.dcm and .*/slice002\.dcm"):
        read_volume(tmp_path / "s")


def _shear(paths: list[Path], positions: list[float], degrees: float) -> None:
    shear = np.tan(np.deg2rad(degrees))
    for path, z in zip(paths, positions):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [-10, 20 + shear * z, 100 + z]
        ds.GantryDetectorTilt = degrees
        ds.save_as(path)


def test_tilted_and_irregular_names_both_problems(tmp_path):
    positions = [0, 5, 10, 12, 17, 22]
    paths = write_series(tmp_path / "s", hu_volume(), positions=positions)
    _shear(paths, positions, 15)
    with pytest.raises(GeometryError, match=r"(?s)non-uniform slice spacing.*gantry tilt.*15\.0 degrees"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize("degrees, direction, along", [(15.0, None, "column"), (-20.0, None, "column"),
                                                      (12.0, "oblique", "column"), (10.0, "oblique", "row")])
def test_detilt_resamples_onto_the_true_normal_exactly_for_linear_hu(tmp_path, degrees, direction, along):
    """A sheared series of HU that are a linear function of position: after de-tilting, every voxel
    holds that function at its own LPS point (linear interpolation is exact there), the grid is
    orthogonal, the in-plane spacing is kept and the slice spacing is measured along the normal."""
    shape, spacing = (6, 14, 12), (0.7, 0.8, 3.0)
    d = np.asarray(oblique_direction(10) if direction else np.eye(3).ravel(), float).reshape(3, 3)
    row, col = d[:, 0], d[:, 1]
    normal = np.cross(row, col)
    drift_axis = col if along == "column" else row  # gantries tilt about x, so slices drift along the columns
    tilt_axis = np.cos(np.deg2rad(degrees)) * normal + np.sin(np.deg2rad(degrees)) * drift_axis  # the table's axis
    origin = np.array([-10.0, 20.0, 100.0])

    def hu_at(points):
        return 3.0 * points[..., 0] - 2.0 * points[..., 1] + 0.5 * points[..., 2] - 300.0

    folder = tmp_path / "tilted"
    folder.mkdir()
    uid = generate_uid()
    from test_io_dicom import ct_slice

    for k in range(shape[0]):
        position = origin + k * spacing[2] * tilt_axis
        j, i = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
        points = position + i[..., None] * spacing[0] * row + j[..., None] * spacing[1] * col
        stored = np.rint((hu_at(points) + 1024) * 8).astype(np.uint16)  # slope 1/8: fine steps
        ds = ct_slice(stored, position, [*row, *col], (spacing[1], spacing[0]), uid, slope=0.125, intercept=-1024)
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
    with pytest.raises(GeometryError, match="--detilt"):
        read_volume(folder)
    volume = read_volume(folder, detilt=True)
    g = volume.geometry
    np.testing.assert_allclose(g.direction_matrix, np.column_stack([row, col, normal]), atol=1e-6)
    np.testing.assert_allclose(g.spacing, (0.7, 0.8, 3.0 * np.cos(np.deg2rad(degrees))), atol=1e-6)
    pixel = spacing[1] if along == "column" else spacing[0]
    shift = 3.0 * np.sin(np.deg2rad(degrees)) * (shape[0] - 1) / pixel  # pixels the slices drift in all
    widened = (1, int(np.ceil(abs(shift) - 1e-6))) if along == "column" else (2, int(np.ceil(abs(shift) - 1e-6)))
    assert g.shape[widened[0]] == shape[widened[0]] + widened[1]
    assert g.shape[3 - widened[0]] == shape[3 - widened[0]]
    k, j, i = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
    points = g.index_to_physical(np.stack([i, j, k], axis=-1))  # (z, y, x, 3) LPS
    # Where each voxel falls in its acquired slice (rows, columns): exact inside, the edge pixel within
    # half a pixel of the edge (a pixel covers its own square, as dcm2niix reads it), padding beyond.
    acquired_origin = origin + (k * spacing[2])[..., None] * tilt_axis
    source_j = (points - acquired_origin) @ col / spacing[1]
    source_i = (points - acquired_origin) @ row / spacing[0]
    inside = (source_j >= -0.5) & (source_j <= shape[1] - 0.5) & (source_i >= -0.5) & (source_i <= shape[2] - 0.5)
    clamped = (acquired_origin + np.clip(source_i, 0, shape[2] - 1)[..., None] * spacing[0] * row
               + np.clip(source_j, 0, shape[1] - 1)[..., None] * spacing[1] * col)
    expected = np.where(inside, hu_at(clamped), volume.metadata["detilt_padding_hu"])
    np.testing.assert_allclose(volume.array, expected, atol=0.07)  # half a storage step (1/16 HU) + float32
    assert inside.sum() >= shape[0] * shape[1] * shape[2]  # nothing acquired is lost


# --- pydicom's warnings, path traversal -------------------------------------------------------------
def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "Backend" / "src"), "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "ctsliceinterp.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def _series_with_an_invalid_uid(folder: Path) -> None:
    for path in write_series(folder, hu_volume()):
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns here too; these files are meant to be odd
            ds.FrameOfReferenceUID = "1.2.3.abc"  # not a valid UI value: pydicom warns when it reads it
        ds.save_as(path)


def test_pydicom_warnings_are_kept_off_the_terminal_and_shown_with_debug(tmp_path):
    _series_with_an_invalid_uid(tmp_path / "s")
    quiet = _cli("info", tmp_path / "s")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    noisy = _cli("--debug", "info", tmp_path / "s")
    assert noisy.returncode == 0
    assert "Invalid value for VR UI" in noisy.stderr


def test_an_error_stays_one_line_despite_pydicom_warnings(tmp_path):
    _series_with_an_invalid_uid(tmp_path / "s")
    write_series(tmp_path / "taken", hu_volume())  # the output folder holds another series: refused at the end
    result = _cli("interpolate", tmp_path / "s", "-o", tmp_path / "taken", "--method", "linear", "--no-progress")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ctsliceinterp: error: the output folder")


def test_path_traversal_zip_members_are_skipped_with_a_warning(tmp_path, caplog):
    write_series(tmp_path / "s", hu_volume())
    write_series(tmp_path / "evil", hu_volume(seed=5), names=[f"e{k}.dcm" for k in range(6)])
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tmp_path / "s").glob("*.dcm")):
            z.write(path, f"series/{path.name}")
        z.write(tmp_path / "evil" / "e0.dcm", "../../outside/e0.dcm")
        z.writestr(zipfile.ZipInfo("/etc/e1.dcm"), (tmp_path / "evil" / "e1.dcm").read_bytes())  # write() would strip the /
    with caplog.at_level(logging.WARNING, logger="ctsliceinterp"):
        volume = read_volume(archive)
    assert volume.shape == (6, 10, 12)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "../../outside/e0.dcm" in warned and "/etc/e1.dcm" in warned


# --- output folder rules ------------------------------------------------------------------------------
def test_output_inside_the_input_folder_is_refused(tmp_path):
    write_series(tmp_path / "in", hu_volume())
    result = _cli("interpolate", tmp_path / "in", "-o", tmp_path / "in" / "thin", "--method", "linear", "--no-progress")
    assert result.returncode == 2 and "inside the input folder" in result.stderr
    assert not (tmp_path / "in" / "thin").exists()
    volume = read_volume(tmp_path / "in")
    for output in (tmp_path / "in" / "sub" / "x", tmp_path / "in" / "thin.nrrd"):
        with pytest.raises(OutputError, match="inside the input folder"):
            write_volume(volume, output, inputs=[tmp_path / "in"])


def test_dicom_output_holds_only_dicom_and_can_be_replaced(tmp_path):
    volume = read_volume(write_series(tmp_path / "in", hu_volume())[0].parent)
    out = write_volume(volume, tmp_path / "out")
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"IM{k:04d}.dcm" for k in range(1, 7)]  # no marker file: the folder is PACS-ready
    write_volume(volume, tmp_path / "out")  # written by CTSliceInterp before: replaced as a whole
    assert len(list(out.iterdir())) == 6
    (out / ".ctsliceinterp-series").write_text("written by ctsliceinterp\n")  # what earlier versions left there
    write_volume(volume, tmp_path / "out")
    assert len(list(out.iterdir())) == 6
    (out / "IM0007.dcm").write_bytes((tmp_path / "in" / "slice000.dcm").read_bytes())  # a scanner's file slipped in
    with pytest.raises(OutputError, match="not empty"):
        write_volume(volume, tmp_path / "out")
    with pytest.raises(OutputError, match="not empty"):
        write_volume(volume, tmp_path / "in")  # a scanner's series is never replaced
