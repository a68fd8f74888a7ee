"""KV and index-key storage for incremental MSA decoding: contiguous or paged, optional fp8 index keys.

Per layer it holds K, V and the shared index keys of every sequence, with its own fill length per
sequence, so sequences of one batch may have different lengths (e.g. prompts of different lengths
prefilled as a packed batch). Positions and block ids are absolute within each sequence (spec
section 1).

Layouts (``row`` = the storage row of one token; kernels address K/V/index keys by it):

- contiguous: K, V (B, S, H_kv, D), index keys (B, S, D_idx); token j of sequence b is row b * S + j.
- paged (``page_size`` given): K, V (P, page_size, H_kv, D), index keys (P, page_size, D_idx) and a page
  table int32 (B, ceil(max_seq_len / page_size)) shared by all layers (``msa.cache.pages``); token j of
  sequence b is row page_table[b, j // page_size] * page_size + j % page_size. With page_size =
  block_size a selected logical block id maps to one physical page.

fp8 index keys (``index_dtype=torch.float8_e4m3fn``, codec in ``msa.cache.fp8``): one fp32 scale per
token (``index_scale_mode="token"``, scales (B, S) or (P, page_size)) or per block of
``index_block_size`` tokens (``"block"``, scales (B, S / block) or (P,)). Per-block scales are
recomputed from the exact (unquantised) tokens of the block each time the block grows (a small staging
buffer keeps the open block of each sequence), so a prompt appended in pieces gives bit-identical
cache content to one append. K and V keep ``dtype``.

Lengths: ``lengths_dev`` (int32 (B,) per layer, on the device) is what the kernels read and the source
of truth; ``lengths`` (int64 (B,) per layer, host) mirrors it for host code (``seq_lens``). ``append``
validates on the host and updates both; ``append_device`` (CUDA-graph capturable, no host sync)
updates only the device copy: call ``sync_lengths()`` before host code reads ``seq_lens`` again.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..ops.common import check, check_cu_seqlens
from .fp8 import INDEX_SCALE_MODES, dequantize_fp8, quantize_fp8
from .pages import PageAllocator


class MSACache:
    """Per-layer KV + index-key cache (contiguous or paged).

    Args:
        num_layers: layers that will write to the cache.
        batch_size: sequences held (B).
        max_seq_len: tokens per sequence the cache can hold.
        num_kv_heads, head_dim: shape of K and V per token (H_kv, D).
        index_dim: D_idx of the index keys; None stores no index keys (dense-only models).
        dtype, device: storage dtype of K, V (and of the index keys unless index_dtype) and device.
        page_size: None = contiguous layout; an int = paged layout with that many tokens per page
            (use the model's block_size so block ids are page ids).
        num_pages: pages per layer in the pool (default: enough for every sequence at max_seq_len).
        page_table: optional int32 (B, >= ceil(max_seq_len / page_size)) fixed page assignment; by default
            pages are taken from a free list as sequences grow (``reserve`` pre-allocates).
        index_dtype: None (= dtype) or torch.float8_e4m3fn.
        index_scale_mode: "token" or "block" (fp8 only).
        index_block_size: tokens per scale block in "block" mode (default page_size; required when contiguous).

    ``plans``: decode plans built for this cache (``msa.ops.decode.get_decode_plan`` memoises them
    here, so a generation builds each plan once).

    Example::

        cache = MSACache(n_layers, 2, 4096, 4, 128, 128, dtype=torch.bfloat16, device="cuda",
                         page_size=128, index_dtype=torch.float8_e4m3fn)
        cache.append(0, k, v, k_idx)          # k, v (2, t, 4, 128), k_idx (2, t, 128)
        k0, v0, kidx0 = cache.view(0, 0)      # sequence 0, dequantised index keys
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 index_dim: Optional[int], *, dtype: torch.dtype = torch.float32, device="cpu",
                 page_size: Optional[int] = None, num_pages: Optional[int] = None,
                 page_table: Optional[torch.Tensor] = None, index_dtype: Optional[torch.dtype] = None,
                 index_scale_mode: str = "token", index_block_size: Optional[int] = None):
        for name, val in (("num_layers", num_layers), ("batch_size", batch_size), ("max_seq_len", max_seq_len),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check(isinstance(val, int) and not isinstance(val, bool) and val > 0,
                  f"{name} must be a positive int, got {val!r}")
        check(index_dim is None or (isinstance(index_dim, int) and index_dim > 0),
              f"index_dim must be a positive int or None, got {index_dim!r}")
        check(isinstance(dtype, torch.dtype) and dtype.is_floating_point
              and dtype not in (torch.float8_e4m3fn, torch.float8_e5m2),
              f"dtype must be a float dtype for K/V (bf16, fp16, fp32, fp64), got {dtype}")
        check(index_dtype in (None, torch.float8_e4m3fn) or index_dtype == dtype,
              f"index_dtype must be None, the cache dtype or torch.float8_e4m3fn, got {index_dtype}")
        check(index_scale_mode in INDEX_SCALE_MODES,
              f"index_scale_mode must be one of {INDEX_SCALE_MODES}, got {index_scale_mode!r}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.num_kv_heads, self.head_dim, self.index_dim = num_kv_heads, head_dim, index_dim
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" and "cuda:0" must compare equal later
            dev = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.device = dtype, dev
        self.fp8_index = index_dtype == torch.float8_e4m3fn and index_dim is not None
        self.index_dtype = torch.float8_e4m3fn if self.fp8_index else dtype
        self.index_scale_mode = index_scale_mode if self.fp8_index else None
        self.paged = page_size is not None
        if self.paged:
            check(isinstance(page_size, int) and page_size > 0, f"page_size must be a positive int, got {page_size!r}")
        self.page_size = page_size
        if self.index_scale_mode == "block":
            if index_block_size is None:
                index_block_size = page_size
            check(isinstance(index_block_size, int) and index_block_size > 0,
                  "index_block_size must be a positive int (required for index_scale_mode='block' when contiguous)")
            check(not self.paged or index_block_size == page_size,
                  f"index_block_size ({index_block_size}) must equal page_size ({page_size}) when paged")
        self.index_block_size = index_block_size if self.index_scale_mode == "block" else None
        self.plans: Dict[tuple, object] = {}

        if self.paged:
            self.max_pages = math.ceil(max_seq_len / page_size)
            if num_pages is None:
                num_pages = batch_size * self.max_pages
            check(isinstance(num_pages, int) and num_pages > 0, f"num_pages must be a positive int, got {num_pages!r}")
            self.num_pages = num_pages
            self.pages: Optional[PageAllocator] = PageAllocator(batch_size, self.max_pages, num_pages, dev,
                                                                page_table=page_table)
            kv_shape = (num_pages, page_size, num_kv_heads, head_dim)
            idx_shape = (num_pages, page_size, index_dim)
            self.rows_per_seq = 0
            tok_scale_shape, blk_scale_shape = (num_pages, page_size), (num_pages,)
        else:
            self.pages = None
            s_alloc = max_seq_len
            if self.index_block_size:
                s_alloc = math.ceil(max_seq_len / self.index_block_size) * self.index_block_size
            self.rows_per_seq = s_alloc
            kv_shape = (batch_size, s_alloc, num_kv_heads, head_dim)
            idx_shape = (batch_size, s_alloc, index_dim)
            tok_scale_shape = (batch_size, s_alloc)
            blk_scale_shape = (batch_size, s_alloc // self.index_block_size) if self.index_block_size else None

        self.k: List[torch.Tensor] = [torch.zeros(kv_shape, dtype=dtype, device=dev) for _ in range(num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(kv_shape, dtype=dtype, device=dev) for _ in range(num_layers)]
        self.k_idx: List[Optional[torch.Tensor]] = [
            None if index_dim is None else torch.zeros(idx_shape, dtype=self.index_dtype, device=dev)
            for _ in range(num_layers)]
        self.k_idx_scale: List[Optional[torch.Tensor]] = [None] * num_layers
        self._stage: List[Optional[torch.Tensor]] = [None] * num_layers
        if self.fp8_index:
            shp = tok_scale_shape if self.index_scale_mode == "token" else blk_scale_shape
            self.k_idx_scale = [torch.ones(shp, dtype=torch.float32, device=dev) for _ in range(num_layers)]
            if self.index_scale_mode == "block":
                # exact tokens of each sequence's open (partial) block, to requantise it when it grows
                self._stage = [torch.zeros(batch_size, self.index_block_size, index_dim, dtype=dtype, device=dev)
                               for _ in range(num_layers)]
        self.lengths = [torch.zeros(batch_size, dtype=torch.int64) for _ in range(num_layers)]  # host-side
        self.lengths_dev = [torch.zeros(batch_size, dtype=torch.int32, device=dev) for _ in range(num_layers)]

    # bookkeeping --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def page_table(self) -> Optional[torch.Tensor]:
        """int32 (B, ceil(max_seq_len / page_size)) device page table (None when contiguous)."""
        return self.pages.table if self.paged else None

    def seq_lens(self, layer_idx: int) -> torch.Tensor:
        """int64 (B,): tokens stored for each sequence in this layer (host tensor)."""
        check(isinstance(layer_idx, int) and not isinstance(layer_idx, bool) and 0 <= layer_idx < self.num_layers,
              f"layer_idx must be in [0, {self.num_layers}) (the cache's layers), got {layer_idx!r}")
        return self.lengths[layer_idx]

    def set_seq_lens(self, layer_idx: int, lens) -> None:
        """Declare the fill lengths (after writing the storage directly, e.g. in benchmarks)."""
        lens = torch.as_tensor(lens, dtype=torch.int64).reshape(-1).cpu()
        check(lens.numel() == self.batch_size, f"lens must hold batch_size={self.batch_size} entries")
        check(bool(((lens >= 0) & (lens <= self.max_seq_len)).all()),
              f"lens must be in [0, max_seq_len={self.max_seq_len}]")
        self._ensure_tokens(lens.tolist())
        self.lengths[layer_idx].copy_(lens)
        self.lengths_dev[layer_idx].copy_(lens.to(torch.int32))

    def sync_lengths(self) -> None:
        """Copy the device lengths to the host ones (after ``append_device`` / CUDA-graph replays).
        Synchronises the host with the device once."""
        host = torch.stack(self.lengths_dev).cpu().to(torch.int64)
        for li in range(self.num_layers):
            self.lengths[li].copy_(host[li])

    def reset(self, row: Optional[int] = None) -> None:
        """Empty one sequence (or all) in every layer; pages taken from the free list go back to it."""
        rows = list(range(self.batch_size)) if row is None else [row]
        for li in range(self.num_layers):
            self.lengths[li][rows] = 0
            self.lengths_dev[li][rows] = 0
        if self.paged:
            self.pages.release(rows)

    def _ensure_tokens(self, tokens: Sequence[int]) -> None:
        """Pages for tokens[r] tokens of every row r (paged layout; no-op when contiguous)."""
        if self.paged:
            self.pages.ensure([math.ceil(n / self.page_size) for n in tokens])

    def reserve(self, num_tokens: int) -> None:
        """Make sure every sequence has pages for num_tokens tokens (needed before capturing
        append_device in a CUDA graph: graph replays cannot allocate pages)."""
        check(0 <= num_tokens <= self.max_seq_len, f"num_tokens must be in [0, max_seq_len={self.max_seq_len}]")
        self._ensure_tokens([num_tokens] * self.batch_size)

    def rows(self, row: int, start: int, end: int) -> torch.Tensor:
        """int64 (end - start,) storage rows of positions start..end-1 of sequence ``row`` (host)."""
        pos = torch.arange(start, end)
        if not self.paged:
            return row * self.rows_per_seq + pos
        pages = self.pages.table_host[row, pos // self.page_size].to(torch.int64)
        return pages * self.page_size + pos % self.page_size

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        """Storage viewed as (rows, ...)."""
        return t.view(-1, *t.shape[2:])

    # writing ------------------------------------------------------------------------------------
    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, k_idx: Optional[torch.Tensor],
               cu_seqlens: Optional[torch.Tensor] = None, rows: Optional[List[int]] = None) -> None:
        """Store new tokens after each sequence's current end (validated on the host before any write).

        k, v: (B, t, H_kv, D); k_idx: (B, t, D_idx) or None. With cu_seqlens (int32 (B+1,)) the input is
        packed, (1, T, ...), and sequence b's tokens cu_seqlens[b]:cu_seqlens[b+1] go to row b.
        rows: optional list of the B cache rows the input rows go to (default all rows in order).
        All pieces are written with one indexed copy per tensor (per-block fp8 scales: per sequence).
        """
        check(isinstance(layer_idx, int) and 0 <= layer_idx < self.num_layers,
              f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        check(isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[2:] == (self.num_kv_heads, self.head_dim),
              f"k must have shape (B, t, H_kv={self.num_kv_heads}, D={self.head_dim}), got "
              f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
        check(isinstance(v, torch.Tensor) and v.shape == k.shape, f"v must have k's shape {tuple(k.shape)}")
        check(k.is_floating_point() and v.is_floating_point(), f"k and v must be float tensors, got {k.dtype}")
        check(k.device == self.device and v.device == self.device,
              f"k and v must be on the cache device {self.device}, got {k.device}")
        if self.index_dim is not None and k_idx is not None:
            check(isinstance(k_idx, torch.Tensor) and k_idx.dim() == 3 and k_idx.shape[:2] == k.shape[:2]
                  and k_idx.shape[2] == self.index_dim,
                  f"k_idx must have shape (B, t, D_idx={self.index_dim}), got {tuple(k_idx.shape)}")
            check(k_idx.is_floating_point(), f"k_idx must be a float tensor, got {k_idx.dtype}")
            check(k_idx.device == self.device, f"k_idx must be on the cache device {self.device}, got {k_idx.device}")
        lens = self.lengths[layer_idx]
        if rows is not None:
            check(cu_seqlens is None and len(rows) == k.shape[0] and len(set(rows)) == len(rows)
                  and all(isinstance(r, int) and 0 <= r < self.batch_size for r in rows),
                  f"rows must list {k.shape[0]} distinct cache rows in [0, {self.batch_size}) (no cu_seqlens)")
            pieces = [(r, i * k.shape[1], k.shape[1]) for i, r in enumerate(rows)]
        elif cu_seqlens is None:
            check(k.shape[0] == self.batch_size, f"k must have batch size {self.batch_size}, got {k.shape[0]}")
            pieces = [(b, b * k.shape[1], k.shape[1]) for b in range(self.batch_size)]
        else:
            check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1])
            check(cu_seqlens.numel() == self.batch_size + 1,
                  f"cu_seqlens must hold batch_size + 1 = {self.batch_size + 1} entries, got {cu_seqlens.numel()}")
            cu = cu_seqlens.tolist()
            pieces = [(b, cu[b], cu[b + 1] - cu[b]) for b in range(self.batch_size)]
        new_len = lens.clone()
        for row, _, n in pieces:  # validate every row before writing any
            new_len[row] += n
            check(int(new_len[row]) <= self.max_seq_len, f"sequence {row} would hold {int(new_len[row])} tokens, "
                  f"longer than the cache's max_seq_len={self.max_seq_len}")
        self._ensure_tokens(new_len.tolist())
        kf, vf = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        xf = None if k_idx is None or self.k_idx[layer_idx] is None else k_idx.reshape(-1, k_idx.shape[-1])
        pieces = [p for p in pieces if p[2] > 0]
        if pieces:
            dst = torch.cat([self.rows(r, int(lens[r]), int(lens[r]) + n) for r, _, n in pieces]).to(self.device)
            src = None
            if not (len(pieces) * pieces[0][2] == kf.shape[0] and all(s == i * pieces[0][2] for i, (_, s, _) in
                                                                     enumerate(pieces))):
                src = torch.cat([torch.arange(s, s + n) for _, s, n in pieces]).to(self.device)

            def pick(x):
                return x if src is None else x.index_select(0, src)
            self._flat(self.k[layer_idx]).index_copy_(0, dst, pick(kf).to(self.dtype))
            self._flat(self.v[layer_idx]).index_copy_(0, dst, pick(vf).to(self.dtype))
            if xf is not None:
                if self.index_scale_mode == "block":
                    for r, s, n in pieces:
                        self._write_index_blocks(layer_idx, r, int(lens[r]), int(lens[r]) + n, xf[s:s + n])
                else:
                    self._write_index_rows(layer_idx, dst, pick(xf))
        lens.copy_(new_len)
        self.lengths_dev[layer_idx].copy_(new_len.to(torch.int32))

    def append_row(self, layer_idx: int, row: int, k: torch.Tensor, v: torch.Tensor,
                   k_idx: Optional[torch.Tensor]) -> None:
        """Store n new tokens of ONE sequence (continuous batching, per-sequence chunked prefill).
        k, v: (n, H_kv, D); k_idx: (n, D_idx) or None."""
        check(isinstance(row, int) and 0 <= row < self.batch_size, f"row must be in [0, {self.batch_size}), got {row!r}")
        check(k.dim() == 3, f"k must have shape (n, H_kv, D), got {tuple(k.shape)}")
        self.append(layer_idx, k[None], v[None], None if k_idx is None else k_idx[None], rows=[row])

    def _write_index_rows(self, li: int, dst: torch.Tensor, x: torch.Tensor) -> None:
        """Index keys x (n, D_idx) to storage rows dst (n,) (bf16/fp32 keys or per-token fp8 scales)."""
        kif = self._flat(self.k_idx[li])
        if not self.fp8_index:
            kif.index_copy_(0, dst, x.to(self.index_dtype))
            return
        qv, sc = quantize_fp8(x)
        # fp8 has no index_copy_ kernel on every device: copy the raw bytes
        kif.view(torch.uint8).index_copy_(0, dst, qv.view(torch.uint8))
        self.k_idx_scale[li].view(-1).index_copy_(0, dst, sc)

    def _write_index_blocks(self, li: int, row: int, n0: int, n1: int, x: torch.Tensor) -> None:
        """Per-block fp8 scales: requantise every block touched by positions n0..n1-1 of ``row`` from
        its exact tokens (the open block's earlier tokens come from the staging buffer)."""
        kif = self._flat(self.k_idx[li])
        bs = self.index_block_size
        stage = self._stage[li][row]
        b0 = n0 // bs
        head = n0 - b0 * bs  # tokens of the open block stored before this append
        full = torch.cat([stage[:head].to(x.dtype), x]) if head else x
        start = b0 * bs
        n = n1 - start
        nblk = math.ceil(n / bs)
        pad = nblk * bs - n
        xb = torch.cat([full, full.new_zeros(pad, full.shape[1])]) if pad else full
        qv, sc = quantize_fp8(xb.view(nblk, bs, -1), dim_block=True)
        all_rows = self.rows(row, start, n1).to(self.device)
        kif.view(torch.uint8).index_copy_(0, all_rows, qv.view(nblk * bs, -1)[:n].view(torch.uint8))
        blk_ids = (all_rows[::bs] // bs) if self.paged else (row * (self.rows_per_seq // bs) + b0 +
                                                             torch.arange(nblk, device=self.device))
        self.k_idx_scale[li].view(-1)[blk_ids] = sc
        tail = n1 % bs
        if tail:
            stage[:tail] = full[n - tail:].to(stage.dtype)

    def append_device(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, k_idx: Optional[torch.Tensor]) -> None:
        """CUDA-graph capturable append of t tokens to EVERY sequence at its device-side length.

        k, v: (B, t, H_kv, D); k_idx: (B, t, D_idx) or None. No host sync, no validation of values and no
        page allocation: a paged cache must have its pages (``reserve``) and a sequence must not
        overflow max_seq_len (the caller checks once, e.g. ``generate`` at entry). Updates
        ``lengths_dev`` only; call ``sync_lengths()`` before host code reads ``seq_lens``. Per-block fp8
        scales are not supported here (use ``append``).
        """
        check(not (self.fp8_index and self.index_scale_mode == "block"),
              "append_device does not support index_scale_mode='block'; use append() or per-token scales")
        check(k.dim() == 4 and k.shape[0] == self.batch_size and k.shape[2:] == (self.num_kv_heads, self.head_dim),
              f"k must have shape (B={self.batch_size}, t, H_kv, D), got {tuple(k.shape)}")
        bsz, t = k.shape[:2]
        lens = self.lengths_dev[layer_idx].to(torch.int64)
        pos = lens.view(bsz, 1) + torch.arange(t, device=k.device).view(1, t)
        if self.paged:
            pidx = (pos // self.page_size).clamp_max(self.max_pages - 1)
            rows = self.page_table.to(torch.int64).gather(1, pidx) * self.page_size + pos % self.page_size
        else:
            rows = torch.arange(bsz, device=k.device).view(bsz, 1) * self.rows_per_seq + pos
        rows = rows.reshape(-1)
        self._flat(self.k[layer_idx]).index_copy_(0, rows, k.reshape(-1, *k.shape[2:]).to(self.dtype))
        self._flat(self.v[layer_idx]).index_copy_(0, rows, v.reshape(-1, *v.shape[2:]).to(self.dtype))
        if self.k_idx[layer_idx] is not None and k_idx is not None:
            self._write_index_rows(layer_idx, rows, k_idx.reshape(-1, k_idx.shape[-1]))
        self.lengths_dev[layer_idx].add_(t)

    # reading ------------------------------------------------------------------------------------
    def index_keys(self, layer_idx: int, row: int, n: int,
                   dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """(n, D_idx) index keys of positions 0..n-1 of a sequence in ``dtype`` (default the cache dtype;
        fp8 keys are dequantised in fp32, then cast: pass torch.float32 for the exact values the kernels use)."""
        kidx = self.k_idx[layer_idx]
        if kidx is None:
            return None
        dtype = dtype or self.dtype
        rows = self.rows(row, 0, n).to(self.device)
        x = self._flat(kidx)[rows]
        if not self.fp8_index:
            return x.to(dtype)
        sc = self.k_idx_scale[layer_idx].view(-1)
        s = sc[rows] if self.index_scale_mode == "token" else sc[rows // self.index_block_size]
        return dequantize_fp8(x, s, dtype)

    def view(self, layer_idx: int, row: int, n: Optional[int] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The stored (K, V, index keys) of positions 0..n-1 of one sequence (n defaults to the host length):
        (n, H_kv, D), (n, H_kv, D), (n, D_idx) or None. Paged storage is gathered into new tensors;
        fp8 index keys are dequantised to ``dtype``."""
        if n is None:
            n = int(self.lengths[layer_idx][row])
        if not self.paged:
            k, v = self.k[layer_idx][row, :n], self.v[layer_idx][row, :n]
        else:
            rows = self.rows(row, 0, n).to(self.device)
            k, v = self._flat(self.k[layer_idx])[rows], self._flat(self.v[layer_idx])[rows]
        if self.k_idx[layer_idx] is not None and not self.paged and not self.fp8_index:
            return k, v, self.k_idx[layer_idx][row, :n]
        return k, v, self.index_keys(layer_idx, row, n)
