"""Pure-PyTorch reference of MSA decoding over a cache: the last t tokens of every sequence attend
to everything stored before them (spec section 1 with absolute positions)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common import reference_math
from ..select_blocks.reference import select_blocks_sequence
from ..sparse_attention.reference import sparse_attention_sequence


@reference_math
def decode_attention_reference(q: torch.Tensor, q_idx: Optional[torch.Tensor], cache, layer_idx: int, *,
                               block_size: int, topk: int, init_blocks: int, local_blocks: int, scale: float,
                               index_scale: float, dense: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q: (B, t, H_q, D), the queries of the last t tokens stored for each sequence of ``cache``;
    q_idx: (B, t, H_kv, D_idx) or None when dense. Returns o (B, t, H_q, D) in q.dtype and the
    selection int32 (B, t, H_kv, topk) (None when dense). Sequence lengths come from the device
    lengths (``cache.lengths_dev``), so it also serves caches filled by ``append_device``."""
    bsz, t = q.shape[:2]
    lens = cache.lengths_dev[layer_idx].tolist()
    outs, sels = [], []
    for b in range(bsz):
        k, v, k_idx = cache.view(layer_idx, b, lens[b])
        q_start = k.shape[0] - t
        idx = None
        if not dense:
            idx = select_blocks_sequence(q_idx[b], k_idx, q_start=q_start, block_size=block_size, topk=topk,
                                         init_blocks=init_blocks, local_blocks=local_blocks, scale=index_scale)
            sels.append(idx)
        o, _ = sparse_attention_sequence(q[b], k, v, idx, q_start=q_start, block_size=block_size, scale=scale)
        outs.append(o)
    return torch.stack(outs), (None if dense else torch.stack(sels))
