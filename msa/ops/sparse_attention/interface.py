"""Public interface of the MSA Main Branch: ``msa.sparse_attention``."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import custom_ops  # noqa: F401  (registers the torch.ops.msa.* custom ops)
from ..common import (check, check_backend, check_cu_seqlens, check_float, check_positive_int, check_tensor,
                      default_scale, load_triton_impl, positions_in_sequence,
                      resolve_backend)
from .reference import sparse_attention_reference


def check_block_indices(block_indices: torch.Tensor, batch: int, seqlen: int, num_kv_heads: int,
                        block_size: int, cu_seqlens: Optional[torch.Tensor], values: bool = True) -> None:
    """Shape (B, T, H_kv, K), int32; with ``values`` (one host sync) also every id in [-1, own block]
    and no id twice in one row."""
    check_tensor("block_indices", block_indices, 4, "(B, T, H_kv, topk)")
    check(block_indices.dtype == torch.int32, f"block_indices must be int32, got {block_indices.dtype}")
    check(block_indices.shape[:3] == (batch, seqlen, num_kv_heads),
          f"block_indices must have shape (B, T, H_kv, topk) with (B, T, H_kv) = {(batch, seqlen, num_kv_heads)}, "
          f"got {tuple(block_indices.shape)}")
    check(block_indices.shape[3] >= 1, "block_indices must hold at least one block per row (topk >= 1)")
    if not values:
        return
    local = (positions_in_sequence(seqlen, cu_seqlens, block_indices.device) // block_size).view(1, -1, 1, 1)
    bad_range = ((block_indices < -1) | (block_indices > local)).any()
    srt, _ = block_indices.sort(dim=-1)
    dup = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()
    bad_range, dup = bool(bad_range), bool(dup)  # one host sync, before any kernel launch
    check(not bad_range, "block_indices out of range: every id must be -1 (unused) or a block id in "
                         "[0, position // block_size] of its own sequence (no future blocks)")
    check(not dup, "block_indices must not repeat a block id within one (token, group) row")


# --- block_size consistency ----------------------------------------------------------------------
# Indices made with a smaller block_size than the one passed hold ids beyond some query's own block,
# which check_block_indices rejects. Indices made with a larger one stay in range; what gives them
# away is the local block: select_blocks always selects the query's own block position // block_size
# (spec section 1), so a row that selects blocks but not its own one was made with another block_size
# (or by hand against the convention). All -1 rows are left alone: they select nothing.
def check_own_block(block_indices: torch.Tensor, block_size: int, seqlen: int,
                    cu_seqlens: Optional[torch.Tensor]) -> None:
    """block_indices int32 (B, T, H_kv, topk), already checked by check_block_indices: every row with a
    valid id must hold its own block position // block_size."""
    own = (positions_in_sequence(seqlen, cu_seqlens, block_indices.device) // block_size).view(1, -1, 1)
    has_own = (block_indices == own.unsqueeze(-1)).any(-1)
    selects = (block_indices >= 0).any(-1)
    bad = (selects & ~has_own).nonzero()
    if bad.numel():  # one host sync
        b, i, r = (int(x) for x in bad[0])
        raise ValueError(
            f"block_indices[{b}, {i}, {r}] does not select the query's own block {int(own[0, i, 0])} = position // "
            f"block_size (block_size={block_size}), which select_blocks always selects: were the indices made "
            f"with a different (larger) block_size than the block_size={block_size} passed here?")


class SparseAttentionTriton(torch.autograd.Function):
    """Triton forward and backward through the ``msa::sparse_attention_fwd/bwd`` custom ops
    (custom_ops.py), so torch.compile sees opaque nodes with fake shapes instead of Triton launchers."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, cu_seqlens, plan):
        if plan is None:
            o, lse = torch.ops.msa.sparse_attention_fwd(q, k, v, block_indices, block_size, scale, cu_seqlens)
        else:  # eager with a shared SelectionPlan: call the launcher directly so the plan's indices are reused
            from .triton_impl import sparse_attention_fwd_triton
            o, lse = sparse_attention_fwd_triton(q, k, v, block_indices, block_size=block_size, scale=scale,
                                                 cu_seqlens=cu_seqlens, plan=plan)
        ctx.save_for_backward(q, k, v, block_indices, o, lse)
        ctx.block_size, ctx.scale, ctx.cu_seqlens, ctx.plan = block_size, scale, cu_seqlens, plan
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, block_indices, o, lse = ctx.saved_tensors
        if ctx.plan is None:
            dq, dk, dv = torch.ops.msa.sparse_attention_bwd(do.contiguous(), q, k, v, o, lse, block_indices,
                                                            ctx.block_size, ctx.scale, ctx.cu_seqlens)
        else:
            from .triton_bwd import sparse_attention_bwd_triton
            dq, dk, dv = sparse_attention_bwd_triton(do, q, k, v, o, lse, block_indices, block_size=ctx.block_size,
                                                     scale=ctx.scale, cu_seqlens=ctx.cu_seqlens, plan=ctx.plan)
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, *,
                     block_size: int = 128, scale: Optional[float] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False,
                     backend: str = "auto", validate: bool = True,
                     plan=None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Exact causal softmax attention of every query over the key blocks its GQA group selected.

    Args:
        q: (B, T, H_q, D) bf16/fp16/fp32 queries; H_q must be a multiple of H_kv.
        k, v: (B, T, H_kv, D) keys and values, same dtype as q.
        block_indices: int32 (B, T, H_kv, topk) from ``msa.select_blocks`` (ids within each sequence,
            -1 for unused slots). All G = H_q / H_kv heads of group r read the blocks of row r.
        block_size: tokens per key block (B_k).
        scale: softmax scale, default D ** -0.5.
        cu_seqlens: optional int32 (S+1,) offsets of packed sequences (then B must be 1).
        return_lse: also return the natural-log log-sum-exp of every (token, head).
        backend: "auto" (Triton on CUDA, else reference), "reference" or "triton".
        validate: check block_indices' values (range, no repeats) and cu_seqlens' values; this
            synchronises with the host. Callers that made them (``msa.select_blocks``, the MSA layer)
            pass False; shapes, dtypes and devices are always checked.
        plan: optional ``SelectionPlan`` of block_indices (``msa.ops.sparse_attention.selection_plan``)
            shared with the backward and ``indexer_kl_loss`` (Triton backend; ignored by the reference).

    Returns:
        o: (B, T, H_q, D) in q.dtype, differentiable w.r.t. q, k, v; and, when return_lse,
        lse: fp32 (B, T, H_q) (not differentiable on the Triton backend).

    Equivalent PyTorch (one sequence, query i, head h of group r = h // G)::

        keys = [j for j in range(i + 1) if j // block_size in block_indices[0, i, r]]
        p = torch.softmax((q[0, i, h] @ k[0, keys, r].T) * scale, -1)
        o[0, i, h] = p @ v[0, keys, r]
    """
    check_tensor("q", q, 4, "(B, T, H_q, D)")
    check_tensor("k", k, 4, "(B, T, H_kv, D)")
    check_tensor("v", v, 4, "(B, T, H_kv, D)")
    check_float("q", q)
    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    check(k.shape[0] == bsz and k.shape[1] == t and k.shape[3] == d,
          f"k must have shape (B, T, H_kv, D) with (B, T, D) = {(bsz, t, d)}, got {tuple(k.shape)}")
    check(v.shape == k.shape, f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    check(k.dtype == q.dtype and v.dtype == q.dtype, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check(hkv >= 1 and hq % hkv == 0, f"H_q ({hq}) must be divisible by H_kv ({hkv})")
    check(t > 0, "q must hold at least one token (T >= 1)")
    check_positive_int("block_size", block_size)
    check_cu_seqlens(cu_seqlens, bsz, t, values=validate)
    check_block_indices(block_indices, bsz, t, hkv, block_size, cu_seqlens, values=validate)
    if validate:
        check_own_block(block_indices, block_size, t, cu_seqlens)
    check(block_indices.device == q.device, f"block_indices must be on {q.device}, got {block_indices.device}")
    check_backend(backend)
    scale = default_scale(scale, d)
    impl = resolve_backend(backend, [q, k, v])
    if impl == "triton" and load_triton_impl(__package__, "triton_impl", "sparse_attention_fwd_triton", backend):
        o, lse = SparseAttentionTriton.apply(q, k, v, block_indices, block_size, scale, cu_seqlens, plan)
    else:
        o, lse = sparse_attention_reference(q, k, v, block_indices, block_size=block_size, scale=scale,
                                            cu_seqlens=cu_seqlens)
    return (o, lse) if return_lse else o
