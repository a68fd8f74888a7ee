"""Triton kernels of MSA decoding over a (contiguous or paged) cache.

Every grid depends only on the plan's capacity (not on the current lengths, which are read from
device memory), so a step is CUDA-graph capturable. Two launch chains (``DecodePlan(fused=...)``):

Fused chain (default; 2 launches, a 3rd only when the attention is split):

1. ``decode_index_fwd_kernel`` with LOCAL_TOPK: split-K over the index-key cache. One program per
   (sequence, row tile, range of tiles of NBT blocks); the rows are the t new tokens x H_kv groups of
   one sequence (padded to >= 16 MMA rows), so every index key is read from HBM once per step. The
   causal block maxima of the program's range stay in registers and its epilogue writes the range's
   exp-free top-k as packed (score, id) int64 candidates (forced blocks +inf, invisible ones left out).
2. ``decode_attention_fwd_kernel`` with FUSED_SEL: every program (sequence x token, group, split)
   first merges the per-range candidates of its row itself (a few thousand int64 at 1M tokens:
   redundant across the splits of a row but cheaper than a launch), split 0 writes the selection,
   then split-K attention over the selected blocks with the G heads of the group as MMA rows. With
   ONE split (DIRECT) the program writes the final output and lse itself; otherwise
   ``decode_merge_fwd_kernel`` combines the splits exactly through their log-sum-exps.

Legacy chain (``fused=False``, kept for comparison; 4-5 launches): index kernel writing every block
maximum (fp32, B*T*H*NB floats) -> ``decode_topk_fwd_kernel`` per (row, chunk of blocks) ->
``decode_topk_merge_fwd_kernel`` (several chunks) -> attention reading the selection -> merge.

Exp-free top-k: score and block id are packed in one int64, so the selection compares plain integers
(ties: the lower block id wins, in every chain): ``tl.topk``'s bitonic network for up to 1024
candidates, above that k max reductions (``msa.tuning`` decode_bitonic=False: reductions everywhere).

Token row addressing (same for K, V and index keys): contiguous ``b * S_ROWS + j``; paged
``page_table[b, j // BS] * BS + j % BS`` (page size == block size).

In the interpreter (F32=True) every load is upcast to fp32 and dots use ieee precision; on the GPU
bf16 / fp16 operands feed the tensor cores with fp32 accumulation and fp8 index keys are upcast right
after the load: to fp16 for bf16 queries (FP8_F16: the queries rescaled per row by a power of two),
else to the query dtype. EVEN_D (the head dim is a power of two >= 16) drops the mask
along the head dim so loads stay 16-byte vectors.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..topk.triton_kernels import pack_score_id, topk_packed, topk_packed_rows, unpack_id

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
    out_ptr,      # LOCAL_TOPK: int64 (B*T*H, NSPLIT, C_PAD) packed candidates of each program's range;
                  # else fp32 (B, T, H, NB_CAP) causal block maxima (times the index scale)
    T, H, DI, NB_CAP, S_ROWS, PT_STRIDE, TPS, NSPLIT, INIT, LOCALB, scale,
    BS: tl.constexpr, NBT: tl.constexpr, DI_PAD: tl.constexpr, ROWS: tl.constexpr,
    PAGED: tl.constexpr, SCALE_MODE: tl.constexpr, F32: tl.constexpr, EVEN_D: tl.constexpr,
    LOCAL_TOPK: tl.constexpr, NT_PAD: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr,
    C_PAD: tl.constexpr, PDL: tl.constexpr = False, FP8_F16: tl.constexpr = False,
):
    """Program (b, row tile, split) streams TPS tiles of NBT blocks (NBT * BS key rows per tile: fp8
    keys use NBT = 2 so one tile is still 32 KB of HBM traffic at d_idx 128). LOCAL_TOPK: the TPS * NBT
    block maxima (NT_PAD >= TPS) are kept in registers and the epilogue writes their top-k (C_PAD =
    min(K_PAD, NT_PAD * NBT) packed candidates, EMPTY-padded).

    FP8_F16 (fp8 keys, bf16 queries, GPU): the keys go to fp16 (one packed e4m3x2 -> f16x2 convert per
    two values; bf16 would need a second convert per value, which made the scan conversion-bound) and
    the queries to fp16 after an exact power-of-two rescale per row (|q| <= 2^14, so no overflow;
    components below ~2^-17 of the row maximum's scale lose bits, far below the fp8 keys' own
    precision); the block maxima are scaled back (a positive row factor commutes with the max)."""
    EMPTY: tl.constexpr = -9223372036854775808
    b = tl.program_id(0)
    rt = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(lens_ptr + b)
    nb = (L + BS - 1) // BS
    ntile = (nb + NBT - 1) // NBT
    rows = rt * ROWS + tl.arange(0, ROWS)          # row = token * H + group
    rmask = rows < T * H
    pos = L - T + rows // H                        # absolute position of each row's query
    d = tl.arange(0, DI_PAD)
    if EVEN_D:
        # no mask along d: the loads stay 16-byte vectors
        dmask = d < DI_PAD
    else:
        dmask = d < DI
    q = tl.load(q_ptr + (b * T * H + rows)[:, None] * DI + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if FP8_F16:
        qf = q.to(tl.float32)
        qa = tl.max(tl.abs(qf), axis=1)
        qsh = tl.where(qa > 16384.0, tl.exp2(tl.ceil(tl.log2(qa)) - 14.0), 1.0)   # power of two: exact
        q = (qf / qsh[:, None]).to(tl.float16)
        if F32:  # interpreter: the same fp16 queries, fp32 products
            q = q.to(tl.float32)
    elif F32:
        q = q.to(tl.float32)
    KT: tl.constexpr = NBT * BS
    jo = tl.arange(0, KT)
    bo = tl.arange(0, NBT)
    sbase = (b * T * H + rows).to(tl.int64) * NB_CAP
    t0 = sp * TPS
    t_end = tl.minimum(t0 + TPS, ntile)
    if LOCAL_TOPK:
        to = tl.arange(0, NT_PAD)
        if NBT == 1:
            acc = tl.full((ROWS, NT_PAD), float("-inf"), tl.float32)
        else:
            acc3 = tl.full((ROWS, NT_PAD, NBT), float("-inf"), tl.float32)
    for tt in range(t0, t_end):
        blk0 = tt * NBT
        j = blk0 * BS + jo                         # absolute key positions of the tile
        kmask = j < L
        if PAGED:
            # one page-table entry per key row (a tile may span several, non-adjacent, pages)
            page = tl.load(pt_ptr + b * PT_STRIDE + j // BS, mask=kmask, other=0).to(tl.int64)
            krow = page * BS + (jo % BS)
        else:
            krow = b.to(tl.int64) * S_ROWS + j
        if EVEN_D:
            kk = tl.load(k_ptr + krow[:, None] * DI_PAD + d[None, :], mask=kmask[:, None], other=0.0)
        else:
            kk = tl.load(k_ptr + krow[:, None] * DI + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        if F32:
            kk = kk.to(tl.float32)
        else:
            kk = kk.to(q.dtype)                    # fp8 -> bf16 / fp16 is exact: scales applied in fp32 below
        s = _mm(q, tl.trans(kk), F32)              # (ROWS, KT)
        if SCALE_MODE == 1:
            s = s * tl.load(ks_ptr + krow, mask=kmask, other=1.0)[None, :]
        s = tl.where(j[None, :] <= pos[:, None], s, float("-inf"))
        blk = blk0 + bo
        bmask = blk < nb
        if NBT == 1:
            m = tl.max(s, axis=1)[:, None]         # (ROWS, 1)
        else:
            m = tl.max(tl.reshape(s, (ROWS, NBT, BS)), axis=2)   # (ROWS, NBT)
        if FP8_F16:
            m = m * qsh[:, None]
        if SCALE_MODE == 2:
            # a positive per-block scale commutes with the max
            if PAGED:
                srow = tl.load(pt_ptr + b * PT_STRIDE + blk, mask=bmask, other=0).to(tl.int64)
            else:
                srow = (b.to(tl.int64) * S_ROWS) // BS + blk
            m = m * tl.load(ks_ptr + srow, mask=bmask, other=1.0)[None, :]
        if LOCAL_TOPK:
            # park the tile's maxima in this program's register array (column = tile within the range)
            if NBT == 1:
                acc = tl.where(to[None, :] == tt - t0, m * scale, acc)
            else:
                acc3 = tl.where(to[None, :, None] == tt - t0, (m * scale)[:, None, :], acc3)
        else:
            tl.store(out_ptr + sbase[:, None] + blk[None, :], m * scale, mask=rmask[:, None] & bmask[None, :])
    if PDL:
        # programmatic dependent launch: the next kernel of the chain may start its prologue now (it
        # waits with gdc_wait before reading what this kernel writes)
        gdc_launch_dependents()
    if LOCAL_TOPK:
        P_PAD: tl.constexpr = NT_PAD * NBT
        if NBT != 1:
            acc = tl.reshape(acc3, (ROWS, P_PAD))
        cols = t0 * NBT + tl.arange(0, P_PAD)      # block id of each column
        # integer division truncates toward zero: a (padding) query before the sequence start sees nothing
        local = tl.where(pos >= 0, pos // BS, -1)
        vis = (cols[None, :] <= local[:, None]) & (cols[None, :] < t_end * NBT)
        forced = ((cols[None, :] < INIT) | (cols[None, :] > local[:, None] - LOCALB)) & vis
        x = tl.where(forced, float("inf"), acc)
        # -inf (no visible token: cannot happen for a visible block) stays out of the selection
        p = tl.where(vis & (x > float("-inf")), pack_score_id(x, cols[None, :]), EMPTY)
        cbase = ((b * T * H + rows).to(tl.int64) * NSPLIT + sp) * C_PAD
        kr = tl.arange(0, C_PAD)
        if P_PAD <= C_PAD:
            tl.store(out_ptr + cbase[:, None] + kr[None, :], p, mask=rmask[:, None])
        else:
            sel = topk_packed_rows(p, ROWS, TOPK, C_PAD)
            tl.store(out_ptr + cbase[:, None] + kr[None, :], sel, mask=rmask[:, None])


@triton.jit
def _order_selection(ids, valid, local, K_PAD: tl.constexpr):
    """Index convention: valid non-local ids ascending, the local block last, -1 padding."""
    BIG: tl.constexpr = 2147483647
    key = tl.where(ids == local, BIG - 1, ids)
    key = tl.where(valid, key, BIG)
    key = tl.sort(key)
    out = tl.where(key == BIG - 1, local, key)
    return tl.where(key == BIG, -1, out)


@triton.jit
def _select_from_candidates(x, local, TOPK: tl.constexpr, K_PAD: tl.constexpr, BITONIC: tl.constexpr = True):
    """Final selection (K_PAD,) int32 in the index convention from packed candidates x (1-D)."""
    EMPTY: tl.constexpr = -9223372036854775808
    sel = topk_packed(x, TOPK, K_PAD, BITONIC)
    return _order_selection(unpack_id(sel), sel != EMPTY, local, K_PAD)


@triton.jit
def decode_topk_fwd_kernel(
    score_ptr,    # fp32 (NROWS, NB_CAP) block scores, NROWS = B*T*H
    lens_ptr,     # int32 (B,)
    cand_ptr,     # int64 (NROWS, NC, K_PAD) packed candidates (unused when FINAL)
    out_ptr,      # int32 (NROWS, TOPK) final selection (FINAL only)
    T, H, NB_CAP, NC, INIT, LOCALB,
    BS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, FINAL: tl.constexpr,
    PDL: tl.constexpr = False, BITONIC: tl.constexpr = True,
):
    EMPTY: tl.constexpr = -9223372036854775808
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // (T * H)
    i = (row // H) % T
    L = tl.load(lens_ptr + b)
    if PDL:
        gdc_wait()               # the index kernel's scores are complete and visible after this
        gdc_launch_dependents()
    pos = L - T + i
    # integer division truncates toward zero: a (padding) query before the sequence start sees nothing
    local = tl.where(pos >= 0, pos // BS, -1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    vis = (cols <= local) & (cols < NB_CAP)
    x = tl.load(score_ptr + row.to(tl.int64) * NB_CAP + cols, mask=vis, other=float("-inf"))
    forced = ((cols < INIT) | (cols > local - LOCALB)) & vis
    x = tl.where(forced, float("inf"), x)
    # -inf scores (no visible token: cannot happen for a visible block) stay out of the selection
    p = tl.where(vis & (x > float("-inf")), pack_score_id(x, cols), EMPTY)
    sel = topk_packed(p, TOPK, K_PAD, BITONIC)
    kr = tl.arange(0, K_PAD)
    if FINAL:
        out = _order_selection(unpack_id(sel), sel != EMPTY, local, K_PAD)
        tl.store(out_ptr + row.to(tl.int64) * TOPK + kr, out, mask=kr < TOPK)
    else:
        tl.store(cand_ptr + (row.to(tl.int64) * NC + c) * K_PAD + kr, sel)


@triton.jit
def decode_topk_merge_fwd_kernel(
    cand_ptr,     # int64 (NROWS, NC, K_PAD) packed candidates
    lens_ptr, out_ptr,        # int32 (B,), int32 (NROWS, TOPK)
    T, H, NC,
    BS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, NCK_PAD: tl.constexpr,
    PDL: tl.constexpr = False, BITONIC: tl.constexpr = True,
):
    EMPTY: tl.constexpr = -9223372036854775808
    row = tl.program_id(0)
    b = row // (T * H)
    i = (row // H) % T
    L = tl.load(lens_ptr + b)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    local = tl.where(L - T + i >= 0, (L - T + i) // BS, -1)
    e = tl.arange(0, NCK_PAD)
    x = tl.load(cand_ptr + row.to(tl.int64) * NC * K_PAD + e, mask=e < NC * K_PAD, other=EMPTY)
    out = _select_from_candidates(x, local, TOPK, K_PAD, BITONIC)
    kr = tl.arange(0, K_PAD)
    tl.store(out_ptr + row.to(tl.int64) * TOPK + kr, out, mask=kr < TOPK)


@triton.jit
def decode_attention_fwd_kernel(
    q_ptr,        # (B*T, HQ, D) queries, contiguous
    k_ptr, v_ptr,  # token rows (R, H, D)
    idx_ptr,      # int32 (B*T, H, TOPK) selection: read (sparse), written by split 0 (FUSED_SEL); dummy (DENSE)
    cand_ptr,     # int64 (B*T*H, NCAND) packed candidates of the index kernel (FUSED_SEL) or dummy
    pt_ptr,       # int32 (B, PT_STRIDE) or dummy
    lens_ptr,     # int32 (B,)
    o_ptr,        # DIRECT: (B*T, HQ, D) output in its dtype; else fp32 (B*T, HQ, NSPLIT, D) partial outputs
    lse_ptr,      # DIRECT: fp32 (B*T, HQ) natural-log lse; else fp32 (B*T, HQ, NSPLIT) partial log2-sum-exp
                  # (-inf when the split / query saw nothing)
    T, H, G, D, S_ROWS, PT_STRIDE, NSPLIT, BPS, NCAND, scale_log2,
    BS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PAGED: tl.constexpr, DENSE: tl.constexpr, F32: tl.constexpr, EVEN_D: tl.constexpr,
    FUSED_SEL: tl.constexpr, DIRECT: tl.constexpr, K_PAD: tl.constexpr, NCAND_PAD: tl.constexpr,
    TOPK: tl.constexpr, PDL: tl.constexpr = False, BITONIC: tl.constexpr = True,
):
    """Program (token, group, split): exact attention of the group's G heads over the split's share of
    the selected blocks. DIRECT (one split) writes o / lse; otherwise fp32 partials, combined by
    ``decode_merge_fwd_kernel``."""
    EMPTY: tl.constexpr = -9223372036854775808
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
    if EVEN_D:
        dmask = d < D_PAD
    else:
        dmask = d < D
    q = tl.load(q_ptr + (bt.to(tl.int64) * HQ + r * G + hr)[:, None] * D + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    if PDL:
        # q, lens and the caches were written before the chain's first (non-PDL) kernel started; the
        # selection / candidates come from the previous kernel: wait for it only now
        gdc_wait()
        gdc_launch_dependents()
    if FUSED_SEL:
        # merge the per-range candidates of this (token, group) row: every split of the row redoes
        # this small exp-free top-k (no inter-program dependency, so no extra launch)
        kr = tl.arange(0, K_PAD)
        e = tl.arange(0, NCAND_PAD)
        row = bt.to(tl.int64) * H + r
        xc = tl.load(cand_ptr + row * NCAND + e, mask=e < NCAND, other=EMPTY)
        ids = _select_from_candidates(xc, local, TOPK, K_PAD, BITONIC)
        tl.store(idx_ptr + row * TOPK + kr, ids, mask=kr < tl.where(sp == 0, TOPK, 0))
    jo = tl.arange(0, BS)
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    for s in range(sp * BPS, sp * BPS + BPS):
        if DENSE:
            blk = s
            ok = s <= local
        elif FUSED_SEL:
            blk = tl.sum(tl.where(kr == s, ids, 0), axis=0)
            ok = (s < TOPK) & (blk >= 0) & (blk <= local)
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
            if EVEN_D:
                off = ((base + jo) * H + r)[:, None] * D_PAD + d[None, :]
                m2 = kmask[:, None]
            else:
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
    if DIRECT:
        # one split: this program's result is final (no merge launch)
        obase = bt.to(tl.int64) * HQ + hq
        tl.store(o_ptr + obase[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=hmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + obase, lse * 0.6931471805599453, mask=hmask)
    else:
        obase = (bt.to(tl.int64) * HQ + hq) * NSPLIT + sp
        tl.store(o_ptr + obase[:, None] * D + d[None, :], o, mask=hmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + obase, lse, mask=hmask)


@triton.jit
def _combine_splits(o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, rows, rmask, D, NSPLIT,
                    S_PAD: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr):
    """Exact combine of the NSPLIT fp32 partials (log2 lse) of the query-head rows ``rows`` (R,) into o (in
    o_ptr's dtype) and the natural-log lse; the head dim in chunks of DC so (R, S_PAD, DC) stays small.
    Loads bypass L1 (.cg): the partials were written by the attention launch, on other SMs."""
    s = tl.arange(0, S_PAD)
    m2 = rmask[:, None] & (s < NSPLIT)[None, :]
    lse = tl.load(lse_part_ptr + rows[:, None] * NSPLIT + s[None, :], mask=m2, other=float("-inf"),
                  cache_modifier=".cg")
    mx = tl.max(lse, axis=1)
    mxs = tl.where(mx > float("-inf"), mx, 0.0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - mxs[:, None]), 0.0)     # (R, S_PAD)
    tot = tl.sum(w, axis=1)
    inv = 1.0 / tl.where(tot > 0, tot, 1.0)
    for c0 in tl.static_range(0, D_PAD, DC):
        dd = c0 + tl.arange(0, DC)
        dm = dd < D
        off = (rows[:, None, None] * NSPLIT + s[None, :, None]) * D + dd[None, None, :]
        op = tl.load(o_part_ptr + off, mask=m2[:, :, None] & dm[None, None, :], other=0.0, cache_modifier=".cg")
        o = tl.sum(op * w[:, :, None], axis=1) * inv[:, None]
        tl.store(o_ptr + rows[:, None] * D + dd[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dm[None, :])
    tl.store(lse_ptr + rows, tl.where(tot > 0, (mxs + tl.log2(tl.where(tot > 0, tot, 1.0))) * 0.6931471805599453,
                                      float("-inf")), mask=rmask)


@triton.jit
def decode_merge_fwd_kernel(
    o_part_ptr,   # fp32 (B*T*HQ, NSPLIT, D)
    lse_part_ptr,  # fp32 (B*T*HQ, NSPLIT) log2 units
    o_ptr,        # (B*T*HQ, D) output in the query dtype
    lse_ptr,      # fp32 (B*T*HQ,) natural-log lse (-inf when nothing was visible)
    D, NSPLIT,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    if PDL:
        gdc_wait()
    rows = row + tl.arange(0, 1)               # one (token, head) row
    _combine_splits(o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, rows, rows >= 0, D, NSPLIT, S_PAD, D_PAD, D_PAD)
