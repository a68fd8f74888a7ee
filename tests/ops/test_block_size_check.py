"""Block indices made with one block_size and passed with another are caught at the public ops,
in both directions, wherever the indices can reveal it."""

import pytest
import torch

import msa


def inputs(t=70, seed=0, bsz=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(bsz, t, 4, 8), mk(bsz, t, 2, 8), mk(bsz, t, 2, 8), mk(bsz, t, 2, 8), mk(bsz, t, 8)


@pytest.mark.parametrize("made,passed", [(8, 16), (16, 8), (16, 32), (32, 16)])
@pytest.mark.parametrize("op", ["sparse_attention", "indexer_kl_loss"])
def test_indices_from_another_block_size_are_rejected(made, passed, op):
    q, k, v, q_idx, k_idx = inputs()
    idx = msa.select_blocks(q_idx, k_idx, block_size=made, topk=2, backend="reference")
    call = {
        "sparse_attention": lambda bs: msa.sparse_attention(q, k, v, idx, block_size=bs, backend="reference"),
        "indexer_kl_loss": lambda bs: msa.indexer_kl_loss(q_idx, k_idx, q, k, idx, block_size=bs, backend="reference"),
    }[op]
    call(made)  # the right block_size is accepted
    with pytest.raises(ValueError, match="block_indices") as exc:
        call(passed)
    assert "block_size" in str(exc.value)


def test_packed_sequences_use_their_own_positions():
    q, k, v, q_idx, k_idx = inputs(t=60)
    cu = torch.tensor([0, 25, 60], dtype=torch.int32)
    idx = msa.select_blocks(q_idx, k_idx, block_size=16, topk=2, cu_seqlens=cu, backend="reference")
    msa.sparse_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend="reference")
    with pytest.raises(ValueError, match="own block"):
        msa.sparse_attention(q, k, v, idx, block_size=8, cu_seqlens=cu, backend="reference")


def test_a_row_without_its_own_block_names_the_row_and_all_unused_rows_pass():
    q, k, v, q_idx, k_idx = inputs(t=40)
    idx = msa.select_blocks(q_idx, k_idx, block_size=8, topk=3, backend="reference")
    bad = idx.clone()
    bad[0, 30, 1] = torch.tensor([0, 1, -1], dtype=torch.int32)  # position 30 is in block 3
    with pytest.raises(ValueError, match=r"block_indices\[0, 30, 1\] does not select the query's own block 3"):
        msa.sparse_attention(q, k, v, bad, block_size=8, backend="reference")
    empty = idx.clone()
    empty[0, 30, 1] = -1  # a row that selects nothing is not a block_size mismatch
    msa.sparse_attention(q, k, v, empty, block_size=8, backend="reference")
