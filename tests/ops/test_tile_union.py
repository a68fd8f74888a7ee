"""The tile union (msa.ops.utils.tile_union) against its few lines of PyTorch, on packed sequences
with short last blocks, padded (-1) slots and tiles of 1, 5 and 32 tokens, in both token orders; the
greedy order against its definition."""

import os

import pytest
import torch

from msa.ops.select_blocks.reference import select_blocks_reference
from msa.ops.utils.reverse_index import block_layout
from msa.ops.utils import tile_union
from msa.ops.utils.tile_union import MAX_TILE_TOKENS, build_tile_union, tile_order, tile_tokens_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"


def greedy_order(sel, tt):
    """The greedy order of one query block from its definition (sel: one id set per token)."""
    left, perm = list(range(len(sel))), []
    while left:
        tile = [left.pop(0)]
        union = set(sel[tile[0]])
        while len(tile) < tt and left:
            j = min(left, key=lambda i: len(sel[i] - union))
            left.remove(j)
            tile.append(j)
            union |= sel[j]
        perm += tile
    return perm


def naive(bi, layout, tt, subs, order):
    """{(tile, r): [(id, bits), ...]} straight from the definition."""
    out = {}
    starts, lens = layout.block_start.tolist(), layout.block_len.tolist()
    flat = bi.reshape(-1, bi.shape[2], bi.shape[3]).cpu()
    for tile in range(len(starts) * subs):
        gb, t0 = divmod(tile, subs)
        t0 *= tt
        for r in range(bi.shape[2]):
            perm = list(range(lens[gb]))
            if order == "greedy":
                perm = greedy_order([{int(b) for b in flat[starts[gb] + i, r] if b >= 0} for i in perm], tt)
            toks = [starts[gb] + perm[t0 + i] for i in range(tt) if t0 + i < lens[gb]]
            ids = sorted({int(b) for tok in toks for b in flat[tok, r] if b >= 0})
            out[tile, r] = [(b, sum(1 << i for i, tok in enumerate(toks) if b in flat[tok, r].tolist())) for b in ids]
    return out


@pytest.mark.parametrize("order", ["consecutive", "greedy"])
@pytest.mark.parametrize("tt", [1, 5, MAX_TILE_TOKENS])
def test_tile_union_matches_definition(tt, order):
    lengths = [70, 1, 90]
    cu = torch.tensor([0, 70, 71, 161], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(tt)
    qi = torch.randn(1, 161, 2, 8, generator=gen).to(DEVICE)
    ki = torch.randn(1, 161, 8, generator=gen).to(DEVICE)
    bi = select_blocks_reference(qi, ki, block_size=16, topk=3, init_blocks=0, local_blocks=1, scale=0.3, cu_seqlens=cu)
    bi[0, 5:9, 1] = -1  # padded rows select nothing
    layout = block_layout(1, sum(lengths), 16, cu, DEVICE)
    tu = build_tile_union(bi, layout, 16, tt, order)
    want = naive(bi, layout, tt, tu.subs, order)
    assert tu.subs == -(-16 // tt)
    for gb, n in enumerate(layout.block_len.tolist()):  # every order is a permutation of the block
        assert sorted(tu.perm[gb, :, :n].flatten().tolist()) == sorted(list(range(n)) * bi.shape[2])
    for (tile, r), pairs in want.items():
        n = int(tu.count[tile, r])
        assert n == len(pairs)
        got = list(zip(tu.ids[tile, r, :n].tolist(), tu.bits[tile, r, :n].tolist()))
        assert got == pairs, (tile, r)


def test_greedy_order_matches_definition_and_shrinks_the_union():
    """Two groups of tokens that alternate in sequence order (even tokens pick blocks {0, 1, 2, own},
    odd ones {3, 4, 5, own}): the greedy order puts each group in its own tiles, as its definition
    does, and halves the union the consecutive tiles walk."""
    bs, tt, nblk = 16, 4, 8
    t = nblk * bs
    bi = torch.full((1, t, 1, 4), -1, dtype=torch.int32)
    last = torch.arange(t) // bs
    for i in range(bs * 6, t):  # the last two query blocks see blocks 0..5
        bi[0, i, 0] = torch.tensor([0, 1, 2, int(last[i])] if i % 2 == 0 else [3, 4, 5, int(last[i])])
    bi[0, : bs * 6, 0, 0] = last[: bs * 6]
    bi = bi.to(DEVICE)
    layout = block_layout(1, t, bs, None, DEVICE)
    cons = build_tile_union(bi, layout, bs, tt, "consecutive")
    greedy = build_tile_union(bi, layout, bs, tt, "greedy")
    flat = bi[0, :, 0].cpu()
    for gb in (6, 7):
        sel = [{int(b) for b in flat[gb * bs + i] if b >= 0} for i in range(bs)]
        # each tile starts at the first token left, then takes that token's group
        assert greedy.perm[gb, 0].tolist() == greedy_order(sel, tt) == [0, 2, 4, 6, 1, 3, 5, 7,
                                                                         8, 10, 12, 14, 9, 11, 13, 15]
        tiles = slice(gb * greedy.subs, (gb + 1) * greedy.subs)
        assert cons.count[tiles, 0].tolist() == [7] * 4 and greedy.count[tiles, 0].tolist() == [4] * 4
    with pytest.raises(ValueError, match="order must be one of"):
        build_tile_union(bi, layout, bs, tt, "sorted")
    with pytest.raises(ValueError, match="order must be one of"):
        tile_order(bi, layout, bs, tt, "sorted")


@pytest.mark.parametrize("path", ["bit sets", "id compares"])
@pytest.mark.parametrize("cu", [None, [0, 5, 300, 301, 700], "batch of 2"])
def test_greedy_order_over_many_blocks(monkeypatch, cu, path):
    """Sequences of up to 88 blocks of 8 (selection bit sets of several words), alone, packed with a
    one-token sequence and short last blocks, or two in a batch (bit sets sized by one sequence's
    blocks): every block's greedy order equals its definition, on both of the kernel's paths (bit
    sets up to ORDER_MAX_WORDS * 32 blocks per sequence, id compares above)."""
    if path == "id compares":
        monkeypatch.setattr(tile_union, "ORDER_MAX_WORDS", 0)
    bs, tt, t, b = 8, 3, 700, 1
    if cu == "batch of 2":
        b, t, cu = 2, 350, None
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(7)
    qi = torch.randn(b, t, 2, 8, generator=gen).to(DEVICE)
    ki = torch.randn(b, t, 8, generator=gen).to(DEVICE)
    bi = select_blocks_reference(qi, ki, block_size=bs, topk=6, init_blocks=1, local_blocks=1, scale=0.3,
                                 cu_seqlens=cu_t)
    layout = block_layout(b, t, bs, cu_t, DEVICE)
    perm = tile_order(bi, layout, bs, tt, "greedy")  # the order alone: the union kernel is tested above
    flat = bi.reshape(b * t, 2, 6).cpu()
    for gb, (start, n) in enumerate(zip(layout.block_start.tolist(), layout.block_len.tolist())):
        for r in range(2):
            sel = [{int(b) for b in flat[start + i, r] if b >= 0} for i in range(n)]
            assert perm[gb, r, :n].tolist() == greedy_order(sel, tt), (gb, r)


def test_tile_tokens_and_bad_size():
    assert tile_tokens_for(16, 128, 128) == 8 and tile_tokens_for(1, 128, 128) == MAX_TILE_TOKENS
    assert tile_tokens_for(64, 64, 128) == 1 and tile_tokens_for(3, 64, 16) == 16
    with pytest.raises(ValueError, match="tile_tokens"):
        build_tile_union(torch.zeros(1, 4, 1, 1, dtype=torch.int32), block_layout(1, 4, 4, None, "cpu"), 4, 33)
    with pytest.raises(ValueError, match="tile_tokens"):
        tile_order(torch.zeros(1, 4, 1, 1, dtype=torch.int32), block_layout(1, 4, 4, None, "cpu"), 4, 0, "greedy")


@pytest.mark.parametrize("order", ["consecutive", "greedy"])
def test_plan_mean_tile_union_matches_definition(order):
    """SelectionPlan.mean_tile_union (what the forward's kernel choice reads) is the mean list length
    over the non-empty (tile, group) pairs of the definition, on packed sequences with short blocks and
    a padded row; cached after the first call."""
    from msa.ops.utils.reverse_index import SelectionPlan
    cu = torch.tensor([0, 70, 71, 161], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    qi = torch.randn(1, 161, 2, 8, generator=gen).to(DEVICE)
    ki = torch.randn(1, 161, 8, generator=gen).to(DEVICE)
    bi = select_blocks_reference(qi, ki, block_size=16, topk=3, init_blocks=0, local_blocks=1, scale=0.3, cu_seqlens=cu)
    bi[0, 5:9, 1] = -1
    plan = SelectionPlan(bi, 16, cu, 161, 64)
    want = [len(p) for p in naive(bi, plan.layout, 5, -(-16 // 5), order).values() if p]
    got = plan.mean_tile_union(5, order)
    assert got == pytest.approx(sum(want) / len(want), rel=1e-12)
    plan.tile_union(5, order).count.zero_()  # a cached value ignores the (now emptied) union
    assert plan.mean_tile_union(5, order) == got
