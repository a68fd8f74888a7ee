"""msa.hf on tiny random transformers models (CPU, fp32, no downloads): conversion, modes, packed and padded
batches, generation, save / load, KL gradients, MiniMax-M3 equivalence."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.24")
import msa.hf  # noqa: E402

V = 97
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def make_model(arch: str, *, layers: int = 2, seed: int = 0):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                  attn_implementation="eager")
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial biases (Qwen2) and QK-norm gains (Qwen3)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def converted(model, **kw):
    m = copy.deepcopy(model)
    msa.hf.to_msa(m, **kw)
    return m


def left_padded(seqs, pad=0):
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_mode_equals_original(arch):
    ref = make_model(arch)
    m = converted(ref, block_size=4, topk_blocks=2, index_dim=16)
    ids = torch.randint(1, V, (2, 21))
    torch.testing.assert_close(logits(m, ids), logits(ref, ids), atol=1e-5, rtol=0)
    # left-padded ragged batch: the real tokens' logits match the original's
    seqs = [torch.randint(1, V, (n,)) for n in (13, 6)]
    pids, mask = left_padded(seqs)
    a, b = logits(ref, pids, attention_mask=mask), logits(m, pids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(b[keep], a[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_with_all_blocks_equals_dense(arch):
    ref = make_model(arch)
    t, bs = 21, 4
    m = converted(ref, block_size=bs, topk_blocks=-(-t // bs), index_dim=16, mode="sparse")
    ids = torch.randint(1, V, (2, t))
    torch.testing.assert_close(logits(m, ids), logits(ref, ids), atol=1e-5, rtol=0)
    small = converted(ref, block_size=bs, topk_blocks=2, index_dim=16, mode="sparse")
    assert (logits(small, ids) - logits(ref, ids)).abs().max() > 1e-3  # the selection does act


def stepwise_greedy(model, seq, steps):
    out = seq.clone()
    for _ in range(steps):
        nxt = logits(model, out[None])[0, -1].argmax()
        out = torch.cat([out, nxt.view(1)])
    return out[len(seq):]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_generate_equals_stepwise_argmax(arch, padded):
    m = converted(make_model(arch), block_size=4, topk_blocks=2, index_dim=16, num_dense_layers=1, mode="sparse")
    steps = 6
    lens = (11, 6) if padded else (9, 9)
    seqs = [torch.randint(1, V, (n,)) for n in lens]
    ids, mask = left_padded(seqs)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    gen = out[:, ids.shape[1]:]
    for i, s in enumerate(seqs):
        assert torch.equal(gen[i], stepwise_greedy(m, s, steps)), f"sequence {i}"


def test_generate_sampling_top1_equals_greedy_and_cache_lengths():
    m = converted(make_model("llama"), block_size=4, topk_blocks=2, index_dim=16, mode="sparse")
    seqs = [torch.randint(1, V, (n,)) for n in (10, 5, 7)]
    ids, mask = left_padded(seqs)
    with torch.no_grad():
        greedy = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        sampled = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1, temperature=0.7)
        out = m(ids, attention_mask=mask, use_cache=True)
    assert torch.equal(greedy, sampled)
    # the cache holds each sequence's own tokens only (pads excluded); transformers sees the padded slots
    assert out.cache.seq_lens(0) == [10, 5, 7]
    assert out.cache.get_seq_length() == ids.shape[1]


def test_packed_documents_reach_varlen_path(monkeypatch):
    m = converted(make_model("qwen3"), block_size=4, topk_blocks=2, index_dim=16, mode="sparse")
    docs = [torch.randint(1, V, (n,)) for n in (9, 14, 5)]
    packed = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    seen = []
    import msa.layers.attention as layer_attention
    real = layer_attention.select_blocks

    def spy(*a, **kw):
        seen.append(kw.get("cu_seqlens"))
        return real(*a, **kw)

    monkeypatch.setattr(layer_attention, "select_blocks", spy)
    got = logits(m, packed, position_ids=pos)
    assert seen and seen[0] is not None and seen[0].tolist() == [0, 9, 23, 28]
    want = torch.cat([logits(m, d[None]) for d in docs], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # eval forward with the config's use_cache: no cache for packed documents
        out = m(packed, position_ids=pos)
    assert out.cache is None
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="packed documents"):
        m(packed, position_ids=pos, use_cache=True)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kl_grads_reach_only_index_params(mode):
    m = converted(make_model("llama"), block_size=4, topk_blocks=2, index_dim=16, num_dense_layers=1, mode=mode,
                  index_norm_rope=True)
    m.train()
    idx_params = msa.hf.index_parameters(m)
    assert len(idx_params) == 4  # q_idx_proj, k_idx_proj and two norms of the one sparse layer
    idx_ids = {id(p) for p in idx_params}
    ids = torch.randint(1, V, (2, 17))
    out = m(ids, labels=ids)
    out.loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in idx_params), "the LM loss reached the index branch"
    assert all(p.grad is not None for p in m.parameters() if id(p) not in idx_ids)
    m.zero_grad(set_to_none=True)
    kl = msa.hf.kl_loss(m)
    assert kl.dim() == 0 and float(kl.detach()) > 0
    kl.backward()
    for name, p in m.named_parameters():
        if id(p) in idx_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), f"the KL reached {name}"


def test_save_load_round_trip(tmp_path):
    m = converted(make_model("qwen2", layers=3), block_size=4, topk_blocks=2, index_dim=16, num_dense_layers=1,
                  index_norm_rope=True, init_blocks=1, local_blocks=1)
    with torch.no_grad():
        for p in msa.hf.index_parameters(m):
            p.add_(torch.randn_like(p) * 0.3)
    msa.hf.set_mode(m, "sparse")
    m.save_pretrained(tmp_path)
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))
    assert {k: cfg[k] for k in ("sparse_block_size", "sparse_topk_blocks", "sparse_index_dim", "sparse_num_index_heads",
                                "sparse_init_blocks", "sparse_local_blocks", "sparse_attention_freq",
                                "sparse_mode")} == dict(
        sparse_block_size=4, sparse_topk_blocks=2, sparse_index_dim=16, sparse_num_index_heads=2,
        sparse_init_blocks=1, sparse_local_blocks=1, sparse_attention_freq=[0, 1, 1], sparse_mode="sparse")
    r = msa.hf.from_pretrained(str(tmp_path))
    assert msa.hf.msa_settings(r) == msa.hf.msa_settings(m)
    sd_m, sd_r = m.state_dict(), r.state_dict()
    assert sd_m.keys() == sd_r.keys()
    for k in sd_m:
        assert torch.equal(sd_m[k], sd_r[k]), k
    ids = torch.randint(1, V, (2, 19))
    assert torch.equal(logits(r.eval(), ids), logits(m, ids))


def make_m3(seed=0):
    cfg = transformers.MiniMaxM3VLTextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=32, dense_intermediate_size=96, shared_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, index_n_heads=2, index_head_dim=16, index_block_size=4, index_topk_blocks=3,
        index_local_blocks=2, layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
        mlp_layer_types=["dense", "sparse", "sparse"], bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.MiniMaxM3VLForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma-style norms start at zero gain offsets: make them non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def test_minimax_m3_equals_transformers_eager(monkeypatch):
    ref = make_m3()
    m = converted(ref)
    s = msa.hf.msa_settings(m)
    assert (s.kind, s.mode, s.sparse_layers, s.index_scale) == ("minimax_m3", "sparse", [1, 2], 1.0)
    ids = torch.randint(0, V, (2, 27))
    theirs = []
    hooks = [lay.self_attn.indexer.register_forward_hook(lambda mod, a, out: theirs.append(out))
             for lay in ref.model.layers if lay.self_attn.indexer is not None]
    ours = []
    import msa.layers.attention as layer_attention
    real = layer_attention.select_blocks
    monkeypatch.setattr(layer_attention, "select_blocks", lambda *a, **kw: ours.append(real(*a, **kw)) or ours[-1])
    want = logits(ref, ids)
    got = logits(m, ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(theirs) == len(ours) == 2
    for t_sel, o_sel in zip(theirs, ours):  # theirs (B, H, T, k), ours (B, T, H_kv, k); compare as sets
        t_sel = t_sel.transpose(1, 2)
        kk = max(t_sel.shape[-1], o_sel.shape[-1])
        pad = lambda x: torch.nn.functional.pad(x, (0, kk - x.shape[-1]), value=-1)  # noqa: E731
        a, b = pad(t_sel.to(torch.int64)).sort(-1).values, pad(o_sel.to(torch.int64)).sort(-1).values
        assert torch.equal(a, b)
        assert (b[..., -1] >= 0).all() and (b == -1).any()  # some rows see fewer blocks than topk


def test_minimax_m3_generate_and_kl():
    m = converted(make_m3())
    seq = torch.randint(0, V, (10,))
    with torch.no_grad():
        out = m.generate(seq[None], max_new_tokens=5, do_sample=False)
    assert torch.equal(out[0, 10:], stepwise_greedy(m, seq, 5))
    m.train()
    ids = torch.randint(0, V, (1, 15))
    m(ids).logits.float().sum()  # forward only: the KL must be recorded
    kl = msa.hf.kl_loss(m)
    kl.backward()
    idx = {id(p) for p in msa.hf.index_parameters(m)}
    assert all(p.grad is not None for p in msa.hf.index_parameters(m))
    assert all(p.grad is None for p in m.parameters() if id(p) not in idx)


def test_bad_input_is_rejected():
    ref = make_model("llama")
    with pytest.raises(ValueError, match="mode must be one of"):
        converted(ref, mode="fast")
    with pytest.raises(ValueError, match="topk"):
        converted(ref, block_size=4, topk_blocks=0)
    m = converted(ref, block_size=4, topk_blocks=2, index_dim=16)
    with pytest.raises(ValueError, match="already converted"):
        msa.hf.to_msa(m)
    with pytest.raises(ValueError, match="MSAHFCache"):
        m(torch.randint(1, V, (1, 5)), cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="no KL terms"):
        msa.hf.kl_loss(m)
    with pytest.raises(ValueError, match="not converted"):
        msa.hf.set_mode(ref, "sparse")
    with pytest.raises(ValueError, match="differs from the MiniMax-M3"):
        converted(make_m3(), block_size=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton prefill and decode kernels)")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_on_gpu_equals_stepwise_argmax(arch):
    """The Triton prefill kernels and the decode kernels (DecodePlan) agree: fp32 generate() of ragged left-padded
    prompts equals step-by-step argmax of full forwards."""
    m = converted(make_model(arch), block_size=16, topk_blocks=2, index_dim=16, mode="sparse").cuda()
    seqs = [torch.randint(1, V, (n,), device="cuda") for n in (70, 37)]
    ids, mask = left_padded([s.cpu() for s in seqs])
    with torch.no_grad():
        out = m.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=6, do_sample=False)
    gen = out[:, ids.shape[1]:]
    for i, s in enumerate(seqs):
        assert torch.equal(gen[i], stepwise_greedy(m, s, 6)), f"sequence {i}"


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_cache_continuation_in_chunks_equals_full_forward(mode):
    """Prefill 12 tokens into the cache, then feed 5 and 1 more tokens per sequence (decode with t > 1)."""
    m = converted(make_model("qwen3", layers=3), block_size=4, topk_blocks=2, index_dim=16, num_dense_layers=1,
                  index_norm_rope=True, mode=mode)
    ids = torch.randint(1, V, (2, 18))
    full = logits(m, ids)
    with torch.no_grad():
        out = m(ids[:, :12], use_cache=True)
        cache = out.cache
        assert isinstance(cache, msa.hf.MSAHFCache) and cache.seq_lens(2) == [12, 12]
        pos = torch.arange(12, 17).expand(2, 5)
        mid = m(ids[:, 12:17], cache=cache, position_ids=pos).logits
        last = m(ids[:, 17:], cache=cache, position_ids=torch.full((2, 1), 17)).logits
    torch.testing.assert_close(out.logits, full[:, :12], atol=1e-5, rtol=0)
    torch.testing.assert_close(mid, full[:, 12:17], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, full[:, 17:], atol=1e-5, rtol=0)


def test_minimax_m3_save_load_round_trip(tmp_path):
    m = converted(make_m3())
    msa.hf.set_mode(m, "dense")
    m.save_pretrained(tmp_path)
    r = msa.hf.from_pretrained(str(tmp_path)).eval()
    s = msa.hf.msa_settings(r)
    assert (s.kind, s.mode, s.sparse_layers) == ("minimax_m3", "dense", [1, 2])
    ids = torch.randint(0, V, (1, 21))
    assert torch.equal(logits(r, ids), logits(m, ids))
