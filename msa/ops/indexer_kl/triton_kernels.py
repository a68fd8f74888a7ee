"""Triton kernels of the indexer KL loss (spec sections 2 and 4), flash-style: never a T x T buffer.

Notation per query token i and group r over the support U (selected blocks with j <= i, or every
causal key j <= i in warmup): student logits s_j = <q_idx[i, r], k_idx[j]> * index_scale with
p_idx = softmax_U(s); teacher p_j = (1/G) sum_h exp(t_hj - lse_h), t_hj = <q[i, h], k[j, r]> * scale,
lse_h the head's log-sum-exp over U (the main forward's lse, passed in).

KL(p || p_idx) = sum_j p_j (log p_j - s_j) + lse_s * sum_j p_j, which splits over any partition of U
(blocks, key tiles) once lse_s is known; the gradient w.r.t. s_j is (p_idx_j - p_j) / N, so
dq_idx = index_scale / N * sum_j (p_idx_j - p_j) k_idx[j] and dk_idx[j] = index_scale / N * sum_i (...) q_idx[i].

Kernels (the teacher's MMA rows are query positions / entries of ONE head; the program loops over the
G heads of the group and adds exp(t_h - lse_h) into one fp32 tile, so the head average needs no
cross-row reduction and any G works):
- ``indexer_kl_fwd_lse_sparse_kernel`` / ``indexer_kl_fwd_lse_dense_kernel``: teacher lse per
  (token, head), only when the caller does not pass it.
- sparse phase, KV-outer over the reverse index: ``indexer_kl_fwd_slse_kv_kernel`` (student lse per
  (query, slot) entry) and ``indexer_kl_fwd_kv_heads_kernel`` (loss + dq_idx + dk_idx in one pass);
  ``indexer_kl_bwd_sparse_reduce_kernel`` sums the dk_idx partials per key block in a fixed order.
- warmup phase: ``indexer_kl_fwd_dense_flash_kernel`` (query-outer: loss, student lse, dq_idx, and with
  DK_ATOMIC dk_idx through fp32 atomics) plus, in the deterministic mode,
  ``indexer_kl_bwd_dense_flash_dk_kernel`` (key-outer dk_idx, teacher recomputed).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2C = tl.constexpr(0.6931471805599453)


@triton.jit
def indexer_kl_fwd_lse_sparse_kernel(Q, K, BI, SEQ_START, LSE, scale, HQ, HKV, NSEL, BS, G: tl.constexpr,
                                     D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_D: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    tok = tl.program_id(0)
    r = tl.program_id(1)
    tok64 = tok.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    gmask = g < G
    dmask = d < D
    qrow = tok64 * HQ + r * G + g
    q = tl.load(Q + qrow[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0).to(CDT)
    seq_start = tl.load(SEQ_START + tok)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for slot in range(NSEL):
        b = tl.load(BI + (tok64 * HKV + r) * NSEL + slot)
        if b >= 0:
            kpos = seq_start + b * BS + n
            kmask = (n < BS) & (kpos <= tok)
            koff = (kpos.to(tl.int64) * HKV + r)[:, None] * D + d[None, :]
            kk = tl.load(K + koff, mask=kmask[:, None] & dmask[None, :], other=0.0).to(CDT)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    tl.store(LSE + qrow, lse, mask=gmask)


@triton.jit
def indexer_kl_fwd_lse_dense_kernel(Q, K, SEQ_START, LSE, scale, NTOK, HQ, HKV, G: tl.constexpr, D: tl.constexpr,
                                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                    CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    r = h // G
    i = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    imask = i < NTOK
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qrow = i.to(tl.int64) * HQ + h
    q = tl.load(Q + qrow[:, None] * D + d[None, :], mask=imask[:, None] & dmask[None, :], other=0.0).to(CDT)
    sstart = tl.load(SEQ_START + i, mask=imask, other=0)
    lo = tl.load(SEQ_START + pid * BLOCK_Q)  # rows are ascending, so the first one has the smallest start
    hi = tl.minimum(pid * BLOCK_Q + BLOCK_Q, NTOK)
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        kk = tl.load(K + (j.to(tl.int64) * HKV + r)[:, None] * D + d[None, :],
                     mask=(j < NTOK)[:, None] & dmask[None, :], other=0.0).to(CDT)
        s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
        valid = imask[:, None] & (j[None, :] <= i[:, None]) & (j[None, :] >= sstart[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    tl.store(LSE + qrow, lse, mask=imask)


@triton.jit
def indexer_kl_bwd_sparse_reduce_kernel(PART, DKI, ROW_ITEMS, ROW_FIRST, BLOCK_START, BLOCK_LEN, mult, HKV, NB,
                                        DI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DI: tl.constexpr):
    gb = tl.program_id(0)
    kstart = tl.load(BLOCK_START + gb)
    klen = tl.load(BLOCK_LEN + gb)
    n = tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_DI)
    acc = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    # blocks >= NB (the rows of a query chunk cover only the blocks it can select) receive zeros
    gbc = tl.minimum(gb, NB - 1)
    for r in range(HKV):  # fixed order: groups, then the row's items
        row = r * NB + gbc
        cnt = tl.where(gb < NB, tl.load(ROW_ITEMS + row), 0)
        first = tl.load(ROW_FIRST + row)
        for it in range(cnt):
            acc += tl.load(PART + ((first + it).to(tl.int64) * BLOCK_N + n)[:, None] * BLOCK_DI + e[None, :])
    mask = (n < klen)[:, None] & (e < DI)[None, :]
    tl.store(DKI + (kstart + n).to(tl.int64)[:, None] * DI + e[None, :], (acc * mult).to(DKI.dtype.element_ty),
             mask=mask)


@triton.jit
def indexer_kl_fwd_slse_kv_kernel(QI, KI, PLSE, ENTRIES, WORK_ROW, WORK_START, WORK_END, WORK_ORDER, BLOCK_START,
                                  BLOCK_LEN, tok0, index_scale, HKV, NSEL, NB, DI: tl.constexpr, BLOCK_E: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_DI: tl.constexpr, CDT: tl.constexpr,
                                  DOT_PREC: tl.constexpr):
    """PLSE fp32 (C * K * H_kv,): block-local student lse of chunk-local entry ((token - tok0) * K + slot)
    of group r at (entry * H_kv + r); slots of -1 are never written (the caller pre-fills -inf)."""
    w = tl.load(WORK_ORDER + tl.program_id(0))  # longest items first (ReverseIndex.work_order)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    if start < end:
        row = tl.load(WORK_ROW + w)
        r = row // NB
        gb = row % NB
        kstart = tl.load(BLOCK_START + gb)
        klen = tl.load(BLOCK_LEN + gb)
        n = tl.arange(0, BLOCK_N)
        e = tl.arange(0, BLOCK_DI)
        emask = e < DI
        kvalid = n < klen
        kpos = kstart + n
        ki = tl.load(KI + kpos.to(tl.int64)[:, None] * DI + e[None, :], mask=kvalid[:, None] & emask[None, :],
                     other=0.0).to(CDT)
        for e0 in range(start, end, BLOCK_E):
            ei = e0 + tl.arange(0, BLOCK_E)
            em = ei < end
            ent = tl.load(ENTRIES + ei, mask=em, other=0)
            tok = tok0 + ent // NSEL
            qi = tl.load(QI + (tok.to(tl.int64) * HKV + r)[:, None] * DI + e[None, :],
                         mask=em[:, None] & emask[None, :], other=0.0).to(CDT)
            s = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * index_scale
            valid = em[:, None] & kvalid[None, :] & (kpos[None, :] <= tok[:, None])
            s = tl.where(valid, s, float("-inf"))
            m = tl.max(s, axis=1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l = tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            lse = tl.where(l > 0, m_safe + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
            tl.store(PLSE + ent.to(tl.int64) * HKV + r, lse, mask=em)


@triton.jit
def indexer_kl_fwd_kv_heads_kernel(QI, KI, Q, K, LSE_T, LSE_S, KLP, DQP, PART, ENTRIES, WORK_ROW, WORK_START,
                                   WORK_END, WORK_ORDER, BLOCK_START, BLOCK_LEN, tok0, qk2, is2, HQ, HKV, NSEL, NB,
                                   G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, BLOCK_E: tl.constexpr,
                                   BS_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
                                   CDT: tl.constexpr, DOT_PREC: tl.constexpr, WITH_GRAD: tl.constexpr):
    """Sparse-phase KL of one work item (whole key block), MMA rows = BLOCK_E (query, slot) entries of ONE
    head at a time.

    The loop over the group's G heads adds exp2(t_h - lse_h) into one fp32 (BLOCK_E x keys) tile, so the
    head average needs no cross-row reduction, and the student side (scores, dq_idx, dk_idx) runs
    BLOCK_E-row MMAs.

    QI (T_all, H_kv, DI), KI (T_all, DI), Q (T_all, H_q, D), K (T_all, H_kv, D); LSE_T fp32 (T_all * H_q,)
    teacher lse; LSE_S fp32 (T_all * H_kv,) student lse over the whole support (natural log); KLP fp32
    (C * K * H_kv,) and DQP fp32 (C * K * H_kv, DI): per-entry KL contribution / unscaled dq_idx partial at
    (entry * H_kv + r), entry = (token - tok0) * K + slot local to the query chunk; PART fp32 (items,
    BS_PAD, BLOCK_DI): unscaled dk_idx partial of this item. qk2 = scale * log2(e), is2 = index_scale *
    log2(e).
    """
    w = tl.load(WORK_ORDER + tl.program_id(0))  # longest items first (ReverseIndex.work_order)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    row = tl.load(WORK_ROW + w)
    r = row // NB
    gb = row % NB
    kstart = tl.load(BLOCK_START + gb)
    klen = tl.load(BLOCK_LEN + gb)
    n = tl.arange(0, BS_PAD)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    x = tl.arange(0, BLOCK_E)
    dmask = d < D
    emask = e < DI
    kvalid = n < klen
    kpos = kstart + n
    kp64 = kpos.to(tl.int64)
    kk = tl.load(K + (kp64 * HKV + r)[:, None] * D + d[None, :], mask=kvalid[:, None] & dmask[None, :],
                 other=0.0).to(CDT)
    ki = tl.load(KI + kp64[:, None] * DI + e[None, :], mask=kvalid[:, None] & emask[None, :], other=0.0).to(CDT)
    dk = tl.zeros([BS_PAD, BLOCK_DI], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        xm = e0 + x < end
        ent = tl.load(ENTRIES + e0 + x, mask=xm, other=0)
        tok = tok0 + ent // NSEL
        vis = xm[:, None] & kvalid[None, :] & (kpos[None, :] <= tok[:, None])
        qrow0 = tok.to(tl.int64) * HQ + r * G
        qm = xm[:, None] & dmask[None, :]
        pe = tl.zeros([BLOCK_E, BS_PAD], dtype=tl.float32)
        for h in range(G):  # the group's heads share the key block: sum their probabilities in fp32
            q = tl.load(Q + (qrow0 + h)[:, None] * D + d[None, :], mask=qm, other=0.0).to(CDT)
            l2 = tl.load(LSE_T + qrow0 + h, mask=xm, other=0.0) * LOG2E
            t = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC)
            pe += tl.exp2(t * qk2 - l2[:, None])
        # masked entries may hold inf (a future key's score above the lse): select, never multiply
        pe = tl.where(vis, pe * (1.0 / G), 0.0)
        srow = tok.to(tl.int64) * HKV + r
        qi = tl.load(QI + srow[:, None] * DI + e[None, :], mask=xm[:, None] & emask[None, :], other=0.0).to(CDT)
        lse_s = tl.load(LSE_S + srow, mask=xm, other=0.0)
        s2 = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * is2
        # KL(p || p_idx) = sum_j p_j (ln p_j - s_j) + lse_s sum_j p_j, with ln = LN2 * log2 and s = LN2 * s2
        klv = tl.sum(tl.where(pe > 0, pe * (tl.log2(tl.where(pe > 0, pe, 1.0)) - s2), 0.0), axis=1) * LN2C
        klv += lse_s * tl.sum(pe, axis=1)
        slot_row = ent.to(tl.int64) * HKV + r
        tl.store(KLP + slot_row, klv, mask=xm)
        if WITH_GRAD:
            gr = tl.where(vis, tl.exp2(s2 - (lse_s * LOG2E)[:, None]) - pe, 0.0).to(CDT)
            dq = tl.dot(gr, ki, input_precision=DOT_PREC)
            tl.store(DQP + slot_row[:, None] * DI + e[None, :], dq, mask=xm[:, None] & emask[None, :])
            dk = tl.dot(tl.trans(gr), qi, dk, input_precision=DOT_PREC)
    if WITH_GRAD:
        tl.store(PART + (w.to(tl.int64) * BS_PAD + n)[:, None] * BLOCK_DI + e[None, :], dk)


# ---------------------------------------------------------------------------------------------------
# Warmup phase: built like FlashAttention's forward and dK/dV kernels. MMA rows are 128 query positions
# (or keys) of ONE head; the program loops over the group's G heads per key (query) tile and adds
# exp2(t - lse_h) into one fp32 tile, so the group average needs no cross-row reduction, and the
# student side gets full 128-row MMAs too. With the student lse known (prologue of pass 1) the
# gradient of a tile is g = p_idx - p directly: pass 1 keeps dq_idx in registers and, in the default
# 'flash-atomic' mode, adds g^T @ q_idx into dk_idx with fp32 atomics (one pass, teacher computed once);
# the deterministic 'flash' mode computes dk_idx in a key-outer pass 2 instead (teacher recomputed).
# Causal tiles are skipped; only diagonal / sequence-boundary tiles evaluate masks.
# All exponentials are exp2 with the scales pre-multiplied by log2(e) (qk2, is2).
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _log2_fast(x, FAST: tl.constexpr):
    """log2 of positive normal fp32 values: one MUFU.LG2 on the GPU (``tl.log2`` lowers to libdevice's
    ~15-instruction polynomial); the interpreter has no inline asm, so it keeps ``tl.log2``."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _prefetch_l2(ptrs, FAST: tl.constexpr):
    """Pull the 128-byte lines holding ptrs into L2: a hint (no value, no wait), GPU only."""
    if FAST:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs.to(tl.int64)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_rows_l2(base, row0, nrows, row_stride, ROWS: tl.constexpr, LINES: tl.constexpr,
                      LINE: tl.constexpr, FAST: tl.constexpr):
    """L2 prefetch of ROWS rows (row0 + n, clamped to nrows - 1) of LINES lines of LINE elements each,
    rows row_stride elements apart from base."""
    n = tl.minimum(row0 + tl.arange(0, ROWS), nrows - 1).to(tl.int64)
    c = tl.arange(0, LINES) * LINE
    _prefetch_l2(base + (n * row_stride)[:, None] + c[None, :], FAST)


@triton.jit
def _teacher_tile(Q, QDESC, LSE_T, kk, i0, imask, r, qk2, lg2g, HQ, G: tl.constexpr, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
                  DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """Teacher probabilities of one (query tile, key tile): (1/G) sum_h exp2(t_h * qk2 - lse2_h), the 1/G
    folded into the exponent. The group's heads share the key tile; each head's Q tile is re-read (L2),
    through the TMA descriptor QDESC when TMA (Q viewed as (T_all, H_q * D)).
    (Issuing head h+1's MMA before head h's exponentials does not overlap them: Triton 3.6 still waits
    for the wgmma before the exponentials, and the second score tile spills.)"""
    mm = tl.arange(0, BLOCK_M)
    row0 = tl.cast(i0, tl.int64) * HQ + r * G
    pe = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(G):
        if TMA:
            q = QDESC.load([i0, (r * G + h) * D]).to(CDT)
        else:
            d = tl.arange(0, BLOCK_D)
            q = tl.load(Q + (row0 + h) * D + (mm * (HQ * D))[:, None] + d[None, :],
                        mask=imask[:, None] & (d < D)[None, :], other=0.0).to(CDT)
        l2 = tl.load(LSE_T + (row0 + h) + mm * HQ, mask=imask, other=0.0) * LOG2E + lg2g
        t = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC)
        pe += tl.exp2(t * qk2 - l2[:, None])
    return pe


@triton.jit
def _flash_q_tile(acc, Q, K, KI, QDESC, LSE_T, DKI, qi, i0, i, imask, istart, lse2_s, j0, r, qk2,
                  is2, lg2g, NTOK, HQ, HKV, G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
                  CDT: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr, DK_ATOMIC: tl.constexpr,
                  FAST: tl.constexpr, TMA: tl.constexpr, PF: tl.constexpr = False, PF_LINES: tl.constexpr = 2,
                  PF_LINE: tl.constexpr = 64):
    """One key tile of pass 1: returns (acc + g @ k_idx, sum_j p (log2 p - log2 p_idx)) for the query rows
    (the accumulator goes through the MMA: a separate product tile would need 64 more registers).
    PF (GPU only): once the head loop is done, prefetch the first two heads' Q tiles into L2 (PF_LINES
    lines of PF_LINE elements per row), so the next key tile's head loop fills its pipeline from L2."""
    # int64 scalar bases + int32 tile offsets: per-element int64 addresses cost registers (spills)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    nn = tl.arange(0, BLOCK_N)
    j = j0 + nn
    jmask = j < NTOK
    # (K / k_idx tiles through TMA too measured slower: 596 vs 562 ms at 128K)
    kbase = K + (tl.cast(j0, tl.int64) * HKV + r) * D
    kk = tl.load(kbase + (nn * (HKV * D))[:, None] + d[None, :], mask=jmask[:, None] & (d < D)[None, :],
                 other=0.0).to(CDT)
    ki = tl.load(KI + tl.cast(j0, tl.int64) * DI + (nn * DI)[:, None] + e[None, :],
                 mask=jmask[:, None] & (e < DI)[None, :], other=0.0).to(CDT)
    pe = _teacher_tile(Q, QDESC, LSE_T, kk, i0, imask, r, qk2, lg2g, HQ, G, D, BLOCK_M, BLOCK_N, BLOCK_D, CDT,
                       DOT_PREC, TMA)
    if PF:
        # each head's Q tile is re-read per key tile, and all programs' heads together exceed the L2:
        # prefetch the next head loop's first Q tiles so its first TMA loads do not wait on DRAM
        for hh in tl.static_range(2):
            _prefetch_rows_l2(Q + (r * G + hh) * D, i0, NTOK, HQ * D, BLOCK_M, PF_LINES, PF_LINE, FAST)
    # u = log2 p_idx; the loss term p (log2 p - u) already holds the student lse, so one row sum suffices
    u = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * is2 - lse2_s[:, None]
    if MASKED:  # masked-out entries may hold inf (exp2 of a score above the lse): select, never multiply
        vis = (j[None, :] <= i[:, None]) & (j[None, :] >= istart[:, None]) & jmask[None, :]
        pe = tl.where(vis, pe, 0.0)
    # p = 0 (underflow or masked) contributes 0 * finite: the floor only keeps the log finite
    kl2 = tl.sum(pe * (_log2_fast(tl.maximum(pe, 1.0e-30), FAST) - u), axis=1)
    ps = tl.exp2(u)
    if MASKED:
        ps = tl.where(vis, ps, 0.0)
    gc = (ps - pe).to(CDT)
    acc = tl.dot(gc, ki, acc, input_precision=DOT_PREC)
    if DK_ATOMIC:  # one-pass mode: this tile's dk_idx contribution g^T @ q_idx, added with fp32 atomics
        dkc = tl.dot(tl.trans(gc), qi, input_precision=DOT_PREC)
        tl.atomic_add(DKI + (tl.cast(j0, tl.int64) * DI + (nn * DI)[:, None] + e[None, :]), dkc,
                      mask=jmask[:, None] & (e < DI)[None, :], sem="relaxed")
    return acc, kl2


@triton.jit
def _student_lse_tile(m_s, l_s, KI, qi, i, istart, j0, is2, NTOK, DI: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_DI: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax step of the student lse (log2 units) over one key tile."""
    e = tl.arange(0, BLOCK_DI)
    j = j0 + tl.arange(0, BLOCK_N)
    ki = tl.load(KI + j.to(tl.int64)[:, None] * DI + e[None, :], mask=(j < NTOK)[:, None] & (e < DI)[None, :],
                 other=0.0).to(CDT)
    s2 = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * is2
    if MASKED:
        vis = (j[None, :] <= i[:, None]) & (j[None, :] >= istart[:, None])
        s2 = tl.where(vis, s2, float("-inf"))
    m_new = tl.maximum(m_s, tl.max(s2, axis=1))
    l_s = l_s * tl.exp2(m_s - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
    return m_new, l_s


@triton.jit
def indexer_kl_fwd_dense_flash_kernel(QI, KI, Q, K, SEQ_START, LSE_T, KL, LSE_S, DQI, DKI, qk2, is2, lg2g, dq_mult,
                                      NTOK, HQ, HKV, G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                      BLOCK_DI: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                                      DK_ATOMIC: tl.constexpr = False, FAST: tl.constexpr = False,
                                      TMA: tl.constexpr = False, PF: tl.constexpr = False,
                                      PF_LINES: tl.constexpr = 2, PF_LINE: tl.constexpr = 64):
    """Warmup pass 1 (query-outer), one program per (BLOCK_M query positions, group r).

    QI (T_all, H_kv, DI), KI (T_all, DI), Q (T_all, H_q, D), K (T_all, H_kv, D); SEQ_START int32 (T_all,);
    LSE_T fp32 (T_all * H_q,) teacher lse (natural log, from the dense attention forward). Writes
    KL fp32 (T_all * H_kv,) per-row KL, LSE_S fp32 (T_all * H_kv,) student lse in log2 units (read by
    pass 2) and DQI fp32 (T_all, H_kv, DI) = dq_mult * (p_idx - p) @ k_idx. qk2 = scale * log2(e),
    is2 = index_scale * log2(e), lg2g = log2(G). Prologue: the student lse over the causal keys (1/G of
    the work). DK_ATOMIC (one-pass mode): also adds the unscaled dk_idx contributions
    (p_idx - p)^T @ q_idx of every tile into DKI fp32 (T_all, DI) (zero-filled) with atomics, so pass 2
    is not needed (not bitwise repeatable). FAST: MUFU log2 (GPU only). TMA: the Q tiles through a
    device-side TMA descriptor of Q viewed as (T_all, H_q * D) (D == BLOCK_D; the launcher provides
    ``triton.set_allocator``'s scratch). PF (GPU only): after each key tile's head loop, prefetch the
    first two heads' Q rows into L2 (PF_LINES 128-byte lines of PF_LINE elements per row).
    """
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # long (late) query tiles first: better tail
    r = tl.program_id(1)
    i0 = tile * BLOCK_M
    i = i0 + tl.arange(0, BLOCK_M)
    imask = i < NTOK
    e = tl.arange(0, BLOCK_DI)
    srow = i.to(tl.int64) * HKV + r
    qi = tl.load(QI + srow[:, None] * DI + e[None, :], mask=imask[:, None] & (e < DI)[None, :], other=0.0).to(CDT)
    istart = tl.load(SEQ_START + i, mask=imask, other=0)
    lo = tl.load(SEQ_START + i0)  # rows ascend, so the first row has the smallest sequence start
    ilast = tl.minimum(i0 + BLOCK_M, NTOK) - 1
    hi = ilast + 1
    # key tiles entirely below the diagonal of a tile lying in one sequence need no mask
    same = tl.load(SEQ_START + ilast) == lo
    full_end = tl.where(same, lo + ((i0 + 1 - lo) // BLOCK_N) * BLOCK_N, lo)
    if TMA:  # built once per program; rows past the end load as zeros, like the masked loads
        qdesc = tl.make_tensor_descriptor(Q, shape=[NTOK, HQ * D], strides=[HQ * D, 1], block_shape=[BLOCK_M, BLOCK_D])
    else:
        qdesc = Q
    # prologue: student lse (log2 units), online over the key tiles (1/G of the teacher's MMA work)
    m_s = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(lo, full_end, BLOCK_N):
        m_s, l_s = _student_lse_tile(m_s, l_s, KI, qi, i, istart, j0, is2, NTOK, DI, BLOCK_N, BLOCK_DI, CDT, DOT_PREC,
                                     False)
    for j0 in range(full_end, hi, BLOCK_N):
        m_s, l_s = _student_lse_tile(m_s, l_s, KI, qi, i, istart, j0, is2, NTOK, DI, BLOCK_N, BLOCK_DI, CDT, DOT_PREC,
                                     True)
    lse2_s = m_s + tl.log2(tl.where(l_s > 0, l_s, 1.0))
    acc = tl.zeros([BLOCK_M, BLOCK_DI], dtype=tl.float32)
    kl2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(lo, full_end, BLOCK_N):
        acc, b = _flash_q_tile(acc, Q, K, KI, qdesc, LSE_T, DKI, qi, i0, i, imask, istart, lse2_s, j0,
                               r, qk2, is2, lg2g, NTOK, HQ, HKV, G, D, DI, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DI, CDT,
                               DOT_PREC, False, DK_ATOMIC, FAST, TMA, PF, PF_LINES, PF_LINE)
        kl2 += b
    for j0 in range(full_end, hi, BLOCK_N):
        acc, b = _flash_q_tile(acc, Q, K, KI, qdesc, LSE_T, DKI, qi, i0, i, imask, istart, lse2_s, j0,
                               r, qk2, is2, lg2g, NTOK, HQ, HKV, G, D, DI, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DI, CDT,
                               DOT_PREC, True, DK_ATOMIC, FAST, TMA, PF, PF_LINES, PF_LINE)
        kl2 += b
    # KL = sum_j p (ln p - ln p_idx), accumulated in log2 units and converted once
    tl.store(KL + srow, kl2 * LN2C, mask=imask)
    tl.store(LSE_S + srow, lse2_s, mask=imask)
    tl.store(DQI + srow[:, None] * DI + e[None, :], acc * dq_mult, mask=imask[:, None] & (e < DI)[None, :])


@triton.jit
def _flash_k_tile(dk, Q, QI, LSE_T, LSE_S, kk, ki, j, jmask, send, i0, r, qk2, is2, NTOK, HQ, HKV,
                  G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                  MASKED: tl.constexpr):
    """One query tile of pass 2: returns dk + g^T @ q_idx for the key rows (g = p_idx - p)."""
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    mm = tl.arange(0, BLOCK_M)
    i = i0 + mm
    imask = i < NTOK
    pt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    qoff = (mm * (HQ * D))[:, None] + d[None, :]
    qm = imask[:, None] & (d < D)[None, :]
    row0 = tl.cast(i0, tl.int64) * HQ + r * G
    for h in range(G):
        q = tl.load(Q + (row0 + h) * D + qoff, mask=qm, other=0.0).to(CDT)
        l2 = tl.load(LSE_T + (row0 + h) + mm * HQ, mask=imask, other=0.0) * LOG2E
        t = tl.dot(kk, tl.trans(q), input_precision=DOT_PREC)
        pt += tl.exp2(t * qk2 - l2[None, :])
    srow0 = tl.cast(i0, tl.int64) * HKV + r
    qi = tl.load(QI + srow0 * DI + (mm * (HKV * DI))[:, None] + e[None, :], mask=imask[:, None] & (e < DI)[None, :],
                 other=0.0).to(CDT)
    ls2 = tl.load(LSE_S + srow0 + mm * HKV, mask=imask, other=0.0)
    s2 = tl.dot(ki, tl.trans(qi), input_precision=DOT_PREC) * is2
    gt = tl.exp2(s2 - ls2[None, :]) - pt * (1.0 / G)
    if MASKED:
        vis = (j[:, None] <= i[None, :]) & (i[None, :] < send[:, None]) & jmask[:, None] & imask[None, :]
        gt = tl.where(vis, gt, 0.0)
    return tl.dot(gt.to(CDT), qi, dk, input_precision=DOT_PREC)


@triton.jit
def indexer_kl_bwd_dense_flash_dk_kernel(QI, KI, Q, K, SEQ_END, LSE_T, LSE_S, PART, qk2, is2, NTOK, HQ, HKV,
                                         G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
                                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                         BLOCK_DI: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Warmup pass 2 (key-outer), one program per (BLOCK_N keys, group r), loops over the causal query
    tiles (BLOCK_M queries) of the keys' sequence. LSE_S: pass 1's student lse (log2 units).
    PART fp32 (H_kv, T_all, DI): unscaled per-group dk_idx partial (the caller sums the groups in order)."""
    pid = tl.program_id(0)
    r = tl.program_id(1)
    j0 = pid * BLOCK_N
    j = j0 + tl.arange(0, BLOCK_N)
    jmask = j < NTOK
    j64 = j.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    kk = tl.load(K + (j64 * HKV + r)[:, None] * D + d[None, :], mask=jmask[:, None] & (d < D)[None, :],
                 other=0.0).to(CDT)
    ki = tl.load(KI + j64[:, None] * DI + e[None, :], mask=jmask[:, None] & (e < DI)[None, :], other=0.0).to(CDT)
    send = tl.load(SEQ_END + j, mask=jmask, other=0)
    jlast = tl.minimum(j0 + BLOCK_N, NTOK) - 1
    send0 = tl.load(SEQ_END + j0)
    hi = tl.load(SEQ_END + jlast)  # the last key's sequence ends last
    DIAG: tl.constexpr = ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    diag_end = tl.minimum(j0 + DIAG, hi)
    # query tiles past the diagonal and inside the (single) sequence of every key need no mask
    same = (send0 == hi) & (j0 + BLOCK_N <= NTOK)
    n_full = tl.maximum(hi - diag_end, 0) // BLOCK_M
    full_end = tl.where(same, diag_end + n_full * BLOCK_M, diag_end)
    dk = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    for i0 in range(j0, diag_end, BLOCK_M):
        dk = _flash_k_tile(dk, Q, QI, LSE_T, LSE_S, kk, ki, j, jmask, send, i0, r, qk2, is2, NTOK, HQ, HKV, G, D, DI,
                           BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DI, CDT, DOT_PREC, True)
    for i0 in range(diag_end, full_end, BLOCK_M):
        dk = _flash_k_tile(dk, Q, QI, LSE_T, LSE_S, kk, ki, j, jmask, send, i0, r, qk2, is2, NTOK, HQ, HKV, G, D, DI,
                           BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DI, CDT, DOT_PREC, False)
    for i0 in range(full_end, hi, BLOCK_M):
        dk = _flash_k_tile(dk, Q, QI, LSE_T, LSE_S, kk, ki, j, jmask, send, i0, r, qk2, is2, NTOK, HQ, HKV, G, D, DI,
                           BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DI, CDT, DOT_PREC, True)
    tl.store(PART + (r * NTOK + j64)[:, None] * DI + e[None, :], dk, mask=jmask[:, None] & (e < DI)[None, :])
