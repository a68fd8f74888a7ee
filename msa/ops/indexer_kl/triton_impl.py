"""Triton implementation of the indexer KL loss (``msa.indexer_kl_loss(..., backend="triton")``).

Sparse phase (KV-outer over the reverse index, ``sparse_kl_kv``): a cheap student-lse pass, then ONE
pass that builds the teacher once per (key block, query, head) -- MMA rows are (query, slot) entries
of one head, the group's heads looped -- and produces the loss, dq_idx (per-entry partials summed over
the K slots) and dk_idx (per work-item partials summed per key block), all in the forward; backward
only scales by grad_out. Extra memory: fp32 dq_idx partials of T * H_kv * K * D_idx * 4 bytes (32 KB
per token at the paper's shape, i.e. O(T * k), capped by query chunking at ``tuning.kl_partial_bytes``),
plus one (B_k x D_idx) fp32 partial per work item.

Warmup phase, flash-style (no T x T buffer), two modes (``dense_mode``): 'flash-atomic' (default) is
one query-outer pass (student lse prologue, then loss + dq_idx in registers + dk_idx by fp32 atomics,
g = p_idx - p); 'flash' (under torch.use_deterministic_algorithms) adds a key-outer dk_idx pass that
recomputes the teacher instead of the atomics. MMA rows are 128 positions of ONE head and the G heads
of the group are summed in fp32 per tile; each head's Q tile comes through a TMA descriptor (16-bit
data, power-of-two head dim). Kernels and math: ``triton_kernels.py``. Gradients flow to
q_idx and k_idx only (spec section 2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ... import tuning
from ...tuning import merge_launch_config
from ..sparse_attention.triton_bwd import token_seq_start
from ..utils.reverse_index import block_layout, blocks_before, build_reverse_index, hot_row_split
from ..utils.triton_helpers import dot_precision, interpreting, large_shared_memory, next_pow2, tl_compute_dtype
from .triton_kernels import (indexer_kl_bwd_dense_flash_dk_kernel, indexer_kl_bwd_sparse_reduce_kernel,
                             indexer_kl_fwd_dense_flash_kernel, indexer_kl_fwd_kv_heads_kernel,
                             indexer_kl_fwd_lse_dense_kernel, indexer_kl_fwd_lse_sparse_kernel,
                             indexer_kl_fwd_slse_kv_kernel)


LOG2E = 1.4426950408889634


def kv_config(d: int, di: int, g: int, ntok: int, large_smem: bool):
    """Launch configuration of ``indexer_kl_fwd_kv_heads_kernel`` (keys BLOCK_E, num_warps, num_stages;
    override: ``msa.tuning`` field ``kl_kv_config``): MMA rows are BLOCK_E (query, slot) entries of one
    head, one program per work item (whole key block). g: query heads per KV head; ntok: B * T;
    large_smem: >= 200 KiB of shared memory per SM (``large_shared_memory``)."""
    if interpreting():
        cfg = dict(BLOCK_E=16, num_warps=4, num_stages=1)
    else:
        # a second pipeline stage pays with many work items or many heads per item; at 8K tokens
        # with G <= 8 it did not (docs/perf-notes.md, round 30)
        stages = 2 if large_smem and (ntok >= 16384 or g >= 16) else 1
        cfg = dict(BLOCK_E=64 if max(d, di) > 128 else 128, num_warps=8, num_stages=stages)
    cfg = merge_launch_config(cfg, "kl_kv_config")
    cfg["BLOCK_E"] = max(16, next_pow2(cfg["BLOCK_E"], 16))
    return cfg


DEFAULT_KL_PARTIAL_BYTES = 4 << 30


def kl_chunk_tokens(topk: int, hkv: int, di: int, partial_budget_bytes: Optional[int] = None) -> int:
    """Queries per chunk of the sparse KL: its per-entry fp32 partials (K * H_kv * (D_idx + 2) per token)
    fit ``partial_budget_bytes`` (else ``tuning.kl_partial_bytes``, else 4 GiB)."""
    budget = int(partial_budget_bytes or tuning.current().kl_partial_bytes or DEFAULT_KL_PARTIAL_BYTES)
    return max(1, budget // (topk * hkv * (di + 2) * 4))


def sparse_kl_kv(q_idx, k_idx, q, k, block_indices, lse_t, *, block_size, index_scale, scale, cu_seqlens,
                 max_queries_per_item=None, with_grad=True, partial_budget_bytes=None, plan=None):
    """Sparse-phase loss and gradients in one KV-outer pass (see the module docstring).

    q_idx (B, T, H_kv, D_idx), k_idx (B, T, D_idx), q (B, T, H_q, D), k (B, T, H_kv, D), contiguous;
    block_indices int32 (B, T, H_kv, K); lse_t fp32 (B*T*H_q,) teacher lse over the selected support.
    Queries are processed in chunks whose per-entry partials (K * H_kv * (D_idx + 2) fp32 per token)
    fit ``partial_budget_bytes`` (``tuning.kl_partial_bytes``, default 4 GiB: ~128K tokens at the paper's
    shape), each chunk with its own reverse index; chunk results are added in chunk order.
    Returns (loss fp32 scalar, dq_idx fp32 (B, T, H_kv, D_idx) or None, dk_idx fp32 (B, T, D_idx) or None),
    gradients for a unit upstream gradient.
    """
    bsz, t, hkv, di = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    g = hq // hkv
    ntok = bsz * t
    dev = q_idx.device
    nsel = block_indices.shape[3]
    inv_n = 1.0 / (ntok * hkv)
    cdt, prec = tl_compute_dtype(q.dtype), dot_precision(q.dtype)
    bi = block_indices.to(torch.int32).contiguous()
    c = max_queries_per_item or hot_row_split(block_size, nsel, ntok)
    bn, bdi = next_pow2(block_size, 16), next_pow2(di, 16)
    cfg = kv_config(d, di, g, ntok, large_shared_memory(dev))
    if plan is not None:  # shared with the main branch: same chunks, cached reverse indices
        c, chunk, layout, starts = plan.max_queries_per_item, plan.chunk_tokens, plan.layout, plan.starts
    else:
        chunk = min(ntok, kl_chunk_tokens(nsel, hkv, di, partial_budget_bytes))
        layout = block_layout(bsz, t, block_size, cu_seqlens, dev)
        starts = layout.starts
    lse_s = torch.empty((ntok, hkv), dtype=torch.float32, device=dev)
    klp = torch.empty((chunk * nsel * hkv,), dtype=torch.float32, device=dev)
    plse = torch.empty((chunk * nsel * hkv,), dtype=torch.float32, device=dev)
    dqp = torch.empty((chunk * nsel * hkv, di), dtype=torch.float32, device=dev) if with_grad else klp
    dq_idx = torch.empty((ntok, hkv, di), dtype=torch.float32, device=dev) if with_grad else None
    dk_idx = None
    loss = None
    for t0 in range(0, ntok, chunk):
        t1 = min(ntok, t0 + chunk)
        nt = t1 - t0
        n_ent = nt * nsel * hkv
        if plan is not None:
            ri, nbr = plan.index(t0, t1)
        else:
            nbr = max(1, blocks_before(starts, t1))
            ri = build_reverse_index(bi, block_size, cu_seqlens, c, token_range=(t0, t1), layout=layout,
                                     block_limit=nbr)
        n_items = ri.work_row.numel()
        # 1. student lse: block-local per entry, then a logsumexp over the K slots (-1 slots stay -inf)
        plse[:n_ent].fill_(float("-inf"))
        indexer_kl_fwd_slse_kv_kernel[(n_items,)](
            q_idx, k_idx, plse, ri.entries, ri.work_row, ri.work_start, ri.work_end, ri.work_order, layout.block_start,
            layout.block_len, t0, float(index_scale), hkv, nsel, nbr, DI=di, BLOCK_E=16 if interpreting() else 64,
            BLOCK_N=bn, BLOCK_DI=bdi, CDT=cdt, DOT_PREC=prec, num_warps=4)
        torch.logsumexp(plse[:n_ent].view(nt, nsel, hkv), dim=1, out=lse_s[t0:t1])
        # 2. teacher + KL + gradients; slots of -1 entries are never written, hence the zero fill
        n_part = n_ent
        klp[:n_part].zero_()
        if with_grad:
            dqp[:n_part].zero_()
        part = torch.empty((n_items, bn, bdi), dtype=torch.float32, device=dev) if with_grad else klp
        indexer_kl_fwd_kv_heads_kernel[(n_items,)](
            q_idx, k_idx, q, k, lse_t, lse_s, klp, dqp, part, ri.entries, ri.work_row, ri.work_start, ri.work_end,
            ri.work_order,
            layout.block_start, layout.block_len, t0, float(scale) * LOG2E, float(index_scale) * LOG2E, hq, hkv,
            nsel, nbr, G=g, D=d, DI=di, BLOCK_E=cfg["BLOCK_E"], BS_PAD=bn, BLOCK_D=next_pow2(d, 16), BLOCK_DI=bdi,
            CDT=cdt, DOT_PREC=prec, WITH_GRAD=with_grad, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        part_loss = klp[:n_part].sum()  # fixed-order torch reductions: deterministic
        loss = part_loss if loss is None else loss + part_loss
        if not with_grad:
            continue
        torch.sum(dqp[:n_part].view(nt, nsel, hkv, di), dim=1, out=dq_idx[t0:t1])
        # rows cover only the blocks this chunk can select; later blocks get zeros from the kernel
        dk_c = _reduce_dk_parts(part, ri, c, layout, nbr, (bsz, t, di), float(index_scale * inv_n), hkv)
        dk_idx = dk_c if dk_idx is None else dk_idx.add_(dk_c)
    loss = loss * inv_n
    if not with_grad:
        return loss, None, None
    dq_idx.mul_(index_scale * inv_n)
    return loss, dq_idx.view(bsz, t, hkv, di), dk_idx


def _reduce_dk_parts(part, ri, c, layout, nbr, shape, mult, hkv):
    """dk_idx fp32 ``shape`` (B, T, D_idx): the per-item partials ``part`` (items, BS_PAD, BLOCK_DI) of the
    reverse index ``ri`` (hot-row split ``c``, rows over ``nbr`` blocks) summed per key block in item order
    and scaled by ``mult``."""
    counts = (ri.row_ptr[1:] - ri.row_ptr[:-1]).to(torch.int64)
    items = (counts + c - 1) // c
    first = torch.cumsum(items, 0) - items
    dk = torch.empty(shape, dtype=torch.float32, device=part.device)
    indexer_kl_bwd_sparse_reduce_kernel[(layout.num_blocks,)](
        part, dk, items.to(torch.int32), first.to(torch.int32), layout.block_start, layout.block_len, mult, hkv,
        nbr, DI=shape[-1], BLOCK_N=part.shape[1], BLOCK_DI=part.shape[2])
    return dk


def _dense_tiles(d: int, di: int):
    """(BLOCK_Q, BLOCK_N, num_warps) of the warmup teacher-lse kernel."""
    if interpreting():
        return 16, 16, 4
    big = max(d, di) > 64
    return 64, 64 if big else 128, 8 if big else 4


def teacher_lse_triton(q: torch.Tensor, k: torch.Tensor, block_indices: Optional[torch.Tensor], *, block_size: int,
                       scale: float, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 (B, T, H_q): each head's natural-log lse of q.k*scale over the KL support (selected blocks
    with j <= i, or every causal j <= i when block_indices is None). Equals the lse of
    ``msa.sparse_attention(..., return_lse=True)`` (sparse) or of dense causal attention (warmup)."""
    bsz, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    ntok = bsz * t
    q, k = q.contiguous(), k.contiguous()
    seq_start = token_seq_start(bsz, t, cu_seqlens, q.device)
    lse = torch.empty((bsz, t, hq), dtype=torch.float32, device=q.device)
    cdt, prec = tl_compute_dtype(q.dtype), dot_precision(q.dtype)
    if block_indices is not None:
        bi = block_indices.to(torch.int32).contiguous()
        indexer_kl_fwd_lse_sparse_kernel[(ntok, hkv)](
            q, k, bi, seq_start, lse, float(scale), hq, hkv, bi.shape[3], block_size, G=g, D=d, BLOCK_G=next_pow2(g, 16),
            BLOCK_N=next_pow2(block_size, 16), BLOCK_D=next_pow2(d, 16), CDT=cdt, DOT_PREC=prec, num_warps=4)
    else:
        bq, bn, nw = _dense_tiles(d, d)
        indexer_kl_fwd_lse_dense_kernel[(triton.cdiv(ntok, bq), hq)](
            q, k, seq_start, lse, float(scale), ntok, hq, hkv, G=g, D=d, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=next_pow2(d, 16),
            CDT=cdt, DOT_PREC=prec, num_warps=nw)
    return lse





def dense_mode() -> str:
    """Warmup-phase algorithm (``msa.tuning`` field ``kl_dense_mode``):

    - 'flash-atomic' (what auto picks, unless ``torch.use_deterministic_algorithms(True)``): one
      query-outer pass computing the loss, dq_idx in registers and dk_idx through fp32 atomic adds:
      the teacher is computed once, but dk_idx is not bitwise repeatable.
    - 'flash' (forced under deterministic algorithms): the same pass for loss + dq_idx, then a
      key-outer pass for dk_idx that recomputes the teacher; no atomics, bitwise repeatable.
    """
    if torch.are_deterministic_algorithms_enabled():
        return "flash"
    mode = tuning.current().kl_dense_mode
    return "flash-atomic" if mode == "auto" else mode


def dense_flash_config(g: int, d: int, di: int, atomic_dk: bool = False):
    """Launch configuration of the 'flash' / 'flash-atomic' warmup kernels (override: ``msa.tuning`` field ``kl_dense_flash_config``, keys
    BLOCK_M / BLOCK_N (queries / keys per tile of pass 1), DK_BLOCK_M / DK_BLOCK_N (queries / keys of
    pass 2), num_warps, num_stages, DK_WARPS, DK_STAGES, TMA (1: pass 1 loads the Q tiles through a TMA
    descriptor, where ``_tma_ok``), PF (1: pass 1 prefetches the next head loop's first Q tiles into L2;
    GPU only). The Q tile of each head is re-read (from L2)
    once per (query tile, key tile), so the key tile sets the MMA flops per byte loaded: 128 keys ~ 128
    flop/B."""
    if interpreting():
        cfg = dict(BLOCK_M=16, BLOCK_N=16, DK_BLOCK_M=16, DK_BLOCK_N=16, num_warps=4, num_stages=1, DK_WARPS=4,
                   DK_STAGES=1, TMA=1, PF=0)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128 if atomic_dk else 64, DK_BLOCK_M=32, DK_BLOCK_N=128, num_warps=8,
                   num_stages=3 if atomic_dk else 2, DK_WARPS=8, DK_STAGES=2, TMA=1, PF=1)
        if max(d, di) > 128:
            cfg.update(BLOCK_M=64, BLOCK_N=64, DK_BLOCK_N=64)
    return merge_launch_config(cfg, "kl_dense_flash_config")


def _tma_alloc(size: int, alignment: int, stream):
    """Global scratch for the kernels' device-side TMA descriptors (``triton.set_allocator``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(q: torch.Tensor) -> bool:
    """Whether pass 1 may load the Q tiles through a TMA descriptor of q viewed as (T_all, H_q * D):
    16-bit (or interpreted) data, a head dim that fills the tile (a TMA box cannot mask columns), a
    16-byte aligned base and row stride. Makes sure an allocator for the descriptors exists when it is."""
    es = q.element_size()
    ok = ((interpreting() or es == 2) and next_pow2(q.shape[-1], 16) == q.shape[-1] and q.data_ptr() % 16 == 0
          and (q.shape[-2] * q.shape[-1] * es) % 16 == 0)
    if ok and not interpreting():
        _ensure_allocator()
    return ok


def _ensure_allocator() -> None:
    """Set ``_tma_alloc`` as Triton's allocator (a context variable) unless the caller set one."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # private module moved: set ours
        pass
    triton.set_allocator(_tma_alloc)


def dense_kl_flash(q_idx, k_idx, q, k, lse_t, *, scale, index_scale, cu_seqlens, with_grad=True,
                   atomic_dk=False):
    """Warmup loss and gradients: ``indexer_kl_fwd_dense_flash_kernel`` (loss, dq_idx), then either
    ``indexer_kl_bwd_dense_flash_dk_kernel`` (deterministic second pass for dk_idx) or, with atomic_dk,
    nothing more (the first pass already added dk_idx with atomics). Inputs contiguous as in
    ``sparse_kl_kv``; lse_t fp32 (B*T*H_q,) teacher lse. Extra memory O(T): fp32 per-row KL / student
    lse, dq_idx and dk_idx (H_kv partials in the two-pass mode). Returns (loss, dq_idx fp32
    (B, T, H_kv, D_idx), dk_idx fp32 (B, T, D_idx)) for a unit upstream gradient (None gradients when
    not with_grad)."""
    bsz, t, hkv, di = q_idx.shape
    hq, d = q.shape[2], q.shape[3]
    g = hq // hkv
    ntok = bsz * t
    dev = q_idx.device
    inv_n = 1.0 / (ntok * hkv)
    cdt, prec = tl_compute_dtype(q.dtype), dot_precision(q.dtype)
    qk2, is2 = float(scale) * LOG2E, float(index_scale) * LOG2E
    atomic_dk = atomic_dk and with_grad
    cfg = dense_flash_config(g, d, di, atomic_dk)
    kl = torch.empty(ntok * hkv, dtype=torch.float32, device=dev)
    lse_s = torch.empty(ntok * hkv, dtype=torch.float32, device=dev)
    dq = torch.empty((ntok, hkv, di), dtype=torch.float32, device=dev)
    dk_acc = torch.zeros((ntok, di), dtype=torch.float32, device=dev) if atomic_dk else kl  # dummy when unused
    tma = bool(cfg["TMA"]) and _tma_ok(q)
    # L2 prefetch of Q rows (GPU only; no inline asm in the interpreter): whole 128-byte lines, in bounds;
    # a power of two of them per row (tl.arange), the row's first lines when it holds e.g. 3
    line = 128 // q.element_size()
    pf_lines = 1 << max((d // line).bit_length() - 1, 0)
    pf = bool(cfg["PF"]) and d >= line and not interpreting()
    indexer_kl_fwd_dense_flash_kernel[(triton.cdiv(ntok, cfg["BLOCK_M"]), hkv)](
        q_idx, k_idx, q, k, token_seq_start(bsz, t, cu_seqlens, dev), lse_t, kl, lse_s, dq, dk_acc, qk2, is2,
        math.log2(g), float(index_scale * inv_n), ntok, hq, hkv, G=g, D=d, DI=di, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=next_pow2(d, 16), BLOCK_DI=next_pow2(di, 16), CDT=cdt, DOT_PREC=prec, DK_ATOMIC=atomic_dk,
        FAST=not interpreting(), TMA=tma, PF=pf, PF_LINES=pf_lines, PF_LINE=line,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    loss = kl.sum() * inv_n  # fixed-order torch reduction: deterministic
    if not with_grad:
        return loss, None, None
    if atomic_dk:
        return loss, dq.view(bsz, t, hkv, di), dk_acc.mul_(index_scale * inv_n).view(bsz, t, di)
    bn = cfg["DK_BLOCK_N"]
    part = torch.empty((hkv, ntok, di), dtype=torch.float32, device=dev)
    indexer_kl_bwd_dense_flash_dk_kernel[(triton.cdiv(ntok, bn), hkv)](
        q_idx, k_idx, q, k, _seq_end(bsz, t, cu_seqlens, dev), lse_t, lse_s, part, qk2, is2, ntok, hq, hkv, G=g,
        D=d, DI=di, BLOCK_M=cfg["DK_BLOCK_M"], BLOCK_N=bn, BLOCK_D=next_pow2(d, 16), BLOCK_DI=next_pow2(di, 16), CDT=cdt,
        DOT_PREC=prec, num_warps=cfg["DK_WARPS"], num_stages=cfg["DK_STAGES"])
    dk = part[0].clone()
    for r in range(1, hkv):  # fixed order over groups
        dk += part[r]
    return loss, dq.view(bsz, t, hkv, di), dk.mul_(index_scale * inv_n).view(bsz, t, di)


def _seq_end(bsz: int, t: int, cu_seqlens: Optional[torch.Tensor], dev) -> torch.Tensor:
    """int32 (B*T,): one past the last token of each token's own sequence (flattened)."""
    ntok = bsz * t
    if cu_seqlens is None:
        return (token_seq_start(bsz, t, None, dev).to(torch.int64) + t).to(torch.int32)
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    return cu[torch.searchsorted(cu[1:], torch.arange(ntok, device=dev), right=True) + 1].to(torch.int32)


def indexer_kl_forward(q_idx, k_idx, q, k, block_indices, teacher_lse, *, block_size, scale, index_scale,
                       cu_seqlens, with_grad, max_queries_per_item=None, plan=None):
    """(loss, dq_idx, dk_idx) for a unit upstream gradient (None gradients unless with_grad); q, k detached."""
    q_idx, k_idx, q, k = (x.detach().contiguous() for x in (q_idx, k_idx, q, k))
    if teacher_lse is None:
        teacher_lse = teacher_lse_triton(q, k, block_indices, block_size=block_size, scale=scale,
                                         cu_seqlens=cu_seqlens)
    lse_t = teacher_lse.detach().float().contiguous()
    if block_indices is not None:
        return sparse_kl_kv(q_idx, k_idx, q, k, block_indices, lse_t, block_size=block_size,
                            index_scale=index_scale, scale=scale, cu_seqlens=cu_seqlens,
                            max_queries_per_item=max_queries_per_item, with_grad=with_grad, plan=plan)
    return dense_kl_flash(q_idx, k_idx, q, k, lse_t, scale=scale, index_scale=index_scale, cu_seqlens=cu_seqlens,
                          with_grad=with_grad, atomic_dk=dense_mode() == "flash-atomic")


def indexer_kl_triton(q_idx: torch.Tensor, k_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      block_indices: Optional[torch.Tensor], *, block_size: int, scale: float, index_scale: float,
                      cu_seqlens: Optional[torch.Tensor], teacher_lse: Optional[torch.Tensor] = None,
                      max_queries_per_item: Optional[int] = None, plan=None) -> torch.Tensor:
    """Mean over (token, group) of KL(teacher || student), differentiable w.r.t. q_idx and k_idx only.

    Args:
        q_idx: (B, T, H_kv, D_idx) float index queries; k_idx: (B, T, D_idx) float index keys.
        q: (B, T, H_q, D), k: (B, T, H_kv, D) main-branch queries/keys (treated as detached: no gradient).
        block_indices: int32 (B, T, H_kv, K) sparse-phase support, or None for the warmup (full causal) support.
        block_size, scale (main softmax scale), index_scale (student logit scale).
        cu_seqlens: optional int32 (S+1,) packed-sequence offsets (then B == 1).
        teacher_lse: optional fp32 (B, T, H_q) per-head natural-log lse of q.k*scale over the SAME support,
            to skip recomputing it: in the sparse phase pass the lse returned by
            ``msa.sparse_attention(q, k, v, block_indices, return_lse=True)``; in warmup pass the dense causal
            attention's logsumexp (e.g. ``torch.ops.aten._scaled_dot_product_cudnn_attention(...,
            compute_log_sumexp=True)[1]`` (fastest on H100/H200) or the flash op's ``[1]``; both are
            (B, H_q, T[, 1]): reshape/transpose to (B, T, H_q)). When None it is computed here.
        max_queries_per_item: hot-row split of the reverse index used by the sparse KV-outer pass.
        plan: optional ``SelectionPlan`` of block_indices shared with the main branch (its chunking and
            cached reverse indices are reused).

    Returns:
        fp32 scalar loss; gradient w.r.t. the student logits is (p_idx - p) / (B * T * H_kv).
    """
    from .interface import IndexerKLTriton
    return IndexerKLTriton.apply(q_idx, k_idx, q.detach(), k.detach(), block_indices, teacher_lse, block_size, scale,
                                 index_scale, cu_seqlens, max_queries_per_item, plan)
