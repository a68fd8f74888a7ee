"""Union of the blocks selected by tiles of tokens of one query block: the metadata of the query-tiled
main branch kernels (``sparse_attention`` kernel ``"tiled"``).

A query tile is ``tile_tokens`` tokens of one query block (so of one sequence and with one own block):
tile ``i`` is sub-tile ``i % subs`` of global block ``i // subs`` (``subs = ceil(block_size /
tile_tokens)``; sub-tiles past a short last block are empty). Which tokens of the block form a sub-tile
is the block's token order for that KV group (``perm``): ``"consecutive"`` (the block's tokens in
sequence order) or ``"greedy"`` (each tile seeded with the first token left, then filled one token at
a time with the token whose selection adds the fewest blocks to the tile's union, ties to the earlier
token). Any order keeps the kernels' causal structure: every token of the block selects the block
itself, the largest id of the union. For every (tile, KV group) the kernel lists the distinct block ids
its tokens selected, ascending, and for each id a bit mask of which of the tile's tokens selected it;
a query-tiled kernel then walks that list once with ``tile_tokens x G`` MMA rows, masking the rows
whose token did not select the block. Trained indexers make neighbouring tokens agree, so the list is
close to ``topk`` long; with unrelated selections it grows toward ``tile_tokens * topk``
(``msa.bench.selections.union_blocks`` measures it); grouping tokens by selection shrinks it
(``benchmarks/dev/union_order.py``, docs/perf-notes.md).

Memory: two int32 per (tile, group, slot), about T x H_kv x topk x 8 bytes per tiling (512 MiB at 1M
tokens, H_kv 4, top-16), which is why ``auto`` uses the tiled kernels only on short inputs.

Equivalent PyTorch (one tile, group r; ``rows`` = the tile's tokens in perm order, each a list of ids)::

    ids = sorted({b for row in rows for b in row if b >= 0})
    bits = [sum(1 << i for i, row in enumerate(rows) if b in row) for b in ids]

and the greedy order of one query block (``sel`` = its tokens' id sets, ``tt`` = tile_tokens)::

    left, perm = list(range(len(sel))), []
    while left:
        tile = [left.pop(0)]
        union = set(sel[tile[0]])
        while len(tile) < tt and left:
            j = min(left, key=lambda i: len(sel[i] - union))   # first such token on ties
            left.remove(j); tile.append(j); union |= sel[j]
        perm += tile
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reverse_index import BlockLayout
from .triton_helpers import next_pow2

MAX_TILE_TOKENS = 32  # one int32 bit mask per (tile, block)
TILE_ORDERS = ("consecutive", "greedy")
ORDER_MAX_WORDS = 16  # greedy order on selection bit sets up to 16 x 32 blocks per sequence, id compares above
ORDER_WARPS = 2


class TileUnion(NamedTuple):
    """ids: int32 (tiles, H_kv, tile_tokens * topk) distinct selected block ids (within the sequence),
    ascending, the first count[...] valid; bits: int32, same shape, bit i set when the tile's token i
    selected that block; count: int32 (tiles, H_kv); perm: int32 (query blocks, H_kv, block_size),
    perm[b, r, p] = offset in block b of the token at position p of the block's token order (the first
    len(block) entries valid; sub-tile s holds positions s * tile_tokens ...); tile_tokens, subs: the
    tiling; order: "consecutive" or "greedy"."""

    ids: torch.Tensor
    bits: torch.Tensor
    count: torch.Tensor
    perm: torch.Tensor
    tile_tokens: int
    subs: int
    order: str


@triton.jit
def tile_rows(tile, r, BLOCK_START, BLOCK_LEN, PERM, block_size, H_KV: tl.constexpr, G: tl.constexpr,
              TILE_T: tl.constexpr, SUBS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows m of query tile ``tile`` of group r (G rows per token): (qstart, ti, row_ok, tok) with
    qstart the flattened first token of the tile's query block, ti = m // G the token within the tile,
    row_ok the real rows and tok the flattened token (int64) of each row (PERM: the block's order)."""
    gb = tile // SUBS
    t0 = (tile % SUBS) * TILE_T
    qstart = tl.load(BLOCK_START + gb)
    qlen = tl.load(BLOCK_LEN + gb)
    m = tl.arange(0, BLOCK_M)
    ti = m // G
    row_ok = (m < TILE_T * G) & (t0 + ti < qlen)
    off = tl.load(PERM + (gb.to(tl.int64) * H_KV + r) * block_size + t0 + ti, mask=row_ok, other=0)
    tok = (qstart + off).to(tl.int64)
    return qstart, ti, row_ok, tok


@triton.jit
def union_block(UIDS, UBITS, base, u, ti, sbo, BLOCK_START, BLOCK_LEN):
    """Entry u of a tile's union (``base`` = (tile * H_kv + r) * UMAX; sbo = global id of block 0 of
    the sequence): (row_hit, kstart, klen): which rows' tokens selected the block, and where it lies."""
    row_hit = ((tl.load(UBITS + base + u) >> ti) & 1) != 0
    gbk = sbo + tl.load(UIDS + base + u)
    return row_hit, tl.load(BLOCK_START + gbk), tl.load(BLOCK_LEN + gbk)


@triton.jit
def _popcount32(x):
    """Set bits of each uint32 (SWAR), as int32."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _greedy_pick(p, adds, left, i, out, TILE_T: tl.constexpr, BLOCK_T: tl.constexpr):
    """Step p of the greedy order: a new tile takes the first token left; inside a tile the token
    adding the fewest blocks (adds), then the earliest. Stores it at out + p; returns (pick, left)."""
    seed = p % TILE_T == 0
    key = tl.where(left, tl.where(seed, 0, adds) * BLOCK_T + i, 2147483647)
    pick = tl.min(key, 0) % BLOCK_T
    tl.store(out + p, pick)
    return pick, left & (i != pick)


@triton.jit
def tile_order_kernel(BI, BLOCK_START, BLOCK_LEN, PERM, block_size, H_KV: tl.constexpr, TOPK: tl.constexpr,
                      TILE_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
    """Greedy token order of one (query block, group) (module docstring): BI int32 (T_all, H_KV, TOPK),
    PERM int32 (blocks, H_KV, block_size). A token adds as many blocks as its selection has ids outside
    the current tile's union. WORDS > 0: selections and union are bit sets of WORDS uint32 words (ids
    below 32 * WORDS), so a step is a popcount per token and one OR. WORDS == 0: covered[i, j] says
    token i's j-th id is in the union (padding slots count as covered) and taking a token compares its
    ids with every row, slower but for any number of blocks."""
    gb = tl.program_id(0)
    r = tl.program_id(1)
    qstart = tl.load(BLOCK_START + gb)
    qlen = tl.load(BLOCK_LEN + gb)
    i = tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_K)
    ids = tl.load(BI + ((qstart + i).to(tl.int64) * H_KV + r)[:, None] * TOPK + j[None, :],
                  mask=(i < qlen)[:, None] & (j < TOPK)[None, :], other=-1)
    padding = ids < 0
    left = i < qlen
    out = PERM + (gb.to(tl.int64) * H_KV + r) * block_size
    if WORDS > 0:
        # selected ids are distinct, so summing their bits within a word is an OR
        w = tl.arange(0, WORDS)
        bit = tl.full([BLOCK_T, BLOCK_K], 1, tl.uint32) << (ids % 32).to(tl.uint32)
        in_word = (ids >= 0)[:, :, None] & ((ids // 32)[:, :, None] == w[None, None, :])
        sel = tl.sum(tl.where(in_word, bit[:, :, None], tl.zeros([BLOCK_T, BLOCK_K, WORDS], tl.uint32)), 1)
        union = tl.zeros([WORDS], tl.uint32)
        for p in range(qlen):
            union = tl.where(p % TILE_T == 0, tl.zeros([WORDS], tl.uint32), union)
            adds = tl.sum(_popcount32(sel & ~union[None, :]), 1)
            pick, left = _greedy_pick(p, adds, left, i, out, TILE_T, BLOCK_T)
            union = union | tl.sum(tl.where((i == pick)[:, None], sel, tl.zeros([BLOCK_T, WORDS], tl.uint32)), 0)
    else:
        covered = padding
        for p in range(qlen):
            covered = tl.where(p % TILE_T == 0, padding, covered)
            adds = tl.sum(tl.where(covered, 0, 1), 1)
            pick, left = _greedy_pick(p, adds, left, i, out, TILE_T, BLOCK_T)
            # the picked token's ids as scalar loads (cached), not extracted from `ids` by reductions
            row = BI + ((qstart + pick).to(tl.int64) * H_KV + r) * TOPK
            for m in tl.static_range(TOPK):
                x = tl.load(row + m)
                covered = covered | ((ids == x) & (x >= 0))


@triton.jit
def tile_union_kernel(BI, BLOCK_START, BLOCK_LEN, PERM, IDS, BITS, COUNT, block_size, H_KV: tl.constexpr,
                      TOPK: tl.constexpr, TILE_T: tl.constexpr, SUBS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """One program per (tile, group): BI int32 (T_all, H_KV, TOPK); PERM int32 (blocks, H_KV,
    block_size); IDS/BITS int32 (tiles, H_KV, TILE_T * TOPK); COUNT int32 (tiles, H_KV). Each step
    takes the smallest id above the last one."""
    tile = tl.program_id(0)
    r = tl.program_id(1)
    _, i, tok_ok, tok = tile_rows(tile, r, BLOCK_START, BLOCK_LEN, PERM, block_size, H_KV, 1, TILE_T, SUBS,
                                  BLOCK_T)
    j = tl.arange(0, BLOCK_K)
    big = 2147483647
    ids = tl.load(BI + (tok * H_KV + r)[:, None] * TOPK + j[None, :], mask=tok_ok[:, None] & (j < TOPK)[None, :],
                  other=-1)
    ids = tl.where(ids >= 0, ids, big)
    base = (tile.to(tl.int64) * H_KV + r) * (TILE_T * TOPK)
    n = 0
    nxt = tl.min(tl.min(ids, 1), 0)
    while nxt < big:
        hit = tl.max(tl.where(ids == nxt, 1, 0), 1)  # (BLOCK_T,): token i selected nxt
        bits = tl.sum(hit << i, 0)
        tl.store(IDS + base + n, nxt)
        tl.store(BITS + base + n, bits)
        n += 1
        nxt = tl.min(tl.min(tl.where(ids > nxt, ids, big), 1), 0)
    tl.store(COUNT + tile * H_KV + r, n)


def tile_tokens_for(group: int, block_m: int, block_size: int) -> int:
    """Tokens per query tile: as many as fill ``block_m`` MMA rows with G heads each (at least 1, at
    most 32 and at most block_size)."""
    return max(1, min(MAX_TILE_TOKENS, block_size, block_m // max(1, group)))


def build_tile_union(block_indices: torch.Tensor, layout: BlockLayout, block_size: int,
                     tile_tokens: int, order: str = "consecutive") -> TileUnion:
    """block_indices int32 (B, T, H_kv, K) (validated, spec convention); layout of the same tokens;
    order: the query blocks' token order, "consecutive" or "greedy" (module docstring)."""
    bi = block_indices.contiguous()
    perm = tile_order(bi, layout, block_size, tile_tokens, order)  # validates tile_tokens and order
    hkv, topk = bi.shape[2], bi.shape[3]
    subs = math.ceil(block_size / tile_tokens)
    tiles = layout.num_blocks * subs
    dev = bi.device
    ids = torch.empty(tiles, hkv, tile_tokens * topk, dtype=torch.int32, device=dev)
    bits = torch.empty_like(ids)
    count = torch.empty(tiles, hkv, dtype=torch.int32, device=dev)
    tile_union_kernel[(tiles, hkv)](bi, layout.block_start, layout.block_len, perm, ids, bits, count, block_size,
                                    H_KV=hkv, TOPK=topk, TILE_T=tile_tokens, SUBS=subs,
                                    BLOCK_T=next_pow2(tile_tokens), BLOCK_K=next_pow2(topk), num_warps=1)
    return TileUnion(ids, bits, count, perm, tile_tokens, subs, order if tile_tokens > 1 else "consecutive")


def tile_order(block_indices: torch.Tensor, layout: BlockLayout, block_size: int, tile_tokens: int,
               order: str) -> torch.Tensor:
    """TileUnion.perm alone: int32 (num_blocks, H_kv, block_size), perm[b, r, p] = offset in block b of
    the token at position p of the block's token order; the identity for "consecutive" or one-token
    tiles, else the greedy order of the module docstring. block_indices int32 (B, T, H_kv, K)."""
    if not 1 <= tile_tokens <= MAX_TILE_TOKENS:
        raise ValueError(f"tile_tokens must be in [1, {MAX_TILE_TOKENS}], got {tile_tokens}")
    if order not in TILE_ORDERS:
        raise ValueError(f"order must be one of {TILE_ORDERS}, got {order!r}")
    block_indices = block_indices.contiguous()
    hkv, topk = block_indices.shape[2], block_indices.shape[3]
    nb, dev = layout.num_blocks, block_indices.device
    if order != "greedy" or tile_tokens == 1:  # one tile of one token has one order
        return _consecutive(nb, hkv, block_size, dev)
    perm = torch.empty(nb, hkv, block_size, dtype=torch.int32, device=dev)
    # block ids are within a sequence, so below cdiv(T, block_size) (B sequences or a packed batch)
    words = next_pow2(triton.cdiv(triton.cdiv(block_indices.shape[1], block_size), 32))
    tile_order_kernel[(nb, hkv)](block_indices, layout.block_start, layout.block_len, perm, block_size, H_KV=hkv,
                                 TOPK=topk, TILE_T=tile_tokens, BLOCK_T=next_pow2(block_size),
                                 BLOCK_K=next_pow2(topk), WORDS=words if words <= ORDER_MAX_WORDS else 0,
                                 num_warps=ORDER_WARPS)
    return perm


def _consecutive(nb: int, hkv: int, block_size: int, dev) -> torch.Tensor:
    """The identity order as an int32 (nb, hkv, block_size) table (one broadcast copy, no host sync)."""
    return torch.arange(block_size, dtype=torch.int32, device=dev).expand(nb, hkv, block_size).contiguous()
