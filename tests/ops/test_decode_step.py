"""Fused decode-step kernels (msa.ops.decode.step) against the eager torch ops they replace."""

import pytest
import torch

from msa.cache import MSACache
from msa.layers.norm import RMSNorm
from msa.layers.rope import apply_rotary, rotary_cos_sin
from msa.ops.decode.step import add_rmsnorm, rope_append

pytest.importorskip("triton")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("unit_offset", [False, True])
def test_add_rmsnorm_equals_residual_add_then_rmsnorm(unit_offset):
    g = torch.Generator().manual_seed(0)
    n = 40  # not a power of two: masked tail
    norm = RMSNorm(n, unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g))
    norm = norm.to(DEV)
    x, h = torch.randn(3, 2, n, generator=g).to(DEV), torch.randn(3, 2, n, generator=g).to(DEV)
    xo, y = add_rmsnorm(x, h, norm.weight, norm.eps, unit_offset)
    torch.testing.assert_close(xo, x + h, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(x + h), rtol=1e-6, atol=1e-6)
    xo, y = add_rmsnorm(x, None, norm.weight, norm.eps, unit_offset)
    assert xo is x
    torch.testing.assert_close(y, norm(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("paged,fp8", [(False, False), (True, True)])
def test_rope_append_equals_rotary_and_append_device(paged, fp8):
    """Ragged lengths, t = 2 tokens, partial rotary dim, permuted pages, fp8 per-token index scales:
    q / q_idx outputs, the cache content and the lengths equal apply_rotary + append_device."""
    B, t, HQ, HKV, D, DI, rd, bs = 2, 2, 4, 2, 16, 16, 8, 16
    kw = dict(dtype=torch.float32, device=DEV, index_dtype=torch.float8_e4m3fn if fp8 else None)
    if paged:
        kw.update(page_size=bs, page_table=torch.randperm(2 * 4, generator=torch.Generator().manual_seed(3))
                  .view(2, 4).to(torch.int32))
    caches = [MSACache(1, B, 64, HKV, D, DI, **kw) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 22], dtype=torch.int32)
    pre = [torch.randn(1, 22, HKV, D, generator=g).to(DEV), torch.randn(1, 22, HKV, D, generator=g).to(DEV),
           torch.randn(1, 22, DI, generator=g).to(DEV)]
    for c in caches:
        c.append(0, *pre, cu_seqlens=cu.to(DEV))
    ntot = (HQ + 2 * HKV) * D + HKV * DI + DI
    proj = torch.randn(B, t, ntot, generator=g).to(DEV)
    cos, sin = rotary_cos_sin(torch.arange(64, device=DEV), rd, 10000.0, torch.float32)
    q_out, qi_out = torch.empty(B, t, HQ, D, device=DEV), torch.empty(B, t, HKV, DI, device=DEV)
    rope_append(proj, caches[0], 0, q_out, qi_out, cos.contiguous(), sin.contiguous(), num_heads=HQ, head_dim=D,
                index_dim=DI)
    # eager: split, rotate at positions len .. len + t - 1, append_device
    pos = caches[1].lengths_dev[0].long().view(B, 1) + torch.arange(t, device=DEV).view(1, t)
    c_, s_ = rotary_cos_sin(pos, rd, 10000.0, torch.float32)
    q, k, v, qi, ki = proj.split([HQ * D, HKV * D, HKV * D, HKV * DI, DI], -1)
    q = apply_rotary(q.reshape(B, t, HQ, D), c_, s_)
    k = apply_rotary(k.reshape(B, t, HKV, D), c_, s_)
    caches[1].append_device(0, k, v.reshape(B, t, HKV, D), ki)
    torch.testing.assert_close(q_out, q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qi_out, qi.reshape(B, t, HKV, DI), rtol=0, atol=0)
    assert caches[0].lengths_dev[0].tolist() == caches[1].lengths_dev[0].tolist() == [7, 19]
    for c in caches:
        c.sync_lengths()
    for b in range(B):
        for x, y in zip(caches[0].view(0, b), caches[1].view(0, b)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_silu_mul_equals_swiglu_activation():
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(3, 2 * 1100, generator=g) * 4).to(DEV)  # two column blocks, masked tail
    from msa.ops.decode.step import silu_mul
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(silu_mul(gu), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)
