"""KV and index-key cache for incremental MSA decoding (contiguous layout).

Per layer it holds K, V (B, max_seq_len, H_kv, D) and the shared index keys (B, max_seq_len, D_idx),
with its own fill length per sequence, so sequences of one batch may have different lengths
(e.g. prompts of different lengths prefilled as a packed batch). Positions and block ids are
absolute within each sequence, as in spec section 1.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .ops.common import check, check_cu_seqlens


class MSACache:
    """Contiguous per-layer cache.

    Args:
        num_layers: layers that will write to the cache.
        batch_size: sequences held (B).
        max_seq_len: tokens per sequence the cache can hold.
        num_kv_heads, head_dim: shape of K and V per token (H_kv, D).
        index_dim: D_idx of the index keys; None stores no index keys (dense-only models).
        dtype, device: storage dtype and device.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 index_dim: Optional[int], *, dtype: torch.dtype = torch.float32, device="cpu"):
        for name, val in (("num_layers", num_layers), ("batch_size", batch_size), ("max_seq_len", max_seq_len),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check(isinstance(val, int) and val > 0, f"{name} must be a positive int, got {val!r}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_idx: List[Optional[torch.Tensor]] = [
            None if index_dim is None else torch.zeros(batch_size, max_seq_len, index_dim, dtype=dtype, device=device)
            for _ in range(num_layers)]
        self.lengths = [torch.zeros(batch_size, dtype=torch.int64) for _ in range(num_layers)]  # host-side

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def seq_lens(self, layer_idx: int) -> torch.Tensor:
        """int64 (B,): tokens stored for each sequence in this layer (host tensor)."""
        return self.lengths[layer_idx]

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, k_idx: Optional[torch.Tensor],
               cu_seqlens: Optional[torch.Tensor] = None) -> None:
        """Store new tokens after each sequence's current end.

        k, v: (B, t, H_kv, D); k_idx: (B, t, D_idx) or None. With cu_seqlens (int32 (B+1,)) the input is
        packed, (1, T, ...), and sequence b's tokens cu_seqlens[b]:cu_seqlens[b+1] go to row b.
        """
        check(0 <= layer_idx < self.num_layers, f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        lens = self.lengths[layer_idx]
        if cu_seqlens is None:
            check(k.shape[0] == self.batch_size, f"k must have batch size {self.batch_size}, got {k.shape[0]}")
            pieces = [(b, b, 0, k.shape[1]) for b in range(self.batch_size)]
        else:
            check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1])
            check(cu_seqlens.numel() == self.batch_size + 1,
                  f"cu_seqlens must hold batch_size + 1 = {self.batch_size + 1} entries, got {cu_seqlens.numel()}")
            cu = cu_seqlens.tolist()
            pieces = [(b, 0, cu[b], cu[b + 1]) for b in range(self.batch_size)]
        for row, src, s, e in pieces:
            n0, n1 = int(lens[row]), int(lens[row]) + (e - s)
            check(n1 <= self.max_seq_len,
                  f"sequence {row} would hold {n1} tokens, longer than the cache's max_seq_len={self.max_seq_len}")
            self.k[layer_idx][row, n0:n1] = k[src, s:e]
            self.v[layer_idx][row, n0:n1] = v[src, s:e]
            if self.k_idx[layer_idx] is not None and k_idx is not None:
                self.k_idx[layer_idx][row, n0:n1] = k_idx[src, s:e]
            lens[row] = n1

    def view(self, layer_idx: int, row: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The stored (K, V, index keys) of one sequence: (n, H_kv, D), (n, H_kv, D), (n, D_idx) or None."""
        n = int(self.lengths[layer_idx][row])
        kidx = self.k_idx[layer_idx]
        return self.k[layer_idx][row, :n], self.v[layer_idx][row, :n], None if kidx is None else kidx[row, :n]
