"""fp8 (e4m3) codec of the index keys: symmetric quantisation with one fp32 scale per token or per block.

A key vector x is stored as ``round(x / s)`` in float8_e4m3fn with ``s = amax|x| / 448`` (448 is the
largest finite e4m3 value), so the largest entry maps to +-448 and the relative error of every entry
is at most 2^-4 of amax. The decode kernels apply the scale in fp32 (see ``dequantize_fp8``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INDEX_SCALE_MODES = ("token", "block")
_MIN_SCALE = 1e-12  # an all-zero key gets this scale instead of 0 (no division by zero)


def quantize_fp8(x: torch.Tensor, dim_block: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise index keys to float8_e4m3fn.

    Args:
        x: float (..., D_idx) keys (any float dtype; computed in fp32).
        dim_block: falsy = one scale per token; truthy = x is (..., n, D_idx) and one scale covers
            the n tokens of each block.

    Returns:
        values float8_e4m3fn with x's shape, and fp32 scales of shape x.shape[:-1] (per token) or
        x.shape[:-2] (per block).
    """
    xf = x.float()
    dims = (-1, -2) if dim_block else (-1,)
    s = (xf.abs().amax(dim=dims) / FP8_MAX).clamp_min(_MIN_SCALE)
    sb = s[..., None, None] if dim_block else s.unsqueeze(-1)
    # clamp before the cast: torch's fp32 -> e4m3fn cast does not saturate in every release
    return (xf / sb).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values float8_e4m3fn (..., D_idx), scales fp32 (...) (one per row of values, broadcast over
    D_idx) -> values * scale in ``dtype``; the product is formed in fp32 like the decode kernels do."""
    return (values.float() * scales.float().unsqueeze(-1)).to(dtype)
