"""torch.library custom op around the Triton indexer KL, so torch.compile sees one opaque node (the
launcher does host-side chunking) with a fake implementation that gives the output shapes.

    loss, dq_idx, dk_idx = torch.ops.msa.indexer_kl_fwd(q_idx, k_idx, q, k, block_indices, teacher_lse,
                                                        block_size, scale, index_scale, cu_seqlens, with_grad)

loss: fp32 scalar; dq_idx fp32 (B, T, H_kv, D_idx) and dk_idx fp32 (B, T, D_idx): the gradients for a
unit upstream gradient (computed in the forward, where the teacher is built anyway); empty (0,) tensors
when with_grad is False.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


@torch.library.custom_op("msa::indexer_kl_fwd", mutates_args=())
def indexer_kl_fwd_op(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      block_indices: Optional[torch.Tensor], teacher_lse: Optional[torch.Tensor], block_size: int,
                      scale: float, index_scale: float, cu_seqlens: Optional[torch.Tensor],
                      with_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_impl import indexer_kl_forward
    loss, dq_idx, dk_idx = indexer_kl_forward(q_idx, k_idx, q, k, block_indices, teacher_lse, block_size=block_size,
                                              scale=scale, index_scale=index_scale, cu_seqlens=cu_seqlens,
                                              with_grad=with_grad)
    if not with_grad:
        empty = q_idx.new_empty((0,), dtype=torch.float32)
        return loss, empty, empty.clone()
    return loss, dq_idx.contiguous(), dk_idx.contiguous()


@indexer_kl_fwd_op.register_fake
def _(q_idx, k_idx, q, k, block_indices, teacher_lse, block_size, scale, index_scale, cu_seqlens, with_grad):
    loss = q_idx.new_empty((), dtype=torch.float32)
    if not with_grad:
        return loss, q_idx.new_empty((0,), dtype=torch.float32), q_idx.new_empty((0,), dtype=torch.float32)
    return (loss, q_idx.new_empty(q_idx.shape, dtype=torch.float32),
            k_idx.new_empty(k_idx.shape, dtype=torch.float32))
