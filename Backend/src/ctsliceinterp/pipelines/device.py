"""Where a learned method's model runs: ``--device auto|cpu|cuda`` to a torch device."""

from __future__ import annotations

import torch

from ..core.errors import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested (--device cuda) but no CUDA GPU is available; use --device cpu")
    return device
