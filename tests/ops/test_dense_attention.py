"""Dense causal attention with its lse (the warmup main branch; cuDNN / flash on CUDA, the CPU flash
kernel or the masked math path elsewhere) against a float64 reference: output, lse, gradients."""

import pytest
import torch

from msa.ops.dense import dense_causal_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k, v, scale, cu):
    """float64 per sequence: o (B, T, H_q, D) and lse (B, T, H_q)."""
    bsz, t, hq, d = q.shape
    g = hq // k.shape[2]
    bounds = [(0, t)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    o = torch.zeros(bsz, t, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.zeros(bsz, t, hq, dtype=torch.float64, device=q.device)
    for s, e in bounds:
        qq = q[:, s:e].double().transpose(1, 2)
        kk = k[:, s:e].double().repeat_interleave(g, 2).transpose(1, 2)
        vv = v[:, s:e].double().repeat_interleave(g, 2).transpose(1, 2)
        sc = (qq @ kk.transpose(-1, -2)) * scale
        n = e - s
        sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse[:, s:e] = torch.logsumexp(sc, -1).transpose(1, 2)
        o[:, s:e] = (torch.softmax(sc, -1) @ vv).transpose(1, 2)
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
@pytest.mark.parametrize("bsz,t,hkv,g,cu", [
    (2, 77, 2, 3, None),
    (1, 150, 1, 4, [0, 37, 100, 150]),   # packed, odd lengths
    (1, 64, 4, 1, [0, 1, 64]),           # a one-token sequence, MHA
])
def test_dense_lse_matches_reference(dtype, bsz, t, hkv, g, cu):
    torch.manual_seed(0)
    d = 32
    q = torch.randn(bsz, t, hkv * g, d, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(bsz, t, hkv, d, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(bsz, t, hkv, d, device=DEV, dtype=dtype, requires_grad=True)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    o, lse = dense_causal_attention(q, k, v, scale=d ** -0.5, cu_seqlens=cu_t, return_lse=True)
    o_ref, lse_ref = reference(q.detach(), k.detach(), v.detach(), d ** -0.5, cu_t)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert lse.dtype == torch.float32 and lse.shape == (bsz, t, hkv * g) and not lse.requires_grad
    assert (lse.double() - lse_ref).abs().max() < tol
    assert (o.double() - o_ref).abs().max() < tol * 2
    # the output without the lse is the same function, and gradients match autograd of the reference
    o2 = dense_causal_attention(q, k, v, scale=d ** -0.5, cu_seqlens=cu_t)
    assert (o2.double() - o_ref).abs().max() < tol * 2
    do = torch.randn_like(o_ref)
    grads = torch.autograd.grad(o, (q, k, v), do.to(dtype))
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref_grads = torch.autograd.grad(reference(qd, kd, vd, d ** -0.5, cu_t)[0], (qd, kd, vd), do)
    for name, a, b in zip("qkv", grads, ref_grads):
        err = float((a.double() - b).norm() / b.norm())
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), f"d{name} rel err {err:.2e}"
