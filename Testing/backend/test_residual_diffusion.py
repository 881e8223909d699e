"""Latent diffusion v2's residual pipeline: it starts at the regression base, keeps geometry and HU,
gives the posterior mean with its uncertainty or one sample, and its training scripts run, resume,
export a folder the pipeline loads, and the U-Net's loss falls on real CT."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from testsupport import REPO_ROOT, oblique_direction

sys.path.insert(0, str(REPO_ROOT / "Training"))

from ctsliceinterp.core.grid import thin_grid  # noqa: E402
from ctsliceinterp.core.volume import Volume  # noqa: E402
from ctsliceinterp.models.guided_vae import GuidedSliceVAE  # noqa: E402
from ctsliceinterp.models.regression import RegressionConfig, ThroughPlaneNet  # noqa: E402
from ctsliceinterp.models.residual_unet import ResidualUNet3D  # noqa: E402
from ctsliceinterp.pipelines.regression import RegressionInterpolator  # noqa: E402
from ctsliceinterp.pipelines.residual_diffusion import ResidualDiffusionInterpolator, named_config  # noqa: E402

SAMPLE = REPO_ROOT / "samples" / "phantom_head_thick_5mm.nii.gz"
TINY = named_config("tiny")
TINY_IMAGES = named_config("tiny_images")  # with the full-resolution image inputs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _volume(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.normal(40, 100, (6, 40, 36)).astype(np.float32)
    array[:, :4] = -3024.0  # padding outside the scan circle
    array[:, -4:] = 2500.0  # dense bone / metal
    return Volume.from_array(array, (0.7, 0.7, 5.0), (-40.0, 12.5, 300.0), oblique_direction(25.0, flip_y=True),
                             {"slice_thickness": 5.0})


def _networks(acting: bool, config=TINY):
    torch.manual_seed(0)
    vae, unet = GuidedSliceVAE(config.vae), ResidualUNet3D(config.unet)
    regression = ThroughPlaneNet(RegressionConfig(widths=(8, 8, 8)))
    if acting:  # trained networks do not predict zero
        for p in (*vae.head[-1].parameters(), *unet.conv_out.parameters(), *regression.head.parameters()):
            torch.nn.init.normal_(p, std=0.02)
    return vae, unet, regression


def test_untrained_model_returns_the_regression_base_with_exact_geometry_and_unclipped_hu():
    vae, unet, regression = _networks(acting=False)
    torch.nn.init.normal_(regression.head.weight, std=0.01)  # a base that is not plain B-spline
    volume = _volume()
    target = thin_grid(volume.geometry, 1.0)
    output, uncertainty = ResidualDiffusionInterpolator(vae, unet, regression, TINY, device="cpu").run(
        volume, target, samples=1, consistency=False, seed=0)
    base = RegressionInterpolator(regression, "cpu").run(volume, target, consistency=False).array
    assert uncertainty is None and output.geometry == target
    np.testing.assert_allclose(output.geometry.index_to_physical([3, 5, 7]), target.index_to_physical([3, 5, 7]))
    np.testing.assert_allclose(output.array, base, atol=1e-3)  # zero U-Net -> zero residual -> the base
    assert output.array.min() <= -3023.9 and output.array.max() >= 2499.9
    assert output.metadata["method"] == "residual_diffusion" and "slice_thickness" not in output.metadata


def test_posterior_mean_with_uncertainty_or_one_sample_both_consistent():
    from ctsliceinterp.core.acquisition import consistency_mae

    volume = _volume(1)
    target = thin_grid(volume.geometry, 1.0)
    model = ResidualDiffusionInterpolator(*_networks(acting=True), TINY, device="cpu")
    one, none = model.run(volume, target, samples=1, seed=0)
    mean, std = model.run(volume, target, samples=3, seed=0)
    default, default_std = model.run(volume, target, seed=0)  # the default: the posterior mean by the x0 head
    assert none is None and one.metadata["output"] == "one sample"
    assert mean.metadata["samples"] == 3 and mean.metadata["output"] == "posterior mean"
    assert default.metadata["output"] == "posterior mean" and default.metadata["estimator"] == "x0 head"
    assert default_std is None and "samples" not in default.metadata
    base = RegressionInterpolator(model.regression.net, "cpu").run(volume, target).array
    assert np.abs(default.array - base).mean() > 0.1  # an acting x0 head moves the output off the base
    again, _ = model.run(volume, target, seed=1)
    np.testing.assert_array_equal(again.array, default.array)  # one deterministic pass: no seed involved
    from ctsliceinterp.core.errors import InputError

    with pytest.raises(InputError, match="takes no steps or sampler"):
        model.run(volume, target, steps=4)  # silently ignoring them would mislead
    assert std.geometry == target and std.metadata["quantity"] == "standard deviation (HU)"
    assert float(std.array.mean()) > 0.1  # different samples differ
    assert not np.allclose(one.array, mean.array, atol=1e-2)
    for output in (one, mean):
        assert consistency_mae(volume, output, 5.0) <= 1.0
        assert output.array.min() <= -2900 and output.array.max() >= 2400  # HU outside any window survive


def _acting_unet(config) -> ResidualUNet3D:
    unet = ResidualUNet3D(config.unet)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.02)
    return unet


def test_image_unet_started_from_a_latents_only_one_computes_the_same_then_uses_the_images():
    torch.manual_seed(0)
    latents_only, with_images = _acting_unet(TINY), ResidualUNet3D(TINY_IMAGES.unet)
    with_images.load_latent_only_weights(latents_only.state_dict())
    condition = torch.randn(1, TINY_IMAGES.unet.raw_condition_channels, 6, 4, 4)
    noisy, positions, t = torch.randn(1, 4, 6, 4, 4), torch.rand(1, 3, 6), torch.tensor([700])
    with torch.no_grad():
        expected = latents_only(noisy, t, condition[:, : TINY.unet.condition_channels], positions)
        np.testing.assert_allclose(with_images(noisy, t, condition, positions), expected, atol=1e-5)
        other_images = condition.clone()
        other_images[:, TINY.unet.condition_channels :] += 1.0
        torch.nn.init.normal_(with_images.conv_in[0].weight, std=0.1)  # once trained, the features count
        assert not torch.allclose(with_images(noisy, t, condition, positions), with_images(noisy, t, other_images, positions))
    wider = ResidualUNet3D(named_config("default").unet)
    with pytest.raises((ValueError, RuntimeError)):
        with_images.load_latent_only_weights(wider.state_dict())  # another size: refused, not half loaded


def test_image_condition_is_the_base_and_the_thick_slices_around_each_thin_slice_at_full_resolution():
    import torch.nn.functional as F

    from ctsliceinterp.pipelines.diffusion import pad_in_plane, thin_positions
    from ctsliceinterp.pipelines.residual_diffusion import image_condition

    vae, _, regression = _networks(acting=True, config=TINY_IMAGES)
    unet = _acting_unet(TINY_IMAGES)
    model = ResidualDiffusionInterpolator(vae, unet, regression, TINY_IMAGES, device="cpu")
    volume = _volume(2)
    target = thin_grid(volume.geometry, 1.0)  # 26 thin slices: more than one image batch of 16
    base = model.regression.run(volume, target, consistency=False).array
    base, _ = pad_in_plane(base, TINY_IMAGES.pixel_multiple)
    thick, _ = pad_in_plane(volume.array, TINY_IMAGES.pixel_multiple)
    x, _ = thin_positions(volume.geometry, target)
    images = image_condition(base, thick, x, regression.config)
    below = thick[np.floor(x).astype(int)]
    np.testing.assert_allclose(images[:, 0], np.clip(base / 1000.0, -1.5, 3.5), atol=1e-6)
    np.testing.assert_allclose(images[:, 1], np.clip(below / 1000.0 - base / 1000.0, -3, 3), atol=1e-5)
    with torch.no_grad():
        raw = model.condition(base, thick, x)
    latents = TINY_IMAGES.unet.condition_channels
    packed = raw[0, latents:].permute(1, 0, 2, 3)
    np.testing.assert_allclose(F.pixel_shuffle(packed, 8).numpy(), images, atol=1e-6)  # what the encoder unpacks
    with torch.no_grad():
        np.testing.assert_allclose(model.encoded_condition(base, thick, x), unet.encode_condition(raw), atol=1e-5)
    output, _ = model.run(volume, target, seed=0)
    assert output.geometry == target and np.all(np.isfinite(output.array))


def _data(crop: int) -> dict:
    # Self-supervision from in-plane data: slabs along rows/columns of the bundled thick phantom.
    return {"crop": crop, "in_plane_probability": 1.0, "real_pair_probability": 0.0,
            "thin_volumes": {"train": [str(SAMPLE)], "val": [str(SAMPLE)]}}


def _run_data() -> dict:
    return {**_data(16), "depth": 8}


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory):
    """A guided VAE run (3 steps), then a residual diffusion run (2 steps, resumed to 4)."""
    import train_guided_vae
    import train_residual_diffusion

    root = tmp_path_factory.mktemp("v2")
    common = ["--set", "model=tiny", "--set", "train.steps_per_epoch=2", "--set", "train.checkpoint_every=2",
              "--set", "train.warmup_steps=1", "--set", "train.val_items=4", "--no-progress"]
    vae_args = ["--config", str(REPO_ROOT / "Training" / "configs" / "guided_vae.yaml"), "--out", str(root / "vae"),
                "--set", f"data={_data(24)}", "--set", "train.batch_size=2", *common]
    assert train_guided_vae.main(vae_args + ["--max-steps", "3"]) == 0
    diffusion_args = ["--config", str(REPO_ROOT / "Training" / "configs" / "residual_diffusion.yaml"),
                      "--out", str(root / "diffusion"), "--set", f"vae_checkpoint={root / 'vae' / 'model'}",
                      "--set", f"data={ {**_run_data(), 'cache_runs': 3} }", "--set", "train.batch_size=1", "--set", "train.log_every=1",
                      "--set", "monitor.items=1", "--set", "monitor.steps=2", "--set", "monitor.samples=2", *common]
    assert train_residual_diffusion.main(diffusion_args + ["--max-steps", "2"]) == 0
    cache = root / "diffusion" / "latent_cache.pt"
    built = cache.stat().st_mtime_ns
    assert train_residual_diffusion.main(diffusion_args + ["--max-steps", "4", "--resume"]) == 0
    assert cache.stat().st_mtime_ns == built  # the resumed run reused the encoded pool
    images_args = ["--config", str(REPO_ROOT / "Training" / "configs" / "residual_diffusion_images.yaml"),
                   "--out", str(root / "images"), "--set", f"vae_checkpoint={root / 'vae' / 'model'}",
                   "--set", f"init_unet={root / 'diffusion' / 'model'}", "--set", f"data={ {**_run_data(), 'cache_runs': 2} }",
                   "--set", "train.batch_size=1", "--set", "monitor.items=1", "--set", "monitor.steps=2", *common,
                   "--set", "model=tiny_images"]
    assert train_residual_diffusion.main(images_args + ["--max-steps", "2"]) == 0
    return root


def test_training_scripts_run_resume_export_and_the_pipeline_loads_the_result(trained_folders):
    from ctsliceinterp.io import read_volume

    vae_info = json.loads((trained_folders / "vae" / "model" / "guided_vae.json").read_text())
    assert vae_info["info"]["step"] == 3 and "val_guided_vae_gain_over_regression_db_window" in vae_info["info"]
    assert 0 < vae_info["latent_scale"] and 0 < vae_info["condition_scale"]
    log = [json.loads(line) for line in (trained_folders / "diffusion" / "log.jsonl").read_text().splitlines()]
    assert [r["resumed"] for r in log if r["kind"] == "start"] == [False, True]
    val = [r for r in log if r["kind"] == "val"][-1]
    assert val["step"] == 4
    train = [r for r in log if r["kind"] == "train"]
    assert len(train) == 4 and all(r["mean_head_loss"] > 0 and r["diffusion_loss"] > 0 for r in train)  # both terms
    for key in ("val_x0_head_gain_over_regression_db", "val_mean_gain_over_bspline_db", "val_mean_gain_over_regression_db_window",
                "val_sample_gain_over_regression_db", "val_loss", "val_std_error_correlation"):
        assert np.isfinite(val[key]), key
    from ctsliceinterp.core.errors import InputError

    with pytest.raises(InputError, match="without a trained U-Net"):
        ResidualDiffusionInterpolator.load(trained_folders / "vae" / "model", device="cpu")
    with pytest.raises(InputError, match="no residual diffusion model 'no-such-model'"):
        ResidualDiffusionInterpolator.load("no-such-model", device="cpu")
    model = ResidualDiffusionInterpolator.load(trained_folders / "diffusion" / "model", device="cpu")
    assert model.vae.config == TINY.vae and float(model.vae.latent_scale) == pytest.approx(vae_info["latent_scale"])
    thick = read_volume(SAMPLE)
    g = thick.geometry
    crop = Volume(np.asarray(thick.array[10:14, 200:248, 200:248], dtype=np.float32),
                  type(g)((4, 48, 48), g.spacing, tuple(g.index_to_physical([200, 200, 10])), g.direction),
                  {"slice_thickness": 5.0})
    output, std = model.run(crop, thin_grid(crop.geometry, 1.0), samples=2, seed=0)
    assert output.shape == (16, 48, 48) and std.shape == output.shape and np.isfinite(output.array).all()
    images = ResidualDiffusionInterpolator.load(trained_folders / "images" / "model", device="cpu")
    assert images.config.unet.image_inputs == 3 and images.unet.image_encoder is not None
    output, _ = images.run(crop, thin_grid(crop.geometry, 1.0), seed=0)
    assert output.shape == (16, 48, 48) and np.isfinite(output.array).all()


def test_init_unet_that_is_not_a_model_folder_is_one_line(trained_folders, tmp_path, capsys):
    import train_residual_diffusion

    args = ["--config", str(REPO_ROOT / "Training" / "configs" / "residual_diffusion_images.yaml"), "--out", str(tmp_path / "x"),
            "--set", f"vae_checkpoint={trained_folders / 'vae' / 'model'}", "--set", f"init_unet={tmp_path}",
            "--set", "model=tiny_images", "--no-progress", "--max-steps", "1"]
    assert train_residual_diffusion.main(args) != 0
    assert "init_unet: no residual_unet.safetensors in" in capsys.readouterr().err


def test_diffusion_loss_falls_on_real_ct(trained_folders):
    """The U-Net on runs of the bundled phantom (in-plane self-supervision), the VAE from the run above."""
    import loop
    import train_residual_diffusion

    config = loop.load_config(REPO_ROOT / "Training" / "configs" / "residual_diffusion.yaml",
                              ["model=tiny", f"vae_checkpoint={trained_folders / 'vae' / 'model'}",
                               f"data={_run_data()}", "train.val_items=8"])
    task = train_residual_diffusion.ResidualDiffusionTask(config, loop.Runtime("cpu"), trained_folders / "unused")
    train = [task.train_dataset[i] for i in range(16)]
    held_out = task.val_dataset.collate([task.val_dataset[i] for i in range(8)])
    torch.manual_seed(0)
    model = task.model

    def held_out_loss() -> float:
        generator = torch.Generator().manual_seed(5)  # the same timesteps and noise each time
        with torch.no_grad():
            return float(task.loss(model, held_out, "cpu", generator)[0])

    before = held_out_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(40):
        model.train()
        loss, _ = task.loss(model, task.train_dataset.collate(train[(step * 4) % 16 : (step * 4) % 16 + 4]), "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    print(before, after)
    assert after < 0.9 * before  # about 0.81 after 30 steps, 0.80 after 60 (measured)


def test_k8s_manifest_trains_both_stages_with_torchrun_on_the_pvc_and_resumes():
    import yaml

    k8s = REPO_ROOT / "Training" / "k8s"
    claim = yaml.safe_load((k8s / "pvc.yaml").read_text())["metadata"]["name"]
    pod = yaml.safe_load((k8s / "train-residual-diffusion.yaml").read_text())["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0]["args"])
    vae, diffusion = command.index("Training/train_guided_vae.py"), command.index("Training/train_residual_diffusion.py")
    assert "torchrun" in command and vae < diffusion and command.count("--resume") == 2
    assert "vae_checkpoint=$R/guided_vae/model" in command  # the U-Net stage takes the VAE stage's export
    for config in ("guided_vae.yaml", "residual_diffusion.yaml"):
        assert f"Training/configs/{config}" in command and (REPO_ROOT / "Training" / "configs" / config).is_file()
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in pod["volumes"])


def test_guided_vae_reconstruction_script_scores_the_vae_against_its_base(trained_folders, tmp_path):
    import guided_vae_reconstruction

    from ctsliceinterp.io import read_volume, write_volume

    thick = read_volume(SAMPLE)  # 28 slices of 5 mm, used here as the "thin" reference of 15 mm slabs
    g = thick.geometry
    crop = Volume(np.asarray(thick.array[:, 200:248, 200:248], dtype=np.float32),
                  type(g)((28, 48, 48), g.spacing, tuple(g.index_to_physical([200, 200, 0])), g.direction))
    write_volume(crop, tmp_path / "thin.nii.gz")
    out = tmp_path / "reconstruction.json"
    assert guided_vae_reconstruction.main(["--model", str(trained_folders / "vae" / "model"), "--thin",
                                           str(tmp_path / "thin.nii.gz"), "--thickness", "15", "--slices", "6",
                                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["slice_indices"][1] - report["slice_indices"][0] == 6 and report["in_plane"] == [48, 48]
    for label in ("window", "full"):
        scores = report[f"psnr_{label}_db"]
        assert all(np.isfinite(v) for v in scores.values())
        assert report[f"gain_over_base_{label}_db"] == pytest.approx(scores["guided_vae"] - scores["base"])
    assert set(report["z_gradient_ratio"]) == {"guided_vae", "base", "bspline"}
    assert all(0 < v < 10 for v in report["z_gradient_ratio"].values())


def test_the_encoded_pool_is_reused_only_for_the_same_runs_and_weights(tmp_path):
    from residual_data import LatentRunCache

    class Runs:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"positions": torch.full((3, 2), float(i)), "mask": torch.ones(2)}

        @staticmethod
        def collate(items):
            return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    calls = []

    def encode(batch):
        calls.append(len(batch["mask"]))
        n = len(batch["mask"])
        return batch["positions"][:, :1, :, None, None].expand(n, 4, 2, 2, 2), torch.zeros(n, 8, 2, 2, 2)

    path = tmp_path / "pool.pt"
    first = LatentRunCache(Runs(), encode, path, {"weights": "a"}, seed=0)
    assert calls == [3] and first.pool["target"].shape == (3, 4, 2, 2, 2)
    LatentRunCache(Runs(), encode, path, {"weights": "a"}, seed=0)
    assert calls == [3]  # same key: read back, nothing encoded
    LatentRunCache(Runs(), encode, path, {"weights": "b"}, seed=0)
    assert calls == [3, 3]  # other weights: encoded again
    path.write_bytes(b"truncated")
    again = LatentRunCache(Runs(), encode, path, {"weights": "b"}, seed=0)
    assert calls == [3, 3, 3] and torch.equal(again.pool["target"], first.pool["target"])
    item = again[0]
    assert set(item) == {"target", "condition", "positions", "mask"}


def test_shipped_model_on_a_held_out_chest_crop_default_beats_bspline_and_one_sample_has_texture():
    """chest_ricord000082 was never trained on (model card): 5 mm slabs simulated, back to 1.25 mm."""
    from testsupport import shared_file

    from ctsliceinterp.core.classical import interpolate_classical
    from ctsliceinterp.core.volume import Geometry
    from ctsliceinterp.evaluation.evaluate import simulated_case
    from ctsliceinterp.evaluation.metrics import flat_texture_ratio, psnr, to_unit_range
    from ctsliceinterp.io import read_volume

    reference = read_volume(shared_file("volumes/chest_ricord000082_1p25mm.nii.gz"))
    g = reference.geometry
    crop = Volume(np.asarray(reference.array[80:140, 128:384, 128:384]),
                  Geometry((60, 256, 256), g.spacing, tuple(g.index_to_physical([128, 128, 80])), g.direction), {})
    case = simulated_case(crop, 5.0)
    thick, target, truth = case.thick, case.reference.geometry, case.reference.array
    model = ResidualDiffusionInterpolator.load("residual_diffusion", device="cpu")
    default, _ = model.run(thick, target)
    sample, _ = model.run(thick, target, samples=1, seed=0)
    bspline = interpolate_classical(thick, target, "bspline").array
    score = lambda a: psnr(to_unit_range(a), to_unit_range(truth))  # noqa: E731
    gain, sample_gap = score(default.array) - score(bspline), score(default.array) - score(sample.array)
    texture = flat_texture_ratio(sample.array, truth), flat_texture_ratio(default.array, truth)
    print(f"default gain over B-spline {gain:.2f} dB, one sample {sample_gap:.2f} dB below, flat texture {texture}")
    assert gain > 1.0, gain
    assert 0 < sample_gap < 1.5, sample_gap  # a posterior draw is below the mean, not far below
    assert texture[1] < texture[0] < 1.3, texture  # the sample has the texture the mean smooths away


def test_runs_are_drawn_until_one_fits_when_most_draws_miss(tmp_path):
    """On a volume 26 px wide, slabs along a row never fit a run (28 rows or more needed): 3 draws
    in 4 miss, and 8 draws per item left about one item in 10 without a run."""
    from ctsliceinterp.io import write_volume
    from residual_data import ResidualRunDataset

    rng = np.random.default_rng(0)
    path = tmp_path / "thin.nii.gz"
    write_volume(Volume.from_array(rng.normal(0, 200, (60, 26, 26)).astype(np.float32), (0.8, 0.8, 1.0)), path)
    data = {"crop": 24, "depth": 8, "in_plane_probability": 0.8, "thickness_mm": [3.0, 4.0],
            "thin_volumes": {"train": [str(path)]}}
    base = RegressionInterpolator(ThroughPlaneNet(RegressionConfig(widths=(8, 8, 8))), "cpu")
    runs = ResidualRunDataset(data, "train", base, seed=0, length=20, fixed=True)
    for i in range(len(runs)):
        assert runs[i]["truth"].shape == (8, 24, 24)


def test_residual_monitor_scores_a_model_folder_as_the_training_monitor(trained_folders, tmp_path):
    import yaml

    import residual_monitor

    config = yaml.safe_load((REPO_ROOT / "Training" / "configs" / "residual_diffusion_images.yaml").read_text())
    config["data"] = _run_data()
    config["train"]["val_items"] = 2
    config["monitor"] = {"items": 1, "samples": 2, "steps": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "report.json"
    for model in ("diffusion", "images"):  # a latents-only U-Net and one with image inputs
        assert residual_monitor.main(["--model", str(trained_folders / model / "model"), "--config",
                                      str(tmp_path / "config.yaml"), "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert np.isfinite(report["monitor"]["val_x0_head_gain_over_regression_db"])
        diagnostic = report["latent_diagnostic"]
        assert diagnostic["runs"] == 2
        # the oracle latent decodes closer to the truth than a zero latent
        assert diagnostic["diagnostic_true_latent_gain_over_regression_db"] > diagnostic["diagnostic_zero_latent_gain_over_regression_db"]
