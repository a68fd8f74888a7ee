"""Triton kernels of the indexer KL loss (spec sections 2 and 4), flash-style: never a T x T buffer.

Notation per query token i and group r over the support U (selected blocks with j <= i, or every
causal key j <= i in warmup): student logits s_j = <q_idx[i, r], k_idx[j]> * index_scale with
p_idx = softmax_U(s); teacher p_j = (1/G) sum_h exp(t_hj - lse_h), t_hj = <q[i, h], k[j, r]> * scale,
lse_h the head's log-sum-exp over U (the main forward's lse in the sparse phase).

KL(p || p_idx) = sum_j p_j (log p_j - s_j) + lse_s * sum_j p_j, so one query-outer pass with an
online student log-sum-exp yields the KL, lse_s and dq_idx = index_scale * sum_j (p_idx_j - p_j) k_idx[j]
(the (p_idx - p) / N gradient of the spec). dk_idx needs the full row statistics, so it is a second,
key-outer pass that recomputes p and p_idx tile by tile.

Kernels:
- ``indexer_kl_fwd_lse_sparse_kernel`` / ``indexer_kl_fwd_lse_dense_kernel``: teacher lse per
  (token, head) when the caller does not pass it.
- ``indexer_kl_fwd_sparse_kernel``: one program per (token, group), loop over the selected blocks.
- ``indexer_kl_fwd_dense_kernel``: one program per (query tile, group), loop over causal key tiles.
- ``indexer_kl_bwd_sparse_dk_kernel``: one program per reverse-index work item (group, key block,
  chunk of queries) writing an fp32 partial; ``indexer_kl_bwd_sparse_reduce_kernel`` sums, per key
  block, the partials of all groups and items in a fixed order (deterministic, no atomics).
- ``indexer_kl_bwd_dense_dk_kernel``: one program per (key tile, group) over the causal query tiles;
  the per-group partials are summed in a fixed order by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def indexer_kl_fwd_sparse_kernel(QI, KI, Q, K, BI, SEQ_START, LSE_T, KL, LSE_S, DQI, scale, index_scale, inv_n, HQ,
                                 HKV, NSEL, BS, G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
                                 BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_DI: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                                 WITH_GRAD: tl.constexpr):
    tok = tl.program_id(0)
    r = tl.program_id(1)
    tok64 = tok.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    n = tl.arange(0, BLOCK_N)
    gmask = g < G
    dmask = d < D
    emask = e < DI
    qrow = tok64 * HQ + r * G + g
    q = tl.load(Q + qrow[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0).to(CDT)
    lse_t = tl.load(LSE_T + qrow, mask=gmask, other=0.0)
    qi_row = tok64 * HKV + r
    qi = tl.load(QI + qi_row * DI + e, mask=emask, other=0.0).to(tl.float32)
    seq_start = tl.load(SEQ_START + tok)
    m_s = tl.full([1], -1.0e30, dtype=tl.float32)
    l_s = tl.zeros([1], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_DI], dtype=tl.float32)  # sum_j exp(s_j - m_s) k_idx[j]
    acc_p = tl.zeros([BLOCK_DI], dtype=tl.float32)  # sum_j p_j k_idx[j]
    a = tl.zeros([1], dtype=tl.float32)  # sum_j p_j (log p_j - s_j)
    psum = tl.zeros([1], dtype=tl.float32)
    for slot in range(NSEL):
        b = tl.load(BI + (tok64 * HKV + r) * NSEL + slot)
        if b >= 0:
            kpos = seq_start + b * BS + n
            kmask = (n < BS) & (kpos <= tok)
            kp64 = kpos.to(tl.int64)
            kk = tl.load(K + (kp64 * HKV + r)[:, None] * D + d[None, :], mask=kmask[:, None] & dmask[None, :],
                         other=0.0).to(CDT)
            t = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
            pt = tl.where(gmask[:, None] & kmask[None, :], tl.exp(t - lse_t[:, None]), 0.0)
            p = tl.sum(pt, axis=0) / G
            ki = tl.load(KI + kp64[:, None] * DI + e[None, :], mask=kmask[:, None] & emask[None, :],
                         other=0.0).to(tl.float32)
            s = tl.sum(ki * qi[None, :], axis=1) * index_scale  # one student row: CUDA-core dot
            s = tl.where(kmask, s, float("-inf"))
            m_new = tl.maximum(m_s, tl.max(s, axis=0))
            alpha = tl.exp(m_s - m_new)
            ex = tl.exp(s - m_new)
            l_s = l_s * alpha + tl.sum(ex, axis=0)
            a += tl.sum(tl.where(p > 0, p * (tl.log(p) - s), 0.0), axis=0)
            psum += tl.sum(p, axis=0)
            if WITH_GRAD:
                acc_s = acc_s * alpha + tl.sum(ex[:, None] * ki, axis=0)
                acc_p += tl.sum(p[:, None] * ki, axis=0)
            m_s = m_new
    has = l_s > 0  # a row with no valid slot has an empty support: KL 0, gradient 0
    lse_s = tl.where(has, m_s + tl.log(tl.where(has, l_s, 1.0)), float("inf"))
    kl = tl.where(has, a + psum * lse_s, 0.0)
    one = tl.arange(0, 1)
    tl.store(KL + qi_row + one, kl)
    tl.store(LSE_S + qi_row + one, lse_s)
    if WITH_GRAD:
        inv_l = tl.where(has, 1.0 / tl.where(has, l_s, 1.0), 0.0)
        dqi = (acc_s * inv_l - acc_p) * (index_scale * inv_n)
        tl.store(DQI + qi_row * DI + e, dqi.to(DQI.dtype.element_ty), mask=emask)


@triton.jit
def indexer_kl_fwd_dense_kernel(QI, KI, Q, K, SEQ_START, LSE_T, KL, LSE_S, DQI, scale, index_scale, inv_n, NTOK, HQ,
                                HKV, G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, BLOCK_Q: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
                                CDT: tl.constexpr, DOT_PREC: tl.constexpr, WITH_GRAD: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    i = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    imask = i < NTOK
    i64 = i.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    dmask = d < D
    emask = e < DI
    qi_row = i64 * HKV + r
    qi = tl.load(QI + qi_row[:, None] * DI + e[None, :], mask=imask[:, None] & emask[None, :], other=0.0).to(CDT)
    sstart = tl.load(SEQ_START + i, mask=imask, other=0)
    lo = tl.load(SEQ_START + pid * BLOCK_Q)
    hi = tl.minimum(pid * BLOCK_Q + BLOCK_Q, NTOK)
    m_s = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_s = tl.zeros([BLOCK_Q], dtype=tl.float32)
    a = tl.zeros([BLOCK_Q], dtype=tl.float32)
    psum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_Q, BLOCK_DI], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_Q, BLOCK_DI], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < NTOK
        j64 = j.to(tl.int64)
        valid = imask[:, None] & (j[None, :] <= i[:, None]) & (j[None, :] >= sstart[:, None])
        ki = tl.load(KI + j64[:, None] * DI + e[None, :], mask=jmask[:, None] & emask[None, :], other=0.0).to(CDT)
        kk = tl.load(K + (j64 * HKV + r)[:, None] * D + d[None, :], mask=jmask[:, None] & dmask[None, :],
                     other=0.0).to(CDT)
        # teacher: average of the G heads' normalised probabilities (head loop: any G works)
        p = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        for hh in range(G):
            qrow = i64 * HQ + r * G + hh
            qh = tl.load(Q + qrow[:, None] * D + d[None, :], mask=imask[:, None] & dmask[None, :], other=0.0).to(CDT)
            lse_h = tl.load(LSE_T + qrow, mask=imask, other=0.0)
            t = tl.dot(qh, tl.trans(kk), input_precision=DOT_PREC) * scale
            p += tl.exp(t - lse_h[:, None])
        p = tl.where(valid, p / G, 0.0)
        s = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * index_scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(s, axis=1))
        alpha = tl.exp(m_s - m_new)
        ex = tl.exp(s - m_new[:, None])
        l_s = l_s * alpha + tl.sum(ex, axis=1)
        a += tl.sum(tl.where(p > 0, p * (tl.log(p) - s), 0.0), axis=1)
        psum += tl.sum(p, axis=1)
        if WITH_GRAD:
            acc_s = acc_s * alpha[:, None] + tl.dot(ex.to(CDT), ki, input_precision=DOT_PREC)
            acc_p += tl.dot(p.to(CDT), ki, input_precision=DOT_PREC)
        m_s = m_new
    has = l_s > 0
    lse_s = tl.where(has, m_s + tl.log(tl.where(has, l_s, 1.0)), float("inf"))
    kl = tl.where(has, a + psum * lse_s, 0.0)
    tl.store(KL + qi_row, kl, mask=imask)
    tl.store(LSE_S + qi_row, lse_s, mask=imask)
    if WITH_GRAD:
        inv_l = tl.where(has, 1.0 / tl.where(has, l_s, 1.0), 0.0)
        dqi = (acc_s * inv_l[:, None] - acc_p) * (index_scale * inv_n)
        tl.store(DQI + qi_row[:, None] * DI + e[None, :], dqi.to(DQI.dtype.element_ty),
                 mask=imask[:, None] & emask[None, :])


@triton.jit
def indexer_kl_bwd_sparse_dk_kernel(QI, KI, Q, K, LSE_T, LSE_S, PART, ENTRIES, WORK_ROW, WORK_START, WORK_END,
                                    BLOCK_START, BLOCK_LEN, scale, index_scale, HQ, HKV, NSEL, NB, G: tl.constexpr,
                                    D: tl.constexpr, DI: tl.constexpr, BLOCK_E: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
                                    CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    w = tl.program_id(0)
    row = tl.load(WORK_ROW + w)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    r = row // NB
    gb = row % NB
    kstart = tl.load(BLOCK_START + gb)
    klen = tl.load(BLOCK_LEN + gb)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    dmask = d < D
    emask = e < DI
    kvalid = n < klen
    kpos = kstart + n
    kp64 = kpos.to(tl.int64)
    kk = tl.load(K + (kp64 * HKV + r)[:, None] * D + d[None, :], mask=kvalid[:, None] & dmask[None, :],
                 other=0.0).to(CDT)
    ki = tl.load(KI + kp64[:, None] * DI + e[None, :], mask=kvalid[:, None] & emask[None, :], other=0.0).to(CDT)
    dk = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        ei = e0 + tl.arange(0, BLOCK_E)
        em = ei < end
        tok = tl.load(ENTRIES + ei, mask=em, other=0) // NSEL
        tok64 = tok.to(tl.int64)
        qi = tl.load(QI + (tok64 * HKV + r)[:, None] * DI + e[None, :], mask=em[:, None] & emask[None, :],
                     other=0.0).to(CDT)
        lse_s = tl.load(LSE_S + tok64 * HKV + r, mask=em, other=float("inf"))
        s = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * index_scale
        valid = em[:, None] & kvalid[None, :] & (kpos[None, :] <= tok[:, None])
        p = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for hh in range(G):
            qrow = tok64 * HQ + r * G + hh
            qh = tl.load(Q + qrow[:, None] * D + d[None, :], mask=em[:, None] & dmask[None, :], other=0.0).to(CDT)
            lse_h = tl.load(LSE_T + qrow, mask=em, other=0.0)
            t = tl.dot(qh, tl.trans(kk), input_precision=DOT_PREC) * scale
            p += tl.exp(t - lse_h[:, None])
        gr = tl.where(valid, tl.exp(s - lse_s[:, None]) - p / G, 0.0)
        dk += tl.dot(tl.trans(gr.to(CDT)), qi, input_precision=DOT_PREC)
    # every work item owns its partial slot w (unused items write zeros that nobody reads)
    tl.store(PART + (w.to(tl.int64) * BLOCK_N + n)[:, None] * BLOCK_DI + e[None, :], dk)


@triton.jit
def indexer_kl_bwd_sparse_reduce_kernel(PART, DKI, ROW_ITEMS, ROW_FIRST, BLOCK_START, BLOCK_LEN, mult, HKV, NB,
                                        DI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DI: tl.constexpr):
    gb = tl.program_id(0)
    kstart = tl.load(BLOCK_START + gb)
    klen = tl.load(BLOCK_LEN + gb)
    n = tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_DI)
    acc = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    for r in range(HKV):  # fixed order: groups, then the row's items
        row = r * NB + gb
        cnt = tl.load(ROW_ITEMS + row)
        first = tl.load(ROW_FIRST + row)
        for it in range(cnt):
            acc += tl.load(PART + ((first + it).to(tl.int64) * BLOCK_N + n)[:, None] * BLOCK_DI + e[None, :])
    mask = (n < klen)[:, None] & (e < DI)[None, :]
    tl.store(DKI + (kstart + n).to(tl.int64)[:, None] * DI + e[None, :], (acc * mult).to(DKI.dtype.element_ty),
             mask=mask)


@triton.jit
def indexer_kl_bwd_dense_dk_kernel(QI, KI, Q, K, SEQ_END, LSE_T, LSE_S, PART, scale, index_scale, NTOK, HQ, HKV,
                                   G: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, BLOCK_Q: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr,
                                   CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < NTOK
    j64 = j.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DI)
    dmask = d < D
    emask = e < DI
    send = tl.load(SEQ_END + j, mask=jmask, other=0)
    ki = tl.load(KI + j64[:, None] * DI + e[None, :], mask=jmask[:, None] & emask[None, :], other=0.0).to(CDT)
    kk = tl.load(K + (j64 * HKV + r)[:, None] * D + d[None, :], mask=jmask[:, None] & dmask[None, :],
                 other=0.0).to(CDT)
    lo = pid * BLOCK_N
    hi = tl.load(SEQ_END + tl.minimum(pid * BLOCK_N + BLOCK_N, NTOK) - 1)  # last key has the largest end
    dk = tl.zeros([BLOCK_N, BLOCK_DI], dtype=tl.float32)
    for i0 in range(lo, hi, BLOCK_Q):
        i = i0 + tl.arange(0, BLOCK_Q)
        imask = i < NTOK
        i64 = i.to(tl.int64)
        valid = imask[:, None] & jmask[None, :] & (j[None, :] <= i[:, None]) & (i[:, None] < send[None, :])
        qi = tl.load(QI + (i64 * HKV + r)[:, None] * DI + e[None, :], mask=imask[:, None] & emask[None, :],
                     other=0.0).to(CDT)
        lse_s = tl.load(LSE_S + i64 * HKV + r, mask=imask, other=float("inf"))
        s = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * index_scale
        p = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        for hh in range(G):
            qrow = i64 * HQ + r * G + hh
            qh = tl.load(Q + qrow[:, None] * D + d[None, :], mask=imask[:, None] & dmask[None, :], other=0.0).to(CDT)
            lse_h = tl.load(LSE_T + qrow, mask=imask, other=0.0)
            t = tl.dot(qh, tl.trans(kk), input_precision=DOT_PREC) * scale
            p += tl.exp(t - lse_h[:, None])
        gr = tl.where(valid, tl.exp(s - lse_s[:, None]) - p / G, 0.0)
        dk += tl.dot(tl.trans(gr.to(CDT)), qi, input_precision=DOT_PREC)
    tl.store(PART + (r * NTOK + j64)[:, None] * DI + e[None, :], dk, mask=jmask[:, None] & emask[None, :])
