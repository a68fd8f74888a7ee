"""torch.library custom op around the Triton Index Branch, so torch.compile sees one opaque node
(the launcher does host-side tiling) with a fake implementation that gives the output shape.

    block_indices = torch.ops.msa.select_blocks(q_idx, k_idx, block_size, topk, init_blocks, local_blocks,
                                                scale, cu_seqlens, fp8_scores, fp8_rescore_blocks)
    # int32 (B, T, H_kv, topk)
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("msa::select_blocks", mutates_args=())
def select_blocks_op(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int, init_blocks: int,
                     local_blocks: int, scale: float, cu_seqlens: Optional[torch.Tensor],
                     fp8_scores: bool = False, fp8_rescore_blocks: int = 0) -> torch.Tensor:
    from .triton_impl import select_blocks_triton
    return select_blocks_triton(q_idx, k_idx, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                local_blocks=local_blocks, scale=scale, cu_seqlens=cu_seqlens,
                                fp8_scores=fp8_scores, fp8_rescore_blocks=fp8_rescore_blocks).contiguous()


@select_blocks_op.register_fake
def _(q_idx, k_idx, block_size, topk, init_blocks, local_blocks, scale, cu_seqlens, fp8_scores=False,
      fp8_rescore_blocks=0):
    bsz, t, hkv, _ = q_idx.shape
    return q_idx.new_empty((bsz, t, hkv, topk), dtype=torch.int32)
