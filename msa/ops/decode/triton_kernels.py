"""Triton kernels of MSA decoding over a (contiguous or paged) cache.

Four launches per decode step, all with grids that depend only on the plan's capacity (not on the
current lengths, which are read from device memory), so a step is CUDA-graph capturable:

1. ``decode_index_fwd_kernel``: split-K over the index-key cache. One program per (sequence, row
   tile, block range); the rows are the t new tokens x H_kv groups of one sequence (padded to >= 16
   MMA rows), so every index key is read from HBM once per step. Writes causal block maxima.
2. ``decode_topk_fwd_kernel``: exp-free top-k on raw block scores (forced blocks get +inf, invisible
   ones -inf) per (row, chunk of blocks); with one chunk it writes the final selection directly.
3. ``decode_topk_merge_fwd_kernel``: merges the per-chunk candidates (only when several chunks).
4. ``decode_attention_fwd_kernel``: split-K over the selected blocks (or all blocks when dense); one
   program per (sequence x token, group, split) with the G heads of the group as MMA rows, then
   ``decode_merge_fwd_kernel`` combines the splits exactly through their log-sum-exps.

Token row addressing (same for K, V and index keys): contiguous ``b * S_ROWS + j``; paged
``page_table[b, j // BS] * BS + j % BS`` (page size == block size).

In the interpreter (F32=True) every load is upcast to fp32 and dots use ieee precision; on the GPU
bf16 / fp16 operands feed the tensor cores with fp32 accumulation and fp8 index keys are upcast to
the query dtype right after the load.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, F32: tl.constexpr):
    """a (M, K) @ b (K, N) with fp32 accumulation; exact fp32 products when F32."""
    if F32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def decode_index_fwd_kernel(
    q_ptr,        # (B, T, H, DI) index queries, contiguous
    k_ptr,        # index-key rows (R, DI): bf16 / fp16 / fp32 / fp8
    ks_ptr,       # fp32 scales: per row (SCALE_MODE 1) or per block of BS rows (2); dummy otherwise
    pt_ptr,       # int32 (B, PT_STRIDE) page table (PAGED) or dummy
    lens_ptr,     # int32 (B,) tokens stored per sequence (the T new ones included)
    score_ptr,    # fp32 (B, T, H, NB_CAP) causal block maxima (times the index scale)
    T, H, DI, NB_CAP, S_ROWS, PT_STRIDE, BPS, scale,
    BS: tl.constexpr, DI_PAD: tl.constexpr, ROWS: tl.constexpr,
    PAGED: tl.constexpr, SCALE_MODE: tl.constexpr, F32: tl.constexpr,
):
    b = tl.program_id(0)
    rt = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(lens_ptr + b)
    nb = (L + BS - 1) // BS
    rows = rt * ROWS + tl.arange(0, ROWS)          # row = token * H + group
    rmask = rows < T * H
    pos = L - T + rows // H                        # absolute position of each row's query
    d = tl.arange(0, DI_PAD)
    dmask = d < DI
    q = tl.load(q_ptr + (b * T * H + rows)[:, None] * DI + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    jo = tl.arange(0, BS)
    blk_end = tl.minimum(sp * BPS + BPS, nb)
    for blk in range(sp * BPS, blk_end):
        if PAGED:
            base = tl.load(pt_ptr + b * PT_STRIDE + blk).to(tl.int64) * BS
        else:
            base = b.to(tl.int64) * S_ROWS + blk * BS
        j = blk * BS + jo
        kmask = j < L
        kk = tl.load(k_ptr + (base + jo)[:, None] * DI + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        if F32:
            kk = kk.to(tl.float32)
        else:
            kk = kk.to(q.dtype)
        s = _mm(q, tl.trans(kk), F32)                # (ROWS, BS)
        if SCALE_MODE == 1:
            s = s * tl.load(ks_ptr + base + jo, mask=kmask, other=1.0)[None, :]
        s = tl.where(j[None, :] <= pos[:, None], s, float("-inf"))
        m = tl.max(s, axis=1)
        if SCALE_MODE == 2:
            m = m * tl.load(ks_ptr + base // BS)     # positive scale commutes with the max
        tl.store(score_ptr + (b * T * H + rows).to(tl.int64) * NB_CAP + blk, m * scale, mask=rmask)


@triton.jit
def _order_selection(ids, vals, local, K_PAD: tl.constexpr):
    """Index convention: valid non-local ids ascending, the local block last, -1 padding."""
    BIG: tl.constexpr = 2147483647
    valid = vals > float("-inf")
    key = tl.where(ids == local, BIG - 1, ids)
    key = tl.where(valid, key, BIG)
    key = tl.sort(key)
    out = tl.where(key == BIG - 1, local, key)
    return tl.where(key == BIG, -1, out)


@triton.jit
def decode_topk_fwd_kernel(
    score_ptr,    # fp32 (NROWS, NB_CAP) block scores, NROWS = B*T*H
    lens_ptr,     # int32 (B,)
    cand_v_ptr,   # fp32 (NROWS, NC, K_PAD) candidate scores (unused when FINAL)
    cand_i_ptr,   # int32 (NROWS, NC, K_PAD) candidate block ids (unused when FINAL)
    out_ptr,      # int32 (NROWS, TOPK) final selection (FINAL only)
    T, H, NB_CAP, NC, INIT, LOCALB,
    BS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, FINAL: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // (T * H)
    i = (row // H) % T
    L = tl.load(lens_ptr + b)
    pos = L - T + i
    # integer division truncates toward zero: a (padding) query before the sequence start sees nothing
    local = tl.where(pos >= 0, pos // BS, -1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    vis = (cols <= local) & (cols < NB_CAP)
    x = tl.load(score_ptr + row.to(tl.int64) * NB_CAP + cols, mask=vis, other=float("-inf"))
    forced = ((cols < INIT) | (cols > local - LOCALB)) & vis
    x = tl.where(forced, float("inf"), x)
    kr = tl.arange(0, K_PAD)
    sel_v = tl.full((K_PAD,), float("-inf"), tl.float32)
    sel_i = tl.full((K_PAD,), -1, tl.int32)
    for kk in tl.static_range(TOPK):
        mx = tl.max(x, axis=0)
        idx = tl.min(tl.where(x == mx, cols, 2147483647), axis=0)   # ties: lowest block id
        sel_v = tl.where(kr == kk, mx, sel_v)
        sel_i = tl.where(kr == kk, idx, sel_i)
        x = tl.where(cols == idx, float("-inf"), x)
    if FINAL:
        out = _order_selection(sel_i, sel_v, local, K_PAD)
        tl.store(out_ptr + row.to(tl.int64) * TOPK + kr, out, mask=kr < TOPK)
    else:
        off = (row.to(tl.int64) * NC + c) * K_PAD + kr
        tl.store(cand_v_ptr + off, sel_v)
        tl.store(cand_i_ptr + off, sel_i)


@triton.jit
def decode_topk_merge_fwd_kernel(
    cand_v_ptr, cand_i_ptr,   # (NROWS, NC, K_PAD)
    lens_ptr, out_ptr,        # int32 (B,), int32 (NROWS, TOPK)
    T, H, NC,
    BS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, NCK_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // (T * H)
    i = (row // H) % T
    L = tl.load(lens_ptr + b)
    local = tl.where(L - T + i >= 0, (L - T + i) // BS, -1)
    e = tl.arange(0, NCK_PAD)
    em = e < NC * K_PAD
    x = tl.load(cand_v_ptr + row.to(tl.int64) * NC * K_PAD + e, mask=em, other=float("-inf"))
    ids = tl.load(cand_i_ptr + row.to(tl.int64) * NC * K_PAD + e, mask=em, other=-1)
    kr = tl.arange(0, K_PAD)
    sel_v = tl.full((K_PAD,), float("-inf"), tl.float32)
    sel_i = tl.full((K_PAD,), -1, tl.int32)
    for kk in tl.static_range(TOPK):
        mx = tl.max(x, axis=0)
        p = tl.min(tl.where(x == mx, e, 2147483647), axis=0)
        idx = tl.sum(tl.where(e == p, ids, 0), axis=0)
        sel_v = tl.where(kr == kk, mx, sel_v)
        sel_i = tl.where(kr == kk, idx, sel_i)
        x = tl.where(e == p, float("-inf"), x)
    out = _order_selection(sel_i, sel_v, local, K_PAD)
    tl.store(out_ptr + row.to(tl.int64) * TOPK + kr, out, mask=kr < TOPK)


@triton.jit
def decode_attention_fwd_kernel(
    q_ptr,        # (B*T, HQ, D) queries, contiguous
    k_ptr, v_ptr,  # token rows (R, H, D)
    idx_ptr,      # int32 (B*T, H, TOPK) selection (sparse) or dummy (DENSE)
    pt_ptr,       # int32 (B, PT_STRIDE) or dummy
    lens_ptr,     # int32 (B,)
    o_ptr,        # fp32 (B*T, HQ, NSPLIT, D) partial outputs
    lse_ptr,      # fp32 (B*T, HQ, NSPLIT) partial log2-sum-exp (-inf when the split saw nothing)
    T, H, G, D, S_ROWS, PT_STRIDE, TOPK, NSPLIT, BPS, scale_log2,
    BS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGED: tl.constexpr, DENSE: tl.constexpr, F32: tl.constexpr,
):
    bt = tl.program_id(0)
    r = tl.program_id(1)
    sp = tl.program_id(2)
    b = bt // T
    i = bt % T
    L = tl.load(lens_ptr + b)
    pos = L - T + i
    local = tl.where(pos >= 0, pos // BS, -1)
    HQ = H * G
    hr = tl.arange(0, G_PAD)
    hmask = hr < G
    d = tl.arange(0, D_PAD)
    dmask = d < D
    q = tl.load(q_ptr + (bt.to(tl.int64) * HQ + r * G + hr)[:, None] * D + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    jo = tl.arange(0, BS)
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    for s in range(sp * BPS, sp * BPS + BPS):
        if DENSE:
            blk = s
            ok = s <= local
        else:
            blk = tl.load(idx_ptr + (bt.to(tl.int64) * H + r) * TOPK + s, mask=s < TOPK, other=-1)
            ok = (s < TOPK) & (blk >= 0) & (blk <= local)
        if ok:
            if PAGED:
                base = tl.load(pt_ptr + b * PT_STRIDE + blk).to(tl.int64) * BS
            else:
                base = b.to(tl.int64) * S_ROWS + blk * BS
            j = blk * BS + jo
            kmask = j <= pos
            off = ((base + jo) * H + r)[:, None] * D + d[None, :]
            m2 = kmask[:, None] & dmask[None, :]
            kk = tl.load(k_ptr + off, mask=m2, other=0.0)
            vv = tl.load(v_ptr + off, mask=m2, other=0.0)
            if F32:
                kk = kk.to(tl.float32)
                vv = vv.to(tl.float32)
            sc = _mm(q, tl.trans(kk), F32) * scale_log2
            sc = tl.where(kmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(p.to(vv.dtype), vv, F32)
            m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    hq = r * G + hr
    obase = (bt.to(tl.int64) * HQ + hq) * NSPLIT + sp
    tl.store(o_ptr + obase[:, None] * D + d[None, :], o, mask=hmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + obase, lse, mask=hmask)


@triton.jit
def decode_merge_fwd_kernel(
    o_part_ptr,   # fp32 (B*T*HQ, NSPLIT, D)
    lse_part_ptr,  # fp32 (B*T*HQ, NSPLIT) log2 units
    o_ptr,        # (B*T*HQ, D) output in the query dtype
    lse_ptr,      # fp32 (B*T*HQ,) natural-log lse (-inf when nothing was visible)
    D, NSPLIT,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, S_PAD)
    smask = s < NSPLIT
    d = tl.arange(0, D_PAD)
    dmask = d < D
    lse = tl.load(lse_part_ptr + row * NSPLIT + s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mxs = tl.where(mx > float("-inf"), mx, 0.0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - mxs), 0.0)
    tot = tl.sum(w, axis=0)
    op = tl.load(o_part_ptr + (row * NSPLIT + s)[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :],
                 other=0.0)
    o = tl.sum(op * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(o_ptr + row * D + d, o.to(o_ptr.dtype.element_ty), mask=dmask)
    tl.store(lse_ptr + row, tl.where(tot > 0, (mxs + tl.log2(tl.where(tot > 0, tot, 1.0))) * 0.6931471805599453,
                                     float("-inf")))
