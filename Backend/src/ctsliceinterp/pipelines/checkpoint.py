"""Model checkpoint folders: save, load and validate.

A checkpoint is one folder::

    model.json         format name and version, the full ModelConfig (networks, intensity window,
                       diffusion and inference settings), latent scale, SHA-256 of each weight file,
                       free-form training metadata
    vae.safetensors    SliceVAE weights
    unet.safetensors   UNet3D weights (absent in a VAE-only checkpoint, e.g. after VAE training)

The intensity normalisation is ``config.window`` (HU window mapped to [-1, 1]). Saving writes a
temporary folder and renames it (atomic); loading checks every part and raises
``CheckpointError`` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.errors import CTSliceInterpError
from ..models import WEIGHTS_DIR
from ..models.configs import ConfigError, ModelConfig

FORMAT_NAME = "ctsliceinterp-latent-diffusion"
FORMAT_VERSION = 1
MANIFEST = "model.json"
VAE_FILE = "vae.safetensors"
UNET_FILE = "unet.safetensors"


class CheckpointError(CTSliceInterpError):
    """A model checkpoint is missing, corrupted or does not match this version of the code."""


@dataclass
class Checkpoint:
    config: ModelConfig
    vae: Any  # SliceVAE
    unet: Any  # UNet3D or None
    latent_scale: float
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder, vae, unet, config: ModelConfig, latent_scale: float, metadata: Optional[dict] = None) -> Path:
    """Write ``vae`` (+ ``unet`` unless None) with ``config`` and the measured ``latent_scale``."""
    from safetensors.torch import save_file

    from ..io.atomic import atomic_directory

    latent_scale = float(latent_scale)
    if not (math.isfinite(latent_scale) and latent_scale > 0):
        raise CheckpointError(f"the latent scale must be a positive number, got {latent_scale}")
    folder = Path(folder)
    if not folder.parent.exists():
        raise CheckpointError(f"the folder {folder.parent} does not exist")
    with atomic_directory(folder) as tmp:
        files = {}
        for name, module in ((VAE_FILE, vae), (UNET_FILE, unet)):
            if module is None:
                continue
            state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / name))
            files[name] = _sha256(tmp / name)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "latent_scale": latent_scale,
            "intensity": {"center": config.window.center, "width": config.window.width, "range": [-1.0, 1.0]},
            "files": files,
            "metadata": dict(metadata or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def resolve_model(path_or_name) -> Path:
    """A checkpoint folder, or the name of a model shipped inside the package."""
    path = Path(str(path_or_name)).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_name)
    if "/" not in name and "\\" not in name and not name.startswith("."):
        shipped = WEIGHTS_DIR / name
        if shipped.is_dir():
            return shipped
        raise CheckpointError(f"no model named {name!r} is installed and no folder {path} exists")
    raise CheckpointError(f"the model folder {path} does not exist")


def read_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a model checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path} is not a {FORMAT_NAME} checkpoint")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format version {version}, this code reads version {FORMAT_VERSION}"
        )
    return manifest


def load_checkpoint(path_or_name, device="cpu", require_unet: bool = False) -> Checkpoint:
    """Load and validate a checkpoint folder (or shipped model name) onto ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.unet import UNet3D
    from ..models.vae import SliceVAE

    folder = resolve_model(path_or_name)
    manifest = read_manifest(folder)
    try:
        config = ModelConfig.from_dict(manifest.get("config") or {})
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    latent_scale = manifest.get("latent_scale")
    if not isinstance(latent_scale, (int, float)) or not math.isfinite(latent_scale) or latent_scale <= 0:
        raise CheckpointError(f"{folder}: the latent scale must be a positive number, got {latent_scale!r}")
    intensity = manifest.get("intensity") or {}
    if (intensity.get("center"), intensity.get("width")) != (config.window.center, config.window.width):
        raise CheckpointError(f"{folder}: the intensity normalisation {intensity} does not match the config window")
    files = manifest.get("files") or {}
    if VAE_FILE not in files:
        raise CheckpointError(f"{folder}: the checkpoint has no VAE weights")
    if require_unet and UNET_FILE not in files:
        raise CheckpointError(f"{folder}: the checkpoint holds only a VAE; a trained U-Net is needed to interpolate")

    def load_into(module, name):
        weights = folder / name
        if not weights.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if _sha256(weights) != files[name]:
            raise CheckpointError(f"{folder}: {name} is corrupted (its checksum does not match {MANIFEST})")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{folder}: cannot read {name}: {exc}") from exc
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(
                f"{folder}: {name} does not match the configured network ({'; '.join(first[:3])})"
            ) from exc
        return module.to(device).eval()

    vae = load_into(SliceVAE(config.vae), VAE_FILE)
    unet = load_into(UNet3D(config.unet), UNET_FILE) if UNET_FILE in files else None
    return Checkpoint(config, vae, unet, float(latent_scale), dict(manifest.get("metadata") or {}), folder)
