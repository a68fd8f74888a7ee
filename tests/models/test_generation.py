"""generate() / GenerationSession: the device-side decode step against full forwards (CPU, ragged
batches), sampling, entry validation, one decode plan per generation, and on CUDA the captured step
against the uncaptured one."""

import pytest
import torch

from msa.layers import MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig
from msa.models.generation import GenerationSession, pick_tokens
from msa.ops.decode import triton_impl

CUDA = torch.cuda.is_available()


def model_of(seed=0, dtype=torch.float64, device="cpu", num_layers=3, num_dense_layers=1, vocab=64, **att):
    base = dict(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16, index_dim=8, block_size=8, topk_blocks=2,
                init_blocks=0, local_blocks=1, backend="reference")
    base.update(att)
    torch.manual_seed(seed)
    cfg = MSALMConfig(vocab_size=vocab, num_layers=num_layers, intermediate_size=64, num_dense_layers=num_dense_layers,
                      attention=MSAConfig(**base))
    return MSAForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def ragged_prompts(lens, vocab, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).to(device) for n in lens]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_device_step_equals_full_forward_ragged(mode):
    """Uncaptured device-side path (append_device, device lengths, memoised plans): after the prefill
    and after every step, each sequence's logits equal a full forward over its prompt + the tokens
    generated so far (float64, 1e-9), for prompts of different lengths in one batch; the selection
    (block 8, top-2) is really sparse for the longer prompts."""
    model = model_of(seed=2)
    model.set_mode(mode)
    prompts = ragged_prompts([5, 19, 34], 64)
    n_new = 7
    sess = GenerationSession(model, prompts, n_new, cuda_graph=False)
    with torch.no_grad():
        sess.prefill()
        for step in range(n_new):
            if step:
                sess.step()
            for b, p in enumerate(prompts):
                seq = torch.cat([p, sess.out[b, :step]])
                full = model(seq.view(1, -1), compute_kl=False).logits[0, -1]
                torch.testing.assert_close(sess.logits[b], full, rtol=1e-9, atol=1e-9)
                assert int(sess.out[b, step]) == int(full.argmax())
    toks = sess.tokens()
    assert [t.numel() for t in toks] == [n_new] * 3
    # host lengths are synced at the end: prompt + the n_new - 1 tokens fed back
    for li in range(model.config.num_layers):
        assert sess.cache.seq_lens(li).tolist() == [n + n_new - 1 for n in (5, 19, 34)]


def test_generate_batched_equals_one_at_a_time():
    model = model_of(seed=3)
    prompts = ragged_prompts([9, 30, 1], 64, seed=4)
    together = model.generate(prompts, 6, cuda_graph=False)
    for p, g in zip(prompts, together):
        assert torch.equal(model.generate([p], 6)[0], g)


def test_sampling_top1_is_greedy_and_seeded_sampling_repeats():
    model = model_of(seed=5)
    prompts = ragged_prompts([11, 4], 64, seed=6)
    greedy = model.generate(prompts, 5)
    top1 = model.generate(prompts, 5, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(greedy, top1))
    a = model.generate(prompts, 5, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompts, 5, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_pick_tokens_samples_the_softmax():
    """The exponential race draws token i with probability softmax(logits / T)_i (restricted to top_k)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    for temp, top_k in ((1.0, None), (0.5, 3)):
        tok = pick_tokens(logits, temp, top_k, g)
        freq = torch.bincount(tok, minlength=5).double() / tok.numel()
        ref = logits[0] / temp
        if top_k:
            ref = ref.masked_fill(ref < ref.topk(top_k).values[-1], float("-inf"))
        torch.testing.assert_close(freq, ref.double().softmax(-1), atol=0.01, rtol=0)


@pytest.mark.parametrize("kw,arg", [
    (dict(prompts=[torch.tensor([1, 64])]), "vocab_size"),
    (dict(prompts=[torch.tensor([1.0, 2.0])]), "integer"),
    (dict(prompts=[torch.tensor([], dtype=torch.int64)]), "prompts"),
    (dict(prompts=[]), "prompts"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(cuda_graph=1), "cuda_graph"),
])
def test_generate_validates_at_entry(kw, arg):
    model = model_of()
    args = dict(prompts=[torch.tensor([1, 2, 3])], max_new_tokens=2)
    args.update(kw)
    prompts, n = args.pop("prompts"), args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=arg):
        model.generate(prompts, n, **args)


def test_generate_rejects_mixed_parameter_dtypes():
    model = model_of()
    model.layers[0].mlp.float()
    with pytest.raises(ValueError, match="dtype"):
        model.generate([torch.tensor([1, 2])], 2)


def count_plans(monkeypatch):
    built = []
    orig = triton_impl.DecodePlan.__init__

    def init(self, *a, **k):
        built.append(k.get("dense"))
        orig(self, *a, **k)
    monkeypatch.setattr(triton_impl.DecodePlan, "__init__", init)
    return built


def test_one_plan_per_kind_per_generation_triton_interpreter(monkeypatch):
    """Triton decode (the interpreter on CPU): the whole generation builds one sparse and one dense plan
    (3 layers, 5 steps), and its greedy tokens equal the reference backend's."""
    if not CUDA:
        pytest.importorskip("triton")
    dev = "cuda" if CUDA else "cpu"
    kw = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, index_dim=16, block_size=16, topk_blocks=2)
    prompts = ragged_prompts([40, 21], 64, seed=8, device=dev)
    ref = model_of(seed=9, dtype=torch.float32, device=dev, **kw).generate(prompts, 5, cuda_graph=False)
    model = model_of(seed=9, dtype=torch.float32, device=dev, **kw)
    for layer in model.layers:
        layer.attn.config.backend = "triton"
    # the prefill stays on the reference ops: only the decode path is under test
    sess = GenerationSession(model, prompts, 5, cuda_graph=False)
    for layer in model.layers:
        layer.attn.config.backend = "reference"
    with torch.no_grad():
        sess.prefill()
    for layer in model.layers:
        layer.attn.config.backend = "triton"
    built = count_plans(monkeypatch)
    with torch.no_grad():
        for _ in range(4):
            sess.step()
    assert sorted(built) == [False, True]
    assert len(sess.cache.plans) == 2
    assert all(torch.equal(a, b) for a, b in zip(sess.tokens(), ref))



def _lockstep(sessions, steps, same_tokens=False):
    """Prefill two GenerationSessions, then step them together, yielding (a, b) after each step;
    same_tokens: b continues from a's sampled tokens (bf16 roundings may change an argmax)."""
    a, b = sessions
    with torch.no_grad():
        a.prefill()
        b.prefill()
        for _ in range(steps):
            a.step()
            b.step()
            if same_tokens:
                b.tok.copy_(a.tok)
            yield a, b


def _seeded_sampling(model, prompts, n, seed):
    """What ``model.generate(prompts, n, temperature=1.0, generator=seeded)`` runs (captured step), keeping a
    copy of every step's logits: (tokens, [logits after prefill, after step 1, ...])."""
    session = GenerationSession(model, prompts, n, temperature=1.0, generator=torch.Generator("cuda").manual_seed(seed))
    logits = []
    with torch.no_grad():
        session.prefill()
        logits.append(session.logits.clone())
        for _ in range(n - 1):
            session.step()
            logits.append(session.logits.clone())
    out = session.tokens()
    session.close()
    return out, logits


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_dense_layers", [0, 1])
def test_cuda_graph_greedy_equals_uncaptured(monkeypatch, num_dense_layers):
    """bf16 model on the Triton kernels, ragged prompts (crossing many blocks): the captured step's greedy
    tokens equal the uncaptured step's, every plan is built once per generation, seeded sampling inside
    the graph repeats, and the fused step's logits match the module step's (bf16 roundings)."""
    kw = dict(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=64, index_dim=64, block_size=16,
              topk_blocks=4, backend="auto")
    model = model_of(seed=11, dtype=torch.bfloat16, device="cuda", num_layers=3, num_dense_layers=num_dense_layers,
                     vocab=512, **kw)
    prompts = ragged_prompts([37, 300, 129], 512, seed=12, device="cuda")
    eager = model.generate(prompts, 24, cuda_graph=False)
    built = count_plans(monkeypatch)
    graphed = model.generate(prompts, 24, cuda_graph=True)
    assert len(built) == (2 if num_dense_layers else 1)
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)
    (s1, l1), (s2, l2) = (_seeded_sampling(model, prompts, 8, seed=3) for _ in range(2))
    # on a mismatch, say whether the logits already differed (numerics plus a near tie) or only the draws (RNG)
    diffs = [float((x - y).abs().max()) for x, y in zip(l1, l2)]
    for a, b in zip(s1, s2):
        assert torch.equal(a, b), f"seeded sampling did not repeat: {a.tolist()} vs {b.tolist()}; " \
                                  f"max |logit difference| per step (prefill first): {diffs}"
        assert int(a.min()) >= 0 and int(a.max()) < 512
    # the fused step on the GPU (bf16) against the module step: same logits up to bf16 roundings
    sessions = [GenerationSession(model, prompts, 6, cuda_graph=g, fused_step=f) for g, f in ((True, None), (False, False))]
    assert sessions[0].fused is not None
    for a, b in _lockstep(sessions, 4, same_tokens=True):
        assert (a.logits - b.logits).abs().max() <= 0.03 * b.logits.abs().max(), float((a.logits - b.logits).abs().max())


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_top1_sampling_is_greedy():
    """fp32 (no ties between logits): top-1 sampling inside the graph, with and without a generator,
    equals greedy decoding."""
    kw = dict(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, index_dim=32, block_size=16,
              topk_blocks=3, backend="auto")
    model = model_of(seed=15, dtype=torch.float32, device="cuda", num_layers=2, num_dense_layers=1, vocab=256, **kw)
    prompts = ragged_prompts([50, 130], 256, seed=16, device="cuda")
    greedy = model.generate(prompts, 12)
    for gen in (None, torch.Generator("cuda").manual_seed(1)):
        top1 = model.generate(prompts, 12, temperature=0.8, top_k=1, generator=gen)
        for a, b in zip(greedy, top1):
            assert torch.equal(a, b)


@pytest.mark.parametrize("num_dense_layers,mode", [(1, "sparse"), (0, "dense")])
def test_fused_step_equals_module_step(num_dense_layers, mode):
    """FusedDecodeStep (concatenated projections, RoPE + append kernel, add + RMSNorm kernels; the
    interpreter on CPU) gives the module step's logits at every step (fp32, 1e-4), ragged batch,
    partial rotary dim, with dense and sparse layers; the lengths advance the same way."""
    if not CUDA:
        pytest.importorskip("triton")
    dev = "cuda" if CUDA else "cpu"
    kw = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, index_dim=16, block_size=16, topk_blocks=2,
              rotary_dim=8, backend="triton")
    model = model_of(seed=13, dtype=torch.float32, device=dev, num_layers=2, num_dense_layers=num_dense_layers, **kw)
    model.set_mode(mode)
    prompts = ragged_prompts([40, 21], 64, seed=14, device=dev)
    sessions = [GenerationSession(model, prompts, 4, cuda_graph=False, fused_step=f) for f in (True, False)]
    assert sessions[0].fused is not None and sessions[1].fused is None
    for a, b in _lockstep(sessions, 3):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
        assert torch.equal(a.out, b.out)
        for li in range(2):
            assert torch.equal(a.cache.lengths_dev[li], b.cache.lengths_dev[li])
