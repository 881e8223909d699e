"""`evaluate --cache CACHE --split test`: the real phantom case ZIP and a simulated case,
preprocessed into a cache, evaluated on the cached thin grid with the classical baselines and a
random tiny diffusion checkpoint; report files, pairing by position, sane scores, CLI errors."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from testsupport import shared_file
from ctsliceinterp.data import cache as cache_format
from ctsliceinterp import cli
from ctsliceinterp.pipelines.checkpoint import save_checkpoint
from ctsliceinterp.evaluation.evaluate_cache import evaluate_split, evaluation_case
from ctsliceinterp.io import write_volume
from ctsliceinterp.evaluation.metrics import score
from ctsliceinterp.models.configs import get_config
from ctsliceinterp.models.unet import UNet3D
from ctsliceinterp.models.vae import SliceVAE
from ctsliceinterp.data.preprocess import preprocess_dataset
from ctsliceinterp.api import InterpolationRequest, interpolate
from ctsliceinterp.core.volume import Volume

CROP = 64  # in-plane crop: keeps the real 140-slice phantom evaluation to seconds on a CPU
PHANTOM = "APE/case_phantom"
SIMULATED = "sim/ramp"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread (module scope, so the module fixtures below run with it too): on a
    shared 2-core machine two threads spin-wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ramp_thin(n=40, size=32) -> Volume:
    """1 mm thin CT inside a disc: HU grow with the position along the normal, plus a slow wave
    so that no method is exact."""
    probe = Volume.from_array(np.zeros((n, size, size), np.int16), (0.9, 0.9, 1.0), (3.0, -7.0, 50.0))
    z = probe.geometry.slice_positions() - 50.0
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    hu = 10 * z + 40 * np.sin(z / 4.0)
    return probe.replace(array=np.where(disc[None], hu[:, None, None], -1000).astype(np.int16))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    real = shared_file("ape_layout/APE/case_phantom.zip")  # skips with a reason without ../shared
    root = tmp_path_factory.mktemp("eval_dataset")
    (root / "APE").mkdir()
    (root / "sim").mkdir()
    (root / "APE" / "case_phantom.zip").symlink_to(real)
    write_volume(ramp_thin(), root / "sim" / "ramp.nrrd")
    out = tmp_path_factory.mktemp("eval_cache") / "cache"
    results = preprocess_dataset(root, out, workers=1, progress=False)
    assert all(r.status == "ok" for r in results), [(r.key, r.reason) for r in results]
    # Both cases in the test split (two cases would otherwise both land in train).
    cache_format.write_json(out / cache_format.SPLITS_FILE, {"train": [], "val": [], "test": [PHANTOM, SIMULATED]})
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = get_config("tiny")
    config = config.replace(inference=dataclasses.replace(config.inference, chunk_depth=16, chunk_overlap=4, steps=2))
    unet = UNet3D(config.unet)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # a fresh U-Net predicts exactly 0
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny", SliceVAE(config.vae), unet, config, latent_scale=1.0)


@pytest.fixture(scope="module")
def report(cache, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_report") / "report"
    options = {"model": str(tiny_model), "steps": 2, "sampler": "ddim", "device": "cpu", "seed": 0}
    result = evaluate_split(cache, "test", ["linear", "bspline", "lanczos", "diffusion"], out, options, crop=CROP)
    return result, out


def test_report_files_and_tables(report):
    result, out = report
    assert [o.key for o in result.outcomes] == [PHANTOM, SIMULATED] and all(o.ok for o in result.outcomes)
    for name in ("report.json", "report.csv", "summary.md", "psnr_by_method.png"):
        assert (out / name).stat().st_size > 0, name
    for key in (PHANTOM, SIMULATED):
        for name in ("axial.png", "coronal.png", "sagittal.png", "scores.json"):
            assert (out / "cases" / key / name).stat().st_size > 0
    data = json.loads((out / "report.json").read_text())
    assert data["cases_evaluated"] == 2 and data["split"] == "test" and data["in_plane_crop"] == CROP
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 2 * 4 + 4
    for method in ("linear", "bspline", "lanczos", "diffusion"):
        per_case = [float(r["psnr"]) for r in rows if r["method"] == method and r["case"] != "mean"]
        mean_row = next(r for r in rows if r["method"] == method and r["case"] == "mean")
        assert float(mean_row["psnr"]) == pytest.approx(np.mean(per_case), rel=1e-5)
        assert data["mean"][method]["psnr"] == pytest.approx(np.mean(per_case), rel=1e-5)
    summary = (out / "summary.md").read_text()
    assert "## Mean over cases" in summary and "## Per case" in summary and "in-plane crop" in summary
    assert f"| {PHANTOM} | bspline |" in summary and "psnr_by_method.png" in summary


def test_real_pair_is_scored_on_the_cached_thin_positions(cache, report):
    result, _ = report
    cached = cache_format.CachedCase.open(cache_format.case_folder(cache, "APE", "case_phantom"))
    thin_positions = cached.geometry("thin").slice_positions()
    centres = cached.geometry("thick").slice_positions()
    described = result.outcomes[0].evaluation.case.describe()
    assert described["kind"] == "real pair"
    # The reference is the cached thin series between the first and last thick centre: its
    # slices sit exactly on cached thin positions (5 mm -> 1 mm, the phantom's centres do too).
    inside = thin_positions[(thin_positions >= centres[0] - 1e-3) & (thin_positions <= centres[-1] + 1e-3)]
    assert described["reference"]["slices"] == len(inside)
    assert described["reference"]["first_position_mm"] == pytest.approx(inside[0], abs=1e-4)


def test_scores_are_sane_and_a_shifted_pairing_is_worse(cache, report):
    result, _ = report
    phantom, simulated = (o.evaluation for o in result.outcomes)
    bspline = phantom.results["bspline"].scores
    # Real 5 mm -> 1 mm on the head phantom: tens of dB, well short of identical volumes.
    assert 25.0 < bspline.psnr < 60.0 and 0.5 < bspline.ssim < 1.0
    assert phantom.reference_consistency_mae_hu is not None and phantom.reference_consistency_mae_hu < 60
    # Interpolating onto positions 2 mm off and scoring against the same reference must lose.
    case = evaluation_case(cache_format.CachedCase.open(cache_format.case_folder(cache, "APE", "case_phantom")), CROP)
    g = case.reference.geometry
    shifted_target = g.with_slices(float(g.slice_positions()[0]) + 2.0, g.shape[0], g.slice_spacing)
    shifted = interpolate(case.thick, InterpolationRequest(method="bspline", target=shifted_target)).volume
    assert score(shifted.array, case.reference.array).psnr < bspline.psnr - 1.0
    # The tiny random model runs, and its consistency correction ties it to the real thick slices.
    diffusion = phantom.results["diffusion"].scores
    assert np.isfinite(diffusion.psnr) and diffusion.consistency_mae_hu <= 2.0
    # Simulated smooth ramp: every classical method recovers it closely, B-spline best of all.
    assert simulated.case.kind == "simulated"
    assert simulated.results["linear"].scores.psnr > 40.0
    assert simulated.results["bspline"].scores.psnr >= simulated.results["linear"].scores.psnr


def test_cli_cache_mode_and_its_errors(cache, tmp_path, capsys):
    out = tmp_path / "cli_report"
    code = cli.main(["evaluate", "--cache", str(cache), "--split", "test", "--methods", "linear", "--crop", "48",
                     "--report", str(out), "--json", str(tmp_path / "all.json"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean linear: PSNR" in printed
    assert json.loads((tmp_path / "all.json").read_text())["methods"] == ["linear"]
    assert (out / "cases" / PHANTOM / "axial.png").exists()
    # No --report; --thin beside --cache; neither --thin nor --cache; an empty split.
    assert cli.main(["evaluate", "--cache", str(cache), "--split", "test"]) == 2
    assert cli.main(["evaluate", "--cache", str(cache), "--thin", str(cache), "--report", str(tmp_path / "r")]) == 2
    assert cli.main(["evaluate", "--thickness", "5"]) == 2
    assert cli.main(["evaluate", "--thin", str(cache), "--thickness", "5", "--crop", "32"]) == 2
    assert cli.main(["evaluate", "--cache", str(cache), "--split", "val", "--report", str(tmp_path / "r2")]) == 2
    assert "holds no cases" in capsys.readouterr().err
