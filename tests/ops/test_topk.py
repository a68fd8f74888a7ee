"""Exp-free block top-k (msa.ops.topk.block_topk) against torch.topk / the reference.

Runs under TRITON_INTERPRET=1 on the CPU (small shapes) and on CUDA when present. Values are compared
exactly (sorted selected values vs torch.topk's), indices must point at those values, -1 padding only
after the valid prefix; fresh outputs are poisoned with -7 to expose unwritten entries.
"""

import os


import pytest  # noqa: E402
import torch  # noqa: E402

from msa.ops.select_blocks.reference import select_from_scores  # noqa: E402
from msa.ops.topk import block_topk, block_topk_reference  # noqa: E402
from msa.ops.topk.triton_kernels import launch_block_topk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
POISON = -7


def run(x, topk, **kw):
    out = torch.full((x.shape[0], topk), POISON, dtype=torch.int32, device=x.device)
    launch_block_topk(x, out, topk, **kw)
    assert not (out == POISON).any(), "unwritten output entries"
    return out


def check_against_torch(x, ids, topk):
    r, n = x.shape
    finite = (x > float("-inf")).sum(-1)
    nvalid = torch.clamp(finite, max=topk)
    slot = torch.arange(topk, device=x.device)
    valid = slot.view(1, -1) < nvalid.view(-1, 1)
    assert torch.equal(ids >= 0, valid), "-1 must appear exactly after the valid prefix"
    assert ((ids == -1) | valid).all()
    safe = ids.clamp(min=0).long()
    got = torch.where(valid, x.gather(-1, safe), torch.full(valid.shape, float("-inf"), device=x.device))
    srt = ids.sort(-1).values
    assert not ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(), "duplicate column"
    ref = torch.topk(x, min(topk, n), dim=-1).values
    if topk > n:
        ref = torch.cat([ref, ref.new_full((r, topk - n), float("-inf"))], -1)
    ref = torch.where(valid, ref, torch.full_like(ref, float("-inf")))
    # exact: selection only moves values around, no arithmetic
    assert torch.equal(got.sort(-1, descending=True).values, ref.sort(-1, descending=True).values)
    # by descending value
    gv = torch.where(valid, got, torch.full_like(got, float("-inf")))
    assert (gv[:, :-1] >= gv[:, 1:]).all()


@pytest.mark.parametrize("r,n,k", [(5, 1, 1), (7, 7, 3), (9, 100, 16), (3, 1024, 16), (2, 5, 8), (4, 300, 33),
                                   (6, 2048, 64), (3, 257, 1)])
def test_block_topk_random(r, n, k):
    g = torch.Generator().manual_seed(r * n + k)
    x = torch.randn(r, n, generator=g).to(DEV)
    x[0, ::3] = float("-inf")  # fewer finite entries than k in short rows
    if r > 2:
        x[2] = float("-inf")
    ids = block_topk(x, k, backend="triton")
    assert ids.dtype == torch.int32 and ids.shape == (r, k)
    check_against_torch(x, ids, k)
    assert torch.equal(ids, block_topk_reference(x, k))  # ties go to the smaller column in both


def test_block_topk_ties_inf_and_negatives():
    """Heavy ties (few distinct values), +inf entries and negative values; index order is exact."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 3, (8, 200), generator=g).float().to(DEV)
    x[1, 10:20] = float("inf")
    x[3] = -torch.rand(200, generator=g).to(DEV) - 1e-30
    x[4, 5] = float("nan")  # NaN is never selected
    ids = block_topk(x, 16, backend="triton")
    x_ref = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    check_against_torch(x_ref, ids, 16)
    assert torch.equal(ids, block_topk_reference(x, 16))


@pytest.mark.parametrize("max_tile,seg", [(64, None), (16, 4), (32, 1)])
def test_two_stage_and_configs(max_tile, seg):
    """Wide rows through packed per-tile candidates (small max_tile), and explicit segment sizes."""
    g = torch.Generator().manual_seed(max_tile)
    x = torch.randn(6, 700, generator=g).to(DEV)
    x[:, ::5] = x[:, 1::5]  # ties across tiles
    x[2, 100:] = float("-inf")
    ids = run(x, 12, max_tile=max_tile, seg=seg)
    check_against_torch(x, ids, 12)
    assert torch.equal(ids, block_topk_reference(x, 12))


@pytest.mark.parametrize("max_tile", [8192, 8])
def test_convention_mode_matches_select_from_scores(max_tile):
    """The Index Branch mode (forcing, causal exclusion, local block last) incl. the two-stage path."""
    g = torch.Generator().manual_seed(max_tile)
    t, h, bs, topk, ib, lb = 201, 2, 4, 6, 1, 2  # 51 blocks > 4 * pow2(k): two stages at max_tile 8
    nb = (t + bs - 1) // bs
    m = torch.randn(t, h, nb, generator=g).to(DEV)
    pos = torch.arange(t, device=DEV)
    local = pos // bs
    m = m.masked_fill(torch.arange(nb, device=DEV).view(1, 1, -1) > local.view(-1, 1, 1), float("nan"))
    out = torch.full((t * h, topk), POISON, dtype=torch.int32, device=DEV)
    launch_block_topk(m.view(t * h, nb), out, topk, pos=pos.to(torch.int32), heads=h, block_size=bs,
                      init_blocks=ib, local_blocks=lb, convention=True, max_tile=max_tile)
    ref = select_from_scores(m.nan_to_num(0.0), pos, bs, topk, ib, lb)
    out = out.view(t, h, topk)
    assert torch.equal(out.sort(-1).values, ref.sort(-1).values)
    nvalid = torch.clamp(local + 1, max=topk)
    last = out.long().gather(-1, (nvalid - 1).view(-1, 1, 1).expand(t, h, 1)).squeeze(-1)
    assert torch.equal(last, local.view(-1, 1).expand(t, h))


@pytest.mark.parametrize("n,k,rows,seg,nw", [(1024, 16, 2, 8, 4), (300, 33, 4, 4, 4), (1024, 16, 4, 8, 4),
                                             (1024, 16, 1, 8, 2), (1024, 16, 8, 8, 8), (2048, 32, 2, 8, 4)])
def test_gpu_layouts(n, k, rows, seg, nw):
    """The launch configs that failed on the H200 with the old int64-packed keys ([2,128] and [4,128]
    rows x segments, 4 warps) plus the sweep's configs. Values rise with the column, so the answer is the
    LAST k columns: a reduction that only looked at the low word (column) would pick the first ones."""
    r = 6
    g = torch.Generator().manual_seed(n + k)
    x = (torch.arange(n).float().view(1, -1) + 0.5 * torch.rand(r, n, generator=g)).to(DEV)
    x[1] = -x[1]  # negative keys: the answer is the FIRST k columns
    x[2, ::2] = float("-inf")
    x[3] = x[3].round()  # ties between neighbours
    ids = run(x, k, rows=rows, seg=seg, num_warps=nw)
    check_against_torch(x, ids, k)
    assert torch.equal(ids, block_topk_reference(x, k))


def test_validation_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="scores"):
        block_topk(x.double(), 2)
    with pytest.raises(ValueError, match="scores"):
        block_topk(x[0], 2)
    with pytest.raises(ValueError, match="topk"):
        block_topk(x, 0)
    with pytest.raises(ValueError, match="topk"):
        block_topk(x, 2.5)
    with pytest.raises(ValueError, match="backend"):
        block_topk(x, 2, backend="cuda")


def test_checker_can_fail():
    x = torch.randn(3, 50)
    ids = block_topk_reference(x, 4)
    with pytest.raises(AssertionError):
        check_against_torch(x, ids.flip(-1).contiguous().roll(1, 0), 4)
