"""Triton backward of the MSA Main Branch (spec section 4): dQ query-outer, dK/dV KV-outer.

Three launches (plus a small reduce when hot rows were split):

1. ``sparse_attention_bwd_preprocess_kernel``: delta[token, head] = rowsum(dO * O) in fp32.
2. ``sparse_attention_bwd_dq_kernel``: one program per (token, group). The group's G heads are the
   MMA rows (padded to >= 16); the program loops over the group's selected blocks and recomputes
   P = exp(S - lse) from the forward's lse, so no softmax state is stored.
3. ``sparse_attention_bwd_dkdv_kernel``: one program per (work item, key sub-tile) of the reverse
   index (``reverse_index.build_reverse_index``). It loads its key block once and gathers the queries
   that selected it, packing ``BLOCK_M // G`` query positions x G heads into the MMA rows; row m maps
   to entry ``m // G`` and head ``r * G + m % G`` at run time, so any G (1, 3, 12, 64, ...) works.
   A row of the index that fits one work item writes dK/dV directly; a hot row split into several
   items writes one fp32 partial per item into a pre-assigned slot, and
   ``sparse_attention_bwd_reduce_kernel`` sums the partials in item order. No atomics anywhere, so
   two runs give bitwise identical gradients.

Opt-in ``MSA_SPARSE_BWD_DQ=atomic`` (see ``dq_mode``) skips launch 2: the dK/dV kernel also computes
dS @ K per tile and adds it into an fp32 dQ buffer with atomics (K/V then leave memory once per
(block, query tile) instead of once per (query, block)); dQ is then not bitwise repeatable. Launch
configurations: ``bwd_config`` (env ``MSA_SPARSE_BWD_CONFIG``).

Causal masking uses flattened token indices: a key at flattened position j is visible to the query
at flattened position t iff it lies in one of the query's selected blocks and j <= t (blocks are
numbered from the query's own sequence start, so no key of another sequence is ever addressed).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .reverse_index import ReverseIndex, build_reverse_index
from ..common import env_config


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _compute_dtype(dtype: torch.dtype):
    """Element type fed to tl.dot. The CPU interpreter's bf16/fp16 math is wrong, so it computes in fp32."""
    if _interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (the fp32 path is the accuracy reference).
    return "ieee" if dtype == torch.float32 else "tf32"


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
def sparse_attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PDK, PDV, DQ32, ENTRIES, WORK_ROW, WORK_START,
                                     WORK_END, WORK_SLOT, BLOCK_START, BLOCK_LEN, scale, HQ, HKV, NSEL, NB,
                                     G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BS_PAD: tl.constexpr,
                                     CDT: tl.constexpr, DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    w = tl.program_id(0)
    sub = tl.program_id(1)  # key sub-tile of the block (keeps the dK/dV accumulators in registers)
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
        if DQ_ATOMIC:
            # opt-in: this key tile's dQ contribution added into an fp32 buffer (FlashAttention-2 style);
            # saves the query-outer dQ kernel's re-reads of K/V but is not bitwise repeatable
            dqc = tl.dot(ds.to(CDT), kk, input_precision=DOT_PREC) * scale
            tl.atomic_add(DQ32 + qoff, dqc, mask=qmask)
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



def bwd_config(g: int, d: int, block_size: int):
    """Launch configuration of the backward (env ``MSA_SPARSE_BWD_CONFIG``, e.g.
    ``DKDV_BLOCK_M=32,DKDV_BLOCK_N=128,DKDV_WARPS=8,DKDV_STAGES=2,DQ_BLOCK_N=64,DQ_WARPS=4,DQ_STAGES=2``;
    ``benchmarks/bench_train.py --sweep`` times a few). DKDV_BLOCK_M: packed query x head rows per MMA
    (raised to >= G); DKDV_BLOCK_N: keys per program (the block is split over programs, each keeping
    its dK/dV accumulators in registers); DQ_BLOCK_N: keys per sub-tile of the query-outer dQ kernel."""
    bs_pad = _pow2(block_size)
    if _interpreting():
        cfg = dict(DKDV_BLOCK_M=16, DKDV_BLOCK_N=bs_pad, DKDV_WARPS=4, DKDV_STAGES=1, DQ_BLOCK_N=bs_pad,
                   DQ_WARPS=4, DQ_STAGES=1)
    else:
        # sm_90 AOT report at the paper's shape (benchmarks/aot_check.py): dK/dV with 128 rows x 64 keys, 8
        # warps, 2 stages: 181760 B shared, 252 regs, no spills (64 x 64: 107264 B / 228 regs, half the MMA
        # rows for the same one-CTA-per-SM occupancy; 128 keys per program spill ~600 B). The opt-in
        # atomic-dQ variant adds a dS @ K MMA and needs 64 rows to stay clear of the 232448 B limit.
        # dQ: 4 warps, 128-key tiles: 49152 B, 234 regs, no spills.
        cfg = dict(DKDV_BLOCK_M=64 if dq_mode() == "atomic" else 128, DKDV_BLOCK_N=min(bs_pad, 64), DKDV_WARPS=8,
                   DKDV_STAGES=2, DQ_BLOCK_N=bs_pad, DQ_WARPS=4, DQ_STAGES=2)
    cfg.update(env_config("MSA_SPARSE_BWD_CONFIG"))
    cfg["DKDV_BLOCK_M"] = max(cfg["DKDV_BLOCK_M"], _pow2(g))
    cfg["DKDV_BLOCK_N"] = max(16, min(bs_pad, _pow2(cfg["DKDV_BLOCK_N"])))
    cfg["DQ_BLOCK_N"] = max(16, min(bs_pad, _pow2(cfg["DQ_BLOCK_N"])))
    return cfg


def dq_mode() -> str:
    """'query' (default: the spec's deterministic query-outer dQ kernel) or 'atomic' (opt-in, env
    ``MSA_SPARSE_BWD_DQ=atomic``, ignored under torch.use_deterministic_algorithms: the dK/dV kernel also
    adds each key tile's dQ contribution into an fp32 buffer with atomics, so K/V are read once per
    (block, query tile) instead of once per query; dQ is then not bitwise repeatable)."""
    mode = os.environ.get("MSA_SPARSE_BWD_DQ", "query")
    if mode not in ("query", "atomic"):
        raise ValueError(f"MSA_SPARSE_BWD_DQ must be 'query' or 'atomic', got {mode!r}")
    return "query" if torch.are_deterministic_algorithms_enabled() else mode


def default_max_queries_per_item(block_size: int, topk: int) -> int:
    """Hot-row chunk: ~2 * k * B_k queries as in the spec (at least 64 so tiles stay full)."""
    return max(64, 2 * topk * block_size)


def sparse_attention_bwd_triton(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                lse: torch.Tensor, block_indices: torch.Tensor, *, block_size: int, scale: float,
                                cu_seqlens: Optional[torch.Tensor], max_queries_per_item: Optional[int] = None,
                                reverse_index: Optional[ReverseIndex] = None
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    cdt = _compute_dtype(q.dtype)
    prec = _dot_precision(q.dtype)
    block_d = _pow2(d)
    bs_pad = _pow2(block_size)

    delta = torch.empty(ntok * hq, dtype=torch.float32, device=dev)
    block_r = 64
    sparse_attention_bwd_preprocess_kernel[(triton.cdiv(ntok * hq, block_r),)](
        o, do, delta, ntok * hq, D=d, BLOCK_R=block_r, BLOCK_D=block_d)

    cfg = bwd_config(g, d, block_size)
    dq_atomic = dq_mode() == "atomic"
    if dq_atomic:
        dq32 = torch.zeros((ntok * hq, d), dtype=torch.float32, device=dev)
    else:
        dq32 = delta  # unused pointer
        seq_start = token_seq_start(bsz, t, cu_seqlens, dev)
        dq = torch.empty_like(q)
        sparse_attention_bwd_dq_kernel[(ntok, hkv)](
            q, k, v, do, lse, delta, dq, bi, seq_start, float(scale), hq, hkv, nsel, block_size,
            G=g, D=d, BLOCK_G=_pow2(g), BLOCK_N=cfg["DQ_BLOCK_N"], KV_TILES=bs_pad // cfg["DQ_BLOCK_N"],
            BLOCK_D=block_d, CDT=cdt, DOT_PREC=prec, num_warps=cfg["DQ_WARPS"], num_stages=cfg["DQ_STAGES"])

    c = max_queries_per_item or default_max_queries_per_item(block_size, nsel)
    if reverse_index is None:
        reverse_index = build_reverse_index(bi, block_size, cu_seqlens, c)
    ri = reverse_index
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
    sparse_attention_bwd_dkdv_kernel[(n_items, bs_pad // block_n)](
        q, k, v, do, lse, delta, dk, dv, pdk, pdv, dq32, ri.entries, ri.work_row, ri.work_start, ri.work_end,
        slot_of_item.to(torch.int32), ri.layout.block_start, ri.layout.block_len, float(scale), hq, hkv, nsel, nb,
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BS_PAD=bs_pad, CDT=cdt, DOT_PREC=prec,
        DQ_ATOMIC=dq_atomic, num_warps=cfg["DKDV_WARPS"], num_stages=cfg["DKDV_STAGES"])
    sparse_attention_bwd_reduce_kernel[(rows, bs_pad // block_n)](
        pdk, pdv, dk, dv, items.to(torch.int32), row_first_slot.to(torch.int32), ri.layout.block_start,
        ri.layout.block_len, hkv, nb, D=d, BLOCK_N=block_n, BLOCK_D=block_d, BS_PAD=bs_pad)
    if dq_atomic:
        dq = dq32.view(q.shape).to(q.dtype)
    return dq, dk, dv
