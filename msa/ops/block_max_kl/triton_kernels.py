"""Triton kernels of the block-max KL: the two per-block reductions the loss needs, over sampled query
rows of one sequence, never a rows x T score buffer.

For query row i (position within the sequence), group r and key block b over the causal keys j <= i:
- ``block_max_kl_teacher_lse_kernel``: L[i, h, b] = log2 sum_{j in b} exp2(t_hj), t_hj = <q[i, h], k[j, r]> *
  scale * log2(e), for each of the G heads h of group r; the caller's softmax over b of L (natural units) is
  head h's attention mass per block, and their mean over the G heads the teacher's block mass
  P[i, r, b]. One program per (row tile, group, block): the MMA rows are the tile's query rows of ONE head,
  and for the block's key tile (loaded once) the program loops over the heads.
- ``block_max_kl_student_max_kernel``: m[i, r, b] = max_{j in b} <q_idx[i, r], k_idx[j]> * index_scale
  and its argmax j (the key the gradient flows through).
- ``block_max_kl_index_grad_kernel``: the index gradients from d loss / d m through those argmax keys.
Entries of blocks past a row's own stay as the caller initialised them (L and m -inf).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile_rows(POS, tile, seq_start, ROWS: tl.constexpr):
    """The tile's rows, their positions in the sequence (-1: padding), which are real, and their tokens in the
    flattened layout (padding rows point at the sequence's first token; every use masks them)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    pos = tl.load(POS + rows)
    valid = pos >= 0
    return rows, pos, valid, (seq_start + tl.where(valid, pos, 0)).to(tl.int64)


@triton.jit
def _key_tile(K, seq_start, seq_len, pos, r, k0, k_left, HKV, D: tl.constexpr, n, d, dmask,
              CDT: tl.constexpr):
    """Keys k0 .. k0 + BLOCK_N of KV head r (at most k_left of them: the rest of the block) and the
    (ROWS, BLOCK_N) causal visibility of each key to each query row at position pos."""
    kp = k0 + n
    kmask = (n < k_left) & (kp < seq_len)
    kk = tl.load(K + ((seq_start + kp).to(tl.int64) * HKV + r)[:, None] * D + d[None, :],
                 mask=kmask[:, None] & dmask[None, :], other=0.0).to(CDT)
    return kk, kmask[None, :] & (kp[None, :] <= pos[:, None])


@triton.jit
def _head_scores(Q, tok, valid, kk, visible, head, HQ, D: tl.constexpr, d, dmask, qk_scale,
                 CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scaled scores (log2 domain) of query head `head` of the tile's rows against a key tile;
    invisible keys -inf."""
    q = tl.load(Q + (tok * HQ + head)[:, None] * D + d[None, :], mask=valid[:, None] & dmask[None, :],
                other=0.0).to(CDT)
    s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * qk_scale
    return tl.where(visible, s, float("-inf"))


@triton.jit
def block_max_kl_teacher_lse_kernel(Q, K, POS, L, seq_start, seq_len, qk_scale, HQ, HKV, NB,
                                    G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BS: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                                    CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (row tile, KV group, key block) per program: each head's log2-sum-exp2 of its scores over the block's
    visible keys, L[row, head, block]. Every block is its own program (no pass over the history first), so the
    grid has rows x groups x blocks programs instead of a row tile walking the whole history twice."""
    b = tl.program_id(0)  # the block on the grid's first axis: up to 2^31 - 1 of them (the others: 65535)
    r = tl.program_id(1)
    tile = tl.program_id(2)
    rows, pos, valid, tok = _tile_rows(POS, tile, seq_start, ROWS)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    gcol = tl.arange(0, BLOCK_G)
    dmask = d < D
    # a block after every row of the tile: no key tiles (its entries stay as the caller initialised them)
    width = tl.where(b * BS <= tl.max(pos, axis=0), BS, 0)
    # each head's running max / sum kept as the columns of (ROWS, BLOCK_G) tiles: a key tile is loaded once
    # for all G heads
    m_t = tl.full([ROWS, BLOCK_G], -1.0e30, dtype=tl.float32)
    l_t = tl.zeros([ROWS, BLOCK_G], dtype=tl.float32)
    for n0 in range(0, width, BLOCK_N):
        kk, visible = _key_tile(K, seq_start, seq_len, pos, r, b * BS + n0, BS - n0, HKV, D, n, d, dmask, CDT)
        for h in range(G):
            s = _head_scores(Q, tok, valid, kk, visible, r * G + h, HQ, D, d, dmask, qk_scale, CDT, DOT_PREC)
            col = gcol[None, :] == h
            m_h = tl.sum(tl.where(col, m_t, 0.0), axis=1)
            l_h = tl.sum(tl.where(col, l_t, 0.0), axis=1)
            m_new = tl.maximum(m_h, tl.max(s, axis=1))
            l_h = l_h * tl.exp2(m_h - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_t = tl.where(col, m_new[:, None], m_t)
            l_t = tl.where(col, l_h[:, None], l_t)
    lse = m_t + tl.log2(tl.maximum(l_t, 1e-30))
    out = (rows.to(tl.int64)[:, None] * HQ + r * G + gcol[None, :]) * NB + b
    tl.store(L + out, lse, mask=(valid & (b * BS <= pos))[:, None] & (gcol[None, :] < G))


@triton.jit
def block_max_kl_student_max_kernel(QI, KI, POS, M, ARG, seq_start, seq_len, index_scale, HKV, NB,
                                    DI: tl.constexpr, ROWS: tl.constexpr, BS: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
                                    DOT_PREC: tl.constexpr):
    b = tl.program_id(0)  # one key block per program, as the teacher's kernel
    r = tl.program_id(1)
    tile = tl.program_id(2)
    rows, pos, valid, tok = _tile_rows(POS, tile, seq_start, ROWS)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < DI
    width = tl.where(b * BS <= tl.max(pos, axis=0), BS, 0)
    qi = tl.load(QI + (tok * HKV + r)[:, None] * DI + d[None, :], mask=valid[:, None] & dmask[None, :],
                 other=0.0).to(CDT)
    best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([ROWS], dtype=tl.int32)
    for n0 in range(0, width, BLOCK_N):
        kp = b * BS + n0 + n
        kmask = (n0 + n < BS) & (kp < seq_len)
        kk = tl.load(KI + (seq_start + kp).to(tl.int64)[:, None] * DI + d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0.0).to(CDT)
        s = tl.dot(qi, tl.trans(kk), input_precision=DOT_PREC) * index_scale
        s = tl.where(kmask[None, :] & (kp[None, :] <= pos[:, None]), s, float("-inf"))
        cmax = tl.max(s, axis=1)
        carg = tl.argmax(s, axis=1).to(tl.int32) + b * BS + n0
        take = cmax > best  # strictly greater: the first maximum wins, as in a left-to-right scan
        arg = tl.where(take, carg, arg)
        best = tl.where(take, cmax, best)
    out = (rows.to(tl.int64) * HKV + r) * NB + b
    keep = valid & (b * BS <= pos)
    tl.store(M + out, best, mask=keep)
    tl.store(ARG + out, arg, mask=keep)


@triton.jit
def block_max_kl_index_grad_kernel(QI, KI, POS, DM, ARG, DQ, DK, seq_start, HKV, NB, DI: tl.constexpr,
                                   ROWS: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The index gradients of one (row tile, group): the gradient dm[i, r, b] of a block maximum reaches its
    argmax key j only, so dq_idx[i, r] = sum_b dm[i, r, b] k_idx[j_b] (stored: each row is one token) and
    dk_idx[j_b] += dm[i, r, b] q_idx[i, r] (atomically: many rows share keys). dm and ARG are (R, H_kv, NB)
    for the R real rows; POS is padded to whole tiles with -1."""
    tile = tl.program_id(0)
    r = tl.program_id(1)
    rows, pos, valid, tok = _tile_rows(POS, tile, seq_start, ROWS)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DI
    qi = tl.load(QI + (tok * HKV + r)[:, None] * DI + d[None, :], mask=valid[:, None] & dmask[None, :],
                 other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for b in range(tl.max(pos, axis=0) // BS + 1):
        keep = valid & (b * BS <= pos)
        at = (rows.to(tl.int64) * HKV + r) * NB + b
        dm = tl.load(DM + at, mask=keep, other=0.0)
        key = (seq_start + tl.load(ARG + at, mask=keep, other=0)).to(tl.int64)
        both = keep[:, None] & dmask[None, :]
        kk = tl.load(KI + key[:, None] * DI + d[None, :], mask=both, other=0.0).to(tl.float32)
        acc += dm[:, None] * kk
        tl.atomic_add(DK + key[:, None] * DI + d[None, :], dm[:, None] * qi, mask=both)
    tl.store(DQ + (tok * HKV + r)[:, None] * DI + d[None, :], acc, mask=valid[:, None] & dmask[None, :])
