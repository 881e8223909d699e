"""The diffusion Interpolator with a random ``tiny`` model: shapes, chunk blending, HU handling,
consistency with the measured thick slices, seeds, checkpoints and the CLI (CPU, seconds).

The random model's output conv is re-initialised away from zero so that it really produces
structure (a fresh U-Net predicts exactly 0)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ctsliceinterp.core.acquisition import consistency_correction, consistency_mae, simulate_thick
from ctsliceinterp.pipelines.checkpoint import (
    MANIFEST,
    UNET_FILE,
    CheckpointError,
    load_checkpoint,
    resolve_model,
    save_checkpoint,
)
from ctsliceinterp.core.classical import interpolate_classical
from ctsliceinterp.core.grid import thin_grid
from ctsliceinterp.models.configs import get_config
from ctsliceinterp.models.unet import UNet3D
from ctsliceinterp.models.vae import SliceVAE
from ctsliceinterp.pipelines.depth_chunks import blend_over_depth, chunk_starts
from ctsliceinterp.pipelines.diffusion import Interpolator
from ctsliceinterp.core.progress import Reporter
from ctsliceinterp.core.volume import Geometry, Volume


# diffusers builds its sigmas with np.array(tensor) (harmless under numpy 2).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin-wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_tiny(chunk_depth: int = 16, chunk_overlap: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = get_config("tiny")
    config = config.replace(inference=dataclasses.replace(config.inference, chunk_depth=chunk_depth, chunk_overlap=chunk_overlap, steps=2))
    unet = UNet3D(config.unet)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    return SliceVAE(config.vae), unet, config


def tiny_interpolator(**kwargs) -> Interpolator:
    vae, unet, config = random_tiny(**kwargs)
    return Interpolator(vae, unet, config, latent_scale=1.0, device="cpu")


def phantom_crop(shared_data, size: int = 64) -> Volume:
    """A centred in-plane crop of the real 5 mm phantom (all 28 slices), geometry kept."""
    from ctsliceinterp.io import read_volume

    volume = read_volume(shared_data("volumes/phantom_head_thick_5mm.nii.gz"))
    g = volume.geometry
    y0, x0 = (g.shape[1] - size) // 2, (g.shape[2] - size) // 2
    geometry = Geometry((g.shape[0], size, size), g.spacing, tuple(g.index_to_physical([x0, y0, 0])), g.direction)
    return Volume(volume.array[:, y0 : y0 + size, x0 : x0 + size].copy(), geometry, dict(volume.metadata))


# --- chunking and blending ------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 15, 16, 17, 29, 45])
def test_chunks_cover_any_depth(depth):
    starts = chunk_starts(depth, 16, 4)
    covered = np.zeros(depth, bool)
    for s in starts:
        covered[s : min(s + 16, depth)] = True
        assert s + min(16, depth) <= depth
    assert covered.all()
    assert all(b - a <= 16 - 4 for a, b in zip(starts, starts[1:]))  # neighbours share >= 4 slices
    assert len(starts) == (1 if depth <= 16 else -(-(depth - 4) // 12))  # no more chunks than needed


@pytest.mark.parametrize("depth", [16, 17, 29, 45])
def test_blending_leaves_no_seams(depth):
    shape = (1, 2, depth, 3, 3)
    constant = blend_over_depth(lambda a, b: torch.full((1, 2, b - a, 3, 3), 7.0), shape, 16, 4, "cpu")
    torch.testing.assert_close(constant, torch.full(shape, 7.0))
    # A slice-wise function gives the same values whether computed whole or in chunks.
    field = torch.randn(shape)
    chunked = blend_over_depth(lambda a, b: torch.tanh(field[:, :, a:b]), shape, 16, 4, "cpu")
    torch.testing.assert_close(chunked, torch.tanh(field))


# --- the pipeline ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_thick, chunk", [(3, 16), (5, 11), (5, 21), (4, 16)])
def test_pipeline_shapes_odd_depths_and_chunk_boundaries(make_volume, n_thick, chunk):
    """Thin depths 11, 21 (one chunk exactly, one slice past it), 16 and odd in-plane sizes that
    need padding to the model's multiple."""
    volume = make_volume(shape=(n_thick, 37, 45), spacing=(0.8, 0.7, 5.0))
    target = thin_grid(volume.geometry, 1.0 if n_thick != 3 else 0.666)
    interpolator = tiny_interpolator(chunk_depth=chunk, chunk_overlap=3)
    events = []
    out, uncertainty = interpolator.run(volume, target, seed=1, reporter=Reporter(events.append))
    assert out.geometry == target and out.array.dtype == np.float32
    assert np.all(np.isfinite(out.array)) and uncertainty is None
    stages = [e.stage for e in events]
    assert stages.index("encode") < stages.index("sample") < stages.index("decode") < stages.index("consistency")
    last = [e for e in events if e.stage == "sample"][-1]
    assert last.done == last.total == 2


def test_consistency_reaches_one_hu_on_real_data(shared_data):
    thick = phantom_crop(shared_data)
    target = thin_grid(thick.geometry)
    interpolator = tiny_interpolator()
    raw, _ = interpolator.run(thick, target, seed=0, consistency=False)
    corrected, _ = interpolator.run(thick, target, seed=0)
    before, after = consistency_mae(thick, raw), consistency_mae(thick, corrected)
    print(f"mean |thick - reaveraged output|: {before:.1f} HU without correction, {after:.3f} HU with")
    assert before > 5.0  # the random model does contradict the measurement...
    assert after <= 1.0  # ...and the correction removes that
    history = interpolator.last_consistency[0]
    assert history[0] > 1.0 and history[-1] <= 1.0


def test_consistency_correction_with_overlapping_slabs():
    """5 mm slabs every 2.5 mm overlap: back-projection still converges to <= 1 HU."""
    rng = np.random.default_rng(0)
    thin_truth = Volume.from_array(rng.normal(0, 100, (41, 4, 4)).astype(np.float32), spacing=(1, 1, 0.5))
    thick = simulate_thick(thin_truth, 5.0, spacing=2.5)
    target = thin_grid(thick.geometry, 0.5)
    start = interpolate_classical(thick, target, "linear").array
    corrected, history = consistency_correction(start, target, thick.array, thick.geometry, 5.0, 1.0, 50)
    assert history[-1] <= 1.0
    assert consistency_mae(thick, Volume(corrected, target)) <= 1.0


def test_hu_outside_the_window_survives():
    """Air (-1000), lung (-800) and bone (+1500) are outside the 40/400 window: the output there
    is the classical interpolation, not a clipped value; soft tissue is the model's."""
    z, y, x = np.meshgrid(np.arange(7), np.arange(48), np.arange(48), indexing="ij")
    array = np.full((7, 48, 48), 40.0, np.float32) + 15 * np.sin(z + x / 5.0)
    array[:, :, :12] = -1000.0
    array[:, :, 12:18] = -800.0
    array[:, 36:, 36:] = 1500.0
    thick = Volume.from_array(array, spacing=(0.7, 0.7, 5.0))
    target = thin_grid(thick.geometry)
    classical = interpolate_classical(thick, target, "bspline").array
    out, _ = tiny_interpolator().run(thick, target, seed=0)
    for name, region in {"air": np.s_[:, :, :10], "lung": np.s_[:, :, 13:17], "bone": np.s_[:, 38:, 38:]}.items():
        difference = np.abs(out.array[region] - classical[region]).max()
        assert difference <= 2.0, f"{name} changed by {difference} HU"
    assert out.array.min() <= -999 and out.array.max() >= 1499  # nothing clipped to the window
    tissue = np.s_[:, 20:30, 22:34]
    assert np.abs(out.array[tissue] - classical[tissue]).mean() > 1.0  # the model did act there


def test_same_seed_same_result_and_uncertainty(make_volume):
    volume = make_volume(shape=(4, 32, 32))
    target = thin_grid(volume.geometry)
    interpolator = tiny_interpolator()
    a, _ = interpolator.run(volume, target, seed=3, consistency=False)
    b, _ = interpolator.run(volume, target, seed=3, consistency=False)
    c, _ = interpolator.run(volume, target, seed=4, consistency=False)
    np.testing.assert_array_equal(a.array, b.array)
    assert np.abs(a.array - c.array).max() > 1.0
    mean, std = interpolator.run(volume, target, seed=3, samples=3, sampler="ddim")
    assert std is not None and std.geometry == target
    assert np.all(std.array >= 0) and std.array.max() > 0
    mean_again, _ = interpolator.run(volume, target, seed=3, samples=3, sampler="ddim")
    np.testing.assert_array_equal(mean.array, mean_again.array)


# --- checkpoints and the CLI ----------------------------------------------------------------
def test_checkpoint_round_trip_and_mismatches(tmp_path):
    vae, unet, config = random_tiny()
    folder = save_checkpoint(tmp_path / "tiny", vae, unet, config, latent_scale=0.42, metadata={"steps": 0})
    loaded = load_checkpoint(folder)
    assert loaded.config == config and loaded.latent_scale == pytest.approx(0.42)
    for a, b in ((vae, loaded.vae), (unet, loaded.unet)):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(value, b.state_dict()[key])
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    manifest = json.loads((folder / MANIFEST).read_text())

    def broken(change, match):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        save_checkpoint(bad, vae, unet, config, 0.42)
        data = json.loads((bad / MANIFEST).read_text())
        change(bad, data)
        if data is not None:
            (bad / MANIFEST).write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(bad)

    broken(lambda f, d: d.update(format_version=99), "format version 99")
    broken(lambda f, d: d["config"]["unet"].update(base_channels=32), "does not match the configured network")
    broken(lambda f, d: d.update(latent_scale=-1), "latent scale")
    broken(lambda f, d: d["intensity"].update(width=1000), "intensity normalisation")
    broken(lambda f, d: (f / UNET_FILE).write_bytes(b"not safetensors"), "corrupted")
    broken(lambda f, d: d["config"]["unet"].update(conv="4d"), "conv")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_checkpoint(tmp_path)
    vae_only = save_checkpoint(tmp_path / "vae_only", vae, None, config, 0.42)
    assert load_checkpoint(vae_only).unet is None
    with pytest.raises(CheckpointError, match="only a VAE"):
        Interpolator.load(vae_only)
    assert manifest["format_version"] == 1


def test_model_names_resolve_to_shipped_folders(tmp_path, monkeypatch):
    import ctsliceinterp.pipelines.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "weights")  # a package with no model
    with pytest.raises(CheckpointError, match="no model named 'mine' is installed and no folder mine exists"):
        resolve_model("mine")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")
    vae, unet, config = random_tiny()
    (tmp_path / "weights").mkdir()
    save_checkpoint(tmp_path / "weights" / "mine", vae, unet, config, 1.0)
    assert resolve_model("mine") == tmp_path / "weights" / "mine"
    assert Interpolator.load("mine", device="cpu").name == "mine"


def test_cli_interpolates_with_a_tiny_checkpoint(tmp_path, make_volume, capsys):
    from ctsliceinterp.cli import main
    from ctsliceinterp.io import read_volume, write_volume

    vae, unet, config = random_tiny()
    model = save_checkpoint(tmp_path / "model", vae, unet, config, latent_scale=1.0)
    thick = make_volume(shape=(5, 40, 36), spacing=(0.8, 0.7, 5.0))
    write_volume(thick, tmp_path / "thick.nrrd")
    code = main([
        "interpolate", str(tmp_path / "thick.nrrd"), "-o", str(tmp_path / "thin.nrrd"), "--method", "diffusion",
        "--model", str(model), "--steps", "2", "--sampler", "ddim", "--samples", "2", "--seed", "0",
        "--uncertainty", str(tmp_path / "std.nrrd"), "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    thin = read_volume(tmp_path / "thin.nrrd")
    expected = thin_grid(read_volume(tmp_path / "thick.nrrd").geometry)
    assert thin.shape == expected.shape == (21, 40, 36)
    np.testing.assert_allclose(thin.geometry.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(thin.geometry.spacing, expected.spacing, atol=1e-5)
    assert consistency_mae(thick, thin) <= 1.0
    assert read_volume(tmp_path / "std.nrrd").shape == expected.shape
    # Without --model: v1 ships no model, so the command says what to give instead, in one line.
    code = main(["interpolate", str(tmp_path / "thick.nrrd"), "-o", str(tmp_path / "again.nrrd"), "--method",
                 "diffusion", "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in error and not (tmp_path / "again.nrrd").exists()
    assert "diffusion has no shipped model: give --model FOLDER" in error and "residual_diffusion" in error


def test_consistency_correction_leaves_an_exact_ramp_exact_at_the_ends():
    """Partly covered end slabs must not be matched: their measured mean includes tissue beyond
    the output grid. A linear ramp is reproduced exactly by linear interpolation; the correction
    must keep it exact, the first and last slices included."""
    from ctsliceinterp.core.acquisition import simulate_thick
    from ctsliceinterp.core.classical import interpolate_classical
    from ctsliceinterp.core.grid import thin_grid
    from ctsliceinterp.core.acquisition import consistency_correction
    from ctsliceinterp.core.volume import Volume

    z = np.arange(60, dtype=np.float32)
    truth = Volume.from_array(np.broadcast_to(10 * z[:, None, None], (60, 4, 4)).copy(), spacing=(1.0, 1.0, 1.0))
    thick = simulate_thick(truth, 5.0)
    target = thin_grid(thick.geometry, 1.0)
    linear = interpolate_classical(thick, target, "linear")
    corrected, _ = consistency_correction(linear.array, target, thick.array, thick.geometry, 5.0)
    assert np.abs(corrected - linear.array).max() < 1e-2
