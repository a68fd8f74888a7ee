"""Triton kernels of the MSA Main Branch forward (spec section 4).

Three kernels:

* ``sparse_attention_fwd_kernel`` (KV-outer): one program per work item of the reverse index, i.e.
  one (KV group r, key block g) row or a slice of a hot row. The key/value block is loaded once
  and every query of the item attends to it. MMA rows pack query positions x heads:
  row m -> (entry m // G, head r * G + m % G), so any G works (not only powers of two).
  Each (query, slot) pair writes its block-local softmax output (already divided by its own row
  sum) and its block-local lse into a slot reserved for it (``entry = token * K + slot``), so there
  are no atomics and the result is deterministic. The partial outputs are stored in the partial
  buffer's dtype (bf16/fp16 for 16-bit inputs: they are convex combinations of V rows, so the
  16-bit rounding is the same size as the final output's, and it halves the dominant memory
  traffic; fp32 for fp32 inputs); the lse values always stay fp32.
  When the key block fits one tile (B_k <= BLOCK_N, the usual case) the softmax is a plain
  one-tile softmax (no running max / rescale).
* ``sparse_attention_combine_fwd_kernel``: per (token, BLOCK_H heads) merges the K partials exactly
  with their lse (slots holding -1 contribute nothing), accumulating in fp32; one [K*BLOCK_H, D]
  load per token so the memory stream keeps 16 loads per thread in flight.
* ``sparse_attention_qo_fwd_kernel`` (query-outer): one program per (token, group), the G heads as
  MMA rows (padded to >= 16), online softmax over the K selected blocks. No partial buffers.

All kernels index flattened tokens (``token = b * T + t``) of contiguous (B, T, H, D) tensors, and
compute with exp2 (the softmax scale is pre-multiplied by log2(e)); lse values leave in natural log.
In the interpreter (UPCAST) every load is converted to fp32 right away, because its bf16 math is wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..utils.tile_union import tile_rows, union_block

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_kv_tile(K, V, kstart, klen, n0, r, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Keys/values n0 .. n0 + BLOCK_N of the block starting at flattened token kstart (klen keys)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kmask = (offs_n < klen)[:, None] & (offs_d < D)[None, :]
    # int64: token * H_kv * D overflows int32 beyond 2^31 elements (e.g. 1M tokens x 64 heads x 128)
    ptr = ((kstart + offs_n).to(tl.int64) * H_KV + r)[:, None] * D + offs_d[None, :]
    k = tl.load(K + ptr, mask=kmask, other=0.0)
    v = tl.load(V + ptr, mask=kmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _online_update(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """Fold the scaled, masked scores s (log2 domain) of one key tile into the running softmax."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0 instead of NaN
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _online_step(q, k, v, m_i, l_i, acc, visible, qk_scale, DOT_PREC: tl.constexpr):
    """One online-softmax step in the log2 domain (qk_scale = scale * log2(e)). The scale is applied
    to the fp32 scores, not to q, so bf16 queries are not rounded a second time."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    return _online_update(tl.where(visible, s, float("-inf")), v, m_i, l_i, acc, DOT_PREC)


@triton.jit
def _online_step_rows(q, k, v, m_i, l_i, acc, row_bias, qk_scale, DOT_PREC: tl.constexpr):
    """_online_step with a per-row mask given as an additive bias (0 or -inf per row): one fused
    multiply-add per score instead of a multiply and a select."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + row_bias[:, None]
    return _online_update(s, v, m_i, l_i, acc, DOT_PREC)


@triton.jit
def _single_tile(q, k, v, visible, qk_scale, DOT_PREC: tl.constexpr):
    """Softmax over one key tile (the whole block): returns the normalised output and the lse in
    log2 units (-inf for a row with no visible key, whose output is 0)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m = tl.max(s, 1)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m_use[:, None])
    l = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    l_safe = tl.where(l == 0.0, 1.0, l)
    o = acc * (1.0 / l_safe)[:, None]
    lse2 = tl.where(l == 0.0, float("-inf"), m_use + tl.log2(l_safe))
    return o, lse2


@triton.jit
def sparse_attention_fwd_kernel(Q, K, V, PO, PLSE, ENTRIES, WORK_ROW, WORK_START, WORK_END, WORK_ORDER, BLOCK_START,
                                BLOCK_LEN, tok0, nb_rows, qk_scale,
                                H_Q: tl.constexpr, H_KV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr,
                                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, KV_TILES: tl.constexpr, PRELOAD: tl.constexpr,
                                UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr = 0):
    """KV-outer partial attention of one work item.

    Q (T_all, H_Q, D), K/V (T_all, H_KV, D): contiguous, flattened tokens.
    PO (C*TOPK, H_Q, D) fp32/bf16/fp16, PLSE fp32 (C*TOPK, H_Q): partial output / lse per chunk-local
    entry.
    ENTRIES int32: chunk-local token * TOPK + slot, grouped by row; WORK_*: int32 item descriptors.
    BLOCK_START/BLOCK_LEN int32 (NB,): flattened first token and length of every global block.
    tok0: first flattened token of the chunk; nb_rows: blocks per group in the row numbering.
    PRELOAD (only with KV_TILES == 1): keep the key block in the program across query tiles
    instead of re-reading it (from L2) per tile. Entries of a row are sorted by token, so within a
    block all causal masking concerns the block's own queries; the mask is a cheap int32 compare.
    """
    w = tl.load(WORK_ORDER + tl.program_id(0))  # longest items first (ReverseIndex.work_order)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    # empty items (the grid is an upper bound from shapes) must not touch the K/V block
    if start < end:
        row = tl.load(WORK_ROW + w)
        r = row // nb_rows
        gb = row % nb_rows
        kstart = tl.load(BLOCK_START + gb)
        klen = tl.load(BLOCK_LEN + gb)
        QPT: tl.constexpr = BLOCK_M // G  # query positions per tile
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        qi = offs_m // G
        head = r * G + offs_m % G
        if PRELOAD:
            # the whole key block fits one tile: load it once for all the item's queries
            k_blk, v_blk = _load_kv_tile(K, V, kstart, klen, 0, r, H_KV, D, BLOCK_N, BLOCK_D, UPCAST)
        if PREFETCH:
            # software prefetch: the next tile's entries and gathered Q rows are requested before
            # this tile's MMAs, so their (dependent, DRAM-latency) loads overlap the compute
            ok_n = (offs_m < QPT * G) & (start + qi < end)
            e_n = tl.load(ENTRIES + start + qi, mask=ok_n, other=0)
            tok_n = tok0 + (e_n // TOPK).to(tl.int64)
            q_n = tl.load(Q + (tok_n * H_Q + head)[:, None] * D + offs_d[None, :],
                          mask=ok_n[:, None] & (offs_d < D)[None, :], other=0.0)
        for q0 in range(start, end, QPT):
            if PREFETCH:
                row_ok = ok_n
                e = e_n
                tok = tok_n
                q = q_n
                qmask = row_ok[:, None] & (offs_d < D)[None, :]
                ok_n = (offs_m < QPT * G) & (q0 + QPT + qi < end)
                e_n = tl.load(ENTRIES + q0 + QPT + qi, mask=ok_n, other=0)
                tok_n = tok0 + (e_n // TOPK).to(tl.int64)
                q_n = tl.load(Q + (tok_n * H_Q + head)[:, None] * D + offs_d[None, :],
                              mask=ok_n[:, None] & (offs_d < D)[None, :], other=0.0)
            else:
                row_ok = (offs_m < QPT * G) & (q0 + qi < end)
                e = tl.load(ENTRIES + q0 + qi, mask=row_ok, other=0)
                tok = tok0 + (e // TOPK).to(tl.int64)
                qmask = row_ok[:, None] & (offs_d < D)[None, :]
                q = tl.load(Q + (tok * H_Q + head)[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            # key position relative to the block start vs query position relative to it (int32:
            # a difference of flattened tokens, no int64 in the mask)
            qrel = (tok - kstart).to(tl.int32)
            if KV_TILES == 1:
                if PRELOAD:
                    kk = k_blk
                    vv = v_blk
                else:
                    kk, vv = _load_kv_tile(K, V, kstart, klen, 0, r, H_KV, D, BLOCK_N, BLOCK_D, UPCAST)
                offs_n = tl.arange(0, BLOCK_N)
                # causal inside the block; the block may be partial at a sequence end
                visible = (offs_n < klen)[None, :] & (offs_n[None, :] <= qrel[:, None])
                o, lse2 = _single_tile(q, kk, vv, visible, qk_scale, DOT_PREC)
            else:
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                for kt in tl.static_range(KV_TILES):
                    kk, vv = _load_kv_tile(K, V, kstart, klen, kt * BLOCK_N, r, H_KV, D, BLOCK_N, BLOCK_D, UPCAST)
                    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
                    visible = (offs_n < klen)[None, :] & (offs_n[None, :] <= qrel[:, None])
                    m_i, l_i, acc = _online_step(q, kk, vv, m_i, l_i, acc, visible, qk_scale, DOT_PREC)
                l_safe = tl.where(l_i == 0.0, 1.0, l_i)
                o = acc * (1.0 / l_safe)[:, None]
                lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            dst = e.to(tl.int64) * H_Q + head
            tl.store(PO + dst[:, None] * D + offs_d[None, :], o.to(PO.dtype.element_ty), mask=qmask)
            tl.store(PLSE + dst, lse2 * LN2, mask=row_ok)


@triton.jit
def sparse_attention_combine_fwd_kernel(PO, PLSE, BI, O, LSE, tok0, n_tok,
                                        H_Q: tl.constexpr, H_KV: tl.constexpr, G: tl.constexpr,
                                        TOPK: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                                        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                                        TOK_PER_PROG: tl.constexpr):
    """Exact merge of the K partials of chunk-local tokens, BLOCK_H heads x TOK_PER_PROG tokens per
    program.

    PO (C*TOPK, H_Q, D) fp32/bf16/fp16, PLSE fp32 (C*TOPK, H_Q); BI int32 (T_all, H_KV, TOPK) (validity of
    each slot: partials of -1 slots were never written and are not read); O (T_all, H_Q, D) in the
    output dtype; LSE fp32 (T_all, H_Q); n_tok: tokens of the chunk.

    The kernel is a pure stream (it reads ~K * D * 2 bytes per output value), so it is written to
    keep many independent loads in flight: all K slots x BLOCK_H heads of a token are fetched by
    ONE load of a [K * BLOCK_H, D] tile (row j = slot j // BLOCK_H, head j % BLOCK_H; for a fixed
    slot the BLOCK_H x D values are one contiguous run of PO), issued before the slot ids and lse
    values are known (it depends on nothing but the token): rows of unused slots read stale
    memory of the (allocated) buffer, which a select replaces by 0 (0 * NaN would be NaN).
    Per-slot loads in an unrolled loop were tried: ptxas then kept only ~2 of the 16-byte loads
    in flight per thread.
    """
    pid_t = tl.program_id(0)
    j = tl.arange(0, BLOCK_K * BLOCK_H)
    js = j // BLOCK_H
    jh = tl.program_id(1) * BLOCK_H + j % BLOCK_H
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    for i in tl.static_range(TOK_PER_PROG):
        t = pid_t * TOK_PER_PROG + i
        t = t.to(tl.int64)
        tok = tok0 + t
        # (the scalar condition is applied as a tensor compare: the interpreter rejects a mask
        # built with a scalar bool)
        rok = (js < TOPK) & (jh < H_Q) & (js * 0 + t < n_tok)
        pe = (t * TOPK + js) * H_Q + jh  # chunk-local (entry, head) of row j
        po = tl.load(PO + pe[:, None] * D + d[None, :], mask=rok[:, None] & dmask, other=0.0)
        b = tl.load(BI + (tok * H_KV + jh // G) * TOPK + js, mask=rok, other=-1)
        ok = b >= 0
        plse = tl.reshape(tl.load(PLSE + pe, mask=ok, other=float("-inf")), [BLOCK_K, BLOCK_H])
        m = tl.max(plse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(plse - m_safe[None, :])
        den = tl.sum(e, 0)
        den_safe = tl.where(den == 0.0, 1.0, den)
        lse = tl.where(den == 0.0, float("-inf"), m_safe + tl.log(den_safe))
        wgt = tl.reshape(e * (1.0 / den_safe)[None, :], [BLOCK_K * BLOCK_H])
        contrib = tl.where(ok[:, None], po.to(tl.float32) * wgt[:, None], 0.0)
        acc = tl.sum(tl.reshape(contrib, [BLOCK_K, BLOCK_H, BLOCK_D]), 0)
        hm = (h < H_Q) & (h * 0 + t < n_tok)
        tl.store(O + (tok * H_Q + h)[:, None] * D + d[None, :], acc.to(O.dtype.element_ty), mask=hm[:, None] & dmask)
        tl.store(LSE + tok * H_Q + h, lse, mask=hm)


@triton.jit
def sparse_attention_qo_fwd_kernel(Q, K, V, O, LSE, BI, SEQ_BLOCK_OFFSET, BLOCK_START, BLOCK_LEN, qk_scale,
                                   H_Q: tl.constexpr, H_KV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr,
                                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                                   BLOCK_N: tl.constexpr, KV_TILES: tl.constexpr, UPCAST: tl.constexpr,
                                   DOT_PREC: tl.constexpr):
    """Query-outer attention of one (token, group): G heads as rows, online softmax over the blocks.

    Q/O (T_all, H_Q, D), K/V (T_all, H_KV, D), BI int32 (T_all, H_KV, TOPK), SEQ_BLOCK_OFFSET int64
    (T_all,) global id of block 0 of each token's sequence, BLOCK_START/BLOCK_LEN int32 (NB,), LSE fp32.
    """
    tok = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    head = r * G + offs_g
    qmask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + (tok * H_Q + head)[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    sbo = tl.load(SEQ_BLOCK_OFFSET + tok)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for slot in range(TOPK):
        b = tl.load(BI + (tok * H_KV + r) * TOPK + slot)
        if b >= 0:
            gb = sbo + b
            kstart = tl.load(BLOCK_START + gb)
            klen = tl.load(BLOCK_LEN + gb)
            for kt in tl.static_range(KV_TILES):
                kk, vv = _load_kv_tile(K, V, kstart, klen, kt * BLOCK_N, r, H_KV, D, BLOCK_N, BLOCK_D, UPCAST)
                offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
                visible = ((offs_n < klen) & (kstart + offs_n <= tok))[None, :] & (offs_g < BLOCK_G)[:, None]
                m_i, l_i, acc = _online_step(q, kk, vv, m_i, l_i, acc, visible, qk_scale, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(O + (tok * H_Q + head)[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + tok * H_Q + head, lse, mask=offs_g < G)


@triton.jit
def sparse_attention_tiled_fwd_kernel(Q, K, V, O, LSE, UIDS, UBITS, UCOUNT, PERM, SEQ_BLOCK_OFFSET, BLOCK_START,
                                      BLOCK_LEN, qk_scale, block_size, H_Q: tl.constexpr, H_KV: tl.constexpr, G: tl.constexpr,
                                      UMAX: tl.constexpr, TILE_T: tl.constexpr, SUBS: tl.constexpr, D: tl.constexpr,
                                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                      KV_TILES: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                                      EVEN_N: tl.constexpr):
    """Query-tiled attention: one program per (query tile, group), TILE_T tokens of one query block x G
    heads as MMA rows (row m -> the tile's token m // G in the block's order PERM, head r * G + m % G),
    one online softmax over the union of the tile's selected blocks (``msa.ops.utils.tile_union``); a
    row whose token did not select a block sees none of its keys. No partial outputs, no combine.

    Q/O (T_all, H_Q, D), K/V (T_all, H_KV, D), UIDS/UBITS int32 (tiles, H_KV, UMAX), UCOUNT int32
    (tiles, H_KV), PERM int32 (NB, H_KV, block_size), SEQ_BLOCK_OFFSET int64 (T_all,),
    BLOCK_START/BLOCK_LEN int32 (NB,), LSE fp32.
    """
    tile = tl.program_id(0)
    r = tl.program_id(1)
    qstart, ti, row_ok, tok = tile_rows(tile, r, BLOCK_START, BLOCK_LEN, PERM, block_size, H_KV, G, TILE_T, SUBS,
                                        BLOCK_M)
    head = r * G + tl.arange(0, BLOCK_M) % G
    offs_d = tl.arange(0, BLOCK_D)
    qmask = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + (tok * H_Q + head)[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    sbo = tl.load(SEQ_BLOCK_OFFSET + qstart)
    base = (tile.to(tl.int64) * H_KV + r) * UMAX
    cnt = tl.load(UCOUNT + tile * H_KV + r)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The union is ascending and every id is <= the tile's own block (the tile lies in one query
    # block), so only the LAST entry can hold keys after some of the tile's tokens (or be a short last
    # block): the entries before it are whole blocks that precede every token of the tile and need
    # only the per-row selection mask, not the per-key causal and length masks (EVEN_N: block_size is
    # a multiple of BLOCK_N, so no key tile reaches past a whole block); that mask goes in as an
    # additive 0 / -inf row bias, one fused multiply-add per score (docs/perf-notes.md, round 24).
    n_full = tl.maximum(cnt - 1, 0)
    for u in range(n_full):
        row_hit, kstart, klen = union_block(UIDS, UBITS, base, u, ti, sbo, BLOCK_START, BLOCK_LEN)
        row_bias = tl.where(row_hit, 0.0, float("-inf"))
        for kt in tl.static_range(KV_TILES):
            kk, vv = _load_kv_tile(K, V, kstart, klen, kt * BLOCK_N, r, H_KV, D, BLOCK_N, BLOCK_D, UPCAST)
            if EVEN_N:
                m_i, l_i, acc = _online_step_rows(q, kk, vv, m_i, l_i, acc, row_bias, qk_scale, DOT_PREC)
            else:  # the last key tile reaches past the block
                visible = row_hit[:, None] & ((kt * BLOCK_N + tl.arange(0, BLOCK_N)) < klen)[None, :]
                m_i, l_i, acc = _online_step(q, kk, vv, m_i, l_i, acc, visible, qk_scale, DOT_PREC)
    for u in range(n_full, cnt):
        row_hit, kstart, klen = union_block(UIDS, UBITS, base, u, ti, sbo, BLOCK_START, BLOCK_LEN)
        for kt in tl.static_range(KV_TILES):
            kk, vv = _load_kv_tile(K, V, kstart, klen, kt * BLOCK_N, r, H_KV, D, BLOCK_N, BLOCK_D, UPCAST)
            offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            visible = (row_hit[:, None] & (offs_n < klen)[None, :]
                       & ((kstart + offs_n).to(tl.int64)[None, :] <= tok[:, None]))
            m_i, l_i, acc = _online_step(q, kk, vv, m_i, l_i, acc, visible, qk_scale, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(O + (tok * H_Q + head)[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + tok * H_Q + head, lse, mask=row_ok)
