"""Layers shared by the VAE and the U-Net."""

from __future__ import annotations

import math

from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-6)
