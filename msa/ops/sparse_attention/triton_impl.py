"""Triton forward of ``msa.sparse_attention`` (spec section 4): KV-outer + combine, or query-outer.

Kernel choice (``kernel=`` argument, else env ``MSA_SPARSE_FWD_KERNEL`` = ``kv`` | ``qo`` | ``auto``):
``auto`` takes the query-outer kernel when the work is too small for the reverse index and the
partial round trip to pay off (fewer than ``QO_MAX_TOKENS`` tokens; on an H200 at the paper shape
KV-outer won from 8K tokens on once its partials were bf16: 5.6 vs 7.0 ms at 8K, 12.5 vs 28.0 ms at
32K, benchmarks/results/prefill_h200.json) or when the KV-outer kernel would fill its MMA
rows poorly (expected queries x G per (group, block) row of a chunk below ``KV_MIN_ROWS``);
otherwise KV-outer.

Memory: the KV-outer path needs K * H_q * (D * s + 4) bytes of partials per token (s = 2 for
bf16/fp16 inputs, whose partial outputs are stored in the input dtype; s = 4 for fp32; env
``MSA_SPARSE_FWD_PARTIAL_DTYPE=fp32`` forces fp32), i.e. 0.27 MB per token at 64 heads, K = 16,
D = 128, bf16. The queries are processed in chunks whose partials fit the partial budget
(``partial_budget_bytes`` argument, else env ``MSA_SPARSE_FWD_PARTIAL_BYTES``, else
min(16 GiB, 25% of the free device memory incl. the allocator's cache), at least 256 MiB); the
reverse index is built per chunk on the device (no host sync: every size comes from shapes and the
host-side block layout). Fewer chunks = fewer launches and better-filled work items.

Tuning knobs (env ``MSA_SPARSE_FWD_CONFIG``, e.g. ``BLOCK_M=64,num_warps=4,PRELOAD=0``) override the
per-head-dim launch configuration of the KV-outer kernel; ``MSA_SPARSE_FWD_QO_CONFIG`` does the
same for the query-outer kernel (``BLOCK_N``, ``num_warps``, ``num_stages``) and
``MSA_SPARSE_FWD_COMBINE_CONFIG`` for the combine kernel (``BLOCK_H``, ``num_warps``, ``TOK_PER_PROG``).

Profiling: pass ``stage_times={}`` to get CUDA-event times (ms, summed over chunks) of the stages
``reverse_index``, ``kv_kernel``, ``combine`` (KV-outer) or ``qo_kernel``; it synchronises, so
use it only outside timed loops.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton

from ..common import env_config, interpreting
from .reference import sparse_attention_reference
from .reverse_index import block_layout, block_starts_host, blocks_before, build_reverse_index
from .triton_fwd import (sparse_attention_combine_fwd_kernel, sparse_attention_fwd_kernel,
                         sparse_attention_qo_fwd_kernel)

LOG2E = 1.4426950408889634
QO_MAX_TOKENS = 4096          # below this many tokens (B * T) auto picks query-outer (H200: kv won at 8K)
KV_MIN_ROWS = 64              # KV-outer needs about this many MMA rows per (group, block) row
MAX_DEFAULT_PARTIAL_BYTES = 16 << 30
MIN_DEFAULT_PARTIAL_BYTES = 256 << 20


def _buffer(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised buffer; NaN-filled when MSA_DEBUG_POISON=1 so that unwritten values show in tests."""
    if os.environ.get("MSA_DEBUG_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)



def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def kv_outer_config(head_dim: int, group: int, block_size: int) -> Dict[str, int]:
    """Launch configuration of the KV-outer kernel.

    BLOCK_M MMA rows (raised to >= G so one query's heads fit one tile), BLOCK_N keys per tile (the
    whole block when B_k <= 128, so it is loaded once per work item). Override with the env var
    MSA_SPARSE_FWD_CONFIG (e.g. "BLOCK_M=128,num_warps=8").
    """
    block_d = _pow2(head_dim, 16)
    # H200 sweep at 32K with bf16 partials (benchmarks/results/dev/round3_prefill.json): BLOCK_M=64,
    # 4 warps, 3 stages 14.7 ms; 128 rows / 8 warps 16.2 ms; software prefetch of the next Q tile 15.7 ms
    cfg = dict(BLOCK_M=64, BLOCK_N=max(16, min(128, _pow2(block_size))),
               num_warps=4, num_stages=3 if block_d >= 128 else 2, PRELOAD=1, PREFETCH=0)
    cfg.update(env_config("MSA_SPARSE_FWD_CONFIG"))
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], _pow2(group, 16))
    return cfg


def combine_config(head_dim: int, topk: int, hq: int) -> Dict[str, int]:
    """Launch configuration of the combine kernel: BLOCK_H heads per program so that one program's
    partial tile (pow2(K) slots x BLOCK_H x BLOCK_D) is ~16K values; at 4 warps that is 32 KB of
    bf16 = sixteen 16-byte loads in flight per thread, issued back to back (sm_90 SASS checked),
    96 registers, 512 B of shared memory -> 5 programs per SM. TOK_PER_PROG tokens per program.
    Override with the env var MSA_SPARSE_FWD_COMBINE_CONFIG (e.g. "BLOCK_H=16,num_warps=8")."""
    elems = _pow2(topk) * _pow2(head_dim, 16)
    cfg = dict(BLOCK_H=min(_pow2(hq), max(1, 16384 // elems)), num_warps=4, TOK_PER_PROG=1)
    cfg.update(env_config("MSA_SPARSE_FWD_COMBINE_CONFIG"))
    return cfg


def qo_config(head_dim: int, group: int, block_size: int) -> Dict[str, int]:
    """Launch configuration of the query-outer kernel: G heads padded to >= 16 rows (MMA minimum);
    64-key tiles at D = 128 keep the K/V tiles (2 x 16 KB) small enough for 2-stage pipelining."""
    block_d = _pow2(head_dim, 16)
    cfg = dict(BLOCK_N=max(16, min(64 if block_d >= 128 else 128, _pow2(block_size))),
               num_warps=4, num_stages=2)
    cfg.update(env_config("MSA_SPARSE_FWD_QO_CONFIG"))
    return cfg


def _partial_budget(partial_budget_bytes: Optional[int], device=None) -> int:
    if partial_budget_bytes is not None:
        return int(partial_budget_bytes)
    env = os.environ.get("MSA_SPARSE_FWD_PARTIAL_BYTES")
    if env:
        return int(env)
    if device is None or torch.device(device).type != "cuda":
        return MAX_DEFAULT_PARTIAL_BYTES
    free, _ = torch.cuda.mem_get_info(device)  # no stream sync
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(MIN_DEFAULT_PARTIAL_BYTES, min(MAX_DEFAULT_PARTIAL_BYTES, free // 4))


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the KV-outer partial outputs: the input dtype for 16-bit inputs, else fp32."""
    if os.environ.get("MSA_SPARSE_FWD_PARTIAL_DTYPE", "auto") == "fp32":
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
    """'kv' or 'qo' (see the module docstring for the heuristic)."""
    kernel = kernel or os.environ.get("MSA_SPARSE_FWD_KERNEL", "auto")
    if kernel not in ("auto", "kv", "qo"):
        raise ValueError(f"kernel must be 'auto', 'kv' or 'qo', got {kernel!r}")
    if kernel != "auto":
        return kernel
    if ntok < QO_MAX_TOKENS:
        return "qo"
    # expected queries per (group, block) row of one chunk, times G heads = MMA rows per work item
    rows = group * min(chunk_tokens, ntok) * min(topk, blocks_per_seq) / max(1, num_blocks)
    return "kv" if rows >= KV_MIN_ROWS else "qo"


def sparse_attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, *,
                                block_size: int, scale: float, cu_seqlens: Optional[torch.Tensor],
                                kernel: Optional[str] = None, partial_budget_bytes: Optional[int] = None,
                                max_queries_per_item: Optional[int] = None,
                                stage_times: Optional[Dict[str, float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the MSA Main Branch with Triton kernels (arguments already validated).

    Args:
        q: (B, T, H_q, D) bf16/fp16 (fp32 in the interpreter); fp64 falls back to the reference.
        k, v: (B, T, H_kv, D), q's dtype.
        block_indices: int32 (B, T, H_kv, K), spec convention (block ids within the sequence, -1 unused).
        block_size: B_k; scale: softmax scale; cu_seqlens: int32 (S+1,) packed sequences (B == 1) or None.
        kernel: 'kv' (KV-outer + combine), 'qo' (query-outer) or None/'auto' (heuristic, env override).
        partial_budget_bytes: bytes of partials (outputs + lse) per query chunk of the KV-outer path.
        max_queries_per_item: hot-row split of the reverse index (default 2 * K * B_k queries).
        stage_times: optional dict; when given (CUDA only) it receives CUDA-event times in ms of
            the stages (see the module docstring) and the call synchronises.

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
    layout = block_layout(bsz, t, block_size, cu_seqlens, dev)
    nb = layout.num_blocks
    o = _buffer(bsz, t, hq, d, dtype=q.dtype, device=dev)
    lse = _buffer(bsz, t, hq, dtype=torch.float32, device=dev)
    pdtype = partial_dtype(q.dtype)
    per_token = partial_bytes_per_token(topk, hq, d, q.dtype)
    chunk = max(1, min(ntok, _partial_budget(partial_budget_bytes, dev) // per_token))
    blocks_per_seq = math.ceil(t / block_size) if cu_seqlens is None else nb
    which = choose_kernel(ntok, g, topk, blocks_per_seq, nb, chunk, kernel)
    upcast = interpreting()
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = _pow2(d, 16)
    qk_scale = float(scale) * LOG2E
    timer = _StageTimer(stage_times, dev)

    if which == "qo":
        cfg = qo_config(d, g, block_size)
        kv_tiles = math.ceil(block_size / cfg["BLOCK_N"])
        timer.start("qo_kernel")
        sparse_attention_qo_fwd_kernel[(ntok, hkv)](
            q, k, v, o, lse, bi, layout.seq_block_offset, layout.block_start, layout.block_len, qk_scale,
            H_Q=hq, H_KV=hkv, G=g, TOPK=topk, D=d, BLOCK_D=block_d, BLOCK_G=_pow2(g, 16),
            BLOCK_N=cfg["BLOCK_N"], KV_TILES=kv_tiles, UPCAST=upcast, DOT_PREC=dot_prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        timer.stop()
        timer.finish()
        return o, lse

    cfg = kv_outer_config(d, g, block_size)
    kv_tiles = math.ceil(block_size / cfg["BLOCK_N"])
    preload = bool(cfg["PRELOAD"]) and kv_tiles == 1
    mq = max_queries_per_item or max(1, 2 * topk * block_size)
    starts = block_starts_host(bsz, t, block_size, cu_seqlens)
    # partial buffers sized for one chunk and reused: launches on one stream run in order
    po = _buffer(chunk * topk, hq, d, dtype=pdtype, device=dev)
    plse = _buffer(chunk * topk, hq, dtype=torch.float32, device=dev)
    block_k = _pow2(topk)
    ccfg = combine_config(d, topk, hq)
    for t0 in range(0, ntok, chunk):
        t1 = min(ntok, t0 + chunk)
        nbr = max(1, blocks_before(starts, t1))
        timer.start("reverse_index")
        ri = build_reverse_index(bi, block_size, cu_seqlens, mq, token_range=(t0, t1), layout=layout,
                                 block_limit=nbr)
        timer.stop()
        timer.start("kv_kernel")
        sparse_attention_fwd_kernel[(ri.work_row.numel(),)](
            q, k, v, po, plse, ri.entries, ri.work_row, ri.work_start, ri.work_end, layout.block_start,
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
