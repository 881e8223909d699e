"""Preprocessing: the real phantom case ZIP, generated broken cases, pairing by position, split."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ctsliceinterp.data import cache as cache_format
from ctsliceinterp.cli import main as cli_main
from ctsliceinterp.io import write_volume
from ctsliceinterp.io.dicom import read_dicom
from ctsliceinterp.data.preprocess import CaseError, check_case_layout, pair_by_position
from ctsliceinterp.core.volume import Volume


def _dicom_case_zip(path: Path, thick: Volume, thin: Volume, tmp: Path, layout=("case/1", "case/2")) -> Path:
    """A case ZIP of small real DICOM series written by the package's own writer."""
    with zipfile.ZipFile(path, "w") as archive:
        for volume, folder in zip((thick, thin), layout):
            out = tmp / f"{path.stem}_{folder.replace('/', '_')}"
            write_volume(volume, str(out) + "/")
            for f in sorted(out.glob("*.dcm")):
                archive.write(f, f"{folder}/{f.name}")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, make_volume_module):
    tmp = tmp_path_factory.mktemp("dataset")
    root = tmp / "data"
    (root / "APE").mkdir(parents=True)
    (root / "non-APE").mkdir()
    from testsupport import SHARED_DATA

    real = SHARED_DATA / "ape_layout" / "APE" / "case_phantom.zip"
    has_real = real.exists()
    if has_real:
        (root / "APE" / "case_phantom.zip").symlink_to(real)
        # Broken cases built from the real ZIP: truncated, and one without the thin series.
        (root / "APE" / "case_truncated.zip").write_bytes(real.read_bytes()[:200_000])
        with zipfile.ZipFile(real) as src, zipfile.ZipFile(root / "APE" / "case_no_thin.zip", "w") as dst:
            for info in src.infolist():
                if "/1/" in info.filename and not info.is_dir():
                    dst.writestr(info.filename, src.read(info))
    thick = make_volume_module(shape=(6, 16, 16), spacing=(0.8, 0.8, 5.0), origin=(0, 0, 100.0))
    thin = make_volume_module(shape=(30, 16, 16), spacing=(0.8, 0.8, 1.0), origin=(0, 0, 98.0), seed=1)
    other = make_volume_module(shape=(30, 16, 16), spacing=(0.7, 0.7, 1.0), origin=(0, 0, 98.0), seed=2)
    _dicom_case_zip(root / "non-APE" / "case_small.zip", thick, thin, tmp)
    _dicom_case_zip(root / "non-APE" / "case_mismatch.zip", thick, other, tmp)
    _dicom_case_zip(root / "non-APE" / "case_nested.zip", thick, thin, tmp, ("case/inner/1", "case/inner/2"))
    with zipfile.ZipFile(root / "non-APE" / "case_extra.zip", "w") as archive:
        for folder in ("case/1", "case/2", "case/3"):
            archive.writestr(f"{folder}/IM1.dcm", b"x")
    return root, has_real


@pytest.fixture(scope="module")
def make_volume_module():
    def _make(shape, spacing, origin, seed=0):
        rng = np.random.default_rng(seed)
        return Volume.from_array(rng.integers(-1000, 1500, shape).astype(np.int16), spacing, origin)

    return _make


@pytest.fixture(scope="module")
def processed(dataset, tmp_path_factory):
    root, has_real = dataset
    out = tmp_path_factory.mktemp("cache") / "cache"
    code = cli_main(["preprocess", "--dataset", str(root), "--out", str(out), "--workers", "2", "--no-progress"])
    report = {c["key"]: c for c in json.loads((out / "report.json").read_text())["cases"]}
    return root, out, report, code, has_real


def test_broken_cases_are_reported_with_reasons_and_skipped(processed):
    root, out, report, code, has_real = processed
    assert code == 0
    expect = {
        "non-APE/case_mismatch": "mismatched geometry",
        "non-APE/case_nested": "nested folders",
        "non-APE/case_extra": "extra series folder",
    }
    if has_real:
        expect.update({"APE/case_truncated": "corrupted ZIP", "APE/case_no_thin": "missing series folder 2/"})
    for key, reason in expect.items():
        assert report[key]["status"] == "failed", key
        assert reason in report[key]["reason"], (key, report[key]["reason"])
        assert not cache_format.case_folder(out, *key.split("/")).exists()
    assert report["non-APE/case_small"]["status"] == "ok"
    split = json.loads((out / "splits.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(k for k, r in report.items() if r["status"] == "ok")


def test_real_phantom_case_is_cached_as_int16_hu_with_geometry(processed, shared_data):
    root, out, report, code, has_real = processed
    real = shared_data("ape_layout/APE/case_phantom.zip")
    case = cache_format.CachedCase.open(cache_format.case_folder(out, "APE", "case_phantom"))
    thick, thin = read_dicom(real, series="thick"), read_dicom(real, series="thin")
    assert case.array("thin").dtype == np.int16 and isinstance(case.array("thin"), np.memmap)
    # The phantom's thin series lies inside the thick slabs' coverage: nothing is dropped.
    np.testing.assert_array_equal(case.array("thick"), thick.array)
    np.testing.assert_array_equal(case.array("thin"), thin.array)
    assert np.allclose(case.thin.geometry.slice_positions(), thin.geometry.slice_positions())
    assert np.allclose(case.thick.geometry.origin, thick.geometry.origin)
    m = case.manifest
    assert m["category"] == "APE" and m["acquisition"]["thick_slice_thickness_mm"] == 5.0
    assert m["pairing"]["overlap_mm"] == pytest.approx([696.21 - 2.5, 831.21 + 2.5])
    assert "PatientID" not in json.dumps(m)  # only a pseudonymous patient key is kept


def test_rerun_skips_finished_cases(processed):
    root, out, report, code, has_real = processed
    from ctsliceinterp.data.preprocess import preprocess_dataset

    before = (out / "splits.json").read_text()
    results = {r.key: r for r in preprocess_dataset(root, out, workers=1, progress=False)}
    assert results["non-APE/case_small"].status == "cached"
    assert results["non-APE/case_extra"].status == "failed"
    assert (out / "splits.json").read_text() == before  # deterministic split


def test_pairing_keeps_the_common_z_range_by_position(make_volume_module):
    # Thick slabs centred 100..125 (5 mm, covering 97.5..127.5); thin every 1 mm from 90 to 139,
    # stored with a reversed slice axis: pairing must use positions, not indices.
    thick = make_volume_module(shape=(6, 8, 8), spacing=(1, 1, 5.0), origin=(0, 0, 100.0))
    thin = make_volume_module(shape=(50, 8, 8), spacing=(1, 1, 1.0), origin=(0, 0, 90.0), seed=3)
    direction = np.diag([1.0, 1.0, -1.0])
    reversed_thin = Volume(thin.array[::-1].copy(), type(thin.geometry)(thin.shape, thin.spacing, (0, 0, 139.0), tuple(direction.ravel())))
    t, s, info = pair_by_position(thick, reversed_thin)
    assert t.shape[0] == 6
    assert s.geometry.slice_positions()[[0, -1]] == pytest.approx([98.0, 127.0])  # inside 97.5..127.5
    np.testing.assert_array_equal(s.array, thin.array[8:38])
    assert info["overlap_mm"] == pytest.approx([97.5, 127.5])


def test_layout_checks_name_the_problem():
    assert check_case_layout(["c/1/a.dcm", "c/2/b.dcm", "c/README.txt"], "c.zip") == "c"
    with pytest.raises(CaseError, match="missing series folder 1/"):
        check_case_layout(["c/2/b.dcm"], "c.zip")
    with pytest.raises(CaseError, match="several case folders"):
        check_case_layout(["a/1/x.dcm", "a/2/y.dcm", "b/1/x.dcm", "b/2/y.dcm"], "c.zip")
    with pytest.raises(CaseError, match="nested folders"):
        check_case_layout(["c/1/sub/x.dcm", "c/2/y.dcm"], "c.zip")


def test_split_is_patient_level_stratified_and_seeded():
    cases = [{"key": f"{cat}/c{i}", "category": cat, "patient": f"{cat}-p{i // 2}"} for cat in ("A", "B") for i in range(40)]
    a, b = cache_format.make_split(cases, "75,15,10", seed=1), cache_format.make_split(list(reversed(cases)), (75, 15, 10), seed=1)
    assert a == b
    assert a != cache_format.make_split(cases, "75,15,10", seed=2)
    for cat in ("A", "B"):  # 20 patients per category: 15 / 3 / 2
        assert [sum(k.startswith(cat) for k in a[s]) for s in ("train", "val", "test")] == [30, 6, 4]
    where = {k: s for s in ("train", "val", "test") for k in a[s]}
    for case in cases:  # both cases of a patient in the same split
        partner = case["key"][:-1] + str(int(case["key"][-1]) ^ 1) if case["key"][-1].isdigit() else None
        if partner in where and cases[[c["key"] for c in cases].index(partner)]["patient"] == case["patient"]:
            assert where[partner] == where[case["key"]]
