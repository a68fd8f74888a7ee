"""Launchers of the fused decode-step kernels (``step_kernels``): no validation of values, no host sync,
capturable in a CUDA graph. Callers (``msa.models.generation``) check shapes once per generation."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..utils.triton_helpers import next_pow2
from . import step_kernels as sk


def add_rmsnorm(x: torch.Tensor, h: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                unit_offset: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) contiguous; h None or x's shape and dtype; weight (N,) ->
    (x + h in x.dtype (x itself when h is None), RMSNorm of it in x.dtype: fp32 statistics, gain
    weight or 1 + weight). Same arithmetic as ``msa.layers.norm.RMSNorm`` after an eager residual add."""
    n = x.shape[-1]
    xo = x if h is None else torch.empty_like(x)
    y = torch.empty_like(x)
    sk.add_rmsnorm_kernel[(x.numel() // n,)](x, x if h is None else h, weight, xo, y, n, float(eps),
                                             HAS_H=h is not None, UNIT_OFFSET=bool(unit_offset),
                                             BLOCK=max(16, next_pow2(n)), num_warps=4 if n <= 4096 else 8)
    return xo, y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 I) contiguous -> silu(gate_up[..., :I]) * gate_up[..., I:] (..., I) in its dtype."""
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, max(16, next_pow2(n)))
    sk.silu_mul_kernel[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out


def rope_append(proj: torch.Tensor, cache, layer_idx: int, q_out: torch.Tensor, qi_out: Optional[torch.Tensor],
                cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int, head_dim: int,
                index_dim: Optional[int]) -> None:
    """Split, rotate and store one fused projection per new token, then advance the lengths.

    proj: (B, t, N) contiguous rows [q (H_q D) | k (H_kv D) | v (H_kv D) | q_idx (H_kv D_idx) | k_idx (D_idx)]
    (the last two only with index_dim). cos / sin: fp32 (>= max position + 1, rotary_dim / 2) tables.
    Writes q_out (B, t, H_q, D) and qi_out (B, t, H_kv, D_idx) (with index_dim), K / V / index keys of
    layer ``layer_idx`` at each sequence's device length (per-token fp8 scales for fp8 keys; per-block
    scales are not supported), and adds t to ``cache.lengths_dev[layer_idx]``."""
    bsz, t, ntot = proj.shape
    hkv = cache.num_kv_heads
    has_index = index_dim is not None
    fp8 = has_index and cache.fp8_index
    dummy = cache.lengths_dev[layer_idx]
    half = cos.shape[1]
    sk.rope_append_kernel[(bsz,)](
        proj, cos, sin, q_out, qi_out if has_index else q_out, cache.k[layer_idx], cache.v[layer_idx],
        cache.k_idx[layer_idx] if has_index else cache.k[layer_idx],
        cache.k_idx_scale[layer_idx] if fp8 else cos, cache.page_table if cache.paged else dummy,
        cache.lengths_dev[layer_idx],
        t, ntot, max(1, cache.rows_per_seq), cache.page_table.shape[1] if cache.paged else 0,
        num_heads, hkv, head_dim, index_dim or 1,
        HALF=half, PAGE=cache.page_size or 1, PAGED=cache.paged, HAS_INDEX=has_index, FP8=fp8,
        HQ_PAD=next_pow2(num_heads), HKV_PAD=next_pow2(hkv), D_PAD=max(16, next_pow2(head_dim)),
        DI_PAD=max(16, next_pow2(index_dim or 1)), num_warps=4)
