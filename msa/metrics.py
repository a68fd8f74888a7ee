"""Indexer quality metrics of the paper (section 5.2; spec section 2).

Per query and group, I* = the topk blocks with the largest attention mass of the main branch's own
(full causal) attention, summed over each block's tokens and averaged over the group's heads:
  block recall = |I* & I| / |I*|,  score recall = mass(I* & I) / mass(I*).
Only queries that see more than topk blocks count (otherwise every block is selected and both are 1).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .ops.common import check_block_args, default_scale, query_chunk, sequence_spans


@torch.no_grad()
def indexer_recall(q: torch.Tensor, k: torch.Tensor, block_indices: torch.Tensor, *, block_size: int,
                   scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   init_blocks: int = 0, local_blocks: int = 1) -> Dict[str, float]:
    """q (B, T, H_q, D), k (B, T, H_kv, D), block_indices int32 (B, T, H_kv, topk).

    Returns {"block_recall", "score_recall", "selected_mass", "teacher_entropy", "top_half_recall",
    "oracle_mass", "max_rule_recall", "queries"} averaged over (query, group) pairs that see more than topk blocks
    ("queries" counts those pairs; 0 means nothing to measure and recalls of 1). selected_mass: the
    share of the group-averaged causal attention that falls in the selected blocks (what the sparse
    main branch keeps; score_recall divides the mass of the blocks both pick by the best top-k's).
    teacher_entropy: the entropy in nats of that attention over the keys, which falls as the main
    branch sharpens (the sparse-phase KL can rise for that reason alone). top_half_recall: the share
    of the best ceil(topk / 2) blocks that the selection holds (are the misses of block_recall the
    heavy blocks or the marginal ones?); oracle_mass: the share the best topk blocks hold (the most
    any selection can keep: a diffuse teacher caps it). max_rule_recall: the block recall of a perfect
    student (index token distribution = the teacher's) under the selection rule: blocks ranked by
    their MAX token probability, the first init_blocks and the last local_blocks (own block included)
    always kept; how much of block recall the rule itself gives up, whatever the index learns."""
    bsz, t, hq, d = q.shape
    hkv, topk = k.shape[2], block_indices.shape[-1]
    check_block_args(block_size, topk, init_blocks, local_blocks)
    g = hq // hkv
    scale = default_scale(scale, d)
    br_sum = sr_sum = sm_sum = ent_sum = half_sum = om_sum = rule_sum = 0.0
    half = (topk + 1) // 2
    count = 0
    for b, s, e in sequence_spans(bsz, t, cu_seqlens):
        n = e - s
        nb = math.ceil(n / block_size)
        chunk = query_chunk(hq, n)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            pos = torch.arange(c0, c1, device=q.device)
            keep = pos // block_size + 1 > topk
            if not bool(keep.any()):
                continue
            sc = torch.einsum("crgd,jrd->crgj", q[b, s + c0:s + c1].float().view(c1 - c0, hkv, g, d),
                              k[b, s:s + c1].float()) * scale
            j = torch.arange(c1, device=q.device)
            sc = sc.masked_fill(j.view(1, 1, 1, -1) > pos.view(-1, 1, 1, 1), float("-inf"))
            p = torch.softmax(sc, -1).mean(2)  # (C, H_kv, c1): group-averaged attention
            pad = nb * block_size - c1
            tiles = torch.nn.functional.pad(p, (0, pad)).view(c1 - c0, hkv, nb, block_size)
            mass = tiles.sum(-1)
            # the perfect student under the rule: max-pooled teacher probabilities, forced blocks first
            peak = tiles.amax(-1)
            own = (pos // block_size).view(-1, 1, 1)
            blk = torch.arange(nb, device=q.device).view(1, 1, -1)
            forced = (blk < init_blocks) | ((blk <= own) & (blk > own - local_blocks))
            peak = torch.where(forced, torch.full_like(peak, 2.0), peak)
            rule = torch.zeros_like(mass, dtype=torch.bool).scatter_(2, peak.topk(min(topk, nb), -1).indices, True)
            order = mass.topk(min(topk, nb), -1).indices  # descending mass
            star = torch.zeros_like(mass, dtype=torch.bool).scatter_(2, order, True)
            head = torch.zeros_like(mass, dtype=torch.bool).scatter_(2, order[..., :half], True)
            idx = block_indices[b, s + c0:s + c1].long()
            sel = torch.zeros(c1 - c0, hkv, nb + 1, dtype=torch.bool, device=q.device)
            sel.scatter_(2, torch.where(idx >= 0, idx, torch.full_like(idx, nb)), True)
            sel = sel[..., :nb]
            both = star & sel
            br = both.sum(-1).float() / star.sum(-1).float()
            om = (mass * star).sum(-1)
            sr = (mass * both).sum(-1) / om
            sm = (mass * sel).sum(-1)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            hr = (head & sel).sum(-1).float() / head.sum(-1).float()
            rr = (star & rule).sum(-1).float() / star.sum(-1).float()
            br_sum += float(br[keep].sum())
            sr_sum += float(sr[keep].sum())
            sm_sum += float(sm[keep].sum())
            ent_sum += float(ent[keep].sum())
            half_sum += float(hr[keep].sum())
            om_sum += float(om[keep].sum())
            rule_sum += float(rr[keep].sum())
            count += int(keep.sum()) * hkv
    if count == 0:
        return {"block_recall": 1.0, "score_recall": 1.0, "selected_mass": 1.0, "teacher_entropy": 0.0,
                "top_half_recall": 1.0, "oracle_mass": 1.0, "max_rule_recall": 1.0, "queries": 0}
    return {"block_recall": br_sum / count, "score_recall": sr_sum / count, "selected_mass": sm_sum / count,
            "teacher_entropy": ent_sum / count, "top_half_recall": half_sum / count, "oracle_mass": om_sum / count,
            "max_rule_recall": rule_sum / count, "queries": count}
