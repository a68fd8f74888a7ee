"""Triton implementation of the indexer KL loss (``msa.indexer_kl_loss(..., backend="triton")``).

Forward (query-outer): optional teacher-lse pass, then one pass that produces the per-(token, group)
KL, the student log-sum-exp and, when gradients are needed, dq_idx. Backward (key-outer): dk_idx,
recomputing teacher and student probabilities tile by tile, deterministic (fixed-order reductions).
Kernels and math: ``triton_kernels.py``. Gradients flow to q_idx and k_idx only (spec section 2).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..sparse_attention.reverse_index import build_reverse_index
from ..sparse_attention.triton_bwd import (_compute_dtype, _dot_precision, _interpreting, _pow2,
                                           token_seq_start)
from .triton_kernels import (indexer_kl_bwd_dense_dk_kernel, indexer_kl_bwd_sparse_dk_kernel,
                             indexer_kl_bwd_sparse_reduce_kernel, indexer_kl_fwd_dense_kernel,
                             indexer_kl_fwd_lse_dense_kernel, indexer_kl_fwd_lse_sparse_kernel,
                             indexer_kl_fwd_sparse_kernel)


def _dense_tiles(d: int, di: int):
    if _interpreting():
        return 16, 16, 4
    big = max(d, di) > 64
    return 64, 64 if big else 128, 8 if big else 4


def teacher_lse_triton(q: torch.Tensor, k: torch.Tensor, block_indices: Optional[torch.Tensor], *, block_size: int,
                       scale: float, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 (B, T, H_q): each head's natural-log lse of q.k*scale over the KL support (selected blocks
    with j <= i, or every causal j <= i when block_indices is None). Equals the lse of
    ``msa.sparse_attention(..., return_lse=True)`` (sparse) or of dense causal attention (warmup)."""
    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    ntok = bsz * t
    q, k = q.contiguous(), k.contiguous()
    seq_start = token_seq_start(bsz, t, cu_seqlens, q.device)
    lse = torch.empty((bsz, t, hq), dtype=torch.float32, device=q.device)
    cdt, prec = _compute_dtype(q.dtype), _dot_precision(q.dtype)
    if block_indices is not None:
        bi = block_indices.to(torch.int32).contiguous()
        indexer_kl_fwd_lse_sparse_kernel[(ntok, hkv)](
            q, k, bi, seq_start, lse, float(scale), hq, hkv, bi.shape[3], block_size, G=g, D=d, BLOCK_G=_pow2(g),
            BLOCK_N=_pow2(block_size), BLOCK_D=_pow2(d), CDT=cdt, DOT_PREC=prec, num_warps=4)
    else:
        bq, bn, nw = _dense_tiles(d, d)
        indexer_kl_fwd_lse_dense_kernel[(triton.cdiv(ntok, bq), hq)](
            q, k, seq_start, lse, float(scale), ntok, hq, hkv, G=g, D=d, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=_pow2(d),
            CDT=cdt, DOT_PREC=prec, num_warps=nw)
    return lse


class IndexerKLTriton(torch.autograd.Function):
    """Loss forward + dq_idx (query-outer); backward computes dk_idx (key-outer) and scales both."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, q, k, block_indices, teacher_lse, block_size, scale, index_scale, cu_seqlens,
                max_queries_per_item):
        bsz, t, hkv, di = q_idx.shape
        hq, d = q.shape[2], q.shape[3]
        g = hq // hkv
        ntok = bsz * t
        dev = q_idx.device
        q_idx, k_idx, q, k = (x.detach().contiguous() for x in (q_idx, k_idx, q, k))
        with_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        if teacher_lse is None:
            teacher_lse = teacher_lse_triton(q, k, block_indices, block_size=block_size, scale=scale,
                                             cu_seqlens=cu_seqlens)
        lse_t = teacher_lse.detach().float().contiguous()
        seq_start = token_seq_start(bsz, t, cu_seqlens, dev)
        n_rows = ntok * hkv
        inv_n = 1.0 / n_rows
        kl = torch.empty(n_rows, dtype=torch.float32, device=dev)
        lse_s = torch.empty(n_rows, dtype=torch.float32, device=dev)
        dq_idx = torch.empty_like(q_idx) if with_grad else kl  # dummy pointer when unused
        cdt = _compute_dtype(q.dtype)
        prec = _dot_precision(q.dtype)
        if block_indices is not None:
            bi = block_indices.to(torch.int32).contiguous()
            indexer_kl_fwd_sparse_kernel[(ntok, hkv)](
                q_idx, k_idx, q, k, bi, seq_start, lse_t, kl, lse_s, dq_idx, float(scale), float(index_scale), inv_n,
                hq, hkv, bi.shape[3], block_size, G=g, D=d, DI=di, BLOCK_G=_pow2(g), BLOCK_N=_pow2(block_size),
                BLOCK_D=_pow2(d), BLOCK_DI=_pow2(di), CDT=cdt, DOT_PREC=prec, WITH_GRAD=with_grad,
                num_warps=4 if _interpreting() or _pow2(block_size) * _pow2(di) <= 4096 else 8)
        else:
            bi = None
            bq, bn, nw = _dense_tiles(d, di)
            indexer_kl_fwd_dense_kernel[(triton.cdiv(ntok, bq), hkv)](
                q_idx, k_idx, q, k, seq_start, lse_t, kl, lse_s, dq_idx, float(scale), float(index_scale), inv_n,
                ntok, hq, hkv, G=g, D=d, DI=di, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DI=_pow2(di),
                CDT=cdt, DOT_PREC=prec, WITH_GRAD=with_grad, num_warps=nw)
        loss = kl.sum() * inv_n  # fixed-order torch reduction: deterministic
        if with_grad:
            ctx.save_for_backward(q_idx, k_idx, q, k, bi, lse_t, lse_s, dq_idx)
        ctx.meta = (block_size, float(scale), float(index_scale), cu_seqlens, max_queries_per_item)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        q_idx, k_idx, q, k, bi, lse_t, lse_s, dq_idx = ctx.saved_tensors
        block_size, scale, index_scale, cu_seqlens, c = ctx.meta
        dk_idx = None
        if ctx.needs_input_grad[1]:
            dk_idx = indexer_kl_dk_triton(q_idx, k_idx, q, k, bi, lse_t, lse_s, block_size=block_size, scale=scale,
                                          index_scale=index_scale, cu_seqlens=cu_seqlens, max_queries_per_item=c)
            dk_idx = (dk_idx * grad_out).to(k_idx.dtype)
        dq = (dq_idx.float() * grad_out).to(q_idx.dtype) if ctx.needs_input_grad[0] else None
        return dq, dk_idx, None, None, None, None, None, None, None, None, None


def indexer_kl_dk_triton(q_idx, k_idx, q, k, block_indices, lse_t, lse_s, *, block_size, scale, index_scale,
                         cu_seqlens, max_queries_per_item=None) -> torch.Tensor:
    """dLoss/dk_idx (B, T, D_idx) in fp32 for a unit upstream gradient. lse_t: fp32 (B*T*H_q,) teacher lse;
    lse_s: fp32 (B*T*H_kv,) student lse from the forward kernel."""
    bsz, t, hkv, di = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    g = hq // hkv
    ntok = bsz * t
    dev = q_idx.device
    inv_n = 1.0 / (ntok * hkv)
    cdt, prec = _compute_dtype(q.dtype), _dot_precision(q.dtype)
    if block_indices is None:
        seq_start = token_seq_start(bsz, t, cu_seqlens, dev).to(torch.int64)
        # one past the last token of each token's own sequence
        if cu_seqlens is None:
            seq_end = (seq_start + t).to(torch.int32)
        else:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            seq_end = cu[torch.searchsorted(cu[1:], torch.arange(ntok, device=dev), right=True) + 1].to(torch.int32)
        bq, bn, nw = _dense_tiles(d, di)
        part = torch.empty((hkv, ntok, di), dtype=torch.float32, device=dev)
        indexer_kl_bwd_dense_dk_kernel[(triton.cdiv(ntok, bn), hkv)](
            q_idx, k_idx, q, k, seq_end, lse_t, lse_s, part, float(scale), float(index_scale), ntok, hq, hkv, G=g, D=d,
            DI=di, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DI=_pow2(di), CDT=cdt, DOT_PREC=prec,
            num_warps=nw)
        dk = part[0].clone()
        for r in range(1, hkv):  # fixed order over groups
            dk += part[r]
        return (dk * (index_scale * inv_n)).view(bsz, t, di)
    nsel = block_indices.shape[3]
    c = max_queries_per_item or max(64, 2 * nsel * block_size)
    ri = build_reverse_index(block_indices, block_size, cu_seqlens, c)
    nb = ri.layout.num_blocks
    counts = (ri.row_ptr[1:] - ri.row_ptr[:-1]).to(torch.int64)
    items = (counts + c - 1) // c
    first = torch.cumsum(items, 0) - items
    n_items = ri.work_row.numel()
    bn, bdi = _pow2(block_size), _pow2(di)
    part = torch.empty((n_items, bn, bdi), dtype=torch.float32, device=dev)
    block_e = 16 if _interpreting() else 64
    indexer_kl_bwd_sparse_dk_kernel[(n_items,)](
        q_idx, k_idx, q, k, lse_t, lse_s, part, ri.entries, ri.work_row, ri.work_start, ri.work_end,
        ri.layout.block_start, ri.layout.block_len, float(scale), float(index_scale), hq, hkv, nsel, nb, G=g, D=d,
        DI=di, BLOCK_E=block_e, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DI=bdi, CDT=cdt, DOT_PREC=prec,
        num_warps=4 if _interpreting() else 8)
    dk = torch.empty((bsz, t, di), dtype=torch.float32, device=dev)
    indexer_kl_bwd_sparse_reduce_kernel[(nb,)](
        part, dk, items.to(torch.int32), first.to(torch.int32), ri.layout.block_start, ri.layout.block_len,
        float(index_scale * inv_n), hkv, nb, DI=di, BLOCK_N=bn, BLOCK_DI=bdi)
    return dk


def indexer_kl_triton(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      block_indices: Optional[torch.Tensor], *, block_size: int, scale: float, index_scale: float,
                      cu_seqlens: Optional[torch.Tensor], teacher_lse: Optional[torch.Tensor] = None,
                      max_queries_per_item: Optional[int] = None) -> torch.Tensor:
    """Mean over (token, group) of KL(teacher || student), differentiable w.r.t. q_idx and k_idx only.

    Args:
        q_idx: (B, T, H_kv, D_idx) float index queries; k_idx: (B, T, D_idx) float index keys.
        q: (B, T, H_q, D), k: (B, T, H_kv, D) main-branch queries/keys (treated as detached: no gradient).
        block_indices: int32 (B, T, H_kv, K) sparse-phase support, or None for the warmup (full causal) support.
        block_size, scale (main softmax scale), index_scale (student logit scale).
        cu_seqlens: optional int32 (S+1,) packed-sequence offsets (then B == 1).
        teacher_lse: optional fp32 (B, T, H_q) per-head natural-log lse of q.k*scale over the SAME support,
            to skip recomputing it: in the sparse phase pass the lse returned by
            ``msa.sparse_attention(q, k, v, block_indices, return_lse=True)``; in warmup pass the dense causal
            attention's logsumexp (e.g. ``torch.ops.aten._scaled_dot_product_flash_attention(...)[1]``,
            which is (B, H_q, T): transpose it to (B, T, H_q)). When None it is computed here.
        max_queries_per_item: hot-row split of the reverse index used by the sparse dk_idx pass.

    Returns:
        fp32 scalar loss; gradient w.r.t. the student logits is (p_idx - p) / (B * T * H_kv).
    """
    return IndexerKLTriton.apply(q_idx, k_idx, q.detach(), k.detach(), block_indices, teacher_lse, block_size, scale,
                                 index_scale, cu_seqlens, max_queries_per_item)
