"""VAE reconstruction quality of a checkpoint on whole slices of a CT volume.

    python Training/vae_reconstruction.py --model runs/default_vae/model --volume ../shared/data/volumes/chest_ricord000082_1p25mm.nii.gz \
        --slices 40 --json docs/quality/vae_reconstruction.json

Every ``stride``-th slice of the middle ``slices`` slices is encoded (posterior mean, as the pipeline
does) and decoded at full in-plane size. Reported:

- ``psnr_window_db``: PSNR in the model's own intensity space (HU windowed to the model window and
  mapped to [-1, 1], peak-to-peak 2), the number the issue's ">= 38 dB" target refers to and the
  one ``train_vae.py`` logs as ``val_psnr`` (there on 64 px crops);
- ``psnr_window_body_db``: the same inside the body (reference > -500 HU), so air does not inflate it;
- ``mae_hu_in_window``: mean absolute HU error over voxels whose reference lies inside the window.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

TRAINING_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TRAINING_DIR.parent / "Backend" / "src"))

from ctsliceinterp.pipelines.checkpoint import load_checkpoint  # noqa: E402
from ctsliceinterp.io import read_volume  # noqa: E402
from ctsliceinterp.evaluation.metrics import BODY_THRESHOLD_HU, psnr  # noqa: E402
from ctsliceinterp.pipelines.diffusion import pad_in_plane, denormalise, normalise  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name or checkpoint folder")
    parser.add_argument("--volume", required=True, help="CT volume (HU)")
    parser.add_argument("--slices", type=int, default=40, help="middle slices considered (default 40)")
    parser.add_argument("--stride", type=int, default=1, help="use every n-th of them (default 1)")
    parser.add_argument("--json", help="write the result as JSON")
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint(args.model, device="cpu")
    vae, window = checkpoint.vae.eval(), checkpoint.config.window
    volume = read_volume(args.volume)
    n = volume.shape[0]
    first = max(0, (n - args.slices) // 2)
    indices = list(range(first, min(n, first + args.slices), max(1, args.stride)))
    hu = np.asarray(volume.array[indices], dtype=np.float32)
    x, (h, w) = pad_in_plane(normalise(hu, window), checkpoint.config.vae.downsampling_factor)
    started = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], 4):
            batch = torch.from_numpy(x[i : i + 4, None])
            outputs.append(vae.decode(vae.encode(batch).mean).float().clamp(-1, 1)[:, 0].numpy())
    seconds = time.perf_counter() - started
    reconstruction = np.concatenate(outputs)[:, :h, :w]
    target = x[:, :h, :w]
    body = hu > BODY_THRESHOLD_HU
    inside = (hu >= window.low) & (hu <= window.high)
    error_hu = np.abs(denormalise(reconstruction, window) - np.clip(hu, window.low, window.high))
    result = {
        "model": str(args.model),
        "model_metadata": checkpoint.metadata,
        "volume": Path(args.volume).name,
        "slice_indices": [indices[0], indices[-1], len(indices)],
        "in_plane": [h, w],
        "window_hu": [window.low, window.high],
        "psnr_window_db": psnr(reconstruction, target, peak=2.0),
        "psnr_window_body_db": psnr(reconstruction, target, mask=body, peak=2.0),
        "mae_hu_in_window": float(error_hu[inside].mean()),
        "seconds": round(seconds, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python Training/vae_reconstruction.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
