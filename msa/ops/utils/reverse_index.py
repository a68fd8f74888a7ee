"""The reverse index of a block selection, for KV-outer kernels (spec section 4).

For every (KV group r, key block g) it lists the (query token, slot) pairs that selected g, as CSR,
built with device-side torch ops only (no host sync; sizes come from shapes). Hot rows are cut into
work items of at most ``max_queries_per_item`` entries; every (query, slot) pair appears in exactly
one work item, so a kernel writing one partial output per pair needs no atomics.

Numbering: tokens are flattened over (B, T) (``token = b * T + t``); key blocks are numbered
globally over all sequences (``global_block = block_offset[seq] + block_id``), so one packed batch
and a padded batch look the same to a kernel.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from ..common import cu_seqlens_host, interpreting

_BLOCK = 1024  # elements per program of the element-wise kernels below


@triton.jit
def sparse_attention_revidx_keys_fwd_kernel(BI, SEQ_BLOCK_OFFSET, KEY, n, nb_rows,
                                            HK: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Sort key of every (token, group, slot) of the chunk: its row ``r * nb_rows + global_block``,
    or the sentinel row H_kv * nb_rows for a -1 slot (it sorts last). BI int32 (chunk tokens, H_kv,
    K) flattened, SEQ_BLOCK_OFFSET int64 (chunk tokens,) (both already offset to the chunk's first
    token), KEY int32 (n,) with n = chunk tokens * H_kv * K."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tok = i // HK
    r = (i % HK) // K
    b = tl.load(BI + i, mask=ok, other=-1)
    sbo = tl.load(SEQ_BLOCK_OFFSET + tok, mask=ok, other=0).to(tl.int32)
    rows = nb_rows * (HK // K)
    tl.store(KEY + i, tl.where(b >= 0, r * nb_rows + sbo + b, rows), mask=ok)


@triton.jit
def sparse_attention_revidx_entries_fwd_kernel(ORDER, ENTRIES, n, HK: tl.constexpr, K: tl.constexpr,
                                               BLOCK: tl.constexpr):
    """flat position (token * H_kv + r) * K + slot (int64, from the sort) -> int32 token * K + slot."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    o = tl.load(ORDER + i, mask=ok, other=0).to(tl.int32)
    tl.store(ENTRIES + i, (o // HK) * K + o % K, mask=ok)


@triton.jit
def sparse_attention_revidx_items_fwd_kernel(WROW, ROW_PTR, ITEMS, ITEM_PTR, WORK_ROW, WORK_START, WORK_END,
                                             rows, n, C: tl.constexpr, BLOCK: tl.constexpr):
    """Work item w of row WROW[w] (searchsorted of w in the inclusive item cumsum ITEM_PTR) covers
    C entries from row_ptr[row] + (w - first item of the row) * C; items past the last (wrow ==
    rows) are empty (start = end = 0, row clamped to rows - 1). All int32."""
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = w < n
    wrow = tl.load(WROW + w, mask=ok, other=0)
    valid = wrow < rows
    wr = tl.minimum(wrow, rows - 1)
    items = tl.load(ITEMS + wr, mask=ok, other=0)
    first = tl.load(ITEM_PTR + wr, mask=ok, other=0) - items
    start = tl.load(ROW_PTR + wr, mask=ok, other=0) + (w - first) * C
    end = tl.minimum(start + C, tl.load(ROW_PTR + wr + 1, mask=ok, other=0))
    tl.store(WORK_ROW + w, wr, mask=ok)
    tl.store(WORK_START + w, tl.where(valid, start, 0), mask=ok)
    tl.store(WORK_END + w, tl.where(valid, end, 0), mask=ok)


# Below this many tokens (B * T) the short-sequence defaults apply: the query-tiled forward and dQ, a
# hot-row split of topk * block_size / 2 and longest-first work items (docs/perf-notes.md, rounds 26, 28)
SHORT_TOKENS = 32768


def hot_row_split(block_size: int, topk: int, ntok: int) -> int:
    """The hot-row split of a reverse index over ``ntok`` tokens (B * T): at most this many (query, slot)
    entries per work item. ``msa.tuning`` field ``max_queries_per_item`` when set; else below
    ``SHORT_TOKENS`` tokens topk * block_size / 2 (a sequence's entries spread over more items than SMs:
    the spec's split left a few long items running alone at the end of the short kernels), else the
    spec's 2 * topk * block_size; at least 64, so the kernels' tiles stay full."""
    from ... import tuning
    fixed = tuning.current().max_queries_per_item
    if fixed is not None:
        return int(fixed)
    return max(64, (topk * block_size) // 2 if ntok < SHORT_TOKENS else 2 * topk * block_size)


class BlockLayout(NamedTuple):
    """Where each global key block lives.

    block_start: int32 (NB,) flattened token index of the block's first key.
    block_len:   int32 (NB,) number of keys in the block (the last block of a sequence may be short).
    seq_block_offset: int64 (T_total,) global id of block 0 of each token's own sequence.
    num_blocks: NB.
    starts: host copy of block_start (ascending ints), to bound the blocks a token range can touch
        (``blocks_before``) without a device read.
    """

    block_start: torch.Tensor
    block_len: torch.Tensor
    seq_block_offset: torch.Tensor
    num_blocks: int
    starts: Tuple[int, ...]


class ReverseIndex(NamedTuple):
    """CSR over rows ``row = r * NB + global_block``.

    row_ptr: int32 (H_kv * NB + 1,); entries: int32 (T_total * H_kv * K,) where the first
    row_ptr[-1] values are ``token * K + slot`` sorted by row then token.
    work_row, work_start, work_end: int32 (max_items,): work item w covers entries
    [work_start[w], work_end[w]) of row work_row[w]; unused items have start == end.
    work_order: int32 (max_items,): the launch order, program p of a KV-outer kernel runs item
    work_order[p]: item order, or longest first (``msa.tuning`` field ``work_order``; causal
    selections make the early blocks' rows the longest, and in item order the last long items may
    start late and run alone at the end of a short kernel). The order changes only which program runs
    an item, not what it writes.
    """

    layout: BlockLayout
    row_ptr: torch.Tensor
    entries: torch.Tensor
    work_row: torch.Tensor
    work_start: torch.Tensor
    work_end: torch.Tensor
    work_order: torch.Tensor


def _spans(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor]) -> Tuple[Tuple[int, int], ...]:
    """(first flattened token, length) of every sequence: the B rows, or cu_seqlens' pieces (one host copy)."""
    if cu_seqlens is None:
        return tuple((b * seqlen, seqlen) for b in range(batch))
    cu = cu_seqlens_host(cu_seqlens, batch * seqlen)
    return tuple((s, e - s) for s, e in zip(cu[:-1], cu[1:]))


_LAYOUT_CACHE: Dict[tuple, BlockLayout] = {}


def block_layout(batch: int, seqlen: int, block_size: int, cu_seqlens: Optional[torch.Tensor],
                 device) -> BlockLayout:
    """The BlockLayout of the flat layout, cached per (sequence spans, block_size, device): building it
    copies three host lists to the device, and a copy from pageable host memory waits for the whole
    stream, so an uncached build per call left the GPU idle while the host caught up (every MSA layer
    and every training step at one layout reuses the cached tensors; they are never written)."""
    spans = _spans(batch, seqlen, cu_seqlens)
    key = (spans, block_size, str(torch.device(device)))
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None:
        return hit
    bstart, blen, offs, tok_off = [], [], [], []
    total = 0
    for s, n in spans:
        nb = math.ceil(n / block_size)
        bstart.extend(s + i * block_size for i in range(nb))
        blen.extend(min(block_size, n - i * block_size) for i in range(nb))
        offs.append(total)
        tok_off.append(n)
        total += nb
    seq_block_offset = torch.repeat_interleave(torch.tensor(offs, dtype=torch.int64),
                                               torch.tensor(tok_off, dtype=torch.int64)).to(device)
    hit = BlockLayout(torch.tensor(bstart, dtype=torch.int32, device=device),
                      torch.tensor(blen, dtype=torch.int32, device=device), seq_block_offset, total, tuple(bstart))
    if len(_LAYOUT_CACHE) >= 32:
        _LAYOUT_CACHE.pop(next(iter(_LAYOUT_CACHE)))
    _LAYOUT_CACHE[key] = hit
    return hit


def blocks_before(block_starts: Sequence[int], token_end: int) -> int:
    """Number of global key blocks whose first token is < token_end: every block a query token
    < token_end can select (selected blocks start at or before the query) has a smaller global id."""
    return bisect.bisect_left(block_starts, token_end)


def build_reverse_index(block_indices: torch.Tensor, block_size: int, cu_seqlens: Optional[torch.Tensor] = None,
                        max_queries_per_item: int = 4096, *, token_range: Optional[Tuple[int, int]] = None,
                        layout: Optional[BlockLayout] = None, block_limit: Optional[int] = None) -> ReverseIndex:
    """block_indices: int32 (B, T, H_kv, K) in the spec's convention. Returns the ReverseIndex.

    Optional (keyword-only) arguments for query chunking; with their defaults the result covers all
    tokens and all blocks exactly as described in the module docstring:
        token_range: (t0, t1) flattened tokens (over B * T) to index; entries are then chunk-local,
            ``(token - t0) * K + slot``.
        layout: a BlockLayout from ``block_layout`` to reuse (it costs a host loop per call).
        block_limit: number of global blocks NB' the rows cover (``row = r * NB' + global_block``);
            must exceed every block the token range selects, e.g. ``blocks_before(starts, t1)``.
            Default: layout.num_blocks.
    """
    bsz, t, hkv, k = block_indices.shape
    dev = block_indices.device
    if layout is None:
        layout = block_layout(bsz, t, block_size, cu_seqlens, dev)
    nb = layout.num_blocks if block_limit is None else block_limit
    rows = hkv * nb
    t0, t1 = (0, bsz * t) if token_range is None else token_range
    ntok = t1 - t0
    n = ntok * hkv * k
    interp = interpreting()
    if n == 0 or n >= 2 ** 31 or not (dev.type == "cuda" or interp):
        return _build_reverse_index_torch(block_indices, layout, nb, t0, t1, max_queries_per_item)
    # a few fused kernels instead of ~40 small torch ops: the build was dominated by per-op launch
    # overhead and int64 temporaries. The rows fit int32 (H_kv * NB < 2^31); int32 keys need half
    # the radix-sort passes of an int64 (row, token) key. A stable sort of the row alone keeps
    # tokens (then slots) ascending inside a row, because the flat input order is (token, group, slot).
    bi = block_indices.reshape(bsz * t, hkv, k)[t0:t1].contiguous()  # a view when already contiguous
    key = torch.empty(n, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(n, _BLOCK),)
    sparse_attention_revidx_keys_fwd_kernel[grid](bi, layout.seq_block_offset[t0:t1], key, n, nb, HK=hkv * k, K=k,
                                                  BLOCK=_BLOCK)
    row_sorted, order = torch.sort(key, stable=True)
    entries = torch.empty(n, dtype=torch.int32, device=dev)
    sparse_attention_revidx_entries_fwd_kernel[grid](order, entries, n, HK=hkv * k, K=k, BLOCK=_BLOCK)
    # CSR pointers by binary search in the sorted rows (deterministic, no atomics); the sentinel
    # row sorts last, so row_ptr[rows] is the number of valid entries
    row_ptr = torch.searchsorted(row_sorted, torch.arange(rows + 1, device=dev, dtype=torch.int32), out_int32=True)
    c = max_queries_per_item
    items = (row_ptr[1:] - row_ptr[:-1] + (c - 1)) // c  # work items per row
    item_ptr = torch.cumsum(items, 0, dtype=torch.int32)
    max_items = rows + math.ceil(n / c)  # upper bound from shapes only
    wrow = torch.searchsorted(item_ptr, torch.arange(max_items, device=dev, dtype=torch.int32), right=True,
                              out_int32=True)
    work_row = torch.empty(max_items, dtype=torch.int32, device=dev)
    work_start = torch.empty_like(work_row)
    work_end = torch.empty_like(work_row)
    sparse_attention_revidx_items_fwd_kernel[(triton.cdiv(max_items, _BLOCK),)](
        wrow, row_ptr, items, item_ptr, work_row, work_start, work_end, rows, max_items, C=c, BLOCK=_BLOCK)
    return ReverseIndex(layout, row_ptr, entries, work_row, work_start, work_end,
                        _launch_order(work_start, work_end, bsz * t))


def _build_reverse_index_torch(block_indices, layout, nb, t0, t1, max_queries_per_item) -> ReverseIndex:
    """The same index with torch ops only (int64 positions): empty chunks and > 2^31 elements."""
    bsz, t, hkv, k = block_indices.shape
    dev = block_indices.device
    rows = hkv * nb
    ntok = t1 - t0
    idx = block_indices.reshape(bsz * t, hkv, k)[t0:t1]
    # the rows fit int32 (H_kv * NB < 2^31); int32 keys halve the radix-sort passes of the old
    # int64 (row, token) key. A stable sort of the row alone keeps tokens (then slots) ascending
    # inside a row, because the flat input order is (token, group, slot).
    gblock = idx + layout.seq_block_offset[t0:t1].to(torch.int32).view(ntok, 1, 1)
    r = torch.arange(hkv, device=dev, dtype=torch.int32).view(1, hkv, 1)
    row = torch.where(idx >= 0, r * nb + gblock, torch.full_like(idx, rows))  # invalid -> sentinel row
    row_sorted, order = torch.sort(row.reshape(-1), stable=True)
    # flat position (token * H_kv + r) * K + slot  ->  entry token * K + slot
    entries = ((order // (hkv * k)) * k + order % k).to(torch.int32)
    # CSR pointers by binary search in the sorted rows (deterministic, no atomics); the sentinel
    # row sorts last, so row_ptr[rows] is the number of valid entries
    row_ptr = torch.searchsorted(row_sorted, torch.arange(rows + 1, device=dev, dtype=torch.int32))
    counts = row_ptr[1:] - row_ptr[:-1]
    # work items: ceil(count / C) per row, upper bound from shapes only
    c = max_queries_per_item
    items = (counts + c - 1) // c
    item_ptr = torch.cumsum(items, 0)
    max_items = rows + math.ceil(ntok * hkv * k / c)
    w = torch.arange(max_items, device=dev)
    wrow = torch.searchsorted(item_ptr, w, right=True)
    valid = wrow < rows
    wrow_c = torch.clamp(wrow, max=rows - 1)
    first_item = item_ptr[wrow_c] - items[wrow_c]
    start = row_ptr[wrow_c] + (w - first_item) * c
    end = torch.minimum(start + c, row_ptr[wrow_c + 1])
    start = torch.where(valid, start, torch.zeros_like(start))
    end = torch.where(valid, end, torch.zeros_like(end))
    start, end = start.to(torch.int32), end.to(torch.int32)
    return ReverseIndex(layout, row_ptr.to(torch.int32), entries, wrow_c.to(torch.int32), start, end,
                        _launch_order(start, end, bsz * t))


def _launch_order(start: torch.Tensor, end: torch.Tensor, ntok: int) -> torch.Tensor:
    """int32 launch order of the work items (``ReverseIndex.work_order``) of an index over ``ntok``
    tokens (B * T): item order, or by length, longest first, ties in item order (a stable device sort
    of max_items values; no host sync): ``tuning.work_order``, whose "auto" is longest first below
    ``SHORT_TOKENS`` tokens."""
    from ... import tuning
    mode = tuning.current().work_order
    if mode == "longest-first" or (mode == "auto" and ntok < SHORT_TOKENS):
        return torch.sort(end - start, descending=True, stable=True).indices.to(torch.int32)
    return torch.arange(start.numel(), dtype=torch.int32, device=start.device)


class SelectionPlan:
    """The metadata of ONE block selection, built once and shared by every kernel that walks it: the
    main-branch forward, its backward (dK/dV and dQ) and the sparse KL. It holds the block layout
    (one host pass over cu_seqlens), the query-chunk size all of them use, and the reverse index of
    each chunk (built on first use, then reused; device-side, no host sync).

    block_indices: int32 (B, T, H_kv, K), already validated. chunk_tokens: queries per chunk (the
    smallest chunk the consumers' memory budgets allow; see ``selection_plan``), or a function
    returning it, called on first use: the budget reads the device's free memory, a driver call that
    waits on queued work, which a prefill whose kernels need no chunking should not pay.
    """

    def __init__(self, block_indices: torch.Tensor, block_size: int, cu_seqlens: Optional[torch.Tensor],
                 chunk_tokens: Union[int, Callable[[], int]], max_queries_per_item: int):
        bsz, t, hkv, k = block_indices.shape
        self.block_indices = block_indices.contiguous()
        self.block_size = block_size
        self.cu_seqlens = cu_seqlens
        self.num_tokens = bsz * t
        self.layout = block_layout(bsz, t, block_size, cu_seqlens, block_indices.device)
        self.starts = self.layout.starts
        self._chunk_tokens = chunk_tokens
        self.max_queries_per_item = int(max_queries_per_item)
        self._indices = {}

    @property
    def chunk_tokens(self) -> int:
        if callable(self._chunk_tokens):
            self._chunk_tokens = self._chunk_tokens()
        return max(1, min(self.num_tokens, int(self._chunk_tokens)))

    def chunks(self) -> List[Tuple[int, int]]:
        c = self.chunk_tokens
        return [(t0, min(self.num_tokens, t0 + c)) for t0 in range(0, self.num_tokens, c)]

    def blocks_before(self, token_end: int) -> int:
        return max(1, blocks_before(self.starts, token_end))

    def index(self, t0: int, t1: int) -> Tuple[ReverseIndex, int]:
        """(reverse index of tokens [t0, t1), its block limit NB'); cached per range."""
        key = (t0, t1)
        hit = self._indices.get(key)
        if hit is None:
            nbr = self.blocks_before(t1) if (t0, t1) != (0, self.num_tokens) else self.layout.num_blocks
            ri = build_reverse_index(self.block_indices, self.block_size, self.cu_seqlens, self.max_queries_per_item,
                                     token_range=(t0, t1), layout=self.layout, block_limit=nbr)
            hit = self._indices[key] = (ri, nbr)
        return hit

    def tile_union(self, tile_tokens: int, order: str = "consecutive"):
        """The ``TileUnion`` of this selection for query tiles of ``tile_tokens`` tokens in the blocks'
        token ``order`` ("consecutive" or "greedy"); cached."""
        key = ("tiles", tile_tokens, order)
        hit = self._indices.get(key)
        if hit is None:
            from .tile_union import build_tile_union  # (tile_union imports this module)
            hit = self._indices[key] = build_tile_union(self.block_indices, self.layout, self.block_size, tile_tokens,
                                                        order)
        return hit

    def mean_tile_union(self, tile_tokens: int, order: str = "consecutive") -> float:
        """Mean number of distinct blocks per non-empty (query tile, KV group) of ``tile_union``: what
        the query-tiled kernels' time grows with. One host sync on first use, then cached."""
        key = ("mean_union", tile_tokens, order)
        hit = self._indices.get(key)
        if hit is None:
            count = self.tile_union(tile_tokens, order).count
            total, nonempty = torch.stack([count.sum(dtype=torch.int64), (count > 0).sum()]).tolist()
            hit = self._indices[key] = total / max(1, nonempty)
        return hit

    def full_index(self) -> ReverseIndex:
        return self.index(0, self.num_tokens)[0]
