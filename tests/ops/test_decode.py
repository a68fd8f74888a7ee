"""Triton MSA decode kernels (fp32 caches) against the reference decode.

Device-agnostic: on a CUDA machine the kernels run natively on "cuda" tensors; without CUDA
tests/conftest.py switches the Triton interpreter on and the tensors stay on the CPU. fp32 caches make
the kernels use exact fp32 dots (input_precision="ieee", no tf32) and the reference computes in fp32
(torch's fp32 matmul does not use tf32 unless asked), so one tolerance serves both.

Tolerances: outputs fp32 max abs error <= 2e-5 on the CPU, 5e-5 on the GPU (values are O(1); only the
summation order differs); selections compared as sets after sorting, and where they differ
(near-ties) the multisets of selected block scores must agree to 1e-4.
"""

import math

import pytest
import torch

import msa.tuning

from msa.cache import MSACache
from msa.ops.decode import decode_attention
from msa.ops.decode.reference import decode_attention_reference
from msa.ops.decode.triton_impl import DecodePlan
from msa.ops.select_blocks.reference import block_scores_reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = 5e-5 if DEV.type == "cuda" else 2e-5
NAN = float("nan")


def make_cache(lens, t, H, D, DI, *, bs, paged=False, index_dtype=None, mode="token", max_len=None, seed=0,
               perm_pages=False, dtype=torch.float32, key_bias=0.0):
    """A cache whose sequences hold ``lens`` tokens (packed prefill of lens - t, then a t-token append)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    max_len = max_len or max(lens) + 8
    kw = dict(dtype=dtype, index_dtype=index_dtype, index_scale_mode=mode, index_block_size=bs)
    if paged:
        kw["page_size"] = bs
        if perm_pages:
            nb = math.ceil(max_len / bs)
            kw["page_table"] = torch.randperm(B * nb, generator=torch.Generator().manual_seed(99)).view(B, nb).to(torch.int32)
    c = MSACache(1, B, max_len, H, D, DI, device=DEV, **kw)
    pre = [n - t for n in lens]
    tot = sum(pre)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype).to(DEV)
    ki = r(1, tot, DI) + key_bias * torch.sin(torch.arange(tot, dtype=dtype) / 7.0)[None, :, None].to(DEV)
    k, v = r(1, tot, H, D), r(1, tot, H, D)
    if all(p > 0 for p in pre):  # packed varlen prefill
        cu = torch.tensor([0] + list(torch.tensor(pre).cumsum(0)), dtype=torch.int32)
        c.append(0, k, v, ki, cu_seqlens=cu)
    else:  # some sequence holds only the new tokens: per-row appends
        s = 0
        for b, p in enumerate(pre):
            c.append_row(0, b, k[0, s:s + p], v[0, s:s + p], ki[0, s:s + p])
            s += p
    c.append(0, r(B, t, H, D), r(B, t, H, D), r(B, t, DI))
    return c


def check_selection(sel, ref, q_idx, cache, bs, t, index_scale):
    """Same sets, or (near-ties) same multiset of block scores."""
    assert sel.shape == ref.shape and sel.dtype == torch.int32
    # convention: valid prefix, local block in the last valid slot, -1 after
    for b in range(sel.shape[0]):
        n = int(cache.seq_lens(0)[b])
        for i in range(t):
            local = (n - t + i) // bs
            for r_ in range(sel.shape[2]):
                row = sel[b, i, r_].tolist()
                nv = sum(x >= 0 for x in row)
                assert all(x >= 0 for x in row[:nv]) and all(x == -1 for x in row[nv:])
                assert row[nv - 1] == local
    a, r = sel.sort(-1).values, ref.sort(-1).values
    if torch.equal(a, r):
        return
    for b in range(sel.shape[0]):
        n = int(cache.seq_lens(0)[b])
        kidx = cache.index_keys(0, b, n)
        m = block_scores_reference(q_idx[b], kidx, n - t, bs, index_scale)  # (t, H, NB)
        for i in range(t):
            for r_ in range(sel.shape[2]):
                if torch.equal(a[b, i, r_], r[b, i, r_]):
                    continue
                local = (n - t + i) // bs
                sa = sorted(m[i, r_, x].item() if x != local else 1e9 for x in sel[b, i, r_].tolist() if x >= 0)
                sr = sorted(m[i, r_, x].item() if x != local else 1e9 for x in ref[b, i, r_].tolist() if x >= 0)
                assert len(sa) == len(sr)
                assert torch.allclose(torch.tensor(sa), torch.tensor(sr), atol=1e-4), (b, i, r_)


def run_plan(cache, q, q_idx, bs, topk, **kw):
    plan = DecodePlan(cache, num_heads=q.shape[2], block_size=bs, topk=topk, num_tokens=q.shape[1],
                      **{k: v for k, v in kw.items() if k in ("topk_chunk", "index_blocks_per_program",
                                                               "attention_splits", "init_blocks", "local_blocks",
                                                               "dense", "index_tile_blocks", "fused",
                                                               "index_programs_per_sm")})
    if "fused" in kw and not plan.dense:
        assert plan.fused == kw["fused"]  # the requested chain really runs (no silent fallback)
    for buf in (plan.out, plan.lse, plan.o_part, plan.lse_part):
        buf.fill_(NAN)
    if not plan.dense:
        if plan.scores is not None:
            plan.scores.fill_(NAN)
        plan.cand.fill_(12345)  # garbage candidates: every slot the kernels read must be written
        plan.block_indices.fill_(-7)
    out = plan.run(q, q_idx, 0, block_indices=kw.get("block_indices"))
    assert not torch.isnan(plan.lse).any()  # every query's lse written (-inf only when it saw nothing)
    return out


CASES = [
    # lens, t, H, G, D, DI, bs, topk, paged, index dtype / scale mode
    ([1, 63, 129], 1, 2, 4, 16, 16, 16, 4, False, None, "token"),
    ([64, 200, 33], 1, 1, 8, 32, 16, 32, 3, True, None, "token"),
    ([17, 90], 4, 2, 3, 16, 32, 16, 5, True, torch.float8_e4m3fn, "token"),
    ([300, 41], 16, 2, 2, 16, 16, 16, 6, False, torch.float8_e4m3fn, "block"),
    ([127, 600], 2, 4, 1, 16, 16, 32, 4, True, torch.float8_e4m3fn, "block"),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "legacy"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_decode_matches_reference(case, fused):
    """Both launch chains; the fused one with 1 attention split (output written by the attention
    kernel, no merge launch) and with several (merge kernel)."""
    lens, t, H, G, D, DI, bs, topk, paged, idt, mode = case
    cache = make_cache(lens, t, H, D, DI, bs=bs, paged=paged, index_dtype=idt, mode=mode, perm_pages=paged)
    g = torch.Generator().manual_seed(1)
    q, qi = torch.randn(len(lens), t, H * G, D, generator=g).to(DEV), torch.randn(len(lens), t, H, DI, generator=g).to(DEV)
    o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="reference")
    for splits in ((1, None) if fused else (None,)):
        o, s = run_plan(cache, q, qi, bs, topk, index_blocks_per_program=2, fused=fused, attention_splits=splits)
        check_selection(s, s_ref, qi, cache, bs, t, DI ** -0.5)
        if torch.equal(s.sort(-1).values, s_ref.sort(-1).values):
            assert torch.allclose(o, o_ref, atol=ATOL, rtol=0)
    # attention with the reference's selection (robust to near-ties)
    for splits in (3, 1):
        o2, _ = run_plan(cache, q, qi, bs, topk, block_indices=s_ref, attention_splits=splits, fused=fused)
        assert torch.allclose(o2, o_ref, atol=ATOL, rtol=0)
    # dense mode == full causal attention
    od_ref, _ = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, dense=True, backend="reference")
    od, none = run_plan(cache, q, None, bs, topk, dense=True, attention_splits=2, fused=fused)
    assert none is None and torch.allclose(od, od_ref, atol=ATOL, rtol=0)


def test_fused_local_topk_ranges_and_chains_agree():
    """Fused chain: index ranges with more blocks than k (in-kernel top-k of the range) and with fewer
    (every block a candidate), several row tiles (t * H_kv > 64 rows), forced blocks on range edges;
    the fused and the legacy chain give the same selection (ties: lowest id) and output."""
    lens, t, H, G, D, DI, bs, topk = [700, 250], 20, 4, 1, 16, 16, 16, 7  # 250: 16 blocks, one range
    cache = make_cache(lens, t, H, D, DI, bs=bs, seed=21)
    g = torch.Generator().manual_seed(22)
    q, qi = torch.randn(2, t, H * G, D, generator=g).to(DEV), torch.randn(2, t, H, DI, generator=g).to(DEV)
    qi[1, :3] = 0.0  # ties
    kw = dict(init_blocks=1, local_blocks=2)
    o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="reference", **kw)
    ol, sl = run_plan(cache, q, qi, bs, topk, fused=False, **kw)
    for bpp in (16, 5):  # 16 blocks per range > k_pad = 8; 5 blocks (padded to 8) <= k_pad
        plan_kw = dict(index_blocks_per_program=bpp, fused=True, **kw)
        o, s = run_plan(cache, q, qi, bs, topk, **plan_kw)
        check_selection(s, s_ref, qi, cache, bs, t, DI ** -0.5)
        assert torch.equal(s, sl)
        assert torch.allclose(o, ol, atol=1e-6, rtol=0)
    if torch.equal(sl.sort(-1).values, s_ref.sort(-1).values):
        assert torch.allclose(ol, o_ref, atol=ATOL, rtol=0)


def test_topk_merge_path_and_forcing():
    """Several top-k chunks (merge kernel), init/local forcing, k >= visible blocks pads with -1."""
    lens, t, H, G, D, DI, bs = [600, 20, 257], 2, 2, 2, 16, 16, 16
    cache = make_cache(lens, t, H, D, DI, bs=bs)
    g = torch.Generator().manual_seed(2)
    q, qi = torch.randn(3, t, H * G, D, generator=g).to(DEV), torch.randn(3, t, H, DI, generator=g).to(DEV)
    for topk, init, loc in ((6, 1, 2), (8, 2, 1)):
        o_ref, s_ref = decode_attention_reference(q, qi, cache, 0, block_size=bs, topk=topk, init_blocks=init,
                                                  local_blocks=loc, scale=D ** -0.5, index_scale=DI ** -0.5,
                                                  dense=False)
        o, s = run_plan(cache, q, qi, bs, topk, init_blocks=init, local_blocks=loc, topk_chunk=8, fused=False)
        check_selection(s, s_ref, qi, cache, bs, t, DI ** -0.5)
        of, sf = run_plan(cache, q, qi, bs, topk, init_blocks=init, local_blocks=loc, index_blocks_per_program=8,
                          fused=True)
        assert torch.equal(sf, s) and torch.allclose(of, o, atol=1e-6, rtol=0)
        for b in range(3):  # forced blocks present
            n = int(cache.seq_lens(0)[b])
            for i in range(t):
                local = (n - t + i) // bs
                want = set(range(min(init, local + 1))) | set(range(max(0, local - loc + 1), local + 1))
                for r_ in range(H):
                    assert want <= set(s[b, i, r_].tolist())
        assert (s[1] == -1).any()  # sequence of 20 tokens: 2 blocks < topk


def launches(plan, q, qi, **kw):
    """Kernel names of one run, in launch order (the plan's timer hook)."""
    names = []
    plan.run(q, qi, 0, timer=lambda n: names.append(n) if n else None, **kw)
    return names


def test_attention_selects_itself():
    """Legacy chain with several top-k chunks: with select_in_attention the attention merges the chunks'
    candidates (no top-k merge launch). Same selection and output as the five-launch chain and the
    reference's output, twice in a row (paged cache, fp8 index keys, 3 chunks); dense mode with one
    split is a single launch."""
    lens, t, H, G, D, DI, bs, topk, paged, idt, mode = CASES[4]
    cache = make_cache(lens, t, H, D, DI, bs=bs, paged=paged, index_dtype=idt, mode=mode, perm_pages=paged)
    g = torch.Generator().manual_seed(5)
    q, qi = torch.randn(len(lens), t, H * G, D, generator=g).to(DEV), torch.randn(len(lens), t, H, DI, generator=g).to(DEV)
    o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="reference")
    kw = dict(fused=False, topk_chunk=8, attention_splits=3)
    base = DecodePlan(cache, num_heads=H * G, block_size=bs, topk=topk, num_tokens=t, **kw)
    assert base.nc > 1 and launches(base, q, qi) == ["index", "topk", "topk_merge", "attention", "attn_merge"]
    o0, s0 = (x.clone() for x in base.run(q, qi, 0))
    check_selection(s0, s_ref, qi, cache, bs, t, DI ** -0.5)
    plan = DecodePlan(cache, num_heads=H * G, block_size=bs, topk=topk, num_tokens=t, select_in_attention=True, **kw)
    assert launches(plan, q, qi) == ["index", "topk", "attention", "attn_merge"]
    for step in range(2):
        plan.out.fill_(NAN)
        plan.lse.fill_(NAN)
        plan.block_indices.fill_(-7)
        o, s = plan.run(q, qi, 0)
        assert torch.equal(s, s0) and torch.allclose(o, o0, atol=1e-6, rtol=0), step
        assert not torch.isnan(plan.lse).any()
    if torch.equal(s0.sort(-1).values, s_ref.sort(-1).values):
        assert torch.allclose(o, o_ref, atol=ATOL, rtol=0)
    od_ref, _ = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, dense=True, backend="reference")
    # one split: the attention writes the output itself in dense mode too
    d1 = DecodePlan(cache, num_heads=H * G, block_size=bs, topk=topk, num_tokens=t, dense=True, attention_splits=1)
    assert launches(d1, q, None) == ["attention"]
    assert torch.allclose(d1.run(q, None, 0)[0], od_ref, atol=ATOL, rtol=0)


def test_bitonic_and_reduction_selection_agree():
    """The top-k / top-k merge kernels and the fused candidate merge select with tl.topk's bitonic
    network (default) or with k max-reduction rounds (tuning decode_bitonic=False; also what candidate sets
    above 1024 use): same selection, ties included (lowest id), and the same output."""
    lens, t, H, G, D, DI, bs, topk = [600, 20, 257], 2, 2, 2, 16, 16, 16, 6
    cache = make_cache(lens, t, H, D, DI, bs=bs, seed=31)
    g = torch.Generator().manual_seed(32)
    q, qi = torch.randn(3, t, H * G, D, generator=g).to(DEV), torch.randn(3, t, H, DI, generator=g).to(DEV)
    qi[0, 0] = 0.0  # all-equal scores: ties everywhere
    o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="reference",
                                    init_blocks=1, local_blocks=2)
    for kw in (dict(fused=False, topk_chunk=8), dict(fused=True, index_blocks_per_program=8)):
        got = []
        for bitonic in (False, True):
            with msa.tuning.override(decode_bitonic=bitonic):
                plan_kw = dict(kw, init_blocks=1, local_blocks=2)
                plan = DecodePlan(cache, num_heads=H * G, block_size=bs, topk=topk, num_tokens=t, **plan_kw)
                assert plan.bitonic == bitonic
                got.append(run_plan(cache, q, qi, bs, topk, **plan_kw))
        assert torch.equal(got[0][1], got[1][1]), kw
        assert torch.allclose(got[0][0], got[1][0], atol=1e-6, rtol=0)
        check_selection(got[1][1], s_ref, qi, cache, bs, t, DI ** -0.5)


@pytest.mark.parametrize("field", ["decode_bitonic", "decode_pdl", "decode_fp8_f16"])
def test_decode_switches_are_typed(field):
    """The decode on/off switches are bools of msa.tuning: a string is an error naming the field (raised
    before any plan or launch), never a silently chosen path; False is honoured by the plan."""
    with pytest.raises(ValueError, match=f"tuning.{field} must be a bool"):
        with msa.tuning.override(**{field: "off"}):
            pass
    cache = make_cache([40], 1, 1, 16, 16, bs=16)
    with msa.tuning.override(**{field: False}):
        plan = DecodePlan(cache, num_heads=2, block_size=16, topk=2)
    attr = {"decode_bitonic": "bitonic", "decode_pdl": "pdl", "decode_fp8_f16": "fp8_f16"}[field]
    assert getattr(plan, attr) is False


@pytest.mark.parametrize("G", [1, 5, 64])
def test_gqa_ratios_and_paged_equals_contiguous(G):
    lens, t, H, D, DI, bs, topk = [150, 77], 3, 1, 16, 16, 16, 4
    kw = dict(seed=3)
    cont = make_cache(lens, t, H, D, DI, bs=bs, **kw)
    pag = make_cache(lens, t, H, D, DI, bs=bs, paged=True, perm_pages=True, **kw)
    g = torch.Generator().manual_seed(4)
    q, qi = torch.randn(2, t, H * G, D, generator=g).to(DEV), torch.randn(2, t, H, DI, generator=g).to(DEV)
    oc, sc = run_plan(cont, q, qi, bs, topk)
    op, sp = run_plan(pag, q, qi, bs, topk)
    assert torch.equal(sc, sp)
    assert torch.allclose(oc, op, atol=1e-6, rtol=0)
    o_ref, s_ref = decode_attention(q, qi, cont, 0, block_size=bs, topk=topk, backend="reference")
    check_selection(sc, s_ref, qi, cont, bs, t, DI ** -0.5)
    if torch.equal(sc.sort(-1).values, s_ref.sort(-1).values):
        assert torch.allclose(oc, o_ref, atol=ATOL, rtol=0)


def test_plan_reused_across_steps_with_device_append():
    """One plan, several steps of append_device + run (what a CUDA graph replays): each step equals
    the reference decode over the grown cache (lengths only on the device until sync_lengths)."""
    lens, H, G, D, DI, bs, topk = [40, 95], 2, 2, 16, 16, 16, 3
    cache = make_cache(lens, 1, H, D, DI, bs=bs, paged=True, index_dtype=torch.float8_e4m3fn, max_len=128)
    cache.reserve(128)
    plan = DecodePlan(cache, num_heads=H * G, block_size=bs, topk=topk, num_tokens=2)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        kn, vn, kin = torch.randn(2, 2, H, D, generator=g).to(DEV), torch.randn(2, 2, H, D, generator=g).to(DEV), torch.randn(2, 2, DI, generator=g).to(DEV)
        q, qi = torch.randn(2, 2, H * G, D, generator=g).to(DEV), torch.randn(2, 2, H, DI, generator=g).to(DEV)
        cache.append_device(0, kn, vn, kin)
        o, s = plan.run(q, qi, 0)
        cache.sync_lengths()
        assert cache.seq_lens(0).tolist() == [lens[0] + 2 * step + 2, lens[1] + 2 * step + 2]
        o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="reference")
        check_selection(s, s_ref, qi, cache, bs, 2, DI ** -0.5)
        if torch.equal(s.sort(-1).values, s_ref.sort(-1).values):
            assert torch.allclose(o, o_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["token", "block"])
def test_fp8_index_recall(mode):
    """fp8 index keys vs fp32 ones: mean block recall >= 0.85 and score recall >= 0.93 (over queries x
    groups) of the fp8 selection (Triton) against the fp32 selection (reference). Score recall weighs
    blocks by the fp32 index distribution's mass (softmax of the token scores, summed per block).
    Measured here: ~0.96 / ~0.96 for both scale modes."""
    lens, t, H, G, D, DI, bs, topk = [600, 512, 333], 1, 2, 2, 16, 32, 16, 8
    c32 = make_cache(lens, t, H, D, DI, bs=bs, seed=7, key_bias=1.5)
    c8 = make_cache(lens, t, H, D, DI, bs=bs, seed=7, key_bias=1.5, index_dtype=torch.float8_e4m3fn, mode=mode)
    g = torch.Generator().manual_seed(8)
    q, qi = torch.randn(3, t, H * G, D, generator=g).to(DEV), torch.randn(3, t, H, DI, generator=g).to(DEV)
    _, s32 = decode_attention(q, qi, c32, 0, block_size=bs, topk=topk, backend="reference")
    _, s8 = run_plan(c8, q, qi, bs, topk)
    brec, srec = [], []
    for b, n in enumerate(lens):
        for r_ in range(H):
            a, ref = set(s8[b, 0, r_].tolist()) - {-1}, set(s32[b, 0, r_].tolist()) - {-1}
            brec.append(len(a & ref) / len(ref))
            # score recall with the index scores' softmax mass as the attention proxy
            kidx = c32.index_keys(0, b, n).double()
            sc = (kidx @ qi[b, 0, r_].double()) * DI ** -0.5
            p = sc.softmax(-1)
            nb = math.ceil(n / bs)
            mass = torch.cat([p, p.new_zeros(nb * bs - n)]).view(nb, bs).sum(-1)
            srec.append(float(mass[list(a & ref)].sum() / mass[list(ref)].sum()))
    br, sr = sum(brec) / len(brec), sum(srec) / len(srec)
    print(f"fp8 {mode}: block recall {br:.3f} score recall {sr:.3f}")
    assert br >= 0.85 and sr >= 0.93, (br, sr)


def test_chunked_prefill_then_decode_equals_one_shot_model():
    """MSAForCausalLM (reference backend, float64): prompt fed in 3 pieces (packed prefill, then
    incremental chunks) then 2 decode steps gives the one-shot forward's logits (1e-9)."""
    from msa.layers import MSAConfig
    from msa.models.msa_lm import MSALMConfig, MSAForCausalLM
    torch.manual_seed(0)
    cfg = MSALMConfig(vocab_size=64, num_layers=2, intermediate_size=64, num_dense_layers=1,
                      attention=MSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, index_dim=8,
                                          block_size=16, topk_blocks=3, backend="reference"))
    model = MSAForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 90))
    with torch.no_grad():
        full = model(ids).logits
        cache = MSACache(cfg.num_layers, 2, 96, 2, 8, 8, dtype=torch.float64)
        outs = []
        for s, e in ((0, 37), (37, 70), (70, 88), (88, 89), (89, 90)):
            outs.append(model(ids[:, s:e], cache=cache).logits)
        inc = torch.cat(outs, 1)
    assert torch.allclose(inc, full, atol=1e-9, rtol=0)


def test_triton_layer_decode_equals_reference():
    """decode_attention(backend='triton') after a chunked prefill equals backend='reference' (fp32)."""
    t, H, G, D, DI, bs, topk = 4, 2, 2, 16, 16, 16, 3  # two sequences of 70 tokens (30 + 36 + 4)
    cache = MSACache(1, 2, 80, H, D, DI, page_size=bs, device=DEV)
    g = torch.Generator().manual_seed(9)
    for n in (30, 36, 4):
        cache.append(0, torch.randn(2, n, H, D, generator=g).to(DEV), torch.randn(2, n, H, D, generator=g).to(DEV),
                     torch.randn(2, n, DI, generator=g).to(DEV))
    q, qi = torch.randn(2, t, H * G, D, generator=g).to(DEV), torch.randn(2, t, H, DI, generator=g).to(DEV)
    o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="reference")
    o, s = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, backend="triton")
    check_selection(s, s_ref, qi, cache, bs, t, DI ** -0.5)
    if torch.equal(s.sort(-1).values, s_ref.sort(-1).values):
        assert torch.allclose(o, o_ref, atol=ATOL, rtol=0)


def test_bad_inputs():
    cache = make_cache([40, 20], 1, 2, 16, 16, bs=16, paged=True)
    q, qi = torch.randn(2, 1, 4, 16, device=DEV), torch.randn(2, 1, 2, 16, device=DEV)
    kw = dict(block_size=16, topk=3, backend="triton")
    with pytest.raises(ValueError, match="q must have the cache dtype"):
        decode_attention(q.double(), qi, cache, 0, **kw)
    with pytest.raises(ValueError, match="q_idx"):
        decode_attention(q, qi.to(torch.int32), cache, 0, **kw)
    with pytest.raises(ValueError, match="q_idx"):
        decode_attention(q, qi[:, :, :1], cache, 0, **kw)
    with pytest.raises(ValueError, match="block_size"):
        decode_attention(q, qi, cache, 0, block_size=32, topk=3, backend="triton")
    with pytest.raises(ValueError, match="t=2"):
        decode_attention(torch.randn(2, 2, 4, 16, device=DEV), torch.randn(2, 2, 2, 16, device=DEV),
                         make_cache([1, 20], 1, 2, 16, 16, bs=16), 0, **kw)
    with pytest.raises(ValueError, match="heads"):
        decode_attention(torch.randn(2, 1, 3, 16, device=DEV), qi, cache, 0, **kw)
    with pytest.raises(ValueError, match="block_indices"):
        DecodePlan(cache, num_heads=4, block_size=16, topk=3).run(q, qi, 0, block_indices=torch.zeros(2, 1, 2, 3, device=DEV))
    with pytest.raises(ValueError, match="select_in_attention"):
        DecodePlan(cache, num_heads=4, block_size=16, topk=3, select_in_attention=1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "legacy"])
@pytest.mark.parametrize("nbt,paged,idt,mode", [(2, True, torch.float8_e4m3fn, "block"), (4, False, None, "token"),
                                                (2, False, torch.float8_e4m3fn, "token")])
def test_index_multi_block_tiles(nbt, paged, idt, mode, fused):
    """Index tiles of several blocks (the fp8 default is 2): tiles that straddle non-adjacent pages,
    the sequence end and the split boundaries; negative and tied scores through the packed top-k."""
    lens, t, H, G, D, DI, bs, topk = [131, 260, 47], 2, 2, 2, 16, 16, 16, 5
    cache = make_cache(lens, t, H, D, DI, bs=bs, paged=paged, index_dtype=idt, mode=mode, perm_pages=paged, seed=11)
    g = torch.Generator().manual_seed(12)
    q, qi = torch.randn(3, t, H * G, D, generator=g).to(DEV), torch.randn(3, t, H, DI, generator=g).to(DEV)
    qi[0] = 0.0  # all scores 0: ties everywhere (any tie break is valid: compared as score multisets)
    o_ref, s_ref = decode_attention(q, qi, cache, 0, block_size=bs, topk=topk, init_blocks=1, local_blocks=2,
                                    backend="reference")
    o, s = run_plan(cache, q, qi, bs, topk, init_blocks=1, local_blocks=2, index_tile_blocks=nbt,
                    index_blocks_per_program=3 * nbt, topk_chunk=8, fused=fused)
    check_selection(s, s_ref, qi, cache, bs, t, DI ** -0.5)
    assert s[0, :, :, :3].tolist() == [[[0, 1, 2]] * H] * t  # ties: the lowest free ids first
    if torch.equal(s.sort(-1).values, s_ref.sort(-1).values):
        assert torch.allclose(o, o_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["token", "block"])
def test_fp8_keys_bf16_queries_large_values(mode):
    """bf16 cache with fp8 index keys: the index kernel scores with fp16 operands (FP8_F16), the queries
    rescaled per row by a power of two. Rows whose |q_idx| exceeds fp16's range (here ~1e5) and normal
    rows must select what the reference selects on the same (dequantised) keys; without the rescale
    the large rows would overflow to inf and select garbage."""
    lens, t, H, G, D, DI, bs, topk = [300, 170], 2, 2, 2, 16, 32, 16, 5
    cache = make_cache(lens, t, H, D, DI, bs=bs, seed=5, key_bias=1.0, dtype=torch.bfloat16,
                       index_dtype=torch.float8_e4m3fn, mode=mode)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(len(lens), t, H * G, D, generator=g).to(torch.bfloat16).to(DEV)
    qi = torch.randn(len(lens), t, H, DI, generator=g)
    qi[0, :, 0] *= 1.0e5      # max |q| ~ 3e5 > 65504
    qi[1, 1, 1] *= 3.0e4
    qi = qi.to(torch.bfloat16).to(DEV)
    assert qi.float().abs().amax() > 65504
    # reference selection on the exact (fp32) dequantised keys: the kernels apply the fp8 scales in fp32,
    # while the cache's bf16 view of the keys would round them
    from msa.ops.select_blocks.reference import select_blocks_sequence
    s_ref = torch.stack([select_blocks_sequence(qi[b].float(), cache.index_keys(0, b, n, dtype=torch.float32),
                                                q_start=n - t, block_size=bs, topk=topk, init_blocks=0,
                                                local_blocks=1, scale=DI ** -0.5) for b, n in enumerate(lens)])
    for fused in (True, False):
        _, s = run_plan(cache, q, qi, bs, topk, fused=fused)
        assert torch.equal(s.sort(-1).values, s_ref.sort(-1).values), fused
