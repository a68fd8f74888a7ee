"""Pure-PyTorch reference of the MSA Index Branch: token scores -> causal block max -> top-k.

Semantics: ../shared/docs/msa-spec.md section 1. Queries are processed in chunks, so no T x T
matrix is ever built (T = 32K runs on a 24 GiB CPU machine).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..common import compute_dtype, query_chunk, reference_math, sequence_spans


def order_selection(ids: torch.Tensor, valid: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """Write the index convention: non-local blocks ascending, the local block in the last valid
    slot, -1 after the valid prefix.

    ids, valid: (N, H, k') block ids and their validity; local: (N,) local block ids.
    Returns int32 (N, H, topk).
    """
    n, h, kk = ids.shape
    big = torch.iinfo(torch.int64).max
    ids = ids.to(torch.int64)
    is_local = ids == local.view(n, 1, 1).to(torch.int64)
    key = torch.where(is_local, big - 1, ids)
    key = torch.where(valid, key, torch.full_like(key, big))
    key, _ = key.sort(dim=-1)
    out = torch.where(key == big - 1, local.view(n, 1, 1).to(torch.int64).expand_as(key), key)
    out = torch.where(key == big, torch.full_like(out, -1), out)
    if kk < topk:
        out = torch.cat([out, out.new_full((n, h, topk - kk), -1)], dim=-1)
    return out.to(torch.int32)


def block_scores_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, q_start: int, block_size: int,
                           scale: float) -> torch.Tensor:
    """Causal block-max scores of one query chunk.

    q_idx: (C, H_kv, D_idx) queries at positions q_start .. q_start+C-1 of their sequence.
    k_idx: (T_k, D_idx) index keys of the same sequence (positions 0 .. T_k-1).
    Returns fp32/fp64 (C, H_kv, NB) with NB = blocks that hold any visible key; -inf where the block
    has no key j <= i.
    """
    c = q_idx.shape[0]
    dt = compute_dtype(q_idx.dtype)
    pos = torch.arange(q_start, q_start + c, device=q_idx.device)
    kmax = min(k_idx.shape[0], q_start + c)
    nb = math.ceil(kmax / block_size)
    keys = k_idx[:kmax].to(dt)
    if nb * block_size > kmax:
        keys = torch.cat([keys, keys.new_zeros(nb * block_size - kmax, keys.shape[1])])
    s = torch.einsum("chd,td->cht", q_idx.to(dt), keys) * scale
    j = torch.arange(nb * block_size, device=q_idx.device)
    s = s.masked_fill((j.view(1, 1, -1) > pos.view(-1, 1, 1)), float("-inf"))
    return s.view(c, s.shape[1], nb, block_size).amax(dim=-1)


def select_from_scores(m: torch.Tensor, pos: torch.Tensor, block_size: int, topk: int, init_blocks: int,
                       local_blocks: int) -> torch.Tensor:
    """Top-k with forcing on block scores m (C, H, NB) for queries at positions pos (C,)."""
    c, h, nb = m.shape
    local = pos // block_size
    b = torch.arange(nb, device=m.device).view(1, -1)
    lc = local.view(-1, 1)
    forced = ((b < init_blocks) | (b > lc - local_blocks)) & (b <= lc)
    m = torch.where(forced.unsqueeze(1), torch.full_like(m, float("inf")), m)
    m = torch.where((b > lc).unsqueeze(1), torch.full_like(m, float("-inf")), m)
    kk = min(topk, nb)
    # stable descending sort: equal scores go to the lower block id, the tie-break every backend uses
    # (exact ties are common: repeated tokens give identical index keys when the index branch has no RoPE)
    vals, ids = m.sort(dim=-1, descending=True, stable=True)
    return order_selection(ids[..., :kk], vals[..., :kk] > float("-inf"), local, topk)


def select_blocks_sequence(q_idx: torch.Tensor, k_idx: torch.Tensor, *, q_start: int, block_size: int, topk: int,
                           init_blocks: int, local_blocks: int, scale: float,
                           candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One sequence. q_idx (T_q, H_kv, D_idx) at positions q_start.., k_idx (T_k, D_idx).
    Returns int32 (T_q, H_kv, topk). Used by prefill (q_start=0) and by decode with a cache.
    candidates: optional int32 (T_q, H_kv, n) block ids (-1 unused): only these blocks compete."""
    tq, h, _ = q_idx.shape
    out = torch.empty(tq, h, topk, dtype=torch.int32, device=q_idx.device)
    chunk = query_chunk(h, k_idx.shape[0])
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        m = block_scores_reference(q_idx[c0:c1], k_idx, q_start + c0, block_size, scale)
        if candidates is not None:
            nb = m.shape[-1]
            cand = candidates[c0:c1].long()
            member = torch.zeros(*m.shape[:2], nb + 1, dtype=torch.bool, device=m.device)
            member.scatter_(-1, torch.where(cand < 0, nb, cand), True)
            m = torch.where(member[..., :nb], m, torch.full_like(m, float("-inf")))
        pos = torch.arange(q_start + c0, q_start + c1, device=q_idx.device)
        out[c0:c1] = select_from_scores(m, pos, block_size, topk, init_blocks, local_blocks)
    return out


@torch.no_grad()
@reference_math
def select_blocks_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int, topk: int,
                            init_blocks: int, local_blocks: int, scale: float,
                            cu_seqlens: Optional[torch.Tensor],
                            candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of msa.select_blocks (arguments already validated). Returns int32 (B, T, H_kv, topk).
    candidates: optional int32 (B, T, H_kv, n) block ids (-1 unused): only these blocks compete (the
    exact rescoring of fp8 candidates)."""
    bsz, t, h, _ = q_idx.shape
    out = torch.empty(bsz, t, h, topk, dtype=torch.int32, device=q_idx.device)
    for b, s, e in sequence_spans(bsz, t, cu_seqlens):
        out[b, s:e] = select_blocks_sequence(q_idx[b, s:e], k_idx[b, s:e], q_start=0, block_size=block_size,
                                             topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                                             scale=scale, candidates=None if candidates is None else candidates[b, s:e])
    return out
