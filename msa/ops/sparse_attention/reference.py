"""Pure-PyTorch reference of the MSA Main Branch: exact softmax attention over the selected blocks.

Semantics: ../shared/docs/msa-spec.md section 1. Queries are processed in chunks (each chunk is
checkpointed when gradients are needed), so memory stays O(chunk x T) in forward and backward.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..common import compute_dtype, query_chunk, reference_math, sequence_spans


def allowed_keys(block_indices: Optional[torch.Tensor], pos: torch.Tensor, num_keys: int,
                 block_size: int) -> torch.Tensor:
    """bool (C, H_kv or 1, num_keys): key j is visible to the query at position pos[c] in group r.

    block_indices: int (C, H_kv, K) selected block ids with -1 padding, or None for full causal.
    """
    j = torch.arange(num_keys, device=pos.device)
    causal = (j.view(1, 1, -1) <= pos.view(-1, 1, 1))
    if block_indices is None:
        return causal
    c, h, _ = block_indices.shape
    nb = math.ceil(num_keys / block_size)
    idx = block_indices.to(torch.int64)
    idx = torch.where((idx >= 0) & (idx < nb), idx, torch.full_like(idx, nb))  # -1 -> dummy column
    sel = torch.zeros(c, h, nb + 1, dtype=torch.bool, device=pos.device)
    sel.scatter_(2, idx, True)
    return sel[:, :, :nb][:, :, j // block_size] & causal


def _attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (C, H_kv, G, D), k/v (N, H_kv, D), allowed (C, H_kv|1, N) -> o (C, H_kv, G, D), lse (C, H_kv, G)."""
    dt = compute_dtype(q.dtype)
    s = torch.einsum("crgd,jrd->crgj", q.to(dt), k.to(dt)) * scale
    s = s.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    o = torch.einsum("crgj,jrd->crgd", p, v.to(dt))
    return o, lse


def sparse_attention_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              block_indices: Optional[torch.Tensor], *, q_start: int, block_size: int,
                              scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q (T_q, H_q, D) at positions q_start.., k/v (T_k, H_kv, D), block_indices
    int (T_q, H_kv, K) or None (dense causal). Returns o (T_q, H_q, D) in q.dtype, lse fp32 (T_q, H_q)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    chunk = query_chunk(hq, k.shape[0])
    outs, lses = [], []
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        nkeys = min(k.shape[0], q_start + c1)
        pos = torch.arange(q_start + c0, q_start + c1, device=q.device)
        allowed = allowed_keys(None if block_indices is None else block_indices[c0:c1], pos, nkeys, block_size)
        args = (q[c0:c1].reshape(c1 - c0, hkv, g, d), k[:nkeys], v[:nkeys], allowed)
        # checkpoint only when the sequence spans several chunks: it bounds memory at long T, and
        # small inputs (one chunk) skip its recompute
        if chunk < tq and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            o, lse = checkpoint(_attend_chunk, *args, scale, use_reentrant=False)
        else:
            o, lse = _attend_chunk(*args, scale)
        outs.append(o.reshape(c1 - c0, hq, d))
        lses.append(lse.reshape(c1 - c0, hq))
    return torch.cat(outs).to(q.dtype), torch.cat(lses).float()


@reference_math
def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               block_indices: Optional[torch.Tensor], *, block_size: int, scale: float,
                               cu_seqlens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of msa.sparse_attention (arguments already validated); block_indices=None is dense
    causal attention. Returns o (B, T, H_q, D) in q.dtype and lse fp32 (B, T, H_q)."""
    bsz, t, hq, _ = q.shape
    o_rows, lse_rows = [], []
    for b, s, e in sequence_spans(bsz, t, cu_seqlens):
        bi = None if block_indices is None else block_indices[b, s:e]
        o, lse = sparse_attention_sequence(q[b, s:e], k[b, s:e], v[b, s:e], bi, q_start=0,
                                           block_size=block_size, scale=scale)
        o_rows.append(o)
        lse_rows.append(lse)
    if cu_seqlens is not None:
        return torch.cat(o_rows).unsqueeze(0), torch.cat(lse_rows).unsqueeze(0)
    return torch.stack(o_rows), torch.stack(lse_rows)
