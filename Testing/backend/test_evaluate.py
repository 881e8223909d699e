"""`evaluate`: pairing by physical position, scores, JSON shape, figures, CLI errors."""

import json
import math

import numpy as np
import pytest

from testsupport import oblique_direction
from ctsliceinterp import cli
from ctsliceinterp.core.acquisition import simulate_thick
from ctsliceinterp.core.errors import GeometryError
from ctsliceinterp.evaluation.evaluate import covered_reference, evaluate_methods, real_pair_case, simulated_case
from ctsliceinterp.evaluation.metrics import score
from ctsliceinterp.core.volume import Volume


def ramp_volume(n=40, spacing=1.25, direction=None, origin=(5.0, -3.0, 100.0), size=24):
    """HU = 10 * (position along the normal) inside a disc, air outside: a linear function of
    the physical slice position, which slab means and linear interpolation both keep exactly."""
    direction = direction or tuple(np.eye(3).ravel())
    geometry_probe = Volume.from_array(np.zeros((n, size, size), np.float32), (0.8, 0.8, spacing), origin, direction)
    z = geometry_probe.geometry.slice_positions() - 100.0
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    array = np.where(disc[None], 10.0 * z[:, None, None], -1000.0).astype(np.float32)
    return geometry_probe.replace(array=array)


def test_simulated_case_pairs_by_position_with_an_even_ratio():
    thin = ramp_volume(direction=oblique_direction(20))
    case = simulated_case(thin, 5.0)
    centres = case.thick.geometry.slice_positions()
    ref_pos = case.reference.geometry.slice_positions()
    # 1.25 -> 5 mm: thick centres fall half-way between thin slices; the reference keeps the
    # thin slices between the first and last centre, at their own positions.
    assert centres[0] == pytest.approx(thin.geometry.slice_positions()[0] + 1.875)
    assert ref_pos[0] >= centres[0] and ref_pos[-1] <= centres[-1]
    assert ref_pos[0] - centres[0] < 1.25 and centres[-1] - ref_pos[-1] < 1.25
    first = int(round((ref_pos[0] - thin.geometry.slice_positions()[0]) / 1.25))
    assert np.array_equal(case.reference.array, thin.array[first : first + len(ref_pos)])

    evaluation = evaluate_methods(case, ["linear", "bspline"])
    linear = evaluation.results["linear"].scores
    # Linear interpolation of a linear ramp is exact: nothing to lose if the pairing is right.
    assert linear.psnr > 80 and linear.ssim == pytest.approx(1.0, abs=1e-6)
    assert linear.consistency_mae_hu < 1e-3
    assert 30 < evaluation.results["bspline"].scores.psnr
    # One slice off would cost 12.5 HU everywhere in the disc.
    shifted = score(evaluation.results["linear"].output.array[1:], case.reference.array[:-1])
    assert shifted.psnr < 60


def test_real_pair_case_uses_the_reference_positions_inside_the_thick_range():
    thin = ramp_volume(n=50, spacing=1.0)
    thick = simulate_thick(thin, 5.0)  # centres from thin[2] on, every 5 mm
    case = real_pair_case(thick, thin, "ramp")
    assert case.reference.geometry.slice_positions()[0] == pytest.approx(thick.geometry.slice_positions()[0])
    assert case.reference.geometry.slice_positions()[-1] == pytest.approx(thick.geometry.slice_positions()[-1])
    assert case.thickness == 5.0
    out = evaluate_methods(case, ["linear"]).results["linear"]
    assert out.output.geometry.slice_positions() == pytest.approx(case.reference.geometry.slice_positions())
    assert out.scores.psnr > 80
    shifted_grid = thin.replace(geometry=thin.geometry.__class__(thin.shape, thin.spacing, (6.0, -3.0, 100.0), thin.direction))
    with pytest.raises(GeometryError, match="in-plane"):
        real_pair_case(thick, shifted_grid)


def test_covered_reference_refuses_disjoint_volumes():
    thin = ramp_volume(n=20, spacing=1.0)
    far = simulate_thick(ramp_volume(n=20, spacing=1.0, origin=(5.0, -3.0, 400.0)), 5.0)
    with pytest.raises(Exception, match="overlap"):
        covered_reference(far, thin)


def test_real_phantom_pair_is_better_paired_by_position_than_shifted(shared_data):
    from ctsliceinterp.io import read_volume

    thick = read_volume(shared_data("volumes/phantom_head_thick_5mm.nii.gz"))
    thin = read_volume(shared_data("volumes/phantom_head_thin_1mm.nii.gz"))
    crop = (slice(None), slice(200, 300), slice(180, 300))  # the inserts in the middle of the head
    thick = thick.replace(array=thick.array[crop], geometry=thick.geometry.__class__(
        thick.array[crop].shape, thick.spacing, thick.geometry.index_to_physical([180, 200, 0]), thick.direction))
    thin = thin.replace(array=thin.array[crop], geometry=thin.geometry.__class__(
        thin.array[crop].shape, thin.spacing, thin.geometry.index_to_physical([180, 200, 0]), thin.direction))
    case = real_pair_case(thick, thin)
    # The real thin series starts 2 mm before the first thick centre and ends 2 mm after the last.
    assert case.reference.shape[0] == thin.shape[0] - 4
    result = evaluate_methods(case, ["bspline"]).results["bspline"]
    shifted = score(result.output.array[2:], case.reference.array[:-2])
    assert result.scores.psnr > shifted.psnr + 1.0
    # The slab model fits the scanner's own thick slices (data README: about 24 HU over the whole FOV).
    assert result.scores.consistency_mae_hu < 30


def test_cli_writes_json_summary_and_figures(tmp_path, capsys):
    from ctsliceinterp.io import write_volume

    thin_path = tmp_path / "thin.nii.gz"
    write_volume(ramp_volume(n=48), thin_path)
    json_path, report = tmp_path / "scores.json", tmp_path / "report"
    code = cli.main(["evaluate", "--thin", str(thin_path), "--thickness", "5", "--methods", "linear,lanczos",
                     "--json", str(json_path), "--report", str(report), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "linear" in printed and "lanczos" in printed and "PSNR" in printed
    data = json.loads(json_path.read_text())
    assert set(data["methods"]) == {"linear", "lanczos"}
    for scores in data["methods"].values():
        assert set(scores) == {"psnr", "ssim", "psnr_soft_tissue", "psnr_body", "consistency_mae_hu", "seconds",
                               "flat_texture_ratio", "through_plane_gradient_ratio"}
    # Exact linear result: infinite PSNR written as null, never as the non-JSON Infinity.
    assert data["methods"]["linear"]["psnr"] is None or data["methods"]["linear"]["psnr"] > 80
    assert math.isfinite(data["methods"]["lanczos"]["psnr"])
    assert data["case"]["kind"] == "simulated" and data["case"]["thick"]["thickness_mm"] == 5.0
    for view in ("axial", "coronal", "sagittal"):
        png = report / f"{view}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (report / "summary.md").read_text()
    assert "| lanczos |" in summary and "axial.png" in summary


def test_reports_name_the_cpu_model_where_the_system_tells_it():
    from pathlib import Path

    from ctsliceinterp.evaluation.evaluate import machine_description

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    assert machine_description()["cpu_model"] == (names[0] if names else None)


def test_cli_errors_write_nothing(tmp_path, capsys):
    from ctsliceinterp.io import write_volume

    thin_path = tmp_path / "thin.nii.gz"
    write_volume(ramp_volume(n=48), thin_path)
    before = thin_path.read_bytes()
    assert cli.main(["evaluate", "--thin", str(thin_path), "--thickness", "5", "--json", str(thin_path)]) != 0
    assert "input" in capsys.readouterr().err
    assert cli.main(["evaluate", "--thin", str(thin_path), "--thickness", "5", "--methods", "cubic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli.main(["evaluate", "--thin", str(tmp_path / "missing.nii.gz"), "--thickness", "5"]) == 2
    assert "not found" in capsys.readouterr().err
    assert thin_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thin.nii.gz"]


def test_method_labels_carry_per_entry_options():
    from ctsliceinterp.core.errors import InputError
    from ctsliceinterp.evaluation.evaluate import parse_method_label

    assert parse_method_label("residual_diffusion:samples=1") == ("residual_diffusion", {"samples": 1})
    assert parse_method_label("diffusion:samples=4:steps=20") == ("diffusion", {"samples": 4, "steps": 20})
    assert parse_method_label("bspline+consistency") == ("bspline", {"consistency": True})
    assert parse_method_label("regression") == ("regression", {})
    for bad in ("diffusion:seed=1", "diffusion:samples=", "diffusion:samples=-1"):
        with pytest.raises(InputError, match="expected :samples=N"):
            parse_method_label(bad)


@pytest.mark.parametrize("options, message", [
    (("--model", "runs/regression/model"), "--model applies to regression, diffusion, residual_diffusion, none of which"),
    (("--methods", "bspline,regression", "--steps", "8"), "--steps applies to diffusion, residual_diffusion, none of which"),
    (("--methods", "linear", "--sampler", "ddim"), "--sampler applies to diffusion, residual_diffusion, none of which"),
])
def test_cli_refuses_an_option_none_of_the_methods_takes(tmp_path, capsys, options, message):
    """Refused, not ignored: a --model beside classical methods only used to score them alone, with exit 0."""
    from ctsliceinterp.io import write_volume

    thin_path = tmp_path / "thin.nii.gz"
    write_volume(ramp_volume(n=48), thin_path)
    json_path = tmp_path / "scores.json"
    code = cli.main(["evaluate", "--thin", str(thin_path), "--thickness", "5", *options, "--json", str(json_path), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "\n" not in error.strip()
    assert not json_path.exists()
