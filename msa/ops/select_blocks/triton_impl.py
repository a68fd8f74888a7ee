"""Triton Index Branch: ``select_blocks_triton`` (backend="triton" of ``msa.select_blocks``).

Pipeline per query chunk (spec section 4, "chunk queries under a memory budget"):
  1. ``index_scores_fwd_kernel`` (triton_kernels.py): fused token score -> causal block max, one GEMM
     row per (query, group), only key blocks up to each tile's last local block; writes a bounded fp32
     (chunk_tokens * H_kv, width) block-score buffer, width = 1 + the chunk's largest local block.
  2. ``block_topk_fwd_kernel`` (msa/ops/topk/triton_kernels.py): exp-free top-k with forcing (local,
     local_blocks, init_blocks -> +inf), causal exclusion (b > local) and the index convention written
     directly (local block in the last valid slot, -1 padding).
With fp8 scores and ``fp8_rescore_blocks`` E > 0, stage 2 keeps topk + E candidates; after the last
chunk ``index_rescore_kernel`` scores the candidates exactly (KV-outer over their reverse index) and a
top-k over those keys (``launch_block_topk`` on packed candidates) picks the topk.
The buffer never exceeds ``budget_bytes`` (default 2 GiB): T = 1M, H_kv = 4, B_k = 128 (8192 blocks)
processes 16K-token chunks.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton

from ..utils.triton_helpers import interpreting, next_pow2, num_sms

from ...cache.fp8 import quantize_fp8, quantize_fp8_key_blocks
from ..common import cu_seqlens_host
from ..topk.triton_kernels import SENTINEL, launch_block_topk
from ..utils.reverse_index import block_layout, build_reverse_index, hot_row_split
from ..utils.triton_helpers import dot_precision, tl_compute_dtype
from .triton_kernels import index_rescore_kernel, index_scores_fwd_kernel

DEFAULT_BUDGET_BYTES = 2 << 30


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation hook (tests replace it to poison fresh buffers and catch unwritten entries)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile_table(starts: torch.Tensor, lens: torch.Tensor, tok_per_tile: int) -> torch.Tensor:
    """int64 (n_tiles, 3) CPU table (first token, end token, sequence start); tiles stay in one sequence."""
    n_t = (lens + tok_per_tile - 1) // tok_per_tile
    seq_of_tile = torch.repeat_interleave(torch.arange(len(lens)), n_t)
    first_tile = torch.cumsum(n_t, 0) - n_t
    idx_in_seq = torch.arange(int(n_t.sum())) - first_tile[seq_of_tile]
    t0 = starts[seq_of_tile] + idx_in_seq * tok_per_tile
    t1 = torch.minimum(t0 + tok_per_tile, starts[seq_of_tile] + lens[seq_of_tile])
    return torch.stack([t0, t1, starts[seq_of_tile]], dim=1)


class _Plan(NamedTuple):
    """Everything select_blocks_triton derives from the layout alone (no tensor data), built once per
    layout: tiles_dev int32 (n_tiles, 3) device copy of _tile_table; pos int32 (B*T,) position of every
    token in its sequence (device); chunks: (first tile, end tile, first token, end token, buffer
    width) per launch pair; buf_elems: fp32 elements of the reused block-score buffer."""

    tiles_dev: torch.Tensor
    pos: torch.Tensor
    chunks: Tuple[Tuple[int, int, int, int, int], ...]
    buf_elems: int


_PLAN_CACHE: Dict[tuple, _Plan] = {}


def _plan(cu: Tuple[int, ...], heads: int, block_size: int, tok_per_tile: int, budget_bytes: int, dev) -> _Plan:
    """The _Plan of the flat layout with sequence offsets ``cu`` (host ints, cu[-1] = B*T), cached:
    every MSA layer of a forward, and every step at a fixed layout, reuses it, so a call does no host
    tensor work besides its launches (below ~16K tokens the host, not the GPU, bounds this op)."""
    key = (cu, heads, block_size, tok_per_tile, budget_bytes, str(dev))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    offs = torch.tensor(cu, dtype=torch.int64)
    starts, lens = offs[:-1], offs[1:] - offs[:-1]
    total = cu[-1]
    tiles = _tile_table(starts, lens, tok_per_tile)
    # width of a tile's buffer rows: 1 + its last local block
    tile_width = (tiles[:, 1] - 1 - tiles[:, 2]) // block_size + 1
    nb_max = int(tile_width.max())
    tok_budget = max(tok_per_tile, budget_bytes // (heads * nb_max * 4))
    tiles_per_chunk = max(1, tok_budget // tok_per_tile)
    buf_tokens = min(total, tiles_per_chunk * tok_per_tile)
    chunks = []
    for i0 in range(0, tiles.shape[0], tiles_per_chunk):
        i1 = min(tiles.shape[0], i0 + tiles_per_chunk)
        chunks.append((i0, i1, int(tiles[i0, 0]), int(tiles[i1 - 1, 1]), int(tile_width[i0:i1].max())))
    pos = (torch.arange(total) - torch.repeat_interleave(starts, lens)).to(torch.int32).to(dev)
    hit = _Plan(tiles.to(torch.int32).to(dev), pos, tuple(chunks), buf_tokens * heads * nb_max)
    if len(_PLAN_CACHE) >= 32:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = hit
    return hit


@torch.no_grad()
def select_blocks_triton(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int, topk: int,
                         init_blocks: int, local_blocks: int, scale: float,
                         cu_seqlens: Optional[torch.Tensor], budget_bytes: int = DEFAULT_BUDGET_BYTES,
                         rows: Optional[int] = None, nsplit: Optional[int] = None, fp8_scores: bool = False,
                         fp8_rescore_blocks: int = 0, **tune) -> torch.Tensor:
    """Index Branch block selection in Triton (arguments already validated by ``msa.select_blocks``).

    Args:
        q_idx: (B, T, H_kv, D_idx) bf16/fp16/fp32 index queries.
        k_idx: (B, T, D_idx) index keys (one head shared by all groups), same dtype.
        block_size, topk, init_blocks, local_blocks, scale: as in ``msa.select_blocks``.
        cu_seqlens: optional int32 (S+1,) packed-sequence offsets (B == 1).
        budget_bytes: cap of the fp32 block-score buffer (the only intermediate).
        rows, nsplit: tuning overrides (MMA rows per program, key-block splits per tile).
        fp8_scores: quantise q_idx per (token, group) (``msa.cache.quantize_fp8``) and k_idx per key
            block (``msa.cache.quantize_fp8_key_blocks``) to float8_e4m3fn and score with an fp8 GEMM
            (fp32 accumulation; both scales applied to the block max).
        fp8_rescore_blocks: with fp8_scores, keep topk + this many candidates and pick the topk by their
            exact block scores (q_idx / k_idx as given, fp32 accumulation); 0: the fp8 selection.
        tune: further score-kernel overrides, see ``score_config`` (block_n, num_warps, num_stages,
            nbuf, persist, max_registers).

    Returns:
        int32 (B, T, H_kv, topk): block ids within each sequence, the local block in the last valid
        slot, -1 after the valid prefix.
    """
    bsz, t, heads, dim = q_idx.shape
    dev = q_idx.device
    if k_idx.dtype != q_idx.dtype:
        k_idx = k_idx.to(q_idx.dtype)
    q = q_idx.reshape(bsz * t, heads, dim)
    k = k_idx.reshape(bsz * t, dim)
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(1) != 1:
        k = k.contiguous()
    total = bsz * t
    # the flat layout's sequence offsets: the B rows, or the packed sequences (values checked here)
    cu = tuple(range(0, total + 1, t)) if cu_seqlens is None else tuple(cu_seqlens_host(cu_seqlens, total))
    q_exact, k_exact = q, k
    qs = ks = None
    if fp8_scores:
        q, qs = quantize_fp8(q)
        k, ks = quantize_fp8_key_blocks(k, cu, block_size)
    rescore = fp8_scores and fp8_rescore_blocks > 0
    n_keep = topk + fp8_rescore_blocks if rescore else topk
    cfg = score_config(q, heads, dim, block_size, rows=rows, nsplit=nsplit, **tune)
    plan = _plan(cu, heads, block_size, cfg["rows"] // heads, budget_bytes, dev)
    buf = _empty((plan.buf_elems,), torch.float32, dev)
    out = _empty((total * heads, n_keep), torch.int32, dev)
    for i0, i1, tok_a, tok_b, width in plan.chunks:
        scores = buf[: (tok_b - tok_a) * heads * width].view((tok_b - tok_a) * heads, width)
        _launch_scores(q, k, scores, plan.tiles_dev[i0:i1], tok_a, block_size, scale, cfg, qs, ks)
        launch_block_topk(scores, out, n_keep, n_cols=width, pos=plan.pos, pos_tok_off=tok_a, heads=heads,
                          block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks,
                          out_row_off=tok_a * heads, convention=True)
    if rescore:
        del buf
        out = _rescore(q_exact, k_exact, out.view(bsz, t, heads, n_keep), plan.pos, topk=topk, block_size=block_size,
                       init_blocks=init_blocks, local_blocks=local_blocks, scale=scale, cu_seqlens=cu_seqlens)
    return out.view(bsz, t, heads, topk)


def _rescore(q: torch.Tensor, k: torch.Tensor, cand: torch.Tensor, pos: torch.Tensor, *, topk: int, block_size: int,
             init_blocks: int, local_blocks: int, scale: float, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """The topk of the candidates cand int32 (B, T, H_kv, n) (index convention) by their exact block
    scores: q (B*T, H_kv, D_idx), k (B*T, D_idx) unquantised. Returns int32 (B*T*H_kv, topk)."""
    bsz, t, heads, n = cand.shape
    dim = q.shape[-1]
    q, k = q.contiguous(), k.contiguous()  # the kernel indexes dense rows (the score kernel takes strides)
    layout = block_layout(bsz, t, block_size, cu_seqlens, q.device)
    mq = hot_row_split(block_size, n, bsz * t)
    ri = build_reverse_index(cand, block_size, cu_seqlens, mq, layout=layout)
    keys = torch.full((bsz * t * heads, n), SENTINEL, dtype=torch.int32, device=q.device)  # -1 slots stay out
    block_n = max(16, min(128, next_pow2(block_size)))
    index_rescore_kernel[(ri.work_row.numel(),)](
        q, k, keys, ri.entries, ri.work_row, ri.work_start, ri.work_end, ri.work_order, layout.block_start,
        layout.block_len,
        layout.seq_block_offset, pos, float(scale), block_size, init_blocks, local_blocks, layout.num_blocks,
        H_KV=heads, NSEL=n, DI=dim, BLOCK_E=64, BLOCK_N=block_n, BLOCK_DI=next_pow2(dim, 16),
        KV_TILES=triton.cdiv(block_size, block_n), CDT=tl_compute_dtype(q.dtype), DOT_PREC=dot_precision(q.dtype),
        num_warps=4, num_stages=2)
    out = _empty((bsz * t * heads, topk), torch.int32, q.device)
    # the keys' columns are the candidates' block ids; forcing is already in the keys
    launch_block_topk(keys, out, topk, pos=pos, heads=heads, block_size=block_size, convention=True,
                      cand_cols=cand.view(bsz * t * heads, n))
    return out


# Score-kernel defaults for 16-bit inputs on the GPU: 256 query rows x 128 keys per tile, 8 warps,
# 3 stages, the maxima of 8 blocks stored together (measured choice: docs/perf-notes.md).
SCORE_DEFAULTS = {"rows": 256, "block_n": 128, "num_warps": 8, "num_stages": 3, "nbuf": 8, "persist": 0,
                  "max_registers": None}
# e4m3 inputs: 128 rows x 4 warps fit two programs per SM (half the shared memory of 16-bit tiles), so one
# program's block-max epilogue runs under the other's MMA (docs/perf-notes.md round 39).
FP8_SCORE_DEFAULTS = {**SCORE_DEFAULTS, "rows": 128, "num_warps": 4}
SMEM_LIMIT = 232448  # bytes of shared memory one CTA may use on H100/H200 (227 KB)


def score_smem_bytes(rows: int, block_n: int, block_d: int, elt: int, stages: int) -> int:
    """Shared-memory estimate of index_scores_fwd_kernel: the Q tile (an MMA operand) plus `stages`
    pipelined K tiles, plus a small allowance for layout conversions of the [ROWS] maxima."""
    return rows * block_d * elt + max(1, stages) * block_n * block_d * elt + rows * 4 * 4


def score_config(q: torch.Tensor, heads: int, dim: int, block_size: int, *, rows: Optional[int] = None,
                 nsplit: Optional[int] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
                 num_stages: Optional[int] = None, nbuf: Optional[int] = None,
                 persist: Optional[int] = None, max_registers: Optional[int] = None) -> dict:
    """Resolved launch configuration of index_scores_fwd_kernel (None = default).

    rows: MMA rows per program (power of two >= H_kv; tokens per tile = rows // H_kv).
    nsplit: key-block splits per tile (None: enough programs for ~4 per SM).
    block_n: keys per MMA (power of two, 16..128; capped by the block size).
    num_warps, num_stages: Triton launch options.
    nbuf: consecutive blocks whose maxima are buffered in registers and stored together (power of two).
    persist: 0 = one program per (tile, split); p > 0 = p x n_SM persistent programs.
    max_registers: cap of registers per thread (Triton's ``maxnreg``; None: the compiler's choice), so that
        more programs fit one SM (65536 registers: two programs of 8 warps need <= 128).
    Defaults that would exceed SMEM_LIMIT shrink num_stages then block_n; explicit values are kept (an
    impossible explicit config fails to compile, which the sweep records).
    """
    interp = interpreting()
    wide = q.element_size() == 4 and not interp
    elt = q.element_size()
    # an fp8 MMA needs K >= 32 on the GPU (the interpreter does not check): pad D_idx, the loads mask it
    block_d = max(32 if elt == 1 else 16, next_pow2(dim))
    d = FP8_SCORE_DEFAULTS if elt == 1 else SCORE_DEFAULTS
    explicit = dict(block_n=block_n, num_stages=num_stages)
    if rows is None:  # fp32 on the GPU: twice the bytes per tile, halve the rows
        rows = 64 if wide else d["rows"]
    rows = max(next_pow2(rows), next_pow2(heads))
    bn_cap = max(16, min(128, next_pow2(block_size)))
    block_n = min(block_n or (64 if wide else d["block_n"]), bn_cap)
    num_stages = num_stages or (2 if wide else d["num_stages"])
    if explicit["num_stages"] is None:
        while num_stages > 2 and score_smem_bytes(rows, block_n, block_d, elt, num_stages) > SMEM_LIMIT:
            num_stages -= 1
    if explicit["block_n"] is None:
        while block_n > 16 and score_smem_bytes(rows, block_n, block_d, elt, num_stages) > SMEM_LIMIT:
            block_n //= 2
    num_warps = num_warps or (d["num_warps"] if rows >= 128 else 4)
    nbuf = next_pow2(nbuf if nbuf is not None else d["nbuf"])
    persist = d["persist"] if persist is None else int(persist)
    if interp:
        num_warps, num_stages = 1, 1
    if max_registers is None and block_d <= 128 and not interp:  # a cap measured for D_idx <= 128 only
        max_registers = d["max_registers"]
    if max_registers is not None and not (isinstance(max_registers, int) and not isinstance(max_registers, bool)
                                          and 24 <= max_registers <= 255):
        raise ValueError(f"max_registers must be an int in [24, 255] (registers per thread), got {max_registers!r}")
    return {"rows": rows, "nsplit": nsplit, "block_n": block_n, "block_d": block_d, "num_warps": num_warps,
            "num_stages": num_stages, "nbuf": nbuf, "persist": persist, "max_registers": max_registers}


def _launch_scores(q, k, scores, tiles_dev, tok_a, block_size, scale, cfg, qs=None, ks=None) -> None:
    """index_scores_fwd_kernel over the tiles of one chunk into scores (chunk rows, width) fp32; q, k
    float8_e4m3fn with their fp32 scales qs, ks (``quantize_fp8``) or 16/32-bit with qs = ks = None."""
    heads, dim = q.shape[1], q.shape[2]
    fp8 = qs is not None
    upcast = interpreting() or q.dtype == torch.float32
    ieee = q.dtype == torch.float32
    n_sm = num_sms(q.device)
    n_tiles = tiles_dev.shape[0]
    # enough programs to fill the GPU (~4 per SM) even when a chunk holds few long tiles
    ns = cfg["nsplit"] or max(1, min(scores.shape[1], triton.cdiv(4 * n_sm, n_tiles)))
    n_work = n_tiles * ns
    persist = cfg["persist"] > 0
    grid = (min(n_work, cfg["persist"] * n_sm) if persist else n_work,)
    cap = {} if cfg["max_registers"] is None else {"maxnreg": cfg["max_registers"]}
    index_scores_fwd_kernel[grid](
        q, k, scores, tiles_dev, qs if fp8 else scores, ks if fp8 else scores,
        q.stride(0), q.stride(1), k.stride(0), scores.stride(0),
        tok_a, heads, dim, block_size, float(scale), ns, n_tiles,
        ROWS=cfg["rows"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], NBUF=cfg["nbuf"], PERSIST=persist,
        UPCAST=upcast, IEEE=ieee, POS_SCALE=float(scale) > 0, SUB_MASK=block_size % cfg["block_n"] != 0, FP8=fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cap)


@torch.no_grad()
def block_scores_triton(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int, scale: float,
                        rows: Optional[int] = None, nsplit: Optional[int] = None, fp8_scores: bool = False,
                        **tune) -> torch.Tensor:
    """Causal block-max scores of ONE sequence (a test/debug view of the first pipeline stage).

    q_idx: (T, H_kv, D_idx); k_idx: (T, D_idx). Returns fp32 (T, H_kv, NB), NB = ceil(T / block_size),
    -inf where the block lies after the query (matches ``block_scores_reference(q, k, 0, ...)``).
    rows, nsplit, tune: score-kernel overrides (``score_config``). Builds the whole (T, H_kv, NB) buffer: for small T only.
    fp8_scores: as in ``select_blocks_triton``.
    """
    t, heads, dim = q_idx.shape
    q = q_idx if q_idx.stride(2) == 1 else q_idx.contiguous()
    k = k_idx.to(q.dtype)
    k = k if k.stride(1) == 1 else k.contiguous()
    qs = ks = None
    if fp8_scores:
        q, qs = quantize_fp8(q)
        k, ks = quantize_fp8_key_blocks(k, (0, t), block_size)
    cfg = score_config(q, heads, dim, block_size, rows=rows, nsplit=nsplit, **tune)
    tiles = _tile_table(torch.zeros(1, dtype=torch.int64), torch.tensor([t]), cfg["rows"] // heads)
    nb = triton.cdiv(t, block_size)
    scores = _empty((t * heads, nb), torch.float32, q.device)
    _launch_scores(q, k, scores, tiles.to(torch.int32).to(q.device), 0, block_size, scale, cfg, qs, ks)
    local = (torch.arange(t, device=q.device) // block_size).view(t, 1, 1)
    invisible = torch.arange(nb, device=q.device).view(1, 1, nb) > local
    return scores.view(t, heads, nb).masked_fill(invisible, float("-inf"))
