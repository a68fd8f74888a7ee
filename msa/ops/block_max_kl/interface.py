"""Public interface of the block-max KL: ``msa.block_max_kl_loss`` (``phase.kl_target="block_max"``)."""

from __future__ import annotations

from typing import List, Optional

import torch

from ..common import check, check_backend, check_cu_seqlens, default_scale, load_triton_impl, resolve_backend, sequence_spans
from ..indexer_kl.interface import check_kl_inputs
from .reference import block_max_kl_reference


def sample_rows(bsz: int, t: int, cu_seqlens: Optional[torch.Tensor], rows_per_sequence: int) -> List[torch.Tensor]:
    """Sorted int64 CPU positions per sequence: all of them, or rows_per_sequence drawn uniformly without
    replacement (torch's global CPU RNG, which training checkpoints save) where that is fewer."""
    out = []
    for _, s0, e0 in sequence_spans(bsz, t, cu_seqlens):
        n = e0 - s0
        out.append(torch.randperm(n)[:rows_per_sequence].sort().values if 0 < rows_per_sequence < n
                   else torch.arange(n))
    return out


def block_max_kl_loss(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *,
                      block_size: int = 128, scale: Optional[float] = None, index_scale: Optional[float] = None,
                      cu_seqlens: Optional[torch.Tensor] = None, rows_per_sequence: int = 0,
                      backend: str = "auto") -> torch.Tensor:
    """The block-max KL: the index trained on what top-k ranks. KL(P || softmax(m)) per query and group,
    averaged over tokens and groups (as ``msa.indexer_kl_loss``), over the query's causal blocks b:
        m_b = max_{j in b, j <= i} q_idx_i . k_idx_j * index_scale   (the index's block score)
        P_b = sum_{j in b, j <= i} p_ij                              (the teacher's block mass)
    with p the main branch's causal attention averaged over the group's G heads.

    Args:
        q_idx: (B, T, H_kv, D_idx) index queries (receive gradients, through each block's argmax key).
        k_idx: (B, T, D_idx) shared index keys (receive gradients).
        q: (B, T, H_q, D) and k: (B, T, H_kv, D) main-branch queries and keys (detached: the teacher).
        block_size: tokens per key block. scale / index_scale: defaults D ** -0.5 / D_idx ** -0.5.
        cu_seqlens: optional int32 (S+1,) packed sequences (then B == 1).
        rows_per_sequence: R > 0 takes the loss on R query positions per sequence drawn uniformly
            (torch's global RNG; both backends draw the same rows), each weighted n / R for a sequence
            of n tokens: an unbiased estimate at about R / n of the cost. 0: every position.
        backend: "auto" (Triton on CUDA), "reference" (PyTorch, fp32 scores) or "triton". Ties inside a
            block: the reference splits the gradient among equal maxima, Triton gives it to the first.

    Returns:
        fp32 scalar.

    Equivalent PyTorch, for one query i of group r in a sequence of length T:

        s = (q_idx[i, r] @ k_idx[:i+1].T) * index_scale
        m = stack([s[b*B:(b+1)*B].max() for b in range(i // B + 1)])
        p = softmax(q[i, r*G:(r+1)*G] @ k[:i+1, r].T * scale, -1).mean(0)
        P = stack([p[b*B:(b+1)*B].sum() for b in range(i // B + 1)])
        kl_i = (P * (P.log() - log_softmax(m, 0))).sum()
    """
    check_kl_inputs(q_idx, k_idx, q, k, block_size)
    bsz, t, hkv, di = q_idx.shape
    check(isinstance(rows_per_sequence, int) and rows_per_sequence >= 0,
          f"rows_per_sequence must be >= 0, got {rows_per_sequence}")
    check_cu_seqlens(cu_seqlens, bsz, t)
    check_backend(backend)
    scale = default_scale(scale, q.shape[3])
    index_scale = default_scale(index_scale, di, "index_scale")
    rows = sample_rows(bsz, t, cu_seqlens, rows_per_sequence)
    kw = dict(block_size=block_size, scale=scale, index_scale=index_scale, cu_seqlens=cu_seqlens)
    if resolve_backend(backend, [q_idx, k_idx, q, k]) == "triton" and q.dtype != torch.float64:
        impl = load_triton_impl(__package__, "triton_impl", "BlockMaxKLTriton", backend)
        if impl is not None:
            return impl.apply(q_idx, k_idx, q, k, rows, block_size, scale, index_scale, cu_seqlens)
    return block_max_kl_reference(q_idx, k_idx, q, k, rows, **kw)
