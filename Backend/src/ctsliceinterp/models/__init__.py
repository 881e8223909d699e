"""The networks: the slice VAE and the latent U-Net, and their configurations.

``WEIGHTS_DIR`` holds the shipped models, one folder each (``weights/<name>/``)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
