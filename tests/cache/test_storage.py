"""MSACache: contiguous / paged layouts, packed prefill, chunked appends, fp8 index keys, device append."""

import pytest
import torch

from msa.cache import MSACache

H, D, DI = 2, 8, 16


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g), torch.randn(n, DI, generator=g) * 3)


def _fill(cache, lens, chunks, seed=0):
    """Append sequences of lengths ``lens`` in ``chunks`` pieces (first piece packed)."""
    data = [_tokens(n, seed + b) for b, n in enumerate(lens)]
    cuts = [[max(min(1, c), round(n * c / chunks)) for c in range(chunks + 1)] for n in lens]
    # first piece: packed varlen prefill
    first = [cut[1] for cut in cuts]
    cu = torch.tensor([0] + list(torch.tensor(first).cumsum(0)), dtype=torch.int32)
    cat = [torch.cat([data[b][i][: first[b]] for b in range(len(lens))])[None] for i in range(3)]
    cache.append(0, *cat, cu_seqlens=cu)
    for c in range(1, chunks):  # the rest: one row at a time via padding-free per-row caches
        for b in range(len(lens)):
            s, e = cuts[b][c], cuts[b][c + 1]
            if e > s:
                _append_row(cache, b, [x[s:e] for x in data[b]])
    return data


def _append_row(cache, row, toks):
    cache.append_row(0, row, *toks)


LENS = [37, 1, 64, 129]


@pytest.mark.parametrize("index_dtype,mode", [(None, "token"), (torch.float8_e4m3fn, "token"),
                                              (torch.float8_e4m3fn, "block")])
@pytest.mark.parametrize("paged", [False, True])
def test_chunked_equals_one_shot(paged, index_dtype, mode):
    kw = dict(dtype=torch.float32, index_dtype=index_dtype, index_scale_mode=mode, index_block_size=16)
    if paged:
        kw["page_size"] = 16
    one = MSACache(1, len(LENS), 160, H, D, DI, **kw)
    many = MSACache(1, len(LENS), 160, H, D, DI, **kw)
    data = _fill(one, LENS, 1)
    _fill(many, LENS, 3)
    for b, n in enumerate(LENS):
        a, c = one.view(0, b), many.view(0, b)
        assert a[0].shape[0] == n
        for x, y in zip(a, c):
            assert torch.equal(x, y)
        assert torch.equal(a[0], data[b][0]) and torch.equal(a[1], data[b][1])
        if index_dtype is None:
            assert torch.equal(a[2], data[b][2])
        else:  # fp8 e4m3: 3 mantissa bits -> relative error <= 2^-4 of the scale's range
            amax = data[b][2].abs().amax(-1, keepdim=True) if mode == "token" else data[b][2].abs().max()
            assert ((a[2] - data[b][2]).abs() <= amax / 16 + 1e-6).all()


def test_paged_random_table_equals_contiguous():
    nb = 160 // 16
    perm = torch.randperm(len(LENS) * nb).view(len(LENS), nb).to(torch.int32)
    cont = MSACache(1, len(LENS), 160, H, D, DI)
    paged = MSACache(1, len(LENS), 160, H, D, DI, page_size=16, page_table=perm)
    _fill(cont, LENS, 1)
    _fill(paged, LENS, 2)
    for b in range(len(LENS)):
        for x, y in zip(cont.view(0, b), paged.view(0, b)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("paged", [False, True])
def test_append_device_equals_append(paged):
    kw = dict(page_size=16) if paged else {}
    a = MSACache(1, 2, 64, H, D, DI, index_dtype=torch.float8_e4m3fn, **kw)
    b = MSACache(1, 2, 64, H, D, DI, index_dtype=torch.float8_e4m3fn, **kw)
    b.reserve(64)
    for step in range(3):
        k, v, ki = torch.randn(2, 5, H, D), torch.randn(2, 5, H, D), torch.randn(2, 5, DI)
        a.append(0, k, v, ki)
        b.append_device(0, k, v, ki)
    b.sync_lengths()
    assert a.seq_lens(0).tolist() == b.seq_lens(0).tolist() == [15, 15]
    for r in range(2):
        for x, y in zip(a.view(0, r), b.view(0, r)):
            assert torch.equal(x, y)


def test_bad_inputs():
    with pytest.raises(ValueError, match="page_table"):
        MSACache(1, 2, 100, H, D, DI, page_size=16, page_table=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="page_table"):
        MSACache(1, 2, 100, H, D, DI, page_size=16, page_table=torch.zeros(2, 7))
    c = MSACache(1, 2, 10, H, D, DI)
    with pytest.raises(ValueError, match="max_seq_len"):
        c.append(0, torch.randn(2, 11, H, D), torch.randn(2, 11, H, D), torch.randn(2, 11, DI))
    with pytest.raises(ValueError, match="index_dtype"):
        MSACache(1, 2, 10, H, D, DI, index_dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        MSACache(1, 2, 10, H, D, DI, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_idx"):
        c.append(0, torch.randn(2, 1, H, D), torch.randn(2, 1, H, D), torch.randn(2, 1, DI + 1))
    small = MSACache(1, 2, 64, H, D, DI, page_size=16, num_pages=3)
    with pytest.raises(ValueError, match="num_pages"):
        small.append(0, torch.randn(2, 20, H, D), torch.randn(2, 20, H, D), torch.randn(2, 20, DI))


@pytest.mark.parametrize("paged", [False, True])
def test_append_device_ragged_and_reset(paged):
    """append_device after a packed prefill of different lengths writes each sequence at its own end;
    reset empties a row and gives its pages back."""
    kw = dict(page_size=16) if paged else {}
    a = MSACache(1, 2, 64, H, D, DI, index_dtype=torch.float8_e4m3fn, **kw)
    b = MSACache(1, 2, 64, H, D, DI, index_dtype=torch.float8_e4m3fn, **kw)
    cu = torch.tensor([0, 3, 20], dtype=torch.int32)
    k, v, ki = torch.randn(1, 20, H, D), torch.randn(1, 20, H, D), torch.randn(1, 20, DI)
    a.append(0, k, v, ki, cu_seqlens=cu)
    b.append(0, k, v, ki, cu_seqlens=cu)
    b.reserve(64)
    for step in range(2):
        k, v, ki = torch.randn(2, 1, H, D), torch.randn(2, 1, H, D), torch.randn(2, 1, DI)
        a.append(0, k, v, ki)
        b.append_device(0, k, v, ki)
    assert b.seq_lens(0).tolist() == [3, 17]  # host lengths are stale until sync_lengths
    b.sync_lengths()
    assert a.seq_lens(0).tolist() == b.seq_lens(0).tolist() == [5, 19]
    for r in range(2):
        for x, y in zip(a.view(0, r), b.view(0, r)):
            assert torch.equal(x, y)
    if paged:
        free = a.pages.free_pages
        a.reset(1)
        assert a.pages.free_pages == free + 2 and a.page_table[1].tolist() == [-1] * 4
    else:
        a.reset(1)
    assert a.seq_lens(0).tolist() == [5, 0] and a.lengths_dev[0].tolist() == [5, 0]
