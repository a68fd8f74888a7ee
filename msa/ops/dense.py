"""Dense causal GQA attention (the warmup phase's main branch and the baseline), through torch SDPA."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import sequence_spans


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                           cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q (B, T, H_q, D), k/v (B, T, H_kv, D) -> o (B, T, H_q, D): full causal softmax attention per
    sequence (packed sequences never see each other). Uses the fastest SDPA backend of the device."""
    bsz, t = q.shape[:2]
    if cu_seqlens is None:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(1, 2)
    pieces = [dense_causal_attention(q[:, s:e], k[:, s:e], v[:, s:e], scale=scale)
              for _, s, e in sequence_spans(bsz, t, cu_seqlens)]
    return torch.cat(pieces, dim=1)
