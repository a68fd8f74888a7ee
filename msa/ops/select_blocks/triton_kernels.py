"""Triton kernels of the MSA Index Branch: causal block-max index scores (top-k lives in msa.ops.topk).

``index_scores_fwd_kernel``: k_idx is ONE head shared by all H_kv groups, so the (query, group) pairs of
a tile of consecutive tokens are the MMA rows of a single GEMM against each key block (ROWS = 128 rows =
128 // H_kv tokens x H_kv groups by default; 256 halves the K re-reads). A work item is (tile, split): it
keeps its Q tile on chip and walks the key blocks b = split, split + nsplit, ... up to the tile's LAST
local block only (causal: about half the work of a full T x T product), reduces every block to its
per-row max right after the MMA and writes one fp32 per (row, block). The T x T token scores never
exist; only the (chunk rows, blocks) block-score buffer does.

Tuning knobs (all constexpr or launch options, chosen in triton_impl.py):
- NBUF > 1: the maxima of NBUF consecutive blocks of a row are kept in a [ROWS, NBUF] register tile and
  stored together (one store of NBUF columns instead of NBUF scattered single-column stores).
- PERSIST: a grid of about (programs per SM) x n_SM programs loops over the work items in launch order
  (longest tiles first, consecutive tiles of one split next to each other, so programs running at the
  same time walk the same k_idx blocks and share them in L2); otherwise one program per item.

``index_rescore_kernel``: the exact block scores of fp8-selected candidates (``fp8_rescore_blocks``),
KV-outer over the candidates' reverse index (``msa.ops.utils.reverse_index``): one work item loads a
key block of k_idx once and scores the (query, slot) entries that hold it as the rows of its MMAs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..topk.triton_kernels import order_bits


@triton.jit
def _index_scores_item(
    q_ptr, k_ptr, s_ptr, tile_ptr, qs_ptr, ks_ptr, tile, split,
    stride_qt, stride_qh, stride_kt, stride_sr,
    chunk_tok0, heads, head_dim, block_size, scale, nsplit,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NBUF: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, POS_SCALE: tl.constexpr, SUB_MASK: tl.constexpr,
    FP8: tl.constexpr,
):
    """Block-max scores of one (tile, split) work item (see index_scores_fwd_kernel)."""
    tok0 = tl.load(tile_ptr + tile * 3)
    tok1 = tl.load(tile_ptr + tile * 3 + 1)
    seq0 = tl.load(tile_ptr + tile * 3 + 2)

    r = tl.arange(0, ROWS)
    tok = tok0 + r // heads
    grp = r % heads
    rvalid = (r < (ROWS // heads) * heads) & (tok < tok1)
    pos = tok - seq0
    local = pos // block_size
    last_pos = tok1 - 1 - seq0
    last_local = last_pos // block_size

    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + grp[:, None] * stride_qh + d[None, :],
                mask=rvalid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 math is wrong; fp32 inputs keep fp32 (IEEE) products
        q = q.to(tl.float32)
    if FP8:  # per-(token, group) scale of the e4m3 queries: > 0, so applied after the block max
        qs = tl.load(qs_ptr + tok.to(tl.int64) * heads + grp, mask=rvalid, other=1.0)
    n = tl.arange(0, BLOCK_N)
    srow = (tok - chunk_tok0).to(tl.int64) * heads + grp
    subs = tl.cdiv(block_size, BLOCK_N)
    n_mine = tl.maximum((last_local - split + nsplit) // nsplit, 0)
    # Blocks that end at or before the tile's FIRST position are fully visible to every row: their
    # loop needs no causal mask (the mask costs about as much ALU time as the MMA). Only the few
    # blocks on the tile's diagonal go through the masked loop below.
    first_pos = tok0 - seq0
    n_full_blocks = (first_pos + 1) // block_size  # blocks b with (b + 1) * block_size - 1 <= first_pos
    n_full_mine = tl.minimum(tl.maximum((n_full_blocks - split + nsplit - 1) // nsplit, 0), n_mine)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    cols = tl.arange(0, NBUF)
    buf = tl.full([ROWS, NBUF], float("-inf"), tl.float32)
    # One flat loop over (my key block, sub-tile) so the compiler can software-pipeline the K loads.
    for it in range(0, n_full_mine * subs):
        bi = it // subs
        sub = (it - bi * subs) * BLOCK_N
        b = split + bi * nsplit
        kp = b * block_size + sub + n
        kt = tl.load(k_ptr + (seq0 + kp).to(tl.int64)[None, :] * stride_kt + d[:, None],
                     mask=dmask[:, None] & (sub + n < block_size)[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        if POS_SCALE:  # max(s) * scale == max(s * scale) for scale > 0: scale the [ROWS] vector only
            if SUB_MASK:
                s = tl.where((sub + n < block_size)[None, :], s, float("-inf"))
            m = tl.maximum(m, tl.max(s, axis=1))
        else:
            s = tl.where((sub + n < block_size)[None, :], s * scale, float("-inf"))
            m = tl.maximum(m, tl.max(s, axis=1))
        # a [ROWS] vector, not a scalar: the interpreter rejects scalar-bool & tensor-bool masks
        is_last = (sub + BLOCK_N + tl.zeros([ROWS], tl.int32)) >= block_size
        out = m * scale if POS_SCALE else m
        if FP8:  # the query's and the key block's scales: > 0, so applied to the block max
            out = out * qs * tl.load(ks_ptr + (seq0 + b * block_size).to(tl.int64))
        if NBUF == 1:
            tl.store(s_ptr + srow * stride_sr + b, out, mask=rvalid & is_last)
        else:
            # slot of this block in the row buffer; slots fill 0, 1, ... so a flush after slot j
            # stores exactly the slots <= j, all written since the previous flush
            slot = bi % NBUF
            buf = tl.where((cols[None, :] == slot) & is_last[:, None], out[:, None], buf)
            if (sub + BLOCK_N >= block_size) & ((slot == NBUF - 1) | (bi == n_full_mine - 1)):
                bcol = split + (bi - slot + cols) * nsplit
                tl.store(s_ptr + srow[:, None] * stride_sr + bcol[None, :], buf,
                         mask=rvalid[:, None] & (cols <= slot)[None, :])
        m = tl.where(is_last, float("-inf"), m)
    # Diagonal blocks (at most ceil(tile tokens / block_size) + 1 per tile): direct single-column stores.
    for it in range(n_full_mine * subs, n_mine * subs):
        bi = it // subs
        sub = (it - bi * subs) * BLOCK_N
        b = split + bi * nsplit
        kp = b * block_size + sub + n  # key positions inside the sequence
        kmask = (sub + n < block_size) & (kp <= last_pos)
        kt = tl.load(k_ptr + (seq0 + kp).to(tl.int64)[None, :] * stride_kt + d[:, None],
                     mask=kmask[None, :] & dmask[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        if FP8:
            s = s * tl.load(ks_ptr + (seq0 + b * block_size).to(tl.int64))
        s = s * scale  # before the max: a negative scale would flip the order
        s = tl.where(kmask[None, :] & (kp[None, :] <= pos[:, None]), s, float("-inf"))
        m = tl.maximum(m, tl.max(s, axis=1))
        is_last = (sub + BLOCK_N + tl.zeros([ROWS], tl.int32)) >= block_size
        out = m
        if FP8:
            out = m * qs
        tl.store(s_ptr + srow * stride_sr + b, out, mask=rvalid & (b <= local) & is_last)
        m = tl.where(is_last, float("-inf"), m)


@triton.jit
def index_scores_fwd_kernel(
    q_ptr, k_ptr, s_ptr, tile_ptr, qs_ptr, ks_ptr,
    stride_qt, stride_qh, stride_kt, stride_sr,
    chunk_tok0, heads, head_dim, block_size, scale, nsplit, n_tiles,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NBUF: tl.constexpr,
    PERSIST: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, POS_SCALE: tl.constexpr, SUB_MASK: tl.constexpr,
    FP8: tl.constexpr,
):
    """Block-max scores of the query tiles of one chunk.

    q: (T_total, H_kv, D) flattened tokens; k: (T_total, D); tile table int32 (n_tiles, 3) holding
    (first token, end token, sequence start) of tiles that never cross a sequence boundary, sorted by token.
    s: fp32 (chunk rows, width) with row (token - chunk_tok0) * H_kv + group; column b is written for
    every b <= the row's local block (b * block_size <= position), nothing else.
    FP8: q and k are float8_e4m3fn with fp32 scales qs (T_total * H_kv,) per (token, group) and ks
    (T_total,) per key block (every token of a block carries it; read at the block's first token):
    block score = max_j (q8 . k8_j) * qs * ks_b * scale, the GEMM in fp8 with fp32 accumulation and both
    scales on the block max, so the per-key epilogue is the same as for 16-bit inputs.
    Work item w in [0, n_tiles * nsplit): split = w // n_tiles, tile = n_tiles - 1 - w % n_tiles.
    Grid: (n_tiles * nsplit,) one item per program, or (P,) with PERSIST (items w = pid, pid + P, ...).
    """
    # Tiles are sorted by token, so later tiles see more key blocks: start the longest ones first to
    # shorten the tail.
    n_work = n_tiles * nsplit
    if PERSIST:
        for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
            _index_scores_item(q_ptr, k_ptr, s_ptr, tile_ptr, qs_ptr, ks_ptr, n_tiles - 1 - w % n_tiles, w // n_tiles,
                               stride_qt, stride_qh, stride_kt, stride_sr,
                               chunk_tok0, heads, head_dim, block_size, scale, nsplit,
                               ROWS, BLOCK_N, BLOCK_D, NBUF, UPCAST, IEEE, POS_SCALE, SUB_MASK, FP8)
    else:
        w = tl.program_id(0)
        _index_scores_item(q_ptr, k_ptr, s_ptr, tile_ptr, qs_ptr, ks_ptr, n_tiles - 1 - w % n_tiles, w // n_tiles,
                           stride_qt, stride_qh, stride_kt, stride_sr,
                           chunk_tok0, heads, head_dim, block_size, scale, nsplit,
                           ROWS, BLOCK_N, BLOCK_D, NBUF, UPCAST, IEEE, POS_SCALE, SUB_MASK, FP8)


@triton.jit
def index_rescore_kernel(QI, KI, KEYS, ENTRIES, WORK_ROW, WORK_START, WORK_END, WORK_ORDER, BLOCK_START, BLOCK_LEN,
                         SEQ_BLOCK_OFFSET, POS, scale, block_size, init_blocks, local_blocks, NB,
                         H_KV: tl.constexpr, NSEL: tl.constexpr, DI: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_DI: tl.constexpr, KV_TILES: tl.constexpr,
                         CDT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Exact block scores of candidate blocks as top-k keys: QI (T_all, H_KV, DI) and KI (T_all, DI) in
    their own (16/32-bit) dtype; ENTRIES / WORK_* the reverse index of the candidates (NSEL per token
    and group; rows r * NB + global block); POS int32 (T_all,) position in the sequence. Writes KEYS
    int32 (T_all * H_KV * NSEL,) at ((token * H_KV + r) * NSEL + slot): the order key
    (``msa.ops.topk``) of max_{key j in the block, j <= token} <q, k_j> * scale, or of +inf for a forced
    block (init_blocks leading, local_blocks trailing); slots of -1 are left as the caller filled them."""
    w = tl.load(WORK_ORDER + tl.program_id(0))  # longest items first (ReverseIndex.work_order)
    start = tl.load(WORK_START + w)
    end = tl.load(WORK_END + w)
    if start < end:
        row = tl.load(WORK_ROW + w)
        r = row // NB
        gb = row % NB
        kstart = tl.load(BLOCK_START + gb)
        klen = tl.load(BLOCK_LEN + gb)
        e = tl.arange(0, BLOCK_DI)
        emask = e < DI
        for e0 in range(start, end, BLOCK_E):
            ei = e0 + tl.arange(0, BLOCK_E)
            em = ei < end
            ent = tl.load(ENTRIES + ei, mask=em, other=0)
            tok = (ent // NSEL).to(tl.int64)
            qi = tl.load(QI + (tok * H_KV + r)[:, None] * DI + e[None, :], mask=em[:, None] & emask[None, :],
                         other=0.0).to(CDT)
            best = tl.full([BLOCK_E], float("-inf"), tl.float32)
            for kt in tl.static_range(KV_TILES):
                n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
                kpos = kstart + n
                kvalid = n < klen
                ki = tl.load(KI + kpos.to(tl.int64)[:, None] * DI + e[None, :],
                             mask=kvalid[:, None] & emask[None, :], other=0.0).to(CDT)
                sc = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * scale
                sc = tl.where(kvalid[None, :] & (kpos.to(tl.int64)[None, :] <= tok[:, None]), sc, float("-inf"))
                best = tl.maximum(best, tl.max(sc, axis=1))
            blk = gb - tl.load(SEQ_BLOCK_OFFSET + tok, mask=em, other=0)
            local = tl.load(POS + tok, mask=em, other=0) // block_size
            forced = (blk < init_blocks) | (blk > local - local_blocks)
            key = order_bits(tl.where(forced, float("inf"), best))
            tl.store(KEYS + (tok * H_KV + r) * NSEL + ent % NSEL, key, mask=em)
