"""Public interface of the indexer alignment loss: ``msa.indexer_kl_loss``."""

from __future__ import annotations

from typing import Optional

import torch

from . import custom_ops  # noqa: F401  (registers torch.ops.msa.indexer_kl_fwd)
from ..common import (check, check_backend, check_cu_seqlens, check_float, check_positive_int, check_tensor,
                      default_scale, load_triton_impl, resolve_backend)
from ..sparse_attention.interface import check_block_indices, check_own_block
from .reference import indexer_kl_reference


class IndexerKLTriton(torch.autograd.Function):
    """Both phases compute the loss, dq_idx and dk_idx in the forward (the teacher is built there
    anyway); the backward only scales them by grad_out. Without a plan (e.g. under torch.compile) the
    forward goes through the ``msa::indexer_kl_fwd`` custom op."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, q, k, block_indices, teacher_lse, block_size, scale, index_scale, cu_seqlens,
                max_queries_per_item, plan):
        with_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.qi_dtype, ctx.ki_dtype = q_idx.dtype, k_idx.dtype
        if plan is None and max_queries_per_item is None:
            loss, dq_idx, dk_idx = torch.ops.msa.indexer_kl_fwd(
                q_idx.detach(), k_idx.detach(), q.detach(), k.detach(), block_indices,
                None if teacher_lse is None else teacher_lse.detach(), block_size, scale, index_scale, cu_seqlens,
                with_grad)
        else:  # eager with a shared SelectionPlan (or a custom work-item size): call the launcher directly
            from .triton_impl import indexer_kl_forward
            loss, dq_idx, dk_idx = indexer_kl_forward(
                q_idx, k_idx, q, k, block_indices, teacher_lse, block_size=block_size, scale=scale,
                index_scale=index_scale, cu_seqlens=cu_seqlens, with_grad=with_grad,
                max_queries_per_item=max_queries_per_item, plan=plan)
        if with_grad:
            ctx.save_for_backward(dq_idx, dk_idx)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dq_idx, dk_idx = ctx.saved_tensors
        dq = (dq_idx * grad_out).to(ctx.qi_dtype) if ctx.needs_input_grad[0] else None
        dk = (dk_idx * grad_out).to(ctx.ki_dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None, None, None, None, None, None, None, None


def check_kl_inputs(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """Shapes and dtypes of an index-alignment loss's inputs (``indexer_kl_loss``, ``block_max_kl_loss``):
    q_idx (B, T, H_kv, D_idx), k_idx (B, T, D_idx), q (B, T, H_q, D), k (B, T, H_kv, D), floats, T >= 1."""
    check_tensor("q_idx", q_idx, 4, "(B, T, H_kv, D_idx)")
    check_tensor("k_idx", k_idx, 3, "(B, T, D_idx)")
    check_tensor("q", q, 4, "(B, T, H_q, D)")
    check_tensor("k", k, 4, "(B, T, H_kv, D)")
    for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("q", q), ("k", k)):
        check_float(name, x)
    bsz, t, hkv, di = q_idx.shape
    check(k_idx.shape == (bsz, t, di), f"k_idx must have shape (B, T, D_idx) = {(bsz, t, di)}, got {tuple(k_idx.shape)}")
    check(q.shape[:2] == (bsz, t), f"q must have shape (B, T, H_q, D) with (B, T) = {(bsz, t)}, got {tuple(q.shape)}")
    check(k.shape[:3] == (bsz, t, hkv) and k.shape[3] == q.shape[3],
          f"k must have shape (B, T, H_kv, D) = {(bsz, t, hkv, q.shape[3])}, got {tuple(k.shape)}")
    check(q.shape[2] % hkv == 0, f"H_q ({q.shape[2]}) must be divisible by H_kv ({hkv})")
    check(t > 0, "q_idx must hold at least one token (T >= 1)")
    check_positive_int("block_size", block_size)


def indexer_kl_loss(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    block_indices: Optional[torch.Tensor] = None, *, block_size: int = 128,
                    scale: Optional[float] = None, index_scale: Optional[float] = None,
                    cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto",
                    teacher_lse: Optional[torch.Tensor] = None, validate: bool = True,
                    plan=None) -> torch.Tensor:
    """Per-layer KL between the main branch's attention (teacher) and the indexer's (student).

    Args:
        q_idx: (B, T, H_kv, D_idx) index queries (receive gradients).
        k_idx: (B, T, D_idx) shared index keys (receive gradients).
        q: (B, T, H_q, D) main-branch queries; treated as detached.
        k: (B, T, H_kv, D) main-branch keys; treated as detached.
        block_indices: int32 (B, T, H_kv, topk) selection defining the sparse-phase support, or None
            for the warmup support (every causal key j <= i).
        block_size: tokens per key block.
        scale: main attention scale, default D ** -0.5.
        index_scale: index score scale, default D_idx ** -0.5.
        cu_seqlens: optional int32 (S+1,) offsets of packed sequences (then B must be 1).
        backend: "auto", "reference" or "triton".
        teacher_lse: optional fp32 (B, T, H_q) per-head natural-log log-sum-exp of q.k*scale over the
            SAME support, so the Triton backend does not recompute it: in the sparse phase the lse of
            ``msa.sparse_attention(q, k, v, block_indices, return_lse=True)``; in warmup the dense causal
            attention's logsumexp transposed to (B, T, H_q) (e.g. from
            ``torch.ops.aten._scaled_dot_product_cudnn_attention(..., compute_log_sumexp=True)``).
            Treated as a constant. The reference backend ignores it (it recomputes the teacher exactly).
        validate: check block_indices' and cu_seqlens' values (one host sync); callers that made them
            (the MSA layer) pass False. Shapes, dtypes and devices are always checked.
        plan: optional ``SelectionPlan`` of block_indices shared with ``msa.sparse_attention`` (Triton
            backend; its chunking and reverse indices are reused).

    Returns:
        fp32 scalar: mean over all tokens and groups of KL(p || p_idx). Its gradient w.r.t. the
        student logits is (p_idx - p) / (B * T * H_kv).

    Equivalent PyTorch (one sequence, query i, group r with heads h in H_r, support U)::

        p_idx = torch.softmax(q_idx[0, i, r] @ k_idx[0, U].T * index_scale, -1)
        p = torch.stack([torch.softmax(q[0, i, h] @ k[0, U, r].T * scale, -1) for h in H_r]).mean(0)
        kl_ir = (p * (p.log() - p_idx.log())).sum()        # loss = mean of kl_ir over (i, r)
    """
    check_kl_inputs(q_idx, k_idx, q, k, block_size)
    bsz, t, hkv, di = q_idx.shape
    check_cu_seqlens(cu_seqlens, bsz, t, values=validate)
    if block_indices is not None:
        check_block_indices(block_indices, bsz, t, hkv, block_size, cu_seqlens, values=validate)
        if validate:
            check_own_block(block_indices, block_size, t, cu_seqlens)
    check_backend(backend)
    if teacher_lse is not None:
        check(teacher_lse.shape == (bsz, t, q.shape[2]),
              f"teacher_lse must have shape (B, T, H_q) = {(bsz, t, q.shape[2])}, got {tuple(teacher_lse.shape)}")
        check(teacher_lse.is_floating_point(), "teacher_lse must be a float tensor")
    scale = default_scale(scale, q.shape[3])
    index_scale = default_scale(index_scale, di, "index_scale")
    impl = resolve_backend(backend, [q_idx, k_idx, q, k])
    kwargs = dict(block_size=block_size, scale=scale, index_scale=index_scale, cu_seqlens=cu_seqlens)
    if impl == "triton" and load_triton_impl(__package__, "triton_impl", "indexer_kl_triton", backend):
        return IndexerKLTriton.apply(q_idx, k_idx, q.detach(), k.detach(), block_indices, teacher_lse, block_size,
                                     scale, index_scale, cu_seqlens, None, plan)
    return indexer_kl_reference(q_idx, k_idx, q, k, block_indices, **kwargs)
