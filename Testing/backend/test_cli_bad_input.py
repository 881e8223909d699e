"""Every bad input of issue 2 through the real CLI entry: a non-zero exit, one line on stderr
naming the problem, nothing written, and the input left byte for byte as it was."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctsliceinterp.cli import main
from ctsliceinterp.io import read_volume
from ctsliceinterp.core.errors import InputError
from test_io_dicom import hu_volume, write_series


def tree_digest(path: Path) -> str:
    """Hash of a file, or of every file under a folder (names and bytes)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def run_refused(capsys, source: Path, out: Path, *extra: str, pattern: str) -> str:
    """Run ``interpolate`` and check the four promises; return stderr."""
    before = tree_digest(source) if source.exists() else None
    listing = sorted(out.parent.rglob("*"))
    code = main(["interpolate", str(source), "-o", str(out), "--method", "bspline", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("ctsliceinterp: error:") and "Traceback" not in err
    assert __import__("re").search(pattern, err, flags=__import__("re").S), err
    assert sorted(out.parent.rglob("*")) == listing, "something was written"
    if before is not None:
        assert tree_digest(source) == before, "the input changed"
    return err


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder / "thin.nrrd"


def ct_file(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 5.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_missing_file(capsys, tmp_path, out):
    run_refused(capsys, tmp_path / "nowhere.nrrd", out, pattern="input not found: .*nowhere.nrrd")


def test_corrupted_dicom(capsys, tmp_path, out):
    write_series(tmp_path / "s", hu_volume())
    (tmp_path / "s" / "slice002.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x07" * 40)
    run_refused(capsys, tmp_path / "s", out, pattern="slice002.dcm")


def test_unreadable_nrrd(capsys, tmp_path, out):
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n12")
    run_refused(capsys, tmp_path / "bad.nrrd", out, pattern="cannot read .*bad.nrrd")


def test_zip_without_dicom_and_broken_zip(capsys, tmp_path, out):
    archive = tmp_path / "docs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/notes.txt", "nothing to see")
    run_refused(capsys, archive, out, pattern="no DICOM images found in the ZIP")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    run_refused(capsys, broken, out, pattern="not a valid ZIP")


def test_two_d_image(capsys, tmp_path, out):
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    run_refused(capsys, tmp_path / "slice.nrrd", out, pattern="2-D image")
    write_series(tmp_path / "one", hu_volume((1, 10, 12)))
    run_refused(capsys, tmp_path / "one", out, pattern="single slice.*2-D image")


def test_rgb_or_vector_image(capsys, tmp_path, out):
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    run_refused(capsys, tmp_path / "rgb.nrrd", out, pattern="3 components per voxel")
    vector = sitk.Image([8, 8, 4], sitk.sitkVectorFloat32, 2)
    sitk.WriteImage(vector, str(tmp_path / "field.mha"))
    run_refused(capsys, tmp_path / "field.mha", out, pattern="2 components per voxel")


def test_label_map(capsys, tmp_path, out):
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[2:5, 4:12, 4:12] = 3
    run_refused(capsys, ct_file(tmp_path / "labels.nii.gz", labels), out, pattern="looks like a label map")


def test_nan_or_inf_voxels(capsys, tmp_path, out):
    array = np.full((6, 16, 16), -1000.0, np.float32)
    array[3, 5, 5] = np.nan
    array[4, 5, 5] = -np.inf
    run_refused(capsys, ct_file(tmp_path / "nan.nrrd", array), out, pattern="2 NaN or infinite voxels")


def test_already_at_or_below_target_spacing(capsys, tmp_path, out):
    thin = ct_file(tmp_path / "thin.nrrd", hu_volume((8, 10, 12)), spacing=(0.8, 0.8, 1.0))
    run_refused(capsys, thin, out, pattern="already at or below the target spacing")
    run_refused(capsys, thin, out, "--spacing", "2", pattern="already at or below")


def test_mixed_series(capsys, tmp_path, out):
    write_series(tmp_path / "mix", hu_volume(), series_uid="1.2.826.0.1.7", description="A")
    write_series(tmp_path / "mix", hu_volume(seed=1), series_uid="1.2.826.0.1.8", description="B",
                 names=[f"b{k}.dcm" for k in range(6)], origin=(0, 0, 0))
    err = run_refused(capsys, tmp_path / "mix", out, pattern="2 series.*--series-uid")
    assert "1.2.826.0.1.7" in err and "1.2.826.0.1.8" in err


@pytest.mark.parametrize(
    "positions, pattern",
    [
        ([0, 5, 10, 14, 19, 24], "non-uniform slice spacing"),
        ([0, 5, 15, 20, 25, 30], "missing slice"),
        ([0, 5, 5, 10, 15, 20], "duplicate slice position"),
    ],
)
def test_irregular_dicom_spacing(capsys, tmp_path, out, positions, pattern):
    write_series(tmp_path / "s", hu_volume(), positions=positions)
    run_refused(capsys, tmp_path / "s", out, pattern=pattern)


def test_gantry_tilt(capsys, tmp_path, out):
    paths = write_series(tmp_path / "s", hu_volume())
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [-10, 20 + 1.0 * k, 100 + 5.0 * k]
        ds.save_as(path)
    run_refused(capsys, tmp_path / "s", out, pattern="gantry tilt")


def test_case_layout_needs_series(capsys, tmp_path, out):
    write_series(tmp_path / "case_a" / "1", hu_volume())
    write_series(tmp_path / "case_a" / "2", hu_volume((12, 10, 12)), (0.7, 0.8, 1.0))
    run_refused(capsys, tmp_path / "case_a", out, pattern="--series thick or --series thin")


def test_output_equal_to_input(capsys, tmp_path):
    volume_path = ct_file(tmp_path / "thick.nrrd", hu_volume())
    run_refused(capsys, volume_path, volume_path, pattern="is the input")
    write_series(tmp_path / "series", hu_volume())
    run_refused(capsys, tmp_path / "series", tmp_path / "series", pattern="is the input")
    # A file of a series as input, its folder as output: replacing the folder would delete the input.
    run_refused(capsys, tmp_path / "series" / "slice000.dcm", tmp_path / "series", pattern="holds the input")


def test_existing_dicom_output_folder_is_not_replaced(capsys, tmp_path):
    source = ct_file(tmp_path / "thick.nrrd", hu_volume())
    (tmp_path / "patient").mkdir()
    (tmp_path / "patient" / "keep.txt").write_text("mine")
    before = tree_digest(tmp_path / "patient")
    code = main(["interpolate", str(source), "-o", str(tmp_path / "patient") + "/", "--method", "bspline", "--no-progress"])
    assert code != 0 and "exists and is not empty" in capsys.readouterr().err
    assert tree_digest(tmp_path / "patient") == before


def test_good_dicom_zip_to_dicom_series(capsys, tmp_path):
    """The same path succeeds on a good case ZIP: thick DICOM in, a thin DICOM series out."""
    write_series(tmp_path / "c" / "case_b" / "1", hu_volume((4, 10, 12)), (0.7, 0.8, 5.0), description="5mm")
    write_series(tmp_path / "c" / "case_b" / "2", hu_volume((16, 10, 12)), (0.7, 0.8, 1.0), thickness=1.0)
    archive = tmp_path / "case_b.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted((tmp_path / "c").rglob("*.dcm")):
            z.write(path, path.relative_to(tmp_path / "c").as_posix())
    before = tree_digest(archive)
    code = main(["interpolate", str(archive), "--series", "thick", "-o", str(tmp_path / "thin_series"), "--method", "bspline", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    thin = read_volume(tmp_path / "thin_series")
    assert thin.shape == (16, 10, 12) and thin.spacing[2] == pytest.approx(1.0)
    assert thin.origin == pytest.approx((-10.0, 20.0, 100.0))
    assert thin.metadata["series_description"] == "5mm thin 1mm (CTSliceInterp)"
    assert tree_digest(archive) == before
    code = main(["interpolate", str(archive), "--series", "thick", "--like", str(archive), "--like-series", "thin",
                 "-o", str(tmp_path / "like.nrrd"), "--no-progress", "--method", "linear"])
    assert code == 0, capsys.readouterr().err
    like = read_volume(tmp_path / "like.nrrd")
    assert like.shape == (16, 10, 12) and like.origin == pytest.approx((-10.0, 20.0, 100.0))
    code = main(["info", str(archive), "--series", "thin"])
    assert code == 0 and "16" in capsys.readouterr().out


def test_uncertainty_with_a_classical_method_is_refused_not_ignored(tmp_path, capsys):
    from ctsliceinterp.io import write_volume
    from ctsliceinterp.core.volume import Volume

    source = tmp_path / "thick.nrrd"
    write_volume(Volume.from_array(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8) - 1000, spacing=(1, 1, 5)), source)
    code = main(["interpolate", str(source), "-o", str(tmp_path / "out.nrrd"), "--method", "bspline",
                 "--samples", "2", "--uncertainty", str(tmp_path / "std.nrrd"), "--no-progress"])
    assert code != 0
    assert "bspline takes no samples: it applies to residual_diffusion, diffusion" in capsys.readouterr().err
    assert not (tmp_path / "out.nrrd").exists() and not (tmp_path / "std.nrrd").exists()


def test_a_model_without_method_must_be_a_model_folder_and_a_server_chooses_its_own_default():
    from ctsliceinterp.cli import build_parser
    from ctsliceinterp.commands.interpolate import build_request

    args = build_parser().parse_args(["interpolate", "in.nrrd", "-o", "out.nrrd", "--model", "some/checkpoint"])
    with pytest.raises(InputError, match="^model 'some/checkpoint': not a shipped model nor a folder holding"):
        build_request(args)  # no method to guess it for (v1's diffusion was the guess while it shipped)
    args = build_parser().parse_args(["interpolate", "in.nrrd", "-o", "out.nrrd", "--server", "http://127.0.0.1:1"])
    assert build_request(args).method == ""  # the server's own default
