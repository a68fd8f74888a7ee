"""Triton indexer KL (sparse and warmup phases) vs autograd of the reference (CPU: TRITON_INTERPRET=1).

Tolerances (fp32): |loss - ref| <= 1e-5 * max(1, |ref|); dq_idx, dk_idx relative error
||x - ref|| / max(||ref||, 1e-2) < 1e-4 (observed ~3e-7; the floor covers T = 1, where the exact
gradient is 0 and fp32 rounding leaves ~1e-7). Covers T in {1, 63, 129, 200}, block sizes 16/32, G in {1, 3, 8, 16}, B = 2, packed sequences with adjacent partial blocks, hot rows split
over several work items, -1 padded rows, a precomputed teacher lse (also through msa.indexer_kl_loss),
other tiles and query chunking (env knobs), both warmup modes (flash-atomic / flash), the detach rule (no gradient to q, k) and
bitwise repeatability. On a GPU the same tests run with looser tolerances (see TOL/LTOL). Fresh float buffers are NaN-filled so unwritten outputs show.
"""

import os

if os.environ.get("TRITON_INTERPRET") is None:
    import torch as _t
    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import msa.tuning

from msa.ops.indexer_kl.reference import indexer_kl_reference
from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
from msa.ops.select_blocks.reference import select_blocks_reference
from msa.ops.sparse_attention.reference import sparse_attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# GPU: fp32 dots use input_precision="ieee" but exp/log and summation order differ from the CPU
TOL = 1e-4 if DEV == "cpu" else 5e-4
LTOL = 1e-5 if DEV == "cpu" else 1e-4  # loss value, relative to max(1, |ref|)
if DEV == "cuda":  # the fp32 reference must not run its matmuls in TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# every test runs with NaN-filled torch.empty (fixture in tests/ops/conftest.py)
pytestmark = pytest.mark.usefixtures("nan_empty")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-2)).item()


def make_case(bsz, t, hkv, g, d, di, block_size, topk, cu=None, sparse=True, pad_rows=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, t, hkv * g, d, generator=gen)
    k = torch.randn(bsz, t, hkv, d, generator=gen)
    qi = torch.randn(bsz, t, hkv, di, generator=gen)
    ki = torch.randn(bsz, t, di, generator=gen)
    bi = None
    if sparse:
        bi = select_blocks_reference(qi, ki, block_size=block_size, topk=topk, init_blocks=0, local_blocks=1,
                                     scale=di ** -0.5, cu_seqlens=cu)
        if pad_rows:
            bi = bi.clone()
            rows = bi[:, ::2]
            shifted = torch.cat([rows[..., 1:], torch.full_like(rows[..., :1], -1)], dim=-1)
            bi[:, ::2] = torch.where(rows[..., :1] >= 0, shifted, rows)
            bi[0, t // 2, 0] = -1  # an empty support: KL 0, no gradient
        bi = bi.to(DEV)
    return [x.to(DEV) for x in (qi, ki, q, k)] + [bi, None if cu is None else cu.to(DEV)]


def run_both(qi, ki, q, k, bi, cu, block_size, c=None, teacher_lse=None):
    kw = dict(block_size=block_size, scale=q.shape[-1] ** -0.5, index_scale=qi.shape[-1] ** -0.5, cu_seqlens=cu)
    a, b = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    ref = indexer_kl_reference(a, b, q, k, bi, **kw)
    ga, gb = torch.autograd.grad(ref, (a, b))
    a2, b2 = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    got = indexer_kl_triton(a2, b2, q, k, bi, **kw, teacher_lse=teacher_lse, max_queries_per_item=c)
    ga2, gb2 = torch.autograd.grad(got, (a2, b2))
    return (ref, ga, gb), (got, ga2, gb2)


def check(ref, got):
    (lr, ga, gb), (lg, ga2, gb2) = ref, got
    assert lg.dtype == torch.float32 and lg.dim() == 0
    assert abs(lg.item() - lr.item()) <= LTOL * max(1.0, abs(lr.item())), (lg.item(), lr.item())
    for name, x, y in (("dq_idx", ga2, ga), ("dk_idx", gb2, gb)):
        assert torch.isfinite(x).all(), f"{name} has unwritten (NaN) entries"
        assert rel(x, y) < TOL, f"{name} rel err {rel(x, y):.3e}"


SPARSE = [
    # bsz, t, hkv, g, d, di, block, topk, cu, c, pad_rows
    (1, 1, 2, 1, 16, 16, 16, 2, None, None, False),
    (1, 63, 2, 3, 16, 16, 16, 3, None, 5, True),
    (2, 129, 1, 8, 16, 16, 32, 2, None, 16, False),
    (1, 200, 1, 16, 16, 16, 16, 3, torch.tensor([0, 37, 100, 163, 200], dtype=torch.int32), 6, True),
    (1, 70, 2, 64, 16, 32, 16, 2, None, None, False),  # the paper's group of 64 heads, d_idx != d
]


@pytest.mark.parametrize("bsz,t,hkv,g,d,di,block_size,topk,cu,c,pad_rows", SPARSE)
def test_sparse_kl_matches_reference(bsz, t, hkv, g, d, di, block_size, topk, cu, c, pad_rows):
    qi, ki, q, k, bi, cu = make_case(bsz, t, hkv, g, d, di, block_size, topk, cu, True, pad_rows)
    check(*run_both(qi, ki, q, k, bi, cu, block_size, c))


def test_sparse_kl_without_grad():
    # under no_grad (evaluation) the kernels skip the gradients; the loss is the same
    qi, ki, q, k, bi, cu = make_case(1, 90, 2, 4, 16, 16, 16, 3, seed=5)
    kw = dict(block_size=16, scale=0.25, index_scale=0.25, cu_seqlens=None)
    with torch.no_grad():
        a = indexer_kl_triton(qi, ki, q, k, bi, **kw)
    b = indexer_kl_reference(qi, ki, q, k, bi, **kw)
    assert abs(a.item() - b.item()) <= LTOL * max(1.0, abs(b.item()))


DENSE = [
    # bsz, t, hkv, g, d, di, block, cu
    (1, 1, 1, 3, 16, 16, 16, None),
    (2, 63, 2, 1, 16, 32, 16, None),
    (1, 129, 1, 8, 16, 16, 32, torch.tensor([0, 37, 100, 129], dtype=torch.int32)),
    (1, 200, 1, 3, 16, 16, 16, torch.tensor([0, 1, 90, 200], dtype=torch.int32)),
    (1, 77, 1, 16, 16, 16, 16, None),
    (1, 50, 2, 2, 24, 16, 16, None),  # head dim below the tile: Q through masked loads, not TMA
]


@pytest.mark.parametrize("mode", ["flash-atomic", "flash"])
@pytest.mark.parametrize("bsz,t,hkv,g,d,di,block_size,cu", DENSE)
def test_warmup_kl_matches_reference(tuned, bsz, t, hkv, g, d, di, block_size, cu, mode):
    tuned(kl_dense_mode=mode)
    qi, ki, q, k, bi, cu = make_case(bsz, t, hkv, g, d, di, block_size, 1, cu, sparse=False)
    check(*run_both(qi, ki, q, k, bi, cu, block_size))


@pytest.mark.parametrize("sparse", [True, False])
def test_teacher_lse_from_forward(sparse):
    """Passing the main forward's lse (sparse) / the dense lse (warmup) gives the same loss and grads."""
    qi, ki, q, k, bi, cu = make_case(1, 70, 1, 3, 16, 16, 16, 2, sparse=sparse)
    v = torch.randn_like(k)
    _, lse = sparse_attention_reference(q, k, v, bi, block_size=16, scale=16 ** -0.5, cu_seqlens=cu)
    check(*run_both(qi, ki, q, k, bi, cu, 16, teacher_lse=lse))


def test_detach_rule_and_repeatability():
    # repeatable, and the KV-outer launch order (tuning.work_order) changes nothing
    import msa.tuning
    qi, ki, q, k, bi, cu = make_case(1, 80, 2, 3, 16, 16, 16, 3)
    kw = dict(block_size=16, scale=0.25, index_scale=0.25, cu_seqlens=cu, max_queries_per_item=4)
    outs = []
    for order in ("items", "items", "longest-first"):
        a, b = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        with msa.tuning.override(work_order=order):
            loss = indexer_kl_triton(a, b, qq, kk, bi, **kw)
            loss.backward()
        assert qq.grad is None and kk.grad is None  # the teacher never moves the backbone
        outs.append((loss.detach(), a.grad, b.grad))
    for out in outs[1:]:
        for x, y in zip(outs[0], out):
            assert torch.equal(x, y)


def test_interface_dispatch():
    """msa.indexer_kl_loss(backend='triton') reaches this implementation and matches the reference."""
    import msa
    qi, ki, q, k, bi, cu = make_case(1, 33, 1, 3, 16, 16, 16, 2)
    a = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=16, backend="triton")
    b = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=16, backend="reference")
    assert abs(a.item() - b.item()) <= LTOL * max(1.0, abs(b.item()))


@pytest.mark.parametrize("sparse,mode", [(True, "auto"), (False, "flash"), (False, "flash-atomic")])
def test_tile_and_chunking_configs(tuned, sparse, mode):
    """Other tiles (32 entries per head tile in the sparse kernel; 32 x 16 / 16 x 32 warmup tiles) and, for
    the sparse phase, query chunking (tiny partial budget: many chunks, each with its own reverse
    index, dk_idx added chunk by chunk) give the reference result."""
    tuned(kl_kv_config={"BLOCK_E": 32})
    # flash: query/key tiles of different sizes (32 queries x 16 keys, pass 2 16 queries x 32 keys), Q
    # through plain loads instead of the TMA descriptor
    tuned(kl_dense_flash_config={'BLOCK_M': 32, 'BLOCK_N': 16, 'DK_BLOCK_M': 16, 'DK_BLOCK_N': 32, 'TMA': 0})
    tuned(kl_partial_bytes=4000)
    tuned(kl_dense_mode=mode)
    qi, ki, q, k, bi, cu = make_case(1, 150, 2, 3, 16, 16, 16, 3, torch.tensor([0, 70, 150], dtype=torch.int32),
                                     sparse=sparse, pad_rows=sparse)
    check(*run_both(qi, ki, q, k, bi, cu, 16, 9))


def test_interface_passes_teacher_lse():
    """msa.indexer_kl_loss(..., teacher_lse=...) reaches the Triton path: a deliberately wrong lse changes
    the loss, the right one (the forward's) matches the reference; a wrong shape is rejected."""
    import msa
    qi, ki, q, k, bi, cu = make_case(1, 40, 1, 3, 16, 16, 16, 2)
    v = torch.randn_like(k)
    _, lse = sparse_attention_reference(q, k, v, bi, block_size=16, scale=16 ** -0.5, cu_seqlens=cu)
    ref = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=16, backend="reference")
    good = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=16, backend="triton", teacher_lse=lse)
    bad = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=16, backend="triton", teacher_lse=lse + 1.0)
    assert abs(good.item() - ref.item()) <= LTOL * max(1.0, abs(ref.item()))
    assert abs(bad.item() - ref.item()) > 1e-2
    with pytest.raises(Exception):
        msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=16, backend="triton", teacher_lse=lse[:, :-1])


def test_warmup_deterministic_mode_is_repeatable(tuned):
    """Under torch.use_deterministic_algorithms the warmup path avoids atomics ('flash' instead of the
    default 'flash-atomic', also when 'flash-atomic' is asked for): bitwise repeatable."""
    qi, ki, q, k, bi, cu = make_case(1, 90, 2, 3, 16, 16, 16, 1, sparse=False)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        from msa.ops.indexer_kl.triton_impl import dense_mode
        assert dense_mode() == "flash"
        with msa.tuning.override(kl_dense_mode="flash-atomic"):
            assert dense_mode() == "flash"
        outs = []
        for _ in range(2):
            a, b = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
            loss = indexer_kl_triton(a, b, q, k, None, block_size=16, scale=0.25, index_scale=0.25, cu_seqlens=cu)
            loss.backward()
            outs.append((loss.detach(), a.grad, b.grad))
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_dense_mode_rejects_unknown(tuned):
    with pytest.raises(ValueError, match="kl_dense_mode must be one of"):
        tuned(kl_dense_mode="onepass")


@pytest.mark.parametrize("mode", ["flash-atomic", "flash"])
def test_warmup_kl_bf16_inputs(tuned, mode):
    """bf16 inputs (the training dtype; on the GPU this is the path whose Q tiles come through the TMA
    descriptor and whose dots run in bf16) on packed sequences with odd lengths and G = 16, against the
    fp32 reference on the same bf16-rounded values: loss within 1e-3, gradients within 2e-2 (the
    kernel rounds p_idx - p to bf16 before its gradient MMAs)."""
    tuned(kl_dense_mode=mode)
    cu = torch.tensor([0, 37, 100, 150], dtype=torch.int32)
    qi, ki, q, k, _, cu = make_case(1, 150, 1, 16, 32, 32, 16, 1, cu, sparse=False, seed=3)
    qi, ki, q, k = (x.to(torch.bfloat16) for x in (qi, ki, q, k))
    kw = dict(block_size=16, scale=32 ** -0.5, index_scale=32 ** -0.5, cu_seqlens=cu)
    a, b = qi.float().requires_grad_(True), ki.float().requires_grad_(True)
    ref = indexer_kl_reference(a, b, q.float(), k.float(), None, **kw)
    ga, gb = torch.autograd.grad(ref, (a, b))
    a2, b2 = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    got = indexer_kl_triton(a2, b2, q, k, None, **kw)
    ga2, gb2 = torch.autograd.grad(got, (a2, b2))
    assert abs(got.item() - ref.item()) <= 1e-3 * max(1.0, abs(ref.item())), (got.item(), ref.item())
    assert ga2.dtype == torch.bfloat16 and gb2.dtype == torch.bfloat16
    for name, x, y in (("dq_idx", ga2, ga), ("dk_idx", gb2, gb)):
        assert rel(x.float(), y) < 2e-2, f"{name} rel err {rel(x.float(), y):.3e}"


def test_sparse_kl_pipelines_two_stages_only_where_it_was_measured_faster(monkeypatch):
    """The compiled-GPU configuration (interpreter off): two stages from 16K tokens or at G >= 16 on parts
    with >= 200 KiB of shared memory per SM, one otherwise (docs/perf-notes.md, round 30)."""
    import importlib
    ti = importlib.import_module("msa.ops.indexer_kl.triton_impl")  # the package's name is also its op function
    monkeypatch.setattr(ti, "interpreting", lambda: False)
    assert ti.kv_config(128, 128, 16, 8192, large_smem=True)["num_stages"] == 2
    assert ti.kv_config(128, 128, 4, 16384, large_smem=True)["num_stages"] == 2
    assert ti.kv_config(128, 128, 4, 8192, large_smem=True)["num_stages"] == 1
    assert ti.kv_config(128, 128, 8, 8192, large_smem=True)["num_stages"] == 1
    assert ti.kv_config(128, 128, 16, 131072, large_smem=False)["num_stages"] == 1
    with msa.tuning.override(kl_kv_config={"num_stages": 1}):  # an override still wins
        assert ti.kv_config(128, 128, 16, 131072, large_smem=True)["num_stages"] == 1
