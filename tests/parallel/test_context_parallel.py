"""Context parallelism (msa.parallel.context) on 2 and 4 gloo ranks equals the single-process MSA:
outputs, selections, the KL and every gradient (q, k, v, q_idx, k_idx), odd lengths and packed
sequences, sparse and dense (warmup) modes. Reference ops in fp64 so the comparison is tight."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import msa
from msa.ops.dense import dense_causal_attention
from msa.parallel import ZigzagLayout, context_parallel_msa_attention, gather_sequence, zigzag_shard
from tests.parallel.dist_utils import run_ranks

HQ, HKV, D, DI = 4, 2, 8, 8


def _inputs(bsz, t, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [mk(bsz, t, HQ, D), mk(bsz, t, HKV, D), mk(bsz, t, HKV, D), mk(bsz, t, HKV, DI), mk(bsz, t, DI),
            mk(bsz, t, HQ, D)]


def _single(q, k, v, q_idx, k_idx, w, cu, mode, sel):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, q_idx, k_idx)]
    q, k, v, q_idx, k_idx = leaves
    bi = None
    if mode == "sparse":
        bi = msa.select_blocks(q_idx, k_idx, cu_seqlens=cu, backend="reference", **sel)
        o = msa.sparse_attention(q, k, v, bi, block_size=sel["block_size"], cu_seqlens=cu, backend="reference")
    else:
        o = dense_causal_attention(q, k, v, scale=D ** -0.5, cu_seqlens=cu)
    kl = msa.indexer_kl_loss(q_idx, k_idx, q.detach(), k.detach(), bi, block_size=sel["block_size"],
                             cu_seqlens=cu, backend="reference")
    ((o * w).sum() + kl).backward()
    return o.detach(), kl.detach(), bi, [x.grad for x in leaves]


CASES = {
    2: [dict(bsz=2, t=37, cu=None, mode="sparse", sel=dict(block_size=4, topk=3, init_blocks=1, local_blocks=1)),
        dict(bsz=1, t=45, cu=[0, 11, 14, 45], mode="sparse", sel=dict(block_size=4, topk=2, init_blocks=0, local_blocks=1)),
        dict(bsz=1, t=29, cu=[0, 9, 29], mode="dense", sel=dict(block_size=4, topk=2, init_blocks=0, local_blocks=1))],
    4: [dict(bsz=1, t=53, cu=[0, 5, 30, 31, 53], mode="sparse", sel=dict(block_size=4, topk=3, init_blocks=1, local_blocks=2)),
        dict(bsz=2, t=41, cu=None, mode="dense", sel=dict(block_size=8, topk=2, init_blocks=0, local_blocks=1))],
}


def _worker(rank, world):
    for i, case in enumerate(CASES[world]):
        bsz, t, mode, sel = case["bsz"], case["t"], case["mode"], case["sel"]
        cu = None if case["cu"] is None else torch.tensor(case["cu"], dtype=torch.int32)
        glob = _inputs(bsz, t, seed=100 + i)
        o_ref, kl_ref, bi_ref, grads_ref = _single(*glob, cu, mode, sel)
        rows = ZigzagLayout(t, world).indices(rank)
        tol = dict(rtol=1e-9, atol=1e-11)
        for kv_exchange in ("fetch", "allgather"):
            tag = f"case {i} {kv_exchange}"
            loc = [zigzag_shard(x, rank, world).requires_grad_(j < 5) for j, x in enumerate(glob)]
            q, k, v, q_idx, k_idx, w = loc
            out = context_parallel_msa_attention(q, k, v, q_idx, k_idx, None, cu_seqlens=cu, mode=mode,
                                                 kv_exchange=kv_exchange, backend="reference", **sel)
            ((out.o * w).sum() + out.kl).backward()
            torch.testing.assert_close(out.o, o_ref[:, rows], **tol, msg=lambda m: f"{tag} o: {m}")
            torch.testing.assert_close(out.kl, kl_ref, **tol, msg=lambda m: f"{tag} kl: {m}")
            if mode == "sparse":
                assert torch.equal(out.block_indices, bi_ref[:, rows]), f"{tag}: selection differs"
            else:
                assert out.block_indices is None
            for name, x, gref in zip(("q", "k", "v", "q_idx", "k_idx"), loc, grads_ref):
                assert gref.abs().max() > 0, f"{tag}: {name} reference grad is zero (test would be vacuous)"
                torch.testing.assert_close(x.grad, gref[:, rows], **tol, msg=lambda m: f"{tag} grad {name}: {m}")
        # gather_sequence round-trips the layout
        torch.testing.assert_close(gather_sequence(out.o.detach(), t), o_ref, **tol)
    if world == 2:
        _check_layer(rank, world)
        _check_errors(rank, world)


def _check_layer(rank, world):
    """context_parallel_layer_forward: hidden, KL and (summed) parameter gradients of an MSAAttention
    layer with RoPE and the index norm + RoPE equal the single-process layer on a packed batch."""
    import copy
    from msa.layers import MSAAttention, MSAConfig
    from msa.parallel import context_parallel_layer_forward
    torch.manual_seed(0)
    cfg = MSAConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, index_dim=8, block_size=4,
                    topk_blocks=2, index_norm_rope=True, mode="sparse", backend="reference")
    ref = MSAAttention(cfg).double()
    cp = copy.deepcopy(ref)
    t, cu = 43, torch.tensor([0, 17, 43], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, t, 16, generator=g, dtype=torch.float64), torch.randn(1, t, 16, generator=g, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    out = ref(x_ref, cu_seqlens=cu, compute_kl=True)
    ((out.hidden * w).sum() + out.kl_loss).backward()
    x_loc = zigzag_shard(x, rank, world).requires_grad_(True)
    got = context_parallel_layer_forward(cp, x_loc, cu_seqlens=cu, compute_kl=True)
    ((got.hidden * zigzag_shard(w, rank, world)).sum() + got.kl_loss).backward()
    rows = ZigzagLayout(t, world).indices(rank)
    tol = dict(rtol=1e-6, atol=1e-9)  # RMSNorm computes in fp32 even for fp64 inputs
    torch.testing.assert_close(got.hidden, out.hidden[:, rows], **tol)
    torch.testing.assert_close(got.kl_loss, out.kl_loss, **tol)
    torch.testing.assert_close(x_loc.grad, x_ref.grad[:, rows], **tol)
    for (name, p_ref), p_cp in zip(ref.named_parameters(), cp.parameters()):
        gsum = p_cp.grad.clone()
        dist.all_reduce(gsum)
        assert p_ref.grad.abs().max() > 0, name
        torch.testing.assert_close(gsum, p_ref.grad, **tol, msg=lambda m: f"layer grad {name}: {m}")


def _check_errors(rank, world):
    q, k, v, q_idx, k_idx, _ = [zigzag_shard(x, rank, world) for x in _inputs(1, 20, 0)]
    kw = dict(block_size=4, topk=2, seqlen=20, backend="reference")
    with pytest.raises(ValueError, match="zigzag shard"):
        context_parallel_msa_attention(q[:, :-1], k[:, :-1], v[:, :-1], q_idx[:, :-1], k_idx[:, :-1], **kw)
    with pytest.raises(ValueError, match="k_idx must have shape"):
        context_parallel_msa_attention(q, k, v, q_idx, k_idx[..., :-1], **kw)
    with pytest.raises(ValueError, match="mode must be one of"):
        context_parallel_msa_attention(q, k, v, q_idx, k_idx, mode="warmup", **kw)
    with pytest.raises(ValueError, match="seqlen must be"):
        context_parallel_msa_attention(q[:, :1], k[:, :1], v[:, :1], q_idx[:, :1], k_idx[:, :1], **{**kw, "seqlen": 3})
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world):
    run_ranks(world, _worker)


def test_zigzag_layout():
    lay = ZigzagLayout(11, 2)
    assert lay.chunk_bounds() == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert lay.indices(0).tolist() == [0, 1, 2, 9, 10]
    assert lay.indices(1).tolist() == [3, 4, 5, 6, 7, 8]
    allidx = torch.cat([ZigzagLayout(23, 4).indices(r) for r in range(4)]).sort().values
    assert allidx.tolist() == list(range(23))
    with pytest.raises(ValueError, match="seqlen must be"):
        ZigzagLayout(3, 2)


def _triton_worker(rank, world):
    """The Triton kernels (interpreter on the CPU) inside CP: padded rows, the sub-problem's packed
    cu_seqlens and the teacher lse handed from the sparse attention to the KL."""
    g = torch.Generator().manual_seed(5)
    t, cu = 40, torch.tensor([0, 18, 40], dtype=torch.int32)
    q, k, v = (torch.randn(1, t, h, 16, generator=g) for h in (2, 1, 1))
    q_idx, k_idx, w = torch.randn(1, t, 1, 16, generator=g), torch.randn(1, t, 16, generator=g), torch.randn(1, t, 2, 16, generator=g)
    sel = dict(block_size=16, topk=2, init_blocks=0, local_blocks=1)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, q_idx, k_idx)]
    # single-process reference ops (the Triton ones equal them, tests/ops); halves the interpreter's work
    bi = msa.select_blocks(leaves[3], leaves[4], cu_seqlens=cu, backend="reference", **sel)
    o = msa.sparse_attention(*leaves[:3], bi, block_size=16, cu_seqlens=cu, backend="reference")
    kl = msa.indexer_kl_loss(leaves[3], leaves[4], leaves[0].detach(), leaves[1].detach(), bi, block_size=16,
                             cu_seqlens=cu, backend="reference")
    ((o * w).sum() + kl).backward()
    loc = [zigzag_shard(x, rank, world).requires_grad_(True) for x in (q, k, v, q_idx, k_idx)]
    out = context_parallel_msa_attention(*loc, cu_seqlens=cu, backend="triton", **sel)
    ((out.o * zigzag_shard(w, rank, world)).sum() + out.kl).backward()
    rows = ZigzagLayout(t, world).indices(rank)
    assert torch.equal(out.block_indices, bi[:, rows])
    torch.testing.assert_close(out.o, o.detach()[:, rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kl, kl.detach(), rtol=1e-4, atol=1e-6)
    for name, x, ref in zip(("q", "k", "v", "q_idx", "k_idx"), loc, leaves):
        torch.testing.assert_close(x.grad, ref.grad[:, rows], rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test: on a GPU machine the kernels may already be "
                    "compiled for CUDA in this process; benchmarks/bench_parallel.py gates CP with the GPU kernels")
def test_context_parallel_triton_kernels():
    pytest.importorskip("triton")
    run_ranks(2, _triton_worker)


def _model_worker(rank, world):
    """A whole MSAForCausalLM (a dense layer + an MSA layer, packed sequences) trained with context
    parallelism takes the same two optimizer steps as one process on the whole batch."""
    from msa.models import MSAForCausalLM
    from msa.parallel import (build_optimizer, cp_split_batch, cp_training_step, disable_context_parallel,
                              enable_context_parallel, training_step)
    from tests.parallel.test_training import tiny_model
    t, cu = 45, torch.tensor([0, 19, 45], dtype=torch.int32)
    ids = torch.randint(0, 32, (1, t), generator=torch.Generator().manual_seed(3))
    ref = tiny_model().double()
    cp = enable_context_parallel(tiny_model().double())
    assert isinstance(ref, MSAForCausalLM)
    opt_ref, opt_cp = build_optimizer(ref, lr=1e-2), build_optimizer(cp, lr=1e-2)
    inputs, labels = cp_split_batch(ids, rank, world, cu)
    for step in range(2):
        a = training_step(ref, opt_ref, ids, cu_seqlens=cu, grad_clip=1e-3)
        b = cp_training_step(cp, opt_cp, inputs, labels, cu_seqlens=cu, grad_clip=1e-3)
        for key in ("loss", "lm_loss", "kl_loss", "grad_norm", "index_grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]) + 1e-9, (step, key, a[key], b[key])
    for (name, p_ref), p_cp in zip(ref.named_parameters(), cp.parameters()):
        torch.testing.assert_close(p_cp, p_ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    disable_context_parallel(cp)  # back to one process: the full sequence gives the same logits
    torch.testing.assert_close(cp(ids, cu_seqlens=cu).logits, ref(ids, cu_seqlens=cu).logits, rtol=1e-6, atol=1e-9)


def test_context_parallel_model_training():
    run_ranks(2, _model_worker)


def test_sub_problem_plan():
    """A rank's sub-problem holds only the sequence prefixes its queries can see, as packed sequences."""
    from msa.parallel.context import _plan
    (ids0, cu0), (ids1, cu1) = _plan(45, 2, (0, 11, 14, 45))
    # rank 0 owns [0, 12) and [34, 45): sequence 0 + one token of sequence 1, then sequence 2 (from 14)
    assert ids0.tolist() == list(range(0, 12)) + list(range(14, 45)) and cu0.tolist() == [0, 11, 12, 43]
    # rank 1 owns [12, 23) and [23, 34): one merged segment from the start of sequence 1
    assert ids1.tolist() == list(range(11, 34)) and cu1.tolist() == [0, 3, 23]
    (ids, cu), _ = _plan(40, 2, None)
    assert ids.tolist() == list(range(40)) and cu is None


def test_cp_split_batch_and_errors():
    from msa.parallel import cp_split_batch, enable_context_parallel
    from tests.parallel.test_training import tiny_model
    ids = torch.arange(10).view(1, 10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    inp, lab = cp_split_batch(ids, 1, 2, cu)
    # T=10 over 2 ranks: chunks [0,3) [3,6) [6,8) [8,10); rank 1 owns [3,6) and [6,8)
    assert inp.tolist() == [[3, 4, 5, 6, 7]]
    assert lab.tolist() == [[-100, 5, 6, 7, 8]]   # token 3 ends sequence 0
    inp0, lab0 = cp_split_batch(ids, 0, 2, cu)
    assert inp0.tolist() == [[0, 1, 2, 8, 9]] and lab0.tolist() == [[1, 2, 3, 9, -100]]
    with pytest.raises(ValueError, match="input_ids must have shape"):
        cp_split_batch(ids[0], 0, 2)
    with pytest.raises(ValueError, match="initialized process group"):
        enable_context_parallel(tiny_model())
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        context_parallel_msa_attention(*_inputs(1, 8, 0)[:5])
