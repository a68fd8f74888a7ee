"""Public interface of MSA decoding over a cache: ``msa.ops.decode.decode_attention``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common import check, check_backend
from .reference import decode_attention_reference


def decode_attention(q: torch.Tensor, q_idx: Optional[torch.Tensor], cache, layer_idx: int, *, block_size: int,
                     topk: int, init_blocks: int = 0, local_blocks: int = 1, scale: Optional[float] = None,
                     index_scale: Optional[float] = None, dense: bool = False,
                     backend: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of the last t tokens stored in ``cache`` (layer ``layer_idx``) over everything before them.

    Args:
        q: (B, t, H_q, D) queries of the newest t tokens of each sequence (already appended to the cache).
        q_idx: (B, t, H_kv, D_idx) index queries, or None when dense.
        cache: an ``msa.MSACache``.
        block_size, topk, init_blocks, local_blocks: the selection (spec section 1), absolute positions.
        scale / index_scale: default D ** -0.5 / D_idx ** -0.5.
        dense: full causal attention over the cache (warmup-mode or dense layers).

    Returns:
        o (B, t, H_q, D) in q.dtype and the selection int32 (B, t, H_kv, topk) (None when dense).

    Equivalent PyTorch (sequence b with n cached tokens, new query i at position n - t + i)::

        ids = select_blocks over k_idx[b, :n] for the query at that position
        o[b, i] = sparse attention of q[b, i] over the tokens of ids at positions <= n - t + i
    """
    check(q.dim() == 4, f"q must have shape (B, t, H_q, D), got {tuple(q.shape)}")
    check(dense or (q_idx is not None and q_idx.dim() == 4 and q_idx.shape[:2] == q.shape[:2]),
          "q_idx must have shape (B, t, H_kv, D_idx) matching q unless dense=True")
    check_backend(backend)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if index_scale is None:
        index_scale = 1.0 if q_idx is None else q_idx.shape[-1] ** -0.5
    return decode_attention_reference(q, q_idx, cache, layer_idx, block_size=block_size, topk=topk,
                                      init_blocks=init_blocks, local_blocks=local_blocks, scale=scale,
                                      index_scale=index_scale, dense=dense)
