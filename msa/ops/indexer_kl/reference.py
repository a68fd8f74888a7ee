"""Pure-PyTorch reference of the indexer KL loss (spec section 2).

Per query i and group r, over the support U (selected blocks, or all causal keys in warmup):
student p_idx = softmax_U(index scores), teacher p = mean over the group's heads of
softmax_U(q . k * scale) built from detached q and k; loss = KL(p || p_idx), summed here and
divided by (tokens x groups) by the caller. Chunked and checkpointed: memory O(chunk x T).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..common import compute_dtype, query_chunk, reference_math, sequence_spans
from ..sparse_attention.reference import allowed_keys


def _kl_chunk(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
              scale: float, index_scale: float) -> torch.Tensor:
    """q_idx (C, H_kv, Di), k_idx (N, Di), q (C, H_kv, G, D), k (N, H_kv, D), allowed (C, H_kv|1, N).
    Returns the summed KL over the chunk's (token, group) pairs (a 0-dim tensor)."""
    dt = compute_dtype(q_idx.dtype)
    neg = float("-inf")
    s = torch.einsum("crd,jd->crj", q_idx.to(dt), k_idx.to(dt)) * index_scale
    log_student = torch.log_softmax(s.masked_fill(~allowed, neg), dim=-1)
    with torch.no_grad():
        t = torch.einsum("crgd,jrd->crgj", q.to(dt), k.to(dt)) * scale
        teacher = torch.softmax(t.masked_fill(~allowed.unsqueeze(2), neg), dim=-1).mean(dim=2)
        log_teacher = torch.log(teacher.clamp_min(torch.finfo(dt).tiny))
    terms = teacher * (log_teacher - log_student.masked_fill(~allowed, 0.0))
    return torch.where(teacher > 0, terms, torch.zeros_like(terms)).sum()


def indexer_kl_sequence(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        block_indices: Optional[torch.Tensor], *, block_size: int, scale: float,
                        index_scale: float) -> torch.Tensor:
    """One sequence: q_idx (T, H_kv, Di), k_idx (T, Di), q (T, H_q, D), k (T, H_kv, D),
    block_indices int (T, H_kv, K) or None (warmup). Returns the KL summed over (token, group)."""
    t, hkv, _ = q_idx.shape
    hq, d = q.shape[1], q.shape[2]
    q, k = q.detach(), k.detach()
    chunk = query_chunk(hq + hkv, t)
    total = q_idx.new_zeros((), dtype=compute_dtype(q_idx.dtype))
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        pos = torch.arange(c0, c1, device=q.device)
        allowed = allowed_keys(None if block_indices is None else block_indices[c0:c1], pos, c1, block_size)
        args = (q_idx[c0:c1], k_idx[:c1], q[c0:c1].reshape(c1 - c0, hkv, hq // hkv, d), k[:c1], allowed)
        if chunk < t and torch.is_grad_enabled() and (q_idx.requires_grad or k_idx.requires_grad):
            total = total + checkpoint(_kl_chunk, *args, scale, index_scale, use_reentrant=False)
        else:
            total = total + _kl_chunk(*args, scale, index_scale)
    return total


@reference_math
def indexer_kl_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         block_indices: Optional[torch.Tensor], *, block_size: int, scale: float,
                         index_scale: float, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference of msa.indexer_kl_loss (arguments validated): mean KL over all tokens and groups, fp32."""
    bsz, t, hkv, _ = q_idx.shape
    total = None
    for b, s, e in sequence_spans(bsz, t, cu_seqlens):
        bi = None if block_indices is None else block_indices[b, s:e]
        part = indexer_kl_sequence(q_idx[b, s:e], k_idx[b, s:e], q[b, s:e], k[b, s:e], bi, block_size=block_size,
                                   scale=scale, index_scale=index_scale)
        total = part if total is None else total + part
    loss = total / (bsz * t * hkv)
    return loss if loss.dtype == torch.float64 else loss.float()
