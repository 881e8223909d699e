"""Training: loss goes down, exact resume, 2-process DDP on CPU (gloo), NaN guard, checkpoint
usable by `ctsliceinterp interpolate`, k8s manifests. Tiny model, small synthetic CT, CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TRAINING = Path(__file__).resolve().parents[2] / "Training"
sys.path.insert(0, str(TRAINING))

import train_diffusion  # noqa: E402
import train_vae  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def thin_volumes(tmp_path_factory):
    """Three small thin CT-like volumes (NIfTI, 1 mm): a body disc with structure and a dense ball."""
    from ctsliceinterp.io import write_volume
    from ctsliceinterp.core.volume import Volume

    folder = tmp_path_factory.mktemp("thin")
    paths = []
    for i in range(3):
        rng = np.random.default_rng(i)
        z, y, x = np.meshgrid(np.arange(36), np.arange(64), np.arange(64), indexing="ij")
        body = (y - 32) ** 2 + (x - 32) ** 2 < 27**2
        a = np.where(body, 40 + 60 * np.sin(z / 3.0 + i) * np.cos(x / 7.0) + rng.normal(0, 5, body.shape), -1000)
        a = np.where((z - 18) ** 2 + (y - 28 - i) ** 2 + (x - 36) ** 2 < 64, 200, a).astype(np.int16)
        paths.append(write_volume(Volume.from_array(a, (0.8, 0.8, 1.0), (0, 0, 10.0 * i)), folder / f"v{i}.nii.gz"))
    return [str(p) for p in paths]


def _vae_args(thin_volumes, out, steps, *extra):
    return ["--config", str(TRAINING / "configs" / "tiny_vae.yaml"), "--out", str(out), "--max-steps", str(steps),
            "--set", f"data.thin_volumes={{train: {json.dumps(thin_volumes[:2])}, val: {json.dumps(thin_volumes[2:])}}}",
            "--set", "train.num_workers=0", "--set", "train.batch_size=4", "--set", "train.log_every=1",
            "--set", "train.warmup_steps=5", "--set", "train.val_items=4", "--no-progress", *extra]


def _train_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_vae_tiny_loss_goes_down_and_exports_a_checkpoint(thin_volumes, tmp_path):
    out = tmp_path / "vae"
    assert train_vae.main(_vae_args(thin_volumes, out, 40, "--set", "train.steps_per_epoch=20", "--set", "train.lr=1e-3")) == 0
    losses = _train_losses(out)
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    assert (out / "samples" / "vae_epoch_0001.png").stat().st_size > 1000
    from ctsliceinterp.pipelines.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(out / "model")
    assert checkpoint.unet is None and checkpoint.latent_scale > 0 and checkpoint.metadata["step"] == 40


def _state(out):
    return torch.load(out / "train_state.pt", weights_only=False)


def test_resume_continues_exactly(thin_volumes, tmp_path):
    # 6 steps straight vs 3 steps, stop, --resume to 6 (crossing an epoch end with validation/export).
    common = ("--set", "train.steps_per_epoch=4", "--set", "train.checkpoint_every=3")
    assert train_vae.main(_vae_args(thin_volumes, tmp_path / "a", 6, *common)) == 0
    assert train_vae.main(_vae_args(thin_volumes, tmp_path / "b", 3, *common)) == 0
    assert _state(tmp_path / "b")["step"] == 3
    assert train_vae.main(_vae_args(thin_volumes, tmp_path / "b", 6, *common, "--resume")) == 0
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for part in ("model",):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert _train_losses(tmp_path / "a") == _train_losses(tmp_path / "b")
    # Without --resume an existing run is never overwritten.
    assert train_vae.main(_vae_args(thin_volumes, tmp_path / "b", 8, *common)) == 2


def test_resume_takes_the_configs_lr(thin_volumes, tmp_path):
    # Extending a run at another LR: the saved state's starting LR must not win silently.
    common = ("--set", "train.steps_per_epoch=4", "--set", "train.warmup_steps=1")
    assert train_vae.main(_vae_args(thin_volumes, tmp_path / "r", 2, *common, "--set", "train.lr=1e-3")) == 0
    assert train_vae.main(_vae_args(thin_volumes, tmp_path / "r", 4, *common, "--set", "train.lr=2e-4", "--resume")) == 0
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "r" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert lrs[:2] == pytest.approx([1e-3, 1e-3]) and lrs[2:] == pytest.approx([2e-4, 2e-4]), lrs


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(thin_volumes, tmp_path, capsys):
    out = tmp_path / "nan"
    assert train_vae.main(_vae_args(thin_volumes, out, 2, "--set", "train.steps_per_epoch=2")) == 0
    code = train_vae.main(_vae_args(thin_volumes, out, 4, "--set", "train.steps_per_epoch=2", "--set", "loss.l1=.nan", "--resume"))
    assert code == 3
    assert "NaN/inf at step 3" in capsys.readouterr().err
    assert _state(out)["step"] == 2


def test_two_process_ddp_on_cpu_with_gloo(thin_volumes, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TRAINING / "train_vae.py"), *_vae_args(thin_volumes, out, 4, "--set", "train.steps_per_epoch=2", "--device", "cpu")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    state = _state(out)
    assert state["step"] == 4 and len(state["rng"]) == 2  # both ranks' random streams saved
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_diffusion_tiny_trains_and_interpolate_loads_its_checkpoint(thin_volumes, tmp_path):
    vae = tmp_path / "vae"
    assert train_vae.main(_vae_args(thin_volumes, vae, 2, "--set", "train.steps_per_epoch=2")) == 0
    out = tmp_path / "diffusion"
    cache = tmp_path / "cache"
    from ctsliceinterp.data.preprocess import preprocess_dataset

    dataset = tmp_path / "dataset" / "chest"
    dataset.mkdir(parents=True)
    for p in thin_volumes:
        os.symlink(p, dataset / Path(p).name)
    preprocess_dataset(dataset.parent, cache, workers=1, fractions="34,33,33", progress=False)
    args = ["--config", str(TRAINING / "configs" / "tiny_diffusion.yaml"), "--out", str(out), "--cache", str(cache),
            "--max-steps", "4", "--set", f"vae_checkpoint={vae / 'model'}", "--set", "train.num_workers=0",
            "--set", "train.batch_size=2", "--set", "train.steps_per_epoch=4", "--set", "train.val_items=2",
            "--set", "data.val_crop=32", "--set", "data.precompute_latents=true", "--no-progress"]
    assert train_diffusion.main(args) == 0
    assert (out / "samples" / "diffusion_epoch_0000.png").exists()
    assert len(list((out / "latents").glob("*.npy"))) == 4  # train + val case x thin/thick, encoded once
    from ctsliceinterp.cli import main as cli_main

    result = tmp_path / "result.nii.gz"
    code = cli_main(["interpolate", thin_volumes[2], "-o", str(result), "--method", "diffusion", "--model", str(out / "model"),
                     "--spacing", "0.5", "--steps", "2", "--no-progress"])
    assert code == 0 and result.exists()


def test_k8s_manifests_parse_and_use_torchrun_gpus_and_the_pvc():
    import yaml

    manifests = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (TRAINING / "k8s").glob("*.yaml")}
    claim = manifests["pvc.yaml"][0]["metadata"]["name"]
    for name in ("preprocess-job.yaml", "train-vae.yaml", "train-diffusion.yaml"):
        pod = manifests[name][0]["spec"]["template"]["spec"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in pod["volumes"])
        text = json.dumps(pod)
        if name.startswith("train"):
            assert "torchrun" in text
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
