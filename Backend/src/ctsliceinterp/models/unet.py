"""Depth-preserving 3-D U-Net for latent slice interpolation.

Tensors are (B, C, D, H, W): D thin slices along the slice normal, H x W latent pixels.
- Down- and upsampling act in-plane only (kernel/stride (1, 2, 2)): depth is never compressed,
  so every thin slice keeps its own feature column through the network.
- Attention runs along depth only: for each (h, w) position the D slices attend to each other
  (sequence (B*H*W, D, C), ``F.scaled_dot_product_attention``). Cost grows with D^2 but not with
  (H*W)^2, which is what makes 64 x 64 latents affordable.
- Conditioning is by concatenation: noisy latent, the thick latent resampled onto the thin depth
  grid, and per-slice position channels (where each thin slice stands between acquired slices),
  broadcast in-plane.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configs import UNetConfig
from .layers import group_norm


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps, as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def conv3(in_channels: int, out_channels: int, kind: str) -> nn.Module:
    if kind == "3d":
        return nn.Conv3d(in_channels, out_channels, 3, padding=1)
    # (2+1)-D: in-plane then along depth.
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1)),
        nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0)),
    )


class ResBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, config: UNetConfig):
        super().__init__()
        g = config.norm_groups
        self.norm1 = group_norm(in_channels, g)
        self.conv1 = conv3(in_channels, out_channels, config.conv)
        self.emb = nn.Linear(emb_channels, out_channels)
        self.norm2 = group_norm(out_channels, g)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = conv3(out_channels, out_channels, config.conv)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class DepthAttention(nn.Module):
    """Self-attention along D for every in-plane position."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)  # starts as identity: stable early training
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, d, h, w = x.shape
        seq = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        q, k, v = self.qkv(seq).reshape(b * h * w, d, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (BHW, heads, D, c/heads)
        out = self.proj(out.transpose(1, 2).reshape(b * h * w, d, c))
        return x + out.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class UNet3D(nn.Module):
    """``forward(noisy, timesteps, condition, positions)`` -> prediction (eps or v), (B, C, D, H, W).

    noisy, condition: (B, latent_channels, D, H, W); positions: (B, position_channels, D);
    timesteps: (B,) or a scalar. H and W must be multiples of ``config.downsampling_factor``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        base = config.base_channels
        emb_channels = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.conv_in = conv3(config.in_channels, base, config.conv)

        widths = [base * m for m in config.channel_mult]
        self.down = nn.ModuleList()
        skip_widths = [base]
        current = base
        for level, width in enumerate(widths):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock3D(current, width, emb_channels, config))
                current = width
                if level in config.attention_levels:
                    self.down.append(DepthAttention(current, config.attention_head_channels, config.norm_groups))
                skip_widths.append(current)
            if level < len(widths) - 1:
                self.down.append(Downsample(current))
                skip_widths.append(current)

        mid: list[nn.Module] = [ResBlock3D(current, current, emb_channels, config)]
        if config.attention_middle:
            mid.append(DepthAttention(current, config.attention_head_channels, config.norm_groups))
        mid.append(ResBlock3D(current, current, emb_channels, config))
        self.mid = nn.ModuleList(mid)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            for _ in range(config.blocks_per_level + 1):
                self.up.append(ResBlock3D(current + skip_widths.pop(), width, emb_channels, config))
                current = width
                if level in config.attention_levels:
                    self.up.append(DepthAttention(current, config.attention_head_channels, config.norm_groups))
            if level > 0:
                self.up.append(Upsample(current))

        self.norm_out = group_norm(current, config.norm_groups)
        self.conv_out = nn.Conv3d(current, config.latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def _run(self, module: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, emb, use_reentrant=False)
        return module(x, emb)

    def forward(self, noisy: torch.Tensor, timesteps, condition: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = noisy.shape
        factor = self.config.downsampling_factor
        if h % factor or w % factor:
            raise ValueError(f"U-Net: latent height/width must be multiples of {factor}, got {h}x{w}")
        timesteps = torch.as_tensor(timesteps, device=noisy.device).reshape(-1).expand(b)
        emb = self.time_mlp(timestep_embedding(timesteps, self.config.base_channels).to(noisy.dtype))
        pos = positions.to(noisy.dtype)[:, :, :, None, None].expand(b, -1, d, h, w)
        x = self.conv_in(torch.cat([noisy, condition.to(noisy.dtype), pos], dim=1))

        skips = [x]
        for module in self.down:
            x = self._run(module, x, emb)
            if not isinstance(module, DepthAttention):
                skips.append(x)
            else:
                skips[-1] = x  # the skip of a block is taken after its attention
        for module in self.mid:
            x = self._run(module, x, emb)
        for module in self.up:
            if isinstance(module, ResBlock3D):
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(module, x, emb)
        return self.conv_out(F.silu(self.norm_out(x)))
