"""PyTorch reference of the block-max KL (``phase.kl_target="block_max"``): chunked and checkpointed,
memory O(chunk x T), fp32 scores."""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..common import query_chunk, reference_math, sequence_spans
from ..sparse_attention.reference import allowed_keys


def teacher_block_mass(q, k, allowed, block_size: int, scale: float) -> torch.Tensor:
    """fp32 (C, H_kv, NB): the teacher's causal attention, averaged over the group's heads, summed per key
    block; q (C, H_kv, G, D), k (N, H_kv, D) (no gradient), allowed bool (C, 1, N) (``allowed_keys``)."""
    num_keys = k.shape[0]
    t = torch.einsum("crgd,jrd->crgj", q.float(), k.float()) * scale
    teacher = torch.softmax(t.masked_fill(~allowed.unsqueeze(2), float("-inf")), dim=-1).mean(dim=2)
    nb = math.ceil(num_keys / block_size)
    return F.pad(teacher, (0, nb * block_size - num_keys)).view(*teacher.shape[:2], nb, block_size).sum(-1)


def block_kl(mass: torch.Tensor, log_student: torch.Tensor) -> torch.Tensor:
    """sum of P (log P - log_student) over the entries where P > 0 (fp32 (..., NB) each)."""
    terms = mass * (torch.log(mass.clamp_min(torch.finfo(torch.float32).tiny)) - log_student.clamp_min(-1e30))
    return torch.where(mass > 0, terms, torch.zeros_like(terms)).sum()


def _student_chunk(q_idx, k_idx, mass, allowed, block_size: int, index_scale: float) -> torch.Tensor:
    """The block-max KL summed over one chunk: q_idx (C, H_kv, D_idx), k_idx (N, D_idx), mass (C, H_kv, NB)
    from teacher_block_mass, allowed bool (C, 1, N)."""
    neg = float("-inf")
    num_keys, nb = k_idx.shape[0], mass.shape[-1]
    s = torch.einsum("crd,jd->crj", q_idx.float(), k_idx.float()) * index_scale
    s = F.pad(s.masked_fill(~allowed, neg), (0, nb * block_size - num_keys), value=neg)
    log_student = torch.log_softmax(s.view(*s.shape[:2], nb, block_size).amax(-1), dim=-1)  # blocks ahead: -inf
    return block_kl(mass, log_student)


@reference_math
def block_max_kl_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           rows: List[torch.Tensor], *, block_size: int, scale: float, index_scale: float,
                           cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``msa.block_max_kl_loss`` in PyTorch. rows: one int64 CPU tensor per sequence (``sequence_spans``
    order) of the sorted query positions (within the sequence) the loss is taken over; each row is
    weighted n / len(rows) for a sequence of n tokens. Gradients reach q_idx and k_idx only."""
    bsz, t, hkv, _ = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    q, k = q.detach(), k.detach()
    total = q_idx.new_zeros((), dtype=torch.float32)
    for (b, s0, e0), picked in zip(sequence_spans(bsz, t, cu_seqlens), rows):
        weight = (e0 - s0) / picked.numel()
        chunk = query_chunk(hq + hkv, e0 - s0)
        for c0 in range(0, picked.numel(), chunk):
            keys = int(picked[min(c0 + chunk, picked.numel()) - 1]) + 1  # the chunk's largest position + 1
            pos = picked[c0:c0 + chunk].to(q.device)
            at = s0 + pos
            allowed = allowed_keys(None, pos, keys, block_size)  # (C, 1, keys): full causal support
            with torch.no_grad():  # the teacher is detached: computed once, outside the checkpoint
                mass = teacher_block_mass(q[b, at].reshape(pos.numel(), hkv, hq // hkv, d),
                                          k[b, s0:s0 + keys], allowed, block_size, scale)
            args = (q_idx[b, at], k_idx[b, s0:s0 + keys], mass, allowed, block_size, index_scale)
            part = (checkpoint(_student_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else _student_chunk(*args))
            total = total + part * weight
    return total / (bsz * t * hkv)
