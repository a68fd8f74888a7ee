"""Recorded selections (msa.bench.selections): recorded from a real trained run, replayed at any
length as valid selections that keep the recording's neighbour agreement."""

import numpy as np
import pytest
import torch

from msa.bench.selections import (fp8_recall, greedy_union_blocks, load, realistic_indices, record, selection_recall,
                                  union_blocks)
from msa.ops.sparse_attention.interface import check_block_indices, check_own_block
from msa.train import train
from tests.train.common import one_thread, tiny_config


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    with one_thread():
        train(tiny_config("steps=8", "phase.warmup_steps=4", "eval.every=0"), str(d / "run"), progress=False)
        meta = record(str(d / "run"), str(d / "sel.npz"), device="cpu")
    return str(d / "sel.npz"), meta


def test_fp8_recall_of_a_trained_index(recording):
    """fp8 index scores keep nearly every block bf16 scores select on the trained projections (a broken
    quantisation, e.g. a missing scale, would select unrelated blocks: recall near k / blocks)."""
    path, meta = recording
    with one_thread():
        res = fp8_recall(meta["run"], device="cpu")
    assert list(res["fp8_block_recall"]) == list(res["fp8_only_block_recall"]) == [str(i) for i in meta["layers"]]
    assert 0.9 <= res["fp8_only_block_recall_min"] <= res["fp8_only_block_recall_mean"] <= 1.0
    # exact rescoring of the fp8 candidates can only bring back blocks the fp8 scores lost
    assert res["fp8_only_block_recall_mean"] <= res["fp8_block_recall_mean"] <= 1.0


def test_record_holds_what_the_model_selected(recording):
    path, meta = recording
    sel, m = load(path)
    assert m == meta and sel.dtype == np.int64 and meta["layers"] == [1]  # the tiny model's one MSA layer
    assert sel.shape[1:] == (meta["seq_len"], meta["num_kv_heads"], meta["topk_blocks"])
    bi = torch.from_numpy(sel[0].astype(np.int32)).unsqueeze(0)
    check_block_indices(bi, 1, meta["seq_len"], meta["num_kv_heads"], meta["block_size"], None)
    check_own_block(bi, meta["block_size"], meta["seq_len"], None)


@pytest.mark.parametrize("t,hkv", [(100, 1), (128, 3), (700, 2)])
def test_replay_is_a_valid_selection_that_keeps_the_recording(recording, t, hkv):
    path, meta = recording
    bs, k = meta["block_size"], meta["topk_blocks"]
    bi = realistic_indices(t, hkv, k, bs, "cpu", path=path)
    assert bi.shape == (1, t, hkv, k) and bi.dtype == torch.int32
    check_block_indices(bi, 1, t, hkv, bs, None)  # range (no future block) and no repeats
    check_own_block(bi, bs, t, None)
    sel, _ = load(path)
    n = min(t, meta["seq_len"])
    assert torch.equal(bi[0, :n, 0], torch.from_numpy(sel[0, :n, 0].astype(np.int32)))
    if t > meta["seq_len"]:  # later tokens: the recorded rows' distances to their own block
        own = torch.arange(t) // bs
        late = bi[0, meta["seq_len"]:, 0]
        assert ((own[meta["seq_len"]:, None] - late)[late >= 0] < meta["seq_len"] // bs + 1).all()


def test_replay_rejects_another_block_size(recording):
    path, meta = recording
    with pytest.raises(ValueError, match="block_size"):
        realistic_indices(64, 1, meta["topk_blocks"], meta["block_size"] * 2, "cpu", path=path)


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="--run"):
        record(str(tmp_path), str(tmp_path / "x.npz"), device="cpu")
    with pytest.raises(ValueError, match="tile_tokens"):
        union_blocks(torch.zeros(1, 4, 1, 2, dtype=torch.int32), 0)


def test_union_blocks_counts_distinct_ids():
    bi = torch.tensor([[0, 1], [0, 2], [3, -1], [3, 4]], dtype=torch.int32).view(1, 4, 1, 2)
    assert union_blocks(bi, 1) == 1.75  # -1 is not a block
    assert union_blocks(bi, 2) == 2.5   # {0,1,2}, {3,4}
    assert union_blocks(bi, 4) == 5.0


def test_greedy_union_blocks():
    """Blocks of 4 tokens; in the last two query blocks neighbours alternate between blocks {0, 1} and
    {2, 3} (plus their own block), earlier tokens keep only their own block: tiles of 2 consecutive
    tokens there hold 5 distinct blocks, tiles grouped by selection 3 (8 early tiles hold 1)."""
    t, bs = 24, 4
    bi = torch.full((1, t, 1, 3), -1, dtype=torch.int32)
    bi[0, :, 0, 0] = torch.arange(t) // bs
    for i in range(16, t):
        bi[0, i, 0] = torch.tensor([0, 1, i // bs] if i % 2 == 0 else [2, 3, i // bs])
    check_block_indices(bi, 1, t, 1, bs, None)
    bi = bi.to("cuda" if torch.cuda.is_available() else "cpu")  # a Triton kernel builds the greedy order
    assert union_blocks(bi, 2) == pytest.approx((8 * 1 + 4 * 5) / 12)
    assert greedy_union_blocks(bi, 2, block_size=bs) == pytest.approx((8 * 1 + 4 * 3) / 12)
    with pytest.raises(ValueError, match="multiple of block_size"):
        greedy_union_blocks(bi[:, :7], 2, block_size=bs)


def test_selection_recall():
    a = torch.tensor([[0, 1, 2], [3, -1, -1]], dtype=torch.int32).view(1, 2, 1, 3)
    b = torch.tensor([[2, 0, 5], [-1, 3, -1]], dtype=torch.int32).view(1, 2, 1, 3)
    assert selection_recall(a, b) == 3 / 4 and selection_recall(a, a) == 1.0
    assert selection_recall(a, b, chunk=1) == 3 / 4
