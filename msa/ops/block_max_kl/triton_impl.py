"""Launch + autograd of the block-max KL on Triton: the kernels give the teacher's per-head block log-sum-exps
(whose softmax over the blocks, averaged over the group's heads, is its block mass) and the index's block maxima
with their argmax keys for the sampled rows; the loss and d loss / d m on those (rows, H_kv, blocks) tensors are a
few PyTorch ops, and a third kernel carries d m to the index projections through the argmax keys (the gradient of a
block max reaches only its argmax key)."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..common import sequence_spans
from ..utils.triton_helpers import dot_precision, next_pow2, tl_compute_dtype
from .reference import block_kl
from .triton_kernels import (LOG2E, block_max_kl_index_grad_kernel, block_max_kl_student_max_kernel,
                             block_max_kl_teacher_lse_kernel)

# query rows per program: 16 feeds tl.dot's minimum M; the teacher loops over the G heads itself. One program per
# (key block, group, row tile): every block in parallel, not a row tile walking the whole history
ROWS = 16
# key tile: whole blocks up to 128 keys; a larger block is walked in tiles of this many keys
MAX_BLOCK_N = 128
# bytes of the teacher's per-head block log-sum-exps (rows x H_q x blocks fp32) built at a time
LSE_BUDGET = 1 << 28
# row tiles per launch: the grid's third axis holds at most 65535 programs
MAX_TILES = 65535


def _dtype_pair(a: torch.Tensor, b: torch.Tensor):
    dt = a.dtype if a.dtype == b.dtype else torch.float32
    return tl_compute_dtype(dt), dot_precision(dt)


def block_reductions(q_idx, k_idx, q, k, picked: torch.Tensor, s0: int, n: int, *, block_size: int, scale: float,
                     index_scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one sequence (tokens s0 .. s0 + n of the flattened (B * T) layout) and its sorted query
    positions picked (int64, CPU): the teacher's block masses P fp32 (R, H_kv, NB), the index's block
    maxima m fp32 (R, H_kv, NB; -inf past each row's own block), their argmax positions int32
    (within the sequence) and the rows' positions on the device, int32 padded with -1 to whole tiles of
    ROWS, from flattened q_idx (N, H_kv, D_idx), k_idx (N, D_idx), q (N, H_q, D), k (N, H_kv, D)."""
    dev = q.device
    hq, d = q.shape[1], q.shape[2]
    hkv, di = q_idx.shape[1], q_idx.shape[2]
    g = hq // hkv
    r = picked.numel()
    nb = math.ceil(n / block_size)
    tiles = math.ceil(r / ROWS)
    pos = torch.full((tiles * ROWS,), -1, dtype=torch.int32)
    pos[:r] = picked.to(torch.int32)
    pos = pos.to(dev, non_blocking=True)
    bn = min(next_pow2(block_size, 16), MAX_BLOCK_N)
    mass = torch.empty(tiles * ROWS, hkv, nb, dtype=torch.float32, device=dev)
    cdt, prec = _dtype_pair(q, k)
    # the per-head block log-sum-exps of LSE_BUDGET bytes of rows at a time, at most MAX_TILES row tiles per launch
    step = min(MAX_TILES, max(1, LSE_BUDGET // (ROWS * hq * nb * 4))) * ROWS
    for c0 in range(0, tiles * ROWS, step):
        c1 = min(tiles * ROWS, c0 + step)
        lse = torch.full((c1 - c0, hq, nb), float("-inf"), dtype=torch.float32, device=dev)
        block_max_kl_teacher_lse_kernel[(nb, hkv, (c1 - c0) // ROWS)](
            q, k, pos[c0:c1], lse, s0, n, float(scale) * LOG2E, hq, hkv, nb, G=g, D=d, ROWS=ROWS, BS=block_size,
            BLOCK_N=bn, BLOCK_D=next_pow2(d, 16), BLOCK_G=next_pow2(g), CDT=cdt, DOT_PREC=prec, num_warps=4)
        # each head's softmax over the blocks (log2 units to natural), averaged over the group's heads; padding
        # rows (every entry -inf) give NaN and are cut below
        mass[c0:c1] = torch.softmax(lse.mul_(math.log(2.0)), dim=-1).view(c1 - c0, hkv, g, nb).mean(dim=2)
    bmax = torch.full((tiles * ROWS, hkv, nb), float("-inf"), dtype=torch.float32, device=dev)
    arg = torch.zeros(tiles * ROWS, hkv, nb, dtype=torch.int32, device=dev)
    cdt, prec = _dtype_pair(q_idx, k_idx)
    for c0 in range(0, tiles * ROWS, MAX_TILES * ROWS):
        c1 = min(tiles * ROWS, c0 + MAX_TILES * ROWS)
        block_max_kl_student_max_kernel[(nb, hkv, (c1 - c0) // ROWS)](
            q_idx, k_idx, pos[c0:c1], bmax[c0:c1], arg[c0:c1], s0, n, float(index_scale), hkv, nb, DI=di, ROWS=ROWS,
            BS=block_size, BLOCK_N=bn, BLOCK_D=next_pow2(di, 16), CDT=cdt, DOT_PREC=prec, num_warps=4)
    return mass[:r], bmax[:r], arg[:r], pos


def block_max_kl_forward(q_idx, k_idx, q, k, rows: List[torch.Tensor], *, block_size: int, scale: float,
                         index_scale: float, cu_seqlens: Optional[torch.Tensor], with_grad: bool):
    """(loss fp32 scalar, dq_idx fp32 or None, dk_idx fp32 or None) of ``block_max_kl_loss``."""
    bsz, t, hkv, di = q_idx.shape
    flat = [x.reshape(bsz * t, *x.shape[2:]).contiguous() for x in (q_idx, k_idx, q, k)]
    fqi, fki = flat[0], flat[1]
    denom = bsz * t * hkv
    total = torch.zeros((), dtype=torch.float32, device=q.device)
    dq = torch.zeros(fqi.shape, dtype=torch.float32, device=q.device) if with_grad else None
    dk = torch.zeros(fki.shape, dtype=torch.float32, device=q.device) if with_grad else None
    for (b, s0, e0), picked in zip(sequence_spans(bsz, t, cu_seqlens), rows):
        start, n = b * t + s0, e0 - s0
        mass, bmax, arg, pos = block_reductions(*flat, picked, start, n, block_size=block_size, scale=scale,
                                                index_scale=index_scale)
        weight = n / picked.numel()
        log_student = torch.log_softmax(bmax, dim=-1)  # blocks past the row's own: -inf, probability 0
        total = total + block_kl(mass, log_student) * weight
        if not with_grad:
            continue
        # d KL / d m_b = softmax(m)_b - P_b; it reaches the block's argmax score only
        dm = (log_student.exp() - mass) * (weight * index_scale / denom)
        block_max_kl_index_grad_kernel[(pos.numel() // ROWS, hkv)](
            fqi, fki, pos, dm, arg, dq, dk, start, hkv, dm.shape[-1], DI=di, ROWS=ROWS, BS=block_size,
            BLOCK_D=next_pow2(di, 16), num_warps=4)
    loss = total / denom
    if not with_grad:
        return loss, None, None
    return loss, dq.view(q_idx.shape), dk.view(k_idx.shape)


class BlockMaxKLTriton(torch.autograd.Function):
    """The forward computes the loss and the index gradients (the reductions are there anyway); the
    backward scales them by grad_out."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, q, k, rows, block_size, scale, index_scale, cu_seqlens):
        with_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.dtypes = q_idx.dtype, k_idx.dtype
        with torch.autocast(q.device.type, enabled=False):  # the training autocast would round the fp32 math
            loss, dq, dk = block_max_kl_forward(q_idx.detach(), k_idx.detach(), q.detach(), k.detach(), rows,
                                                block_size=block_size, scale=scale, index_scale=index_scale,
                                                cu_seqlens=cu_seqlens, with_grad=with_grad)
        if with_grad:
            ctx.save_for_backward(dq, dk)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk = ctx.saved_tensors
        gq = (dq * grad_out).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gk = (dk * grad_out).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gq, gk, None, None, None, None, None, None, None
