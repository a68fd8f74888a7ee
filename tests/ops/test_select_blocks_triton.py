"""Triton Index Branch (msa.select_blocks backend="triton") against the PyTorch reference.

Runs on the CPU under TRITON_INTERPRET=1 (fp32, small shapes) and on CUDA when present.
Selections are compared as sets per row; where a set differs (near-ties), the multiset of the selected
blocks' reference scores must still agree (rtol 1e-5 / atol 1e-5 fp32, 2e-2 bf16). The index
convention is checked exactly: local block in the last valid slot, -1 only after the valid prefix.
"""

import os
import sys


import pytest  # noqa: E402
import torch  # noqa: E402

import msa  # noqa: E402
from msa.ops.select_blocks.reference import block_scores_reference, select_blocks_reference  # noqa: E402
from msa.ops.select_blocks.triton_impl import block_scores_triton, select_blocks_triton  # noqa: E402

IMPL = sys.modules["msa.ops.select_blocks.triton_impl"]
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
OUT_POISON = -7


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh buffers: the index output starts at -7 and the score buffer at +inf, so an unwritten
    output shows as an invalid id and an unwritten score would be picked (and caught)."""
    def _empty(shape, dtype, device):
        fill = OUT_POISON if dtype == torch.int32 else float("inf")
        return torch.full(shape, fill, dtype=dtype, device=device)
    monkeypatch.setattr(IMPL, "_empty", _empty)


def _spans(bsz, t, cu):
    if cu is None:
        return [(b, 0, t) for b in range(bsz)]
    return [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]


def check_selection(got, ref, q, k, *, block_size, topk, init_blocks, local_blocks, scale, cu, tol):
    bsz, t, h, _ = q.shape
    assert got.shape == ref.shape == (bsz, t, h, topk) and got.dtype == torch.int32
    assert not (got == OUT_POISON).any(), "unwritten output entries"
    for b, s, e in _spans(bsz, t, cu):
        g, r = got[b, s:e].long().cpu(), ref[b, s:e].long().cpu()
        n = e - s
        pos = torch.arange(n)
        local = pos // block_size
        nvalid = torch.clamp(local + 1, max=topk)
        slot = torch.arange(topk)
        valid = slot.view(1, 1, -1) < nvalid.view(-1, 1, 1)
        # -1 exactly after the valid prefix, ids inside [0, local], local block in the last valid slot
        assert torch.equal(g < 0, ~valid.expand_as(g)), "valid entries must form a prefix of length min(k, local+1)"
        assert ((g == -1) | valid).all()
        assert ((g <= local.view(-1, 1, 1)) | ~valid).all(), "future block selected"
        last = g.gather(-1, (nvalid - 1).view(-1, 1, 1).expand(n, h, 1)).squeeze(-1)
        assert torch.equal(last, local.view(-1, 1).expand(n, h)), "local block must sit in the last valid slot"
        srt = g.sort(-1).values
        assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(), "duplicate block id"
        # forced blocks are present
        nb = int(local.max()) + 1
        bb = torch.arange(nb).view(1, -1)
        forced = ((bb < init_blocks) | (bb > local.view(-1, 1) - local_blocks)) & (bb <= local.view(-1, 1))
        member = torch.zeros(n, h, nb + 1, dtype=torch.bool)
        member.scatter_(-1, torch.where(g < 0, nb, g), True)
        assert (member[..., :nb] | ~forced.unsqueeze(1)).all(), "a forced block is missing"
        # same set, or (near-ties) the same multiset of reference scores
        same = torch.equal(srt, r.sort(-1).values)
        if not same:
            m = block_scores_reference(q[b, s:e].cpu(), k[b, s:e].cpu(), 0, block_size, scale).double()
            m = torch.where(forced.unsqueeze(1), torch.full_like(m, float("inf")), m)
            m = torch.cat([m, m.new_full((n, h, 1), float("-inf"))], -1)
            sg = m.gather(-1, torch.where(g < 0, nb, g)).sort(-1).values
            sr = m.gather(-1, torch.where(r < 0, nb, r)).sort(-1).values
            fin = torch.isfinite(sr)
            assert torch.equal(torch.isfinite(sg), fin)
            torch.testing.assert_close(sg[fin], sr[fin], rtol=tol, atol=tol)


CASES = [
    # (B, T, H_kv, D, block, topk, init, local_blocks, cu_seqlens)
    (1, 1, 1, 32, 16, 4, 0, 1, None),
    (1, 63, 2, 32, 16, 2, 0, 1, None),
    (1, 127, 3, 32, 32, 16, 0, 1, None),      # topk covers every block (dense)
    (1, 129, 4, 64, 16, 5, 1, 2, None),       # init + trailing forcing
    (2, 300, 2, 32, 32, 6, 2, 3, None),       # B > 1
    (1, 300, 1, 32, 64, 3, 0, 1, None),
    (1, 300, 3, 32, 16, 8, 1, 1, [0, 17, 150, 151, 300]),   # packed, partial blocks side by side
    (1, 200, 4, 32, 32, 4, 0, 2, [0, 33, 63, 64, 129, 200]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}bs{c[4]}k{c[5]}i{c[6]}l{c[7]}"
                         + ("cu" if c[8] else ""))
def test_select_blocks_matches_reference(case):
    bsz, t, h, d, bs, topk, ib, lb, cu = case
    g = torch.Generator().manual_seed(t * 7 + h)
    q = torch.randn(bsz, t, h, d, generator=g).to(DEV)
    k = torch.randn(bsz, t, d, generator=g).to(DEV)
    cs = torch.tensor(cu, dtype=torch.int32, device=DEV) if cu else None
    kw = dict(block_size=bs, topk=topk, init_blocks=ib, local_blocks=lb, scale=d ** -0.5, cu_seqlens=cs)
    got = msa.select_blocks(q, k, backend="triton", **kw)
    ref = select_blocks_reference(q, k, **kw)
    check_selection(got, ref, q, k, tol=1e-5, cu=cu, **{x: kw[x] for x in ("block_size", "topk", "init_blocks",
                                                                           "local_blocks", "scale")})


def test_chunking_small_tiles_and_splits():
    """A tiny budget forces many query chunks; 32-row tiles with H=3 give 10-token tiles that straddle
    block boundaries; nsplit=3 interleaves key blocks over programs; a large negative scale flips order."""
    g = torch.Generator().manual_seed(1)
    t, h, d, bs, topk = 211, 3, 32, 16, 6
    q = torch.randn(1, t, h, d, generator=g).to(DEV)
    k = torch.randn(1, t, d, generator=g).to(DEV)
    cu = [0, 100, 211]
    cs = torch.tensor(cu, dtype=torch.int32, device=DEV)
    for scale in (0.3, -1.0):
        kw = dict(block_size=bs, topk=topk, init_blocks=1, local_blocks=1, scale=scale, cu_seqlens=cs)
        got = select_blocks_triton(q, k, budget_bytes=4096, rows=32, nsplit=3, **kw)
        ref = select_blocks_reference(q, k, **kw)
        check_selection(got, ref, q, k, tol=1e-5, cu=cu, block_size=bs, topk=topk, init_blocks=1, local_blocks=1,
                        scale=scale)


def test_layout_plan_is_reused_only_for_the_same_layout():
    """The host-side plan (tiles, chunks, positions) is cached per layout: the same total length packed
    three ways, then the first layout again, each matches the reference, and a repeated layout reuses
    its plan instead of building a new one."""
    g = torch.Generator().manual_seed(5)
    t, h, d, bs, topk = 160, 2, 32, 16, 4
    q = torch.randn(1, t, h, d, generator=g).to(DEV)
    k = torch.randn(1, t, d, generator=g).to(DEV)
    IMPL._PLAN_CACHE.clear()
    layouts = [None, [0, 40, 160], [0, 100, 101, 160], None]
    for cu in layouts:
        cs = torch.tensor(cu, dtype=torch.int32, device=DEV) if cu else None
        kw = dict(block_size=bs, topk=topk, init_blocks=0, local_blocks=1, scale=d ** -0.5, cu_seqlens=cs)
        got = select_blocks_triton(q, k, **kw)
        check_selection(got, select_blocks_reference(q, k, **kw), q, k, tol=1e-5, cu=cu, block_size=bs,
                        topk=topk, init_blocks=0, local_blocks=1, scale=d ** -0.5)
    assert len(IMPL._PLAN_CACHE) == 3


def test_block_size_not_power_of_two_and_large_topk():
    """block 24 (masked sub-tile), topk 64 > visible blocks: every visible block selected."""
    g = torch.Generator().manual_seed(2)
    t, h, d, bs, topk = 150, 2, 32, 24, 64
    q = torch.randn(1, t, h, d, generator=g).to(DEV)
    k = torch.randn(1, t, d, generator=g).to(DEV)
    kw = dict(block_size=bs, topk=topk, init_blocks=0, local_blocks=1, scale=d ** -0.5, cu_seqlens=None)
    got = select_blocks_triton(q, k, **kw)
    ref = select_blocks_reference(q, k, **kw)
    check_selection(got, ref, q, k, tol=1e-5, cu=None, **{x: kw[x] for x in ("block_size", "topk", "init_blocks",
                                                                            "local_blocks", "scale")})


@pytest.mark.parametrize("d,bs", [(32, 16), (128, 32)])
def test_block_scores_kernel(d, bs):
    """The first stage alone: fused causal block max vs block_scores_reference (fp32, atol/rtol 1e-5)."""
    g = torch.Generator().manual_seed(d)
    t, h = 97, 2
    q = torch.randn(t, h, d, generator=g).to(DEV)
    k = torch.randn(t, d, generator=g).to(DEV)
    got = block_scores_triton(q, k, block_size=bs, scale=0.25, rows=32, nsplit=2)
    ref = block_scores_reference(q, k, 0, bs, 0.25)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)


def test_bf16_inputs():
    """bf16 inputs (upcast after load): score multisets within 2e-2 of the fp32 reference on bf16 data."""
    g = torch.Generator().manual_seed(3)
    t, h, d, bs, topk = 130, 2, 64, 16, 4
    q = torch.randn(1, t, h, d, generator=g).to(DEV).bfloat16()
    k = torch.randn(1, t, d, generator=g).to(DEV).bfloat16()
    kw = dict(block_size=bs, topk=topk, init_blocks=0, local_blocks=1, scale=d ** -0.5, cu_seqlens=None)
    got = select_blocks_triton(q, k, **kw)
    ref = select_blocks_reference(q, k, **kw)
    check_selection(got, ref, q, k, tol=2e-2, cu=None, **{x: kw[x] for x in ("block_size", "topk", "init_blocks",
                                                                             "local_blocks", "scale")})


def test_checker_can_fail():
    """The checker rejects a selection that moves the local block out of the last slot."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 70, 1, 32, generator=g)
    k = torch.randn(1, 70, 32, generator=g)
    kw = dict(block_size=16, topk=3, init_blocks=0, local_blocks=1, scale=0.2, cu_seqlens=None)
    ref = select_blocks_reference(q, k, **kw)
    bad = ref.flip(-1).contiguous()
    with pytest.raises(AssertionError):
        check_selection(bad, ref, q, k, tol=1e-5, cu=None, block_size=16, topk=3, init_blocks=0, local_blocks=1,
                        scale=0.2)


# Score-kernel variants (register-buffered stores, persistent grid, sub-tiled blocks, large tiles).
# (rows, nsplit, tune): with H=3 a 32-row tile holds 10 tokens (tiles start off block boundaries);
# nbuf 4 over ~20 blocks leaves partial buffers at the end of rows; nsplit 3 makes the buffered columns
# strided; block_n 16 < block 32 gives 2 sub-tiles per block; persist 1 loops 4 programs (CPU n_SM = 4)
# over all work items.
SCORE_VARIANTS = [
    (32, 1, dict(nbuf=4)),
    (32, 3, dict(nbuf=4)),
    (64, 2, dict(nbuf=8, block_n=16)),
    (32, 1, dict(nbuf=2, persist=1)),
    (64, 3, dict(nbuf=4, persist=2, block_n=16)),
    (128, None, dict(nbuf=16)),
    (64, 2, dict(nbuf=8, block_n=16, max_registers=128)),  # maxnreg: plumbing here, registers on the GPU
]


@pytest.mark.parametrize("variant", SCORE_VARIANTS, ids=lambda v: f"r{v[0]}s{v[1]}" + "".join(
    f"_{a}{b}" for a, b in v[2].items()))
@pytest.mark.parametrize("scale", [0.25, -0.5])
def test_block_scores_variants(variant, scale):
    """Every score-kernel variant equals block_scores_reference (fp32, rtol/atol 1e-5); unwritten
    entries would stay +inf (poisoned buffer) and fail. T=331 with block 32: 11 blocks, 10 full blocks
    before the last tile; negative scale takes the scale-before-max path."""
    rows, nsplit, tune = variant
    g = torch.Generator().manual_seed(rows + (nsplit or 0))
    t, h, d, bs = 331, 3, 32, 32
    q = torch.randn(t, h, d, generator=g).to(DEV)
    k = torch.randn(t, d, generator=g).to(DEV)
    got = block_scores_triton(q, k, block_size=bs, scale=scale, rows=rows, nsplit=nsplit, **tune)
    ref = block_scores_reference(q, k, 0, bs, scale)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", SCORE_VARIANTS[1:5], ids=lambda v: f"r{v[0]}s{v[1]}" + "".join(
    f"_{a}{b}" for a, b in v[2].items()))
def test_select_blocks_variants_packed(variant):
    """Full pipeline with kernel variants on packed sequences (partial blocks side by side), forcing and
    a small budget (several chunks): sets or score multisets equal the reference (1e-5)."""
    rows, nsplit, tune = variant
    g = torch.Generator().manual_seed(11)
    t, h, d, bs, topk = 300, 2, 32, 16, 5
    q = torch.randn(1, t, h, d, generator=g).to(DEV)
    k = torch.randn(1, t, d, generator=g).to(DEV)
    cu = [0, 37, 38, 200, 300]
    cs = torch.tensor(cu, dtype=torch.int32, device=DEV)
    kw = dict(block_size=bs, topk=topk, init_blocks=1, local_blocks=2, scale=d ** -0.5, cu_seqlens=cs)
    got = select_blocks_triton(q, k, budget_bytes=8192, rows=rows, nsplit=nsplit, **tune, **kw)
    ref = select_blocks_reference(q, k, **kw)
    check_selection(got, ref, q, k, tol=1e-5, cu=cu, **{x: kw[x] for x in ("block_size", "topk", "init_blocks",
                                                                           "local_blocks", "scale")})


def test_score_config_defaults_fit_shared_memory(monkeypatch):
    """Resolved GPU defaults stay within SMEM_LIMIT for the paper shape and for a wide head (d_idx 256);
    up to d_idx 128 the e4m3 defaults leave room for two programs per SM (their point: one program's
    epilogue under the other's MMA)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # score_config only reads it (GPU defaults)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for dim in (64, 128, 256):
            q = torch.empty(1, 4, dim, dtype=dtype)
            cfg = IMPL.score_config(q, 4, dim, 128)
            smem = IMPL.score_smem_bytes(cfg["rows"], cfg["block_n"], cfg["block_d"], q.element_size(),
                                         cfg["num_stages"])
            programs = 2 if q.element_size() == 1 and dim <= 128 else 1
            assert programs * smem <= IMPL.SMEM_LIMIT, (dtype, dim, cfg)
    cfg = IMPL.score_config(torch.empty(1, 4, 128, dtype=torch.float8_e4m3fn), 4, 128, 128)
    assert (cfg["rows"], cfg["num_warps"]) == (128, 4), cfg


def test_score_config_rejects_bad_register_cap():
    q = torch.empty(1, 4, 64, dtype=torch.bfloat16)
    assert IMPL.score_config(q, 4, 64, 128, max_registers=128)["max_registers"] == 128
    for bad in (8, 256, 128.0, True):
        with pytest.raises(ValueError, match="max_registers"):
            IMPL.score_config(q, 4, 64, 128, max_registers=bad)


def test_score_config_default_register_cap_scope(monkeypatch):
    """A default register cap (SCORE_DEFAULTS["max_registers"]) applies on the GPU up to D_idx 128, where it
    was measured; a wider head and the interpreter keep the compiler's choice, and an explicit cap wins."""
    q = torch.empty(1, 4, 128, dtype=torch.bfloat16)
    monkeypatch.setitem(IMPL.SCORE_DEFAULTS, "max_registers", 96)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # score_config only reads it
    assert IMPL.score_config(q, 4, 128, 128)["max_registers"] is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert IMPL.score_config(q, 4, 128, 128)["max_registers"] == 96
    assert IMPL.score_config(q, 4, 128, 128, max_registers=200)["max_registers"] == 200
    assert IMPL.score_config(torch.empty(1, 4, 256, dtype=torch.bfloat16), 4, 256, 128)["max_registers"] is None


def test_score_config_pads_fp8_contraction_to_32(monkeypatch):
    """An fp8 MMA needs K >= 32 on the GPU (the interpreter accepts less): D_idx 16 in e4m3 must be
    padded (the loads mask the pad); 16-bit inputs keep 16."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dim, dtype, want in ((16, torch.float8_e4m3fn, 32), (24, torch.float8_e4m3fn, 32),
                             (64, torch.float8_e4m3fn, 64), (16, torch.bfloat16, 16)):
        q = torch.empty(1, 4, dim, dtype=dtype)
        assert IMPL.score_config(q, 4, dim, 128)["block_d"] == want, (dim, dtype)


# fp8 index scores: q_idx per (token, group) (msa.cache.quantize_fp8) and k_idx per key block
# (msa.cache.quantize_fp8_key_blocks) in float8_e4m3fn,
# the GEMM in fp8 with fp32 accumulation. The reference scores the dequantised copies in fp32, so the
# Triton selection must match it exactly up to near-ties (tolerance 1e-4: fp32 sums of exact fp8
# products in another order; on the GPU 2e-2, the wgmma fp8 accumulator keeps fewer mantissa bits).
FP8_TOL = 1e-4 if DEV == "cpu" else 2e-2


def _dequantised(q, k, block_size, cu=None):
    """q (B, T, H, D) / k (B, T, D) or q (T, H, D) / k (T, D) through the fp8 codecs select_blocks uses:
    per (token, group) for q, per key block of each sequence (offsets cu, else the rows) for k."""
    from msa.cache.fp8 import dequantize_fp8, quantize_fp8, quantize_fp8_key_blocks
    t, d = k.shape[-2], k.shape[-1]
    n = k.numel() // d
    kd = dequantize_fp8(*quantize_fp8_key_blocks(k.reshape(n, d), cu or range(0, n + 1, t), block_size))
    return dequantize_fp8(*quantize_fp8(q)), kd.view(k.shape)


@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[7]], ids=["init-trailing", "packed", "packed2"])
def test_fp8_scores_match_reference_on_dequantised_inputs(case):
    bsz, t, h, d, bs, topk, ib, lb, cu = case
    g = torch.Generator().manual_seed(t + 5)
    q = (torch.randn(bsz, t, h, d, generator=g) * torch.rand(bsz, t, h, 1, generator=g) * 4).to(DEV)
    k = (torch.randn(bsz, t, d, generator=g) * torch.rand(bsz, t, 1, generator=g) * 4).to(DEV)  # per-token scales differ
    cs = torch.tensor(cu, dtype=torch.int32, device=DEV) if cu else None
    kw = dict(block_size=bs, topk=topk, init_blocks=ib, local_blocks=lb, scale=d ** -0.5, cu_seqlens=cs)
    got = msa.select_blocks(q, k, backend="triton", fp8_scores=True, fp8_rescore_blocks=0, **kw)
    ref = msa.select_blocks(q, k, backend="reference", fp8_scores=True, fp8_rescore_blocks=0, **kw)
    qd, kd = _dequantised(q, k, bs, cu)
    check_selection(got, ref, qd, kd, tol=FP8_TOL, cu=cu, **{x: kw[x] for x in ("block_size", "topk", "init_blocks",
                                                                                "local_blocks", "scale")})
    if case is CASES[6]:  # long enough rows for the quantisation to move some selection
        plain = select_blocks_reference(q, k, **kw)
        assert not torch.equal(ref, plain), "fp8 scores changed no selection: the option did nothing"


@pytest.mark.parametrize("scale", [0.25, -0.5])
def test_fp8_block_scores_kernel(scale):
    """The fp8 score stage alone against block_scores_reference of the dequantised inputs; and its
    distance from the unquantised scores is the e4m3 rounding (relative 2^-4 per entry at most)."""
    g = torch.Generator().manual_seed(11)
    t, h, d, bs = 150, 2, 64, 16
    q = torch.randn(t, h, d, generator=g).to(DEV)
    k = (torch.randn(t, d, generator=g) * torch.linspace(0.1, 10, t).view(t, 1)).to(DEV)
    got = block_scores_triton(q, k, block_size=bs, scale=scale, rows=32, nsplit=2, fp8_scores=True)
    qd, kd = _dequantised(q, k, bs)
    ref = block_scores_reference(qd, kd, 0, bs, scale).float()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    torch.testing.assert_close(got[fin], ref[fin], rtol=FP8_TOL, atol=FP8_TOL)
    exact = block_scores_reference(q, k, 0, bs, scale).float()
    err = (got[fin] - exact[fin]).abs() / (q.norm(dim=-1).max() * k.norm(dim=-1).max() * abs(scale))
    assert 0 < float(err.max()) < 2 ** -3


def _recall(ref, got):
    from msa.bench.selections import selection_recall
    return selection_recall(ref.cpu(), got.cpu())


@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[7]], ids=["init-trailing", "packed", "packed2"])
def test_fp8_rescored_selection_matches_reference(case):
    """fp8 candidates (topk + 3), then their exact scores: Triton against the reference, compared by the
    exact scores (near-ties allowed as everywhere here); and the rescoring brings the selection back to
    the exact one where fp8 alone moved it."""
    bsz, t, h, d, bs, topk, ib, lb, cu = case
    g = torch.Generator().manual_seed(t + 6)
    q = (torch.randn(bsz, t, h, d, generator=g) * torch.rand(bsz, t, h, 1, generator=g) * 4).to(DEV)
    k = (torch.randn(bsz, t, d, generator=g) * torch.rand(bsz, t, 1, generator=g) * 4).to(DEV)
    cs = torch.tensor(cu, dtype=torch.int32, device=DEV) if cu else None
    kw = dict(block_size=bs, topk=topk, init_blocks=ib, local_blocks=lb, scale=d ** -0.5, cu_seqlens=cs)
    got = msa.select_blocks(q, k, backend="triton", fp8_scores=True, fp8_rescore_blocks=3, **kw)
    ref = msa.select_blocks(q, k, backend="reference", fp8_scores=True, fp8_rescore_blocks=3, **kw)
    check_selection(got, ref, q, k, tol=1e-5 if DEV == "cpu" else 2e-2, cu=cu,
                    **{x: kw[x] for x in ("block_size", "topk", "init_blocks", "local_blocks", "scale")})
    exact = select_blocks_reference(q, k, **kw)
    fp8_only = msa.select_blocks(q, k, backend="triton", fp8_scores=True, fp8_rescore_blocks=0, **kw)
    if case is CASES[6]:
        assert _recall(exact, fp8_only) < 1.0, "fp8 moved no selection: the case tests nothing"
    assert _recall(exact, got) >= _recall(exact, fp8_only) and _recall(exact, got) > 0.99


def test_fp8_rescoring_all_blocks_is_the_exact_selection():
    """With candidates that hold every visible block (topk + extra >= blocks) the rescored selection is
    the exact one (by exact scores, up to near-ties), on both backends."""
    t, h, d, bs, topk = 150, 2, 32, 16, 3   # 10 blocks
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, t, h, d, generator=g) * torch.rand(1, t, h, 1, generator=g) * 4).to(DEV)
    k = (torch.randn(1, t, d, generator=g) * torch.rand(1, t, 1, generator=g) * 4).to(DEV)
    kw = dict(block_size=bs, topk=topk, init_blocks=0, local_blocks=1, scale=d ** -0.5, cu_seqlens=None)
    exact = select_blocks_reference(q, k, **kw)
    for backend in ("triton", "reference"):
        got = msa.select_blocks(q, k, backend=backend, fp8_scores=True, fp8_rescore_blocks=7, **kw)
        check_selection(got, exact, q, k, tol=1e-5 if DEV == "cpu" else 2e-2, cu=None,
                        **{x: kw[x] for x in ("block_size", "topk", "init_blocks", "local_blocks", "scale")})


def test_fp8_rescoring_of_strided_inputs_and_chunks():
    """q_idx / k_idx as views of one fused projection (rows not contiguous) and a small score budget
    (several chunks) select exactly what contiguous inputs in one chunk select."""
    t, h, d, bs = 200, 3, 32, 16
    g = torch.Generator().manual_seed(9)
    fused = (torch.randn(1, t, h * d + d + 7, generator=g) * 3).to(DEV)
    q, k = fused[..., : h * d].view(1, t, h, d), fused[..., h * d: h * d + d]
    assert not q.is_contiguous() and not k.is_contiguous()
    kw = dict(block_size=bs, topk=4, init_blocks=1, local_blocks=1, scale=d ** -0.5, cu_seqlens=None,
              fp8_scores=True, fp8_rescore_blocks=2)
    want = select_blocks_triton(q.contiguous(), k.contiguous(), **kw)
    got = select_blocks_triton(q, k, budget_bytes=h * 13 * 4 * 64, **kw)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_fp8_scores_argument_checked():
    q, k = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="fp8_scores"):
        msa.select_blocks(q, k, block_size=4, topk=2, fp8_scores="yes")
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="fp8_rescore_blocks must be an int >= 0"):
            msa.select_blocks(q, k, block_size=4, topk=2, fp8_scores=True, fp8_rescore_blocks=bad)
