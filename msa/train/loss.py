"""The training loss of ``msa train``: next-token LM loss on packed windows plus lambda times the
sum of the MSA layers' KL, with per-layer KL values for the log, and the ablation whose KL teacher
is not detached (so the KL also moves the backbone's q and k)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..evals.capture import capture_msa_layers
from ..ops.common import check, positions_in_sequence, query_chunk, sequence_spans
from ..ops.sparse_attention.reference import allowed_keys
from .config import KL_TARGETS


def shifted_targets(input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """int64 (B, T-1) next-token targets; -100 where the next token starts another sequence."""
    targets = input_ids[:, 1:].clone()
    if cu_seqlens is not None:
        ends = cu_seqlens[1:-1].to(torch.int64) - 1
        targets[0, ends] = -100
    return targets


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the shifted input_ids (B, T) within sequences."""
    targets = shifted_targets(input_ids, cu_seqlens)
    lg = logits[:, :-1]
    out = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                          reduction=reduction)
    return out if reduction == "mean" else out.view(targets.shape)


def _kl_chunk_with_teacher_grad(q_idx, k_idx, q, k, allowed, scale: float, index_scale: float):
    """Like the reference KL chunk, but the teacher keeps its graph: q (C, H_kv, G, D), k (N, H_kv, D)."""
    neg = float("-inf")
    s = torch.einsum("crd,jd->crj", q_idx.float(), k_idx.float()) * index_scale
    log_student = torch.log_softmax(s.masked_fill(~allowed, neg), dim=-1)
    t = torch.einsum("crgd,jrd->crgj", q.float(), k.float()) * scale
    teacher = torch.softmax(t.masked_fill(~allowed.unsqueeze(2), neg), dim=-1).mean(dim=2)
    log_teacher = torch.log(teacher.clamp_min(torch.finfo(torch.float32).tiny))
    terms = teacher * (log_teacher - log_student.masked_fill(~allowed, 0.0))
    return torch.where(teacher > 0, terms, torch.zeros_like(terms)).sum()


def kl_teacher_not_detached(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            block_indices: Optional[torch.Tensor], *, block_size: int, scale: float,
                            index_scale: float, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(p || p_idx) of msa.indexer_kl_loss (same support and normalisation: mean over tokens and
    groups), but differentiable with respect to the teacher's q (B, T, H_q, D) and k (B, T, H_kv, D)
    as well as q_idx (B, T, H_kv, D_idx) and k_idx (B, T, D_idx). block_indices: int32
    (B, T, H_kv, topk) or None (warmup support). Pure PyTorch, chunked and checkpointed (memory
    O(chunk x T)); an ablation only, not a fast path. Returns an fp32 scalar."""
    bsz, t, hkv, _ = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    total = q_idx.new_zeros((), dtype=torch.float32)
    for b, s0, e0 in sequence_spans(bsz, t, cu_seqlens):
        n = e0 - s0
        chunk = query_chunk(hq + hkv, n)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            pos = torch.arange(c0, c1, device=q.device)
            bi = None if block_indices is None else block_indices[b, s0 + c0:s0 + c1]
            allowed = allowed_keys(bi, pos, c1, block_size)
            args = (q_idx[b, s0 + c0:s0 + c1], k_idx[b, s0:s0 + c1],
                    q[b, s0 + c0:s0 + c1].reshape(c1 - c0, hkv, hq // hkv, d), k[b, s0:s0 + c1], allowed)
            if torch.is_grad_enabled():
                total = total + checkpoint(_kl_chunk_with_teacher_grad, *args, scale, index_scale, use_reentrant=False)
            else:
                total = total + _kl_chunk_with_teacher_grad(*args, scale, index_scale)
    return total / (bsz * t * hkv)


def _teacher_block_mass(q, k, allowed, block_size: int, scale: float) -> torch.Tensor:
    """fp32 (C, H_kv, NB): the teacher's causal attention, averaged over the group's heads, summed per key
    block; q (C, H_kv, G, D), k (N, H_kv, D) (no gradient), allowed bool (C, 1, N) (``allowed_keys``)."""
    num_keys = k.shape[0]
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores even inside the training autocast
        t = torch.einsum("crgd,jrd->crgj", q.float(), k.float()) * scale
    teacher = torch.softmax(t.masked_fill(~allowed.unsqueeze(2), float("-inf")), dim=-1).mean(dim=2)
    nb = math.ceil(num_keys / block_size)
    return F.pad(teacher, (0, nb * block_size - num_keys)).view(*teacher.shape[:2], nb, block_size).sum(-1)


def _block_max_kl_chunk(q_idx, k_idx, mass, allowed, block_size: int, index_scale: float) -> torch.Tensor:
    """The block-max KL summed over one chunk: q_idx (C, H_kv, D_idx), k_idx (N, D_idx), mass (C, H_kv, NB)
    from _teacher_block_mass, allowed bool (C, 1, N)."""
    neg = float("-inf")
    num_keys, nb = k_idx.shape[0], mass.shape[-1]
    with torch.autocast(q_idx.device.type, enabled=False):  # fp32 scores: the KL ranks blocks by them
        s = torch.einsum("crd,jd->crj", q_idx.float(), k_idx.float()) * index_scale
    s = F.pad(s.masked_fill(~allowed, neg), (0, nb * block_size - num_keys), value=neg)
    log_student = torch.log_softmax(s.view(*s.shape[:2], nb, block_size).amax(-1), dim=-1)  # blocks ahead: -inf
    terms = mass * (torch.log(mass.clamp_min(torch.finfo(torch.float32).tiny)) - log_student.clamp_min(-1e30))
    return torch.where(mass > 0, terms, torch.zeros_like(terms)).sum()


def kl_block_max(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                 scale: float, index_scale: float, cu_seqlens: Optional[torch.Tensor] = None,
                 rows_per_sequence: int = 0) -> torch.Tensor:
    """``phase.kl_target="block_max"``: KL(P || softmax(m)) per query and group, averaged over tokens and
    groups (as ``msa.indexer_kl_loss``), where over the query's causal blocks b
        m_b = max_{j in b, j <= i} q_idx_i . k_idx_j * index_scale   (the index's block score, what top-k ranks)
        P_b = sum_{j in b} p_ij                                      (the teacher's block mass)
    and p is the main branch's causal attention averaged over the group's G heads. Only q_idx
    (B, T, H_kv, D_idx) and k_idx (B, T, D_idx) receive gradients (through each block's argmax key);
    q (B, T, H_q, D) and k (B, T, H_kv, D) are detached. Pure PyTorch, chunked and checkpointed
    (memory O(chunk x T)). Equivalent, for one query i of group r in a sequence of length T:

        s = (q_idx[i, r] @ k_idx[:i+1].T) * index_scale
        m = stack([s[b*B:(b+1)*B].max() for b in range(i // B + 1)])
        p = softmax(q[i, r*G:(r+1)*G] @ k[:i+1, r].T * scale, -1).mean(0)
        P = stack([p[b*B:(b+1)*B].sum() for b in range(i // B + 1)])
        kl_i = (P * (P.log() - log_softmax(m, 0))).sum()
    rows_per_sequence R > 0: only R query positions per sequence, drawn uniformly without replacement
    (torch's global RNG, which checkpoints save), each weighted n / R for a sequence of n tokens: an
    unbiased estimate of the same mean at about R / n of the cost. Returns an fp32 scalar."""
    check(rows_per_sequence >= 0, f"rows_per_sequence must be >= 0, got {rows_per_sequence}")
    bsz, t, hkv, _ = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    q, k = q.detach(), k.detach()
    total = q_idx.new_zeros((), dtype=torch.float32)
    for b, s0, e0 in sequence_spans(bsz, t, cu_seqlens):
        n = e0 - s0
        picked = torch.arange(n)
        if 0 < rows_per_sequence < n:
            picked = torch.randperm(n)[:rows_per_sequence].sort().values
        weight = n / picked.numel()
        chunk = query_chunk(hq + hkv, n)
        for c0 in range(0, picked.numel(), chunk):
            keys = int(picked[min(c0 + chunk, picked.numel()) - 1]) + 1  # the chunk's largest position + 1
            pos = picked[c0:c0 + chunk].to(q.device)
            rows = s0 + pos
            allowed = allowed_keys(None, pos, keys, block_size)  # (C, 1, keys): full causal support
            with torch.no_grad():  # the teacher is detached: computed once, outside the checkpoint
                mass = _teacher_block_mass(q[b, rows].reshape(pos.numel(), hkv, hq // hkv, d),
                                           k[b, s0:s0 + keys], allowed, block_size, scale)
            args = (q_idx[b, rows], k_idx[b, s0:s0 + keys], mass, allowed, block_size, index_scale)
            part = (checkpoint(_block_max_kl_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else _block_max_kl_chunk(*args))
            total = total + part * weight
    return total / (bsz * t * hkv)


def kl_sampled_rows(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    block_indices: Optional[torch.Tensor], rows: torch.Tensor, *, block_size: int, scale: float,
                    index_scale: float, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The KL of kl_teacher_not_detached averaged over only the query positions ``rows`` (int64
    (R,), flat indices into B * T), an unbiased estimate of the full mean when the rows are drawn
    uniformly. Same shapes as kl_teacher_not_detached; differentiable in all four inputs."""
    bsz, t, hkv, _ = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    total = q_idx.new_zeros((), dtype=torch.float32)
    rows = rows.to(q.device)
    for b, s0, e0 in sequence_spans(bsz, t, cu_seqlens):
        flat0 = b * t + s0
        mine = rows[(rows >= flat0) & (rows < b * t + e0)] - flat0
        if mine.numel() == 0:
            continue
        n = int(mine.max()) + 1
        bi = None if block_indices is None else block_indices[b, s0 + mine]
        allowed = allowed_keys(bi, mine, n, block_size)
        args = (q_idx[b, s0 + mine], k_idx[b, s0:s0 + n], q[b, s0 + mine].reshape(-1, hkv, hq // hkv, d),
                k[b, s0:s0 + n], allowed)
        total = total + checkpoint(_kl_chunk_with_teacher_grad, *args, scale, index_scale, use_reentrant=False)
    return total / (rows.numel() * hkv)


def forward_loss(model: torch.nn.Module, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor], *,
                 kl_weight: float, detach_teacher: bool = True, teacher_grad_rows: int = 0,
                 lm_scale: float = 1.0, kl_support: str = "selected", kl_target: str = "token",
                 kl_rows: int = 0) -> Dict[str, object]:
    """One forward of ``model`` (an MSAForCausalLM, possibly wrapped for data parallelism) on a packed
    batch input_ids int64 (1, N) with cu_seqlens int32 (S+1,) (or (B, T) without).

    Returns {"loss": L_LM + kl_weight * sum_l KL_l (scalar tensor with graph), "lm_loss", "kl_loss"
    (detached scalars), "layer_kl": {layer index: detached fp32 scalar}}. kl_weight 0 skips the KL.
    detach_teacher False (the ablation) lets the KL's gradient reach the teacher's q and k: exactly,
    with a PyTorch KL over every query (teacher_grad_rows 0; memory and time O(T^2) per layer), or,
    with teacher_grad_rows R > 0, the model's own fast KL (value and index gradients unchanged) plus
    a term whose value is 0 and whose gradient is an unbiased estimate of the teacher's share from
    R query positions drawn uniformly (torch's global RNG, which checkpoints save).
    lm_scale multiplies the LM term of "loss" (not the reported lm_loss): data parallelism weights
    each rank's token mean by its share of the global micro-batch's targets. kl_support "full": the
    sparse layers' KL over every causal token (``MSAForCausalLM.forward``); only with the detached
    teacher (the ablation paths build their teacher over the selection). kl_target "block_max": each
    MSA layer's KL is ``kl_block_max`` instead (re-projecting q, k, q_idx and k_idx from the layer's
    captured input; detached teacher only), on kl_rows sampled query positions per sequence when > 0."""
    want_kl = kl_weight > 0
    check(kl_support == "selected" or detach_teacher,
          "kl_support='full' needs detach_teacher=True (phase.full_kl_every with phase.kl_detach_teacher)")
    check(kl_target in KL_TARGETS, f"kl_target must be one of {KL_TARGETS}, got {kl_target!r}")
    check(kl_target == "token" or detach_teacher, "kl_target='block_max' needs detach_teacher=True")
    block_max = want_kl and kl_target == "block_max"
    exact_nd = want_kl and not detach_teacher and teacher_grad_rows <= 0
    with capture_msa_layers(model, keep_input=want_kl and (not detach_teacher or block_max)) as recs:
        out = model(input_ids, cu_seqlens=cu_seqlens, compute_kl=want_kl and not exact_nd and not block_max,
                    kl_support=kl_support)
    lm = lm_loss(out.logits, input_ids, cu_seqlens)
    lm_term = lm if lm_scale == 1.0 else lm * lm_scale
    layer_kl: Dict[int, torch.Tensor] = {}
    if block_max:
        for r in recs:
            layer_kl[r.layer] = _recompute_block_max_kl(r, kl_rows)
    elif exact_nd:
        for r in recs:
            layer_kl[r.layer] = _recompute_kl(r)
    elif want_kl:
        rows = None
        if not detach_teacher:
            n = input_ids.numel()
            rows = torch.randperm(n)[:min(teacher_grad_rows, n)].sort().values
        for r in recs:
            if r.kl is not None:
                layer_kl[r.layer] = r.kl if rows is None else r.kl + _teacher_term(r, rows)
    kl = torch.stack(list(layer_kl.values())).sum() if layer_kl else lm.new_zeros(())
    loss = lm_term + kl_weight * kl if want_kl else lm_term
    return {"loss": loss, "lm_loss": lm.detach(), "kl_loss": kl.detach(),
            "layer_kl": {i: v.detach() for i, v in layer_kl.items()}}


def _reproject(r):
    """q, k, q_idx, k_idx re-projected from a captured layer's input, with its KL's scales as keywords."""
    attn, c = r.attn, r.attn.config
    b, t, _ = r.x.shape
    pos = positions_in_sequence(t, r.cu_seqlens, r.x.device).view(1, t).expand(b, t)
    q, k, _, q_idx, k_idx = attn.project(r.x, pos)
    kw = dict(block_size=c.block_size, scale=c.head_dim ** -0.5, index_scale=c.index_dim ** -0.5,
              cu_seqlens=r.cu_seqlens)
    return q, k, q_idx, k_idx, kw


def _recompute_kl(r) -> torch.Tensor:
    """The layer's KL with a non-detached teacher, from its captured input (re-projecting q, k)."""
    q, k, q_idx, k_idx, kw = _reproject(r)
    return kl_teacher_not_detached(q_idx, k_idx, q, k, r.block_indices, **kw)


def _recompute_block_max_kl(r, rows_per_sequence: int) -> torch.Tensor:
    """The layer's block-max KL from its captured input (the teacher's q and k detached)."""
    q, k, q_idx, k_idx, kw = _reproject(r)
    return kl_block_max(q_idx, k_idx, q, k, rows_per_sequence=rows_per_sequence, **kw)


def _teacher_term(r, rows: torch.Tensor) -> torch.Tensor:
    """0 in value; its gradient is the sampled estimate of d KL / d (q, k) through the teacher."""
    q, k, q_idx, k_idx, kw = _reproject(r)
    est = kl_sampled_rows(q_idx.detach(), k_idx.detach(), q, k, r.block_indices, rows, **kw)
    return est - est.detach()


def layer_kl_floats(layer_kl: Dict[int, torch.Tensor]) -> List[float]:
    return [float(layer_kl[i]) for i in sorted(layer_kl)]
