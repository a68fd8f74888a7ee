"""The reference ops against the float64 dense-mask oracle of tests/oracle.py (spec sections 1-2)."""

import math

import pytest
import torch
import torch.nn.functional as F

import msa
from tests.oracle import oracle_attention, oracle_kl, oracle_select, selection_sets, spans


def packed_cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def check_convention(block_indices, topk, block_size, cu_seqlens=None):
    """Local block in the last valid slot, -1 only after the valid prefix, min(topk, visible) valid."""
    bsz, t, h, kk = block_indices.shape
    assert block_indices.dtype == torch.int32 and kk == topk
    for b, s, e in spans(bsz, t, cu_seqlens):
        pos = torch.arange(e - s)
        local = (pos // block_size).view(-1, 1)
        rows = block_indices[b, s:e].long()  # (n, h, k)
        nvalid = (rows >= 0).sum(-1)
        expect = torch.clamp(local + 1, max=topk).expand(-1, h)
        assert torch.equal(nvalid, expect), "wrong number of valid slots"
        ar = torch.arange(kk).view(1, 1, -1)
        assert torch.equal(rows >= 0, ar < nvalid.unsqueeze(-1)), "-1 must only follow the valid prefix"
        last = rows.gather(-1, (nvalid - 1).unsqueeze(-1)).squeeze(-1)
        assert torch.equal(last, local.expand(-1, h)), "local block must sit in the last valid slot"


def assert_same_selection(block_indices, q_idx, k_idx, *, block_size, topk, init_blocks=0, local_blocks=1,
                          cu_seqlens=None, tol=1e-9):
    """Sets equal the oracle's; where a near-tie flips a choice, the chosen scores must still tie."""
    want, ms = oracle_select(q_idx, k_idx, block_size=block_size, topk=topk, init_blocks=init_blocks,
                             local_blocks=local_blocks, cu_seqlens=cu_seqlens)
    got = selection_sets(block_indices)
    bsz, t, h, _ = q_idx.shape
    mismatches = 0
    for b, s, e in spans(bsz, t, cu_seqlens):
        m = ms[(b, s)]
        for i in range(e - s):
            for r in range(h):
                g, w = got[b][s + i][r], want[b][s + i][r]
                if g != w:
                    mismatches += 1
                    gs = sorted(float(m[r, i, x]) for x in g)
                    ws = sorted(float(m[r, i, x]) for x in w)
                    assert len(g) == len(w) and all(abs(a - c) <= tol * max(1, abs(c)) for a, c in zip(gs, ws)), \
                        f"row (b={b}, t={s + i}, r={r}): got {g}, want {w}"
    return mismatches


SELECT_CASES = [
    # T, block_size, H_kv, topk, init_blocks, local_blocks
    (1, 16, 2, 4, 0, 1),
    (63, 16, 1, 3, 0, 1),
    (127, 32, 3, 2, 0, 2),
    (129, 64, 2, 2, 1, 1),
    (1000, 128, 4, 4, 1, 2),
    (1000, 16, 2, 16, 2, 3),
    (300, 32, 4, 64, 0, 1),  # topk covers every block
]


@pytest.mark.parametrize("t,bs,hkv,topk,init,local", SELECT_CASES)
def test_select_blocks_matches_oracle(t, bs, hkv, topk, init, local):
    torch.manual_seed(t + bs + topk)
    q_idx = torch.randn(2, t, hkv, 8, dtype=torch.float64)
    k_idx = torch.randn(2, t, 8, dtype=torch.float64)
    out = msa.select_blocks(q_idx, k_idx, block_size=bs, topk=topk, init_blocks=init, local_blocks=local,
                            backend="reference")
    check_convention(out, topk, bs)
    assert_same_selection(out, q_idx, k_idx, block_size=bs, topk=topk, init_blocks=init, local_blocks=local)


def test_select_blocks_forcing_wins_over_scores():
    """Forced blocks are kept even when their scores are the worst."""
    torch.manual_seed(0)
    t, bs = 256, 16
    q_idx = torch.ones(1, t, 1, 4, dtype=torch.float64)
    k_idx = torch.ones(1, t, 4, dtype=torch.float64)
    k_idx[0, :32] = -10.0  # blocks 0, 1: worst scores
    out = msa.select_blocks(q_idx, k_idx, block_size=bs, topk=4, init_blocks=2, local_blocks=1, backend="reference")
    sets = selection_sets(out)
    assert sets[0][255][0][:2] == [0, 1] and 15 in sets[0][255][0]
    out = msa.select_blocks(q_idx, k_idx, block_size=bs, topk=4, init_blocks=0, local_blocks=1, backend="reference")
    assert 0 not in selection_sets(out)[0][255][0]


def test_select_blocks_packed_matches_oracle_and_separate():
    torch.manual_seed(1)
    lengths = [37, 64, 1, 100, 19]  # partial blocks sit next to each other
    cu = packed_cu(lengths)
    t = sum(lengths)
    q_idx = torch.randn(1, t, 2, 8, dtype=torch.float64)
    k_idx = torch.randn(1, t, 8, dtype=torch.float64)
    out = msa.select_blocks(q_idx, k_idx, block_size=16, topk=3, init_blocks=1, cu_seqlens=cu, backend="reference")
    check_convention(out, 3, 16, cu)
    assert_same_selection(out, q_idx, k_idx, block_size=16, topk=3, init_blocks=1, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = msa.select_blocks(q_idx[:, s:e], k_idx[:, s:e], block_size=16, topk=3, init_blocks=1,
                                  backend="reference")
        assert selection_sets(alone)[0] == selection_sets(out[:, s:e])[0]


ATTN_CASES = [
    # T, block_size, H_q, H_kv, topk
    (1, 16, 4, 4, 2),       # G = 1
    (63, 16, 4, 2, 2),      # G = 2
    (127, 32, 8, 2, 2),     # G = 4
    (129, 64, 8, 1, 2),     # G = 8
    (200, 16, 16, 1, 4),    # G = 16
    (150, 32, 12, 3, 3),    # G = 4 over 3 groups (non power of two)
    (1000, 128, 4, 2, 3),
]


def _inputs(t, hq, hkv, d=16, bsz=1, seed=0, dtype=torch.float64, di=8):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (mk(bsz, t, hq, d), mk(bsz, t, hkv, d), mk(bsz, t, hkv, d), mk(bsz, t, hkv, di), mk(bsz, t, di))


@pytest.mark.parametrize("t,bs,hq,hkv,topk", ATTN_CASES)
def test_sparse_attention_matches_oracle(t, bs, hq, hkv, topk):
    q, k, v, q_idx, k_idx = _inputs(t, hq, hkv, bsz=2 if t < 500 else 1, seed=t)
    idx = msa.select_blocks(q_idx, k_idx, block_size=bs, topk=topk, backend="reference")
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    o, lse = msa.sparse_attention(q, k, v, idx, block_size=bs, return_lse=True, backend="reference")
    o_ref, lse_ref = oracle_attention(q, k, v, selection_sets(idx), block_size=bs)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-6)  # lse is returned in fp32
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    for name, a, b in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_sparse_attention_packed_matches_oracle():
    lengths = [37, 64, 1, 100, 19]
    cu = packed_cu(lengths)
    q, k, v, q_idx, k_idx = _inputs(sum(lengths), 6, 2, seed=3)
    idx = msa.select_blocks(q_idx, k_idx, block_size=16, topk=2, cu_seqlens=cu, backend="reference")
    o = msa.sparse_attention(q, k, v, idx, block_size=16, cu_seqlens=cu, backend="reference")
    o_ref, _ = oracle_attention(q, k, v, selection_sets(idx), block_size=16, cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t,bs", [(1, 16), (129, 32), (1000, 128)])
def test_sparse_with_all_blocks_equals_dense_sdpa(t, bs):
    q, k, v, q_idx, k_idx = _inputs(t, 8, 2, seed=7)
    topk = math.ceil(t / bs)
    idx = msa.select_blocks(q_idx, k_idx, block_size=bs, topk=topk, backend="reference")
    o = msa.sparse_attention(q, k, v, idx, block_size=bs, backend="reference")
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(o, dense, rtol=1e-10, atol=1e-10)


def test_sparse_attention_fp32_and_bf16_follow_float64():
    q, k, v, q_idx, k_idx = _inputs(300, 8, 2, seed=11, dtype=torch.float32)
    idx = msa.select_blocks(q_idx, k_idx, block_size=32, topk=3, backend="reference")
    o_ref, _ = oracle_attention(q, k, v, selection_sets(idx), block_size=32)
    o32 = msa.sparse_attention(q, k, v, idx, block_size=32, backend="reference")
    assert (o32.double() - o_ref).norm() / o_ref.norm() < 1e-6
    o16 = msa.sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, block_size=32, backend="reference")
    assert o16.dtype == torch.bfloat16
    assert (o16.double() - o_ref).norm() / o_ref.norm() < 1e-2


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_indexer_kl_matches_oracle(sparse, packed):
    lengths = [45, 70, 1, 33] if packed else [150]
    cu = packed_cu(lengths) if packed else None
    q, k, v, q_idx, k_idx = _inputs(sum(lengths), 6, 2, seed=5)
    q_idx.requires_grad_(True)
    k_idx.requires_grad_(True)
    idx = msa.select_blocks(q_idx, k_idx, block_size=16, topk=3, cu_seqlens=cu, backend="reference") if sparse else None
    loss = msa.indexer_kl_loss(q_idx, k_idx, q, k, idx, block_size=16, cu_seqlens=cu, backend="reference")
    sets = selection_sets(idx) if sparse else None
    ref = oracle_kl(q_idx, k_idx, q, k, sets, block_size=16, cu_seqlens=cu)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-10, atol=1e-12)
    assert float(ref.detach()) > 0
    g = torch.autograd.grad(loss, (q_idx, k_idx))
    g_ref = torch.autograd.grad(ref, (q_idx, k_idx))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_indexer_kl_student_gradient_formula():
    """d L / d s = (p_idx - p) / (N_tokens * H_kv) * index_scale w.r.t. the dot product (spec section 2)."""
    q, k, v, q_idx, k_idx = _inputs(40, 4, 2, seed=9)
    q_idx.requires_grad_(True)
    loss = msa.indexer_kl_loss(q_idx, k_idx, q, k, None, block_size=16, backend="reference")
    (g,) = torch.autograd.grad(loss, q_idx)
    scale_idx = 8 ** -0.5
    t = 40
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    want = torch.zeros_like(q_idx)
    for r in range(2):
        s = (q_idx[0, :, r] @ k_idx[0].T).detach() * scale_idx
        p_idx = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        p = sum(torch.softmax((q[0, :, h] @ k[0, :, r].T * 16 ** -0.5).masked_fill(~causal, float("-inf")), -1)
                for h in (2 * r, 2 * r + 1)) / 2
        want[0, :, r] = ((p_idx - p) / (t * 2) * scale_idx) @ k_idx[0]
    torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_indexer_kl_never_moves_q_and_k():
    q, k, v, q_idx, k_idx = _inputs(64, 4, 2, seed=2)
    for x in (q, k, q_idx, k_idx):
        x.requires_grad_(True)
    loss = msa.indexer_kl_loss(q_idx, k_idx, q, k, None, block_size=16, backend="reference")
    gq, gk = torch.autograd.grad(loss, (q, k), allow_unused=True)
    assert gq is None and gk is None


def test_reference_handles_32k_tokens_in_bounded_memory():
    """The reference never builds a T x T matrix: the selection chunk buffer stays small."""
    from msa.ops.common import query_chunk
    t = 32768
    chunk = query_chunk(4, t)
    assert chunk * 4 * t * 4 <= 1 << 28
    assert chunk < t


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def _ok():
    return _inputs(40, 4, 2, dtype=torch.float32)


@pytest.mark.parametrize("mutate,arg", [
    (lambda a: a.update(k_idx=torch.randn(1, 41, 8)), "k_idx"),
    (lambda a: a.update(q_idx=torch.randn(1, 40, 8)), "q_idx"),
    (lambda a: a.update(block_size=0), "block_size"),
    (lambda a: a.update(topk=2, init_blocks=2, local_blocks=1), "topk"),
    (lambda a: a.update(local_blocks=0), "local_blocks"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 20, 10, 40], dtype=torch.int32)), "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 20, 39], dtype=torch.int32)), "cu_seqlens"),
    (lambda a: a.update(backend="cuda"), "backend"),
    (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
])
def test_select_blocks_bad_input(mutate, arg):
    q, k, v, q_idx, k_idx = _ok()
    a = dict(q_idx=q_idx, k_idx=k_idx, block_size=16, topk=3)
    mutate(a)
    with pytest.raises(ValueError, match=arg):
        msa.select_blocks(a.pop("q_idx"), a.pop("k_idx"), **a)


@pytest.mark.parametrize("mutate,arg", [
    (lambda a: a.update(q=torch.randn(1, 40, 5, 16)), "H_q"),
    (lambda a: a.update(k=torch.randn(1, 40, 2, 8)), "k"),
    (lambda a: a.update(v=torch.randn(1, 40, 1, 16)), "v"),
    (lambda a: a.update(block_indices=a["block_indices"].long()), "block_indices"),
    (lambda a: a.update(block_indices=a["block_indices"][..., :1, :]), "block_indices"),
    (lambda a: a.update(block_indices=a["block_indices"].clone().fill_(5)), "block_indices"),
    (lambda a: a.update(block_indices=a["block_indices"].clone().fill_(-2)), "block_indices"),
    (lambda a: a.update(block_indices=torch.zeros_like(a["block_indices"])), "block_indices"),  # repeated id
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 30], dtype=torch.int32)), "cu_seqlens"),
    (lambda a: a.update(block_size=-1), "block_size"),
    (lambda a: a.update(scale=float("inf")), "scale must be a finite float"),
])
def test_sparse_attention_bad_input(mutate, arg):
    q, k, v, q_idx, k_idx = _ok()
    idx = msa.select_blocks(q_idx, k_idx, block_size=16, topk=3)
    a = dict(q=q, k=k, v=v, block_indices=idx, block_size=16)
    mutate(a)
    with pytest.raises(ValueError, match=arg):
        msa.sparse_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("block_indices"), **a)


def test_indexer_kl_bad_input():
    q, k, v, q_idx, k_idx = _ok()
    with pytest.raises(ValueError, match="k_idx"):
        msa.indexer_kl_loss(q_idx, k_idx[:, :10], q, k)
    with pytest.raises(ValueError, match="H_q"):
        msa.indexer_kl_loss(q_idx, k_idx, q[:, :, :3], k)
    with pytest.raises(ValueError, match="block_indices"):
        msa.indexer_kl_loss(q_idx, k_idx, q, k, torch.zeros(1, 40, 2, 3, dtype=torch.int64), block_size=16)
    with pytest.raises(ValueError, match="index_scale must be a finite float"):
        msa.indexer_kl_loss(q_idx, k_idx, q, k, index_scale=float("nan"))
    with pytest.raises(ValueError, match="^scale must be a finite float"):
        msa.indexer_kl_loss(q_idx, k_idx, q, k, scale="0.1x")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_exact_ties_go_to_the_lower_block_id(backend):
    """Repeated tokens give identical index keys: equal block scores must resolve the same way on
    every backend (toward the lower block id), or backends would attend to different blocks."""
    t, bs = 16 * 8, 16
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    k_idx = torch.ones(1, t, 4, device=dev)
    k_idx[0, 40] = 3.0  # block 2 wins; blocks 0, 1, 3..6 tie
    q_idx = torch.ones(1, t, 1, 4, device=dev)
    out = msa.select_blocks(q_idx, k_idx, block_size=bs, topk=4, backend=backend)
    assert selection_sets(out)[0][t - 1][0] == [0, 1, 2, 7]


def test_references_ignore_autocast():
    """Under torch.autocast(bf16) the references still compute in fp32 on the given inputs (their
    einsums would otherwise run in bf16 and round the scores): same result as without autocast."""
    g = torch.Generator().manual_seed(4)
    t, hkv, grp, d, di, bs = 96, 2, 3, 16, 8, 16
    q = (torch.randn(1, t, hkv * grp, d, generator=g) * 3).bfloat16()
    k = (torch.randn(1, t, hkv, d, generator=g) * 3).bfloat16()
    v = torch.randn(1, t, hkv, d, generator=g).bfloat16()
    qi = (torch.randn(1, t, hkv, di, generator=g) * 3).bfloat16()
    ki = (torch.randn(1, t, di, generator=g) * 3).bfloat16()

    def run():
        bi = msa.select_blocks(qi, ki, block_size=bs, topk=3, backend="reference")
        o = msa.sparse_attention(q, k, v, bi, block_size=bs, backend="reference")
        kl = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=bs, backend="reference")
        return bi, o, kl
    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run()
    assert torch.equal(plain[0], mixed[0])
    assert torch.equal(plain[1], mixed[1])
    assert torch.equal(plain[2], mixed[2])
