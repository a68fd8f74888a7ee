"""Exp-free block top-k in Triton (spec section 4: "exp-free top-k for small k").

Ranking only needs an order, so no softmax/exp is computed. Every fp32 score is mapped to an
order-preserving int32 key (negative floats get their 31 magnitude bits flipped); excluded entries
(-inf, NaN, masked) get SENT = INT32_MIN, below every real key. Ties are broken by the smaller column,
like a stable sort.

Only 32-bit reductions are used. (An earlier version packed (key << 32) | (BIAS - col) into ONE int64
and reduced that with tl.max: correct in the interpreter but WRONG on sm_90 for some layouts, e.g.
[2, 128] rows x segments with 4 warps; tests/ops/test_topk.py::test_gpu_layouts pins those configs. 64-bit integer
reductions go through a different lowering path than 32-bit ones (32-bit max/min can use redux.sync)
and we do not want the selection to depend on it; two 32-bit reductions per pick are also not slower
than one 64-bit reduction, which is emulated with 32-bit shuffles anyway.)

Work per row is cut by segment pruning: the row is split into NSEG segments of SEG columns and each
segment is reduced to its maximum key. Under the (key desc, column asc) total order the top-k elements of
the row lie inside the top-k segments ordered by (segment max desc, segment index asc): a segment holding
a top-k element has a maximum >= that element, there are only k such elements, and for equal maxima the
lower segment index holds the lower column. So the kernel
  1. selects the k best segments (k rounds of max + min-index over NSEG values),
  2. re-reads only those k*SEG columns (L1/L2-hot) and selects k elements (k rounds of max + min-column).
With SEG ~ sqrt(N / k) both phases are O(k * sqrt(N k)) instead of O(k * N).

Rows wider than MAX_TILE columns are handled in two stages: stage 1 writes each column tile's k best
(key, column) candidates in rank order, stage 2 runs the same kernel over the candidates (IN_PACKED);
candidate positions are ordered like columns among equal keys (tiles ascend, ranks within a tile are by
(key desc, column asc)), so the positional segment tie-break stays exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils.triton_helpers import interpreting, next_pow2

SENTINEL = -2147483648  # INT32_MIN: smaller than key(-inf) = -2139095041 and key(-NaN)
BIG_COL = 2147483647    # "no column" for min-column reductions
MAX_TILE = 8192  # columns one program keeps in registers


@triton.jit
def order_bits(v):
    """fp32 -> int32 whose integer order is the float order (-inf lowest, NaN with sign bit below)."""
    bits = v.to(tl.int32, bitcast=True)
    # Negative floats order inversely by their magnitude bits: flip the 31 low bits of negatives.
    # (bits >> 31 is an arithmetic shift of a signed int32: 0 or -1.)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key(v, valid, SENT: tl.constexpr):
    """fp32 values -> order-preserving int32 keys (SENT where invalid, -inf or NaN)."""
    return tl.where(valid & (v > float("-inf")), order_bits(v), SENT)


@triton.jit
def block_topk_fwd_kernel(
    x_ptr, xc_ptr, stride_xr, out_ptr, outc_ptr, stride_or, pos_ptr,
    n_rows, n_cols, tile_cols, out_row_off, pos_tok_off, heads, block_size, init_blocks, local_blocks, topk,
    IN_PACKED: tl.constexpr, HAS_POS: tl.constexpr, OUT_MODE: tl.constexpr,
    ROWS: tl.constexpr, NSEG: tl.constexpr, SEG: tl.constexpr, KP: tl.constexpr,
    SENT: tl.constexpr, BIG: tl.constexpr,
):
    """Top-k of ROWS rows x one column tile.

    x: fp32 (rows, n_cols) scores; or, when IN_PACKED, int32 keys with their int32 original columns in
      xc (same strides).
    HAS_POS: row r is (token pos_tok_off + r // heads, group r % heads); its local block is
      pos[token] // block_size, columns beyond it are invisible; when not IN_PACKED the local block,
      the local_blocks trailing and the init_blocks leading visible blocks are forced (+inf).
    OUT_MODE 0: int32 ids (descending score, -1 padding); 1: the MSA index convention (local block in
      the last valid slot); 2: int32 candidate keys (out) and columns (outc) at tile*topk + rank.
    """
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    seg = tl.arange(0, NSEG)
    inner = tl.arange(0, SEG)
    kp = tl.arange(0, KP)
    col_off = pid_t * tile_cols

    if HAS_POS:
        tok = pos_tok_off + rows // heads
        pos = tl.load(pos_ptr + tok, mask=rmask, other=0)
        local = pos // block_size
    else:
        local = tl.full([ROWS], 2147483647, tl.int32)
    # Causal visibility applies to block columns; candidates' positions are not block ids.
    if IN_PACKED:
        limit = tl.full([ROWS], 2147483647, tl.int32)
    else:
        limit = local

    # ---- phase 0: maximum key of every segment of this tile -----------------------------------------
    cols = col_off + seg[None, :, None] * SEG + inner[None, None, :]  # [1, NSEG, SEG]
    cmask = (cols < n_cols) & (cols < col_off + tile_cols)
    valid = rmask[:, None, None] & cmask & (cols <= limit[:, None, None])
    if IN_PACKED:
        key = tl.load(x_ptr + rows64[:, None, None] * stride_xr + cols, mask=valid, other=SENT)
    else:
        v = tl.load(x_ptr + rows64[:, None, None] * stride_xr + cols, mask=valid, other=float("-inf"))
        if HAS_POS:
            lc = local[:, None, None]
            forced = (cols < init_blocks) | (cols > lc - local_blocks)
            v = tl.where(forced, float("inf"), v)
        key = _key(v, valid, SENT)
    segmax = tl.max(key, axis=2)  # [ROWS, NSEG]

    # ---- phase 1: the k best segments by (max desc, index asc) --------------------------------------
    segsel = tl.full([ROWS, KP], -1, tl.int32)
    for it in range(topk):
        w = tl.max(segmax, axis=1)
        s_id = tl.min(tl.where(segmax == w[:, None], seg[None, :], NSEG), axis=1)
        segmax = tl.where(seg[None, :] == s_id[:, None], SENT, segmax)
        # A SENT winner means every remaining segment is empty: gather nothing for it.
        s_id = tl.where(w == SENT, -1, s_id)
        segsel = tl.where(kp[None, :] == it, s_id[:, None], segsel)

    # ---- phase 2: the k best elements inside the chosen segments ------------------------------------
    cols2 = col_off + segsel[:, :, None] * SEG + inner[None, None, :]  # [ROWS, KP, SEG]
    valid2 = (rmask[:, None, None] & (segsel[:, :, None] >= 0) & (cols2 < n_cols)
              & (cols2 < col_off + tile_cols) & (cols2 <= limit[:, None, None]))
    if IN_PACKED:
        cand = tl.load(x_ptr + rows64[:, None, None] * stride_xr + cols2, mask=valid2, other=SENT)
        ccol = tl.load(xc_ptr + rows64[:, None, None] * stride_xr + cols2, mask=valid2, other=BIG)
    else:
        v2 = tl.load(x_ptr + rows64[:, None, None] * stride_xr + cols2, mask=valid2, other=float("-inf"))
        if HAS_POS:
            lc2 = local[:, None, None]
            forced2 = (cols2 < init_blocks) | (cols2 > lc2 - local_blocks)
            v2 = tl.where(forced2, float("inf"), v2)
        cand = _key(v2, valid2, SENT)
        ccol = tl.where(valid2, cols2, BIG)
    # Nested 3D reductions, no tl.reshape: reshaping [ROWS, KP, SEG] to [ROWS, KP * SEG] selected
    # columns that were not maxima on sm_90 (triton 3.6; correct in the interpreter).
    res_k = tl.full([ROWS, KP], SENT, tl.int32)
    res_c = tl.full([ROWS, KP], -1, tl.int32)
    for it in range(topk):
        w = tl.max(tl.max(cand, axis=2), axis=1)
        c = tl.min(tl.min(tl.where(cand == w[:, None, None], ccol, BIG), axis=2), axis=1)
        # columns are unique within a row, so this removes exactly the winner
        cand = tl.where(ccol == c[:, None, None], SENT, cand)
        c = tl.where(w == SENT, -1, c)
        res_k = tl.where(kp[None, :] == it, w[:, None], res_k)
        res_c = tl.where(kp[None, :] == it, c[:, None], res_c)

    kmask = rmask[:, None] & (kp[None, :] < topk)
    if OUT_MODE == 2:
        optr = rows64[:, None] * stride_or + pid_t * topk + kp[None, :]
        tl.store(out_ptr + optr, res_k, mask=kmask)
        tl.store(outc_ptr + optr, res_c, mask=kmask)
    else:
        ids = res_c
        if OUT_MODE == 1:
            # Index convention: the local block goes to the last valid slot (swap with whatever is there).
            nv = tl.sum((ids >= 0).to(tl.int32), axis=1)
            last = tl.sum(tl.where(kp[None, :] == nv[:, None] - 1, ids, 0), axis=1)
            ids = tl.where(ids == local[:, None], last[:, None], ids)
            ids = tl.where(kp[None, :] == nv[:, None] - 1, local[:, None], ids)
        optr = out_ptr + (out_row_off + rows64[:, None]) * stride_or + kp[None, :]
        tl.store(optr, ids, mask=kmask)




def topk_config(n_cols: int, topk: int, rows: Optional[int] = None, seg: Optional[int] = None,
                num_warps: Optional[int] = None, max_tile: int = MAX_TILE):
    """(tile_cols, ROWS, NSEG, SEG, KP, num_warps) for one launch over n_cols columns.

    Defaults: about 8192 elements per program (SEG 8, 8 rows per program, 4 warps at 1024 columns,
    k 16; measured choice in docs/perf-notes.md).
    """
    rows_given = rows
    kp = next_pow2(topk)
    tile = min(next_pow2(n_cols), max_tile)
    if seg is None:
        # SEG ~ sqrt(N / k) balances the segment pass (k * N / SEG) and the element pass (k * k * SEG).
        seg = next_pow2(int(round((tile / max(1, topk)) ** 0.5)))
        seg = max(1, min(seg, 64, tile))
    nseg = max(1, tile // seg)
    if rows is None:
        work = max(nseg * seg, kp * seg)
        rows = max(1, min(16, 8192 // work))
    if num_warps is None:
        work = rows * max(nseg * seg, kp * seg)
        num_warps = 1 if work <= 256 else 2 if work <= 1024 else 4 if work <= 8192 else 8
    if interpreting():
        # The interpreter pays per op, not per element: few wide programs are much faster.
        num_warps = 1
        if rows_given is None:
            rows = max(rows, min(256, next_pow2(max(1, 65536 // max(nseg * seg, kp * seg)))))
    return nseg * seg, rows, nseg, seg, kp, num_warps


def launch_block_topk(x: torch.Tensor, out: torch.Tensor, topk: int, *, n_cols: Optional[int] = None,
                      pos: Optional[torch.Tensor] = None, pos_tok_off: int = 0, heads: int = 1,
                      block_size: int = 1, init_blocks: int = 0, local_blocks: int = 1, out_row_off: int = 0,
                      convention: bool = False, rows: Optional[int] = None, seg: Optional[int] = None,
                      num_warps: Optional[int] = None, max_tile: int = MAX_TILE,
                      cand_cols: Optional[torch.Tensor] = None) -> None:
    """Top-k of every row of x (R, >= n_cols) fp32 into out[out_row_off + r, :topk] (int32).

    With pos (int32 per token) the rows are (token, group) pairs of the Index Branch: forcing, causal
    visibility and (convention=True) the MSA index convention are applied in the kernel.
    Rows wider than max_tile columns go through (key, column) candidates (two stages, recursively);
    cand_cols is internal: x then holds int32 candidate keys and cand_cols their columns (same strides).
    """
    n_rows = x.shape[0]
    n_cols = x.shape[1] if n_cols is None else n_cols
    # each tile must shrink the row (tile -> k candidates), or the two-stage recursion never ends
    max_tile = max(max_tile, 4 * next_pow2(topk))
    if n_rows == 0:
        return
    packed = cand_cols is not None
    xc = cand_cols if packed else x
    has_pos = pos is not None
    pos_arg = pos if has_pos else x
    mode = 1 if convention else 0
    tile, r, nseg, sg, kp, nw = topk_config(n_cols, topk, rows, seg, num_warps, max_tile)
    if n_cols <= tile:
        grid = (triton.cdiv(n_rows, r), 1)
        block_topk_fwd_kernel[grid](
            x, xc, x.stride(0), out, out, out.stride(0), pos_arg, n_rows, n_cols, tile, out_row_off, pos_tok_off,
            heads, block_size, init_blocks, local_blocks, topk,
            IN_PACKED=packed, HAS_POS=has_pos, OUT_MODE=mode, ROWS=r, NSEG=nseg, SEG=sg, KP=kp,
            SENT=SENTINEL, BIG=BIG_COL, num_warps=nw)
        return
    # Stage 1: the k best (key, column) candidates of every column tile (forcing applied here).
    n_tiles = triton.cdiv(n_cols, tile)
    cand = torch.empty(2, n_rows, n_tiles * topk, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n_rows, r), n_tiles)
    block_topk_fwd_kernel[grid](
        x, xc, x.stride(0), cand[0], cand[1], cand.stride(1), pos_arg, n_rows, n_cols, tile, 0, pos_tok_off,
        heads, block_size, init_blocks, local_blocks, topk,
        IN_PACKED=packed, HAS_POS=has_pos, OUT_MODE=2, ROWS=r, NSEG=nseg, SEG=sg, KP=kp,
        SENT=SENTINEL, BIG=BIG_COL, num_warps=nw)
    # Stage 2: candidates carry their original columns (and forcing), so a plain top-k over them
    # finishes the job; visibility is already applied, hence no pos-based masking of candidate columns.
    launch_block_topk(cand[0], out, topk, pos=pos if convention else None, pos_tok_off=pos_tok_off, heads=heads,
                      block_size=block_size, out_row_off=out_row_off, convention=convention,
                      max_tile=max_tile, num_warps=num_warps, cand_cols=cand[1])


# ---- in-register top-k of short 1-D rows (the decode kernels) --------------------------------------
# A decode row (one token x group) has at most a few thousand candidates already in registers, so it is
# packed into int64 (score order bits, reversed block id) and reduced with max (1-D, or [ROWS, C] tiles
# of the group's rows), or sorted bitonically with tl.topk up to 1024 entries. The packed int64 max is
# what the module docstring warns about for [2, 128] x 4-warp layouts; the decode layouts are pinned by
# tests/ops/test_decode*.py on the GPU (all pass on an H200, 2026-12-04). The prefill top-k above keeps
# to 32-bit reductions.


@triton.jit
def pack_score_id(x, ids):
    """(score fp32, block id >= 0) -> int64 whose integer order is (score, then LOWER id) order, so
    one max reduction is an argmax with the lowest-id tie break. Float bits are made monotone by
    flipping the magnitude bits of negative values; -inf packs above EMPTY (int64 min)."""
    return (order_bits(x).to(tl.int64) << 32) | (2147483647 - ids).to(tl.int64)


@triton.jit
def unpack_id(p):
    low = p - ((p >> 32) << 32)                   # the low 32 bits (arithmetic shifts)
    return (2147483647 - low).to(tl.int32)


@triton.jit
def topk_packed(x, TOPK: tl.constexpr, K_PAD: tl.constexpr, BITONIC: tl.constexpr = True):
    """The TOPK largest of the packed keys x (1-D), as a (K_PAD,) vector (EMPTY beyond)."""
    EMPTY: tl.constexpr = -9223372036854775808
    kr = tl.arange(0, K_PAD)
    if BITONIC and x.shape[0] >= K_PAD and x.shape[0] <= 1024:
        # bitonic top-k (log-depth compare-exchange stages) instead of TOPK dependent max reductions; above
        # 1024 entries the reductions are faster (docs/perf-notes.md, decode top-k)
        return tl.where(kr < TOPK, tl.topk(x, K_PAD), EMPTY)
    sel = tl.full((K_PAD,), EMPTY, tl.int64)
    for kk in tl.static_range(TOPK):
        mx = tl.max(x, axis=0)
        sel = tl.where(kr == kk, mx, sel)
        x = tl.where(x == mx, EMPTY, x)            # packed keys are unique (ids differ)
    return sel


@triton.jit
def topk_packed_rows(p, ROWS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr):
    """Per row of the packed keys p (ROWS, C): its TOPK largest as (ROWS, K_PAD), EMPTY beyond."""
    EMPTY: tl.constexpr = -9223372036854775808
    kr = tl.arange(0, K_PAD)
    sel = tl.full((ROWS, K_PAD), EMPTY, tl.int64)
    for kk in tl.static_range(TOPK):
        mx = tl.max(p, axis=1)
        sel = tl.where(kr[None, :] == kk, mx[:, None], sel)
        p = tl.where(p == mx[:, None], EMPTY, p)   # packed keys are unique (ids differ)
    return sel
