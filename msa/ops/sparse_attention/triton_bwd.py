"""Triton backward of the MSA Main Branch (spec section 4): dQ and dK/dV KV-outer, deterministic.

Launches:

1. ``sparse_attention_bwd_preprocess_kernel``: delta[token, head] = rowsum(dO * O) in fp32.
2. dQ, by ``dq_mode()`` (``msa.tuning`` field ``sparse_bwd_dq``):
   - ``kv`` (default): ``sparse_attention_bwd_dq_kv_kernel`` runs over the reverse index like the
     forward's KV-outer kernel: it loads a key/value block once, gathers the queries that selected it
     (``BLOCK_M // G`` query positions x G heads per MMA) and writes each (query, slot)'s dS @ K into
     a pre-assigned partial slot (input dtype for bf16/fp16, fp32 otherwise);
     ``sparse_attention_bwd_dq_reduce_kernel`` sums the K slots of every query in a fixed order.
     Queries are processed in chunks whose partials fit the forward's partial budget.
     The spec's query-outer dQ (mode ``query``) re-reads K/V for every (token, group, block): at the
     paper shape that is ~0.5 TB of L2 traffic at 128K tokens, with only G = 16 MMA rows.
   - ``query``: ``sparse_attention_bwd_dq_kernel``, one program per (token, group), the G heads as MMA
     rows (padded to >= 16), looping over the group's selected blocks.
   - ``tiled``: ``sparse_attention_bwd_dq_tiled_kernel``, the forward's query tiles (several tokens x G
     heads per MMA) over the union of their selected blocks (``msa.ops.utils.tile_union``, shared
     with a ``tiled`` forward through the SelectionPlan).
   Every mode recomputes P = exp(S - lse) from the forward's lse, so no softmax state is stored.
3. ``sparse_attention_bwd_dkdv_kernel``: one program per (work item, key sub-tile) of the reverse
   index (``reverse_index.build_reverse_index``). It loads its key block once and gathers the queries
   that selected it, packing ``BLOCK_M // G`` query positions x G heads into the MMA rows; row m maps
   to entry ``m // G`` and head ``r * G + m % G`` at run time, so any G (1, 3, 12, 64, ...) works.
   A row of the index that fits one work item writes dK/dV directly; a hot row split into several
   items writes one fp32 partial per item into a pre-assigned slot, and
   ``sparse_attention_bwd_reduce_kernel`` sums the partials in item order. There are no atomics
   anywhere, so two runs give bitwise identical gradients.

Launch configurations: ``bwd_config`` (overrides: ``msa.tuning`` field ``sparse_bwd_config``).

Causal masking uses flattened token indices: a key at flattened position j is visible to the query
at flattened position t iff it lies in one of the query's selected blocks and j <= t (blocks are
numbered from the query's own sequence start, so no key of another sequence is ever addressed).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..utils.triton_helpers import dot_precision, interpreting, large_shared_memory, next_pow2, tl_compute_dtype

from ..utils.reverse_index import (SHORT_TOKENS, ReverseIndex, SelectionPlan, blocks_before,
                                   build_reverse_index, hot_row_split)
from ..utils.tile_union import build_tile_union, tile_rows, tile_tokens_for, union_block
from ... import tuning
from ...tuning import merge_launch_config








def token_seq_start(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """int32 (B*T,): flattened index of the first token of each token's own sequence."""
    tok = torch.arange(batch * seqlen, device=device, dtype=torch.int64)
    if cu_seqlens is None:
        start = tok - tok % seqlen
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        start = cu[torch.searchsorted(cu[1:], tok, right=True)]
    return start.to(torch.int32)


@triton.jit
def sparse_attention_bwd_preprocess_kernel(O, DO, DELTA, n_rows, D: tl.constexpr, BLOCK_R: tl.constexpr,
                                           BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < D)[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rmask)


@triton.jit
def sparse_attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, BI, SEQ_START, scale, HQ, HKV, NSEL, BS,
                                   G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                                   BLOCK_N: tl.constexpr, KV_TILES: tl.constexpr, BLOCK_D: tl.constexpr,
                                   CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    tok = tl.program_id(0)
    r = tl.program_id(1)
    tok64 = tok.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    gmask = g < G
    dmask = d < D
    head = r * G + g
    qrow = tok64 * HQ + head
    qmask = gmask[:, None] & dmask[None, :]
    qoff = qrow[:, None] * D + d[None, :]
    q = tl.load(Q + qoff, mask=qmask, other=0.0).to(CDT)
    do = tl.load(DO + qoff, mask=qmask, other=0.0).to(CDT)
    lse = tl.load(LSE + qrow, mask=gmask, other=0.0)
    delta = tl.load(DELTA + qrow, mask=gmask, other=0.0)
    seq_start = tl.load(SEQ_START + tok)
    dq = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for slot in range(NSEL):
        b = tl.load(BI + (tok64 * HKV + r) * NSEL + slot)
        if b >= 0:
            for kt in tl.static_range(KV_TILES):  # key sub-tiles of the block (smaller K/V tiles)
                nn = kt * BLOCK_N + n
                kpos = seq_start + b * BS + nn
                kmask = (nn < BS) & (kpos <= tok)
                koff = (kpos.to(tl.int64) * HKV + r)[:, None] * D + d[None, :]
                kvmask = kmask[:, None] & dmask[None, :]
                kk = tl.load(K + koff, mask=kvmask, other=0.0).to(CDT)
                vv = tl.load(V + koff, mask=kvmask, other=0.0).to(CDT)
                s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
                p = tl.where(gmask[:, None] & kmask[None, :], tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(CDT), kk, input_precision=DOT_PREC)
    tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def sparse_attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PDK, PDV, ENTRIES, WORK_ROW, WORK_START,
                                     WORK_END, WORK_ORDER, WORK_SLOT, BLOCK_START, BLOCK_LEN, scale, HQ, HKV, NSEL,
                                     NB,
                                     G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BS_PAD: tl.constexpr,
                                     CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    # programs p = item rank * SUBS + key sub-tile: an item's sub-tiles launch together, longest items
    # first (ReverseIndex.work_order); a sub-tile keeps the dK/dV accumulators in registers
    SUBS: tl.constexpr = BS_PAD // BLOCK_N
    w = tl.load(WORK_ORDER + tl.program_id(0) // SUBS)
    sub = tl.program_id(0) % SUBS
    ENT: tl.constexpr = BLOCK_M // G  # query positions per MMA tile
    row = tl.load(WORK_ROW + w)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    pslot = tl.load(WORK_SLOT + w)
    r = row // NB
    gb = row % NB
    kstart = tl.load(BLOCK_START + gb)
    klen = tl.load(BLOCK_LEN + gb)
    n = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kvalid = n < klen
    kpos = kstart + n
    koff = (kpos.to(tl.int64) * HKV + r)[:, None] * D + d[None, :]
    kvmask = kvalid[:, None] & dmask[None, :]
    kk = tl.load(K + koff, mask=kvmask, other=0.0).to(CDT)
    vv = tl.load(V + koff, mask=kvmask, other=0.0).to(CDT)
    m = tl.arange(0, BLOCK_M)
    ment = m // G  # run-time row -> (entry, head) map: no power-of-two requirement on G
    mhead = r * G + m % G
    mrow_ok = ment < ENT
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, ENT):
        eidx = e0 + ment
        emask = mrow_ok & (eidx < end)
        ent = tl.load(ENTRIES + eidx, mask=emask, other=0)
        tok = ent // NSEL
        qrow = tok.to(tl.int64) * HQ + mhead
        qoff = qrow[:, None] * D + d[None, :]
        qmask = emask[:, None] & dmask[None, :]
        q = tl.load(Q + qoff, mask=qmask, other=0.0).to(CDT)
        do = tl.load(DO + qoff, mask=qmask, other=0.0).to(CDT)
        lse = tl.load(LSE + qrow, mask=emask, other=0.0)
        delta = tl.load(DELTA + qrow, mask=emask, other=0.0)
        s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale
        valid = emask[:, None] & kvalid[None, :] & (kpos[None, :] <= tok[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(CDT)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(CDT)), q, input_precision=DOT_PREC)
    dk = dk * scale
    # scalar conditions broadcast through an int vector (the interpreter rejects scalar bool masks)
    zero_n = tl.zeros([BLOCK_N], dtype=tl.int32)
    active = (zero_n + start) < end
    direct = active & ((zero_n + pslot) < 0)
    dmask_direct = kvmask & direct[:, None]
    tl.store(DK + koff, dk.to(DK.dtype.element_ty), mask=dmask_direct)
    tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=dmask_direct)
    # split hot row: fp32 partial in this item's private slot, summed later in a fixed order
    poff = (pslot.to(tl.int64) * BS_PAD + n)[:, None] * D + d[None, :]
    pmask = kvmask & (active & ((zero_n + pslot) >= 0))[:, None]
    tl.store(PDK + poff, dk, mask=pmask)
    tl.store(PDV + poff, dv, mask=pmask)


@triton.jit
def sparse_attention_bwd_reduce_kernel(PDK, PDV, DK, DV, ROW_ITEMS, ROW_FIRST_SLOT, BLOCK_START, BLOCK_LEN, HKV,
                                       NB, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                       BS_PAD: tl.constexpr):
    row = tl.program_id(0)
    sub = tl.program_id(1)
    cnt = tl.load(ROW_ITEMS + row)
    first = tl.load(ROW_FIRST_SLOT + row)
    nloop = tl.where(cnt > 1, cnt, 0)  # rows with one item were written directly
    r = row // NB
    gb = row % NB
    kstart = tl.load(BLOCK_START + gb)
    klen = tl.load(BLOCK_LEN + gb)
    n = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    mask = (n < klen)[:, None] & (d < D)[None, :]
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(nloop):
        poff = ((first + i).to(tl.int64) * BS_PAD + n)[:, None] * D + d[None, :]
        acc_k += tl.load(PDK + poff, mask=mask, other=0.0)
        acc_v += tl.load(PDV + poff, mask=mask, other=0.0)
    koff = ((kstart + n).to(tl.int64) * HKV + r)[:, None] * D + d[None, :]
    smask = mask & ((tl.zeros([BLOCK_N], dtype=tl.int32) + cnt) > 1)[:, None]
    tl.store(DK + koff, acc_k.to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + koff, acc_v.to(DV.dtype.element_ty), mask=smask)



LOG2E_C = tl.constexpr(1.4426950408889634)


@triton.jit
def sparse_attention_bwd_dq_kv_kernel(Q, K, V, DO, LSE, DELTA, PDQ, ENTRIES, WORK_ROW, WORK_START, WORK_END, WORK_ORDER,
                                      BLOCK_START, BLOCK_LEN, tok0, nb_rows, qk_scale, scale,
                                      H_Q: tl.constexpr, H_KV: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr,
                                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_N: tl.constexpr, KV_TILES: tl.constexpr, CDT: tl.constexpr,
                                      DOT_PREC: tl.constexpr):
    """KV-outer dQ of one work item (mode ``kv``): the key/value block is loaded once and every query
    of the item gets its block-local dQ contribution dS @ K * scale, written into the partial slot of
    its (query, slot) entry (no atomics); ``sparse_attention_bwd_dq_reduce_kernel`` sums the K slots
    in a fixed order.

    Q/DO (T_all, H_Q, D), K/V (T_all, H_KV, D), LSE/DELTA fp32 (T_all * H_Q,), PDQ (C * TOPK, H_Q, D)
    partial buffer (bf16/fp16 for 16-bit inputs, fp32 otherwise) indexed by the chunk-local entry
    (token - tok0) * TOPK + slot. Rows pack query positions x heads as in the forward KV-outer kernel.
    """
    w = tl.load(WORK_ORDER + tl.program_id(0))  # longest items first (ReverseIndex.work_order)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    if start < end:  # empty items (the grid is a shape bound) touch nothing
        row = tl.load(WORK_ROW + w)
        r = row // nb_rows
        gb = row % nb_rows
        kstart = tl.load(BLOCK_START + gb)
        klen = tl.load(BLOCK_LEN + gb)
        QPT: tl.constexpr = BLOCK_M // G
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qi = offs_m // G
        head = r * G + offs_m % G
        if KV_TILES == 1:  # the whole block is one tile: keep it for all the item's queries
            offs_n = tl.arange(0, BLOCK_N)
            kvm = (offs_n < klen)[:, None] & dmask[None, :]
            kvp = ((kstart + offs_n).to(tl.int64) * H_KV + r)[:, None] * D + offs_d[None, :]
            k_blk = tl.load(K + kvp, mask=kvm, other=0.0).to(CDT)
            v_blk = tl.load(V + kvp, mask=kvm, other=0.0).to(CDT)
        for q0 in range(start, end, QPT):
            row_ok = (offs_m < QPT * G) & (q0 + qi < end)
            e = tl.load(ENTRIES + q0 + qi, mask=row_ok, other=0)
            tok = tok0 + (e // TOPK).to(tl.int64)
            qrow = tok * H_Q + head
            qmask = row_ok[:, None] & dmask[None, :]
            qoff = qrow[:, None] * D + offs_d[None, :]
            q = tl.load(Q + qoff, mask=qmask, other=0.0).to(CDT)
            do = tl.load(DO + qoff, mask=qmask, other=0.0).to(CDT)
            lse2 = tl.load(LSE + qrow, mask=row_ok, other=0.0) * LOG2E_C
            delta = tl.load(DELTA + qrow, mask=row_ok, other=0.0)
            qrel = (tok - kstart).to(tl.int32)  # causal mask relative to the block start (int32)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for kt in tl.static_range(KV_TILES):
                offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
                if KV_TILES == 1:
                    kk = k_blk
                    vv = v_blk
                else:
                    kvm = (offs_n < klen)[:, None] & dmask[None, :]
                    kvp = ((kstart + offs_n).to(tl.int64) * H_KV + r)[:, None] * D + offs_d[None, :]
                    kk = tl.load(K + kvp, mask=kvm, other=0.0).to(CDT)
                    vv = tl.load(V + kvp, mask=kvm, other=0.0).to(CDT)
                visible = row_ok[:, None] & (offs_n < klen)[None, :] & (offs_n[None, :] <= qrel[:, None])
                s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * qk_scale
                p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(CDT), kk, dq, input_precision=DOT_PREC)
            dst = (e.to(tl.int64) * H_Q + head)[:, None] * D + offs_d[None, :]
            tl.store(PDQ + dst, (dq * scale).to(PDQ.dtype.element_ty), mask=qmask)


@triton.jit
def sparse_attention_bwd_dq_reduce_kernel(PDQ, BI, DQ, tok0, H_Q: tl.constexpr, H_KV: tl.constexpr,
                                          G: tl.constexpr, TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
                                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """dQ[token, heads] = sum over the token's valid slots of PDQ (fixed order, fp32), one program per
    (chunk-local token, BLOCK_H heads). BI int32 (T_all, H_KV, TOPK) tells the valid slots (-1 slots
    were never written: their stale rows are replaced by 0 with a select, never multiplied)."""
    t = tl.program_id(0).to(tl.int64)
    tok = tok0 + t
    j = tl.arange(0, BLOCK_K * BLOCK_H)
    js = j // BLOCK_H
    jh = tl.program_id(1) * BLOCK_H + j % BLOCK_H
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    rok = (js < TOPK) & (jh < H_Q)
    # one [K * BLOCK_H, D] load issued before the slot ids are known (as the forward combine)
    x = tl.load(PDQ + ((t * TOPK + js) * H_Q + jh)[:, None] * D + d[None, :], mask=rok[:, None] & dmask, other=0.0)
    b = tl.load(BI + (tok * H_KV + jh // G) * TOPK + js, mask=rok, other=-1)
    x = tl.where((b >= 0)[:, None], x.to(tl.float32), 0.0)
    acc = tl.sum(tl.reshape(x, [BLOCK_K, BLOCK_H, BLOCK_D]), 0)
    tl.store(DQ + (tok * H_Q + h)[:, None] * D + d[None, :], acc.to(DQ.dtype.element_ty),
             mask=(h < H_Q)[:, None] & dmask)


@triton.jit
def sparse_attention_bwd_dq_tiled_kernel(Q, K, V, DO, LSE, DELTA, DQ, UIDS, UBITS, UCOUNT, PERM, SEQ_BLOCK_OFFSET,
                                         BLOCK_START, BLOCK_LEN, qk_scale, scale, block_size, H_Q: tl.constexpr,
                                         H_KV: tl.constexpr, G: tl.constexpr, UMAX: tl.constexpr,
                                         TILE_T: tl.constexpr, SUBS: tl.constexpr, D: tl.constexpr,
                                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                         KV_TILES: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ of mode ``tiled``: the forward's query tiles (TILE_T tokens x G heads as MMA rows, row m ->
    the tile's token m // G in the block's order PERM, head r * G + m % G) over the union of their
    blocks (``msa.ops.utils.tile_union``), rows masked where their token did not select the block.
    qk_scale = scale * log2(e)."""
    tile = tl.program_id(0)
    r = tl.program_id(1)
    qstart, ti, row_ok, tok = tile_rows(tile, r, BLOCK_START, BLOCK_LEN, PERM, block_size, H_KV, G, TILE_T, SUBS,
                                        BLOCK_M)
    qrow = tok * H_Q + r * G + tl.arange(0, BLOCK_M) % G
    d = tl.arange(0, BLOCK_D)
    qmask = row_ok[:, None] & (d < D)[None, :]
    qoff = qrow[:, None] * D + d[None, :]
    q = tl.load(Q + qoff, mask=qmask, other=0.0).to(CDT)
    do = tl.load(DO + qoff, mask=qmask, other=0.0).to(CDT)
    lse2 = tl.load(LSE + qrow, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + qrow, mask=row_ok, other=0.0)
    sbo = tl.load(SEQ_BLOCK_OFFSET + qstart)
    base = (tile.to(tl.int64) * H_KV + r) * UMAX
    cnt = tl.load(UCOUNT + tile * H_KV + r)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for u in range(cnt):
        row_hit, kstart, klen = union_block(UIDS, UBITS, base, u, ti, sbo, BLOCK_START, BLOCK_LEN)
        for kt in tl.static_range(KV_TILES):
            nn = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            kpos = (kstart + nn).to(tl.int64)
            kvmask = (nn < klen)[:, None] & (d < D)[None, :]
            koff = (kpos * H_KV + r)[:, None] * D + d[None, :]
            kk = tl.load(K + koff, mask=kvmask, other=0.0).to(CDT)
            vv = tl.load(V + koff, mask=kvmask, other=0.0).to(CDT)
            visible = row_hit[:, None] & (nn < klen)[None, :] & (kpos[None, :] <= tok[:, None])
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * qk_scale
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(CDT), kk, input_precision=DOT_PREC)
    tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


def bwd_config(g: int, d: int, block_size: int, large_smem: bool):
    """Launch configuration of the backward (override: ``msa.tuning`` field ``sparse_bwd_config``);
    large_smem: the device has >= 200 KiB of shared memory per SM (``large_shared_memory``).
    DKDV_BLOCK_M: packed query x head rows per MMA
    (raised to >= G); DKDV_BLOCK_N: keys per program (the block is split over programs, each keeping
    its dK/dV accumulators in registers); DQKV_*: the KV-outer dQ kernel (mode ``kv``: rows, warps,
    stages, key tile); DQR_BLOCK_H: heads per program of its slot reduction; DQ_*: the query-outer dQ
    kernel (mode ``query``); DQT_*: the query-tiled dQ kernel (mode ``tiled``; DQT_BLOCK_M rows =
    tile tokens x G, at least one token per tile)."""
    bs_pad = next_pow2(block_size, 16)
    if interpreting():
        cfg = dict(DKDV_BLOCK_M=16, DKDV_BLOCK_N=bs_pad, DKDV_WARPS=4, DKDV_STAGES=1, DQ_BLOCK_N=bs_pad,
                   DQ_WARPS=4, DQ_STAGES=1, DQKV_BLOCK_M=16, DQKV_BLOCK_N=bs_pad, DQKV_WARPS=4, DQKV_STAGES=1,
                   DQT_BLOCK_M=16, DQT_BLOCK_N=bs_pad, DQT_WARPS=4, DQT_STAGES=1)
    else:
        # DQT_BLOCK_M 64 (4 tokens x 16 heads): Triton emits wgmma for it on sm_90, mma.sync for 32 rows
        cfg = dict(DKDV_BLOCK_M=64, DKDV_BLOCK_N=min(bs_pad, 64), DKDV_WARPS=4, DKDV_STAGES=2, DQ_BLOCK_N=bs_pad,
                   DQ_WARPS=4, DQ_STAGES=2, DQKV_BLOCK_M=64, DQKV_BLOCK_N=min(bs_pad, 128), DQKV_WARPS=4,
                   DQKV_STAGES=1, DQT_BLOCK_M=64, DQT_BLOCK_N=min(bs_pad, 64), DQT_WARPS=4, DQT_STAGES=3)
        if g >= 8 and large_smem:
            # tiles of <= 8 tokens: a whole 128-key block per step halves the loop trips; 3 stages of
            # 128-key K and V tiles plus Q and dO are ~224 KB of shared memory, more than sm_80 has
            cfg["DQT_BLOCK_N"] = min(bs_pad, 128)
    cfg["DQR_BLOCK_H"] = 0  # 0: chosen from the shape (about 16K partial values per program)
    cfg = merge_launch_config(cfg, "sparse_bwd_config")
    cfg["DKDV_BLOCK_M"] = max(cfg["DKDV_BLOCK_M"], next_pow2(g, 16))
    cfg["DKDV_BLOCK_N"] = max(16, min(bs_pad, next_pow2(cfg["DKDV_BLOCK_N"], 16)))
    cfg["DQ_BLOCK_N"] = max(16, min(bs_pad, next_pow2(cfg["DQ_BLOCK_N"], 16)))
    cfg["DQKV_BLOCK_M"] = max(cfg["DQKV_BLOCK_M"], next_pow2(g, 16))
    cfg["DQKV_BLOCK_N"] = max(16, min(bs_pad, next_pow2(cfg["DQKV_BLOCK_N"], 16)))
    cfg["DQT_BLOCK_N"] = max(16, min(bs_pad, next_pow2(cfg["DQT_BLOCK_N"], 16)))
    return cfg





def dq_mode(ntok: int = 0) -> str:
    """How dQ is computed (``msa.tuning`` field ``sparse_bwd_dq``): ``kv`` (default), KV-outer over the
    reverse index like the forward, each (query, slot) contribution in a pre-assigned partial slot
    summed per query in a fixed slot order; ``query``, the spec's query-outer kernel, one program per
    (token, group) re-reading K/V of its K blocks, no partial buffer; ``tiled``, the forward's query
    tiles over the union of their blocks; ``auto`` (default), ``tiled`` below the forward's
    ``reverse_index.SHORT_TOKENS`` tokens, else ``kv``. All are deterministic."""
    mode = tuning.current().sparse_bwd_dq
    if mode == "auto":
        return "tiled" if ntok < SHORT_TOKENS else "kv"
    return mode


def _dq_kv_outer(q, k, v, do, lse, delta, bi, *, block_size: int, scale: float, cu_seqlens, mq: int, cfg,
                 full_index: ReverseIndex, partial_budget_bytes: Optional[int], timer,
                 plan: Optional[SelectionPlan] = None) -> torch.Tensor:
    """dQ of mode ``kv``: KV-outer kernel + fixed-order slot reduction, over query chunks whose partials
    (K * H_q * D per token, input dtype for 16-bit inputs) fit the forward's partial budget. One chunk
    reuses the dK/dV reverse index; several build a chunk-local index each (device-side, no sync)."""
    from .triton_impl import LOG2E, _partial_budget, partial_bytes_per_token, partial_dtype

    bsz, t, hq, d = q.shape
    hkv, nsel = k.shape[2], bi.shape[3]
    g = hq // hkv
    ntok = bsz * t
    dev = q.device
    pdtype = partial_dtype(q.dtype)
    # the forward's chunking (same budget rule and per-token bytes), so a plan's chunk indices serve both
    per_token = partial_bytes_per_token(nsel, hq, d, q.dtype)
    chunk = plan.chunk_tokens if plan is not None else max(
        1, min(ntok, _partial_budget(partial_budget_bytes, dev) // per_token))
    pdq = torch.empty((chunk * nsel, hq, d), dtype=pdtype, device=dev)
    dq = torch.empty_like(q)
    layout = full_index.layout
    starts = layout.starts
    block_d = next_pow2(d, 16)
    block_n = cfg["DQKV_BLOCK_N"]
    block_k = next_pow2(nsel, 1)
    block_h = cfg["DQR_BLOCK_H"] or min(next_pow2(hq, 1), max(1, 16384 // (block_k * block_d)))
    cdt, prec = tl_compute_dtype(q.dtype), dot_precision(q.dtype)
    for t0 in range(0, ntok, chunk):
        t1 = min(ntok, t0 + chunk)
        if t0 == 0 and t1 == ntok:
            ri, nbr = full_index, layout.num_blocks
        elif plan is not None:
            ri, nbr = plan.index(t0, t1)
        else:
            timer.start("dq_reverse_index")
            nbr = max(1, blocks_before(starts, t1))
            ri = build_reverse_index(bi, block_size, cu_seqlens, mq, token_range=(t0, t1), layout=layout,
                                     block_limit=nbr)
            timer.stop()
        timer.start("dq_kernel")
        sparse_attention_bwd_dq_kv_kernel[(ri.work_row.numel(),)](
            q, k, v, do, lse, delta, pdq, ri.entries, ri.work_row, ri.work_start, ri.work_end, ri.work_order,
            layout.block_start,
            layout.block_len, t0, nbr, float(scale) * LOG2E, float(scale),
            H_Q=hq, H_KV=hkv, G=g, TOPK=nsel, D=d, BLOCK_D=block_d, BLOCK_M=cfg["DQKV_BLOCK_M"], BLOCK_N=block_n,
            KV_TILES=triton.cdiv(block_size, block_n), CDT=cdt, DOT_PREC=prec, num_warps=cfg["DQKV_WARPS"],
            num_stages=cfg["DQKV_STAGES"])
        timer.stop()
        timer.start("dq_reduce")
        sparse_attention_bwd_dq_reduce_kernel[(t1 - t0, triton.cdiv(hq, block_h))](
            pdq, bi, dq, t0, H_Q=hq, H_KV=hkv, G=g, TOPK=nsel, BLOCK_K=block_k, D=d, BLOCK_D=block_d,
            BLOCK_H=block_h, num_warps=4)
        timer.stop()
    return dq


def _dq_tiled(q, k, v, do, lse, delta, bi, *, block_size: int, scale: float, cu_seqlens, timer,
              plan: Optional[SelectionPlan]) -> torch.Tensor:
    """dQ of mode ``tiled``: query tiles of DQT_BLOCK_M rows (fewer than the forward's: the dQ tile keeps
    Q, dO and the dQ accumulator in registers), their tile union cached in the plan like the forward's."""
    from ..utils.reverse_index import block_layout
    from .triton_impl import LOG2E

    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    cfg = bwd_config(g, d, block_size, large_shared_memory(q.device))
    tt = tile_tokens_for(g, cfg["DQT_BLOCK_M"], block_size)
    layout = plan.layout if plan is not None else block_layout(bsz, t, block_size, cu_seqlens, q.device)
    timer.start("tile_union")
    order = tuning.current().tile_order
    tu = plan.tile_union(tt, order) if plan is not None else build_tile_union(bi, layout, block_size, tt, order)
    timer.stop()
    block_n = cfg["DQT_BLOCK_N"]
    dq = torch.empty_like(q)
    timer.start("dq_kernel")
    sparse_attention_bwd_dq_tiled_kernel[(layout.num_blocks * tu.subs, hkv)](
        q, k, v, do, lse, delta, dq, tu.ids, tu.bits, tu.count, tu.perm, layout.seq_block_offset, layout.block_start,
        layout.block_len, float(scale) * LOG2E, float(scale), block_size, H_Q=hq, H_KV=hkv, G=g, UMAX=tu.ids.shape[2], TILE_T=tt,
        SUBS=tu.subs, D=d, BLOCK_D=next_pow2(d, 16), BLOCK_M=next_pow2(tt * g, 16), BLOCK_N=block_n,
        KV_TILES=triton.cdiv(block_size, block_n), CDT=tl_compute_dtype(q.dtype), DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg["DQT_WARPS"], num_stages=cfg["DQT_STAGES"])
    timer.stop()
    return dq


def sparse_attention_bwd_triton(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                lse: torch.Tensor, block_indices: torch.Tensor, *, block_size: int, scale: float,
                                cu_seqlens: Optional[torch.Tensor], max_queries_per_item: Optional[int] = None,
                                reverse_index: Optional[ReverseIndex] = None,
                                partial_budget_bytes: Optional[int] = None,
                                stage_times: Optional[dict] = None,
                                plan: Optional[SelectionPlan] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``msa.sparse_attention`` w.r.t. q, k, v (deterministic, no atomics).

    Args:
        do: (B, T, H_q, D) upstream gradient of o, any float dtype (cast to q.dtype).
        q: (B, T, H_q, D) bf16/fp16/fp32; k, v: (B, T, H_kv, D), same dtype.
        o: (B, T, H_q, D) forward output; lse: fp32 (B, T, H_q) natural-log lse of the forward.
        block_indices: int32 (B, T, H_kv, K) selection (spec convention, -1 padding).
        block_size: B_k; scale: softmax scale used by the forward.
        cu_seqlens: optional int32 (S+1,) packed-sequence offsets (then B == 1).
        max_queries_per_item: hot-row split size of the reverse index (default 2 * K * block_size).
        reverse_index: optional prebuilt ``build_reverse_index(block_indices, block_size, cu_seqlens,
            max_queries_per_item)`` (e.g. shared with a KV-outer forward); built here when None.
        partial_budget_bytes: bytes of dQ partials per query chunk (dQ mode ``kv``); default as the
            forward (``tuning.sparse_fwd_partial_bytes``, else min(16 GiB, 25% of free memory)).
        stage_times: optional dict (CUDA only) that receives CUDA-event times in ms of the stages
            (preprocess, dq_kernel, dq_reduce, dq_reverse_index, reverse_index, dkdv_kernel, dkdv_reduce);
            the call then synchronises, so use it only outside timed loops.
        plan: optional ``SelectionPlan`` of block_indices shared with the forward (its cached reverse
            indices and chunking are reused; it overrides max_queries_per_item and reverse_index).

    Returns:
        dq (B, T, H_q, D), dk, dv (B, T, H_kv, D), each in its input's dtype.
    """
    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nsel = block_indices.shape[3]
    ntok = bsz * t
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do = do.to(q.dtype).contiguous()
    o = o.contiguous()
    lse = lse.float().contiguous()
    bi = block_indices.to(torch.int32).contiguous()
    cdt = tl_compute_dtype(q.dtype)
    prec = dot_precision(q.dtype)
    block_d = next_pow2(d, 16)
    bs_pad = next_pow2(block_size, 16)

    from .triton_impl import _StageTimer
    timer = _StageTimer(stage_times, dev)
    delta = torch.empty(ntok * hq, dtype=torch.float32, device=dev)
    block_r = 64
    timer.start("preprocess")
    sparse_attention_bwd_preprocess_kernel[(triton.cdiv(ntok * hq, block_r),)](
        o, do, delta, ntok * hq, D=d, BLOCK_R=block_r, BLOCK_D=block_d)
    timer.stop()

    cfg = bwd_config(g, d, block_size, large_shared_memory(q.device))
    mode = dq_mode(ntok)
    if mode == "query":
        seq_start = token_seq_start(bsz, t, cu_seqlens, dev)
        dq = torch.empty_like(q)
        timer.start("dq_kernel")
        sparse_attention_bwd_dq_kernel[(ntok, hkv)](
            q, k, v, do, lse, delta, dq, bi, seq_start, float(scale), hq, hkv, nsel, block_size,
            G=g, D=d, BLOCK_G=next_pow2(g, 16), BLOCK_N=cfg["DQ_BLOCK_N"], KV_TILES=bs_pad // cfg["DQ_BLOCK_N"],
            BLOCK_D=block_d, CDT=cdt, DOT_PREC=prec, num_warps=cfg["DQ_WARPS"], num_stages=cfg["DQ_STAGES"])
        timer.stop()
    elif mode == "tiled":
        dq = _dq_tiled(q, k, v, do, lse, delta, bi, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens,
                       timer=timer, plan=plan)

    c = max_queries_per_item or hot_row_split(block_size, nsel, ntok)
    if plan is not None:
        c = plan.max_queries_per_item
        reverse_index = plan.full_index()
    if reverse_index is None:
        timer.start("reverse_index")
        reverse_index = build_reverse_index(bi, block_size, cu_seqlens, c)
        timer.stop()
    ri = reverse_index
    if mode == "kv":
        dq = _dq_kv_outer(q, k, v, do, lse, delta, bi, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens,
                          mq=c, cfg=cfg, full_index=ri, partial_budget_bytes=partial_budget_bytes, timer=timer,
                          plan=plan)
    nb = ri.layout.num_blocks
    rows = hkv * nb
    n_items = ri.work_row.numel()
    # Which items belong to split rows, and their partial slots (device-side, no host sync).
    counts = (ri.row_ptr[1:] - ri.row_ptr[:-1]).to(torch.int64)
    items = (counts + c - 1) // c
    wrow = ri.work_row.to(torch.int64)
    active = ri.work_start < ri.work_end
    split = active & (items[wrow] > 1)
    slot_of_item = torch.where(split, torch.cumsum(split.to(torch.int64), 0) - 1, torch.full_like(wrow, -1))
    first_item = torch.cumsum(items, 0) - items
    row_first_slot = slot_of_item[first_item.clamp(max=max(n_items - 1, 0))]
    # Split rows hold count > c entries, so their items number < 2 * count / c: a shape-only bound.
    n_slots = max(1, min(n_items, 2 * (ntok * hkv * nsel) // c + 1))

    dk = torch.zeros_like(k)  # key blocks nobody selected keep a zero gradient
    dv = torch.zeros_like(v)
    pdk = torch.empty((n_slots, bs_pad, d), dtype=torch.float32, device=dev)
    pdv = torch.empty_like(pdk)
    block_m = cfg["DKDV_BLOCK_M"]
    block_n = cfg["DKDV_BLOCK_N"]
    timer.start("dkdv_kernel")
    sparse_attention_bwd_dkdv_kernel[(n_items * (bs_pad // block_n),)](
        q, k, v, do, lse, delta, dk, dv, pdk, pdv, ri.entries, ri.work_row, ri.work_start, ri.work_end, ri.work_order,
        slot_of_item.to(torch.int32), ri.layout.block_start, ri.layout.block_len, float(scale), hq, hkv, nsel, nb,
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BS_PAD=bs_pad, CDT=cdt, DOT_PREC=prec,
        num_warps=cfg["DKDV_WARPS"], num_stages=cfg["DKDV_STAGES"])
    timer.stop()
    timer.start("dkdv_reduce")
    sparse_attention_bwd_reduce_kernel[(rows, bs_pad // block_n)](
        pdk, pdv, dk, dv, items.to(torch.int32), row_first_slot.to(torch.int32), ri.layout.block_start,
        ri.layout.block_len, hkv, nb, D=d, BLOCK_N=block_n, BLOCK_D=block_d, BS_PAD=bs_pad)
    timer.stop()
    timer.finish()
    return dq, dk, dv
