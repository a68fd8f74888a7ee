"""torch.library custom ops around the Triton sparse-attention forward and backward.

torch.compile cannot trace into Triton launchers that do host-side work (layout lists, reverse index
sizes), so the kernels are exposed as opaque custom ops with fake (meta) implementations that only
describe output shapes. ``SparseAttentionTriton`` (interface.py) calls these ops, so a compiled
model sees two graph nodes, ``msa::sparse_attention_fwd`` and ``msa::sparse_attention_bwd``.

    o, lse = torch.ops.msa.sparse_attention_fwd(q, k, v, block_indices, block_size, scale, cu_seqlens)
    dq, dk, dv = torch.ops.msa.sparse_attention_bwd(do, q, k, v, o, lse, block_indices, block_size, scale,
                                                    cu_seqlens)

Shapes: q/o/do (B, T, H_q, D), k/v (B, T, H_kv, D), block_indices int32 (B, T, H_kv, K),
lse fp32 (B, T, H_q), cu_seqlens optional int32 (S+1,).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


@torch.library.custom_op("msa::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                            block_size: int, scale: float, cu_seqlens: Optional[torch.Tensor]
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    from .triton_impl import sparse_attention_fwd_triton
    o, lse = sparse_attention_fwd_triton(q, k, v, block_indices, block_size=block_size, scale=scale,
                                         cu_seqlens=cu_seqlens)
    return o.contiguous(), lse.contiguous()


@sparse_attention_fwd_op.register_fake
def _(q, k, v, block_indices, block_size, scale, cu_seqlens):
    bsz, t, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((bsz, t, hq), dtype=torch.float32)


@torch.library.custom_op("msa::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, block_indices: torch.Tensor, block_size: int, scale: float,
                            cu_seqlens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_bwd import sparse_attention_bwd_triton
    return sparse_attention_bwd_triton(do, q, k, v, o, lse, block_indices, block_size=block_size, scale=scale,
                                       cu_seqlens=cu_seqlens)


@sparse_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, block_indices, block_size, scale, cu_seqlens):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, block_indices, block_size, scale, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, block_indices, o, lse, cu_seqlens)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, do, dlse):
    q, k, v, block_indices, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = sparse_attention_bwd_op(do.contiguous(), q, k, v, o, lse, block_indices, ctx.block_size, ctx.scale,
                                         cu_seqlens)
    return dq, dk, dv, None, None, None, None


# Direct users of torch.ops.msa.sparse_attention_fwd get autograd too (lse is treated as a constant).
sparse_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
