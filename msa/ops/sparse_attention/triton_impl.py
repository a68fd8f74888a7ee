"""Triton forward of ``msa.sparse_attention`` (spec section 4): KV-outer + combine, query-outer, or
query-tiled.

Kernel choice (``kernel=`` argument, else ``msa.tuning`` field ``sparse_fwd_kernel``): ``auto`` takes
the query-tiled kernel below ``reverse_index.SHORT_TOKENS`` tokens, where the reverse index and the partial
round trip do not pay off, the query-outer kernel when KV-outer work items would fill fewer than
``KV_MIN_ROWS`` MMA rows, otherwise KV-outer, except that with a ``SelectionPlan`` (the layer's path)
up to ``UNION_CHOICE_TOKENS`` tokens it measures the query tiles' block union and takes the tiled
kernel while that union is small (``resolve_kernel``). ``tiled``: several tokens of one query block x G
heads per MMA tile (consecutive ones, or grouped by selection under ``tuning.tile_order="greedy"``) over the union
of their selected blocks (``msa.ops.utils.tile_union``); its cost grows with that
union, which grows with the length (neighbouring tokens share only part of their blocks), so it wins
at short lengths and loses to KV-outer at long ones (measurements: docs/perf-notes.md, round 21).

Memory: the KV-outer path stores K * H_q * (D * s + 4) bytes of partials per token (s = 2 for
bf16/fp16 inputs, whose partial outputs keep the input dtype; s = 4 for fp32 or under
``tuning.sparse_fwd_partial_dtype="fp32"``). Queries are processed in chunks whose partials fit the
partial budget (``tuning.sparse_fwd_partial_bytes``, default min(16 GiB, 25% of free device memory),
at least 256 MiB). The reverse index of each chunk comes from a ``SelectionPlan`` shared with the
backward and the KL when the caller passes one (``msa.layers`` does), else it is built here.

Launch configurations: ``kv_outer_config``, ``qo_config``, ``combine_config``; overrides through
``msa.tuning`` (``sparse_fwd_kv_config``, ``sparse_fwd_qo_config``, ``sparse_fwd_combine_config``).
Measured choices and their history: docs/perf-notes.md.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import triton

from ..utils.triton_helpers import interpreting, next_pow2

from ... import tuning
from ...tuning import merge_launch_config
from .reference import sparse_attention_reference
from ..utils.reverse_index import (SHORT_TOKENS, SelectionPlan, block_layout, blocks_before, build_reverse_index,
                                   hot_row_split)
from ..utils.tile_union import build_tile_union, tile_tokens_for
from .triton_fwd import (sparse_attention_combine_fwd_kernel, sparse_attention_fwd_kernel,
                         sparse_attention_qo_fwd_kernel, sparse_attention_tiled_fwd_kernel)

LOG2E = 1.4426950408889634
KV_MIN_ROWS = 64              # KV-outer needs about this many MMA rows per (group, block) row
# Up to this many tokens a SelectionPlan's forward measures its tiles' mean union and takes the query-tiled
# kernel when that union is at most TILED_MAX_UNION x topk blocks (crossover measured at 32K: 2.3 x topk;
# docs/perf-notes.md, rounds 32-33). Above it the tile union's memory grows and KV-outer's lead is clear.
# The rule needs tiles of at least UNION_MIN_TILE_TOKENS tokens: a tile of tt tokens has a union of at most
# tt x topk blocks, so at tt = 2 (G = 64) even random selections stay under 2 x topk (measured at tt = 8).
UNION_CHOICE_TOKENS = 65536
TILED_MAX_UNION = 2.0
UNION_MIN_TILE_TOKENS = 4
MAX_DEFAULT_PARTIAL_BYTES = 16 << 30
MIN_DEFAULT_PARTIAL_BYTES = 256 << 20


def _buffer(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised buffer; NaN-filled under ``tuning.debug_poison`` so that unwritten values show in tests."""
    if tuning.current().debug_poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kv_outer_config(head_dim: int, group: int, block_size: int) -> Dict[str, int]:
    """Launch configuration of the KV-outer kernel (keys BLOCK_M, BLOCK_N, num_warps, num_stages,
    PRELOAD, PREFETCH): BLOCK_M MMA rows (raised to >= G so one query's heads fit one tile), BLOCK_N
    keys per tile (the whole block when B_k <= 128, so it is loaded once per work item)."""
    block_d = next_pow2(head_dim, 16)
    cfg = dict(BLOCK_M=64, BLOCK_N=max(16, min(128, next_pow2(block_size))),
               num_warps=4, num_stages=3 if block_d >= 128 else 2, PRELOAD=1, PREFETCH=0)
    cfg = merge_launch_config(cfg, "sparse_fwd_kv_config")
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], next_pow2(group, 16))
    return cfg


def combine_config(head_dim: int, topk: int, hq: int) -> Dict[str, int]:
    """Launch configuration of the combine kernel (keys BLOCK_H, num_warps, TOK_PER_PROG): BLOCK_H
    heads per program so that one program's partial tile (pow2(K) slots x BLOCK_H x BLOCK_D) holds
    ~16K values, enough loads in flight to stream the partials at bandwidth."""
    elems = next_pow2(topk) * next_pow2(head_dim, 16)
    cfg = dict(BLOCK_H=min(next_pow2(hq), max(1, 16384 // elems)), num_warps=4, TOK_PER_PROG=1)
    return merge_launch_config(cfg, "sparse_fwd_combine_config")


def qo_config(head_dim: int, group: int, block_size: int) -> Dict[str, int]:
    """Launch configuration of the query-outer kernel (keys BLOCK_N, num_warps, num_stages): G heads
    padded to >= 16 rows (MMA minimum); 64-key tiles at D = 128 keep the K/V tiles (2 x 16 KB) small
    enough for 2-stage pipelining."""
    block_d = next_pow2(head_dim, 16)
    cfg = dict(BLOCK_N=max(16, min(64 if block_d >= 128 else 128, next_pow2(block_size))),
               num_warps=4, num_stages=2)
    return merge_launch_config(cfg, "sparse_fwd_qo_config")


def tiled_config(head_dim: int, group: int, block_size: int) -> Dict[str, int]:
    """Launch configuration of the query-tiled kernel (keys BLOCK_M, BLOCK_N, num_warps, num_stages):
    BLOCK_M MMA rows = tile_tokens x G (padded to a power of two >= 16)."""
    block_d = next_pow2(head_dim, 16)
    cfg = dict(BLOCK_M=128, BLOCK_N=max(16, min(64 if block_d >= 128 else 128, next_pow2(block_size))),
               num_warps=8, num_stages=3 if block_d <= 128 else 2)
    return merge_launch_config(cfg, "sparse_fwd_tiled_config")


def tiled_tile_tokens(head_dim: int, group: int, block_size: int) -> int:
    """Tokens per query tile of the tiled forward (its rows, ``tiled_config``, divided by G)."""
    return tile_tokens_for(group, tiled_config(head_dim, group, block_size)["BLOCK_M"], block_size)


def _partial_budget(partial_budget_bytes: Optional[int], device=None) -> int:
    if partial_budget_bytes is not None:
        return int(partial_budget_bytes)
    if tuning.current().sparse_fwd_partial_bytes is not None:
        return tuning.current().sparse_fwd_partial_bytes
    if device is None or torch.device(device).type != "cuda":
        return MAX_DEFAULT_PARTIAL_BYTES
    free, _ = torch.cuda.mem_get_info(device)  # no stream sync
    if free // 4 < MAX_DEFAULT_PARTIAL_BYTES:
        # the allocator's cached blocks are free for us too; reading them builds torch's nested
        # memory_stats dict (~0.2 ms of host time per call), so only when the cap is not reached anyway
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(MIN_DEFAULT_PARTIAL_BYTES, min(MAX_DEFAULT_PARTIAL_BYTES, free // 4))


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the KV-outer partial outputs: the input dtype for 16-bit inputs, else fp32."""
    if tuning.current().sparse_fwd_partial_dtype == "fp32":
        return torch.float32
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def partial_bytes_per_token(topk: int, hq: int, d: int, dtype: torch.dtype) -> int:
    return topk * hq * (d * partial_dtype(dtype).itemsize + 4)


class _StageTimer:
    """CUDA-event timing of the forward's stages, summed over chunks; a no-op unless a dict is given."""

    def __init__(self, out: Optional[Dict[str, float]], device):
        self.out = out if (out is not None and torch.device(device).type == "cuda") else None
        self.events = []
        self.cur = None

    def start(self, name: str):
        if self.out is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.cur = (name, ev)

    def stop(self):
        if self.out is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((*self.cur, ev))

    def finish(self):
        if self.out is not None:
            torch.cuda.synchronize()
            for name, a, b in self.events:
                self.out[name] = self.out.get(name, 0.0) + a.elapsed_time(b)
            self.out["chunks"] = sum(1 for n, _, _ in self.events if n in ("kv_kernel", "qo_kernel"))
            self.events = []


def choose_kernel(ntok: int, group: int, topk: int, blocks_per_seq: int, num_blocks: int, chunk_tokens: int,
                  kernel: Optional[str] = None) -> str:
    """'kv', 'qo' or 'tiled' (see the module docstring for the heuristic)."""
    kernel = kernel or tuning.current().sparse_fwd_kernel
    if kernel not in ("auto", "kv", "qo", "tiled"):
        raise ValueError(f"kernel must be 'auto', 'kv', 'qo' or 'tiled', got {kernel!r}")
    if kernel != "auto":
        return kernel
    if ntok < SHORT_TOKENS:  # query-tiled below this many tokens (B * T)
        return "tiled"
    # expected queries per (group, block) row of one chunk, times G heads = MMA rows per work item
    rows = group * min(chunk_tokens, ntok) * min(topk, blocks_per_seq) / max(1, num_blocks)
    return "kv" if rows >= KV_MIN_ROWS else "qo"


def resolve_kernel(ntok: int, group: int, topk: int, blocks_per_seq: int, num_blocks: int, chunk_tokens: int,
                   kernel: Optional[str], plan: Optional[SelectionPlan], tile_tokens: int) -> str:
    """``choose_kernel``, then, under ``auto`` with a ``plan`` from ``SHORT_TOKENS`` up to
    ``UNION_CHOICE_TOKENS`` tokens and tiles of at least ``UNION_MIN_TILE_TOKENS`` tokens, 'tiled' instead
    of 'kv' when the plan's tiles of ``tile_tokens`` tokens select at most ``TILED_MAX_UNION * topk``
    distinct blocks on average: the tiled kernel's time grows with that union and KV-outer's does not,
    and trained indexers make neighbouring tokens agree. Measuring the union syncs with the host once
    per plan, so it is skipped under CUDA-graph capture."""
    which = choose_kernel(ntok, group, topk, blocks_per_seq, num_blocks, chunk_tokens, kernel)
    auto = (kernel or tuning.current().sparse_fwd_kernel) == "auto"
    if (which != "kv" or not auto or plan is None or ntok > UNION_CHOICE_TOKENS
            or tile_tokens < UNION_MIN_TILE_TOKENS
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
        return which
    union = plan.mean_tile_union(tile_tokens, tuning.current().tile_order)
    return "tiled" if union <= TILED_MAX_UNION * min(topk, blocks_per_seq) else "kv"


def sparse_attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, *,
                                block_size: int, scale: float, cu_seqlens: Optional[torch.Tensor],
                                kernel: Optional[str] = None, partial_budget_bytes: Optional[int] = None,
                                max_queries_per_item: Optional[int] = None,
                                stage_times: Optional[Dict[str, float]] = None,
                                plan: Optional[SelectionPlan] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the MSA Main Branch with Triton kernels (arguments already validated).

    Args:
        q: (B, T, H_q, D) bf16/fp16 (fp32 in the interpreter); fp64 falls back to the reference.
        k, v: (B, T, H_kv, D), q's dtype.
        block_indices: int32 (B, T, H_kv, K), spec convention (block ids within the sequence, -1 unused).
        block_size: B_k; scale: softmax scale; cu_seqlens: int32 (S+1,) packed sequences (B == 1) or None.
        kernel: 'kv' (KV-outer + combine), 'qo' (query-outer), 'tiled' (query-tiled) or None/'auto'
            (heuristic; ``msa.tuning`` field ``sparse_fwd_kernel``).
        partial_budget_bytes: bytes of partials (outputs + lse) per query chunk of the KV-outer path.
        max_queries_per_item: hot-row split of the reverse index (default 2 * K * B_k queries).
        stage_times: optional dict; when given (CUDA only) it receives CUDA-event times in ms of
            the stages (reverse_index, kv_kernel, combine; qo_kernel; tile_union, tiled_kernel) and the
            call synchronises.
        plan: optional ``SelectionPlan`` of block_indices (``selection_plan``): its layout, chunking
            and reverse indices are used (and cached for the backward and the KL) instead of built here.

    Returns:
        o: (B, T, H_q, D) in q.dtype; lse: fp32 (B, T, H_q), natural log (-inf for a row with no block).
    """
    if q.dtype == torch.float64:  # tl.dot has no fp64 path worth having; exactness matters more here
        return sparse_attention_reference(q, k, v, block_indices, block_size=block_size, scale=scale,
                                          cu_seqlens=cu_seqlens)
    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    topk = block_indices.shape[3]
    g = hq // hkv
    ntok = bsz * t
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bi = block_indices.contiguous()
    dev = q.device
    layout = plan.layout if plan is not None else block_layout(bsz, t, block_size, cu_seqlens, dev)
    nb = layout.num_blocks
    o = _buffer(bsz, t, hq, d, dtype=q.dtype, device=dev)
    lse = _buffer(bsz, t, hq, dtype=torch.float32, device=dev)
    pdtype = partial_dtype(q.dtype)
    per_token = partial_bytes_per_token(topk, hq, d, q.dtype)
    blocks_per_seq = math.ceil(t / block_size) if cu_seqlens is None else nb
    # the query-tiled kernel needs no partial budget (its choice does not depend on the chunking):
    # skip the device-memory query, a driver call that waits on queued work, when it is chosen
    which = choose_kernel(ntok, g, topk, blocks_per_seq, nb, ntok, kernel)
    if which != "tiled":
        chunk = plan.chunk_tokens if plan is not None else max(
            1, min(ntok, _partial_budget(partial_budget_bytes, dev) // per_token))
        which = resolve_kernel(ntok, g, topk, blocks_per_seq, nb, chunk, kernel, plan,
                               tiled_tile_tokens(d, g, block_size))
    upcast = interpreting()
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = next_pow2(d, 16)
    qk_scale = float(scale) * LOG2E
    timer = _StageTimer(stage_times, dev)

    if which == "tiled":
        cfg = tiled_config(d, g, block_size)
        tt = tiled_tile_tokens(d, g, block_size)
        timer.start("tile_union")
        order = tuning.current().tile_order
        tu = plan.tile_union(tt, order) if plan is not None else build_tile_union(bi, layout, block_size, tt, order)
        timer.stop()
        timer.start("tiled_kernel")
        sparse_attention_tiled_fwd_kernel[(nb * tu.subs, hkv)](
            q, k, v, o, lse, tu.ids, tu.bits, tu.count, tu.perm, layout.seq_block_offset, layout.block_start,
            layout.block_len, qk_scale, block_size, H_Q=hq, H_KV=hkv, G=g, UMAX=tu.ids.shape[2], TILE_T=tt, SUBS=tu.subs, D=d, BLOCK_D=block_d,
            BLOCK_M=next_pow2(tt * g, 16), BLOCK_N=cfg["BLOCK_N"], KV_TILES=math.ceil(block_size / cfg["BLOCK_N"]),
            UPCAST=upcast, DOT_PREC=dot_prec, EVEN_N=block_size % cfg["BLOCK_N"] == 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        timer.stop()
        timer.finish()
        return o, lse

    if which == "qo":
        cfg = qo_config(d, g, block_size)
        kv_tiles = math.ceil(block_size / cfg["BLOCK_N"])
        timer.start("qo_kernel")
        sparse_attention_qo_fwd_kernel[(ntok, hkv)](
            q, k, v, o, lse, bi, layout.seq_block_offset, layout.block_start, layout.block_len, qk_scale,
            H_Q=hq, H_KV=hkv, G=g, TOPK=topk, D=d, BLOCK_D=block_d, BLOCK_G=next_pow2(g, 16),
            BLOCK_N=cfg["BLOCK_N"], KV_TILES=kv_tiles, UPCAST=upcast, DOT_PREC=dot_prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        timer.stop()
        timer.finish()
        return o, lse

    cfg = kv_outer_config(d, g, block_size)
    kv_tiles = math.ceil(block_size / cfg["BLOCK_N"])
    preload = bool(cfg["PRELOAD"]) and kv_tiles == 1
    mq = max_queries_per_item or hot_row_split(block_size, topk, ntok)
    starts = layout.starts
    # partial buffers sized for one chunk and reused: launches on one stream run in order
    po = _buffer(chunk * topk, hq, d, dtype=pdtype, device=dev)
    plse = _buffer(chunk * topk, hq, dtype=torch.float32, device=dev)
    block_k = next_pow2(topk)
    ccfg = combine_config(d, topk, hq)
    for t0 in range(0, ntok, chunk):
        t1 = min(ntok, t0 + chunk)
        timer.start("reverse_index")
        if plan is not None:
            ri, nbr = plan.index(t0, t1)
        else:
            nbr = max(1, blocks_before(starts, t1))
            ri = build_reverse_index(bi, block_size, cu_seqlens, mq, token_range=(t0, t1), layout=layout,
                                     block_limit=nbr)
        timer.stop()
        timer.start("kv_kernel")
        sparse_attention_fwd_kernel[(ri.work_row.numel(),)](
            q, k, v, po, plse, ri.entries, ri.work_row, ri.work_start, ri.work_end, ri.work_order, layout.block_start,
            layout.block_len, t0, nbr, qk_scale,
            H_Q=hq, H_KV=hkv, G=g, TOPK=topk, D=d, BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], KV_TILES=kv_tiles, PRELOAD=preload, UPCAST=upcast, DOT_PREC=dot_prec,
            PREFETCH=cfg["PREFETCH"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        timer.stop()
        timer.start("combine")
        tpp = ccfg["TOK_PER_PROG"]
        sparse_attention_combine_fwd_kernel[(triton.cdiv(t1 - t0, tpp), triton.cdiv(hq, ccfg["BLOCK_H"]))](
            po, plse, bi, o, lse, t0, t1 - t0, H_Q=hq, H_KV=hkv, G=g, TOPK=topk, BLOCK_K=block_k, D=d,
            BLOCK_D=block_d, BLOCK_H=ccfg["BLOCK_H"], TOK_PER_PROG=tpp, num_warps=ccfg["num_warps"])
        timer.stop()
    timer.finish()
    return o, lse


def selection_plan(block_indices: torch.Tensor, *, block_size: int, cu_seqlens: Optional[torch.Tensor],
                   num_heads: int, head_dim: int, dtype: torch.dtype, index_dim: int) -> SelectionPlan:
    """The ``SelectionPlan`` of a validated selection for the main branch (``num_heads`` H_q, ``head_dim``
    D, ``dtype`` of q) and the KL (``index_dim``): one query chunking that fits the forward's and the
    dQ's partial budget and the KL's, so all three reuse the same reverse indices."""
    from ..indexer_kl.triton_impl import kl_chunk_tokens
    topk = block_indices.shape[3]
    hkv = block_indices.shape[2]
    per_token = partial_bytes_per_token(topk, num_heads, head_dim, dtype)
    dev = block_indices.device
    chunk = lambda: min(_partial_budget(None, dev) // per_token, kl_chunk_tokens(topk, hkv, index_dim))  # noqa: E731
    return SelectionPlan(block_indices, block_size, cu_seqlens, chunk,
                         hot_row_split(block_size, topk, block_indices.shape[0] * block_indices.shape[1]))
