"""fp8 (e4m3) codec of the index keys: symmetric quantisation with one fp32 scale per token or per block.

A key vector x is stored as ``round(x / s)`` in float8_e4m3fn with ``s = amax|x| / 448`` (448 is the
largest finite e4m3 value), so the largest entry maps to +-448 and the relative error of every entry
is at most 2^-4 of amax. The decode kernels apply the scale in fp32 (see ``dequantize_fp8``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

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


_BLOCK_ID_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _block_gather(cu: Tuple[int, ...], block_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """For the flat layout with sequence offsets cu (blocks restart at every sequence start): int64 (N,)
    global key-block id of every token, and int64 (blocks, block_size) the tokens of every block, N
    (one past the last token) where a sequence's last block is short. Cached per layout."""
    key = (cu, block_size, str(device))
    hit = _BLOCK_ID_CACHE.get(key)
    if hit is None:
        n = cu[-1]
        starts = [a + i * block_size for a, b in zip(cu[:-1], cu[1:]) for i in range(-(-(b - a) // block_size))]
        ends = [min(s + block_size, b) for a, b in zip(cu[:-1], cu[1:]) for s in range(a, b, block_size)]
        tok = torch.tensor(starts).view(-1, 1) + torch.arange(block_size).view(1, -1)
        tok = torch.where(tok < torch.tensor(ends).view(-1, 1), tok, torch.full_like(tok, n))
        gid = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(ends) - torch.tensor(starts))
        hit = (gid.to(device), tok.to(device))
        if len(_BLOCK_ID_CACHE) >= 32:
            _BLOCK_ID_CACHE.pop(next(iter(_BLOCK_ID_CACHE)))
        _BLOCK_ID_CACHE[key] = hit
    return hit


def quantize_fp8_key_blocks(k: torch.Tensor, cu: Sequence[int], block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index keys of a prefill to float8_e4m3fn with ONE scale per key block of each sequence.

    Args:
        k: float (N, D_idx) keys of the flat layout whose sequences start at the host offsets ``cu``
            (cu[0] = 0, cu[-1] = N; blocks of ``block_size`` restart at every sequence start).

    Returns:
        values float8_e4m3fn (N, D_idx) and fp32 (N,) scales, every token carrying its block's scale
        (amax over the block / 448). A block max of scores then takes the scale after the max (it is
        positive and shared by the block), so the score kernel's epilogue is the bf16 one; the selection
        changes little against per-token scales (block recall against bf16 0.970-0.981 vs 0.972-0.982 on
        trained CPU indexers: the keys are RMS-normalised, so their amax varies little within a block).

    Equivalent PyTorch (one sequence, block b = keys b * block_size ...)::

        s_b = k[block].abs().amax().clamp_min(1e-12 * 448) / 448
        values[block] = (k[block] / s_b).to(torch.float8_e4m3fn)
    """
    gid, tok = _block_gather(tuple(int(c) for c in cu), block_size, k.device)
    # a gather and a row max, not a scatter: an atomic float max with a whole block on one address
    # serialises (docs/perf-notes.md, round 24)
    tok_amax = torch.cat([k.float().abs().amax(-1), k.new_zeros(1, dtype=torch.float32)])
    s_tok = (tok_amax[tok].amax(-1) / FP8_MAX).clamp_min(_MIN_SCALE)[gid]
    return (k.float() / s_tok[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s_tok
