"""The through-plane regression network: a 2.5-D residual U-Net on axial slices.

For each thin slice it predicts a correction, in HU, to the classical (B-spline) estimate of that
slice, from the estimate itself, the thick slices around it and where the slice stands between
them (``pipelines.regression.network_inputs`` builds those channels, for training and inference
alike). Full in-plane resolution: the input is folded 2 x 2 into channels (pixel unshuffle), two
stride-2 stages widen the in-plane receptive field to about 100 pixels, and the output is unfolded
again. The last layer starts at zero, so an untrained network returns the classical estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from .configs import ConfigError
from .folders import read_folder, save_folder

WEIGHTS_FILE = "regression.safetensors"
CONFIG_FILE = "regression.json"
SELF_ENSEMBLE_COUNTS = (1, 2, 4, 8)  # each a group of in-plane transforms (SELF_ENSEMBLE's first n)


@dataclass(frozen=True)
class RegressionConfig:
    """Explicit architecture config (saved next to the weights)."""

    neighbours: int = 4  # thick slices given to the network: neighbours // 2 on each side
    widths: tuple[int, int, int] = (32, 64, 96)  # channels at 1/2, 1/4 and 1/8 of the in-plane size
    fold: int = 2  # pixel-unshuffle factor of the input
    hu_scale: float = 1000.0  # HU per network unit, in and out
    # Inference: the correction averaged over this many of the in-plane flips and transposes that
    # training augments with (``SELF_ENSEMBLE``: 1 none, 2, 4 or 8), a geometric self-ensemble.
    self_ensemble: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.self_ensemble not in SELF_ENSEMBLE_COUNTS:
            raise ConfigError(f"self_ensemble must be 1, 2, 4 or 8, got {self.self_ensemble}")

    @property
    def in_channels(self) -> int:
        return 1 + self.neighbours + 3  # estimate, neighbour differences, 3 position channels

    @property
    def size_multiple(self) -> int:
        return self.fold * 4  # input sizes are padded to this (two stride-2 stages)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RegressionConfig":
        known = {k: data[k] for k in ("neighbours", "widths", "fold", "hu_scale", "self_ensemble", "extra") if k in data}
        if "widths" in known:
            known["widths"] = tuple(int(w) for w in known["widths"])
        return cls(**known)


# (transpose, flip rows, flip columns), in the order ``self_ensemble`` takes them: the flips first.
SELF_ENSEMBLE = [(False, False, False), (False, False, True), (False, True, False), (False, True, True),
                 (True, False, False), (True, False, True), (True, True, False), (True, True, True)]


def transform_in_plane(images: torch.Tensor, transpose: bool, flip_rows: bool, flip_columns: bool,
                       inverse: bool = False) -> torch.Tensor:
    """One of ``SELF_ENSEMBLE``'s transforms of (..., H, W) images, or its inverse."""
    def flips(t):
        dims = [d for d, on in ((-2, flip_rows), (-1, flip_columns)) if on]
        return t.flip(dims) if dims else t

    swap = (lambda t: t.transpose(-1, -2)) if transpose else (lambda t: t)  # noqa: E731
    return flips(swap(images)) if inverse else swap(flips(images))


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, convs: int, stride: int = 1):
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [_conv(cin if i == 0 else cout, cout, stride if i == 0 else 1), nn.LeakyReLU(0.2, inplace=True)]
        super().__init__(*layers)


class ThroughPlaneNet(nn.Module):
    """(B, in_channels, H, W) network inputs -> (B, 1, H, W) correction in network units."""

    def __init__(self, config: RegressionConfig = RegressionConfig()):
        super().__init__()
        self.config = config
        w0, w1, w2 = config.widths
        f = config.fold
        self.fold_in = nn.PixelUnshuffle(f)
        self.stem = _Stage(config.in_channels * f * f, w0, 2)
        self.down1 = _Stage(w0, w1, 2, stride=2)
        self.down2 = _Stage(w1, w2, 3, stride=2)
        self.reduce2 = nn.Conv2d(w2, w1, 1)
        self.up1 = _Stage(w1, w1, 1)
        self.reduce1 = nn.Conv2d(w1, w0, 1)
        self.up0 = _Stage(w0, w0, 1)
        self.head = _conv(w0, f * f)
        self.fold_out = nn.PixelShuffle(f)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        height, width = inputs.shape[-2:]
        m = self.config.size_multiple
        pad_h, pad_w = (-height) % m, (-width) % m
        if pad_h or pad_w:
            inputs = F.pad(inputs, (0, pad_w, 0, pad_h), mode="replicate")
        s0 = self.stem(self.fold_in(inputs))
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        u1 = self.up1(F.interpolate(self.reduce2(s2), size=s1.shape[-2:], mode="nearest") + s1)
        u0 = self.up0(F.interpolate(self.reduce1(u1), size=s0.shape[-2:], mode="nearest") + s0)
        out = self.fold_out(self.head(u0))
        return out[..., :height, :width]

    # --- the save/load pair (diffusers style) ---------------------------------------------
    def save_pretrained(self, folder: str | Path, info: dict | None = None) -> Path:
        """Weights (safetensors) and config (JSON), each written atomically, then read back."""
        return save_folder(folder, self, WEIGHTS_FILE, CONFIG_FILE, {"config": self.config.to_dict(), "info": info or {}})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ThroughPlaneNet":
        meta, state = read_folder(folder, WEIGHTS_FILE, CONFIG_FILE)
        model = cls(RegressionConfig.from_dict(meta["config"]))
        model.load_state_dict(state)
        return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
