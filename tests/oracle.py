"""A deliberately naive float64 oracle of spec section 1-2, written independently of msa/ops:
it builds the full dense T x T masks of each sequence (test sizes only) and selects blocks with a
per-row Python sort. Everything in msa is tested against this."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def spans(batch: int, seqlen: int, cu_seqlens) -> List[Tuple[int, int, int]]:
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    cu = [int(x) for x in cu_seqlens]
    return [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]


def oracle_block_scores(q_idx, k_idx, block_size, scale):
    """One sequence: q_idx (T, H, Di), k_idx (T, Di) -> m float64 (H, T, NB), -inf for invisible blocks."""
    t, h, _ = q_idx.shape
    s = torch.einsum("thd,jd->htj", q_idx.double(), k_idx.double()) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf"))
    nb = math.ceil(t / block_size)
    m = torch.full((h, t, nb), float("-inf"), dtype=torch.float64)
    for b in range(nb):
        m[:, :, b] = s[:, :, b * block_size:(b + 1) * block_size].amax(-1)
    return m


def oracle_select(q_idx, k_idx, *, block_size, topk, init_blocks=0, local_blocks=1, scale=None, cu_seqlens=None):
    """Returns (sets, scores): sets[b][t][r] = sorted list of selected block ids; scores: per span m."""
    bsz, t, h, di = q_idx.shape
    scale = di ** -0.5 if scale is None else scale
    sets = [[None] * t for _ in range(bsz)]
    ms = {}
    for b, s, e in spans(bsz, t, cu_seqlens):
        m = oracle_block_scores(q_idx[b, s:e], k_idx[b, s:e], block_size, scale)
        ms[(b, s)] = m
        for i in range(e - s):
            local = i // block_size
            rows = []
            for r in range(h):
                forced = {blk for blk in range(local + 1)
                          if blk < init_blocks or blk > local - local_blocks}
                free = sorted((blk for blk in range(local + 1) if blk not in forced),
                              key=lambda blk: -float(m[r, i, blk]))
                chosen = sorted(forced)[:]
                chosen += free[:max(0, topk - len(forced))]
                rows.append(sorted(chosen))
            sets[b][s + i] = rows
    return sets, ms


def oracle_attention(q, k, v, sets: Optional[list], *, block_size, scale=None, cu_seqlens=None):
    """Dense-mask float64 attention. sets=None is full causal. Returns o (B, T, H_q, D), lse (B, T, H_q)."""
    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    o = torch.zeros(bsz, t, hq, d, dtype=torch.float64)
    lse = torch.zeros(bsz, t, hq, dtype=torch.float64)
    for b, s, e in spans(bsz, t, cu_seqlens):
        n = e - s
        mask = oracle_mask(sets, b, s, n, hkv, block_size)
        for h in range(hq):
            r = h // g
            sc = (q[b, s:e, h].double() @ k[b, s:e, r].double().T) * scale
            sc = sc.masked_fill(~mask[r], float("-inf"))
            lse[b, s:e, h] = torch.logsumexp(sc, -1)
            o[b, s:e, h] = torch.softmax(sc, -1) @ v[b, s:e, r].double()
    return o, lse


def oracle_mask(sets, b, s, n, hkv, block_size):
    """bool (H_kv, n, n) support mask of one sequence (selected blocks, causal)."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if sets is None:
        return causal.expand(hkv, n, n)
    blk = torch.arange(n) // block_size
    mask = torch.zeros(hkv, n, n, dtype=torch.bool)
    for i in range(n):
        for r in range(hkv):
            chosen = torch.tensor(sets[b][s + i][r], dtype=torch.long)
            mask[r, i] = (blk.view(-1, 1) == chosen.view(1, -1)).any(-1)
    return mask & causal


def oracle_kl(q_idx, k_idx, q, k, sets, *, block_size, scale=None, index_scale=None, cu_seqlens=None):
    """Mean over (token, group) of KL(teacher || student), float64, differentiable through q_idx, k_idx."""
    bsz, t, hkv, di = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    index_scale = di ** -0.5 if index_scale is None else index_scale
    total = 0.0
    for b, s, e in spans(bsz, t, cu_seqlens):
        n = e - s
        mask = oracle_mask(sets, b, s, n, hkv, block_size)
        for r in range(hkv):
            st = (q_idx[b, s:e, r].double() @ k_idx[b, s:e].double().T) * index_scale
            logp_idx = torch.log_softmax(st.masked_fill(~mask[r], float("-inf")), -1)
            p = 0
            for h in range(r * g, (r + 1) * g):
                sc = (q[b, s:e, h].detach().double() @ k[b, s:e, r].detach().double().T) * scale
                p = p + torch.softmax(sc.masked_fill(~mask[r], float("-inf")), -1) / g
            term = torch.where(mask[r], p * (torch.log(p.clamp_min(1e-300)) - logp_idx.masked_fill(~mask[r], 0)),
                               torch.zeros_like(p))
            total = total + term.sum()
    return total / (bsz * t * hkv)


def selection_sets(block_indices: torch.Tensor):
    """int32 (B, T, H, K) -> sets[b][t][r] = sorted valid ids; also checks the index convention."""
    bsz, t, h, kk = block_indices.shape
    out = [[None] * t for _ in range(bsz)]
    bi = block_indices.tolist()
    for b in range(bsz):
        for i in range(t):
            out[b][i] = [sorted(x for x in bi[b][i][r] if x >= 0) for r in range(h)]
    return out
