"""Triton forward of msa.sparse_attention vs the reference (fp32, small shapes).

Runs natively on the GPU when CUDA is present (tensors on "cuda"), else in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported).

Tolerance: fp32 everywhere, max abs error <= 1e-4 on o and on lse in the interpreter; on the GPU
<= 5e-4 (the kernels' fp32 dots use input_precision="ieee", not tf32, but exp2/log2 are the
hardware approximations). Both kernels compute the same softmax in a different order; observed
errors are ~1e-6. The bf16 test (bf16 partial outputs of the KV-outer path) uses 2e-2, the size of
a bf16 rounding of O(1) values. Indices come from select_blocks_reference and are fed to both sides,
so near-ties in the selection cannot make a test fail. Every buffer the kernels write (o, lse,
partials) is pre-filled with NaN (msa.tuning debug_poison, set by an autouse fixture), so an unwritten
value fails the comparison.
"""

import os

import pytest
import torch

import msa
from msa.ops.select_blocks.reference import select_blocks_reference
from msa.ops.sparse_attention.reference import sparse_attention_reference
from msa.ops.utils.reverse_index import build_reverse_index
from msa.ops.sparse_attention.triton_impl import choose_kernel, sparse_attention_fwd_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must enable the interpreter without CUDA"


@pytest.fixture(autouse=True)
def _poison(tuned):
    tuned(debug_poison=True)


KERNELS = ["kv", "qo", "tiled", "tiled-greedy"]  # tiled-greedy: query tiles grouped by selection


def kernel_arg(kernel, tuned):
    """The kernel= argument of a test kernel name; tiled / tiled-greedy set tuning.tile_order."""
    if kernel.startswith("tiled"):
        tuned(tile_order="greedy" if kernel == "tiled-greedy" else "consecutive")
        return "tiled"
    return kernel


ATOL = 1e-4 if DEVICE == "cpu" else 5e-4


def make_inputs(lengths, hkv, g, d, block_size, topk, *, batch=1, packed=False, init_blocks=0, seed=0):
    """Random q/k/v and the reference selection. lengths: one length (batch rows) or a list (packed)."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        t = sum(lengths)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        batch = 1
    else:
        t, cu = lengths, None
    hq = hkv * g
    q = torch.randn(batch, t, hq, d, generator=gen).to(DEVICE)
    k = torch.randn(batch, t, hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(batch, t, hkv, d, generator=gen).to(DEVICE)
    qi = torch.randn(batch, t, hkv, 16, generator=gen).to(DEVICE)
    ki = torch.randn(batch, t, 16, generator=gen).to(DEVICE)
    cu = None if cu is None else cu.to(DEVICE)
    bi = select_blocks_reference(qi, ki, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                 local_blocks=1, scale=0.25, cu_seqlens=cu)
    return q, k, v, bi, cu


def check_against_reference(q, k, v, bi, cu, block_size, atol=None, **kw):
    atol = ATOL if atol is None else atol
    scale = q.shape[-1] ** -0.5
    # the reference in fp32 on the same (possibly 16-bit-rounded) inputs
    o_ref, lse_ref = sparse_attention_reference(q.float(), k.float(), v.float(), bi, block_size=block_size,
                                                scale=scale, cu_seqlens=cu)
    o_ref = o_ref.to(q.dtype)
    o, lse = sparse_attention_fwd_triton(q, k, v, bi, block_size=block_size, scale=scale, cu_seqlens=cu, **kw)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert lse.shape == lse_ref.shape and lse.dtype == torch.float32
    assert not torch.isnan(o).any(), "unwritten or NaN output"
    assert not torch.isnan(lse).any(), "unwritten or NaN lse"
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert (o.float() - o_ref.float()).abs().max().item() <= atol
    assert (lse[fin] - lse_ref[fin]).abs().max().item() <= atol if fin.any() else True
    return o, lse


# (T, block_size, G, H_kv, D, topk): odd lengths, both block sizes, G in {1, 3, 4, 16}
CASES = [
    (1, 16, 4, 2, 16, 4),
    (63, 16, 3, 2, 16, 3),
    (127, 32, 1, 2, 32, 2),
    (129, 16, 16, 1, 16, 4),
    (300, 32, 4, 1, 32, 4),
    (300, 16, 3, 1, 16, 5),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-bs{}-G{}-hkv{}-d{}-k{}".format(*c))
def test_matches_reference(case, kernel, tuned):
    kernel = kernel_arg(kernel, tuned)
    t, bs, g, hkv, d, topk = case
    q, k, v, bi, cu = make_inputs(t, hkv, g, d, bs, topk, seed=t)
    check_against_reference(q, k, v, bi, cu, bs, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_sequences_partial_blocks_adjacent(kernel, tuned):
    kernel = kernel_arg(kernel, tuned)
    # 37 | 1 | 70 | 20: every sequence ends in a partial block right next to the next sequence's start
    q, k, v, bi, cu = make_inputs([37, 1, 70, 20], 2, 3, 16, 16, 3, packed=True, seed=1)
    check_against_reference(q, k, v, bi, cu, 16, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batch_rows(kernel, tuned):
    kernel = kernel_arg(kernel, tuned)
    q, k, v, bi, cu = make_inputs(75, 2, 4, 16, 16, 2, batch=2, seed=2)
    check_against_reference(q, k, v, bi, cu, 16, kernel=kernel)


@pytest.mark.parametrize("kernel", ["kv", "qo", "tiled"])
def test_topk_covering_all_blocks_is_dense(kernel):
    t, bs = 100, 16
    q, k, v, bi, cu = make_inputs(t, 1, 4, 16, bs, 8, seed=3)  # 7 blocks <= topk: every row selects all
    assert ((bi >= 0).sum(-1) == torch.arange(t, device=DEVICE).div(bs, rounding_mode="floor").view(1, -1, 1) + 1).all()
    scale = 16 ** -0.5
    o_dense, lse_dense = sparse_attention_reference(q, k, v, None, block_size=bs, scale=scale, cu_seqlens=None)
    o, lse = sparse_attention_fwd_triton(q, k, v, bi, block_size=bs, scale=scale, cu_seqlens=None, kernel=kernel)
    assert (o - o_dense).abs().max().item() <= ATOL
    assert (lse - lse_dense).abs().max().item() <= ATOL


@pytest.mark.parametrize("kernel", KERNELS)
def test_padded_and_empty_rows(kernel, tuned):
    kernel = kernel_arg(kernel, tuned)
    # drop the free choices of some rows (-1 padding after a shorter valid prefix) and empty a few
    # rows completely (the reference then gives o = 0, lse = -inf)
    t, bs, topk = 90, 16, 4
    q, k, v, bi, cu = make_inputs(t, 2, 3, 16, bs, topk, seed=4)
    bi = bi.clone()
    local = bi.gather(-1, ((bi >= 0).sum(-1, keepdim=True) - 1).clamp(min=0).long())
    short = torch.zeros_like(bi[..., :1], dtype=torch.bool)
    short[:, ::3] = True
    bi = torch.where(short, torch.cat([local, torch.full_like(bi[..., 1:], -1)], -1), bi)
    bi[:, 10, 1] = -1
    bi[:, 57, :] = -1
    check_against_reference(q, k, v, bi, cu, bs, kernel=kernel)


def test_hot_block_split_and_chunks():
    # init_blocks=1 makes block 0 (a sink) selected by every query: with 5 queries per work item its
    # row is cut into many items; a 40-token partial budget also forces several query chunks
    t, g, hkv, d, bs, topk = 150, 3, 2, 16, 16, 3
    q, k, v, bi, cu = make_inputs(t, hkv, g, d, bs, topk, init_blocks=1, seed=5)
    ri = build_reverse_index(bi, bs, None, 5)
    counts = (ri.row_ptr[1:] - ri.row_ptr[:-1])
    assert counts.max().item() > 5  # some row really is hot
    per_token = topk * hkv * g * (d + 1) * 4
    check_against_reference(q, k, v, bi, cu, bs, kernel="kv", max_queries_per_item=5,
                            partial_budget_bytes=40 * per_token)


def test_chunks_across_packed_sequences():
    q, k, v, bi, cu = make_inputs([45, 30, 19], 1, 4, 16, 16, 2, packed=True, seed=6)
    per_token = 2 * 4 * 17 * 4
    check_against_reference(q, k, v, bi, cu, 16, kernel="kv", partial_budget_bytes=23 * per_token,
                            max_queries_per_item=7)


@pytest.mark.parametrize("kernel", ["kv", "qo", "tiled"])
def test_multi_tile_blocks_and_odd_block_size(kernel, tuned):
    # 16-key tiles inside 40-key blocks: the multi-tile online softmax (used for B_k > 128 on GPU)
    tuned(sparse_fwd_kv_config={"BLOCK_N": 16})
    tuned(sparse_fwd_qo_config={"BLOCK_N": 16})
    tuned(sparse_fwd_tiled_config={"BLOCK_N": 16})
    q, k, v, bi, cu = make_inputs(130, 1, 4, 16, 40, 2, seed=7)
    check_against_reference(q, k, v, bi, cu, 40, kernel=kernel)


def test_no_preload_and_large_group(tuned):
    # G = 16 with 16-row tiles (one query per tile) and the K/V block re-read per query tile
    tuned(sparse_fwd_kv_config={"BLOCK_M": 16, "PRELOAD": 0})
    q, k, v, bi, cu = make_inputs(70, 1, 16, 16, 16, 3, seed=8)
    check_against_reference(q, k, v, bi, cu, 16, kernel="kv")


def test_combine_head_blocks_and_tokens_per_program(tuned):
    # combine with 2 heads per program (G = 3: a program's heads straddle two groups), 2 tokens per
    # program over an odd token count (the last program's second token is out of range), and
    # -1 slots (short rows) whose stale partials must not leak in
    tuned(sparse_fwd_combine_config={"BLOCK_H": 2, "TOK_PER_PROG": 2, "num_warps": 2})
    q, k, v, bi, cu = make_inputs(67, 2, 3, 16, 16, 4, seed=14)
    bi = bi.clone()
    bi[:, ::5, :, :2] = -1
    check_against_reference(q, k, v, bi, cu, 16, kernel="kv")


def test_deterministic(tuned):
    # repeatable, and the KV-outer launch order (tuning.work_order) changes nothing
    q, k, v, bi, cu = make_inputs(80, 2, 3, 16, 16, 3, seed=9)
    kw = dict(block_size=16, scale=0.25, cu_seqlens=None, kernel="kv", max_queries_per_item=4)
    o1, l1 = sparse_attention_fwd_triton(q, k, v, bi, **kw)
    o2, l2 = sparse_attention_fwd_triton(q, k, v, bi, **kw)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    tuned(work_order="longest-first")
    o3, l3 = sparse_attention_fwd_triton(q, k, v, bi, **kw)
    assert torch.equal(o1, o3) and torch.equal(l1, l3)


def test_public_interface_and_backward():
    q, k, v, bi, cu = make_inputs(40, 1, 2, 16, 16, 2, seed=10)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    o, lse = msa.sparse_attention(qr, kr, vr, bi, block_size=16, return_lse=True, backend="triton")
    o_ref, lse_ref = sparse_attention_reference(q, k, v, bi, block_size=16, scale=16 ** -0.5, cu_seqlens=None)
    assert (o - o_ref).abs().max().item() <= ATOL and (lse - lse_ref).abs().max().item() <= ATOL
    o.sum().backward()  # the backward recomputes through the reference until triton_bwd exists
    assert all(torch.isfinite(x.grad).all() for x in (qr, kr, vr))


def test_heuristic_and_override(tuned):
    assert choose_kernel(100, 16, 16, 8, 8, 100) == "tiled"               # tiny: query-tiled
    assert choose_kernel(8192, 16, 16, 64, 64, 8192) == "tiled"           # 8K: query-tiled (H200: 3.6 vs 5.8 ms)
    assert choose_kernel(1 << 16, 1, 16, 8192, 8192, 64) == "qo"           # G = 1, tiny chunks: KV tiles underfilled
    assert choose_kernel(32768, 16, 16, 256, 256, 32768) == "kv"          # 32K: KV-outer
    assert choose_kernel(1 << 20, 16, 16, 8192, 8192, 8192) == "kv"        # 1M, G = 16
    assert choose_kernel(1 << 20, 16, 16, 8192, 8192, 8192, "qo") == "qo"  # argument wins
    tuned(sparse_fwd_kernel="qo")
    assert choose_kernel(1 << 20, 16, 16, 8192, 8192, 8192) == "qo"
    with pytest.raises(ValueError):
        choose_kernel(10, 1, 1, 1, 1, 1, "bogus")


def _agreeing_and_random_selections(t, block_size, topk, seed=0):
    """int32 (1, t, 1, topk) selections: 'agree', every token of a block selects the same blocks (its own
    and the first topk - 1 before it), as trained indexers nearly do; 'random', each token its own block
    and topk - 1 random earlier ones. Both in the spec convention (-1 padding)."""
    gen = torch.Generator().manual_seed(seed)
    own = torch.arange(t) // block_size
    agree = torch.full((1, t, 1, topk), -1, dtype=torch.int32)
    rand = agree.clone()
    for i in range(t):
        b = int(own[i])
        earlier = list(range(min(b, topk - 1)))
        agree[0, i, 0, : len(earlier) + 1] = torch.tensor(earlier + [b])
        pick = torch.randperm(b, generator=gen)[: topk - 1].tolist()
        rand[0, i, 0, : len(pick) + 1] = torch.tensor(sorted(pick) + [b])
    return agree.to(DEVICE), rand.to(DEVICE)


def test_union_choice(monkeypatch, tuned):
    """With a plan, from SHORT_TOKENS up to UNION_CHOICE_TOKENS, 'auto' takes the query-tiled kernel
    when the tiles' mean union is at most TILED_MAX_UNION x topk (selections that agree: union = topk)
    and KV-outer when it is larger (random selections); an explicit kernel, no plan, tiles of fewer than
    UNION_MIN_TILE_TOKENS tokens or more tokens keep the length rule. Then the forward of the agreeing
    selection runs the tiled kernel (the KV-outer kernel is replaced by one that fails) and matches the
    reference."""
    from msa.ops.sparse_attention import triton_impl
    from msa.ops.utils.reverse_index import SelectionPlan
    t, bs, topk, tt = 512, 8, 4, 8
    monkeypatch.setattr(triton_impl, "SHORT_TOKENS", 256)
    monkeypatch.setattr(triton_impl, "UNION_CHOICE_TOKENS", t)
    agree, rand = _agreeing_and_random_selections(t, bs, topk)
    nb = t // bs
    plan_a, plan_r = (SelectionPlan(bi, bs, None, t, 64) for bi in (agree, rand))
    assert plan_a.mean_tile_union(tt, "greedy") <= topk < 2 * topk < plan_r.mean_tile_union(tt, "greedy")
    args = (t, 16, topk, nb, nb, t)
    assert triton_impl.resolve_kernel(*args, None, plan_a, tt) == "tiled"
    assert triton_impl.resolve_kernel(*args, None, plan_r, tt) == "kv"
    assert triton_impl.resolve_kernel(*args, "kv", plan_a, tt) == "kv"
    assert triton_impl.resolve_kernel(*args, None, None, tt) == "kv"
    assert triton_impl.resolve_kernel(*args, None, plan_a, 2) == "kv"   # tiles too small for the rule
    monkeypatch.setattr(triton_impl, "UNION_CHOICE_TOKENS", t - 1)
    assert triton_impl.resolve_kernel(*args, None, SelectionPlan(agree, bs, None, t, 64), tt) == "kv"
    monkeypatch.setattr(triton_impl, "UNION_CHOICE_TOKENS", t)

    class MustNotLaunch:
        def __getitem__(self, grid):
            raise AssertionError("KV-outer kernel launched")
    monkeypatch.setattr(triton_impl, "sparse_attention_fwd_kernel", MustNotLaunch())
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, t, 2, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, t, 1, 16, generator=gen).to(DEVICE) for _ in range(2))
    o, lse = sparse_attention_fwd_triton(q, k, v, agree, block_size=bs, scale=0.25, cu_seqlens=None,
                                         plan=SelectionPlan(agree, bs, None, t, 64))
    ref_o, ref_lse = sparse_attention_reference(q, k, v, agree, block_size=bs, scale=0.25, cu_seqlens=None)
    torch.testing.assert_close(o, ref_o, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)


def test_reverse_index_token_range_matches_full():
    # the chunked build (token_range + block_limit) lists exactly the full build's pairs of its tokens
    from msa.ops.utils.reverse_index import block_layout, blocks_before
    q, k, v, bi, cu = make_inputs([40, 9, 60], 2, 1, 16, 16, 3, packed=True, seed=11)
    full = build_reverse_index(bi, 16, cu, 4)
    nb = full.layout.num_blocks

    def pairs(ri, nbr, t0, t1):
        out = set()
        ptr = ri.row_ptr.tolist()
        for row in range(len(ptr) - 1):
            for e in ri.entries[ptr[row]:ptr[row + 1]].tolist():
                tok = t0 + e // 3
                if t0 <= tok < t1:
                    out.add((row // nbr, row % nbr, tok, e % 3))
        return out

    layout = block_layout(1, 109, 16, cu, DEVICE)
    starts = layout.starts
    for t0, t1 in ((0, 23), (23, 50), (50, 109)):
        nbr = blocks_before(starts, t1)
        part = build_reverse_index(bi, 16, cu, 4, token_range=(t0, t1), layout=layout, block_limit=nbr)
        assert pairs(part, nbr, t0, t1) == {p for p in pairs(full, nb, 0, 109) if t0 <= p[2] < t1}
        # work items tile every row exactly, at most 4 entries each
        s, e = part.work_start, part.work_end
        assert ((e - s) <= 4).all() and int((e - s).sum()) == int(part.row_ptr[-1])
        # launch order: a permutation of the items (which one: test_launch_order_auto)
        assert sorted(part.work_order.tolist()) == list(range(len(s)))


def test_reverse_index_longest_first(tuned):
    # tuning.work_order="longest-first": every item once, longest first, equal lengths in item order
    from msa.ops.utils.reverse_index import _build_reverse_index_torch, block_layout
    tuned(work_order="longest-first")
    q, k, v, bi, cu = make_inputs([40, 9, 60], 2, 1, 16, 16, 3, packed=True, seed=15)
    layout = block_layout(1, 109, 16, cu, DEVICE)
    for ri in (build_reverse_index(bi, 16, cu, 4, layout=layout), _build_reverse_index_torch(bi, layout, 8, 0, 109, 4)):
        order = ri.work_order.tolist()
        assert ri.work_order.dtype == torch.int32 and sorted(order) == list(range(len(order)))
        lens = (ri.work_end - ri.work_start).tolist()
        assert len(set(lens)) > 2 and order != sorted(order)  # the case orders something
        assert all((-lens[a], a) < (-lens[b], b) for a, b in zip(order, order[1:]))


def test_hot_row_split(tuned):
    # k * B_k / 2 below SHORT_TOKENS tokens, the spec's 2 * k * B_k from there (at least 64), unless
    # msa.tuning's max_queries_per_item is set
    from msa.ops.utils.reverse_index import SHORT_TOKENS, hot_row_split
    assert hot_row_split(128, 16, SHORT_TOKENS - 1) == 1024 and hot_row_split(128, 16, SHORT_TOKENS) == 4096
    assert hot_row_split(4, 2, 100) == 64 and hot_row_split(4, 2, SHORT_TOKENS) == 64
    tuned(max_queries_per_item=7)
    assert hot_row_split(128, 16, 100) == 7 and hot_row_split(128, 16, SHORT_TOKENS) == 7


def test_launch_order_auto(tuned):
    # tuning.work_order "auto": longest first below SHORT_TOKENS tokens, item order from there;
    # "items" and "longest-first" at any length
    from msa.ops.utils.reverse_index import SHORT_TOKENS, _launch_order
    start = torch.tensor([0, 3, 4, 10, 12], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([3, 4, 10, 12, 15], dtype=torch.int32, device=DEVICE)  # lengths 3 1 6 2 3
    longest, items = [2, 0, 4, 3, 1], [0, 1, 2, 3, 4]
    assert _launch_order(start, end, SHORT_TOKENS - 1).tolist() == longest
    assert _launch_order(start, end, SHORT_TOKENS).tolist() == items
    tuned(work_order="items")
    assert _launch_order(start, end, 100).tolist() == items
    tuned(work_order="longest-first")
    assert _launch_order(start, end, SHORT_TOKENS).tolist() == longest


def test_block_layout_values_and_cache():
    # the layout of packed pieces [40, 9, 60] in blocks of 16: every block's first token and length,
    # each token's global id of its sequence's block 0; built once per layout (its host-to-device
    # copies wait for the stream), a different layout or block size gets its own
    from msa.ops.utils.reverse_index import block_layout
    cu = torch.tensor([0, 40, 49, 109], dtype=torch.int32, device=DEVICE)
    lay = block_layout(1, 109, 16, cu, DEVICE)
    assert lay.starts == (0, 16, 32, 40, 49, 65, 81, 97) and lay.block_start.tolist() == list(lay.starts)
    assert lay.block_len.tolist() == [16, 16, 8, 9, 16, 16, 16, 12] and lay.num_blocks == 8
    assert lay.seq_block_offset.tolist() == [0] * 40 + [3] * 9 + [4] * 60
    assert block_layout(1, 109, 16, cu.clone(), DEVICE) is lay
    other = block_layout(1, 109, 16, torch.tensor([0, 41, 49, 109], dtype=torch.int32, device=DEVICE), DEVICE)
    assert other is not lay and other.starts[:4] == (0, 16, 32, 41)
    assert block_layout(1, 109, 32, cu, DEVICE).starts == (0, 32, 40, 49, 81)
    assert block_layout(2, 20, 16, None, DEVICE).starts == (0, 16, 20, 36)


def test_reverse_index_kernels_match_torch_build():
    # the fused-kernel build and the torch-only fallback give identical tensors (chunked + full)
    from msa.ops.utils.reverse_index import _build_reverse_index_torch, block_layout
    q, k, v, bi, cu = make_inputs([40, 9, 60], 2, 1, 16, 16, 3, packed=True, seed=15)
    layout = block_layout(1, 109, 16, cu, DEVICE)
    for (t0, t1), nbr, c in (((0, 109), layout.num_blocks, 4), ((23, 50), 5, 3), ((50, 109), 9, 100)):
        a = build_reverse_index(bi, 16, cu, c, token_range=(t0, t1), layout=layout, block_limit=nbr)
        b = _build_reverse_index_torch(bi, layout, nbr, t0, t1, c)
        for x, y in zip(a[1:], b[1:]):
            assert x.dtype == y.dtype == torch.int32 and torch.equal(x, y)


@pytest.mark.parametrize("pdtype", ["auto", "fp32"])
def test_bf16_inputs_partials(pdtype, tuned):
    # bf16 inputs: the KV-outer partial outputs are stored in bf16 (auto) or fp32 (forced), the
    # combine accumulates in fp32; several chunks so the partial buffer is reused
    tuned(sparse_fwd_partial_dtype=pdtype)
    q, k, v, bi, cu = make_inputs(140, 2, 3, 16, 16, 4, seed=12)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    from msa.ops.sparse_attention.triton_impl import partial_bytes_per_token
    per_token = partial_bytes_per_token(4, 6, 16, torch.bfloat16)
    assert per_token == 4 * 6 * (16 * (2 if pdtype == "auto" else 4) + 4)
    for kernel in ("kv", "qo", "tiled"):
        check_against_reference(q, k, v, bi, cu, 16, atol=2e-2, kernel=kernel, partial_budget_bytes=50 * per_token)


@pytest.mark.parametrize("block_m,g", [(16, 3), (32, 1), (128, 4), (16, 16)])
def test_tiled_tile_sizes(block_m, g, tuned):
    # tiles of 5, 32 (the most tokens one bit mask holds), 32 (block-sized: bs 32) and 1 token; the
    # tiled kernel's rows are tile_tokens x G, padded to a power of two
    tuned(sparse_fwd_tiled_config={"BLOCK_M": block_m})
    q, k, v, bi, cu = make_inputs([70, 1, 90], 2, g, 16, 32, 3, packed=True, seed=14)
    check_against_reference(q, k, v, bi, cu, 32, kernel="tiled")


def test_stage_times_are_reported():
    q, k, v, bi, cu = make_inputs(64, 1, 2, 16, 16, 2, seed=13)
    times = {}
    sparse_attention_fwd_triton(q, k, v, bi, block_size=16, scale=0.25, cu_seqlens=None, kernel="kv",
                                stage_times=times)
    if DEVICE == "cuda":
        assert {"reverse_index", "kv_kernel", "combine"} <= set(times) and times["chunks"] == 1
    else:
        assert times == {}  # no CUDA events in the interpreter
