"""MSAAttention and the LM with backend="triton" (GPU, or the interpreter on CPU) against backend="reference":
forward, KL and every parameter gradient, in both modes, and one optimizer step end to end."""

import pytest
import torch

from msa.layers import MSAAttention, MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def cfg(backend, **kw):
    base = dict(hidden_size=64, num_heads=6, num_kv_heads=2, head_dim=16, index_dim=16, block_size=16, topk_blocks=3,
                backend=backend)
    base.update(kw)
    return MSAConfig(**base)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def layer_pair_step(seed, x, cu=None, **kw):
    """A reference and a Triton layer with the same weights, each run through one training step
    (forward, hidden**2 + KL, backward) on x: (ref, tri, [ref output, tri output])."""
    torch.manual_seed(seed)
    ref = MSAAttention(cfg("reference", **kw)).to(DEV)
    tri = MSAAttention(cfg("triton", **kw)).to(DEV)
    tri.load_state_dict(ref.state_dict())
    outs = []
    for m in (ref, tri):
        m.train()
        out = m(x, cu_seqlens=cu)
        (out.hidden.square().mean() + out.kl_loss).backward()
        outs.append(out)
    return ref, tri, outs


def assert_pair_matches(ref, tri, outs):
    """Triton output within 1e-4, KL within 1e-4 relative, every gradient within 1e-3 of the reference."""
    assert rel(outs[1].hidden, outs[0].hidden) < 1e-4
    assert abs(outs[1].kl_loss.item() - outs[0].kl_loss.item()) <= 1e-4 * max(1.0, abs(outs[0].kl_loss.item()))
    for (name, p_ref), (_, p_tri) in zip(ref.named_parameters(), tri.named_parameters()):
        assert p_tri.grad is not None, name
        assert rel(p_tri.grad, p_ref.grad) < 1e-3, f"{name}: {rel(p_tri.grad, p_ref.grad):.2e}"


@pytest.mark.parametrize("mode,fp8", [("sparse", False), ("dense", False), ("sparse", True)])
def test_layer_triton_matches_reference(mode, fp8):
    """fp8=True: the selection comes from fp8 index scores on both backends (the same quantised scores)."""
    x = torch.randn(1, 100, 64, device=DEV)
    cu = torch.tensor([0, 37, 100], dtype=torch.int32, device=DEV)  # packed, partial blocks adjacent
    ref, tri, outs = layer_pair_step(0, x, cu, mode=mode, fp8_index_scores=fp8)
    if mode == "sparse":
        # the convention leaves the order of the non-local ids free: compare sorted rows
        assert torch.equal(outs[0].block_indices.sort(-1).values, outs[1].block_indices.sort(-1).values)
        assert torch.equal(outs[0].block_indices[..., -1], outs[1].block_indices[..., -1])
    assert_pair_matches(ref, tri, outs)


def test_layer_triton_full_kl_support_matches_reference():
    """Sparse attention with the KL over every causal token (phase.full_kl_every's steps)."""
    x = torch.randn(1, 100, 64, device=DEV)
    cu = torch.tensor([0, 37, 100], dtype=torch.int32, device=DEV)
    torch.manual_seed(0)
    ref = MSAAttention(cfg("reference", mode="sparse")).to(DEV)
    tri = MSAAttention(cfg("triton", mode="sparse")).to(DEV)
    tri.load_state_dict(ref.state_dict())
    outs = []
    for m in (ref, tri):
        m.train()
        out = m(x, cu_seqlens=cu, kl_support="full")
        (out.hidden.square().mean() + out.kl_loss).backward()
        outs.append(out)
    dense_kl = MSAAttention(cfg("reference", mode="dense")).to(DEV)
    dense_kl.load_state_dict(ref.state_dict())
    dense_kl.train()
    want = dense_kl(x, cu_seqlens=cu).kl_loss.item()  # the warmup's KL: the same support
    assert abs(outs[0].kl_loss.item() - want) <= 1e-5 * max(1.0, abs(want))
    assert_pair_matches(ref, tri, outs)


def test_model_trains_with_triton_backend():
    torch.manual_seed(1)
    make = lambda b: MSAForCausalLM(MSALMConfig(vocab_size=64, num_layers=2, intermediate_size=64,  # noqa: E731
                                                attention=cfg(b), num_dense_layers=0)).to(DEV)
    ref, tri = make("reference"), make("triton")
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 80), device=DEV)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(tri.parameters(), lr=0.1)
    lr_, lt_ = ref.training_step(ids, opt_r), tri.training_step(ids, opt_t)
    for key in ("loss", "lm_loss", "kl_loss"):
        assert abs(lr_[key] - lt_[key]) <= 1e-4 * max(1.0, abs(lr_[key])), key
    for (name, a), (_, b) in zip(ref.named_parameters(), tri.named_parameters()):
        assert rel(b.detach(), a.detach()) < 1e-4, name  # the same update was applied


@pytest.mark.parametrize("chunked", [False, True])
def test_sparse_step_builds_each_reverse_index_once(monkeypatch, tuned, chunked):
    """One layer step (forward, KL, backward) with the Triton backend builds the selection's metadata
    once: one reverse index per query chunk plus one full index for dK/dV, shared by the forward, the
    dQ pass and the KL (which used to build their own), and the results still match the reference."""
    import importlib
    tuned(sparse_fwd_kernel="kv", sparse_bwd_dq="kv")  # the KV-outer forward and dQ walk the reverse index too
    if chunked:  # 40-token query chunks: partial budgets of a few KB
        tuned(sparse_fwd_partial_bytes=40 * 3 * 6 * (16 * 4 + 4), kl_partial_bytes=1 << 30)
    calls = []
    real = importlib.import_module("msa.ops.utils.reverse_index").build_reverse_index
    for mod in ("msa.ops.utils.reverse_index", "msa.ops.sparse_attention.triton_impl",
                "msa.ops.sparse_attention.triton_bwd", "msa.ops.indexer_kl.triton_impl"):
        monkeypatch.setattr(importlib.import_module(mod), "build_reverse_index",
                            lambda *a, **kw: calls.append(kw.get("token_range")) or real(*a, **kw))
    ref, tri, outs = layer_pair_step(3, torch.randn(2, 113, 64, device=DEV))
    n_chunks = 6 if chunked else 1  # 226 tokens in chunks of 40
    assert len(calls) == n_chunks + (1 if chunked else 0), calls
    assert len(set(calls)) == len(calls), f"a reverse index was built twice: {calls}"
    assert_pair_matches(ref, tri, outs)


def test_tiled_step_builds_each_tile_union_once(monkeypatch, tuned):
    """With the query-tiled forward and dQ (auto's choice below 32K tokens), one layer step builds one
    tile union per distinct tiling (the forward's and the dQ's: one when their tile sizes agree, as
    on sm_90), cached in the SelectionPlan, not one per call, and matches the reference layer."""
    import importlib
    from msa.ops.sparse_attention.triton_bwd import bwd_config
    from msa.ops.sparse_attention.triton_impl import tiled_tile_tokens
    from msa.ops.utils.tile_union import tile_tokens_for
    from msa.ops.utils.triton_helpers import large_shared_memory
    tuned(sparse_fwd_kernel="tiled", sparse_bwd_dq="tiled")
    c = cfg("triton")
    g = c.num_heads // c.num_kv_heads
    tilings = {tiled_tile_tokens(c.head_dim, g, c.block_size),
               tile_tokens_for(g, bwd_config(g, c.head_dim, c.block_size, large_shared_memory(DEV))["DQT_BLOCK_M"],
                                   c.block_size)}
    tu = importlib.import_module("msa.ops.utils.tile_union")
    calls = []
    real = tu.build_tile_union
    monkeypatch.setattr(tu, "build_tile_union", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    for mod in ("msa.ops.sparse_attention.triton_impl", "msa.ops.sparse_attention.triton_bwd"):
        monkeypatch.setattr(importlib.import_module(mod), "build_tile_union",
                            lambda *a, **kw: calls.append(("unplanned", a[3])) or real(*a, **kw))
    ref, tri, outs = layer_pair_step(4, torch.randn(2, 113, 64, device=DEV))
    assert len(calls) == len(set(calls)) and set(calls) == tilings, (calls, tilings)
    assert_pair_matches(ref, tri, outs)


def test_prefill_reads_the_memory_budget_only_when_a_kernel_needs_it(monkeypatch, tuned):
    """The KV-outer chunking's budget reads the device's free memory (a driver call that waits on
    queued work): a sparse prefill on the query-tiled forward (auto's choice below 32K tokens) makes
    no such call; the KL, whose reverse indices are chunked, makes one per layer step."""
    import importlib
    from msa.layers.attention import msa_prefill_attention
    tuned(sparse_fwd_kernel="auto")
    sat = importlib.import_module("msa.ops.sparse_attention.triton_impl")
    calls = []
    real = sat._partial_budget
    monkeypatch.setattr(sat, "_partial_budget", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 90, h, 16, generator=g, device=DEV) for h in (6, 2, 2))
    qi, ki = torch.randn(1, 90, 2, 16, generator=g, device=DEV), torch.randn(1, 90, 16, generator=g, device=DEV)
    kw = dict(sparse=True, block_size=16, topk_blocks=3, scale=0.25, index_scale=0.25, backend="triton")
    o, kl, bi = msa_prefill_attention(q, k, v, qi, ki, compute_kl=False, **kw)
    assert calls == [] and kl is None
    o_kl, kl, _ = msa_prefill_attention(q, k, v, qi, ki, compute_kl=True, **kw)
    assert len(calls) == 1 and kl is not None
    ref = importlib.import_module("msa.ops.sparse_attention.reference").sparse_attention_reference
    o_ref, _ = ref(q, k, v, bi, block_size=16, scale=0.25, cu_seqlens=None)
    assert torch.equal(o, o_kl) and rel(o, o_ref) < 1e-4


def test_layer_rejects_bad_cu_seqlens_values_without_debug():
    """cu_seqlens' values are checked where a launcher copies them to the host, so a bad one still
    raises a clear error in the default (non-debug) mode."""
    layer = MSAAttention(cfg("triton")).to(DEV)
    x = torch.randn(1, 50, 64, device=DEV)
    for cu, match in (([0, 30, 40], "must end at T=50"), ([0, 30, 30, 50], "strictly increasing")):
        with pytest.raises(ValueError, match=match):
            layer(x, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_model_loss_compiles_fullgraph(mode):
    """The model's loss (all layers, selection, attention, KL) traces into ONE graph with
    torch.compile(fullgraph=True): the Triton launchers are opaque custom ops, validation does not
    sync. aot_eager runs the traced forward and backward graphs (no C++ compiler needed on the CPU),
    so the values and gradients are compared with the eager step."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = MSAForCausalLM(MSALMConfig(vocab_size=64, num_layers=2, intermediate_size=64, attention=cfg("triton"),
                                       num_dense_layers=0)).to(DEV)
    model.set_mode(mode)
    model.train()
    ids = torch.randint(0, 64, (1, 70), device=DEV)
    cu = torch.tensor([0, 33, 70], dtype=torch.int32, device=DEV)
    results = []
    for fn in (model.loss, torch.compile(model.loss, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        losses = fn(ids, cu_seqlens=cu)
        losses["loss"].backward()
        results.append(({k: v.item() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager, g_eager), (comp, g_comp) = results
    for key in eager:
        assert abs(eager[key] - comp[key]) <= 1e-5 * max(1.0, abs(eager[key])), key
    assert g_eager.keys() == g_comp.keys()
    for name in g_eager:
        assert rel(g_comp[name], g_eager[name]) < 1e-4, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA notion")
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("kernel", ["tiled", "kv"])
def test_layer_training_step_does_not_sync(mode, kernel, tuned):
    """Once a layout has been seen, a training step of the layer (forward with the KL, backward) issues
    no host synchronisation: the layouts, plans and reverse indices are built on the device or cached,
    so the host keeps queueing kernels ahead of the GPU (a sync per op left the GPU idle ~17% of a
    sparse_attention forward + backward at 8K tokens on an H200)."""
    tuned(sparse_fwd_kernel=kernel)
    torch.manual_seed(0)
    layer = MSAAttention(cfg("triton", mode=mode)).to(DEV, torch.bfloat16).train()
    x = torch.randn(2, 100, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(x, compute_kl=True)
        (out.hidden.float().square().mean() + out.kl_loss).backward()
    step()  # first call: compiles kernels, fills the layout caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
