"""The tile union (msa.ops.utils.tile_union) against its few lines of PyTorch, on packed sequences
with short last blocks, padded (-1) slots and tiles of 1, 5 and 32 tokens."""

import os

import pytest
import torch

from msa.ops.select_blocks.reference import select_blocks_reference
from msa.ops.utils.reverse_index import block_layout
from msa.ops.utils.tile_union import MAX_TILE_TOKENS, build_tile_union, tile_tokens_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"


def naive(bi, layout, tt, subs):
    """{(tile, r): [(id, bits), ...]} straight from the definition."""
    out = {}
    starts, lens = layout.block_start.tolist(), layout.block_len.tolist()
    flat = bi.reshape(-1, bi.shape[2], bi.shape[3]).cpu()
    for tile in range(len(starts) * subs):
        gb, t0 = divmod(tile, subs)
        t0 *= tt
        toks = [starts[gb] + t0 + i for i in range(tt) if t0 + i < lens[gb]]
        for r in range(bi.shape[2]):
            ids = sorted({int(b) for tok in toks for b in flat[tok, r] if b >= 0})
            out[tile, r] = [(b, sum(1 << i for i, tok in enumerate(toks) if b in flat[tok, r].tolist())) for b in ids]
    return out


@pytest.mark.parametrize("tt", [1, 5, MAX_TILE_TOKENS])
def test_tile_union_matches_definition(tt):
    lengths = [70, 1, 90]
    cu = torch.tensor([0, 70, 71, 161], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(tt)
    qi = torch.randn(1, 161, 2, 8, generator=gen).to(DEVICE)
    ki = torch.randn(1, 161, 8, generator=gen).to(DEVICE)
    bi = select_blocks_reference(qi, ki, block_size=16, topk=3, init_blocks=0, local_blocks=1, scale=0.3, cu_seqlens=cu)
    bi[0, 5:9, 1] = -1  # padded rows select nothing
    layout = block_layout(1, sum(lengths), 16, cu, DEVICE)
    tu = build_tile_union(bi, layout, 16, tt)
    want = naive(bi, layout, tt, tu.subs)
    assert tu.subs == -(-16 // tt)
    for (tile, r), pairs in want.items():
        n = int(tu.count[tile, r])
        assert n == len(pairs)
        got = list(zip(tu.ids[tile, r, :n].tolist(), tu.bits[tile, r, :n].tolist()))
        assert got == pairs, (tile, r)


def test_tile_tokens_and_bad_size():
    assert tile_tokens_for(16, 128, 128) == 8 and tile_tokens_for(1, 128, 128) == MAX_TILE_TOKENS
    assert tile_tokens_for(64, 64, 128) == 1 and tile_tokens_for(3, 64, 16) == 16
    with pytest.raises(ValueError, match="tile_tokens"):
        build_tile_union(torch.zeros(1, 4, 1, 1, dtype=torch.int32), block_layout(1, 4, 4, None, "cpu"), 4, 33)
