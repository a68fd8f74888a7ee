"""MSAAttention and the small LM: modes, detach rules, decode == prefill, generation, bad configs."""

import math

import pytest
import torch

import msa
from msa.layers import MSAAttention, MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig
from tests.oracle import oracle_attention, selection_sets


def small_cfg(**kw):
    base = dict(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16, index_dim=8, block_size=8, topk_blocks=3,
                backend="reference")
    base.update(kw)
    return MSAConfig(**base)


def layer(seed=0, **kw):
    torch.manual_seed(seed)
    return MSAAttention(small_cfg(**kw)).double()


@pytest.mark.parametrize("index_norm_rope", [False, True])
def test_layer_sparse_mode_equals_oracle(index_norm_rope):
    """Layer output = o_proj(oracle sparse attention over the layer's own selection)."""
    lyr = layer(index_norm_rope=index_norm_rope, rotary_dim=8)
    x = torch.randn(2, 70, 48, dtype=torch.float64)
    out = lyr(x, compute_kl=False)
    assert out.block_indices is not None and out.block_indices.shape == (2, 70, 2, 3)
    q, k, v, q_idx, k_idx = lyr.project(x, torch.arange(70).view(1, -1).expand(2, -1))
    # the selection is the index branch's own top-k
    assert torch.equal(out.block_indices, msa.select_blocks(q_idx, k_idx, block_size=8, topk=3))
    o, _ = oracle_attention(q, k, v, selection_sets(out.block_indices), block_size=8)
    torch.testing.assert_close(out.hidden, lyr.o_proj(o.reshape(2, 70, -1)), rtol=1e-10, atol=1e-10)


def test_layer_dense_mode_is_full_causal_and_sparse_with_all_blocks_matches():
    lyr = layer()
    x = torch.randn(1, 40, 48, dtype=torch.float64)
    lyr.set_mode("dense")
    dense = lyr(x, compute_kl=False).hidden
    lyr.config.topk_blocks = math.ceil(40 / 8)
    lyr.set_mode("sparse")
    sparse_all = lyr(x, compute_kl=False).hidden
    torch.testing.assert_close(dense, sparse_all, rtol=1e-10, atol=1e-10)


def test_layer_kl_equals_functional_kl_in_both_modes():
    lyr = layer()
    lyr.train()
    x = torch.randn(1, 50, 48, dtype=torch.float64)
    for mode in ("dense", "sparse"):
        lyr.set_mode(mode)
        out = lyr(x)
        assert out.kl_loss is not None and float(out.kl_loss.detach()) > 0
        q, k, _, q_idx, k_idx = lyr.project(x, torch.arange(50).view(1, -1))
        want = msa.indexer_kl_loss(q_idx, k_idx, q, k, out.block_indices, block_size=8, backend="reference")
        torch.testing.assert_close(out.kl_loss.double(), want.double(), rtol=1e-10, atol=1e-12)


def test_sparse_layer_with_full_kl_support():
    """kl_support="full": the attention stays sparse (same output, same selection) and the KL is the one
    over every causal token (the warmup's), with the gradient reaching only the index projections."""
    lyr = layer()
    lyr.train()
    x = torch.randn(1, 50, 48, dtype=torch.float64)
    sel = lyr(x)
    lyr.zero_grad()
    full = lyr(x, kl_support="full")
    torch.testing.assert_close(full.hidden, sel.hidden, rtol=0, atol=0)
    assert torch.equal(full.block_indices, sel.block_indices)
    q, k, _, q_idx, k_idx = lyr.project(x, torch.arange(50).view(1, -1))
    want = msa.indexer_kl_loss(q_idx, k_idx, q, k, None, block_size=8, backend="reference")
    torch.testing.assert_close(full.kl_loss.double(), want.double(), rtol=1e-10, atol=1e-12)
    assert abs(full.kl_loss.item() - sel.kl_loss.item()) > 1e-3  # another support, another loss
    full.kl_loss.backward()
    assert lyr.q_idx_proj.weight.grad.abs().sum() > 0 and lyr.q_proj.weight.grad is None
    with pytest.raises(ValueError, match="kl_support"):
        lyr(x, kl_support="all")


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    att = small_cfg(**{k: v for k, v in kw.items() if k in MSAConfig.__dataclass_fields__})
    rest = {k: v for k, v in kw.items() if k not in MSAConfig.__dataclass_fields__}
    cfg = MSALMConfig(vocab_size=64, num_layers=3, intermediate_size=64, attention=att, **rest)
    return MSAForCausalLM(cfg).double()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_detach_rules(mode):
    """The KL moves only the index projections; the LM loss never reaches them."""
    model = tiny_model(num_dense_layers=1)
    model.set_mode(mode)
    ids = torch.randint(0, 64, (2, 60))
    losses = model.loss(ids)
    index_params = model.index_parameters()
    assert len(index_params) == 4  # q_idx and k_idx projections of the two MSA layers
    g_kl = torch.autograd.grad(losses["kl_loss"], model.backbone_parameters() + index_params, allow_unused=True)
    nb = len(model.backbone_parameters())
    assert all(g is None or g.abs().max() == 0 for g in g_kl[:nb]), "KL moved the backbone"
    assert all(g is not None and g.abs().max() > 0 for g in g_kl[nb:]), "KL must train the index projections"
    g_lm = torch.autograd.grad(losses["lm_loss"], model.backbone_parameters() + index_params, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in g_lm[nb:]), "LM loss reached the index projections"
    assert sum(float(g.abs().sum()) for g in g_lm[:nb] if g is not None) > 0


def test_total_loss_is_lm_plus_lambda_times_sum_of_layer_kls():
    model = tiny_model(kl_weight=0.37)
    ids = torch.randint(0, 64, (1, 40))
    torch.manual_seed(0)
    losses = model.loss(ids)
    out = model(ids, compute_kl=True)
    per_layer = []
    x = model.embed(ids)
    for i, lyr in enumerate(model.layers):
        x, o = lyr(x, layer_idx=i, compute_kl=True)
        per_layer.append(o.kl_loss)
    torch.testing.assert_close(out.kl_loss, sum(per_layer))
    torch.testing.assert_close(losses["loss"], losses["lm_loss"] + 0.37 * sum(per_layer))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_layer_decode_equals_prefill(mode):
    lyr = layer(seed=3, init_blocks=1)
    lyr.set_mode(mode)
    lyr.eval()
    x = torch.randn(2, 45, 48, dtype=torch.float64)
    full = lyr(x, compute_kl=False)
    cache = msa.MSACache(1, 2, 64, 2, 16, 8, dtype=torch.float64)
    parts = [lyr(x[:, :13], cache=cache).hidden]  # prefill
    parts.append(lyr(x[:, 13:17], cache=cache).hidden)  # chunk of 4 (multi-token step)
    for t in range(17, 45):
        parts.append(lyr(x[:, t:t + 1], cache=cache).hidden)
    torch.testing.assert_close(torch.cat(parts, 1), full.hidden, rtol=1e-10, atol=1e-10)


def test_model_decode_equals_prefill_and_generate_handles_ragged_prompts():
    model = tiny_model(seed=4, num_dense_layers=1).eval()
    ids = torch.randint(0, 64, (2, 50))
    full = model(ids, compute_kl=False).logits
    cache = model.new_cache(2, 64)
    steps = [model(ids[:, :20], cache=cache, compute_kl=False).logits]
    steps += [model(ids[:, t:t + 1], cache=cache, compute_kl=False).logits for t in range(20, 50)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    # batched generation with different prompt lengths equals one prompt at a time
    prompts = [ids[0, :7], ids[1, :29]]
    together = model.generate(prompts, 6)
    for p, g in zip(prompts, together):
        alone = model.generate([p], 6)[0]
        assert torch.equal(alone, g)
        # greedy generation equals argmax of a full forward over prompt + generated tokens
        seq = torch.cat([p, g])
        logits = model(seq.view(1, -1), compute_kl=False).logits[0]
        assert torch.equal(logits[p.numel() - 1:-1].argmax(-1), g)


def test_packed_training_batch_equals_separate_sequences():
    model = tiny_model(seed=5)
    a, b = torch.randint(0, 64, (1, 19)), torch.randint(0, 64, (1, 33))
    cu = torch.tensor([0, 19, 52], dtype=torch.int32)
    packed = model(torch.cat([a, b], 1), cu_seqlens=cu, compute_kl=False).logits
    torch.testing.assert_close(packed[:, :19], model(a, compute_kl=False).logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:, 19:], model(b, compute_kl=False).logits, rtol=1e-10, atol=1e-10)


def test_training_reduces_loss():
    model = tiny_model(seed=6).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 48))
    first = model.training_step(ids, opt)
    for _ in range(15):
        last = model.training_step(ids, opt)
    assert last["lm_loss"] < first["lm_loss"] - 0.5


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_training_step_under_bf16_autocast(mode):
    """autocast_dtype=torch.bfloat16 (what the GPU demo uses): the attention ops receive bf16 inputs,
    the losses stay close to the fp32 step's (bf16 rounding only), the parameters and their updates
    stay fp32, and both the backbone and the index branch move."""
    seen = []
    orig = msa.layers.attention.dense_causal_attention if mode == "dense" else msa.layers.attention.sparse_attention

    def spy(q, *a, **kw):
        seen.append(q.dtype)
        return orig(q, *a, **kw)
    model = tiny_model(seed=7).float()
    model.set_mode(mode)
    ids = torch.randint(0, 64, (2, 40))
    ref = {k: v.item() for k, v in model.loss(ids).items()}
    before = {id(p): p.detach().clone() for p in model.parameters()}
    name = "dense_causal_attention" if mode == "dense" else "sparse_attention"
    setattr(msa.layers.attention, name, spy)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        got = model.training_step(ids, opt, autocast_dtype=torch.bfloat16)
    finally:
        setattr(msa.layers.attention, name, orig)
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert abs(got["lm_loss"] - ref["lm_loss"]) < 0.03 * abs(ref["lm_loss"])
    assert abs(got["kl_loss"] - ref["kl_loss"]) < 0.05 * abs(ref["kl_loss"]) + 1e-3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="autocast_dtype"):
        model.training_step(ids, opt, autocast_dtype=torch.float64)
    moved = lambda ps: [not torch.equal(p, before[id(p)]) for p in ps]  # noqa: E731
    assert all(moved(model.backbone_parameters()))
    idx = moved(model.index_parameters())
    assert idx and all(idx)


@pytest.mark.parametrize("kw,arg", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_index_heads=3), "num_index_heads"),
    (dict(topk_blocks=1, init_blocks=1), "topk"),
    (dict(block_size=0), "block_size"),
    (dict(mode="fast"), "mode"),
    (dict(rotary_dim=7), "rotary_dim"),
])
def test_bad_config(kw, arg):
    with pytest.raises(ValueError, match=arg):
        small_cfg(**kw)


def test_bad_layer_input_and_cache_overflow():
    lyr = layer()
    with pytest.raises(ValueError, match="x"):
        lyr(torch.randn(1, 5, 47, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):  # was a matmul error inside
        lyr(torch.ones(1, 5, 48, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must hold at least one token"):
        lyr(torch.randn(1, 0, 48, dtype=torch.float64))
    cache = msa.MSACache(1, 1, 8, 2, 16, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_seq_len"):
        lyr(torch.randn(1, 9, 48, dtype=torch.float64), cache=cache)
