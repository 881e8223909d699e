"""Depth chunks: a network applied to overlapping runs of slices, blended into any depth.

Memory is bounded by the chunk length, not the volume's depth; neighbouring chunks share at least
``overlap`` slices and are blended with cosine ramps at every call (a weighted mean, so a constant
field stays constant and no seam appears)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch


def chunk_starts(depth: int, chunk: int, overlap: int) -> list[int]:
    """Start indices of the fewest chunks that cover ``depth`` with at least ``overlap`` slices
    shared by neighbours, spread evenly (no nearly duplicated last chunk)."""
    if depth <= chunk:
        return [0]
    count = math.ceil((depth - overlap) / (chunk - overlap))
    return [int(round(s)) for s in np.linspace(0, depth - chunk, count)]


def ramp_weights(length: int, overlap: int) -> torch.Tensor:
    """Blending weights of one chunk: cosine ramps over ``overlap`` slices at both ends, never 0."""
    w = torch.ones(length, dtype=torch.float32)
    ramp_len = min(overlap, length // 2)
    if ramp_len > 0:
        i = torch.arange(ramp_len, dtype=torch.float32)
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (i + 1) / (ramp_len + 1))
        w[:ramp_len] = ramp
        w[length - ramp_len :] = ramp.flip(0)
    return w


def blend_over_depth(fn: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], chunk: int, overlap: int, device) -> torch.Tensor:
    """Evaluate ``fn(start, stop)`` -> (B, C, stop-start, H, W) on overlapping depth chunks and
    blend them with normalised cosine ramps (a weighted mean: constant fields stay constant)."""
    depth = shape[2]
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    total = torch.zeros(depth, dtype=torch.float32, device=device)
    for start in chunk_starts(depth, chunk, overlap):
        stop = min(start + chunk, depth)
        w = ramp_weights(stop - start, overlap).to(device)
        out[:, :, start:stop] += fn(start, stop).float() * w[None, None, :, None, None]
        total[start:stop] += w
    return out / total[None, None, :, None, None]
