"""Rotary position embedding with a partial rotary dimension (rotate the first rotary_dim dims)."""

from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """positions: int (..., T) -> cos, sin of shape (..., T, rotary_dim // 2) in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float64)
                                / rotary_dim))
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ..., dim); cos/sin: (B or 1, T, rotary_dim // 2). Rotates the first rotary_dim
    dims of every head (rotate-half convention) and leaves the rest unchanged."""
    half = cos.shape[-1]
    rd = 2 * half
    extra = x.dim() - cos.dim()
    shape = cos.shape[:2] + (1,) * extra + (half,)
    c, s = cos.view(shape), sin.view(shape)
    xr = x[..., :rd].float()
    x1, x2 = xr[..., :half], xr[..., half:]
    rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([rot, x[..., rd:]], dim=-1) if rd < x.shape[-1] else rot
