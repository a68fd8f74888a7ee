"""The training loss of ``msa train``: next-token LM loss on packed windows plus lambda times the
sum of the MSA layers' KL, with per-layer KL values for the log, and the ablation whose KL teacher
is not detached (so the KL also moves the backbone's q and k)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..evals.capture import capture_msa_layers
from ..ops.block_max_kl import block_max_kl_loss
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
    MSA layer's KL is ``msa.block_max_kl_loss`` instead (re-projecting q, k, q_idx and k_idx from the layer's
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
    return block_max_kl_loss(q_idx, k_idx, q, k, rows_per_sequence=rows_per_sequence, backend=r.attn.config.backend,
                             **kw)


def _teacher_term(r, rows: torch.Tensor) -> torch.Tensor:
    """0 in value; its gradient is the sampled estimate of d KL / d (q, k) through the teacher."""
    q, k, q_idx, k_idx, kw = _reproject(r)
    est = kl_sampled_rows(q_idx.detach(), k_idx.detach(), q, k, r.block_indices, rows, **kw)
    return est - est.detach()


def layer_kl_floats(layer_kl: Dict[int, torch.Tensor]) -> List[float]:
    return [float(layer_kl[i]) for i in sorted(layer_kl)]
