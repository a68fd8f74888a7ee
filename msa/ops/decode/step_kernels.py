"""Triton kernels of the fused decode step (``msa.models.generation``): the small per-token operations
around the GEMMs and the decode attention, fused so a captured step launches few kernels.

- ``add_rmsnorm_kernel``: x_out = x + h (rounded to x's dtype, like the eager residual add), then
  y = RMSNorm(x_out) (fp32 statistics, gain w or 1 + w), one program per token row.
- ``silu_mul_kernel``: SwiGLU's silu(gate) * up from the fused gate_up row (each product rounded like
  the eager ops: silu to the input dtype, then the product).
- ``rope_append_kernel``: from the fused projection row [q | k | v | q_idx | k_idx] of each new token,
  RoPE on q and k (rotate-half on the first 2 * HALF dims, cos / sin read from a per-position table),
  q and q_idx to the decode inputs, k, v, k_idx to the cache rows at the sequence's device length
  (fp8 index keys quantised with one scale per token), then the length += t. One program per
  sequence, so the length it reads and writes is its own.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_rmsnorm_kernel(x_ptr, h_ptr, w_ptr, xo_ptr, y_ptr, N, eps,
                       HAS_H: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=m, other=0.0)
    if HAS_H:
        h = tl.load(h_ptr + row * N + offs, mask=m, other=0.0)
        x = (x.to(tl.float32) + h.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * N + offs, x, mask=m)
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = 1.0 + w
    tl.store(y_ptr + row * N + offs, ((xf * r) * w).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(gu_ptr + row * 2 * N + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + N + offs, mask=m, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (act * u).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_tile(base, cos_row, sin_row, HEADS, D, HALF: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """(H_PAD, D_PAD) fp32 tile of HEADS heads of D dims at ``base`` with RoPE on the first 2 * HALF dims."""
    hh = tl.arange(0, H_PAD)[:, None]
    dd = tl.arange(0, D_PAD)[None, :]
    m = (hh < HEADS) & (dd < D)
    x = tl.load(base + hh * D + dd, mask=m, other=0.0).to(tl.float32)
    if HALF > 0:
        rot = dd < 2 * HALF
        first = dd < HALF
        partner = tl.where(first, dd + HALF, dd - HALF)
        xp = tl.load(base + hh * D + partner, mask=m & rot, other=0.0).to(tl.float32)
        j = tl.where(first, dd, dd - HALF)
        c = tl.load(cos_row + j, mask=rot, other=1.0)
        s = tl.load(sin_row + j, mask=rot, other=0.0)
        # first half: x1 c - x2 s; second half: x2 c + x1 s
        x = tl.where(rot, tl.where(first, x * c - xp * s, x * c + xp * s), x)
    return x


@triton.jit
def rope_append_kernel(proj_ptr, cos_ptr, sin_ptr, q_ptr, qi_ptr, k_ptr, v_ptr, ki_ptr, ks_ptr, pt_ptr, lens_ptr,
                       T, NTOT, S_ROWS, PT_STRIDE, HQ, HKV, D, DI,
                       HALF: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, HAS_INDEX: tl.constexpr,
                       FP8: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, D_PAD: tl.constexpr,
                       DI_PAD: tl.constexpr):
    b = tl.program_id(0)
    n0 = tl.load(lens_ptr + b)
    hq = tl.arange(0, HQ_PAD)[:, None]
    hk = tl.arange(0, HKV_PAD)[:, None]
    dd = tl.arange(0, D_PAD)[None, :]
    di = tl.arange(0, DI_PAD)
    for i in range(T):
        pos = n0 + i
        tok = (b * T + i).to(tl.int64)
        base = proj_ptr + tok * NTOT
        if PAGED:
            page = tl.load(pt_ptr + b * PT_STRIDE + pos // PAGE).to(tl.int64)
            row = page * PAGE + pos % PAGE
        else:
            row = b.to(tl.int64) * S_ROWS + pos
        cos_row = cos_ptr + pos.to(tl.int64) * HALF
        sin_row = sin_ptr + pos.to(tl.int64) * HALF
        q = _rope_tile(base, cos_row, sin_row, HQ, D, HALF, HQ_PAD, D_PAD)
        tl.store(q_ptr + tok * HQ * D + hq * D + dd, q.to(q_ptr.dtype.element_ty), mask=(hq < HQ) & (dd < D))
        mk = (hk < HKV) & (dd < D)
        k = _rope_tile(base + HQ * D, cos_row, sin_row, HKV, D, HALF, HKV_PAD, D_PAD)
        tl.store(k_ptr + row * HKV * D + hk * D + dd, k.to(k_ptr.dtype.element_ty), mask=mk)
        v = tl.load(base + (HQ + HKV) * D + hk * D + dd, mask=mk, other=0.0)
        tl.store(v_ptr + row * HKV * D + hk * D + dd, v.to(v_ptr.dtype.element_ty), mask=mk)
        if HAS_INDEX:
            ib = base + (HQ + 2 * HKV) * D
            hd = tl.arange(0, DI_PAD)[None, :]
            mi = (hk < HKV) & (hd < DI)
            qi = tl.load(ib + hk * DI + hd, mask=mi, other=0.0)
            tl.store(qi_ptr + tok * HKV * DI + hk * DI + hd, qi.to(qi_ptr.dtype.element_ty), mask=mi)
            kx = tl.load(ib + HKV * DI + di, mask=di < DI, other=0.0)
            if FP8:
                kf = kx.to(tl.float32)
                sc = tl.maximum(tl.max(tl.abs(kf), 0) / 448.0, 1e-12)
                kq = tl.minimum(tl.maximum(kf / sc, -448.0), 448.0)
                tl.store(ki_ptr + row * DI + di, kq.to(ki_ptr.dtype.element_ty), mask=di < DI)
                tl.store(ks_ptr + row, sc)
            else:
                tl.store(ki_ptr + row * DI + di, kx.to(ki_ptr.dtype.element_ty), mask=di < DI)
    tl.store(lens_ptr + b, n0 + T)
