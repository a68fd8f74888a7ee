"""MSA decode benchmark: Triton decode kernels vs dense SDPA decode over the same cache.

    msa bench decode --out DIR [--quick]

1. Correctness gate on the GPU: indexer + top-k + sparse attention, dense mode and the SDPA baseline
   against the reference at a size the reference affords. fp8 index keys are checked for exactness
   against the reference run on the SAME dequantised keys (fp32), and their selection's block / score
   recall against the bf16-key selection is reported. Prints PASS/FAIL per check.
2. Timing at the paper's shape (H_q 64, H_kv 4, D 128, d_idx 128, block 128, k 16): contexts 32K,
   128K, 512K, 1M; batch 1 and 16; 1 and 4 new query tokens per step; bf16 / fp8 (per-token or
   per-block scales) index keys; contiguous / paged (randomly permuted page table) caches. Both
   launch chains are timed: the fused one (DecodePlan default: index + per-range top-k, attention +
   candidate merge, + split merge when the attention is split; 2-3 launches) and the legacy one
   (fused=False: 4-5 launches). Each MSA step is captured in a CUDA graph and timed with
   triton.testing.do_bench (median, L2 flushed between runs). The baseline is dense decode over the contiguous cache with
   torch SDPA, fastest of the flash / cuDNN / efficient backends, queries packed per KV head
   (B, H_kv, G*t, D) so GQA needs no K/V expansion (for t > 1 the intra-step causal mask is dropped:
   same bytes, negligible FLOPs); the enable_gqa path is timed as well where it runs.
3. Bytes (spec section 3): dense reads 2*H_kv*D*L*2 B per sequence; MSA reads the index keys
   L*d_idx*(2 or 1) B (+ scales) plus 2*H_kv*D*k*B_k*2 B per new token. Achieved GB/s are compared
   with a measured device-to-device copy bandwidth (read + write bytes / time).
4. Per-kernel breakdown (CUDA events around each launch of an eager run) next to the graph-replay
   total, the GPU timeline of a graph replay (torch.profiler: each kernel's start and duration, so the
   gaps between the chain's launches show) at batch 1 and one token, and at the longest context
   (B=1, t=1, contiguous) small sweeps of index-kernel geometries and of the fused chain's attention
   splits (1 split = 2 launches, no merge kernel).
5. Every timing above is ONE layer per captured graph, so it includes the graph's fixed launch cost
   (``graph_floor_us``: a graph of one tiny kernel). A model's decode step captures all its layers in
   one graph; the per-layer time of 8 chained layers in one graph (MSA and the dense baseline alike,
   each call the full chain / SDPA call, in order) is reported next to it (``*_per_layer_8``).
JSON + PNG under --out; a short table is printed last. Sizes that do not fit are recorded as OOM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from msa.bench.timing import back_to_back_ms
from msa.cache import FP8_MAX, MSACache, quantize_fp8
from msa.ops.decode.reference import decode_attention_reference
from msa.ops.decode.triton_impl import DecodePlan
from msa.ops.select_blocks.reference import block_scores_reference, select_blocks_sequence
from msa.ops.sparse_attention.reference import sparse_attention_sequence
from msa.bench import positive_ints

HQ, HKV, D, DI, BS, TOPK = 64, 4, 128, 128, 128, 16
G = HQ // HKV


# --------------------------------------------------------------------------------------------- setup
def build_cache(B, L, paged, idx, dev, seed=0, max_len=None, layers=1):
    """A bf16 cache of ``layers`` layers holding L random tokens per sequence. idx: bf16 | fp8tok | fp8blk."""
    max_len = max_len or L
    kw = dict(dtype=torch.bfloat16, device=dev)
    if idx != "bf16":
        kw.update(index_dtype=torch.float8_e4m3fn, index_scale_mode="token" if idx == "fp8tok" else "block",
                  index_block_size=BS)
    if paged:
        nb = math.ceil(max_len / BS)
        g = torch.Generator().manual_seed(seed + 1)
        kw.update(page_size=BS, page_table=torch.randperm(B * nb, generator=g).view(B, nb).to(torch.int32))
    c = MSACache(layers, B, max_len, HKV, D, DI, **kw)
    g = torch.Generator(device=dev).manual_seed(seed)
    for layer in range(layers):
        for t in (c.k[layer], c.v[layer]):
            t.normal_(generator=g)
        ki = c.k_idx[layer]
        if idx == "bf16":
            ki.normal_(generator=g)
        else:
            flat = ki.view(-1, DI)
            step = 1 << 20
            for s in range(0, flat.shape[0], step):  # chunks: no large fp32 temporary
                # clamp first: torch's fp32 -> e4m3fn cast is non-saturating in some releases (|x| > 464
                # becomes NaN), and NaN keys make Triton's max (NaN-ignoring) and torch's topk (NaN largest)
                # disagree: that, not the kernel, was behind round 1's fp8 gate failures
                flat[s:s + step] = (torch.randn(min(step, flat.shape[0] - s), DI, device=dev, generator=g) * 100
                                    ).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            c.k_idx_scale[layer].fill_(0.01)
        c.set_seq_lens(layer, [L] * B)
    return c


def make_queries(B, t, dev, seed=1):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, t, HQ, D, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16)
    qi = torch.randn(B, t, HKV, DI, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16)
    return q, qi


def sdpa_inputs(cache, L, q):
    """Packed-GQA SDPA operands over the contiguous cache: q (B, H_kv, G*t, D), k/v (B, H_kv, L, D) views."""
    B, t = q.shape[:2]
    qp = q.view(B, t, HKV, G, D).permute(0, 2, 1, 3, 4).reshape(B, HKV, t * G, D).contiguous()
    k = cache.k[0][:, :L].transpose(1, 2)
    v = cache.v[0][:, :L].transpose(1, 2)
    return qp, k, v


def sdpa_variants():
    from torch.nn.attention import SDPBackend
    out = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        if hasattr(SDPBackend, name):
            out.append((name.split("_")[0].lower(), getattr(SDPBackend, name)))
    return out


def run_sdpa(backend, qp, k, v, scale, enable_gqa=False):
    from torch.nn.attention import sdpa_kernel
    import torch.nn.functional as F
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(qp, k, v, scale=scale, enable_gqa=enable_gqa)


def run_sdpa_gqa(backend, q, cache, L, scale):
    """enable_gqa path (B, H_q, t, D) vs (B, H_kv, L, D) (no intra-step causal mask)."""
    from torch.nn.attention import sdpa_kernel
    import torch.nn.functional as F
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[0][:, :L].transpose(1, 2),
                                              cache.v[0][:, :L].transpose(1, 2), scale=scale, enable_gqa=True)


# --------------------------------------------------------------------------------------------- gate
def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def fp8_copy(src, mode):
    """An fp8-index-key cache holding src's K, V and its bf16 index keys quantised with the cache's own
    quantiser (per-token or per-block-of-BS scales; same layout and page table as src)."""
    kw = dict(dtype=src.dtype, device=src.device, index_dtype=torch.float8_e4m3fn, index_scale_mode=mode,
              index_block_size=BS)
    if src.paged:
        kw.update(page_size=src.page_size, page_table=src.page_table)
    c = MSACache(1, src.batch_size, src.max_seq_len, HKV, D, DI, **kw)
    c.k[0].copy_(src.k[0])
    c.v[0].copy_(src.v[0])
    x = src.k_idx[0].reshape(-1, DI)
    if mode == "token":
        qv, sc = quantize_fp8(x)
    else:
        qv, sc = quantize_fp8(x.view(-1, BS, DI), dim_block=True)
    c.k_idx[0].view(-1, DI).copy_(qv.view(-1, DI))
    c.k_idx_scale[0].view(-1).copy_(sc.view(-1))
    c.set_seq_lens(0, src.seq_lens(0))
    return c


def dequant_keys_fp32(cache, b, n):
    """(n, D_idx) fp32 index keys of sequence b exactly as the kernel sees them (fp8 value * fp32 scale,
    NOT rounded to the cache dtype as cache.index_keys does)."""
    rows = cache.rows(b, 0, n).to(cache.device)
    x = cache._flat(cache.k_idx[0])[rows].float()
    if not cache.fp8_index:
        return x
    sc = cache.k_idx_scale[0].view(-1)
    s = sc[rows] if cache.index_scale_mode == "token" else sc[rows // BS]
    return x * s.unsqueeze(-1)


def ref_selection(cache, qi, t, init, loc):
    """Reference selection (B, t, H_kv, topk) and block scores per sequence, in fp32 over the exact keys."""
    sels, scores = [], []
    for b in range(cache.batch_size):
        n = int(cache.seq_lens(0)[b])
        k = dequant_keys_fp32(cache, b, n)
        q = qi[b].float()
        sels.append(select_blocks_sequence(q, k, q_start=n - t, block_size=BS, topk=TOPK, init_blocks=init,
                                           local_blocks=loc, scale=DI ** -0.5))
        scores.append(block_scores_reference(q, k, n - t, BS, DI ** -0.5))
    return torch.stack(sels), scores


def selection_match(sel, ref, scores, t, tol=1e-3):
    """Fraction of rows whose selection equals the reference as a set, and fraction equal up to near-ties
    (same multiset of selected block scores within tol). Returns (exact_frac, tie_robust_frac, worst gap)."""
    a, r = sel.sort(-1).values, ref.sort(-1).values
    exact = (a == r).all(-1)
    ok, worst = 0, 0.0
    for b in range(sel.shape[0]):
        for i in range(t):
            for g in range(sel.shape[2]):
                if bool(exact[b, i, g]):
                    ok += 1
                    continue
                m = scores[b][i, g]
                fin = lambda ids: sorted(float(m[x]) if math.isfinite(float(m[x])) else 1e9  # noqa: E731
                                         for x in ids.tolist() if x >= 0)
                sa, sr = fin(sel[b, i, g]), fin(ref[b, i, g])
                gap = max((abs(x - y) for x, y in zip(sa, sr)), default=0.0) if len(sa) == len(sr) else float("inf")
                worst = max(worst, gap)
                ok += gap <= tol
    n = exact.numel()
    return float(exact.float().mean()), ok / n, worst


def recall(sel8, sel16, cache16, qi, t):
    """fp8 selection vs the bf16-key selection: mean block recall and score recall (blocks weighted by
    the bf16 index distribution's softmax mass per block) over rows."""
    br, sr = [], []
    for b in range(cache16.batch_size):
        n = int(cache16.seq_lens(0)[b])
        k = dequant_keys_fp32(cache16, b, n)
        nb = math.ceil(n / BS)
        for i in range(t):
            pos = n - t + i
            for g in range(HKV):
                a = set(sel8[b, i, g].tolist()) - {-1}
                ref = set(sel16[b, i, g].tolist()) - {-1}
                br.append(len(a & ref) / max(1, len(ref)))
                p = ((k[: pos + 1] @ qi[b, i, g].float()) * DI ** -0.5).softmax(-1)
                mass = torch.cat([p, p.new_zeros(nb * BS - pos - 1)]).view(nb, BS).sum(-1)
                sr.append(float(mass[list(a & ref)].sum() / mass[list(ref)].sum()))
    return sum(br) / len(br), sum(sr) / len(sr)


def gate(dev):
    """Parity on the GPU. bf16 index keys: Triton selection == reference (fp32 over the same keys) up to
    near-ties, sparse attention with the reference selection and dense mode within 1e-2 rel. rmse.
    fp8 index keys (token / block scales, quantised from the bf16 keys): the Triton fp8 path must
    equal the reference run on the SAME dequantised fp8 keys (exactness); how far the fp8 selection
    departs from the bf16 one is reported (block / score recall), not gated.
    Returns (all_pass, list of check dicts)."""
    checks = []
    lens = [3000, 4097]
    init, loc = 1, 2
    for paged in (False, True):
        for t in (1, 4):
            B = len(lens)
            base = build_cache(B, max(lens), paged, "bf16", dev, seed=3, max_len=33 * BS)
            base.set_seq_lens(0, lens)
            q, qi = make_queries(B, t, dev, seed=4)
            kw = dict(block_size=BS, topk=TOPK, init_blocks=init, local_blocks=loc, scale=D ** -0.5,
                      index_scale=DI ** -0.5)
            sel16 = None
            for idx in ("bf16", "fp8tok", "fp8blk"):
                cache = base if idx == "bf16" else fp8_copy(base, "token" if idx == "fp8tok" else "block")
                s_ref, scores = ref_selection(cache, qi, t, init, loc)
                o_ref = torch.stack([sparse_attention_sequence(q[b], *cache.view(0, b)[:2], s_ref[b], q_start=n - t,
                                                               block_size=BS, scale=D ** -0.5)[0]
                                     for b, n in enumerate(lens)])
                od_ref, _ = decode_attention_reference(q, qi, cache, 0, dense=True, **kw)
                nonfinite = int((~torch.isfinite(cache.k_idx[0].float())).sum())
                if idx == "bf16":
                    sel16 = s_ref
                # fused chain with its default split count and with one split (no merge launch), legacy chain
                for chain, pkw in (("fused", dict(fused=True)), ("fused-1split", dict(attention_splits=1, fused=True)),
                                   ("legacy", dict(fused=False))):
                    plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, init_blocks=init,
                                      local_blocks=loc, num_tokens=t, **pkw)
                    plan.out.fill_(float("nan"))
                    plan.block_indices.fill_(-7)
                    o, s = plan.run(q, qi, 0)
                    o, s = o.clone(), s.clone()
                    exact, robust, worst = selection_match(s, s_ref, scores, t)
                    o2, _ = plan.run(q, qi, 0, block_indices=s_ref)
                    e_attn = rel_err(o2, o_ref)
                    dplan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=t, dense=True,
                                       **pkw)
                    e_dense = rel_err(dplan.run(q, None, 0)[0], od_ref)
                    ok = (robust == 1.0 and e_attn < 1e-2 and e_dense < 1e-2 and torch.isfinite(o).all().item()
                          and nonfinite == 0 and plan.fused == (chain != "legacy"))
                    row = dict(check=f"decode {chain} paged={paged} idx={idx} t={t}", selection_equal_frac=exact,
                               selection_equal_up_to_ties_frac=robust, worst_tie_gap=worst, attn_rel_rmse=e_attn,
                               dense_rel_rmse=e_dense, nonfinite_index_keys=nonfinite, passed=bool(ok))
                    msg = ""
                    if idx != "bf16":
                        br, sr = recall(s, sel16, base, qi, t)
                        row.update(block_recall_vs_bf16=br, score_recall_vs_bf16=sr)
                        msg = f" | vs bf16 selection: block recall {br:.3f} score recall {sr:.3f}"
                    checks.append(row)
                    print(f"[gate] {row['check']}: sel exact={exact:.3f} up-to-ties={robust:.3f} (gap {worst:.1e}) "
                          f"attn={e_attn:.2e} dense={e_dense:.2e} {'PASS' if ok else 'FAIL'}{msg}", flush=True)
                    del plan, dplan
                if cache is not base:
                    del cache
            del base
    # SDPA baseline == dense reference (t = 1, equal lengths)
    L = 4096
    cache = build_cache(1, L, False, "bf16", dev, seed=5)
    q, qi = make_queries(1, 1, dev, seed=6)
    od_ref, _ = decode_attention_reference(q, qi, cache, 0, block_size=BS, topk=TOPK, init_blocks=0, local_blocks=1,
                                           scale=D ** -0.5, index_scale=DI ** -0.5, dense=True)
    qp, k, v = sdpa_inputs(cache, L, q)
    for name, be in sdpa_variants():
        try:
            o = run_sdpa(be, qp, k, v, D ** -0.5).view(1, HKV, 1, G, D).permute(0, 2, 1, 3, 4).reshape(1, 1, HQ, D)
            e = rel_err(o, od_ref)
            ok = e < 1e-2
        except Exception as exc:  # backend not available for these operands
            print(f"[gate] sdpa {name}: unavailable ({type(exc).__name__})")
            continue
        checks.append(dict(check=f"sdpa {name} vs dense reference", rel_rmse=e, passed=bool(ok)))
        print(f"[gate] sdpa {name}: rel={e:.2e} {'PASS' if ok else 'FAIL'}", flush=True)
    return all(c["passed"] for c in checks), checks


# --------------------------------------------------------------------------------------------- timing
def bench(fn):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def graph_of(fn):
    """Capture fn in a CUDA graph (after a warm-up on a side stream). Returns replay callable or None."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception as exc:  # pragma: no cover - capture problems fall back to eager timing
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)")
        return None


def copy_bandwidth(dev):
    x = torch.empty(1 << 29, dtype=torch.uint8, device=dev)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * (1 << 29) / (ms * 1e-3) / 1e9


def msa_bytes(B, L, t, idx):
    ib = 2 if idx == "bf16" else 1
    scale_b = 4 * L if idx == "fp8tok" else (4 * math.ceil(L / BS) if idx == "fp8blk" else 0)
    return B * (L * DI * ib + scale_b) + B * t * HKV * min(TOPK, math.ceil(L / BS)) * BS * D * 2 * 2


def dense_bytes(B, L):
    return B * L * HKV * D * 2 * 2


def time_dense(cache, L, q):
    """Fastest SDPA dense decode. Returns (ms, backend name, all timings)."""
    qp, k, v = sdpa_inputs(cache, L, q)
    res, fns = {}, {}
    for name, be in sdpa_variants():
        for tag, fn in ((f"{name}", lambda be=be: run_sdpa(be, qp, k, v, D ** -0.5)),
                        (f"{name}+enable_gqa", lambda be=be: run_sdpa_gqa(be, q, cache, L, D ** -0.5))):
            try:
                fn()
                torch.cuda.synchronize()
                rep = graph_of(fn) or fn
                res[tag] = bench(rep)
                fns[tag] = fn
            except Exception as exc:
                res[tag] = f"unavailable: {type(exc).__name__}"
    nums = {k_: v_ for k_, v_ in res.items() if isinstance(v_, float)}
    # a stronger dense baseline for reference (not used for the headline speedup): this package's
    # split-K dense decode kernel over the same cache (DecodePlan(dense=True))
    try:
        plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=q.shape[1], dense=True)
        fn = lambda: plan.run(q, None, 0)  # noqa: E731
        res["triton_splitk_dense"] = bench(graph_of(fn) or fn)
    except Exception as exc:
        res["triton_splitk_dense"] = f"unavailable: {type(exc).__name__}"
    if not nums:
        return None, None, res, None
    best = min(nums, key=nums.get)
    return nums[best], best, res, fns[best]


LAYERS_PER_GRAPH = 8


def per_layer_ms(fn, n=LAYERS_PER_GRAPH):
    """ms per call of fn when n calls are captured in ONE CUDA graph (as a whole model's decode step
    is): the graph's fixed launch cost (see graph_floor_us) is shared by the n layers. Every call runs
    the full chain in order (no overlap between calls beyond what the stream allows)."""
    rep = graph_of(lambda: [fn() for _ in range(n)])
    return bench(rep) / n if rep is not None else None


def model_step(contexts, idxs, dev, layers=LAYERS_PER_GRAPH):
    """Decode as a model runs it (batch 1, one token): ``layers`` DISTINCT layer caches (their bytes
    well over twice the L2) chained in one CUDA graph, replayed back to back without a cache flush, for
    MSA (DecodePlan defaults) and dense SDPA (fastest backend) over the same caches. Returns rows."""
    rows = []
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    for L in contexts:
        dense_pl = None
        for idx in idxs:
            row = dict(B=1, L=L, t=1, index=idx, layers=layers)
            cache = None
            try:
                cache = build_cache(1, L, False, idx, dev, layers=layers)
                q, qi = make_queries(1, 1, dev)
                row["bytes_msa_per_layer"] = msa_bytes(1, L, 1, idx)
                row["bytes_kv_index_all_layers"] = layers * (dense_bytes(1, L) + L * DI * (2 if idx == "bf16" else 1))
                row["l2_bytes"] = l2
                plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=1)
                rep = graph_of(lambda: [plan.run(q, qi, i) for i in range(layers)])
                row["msa_us_per_layer"] = back_to_back_ms(rep, 20, warmup=3) / layers * 1e3
                if dense_pl is None:  # every SDPA variant in the same 8-layer graph; the fastest is the baseline
                    qp = sdpa_inputs(cache, L, q)[0]
                    kv = [(cache.k[i][:, :L].transpose(1, 2), cache.v[i][:, :L].transpose(1, 2)) for i in range(layers)]
                    found = {}
                    for name, be in sdpa_variants():
                        for tag, one in ((name, lambda k_, v_, be=be: run_sdpa(be, qp, k_, v_, D ** -0.5)),
                                         (f"{name}+enable_gqa", lambda k_, v_, be=be: run_sdpa(
                                             be, q.transpose(1, 2), k_, v_, D ** -0.5, enable_gqa=True))):
                            try:
                                drep = graph_of(lambda one=one: [one(k_, v_) for k_, v_ in kv])
                                if drep is not None:
                                    found[tag] = back_to_back_ms(drep, 20, warmup=3) / layers * 1e3
                            except Exception as exc:  # a backend that does not take this layout
                                found[tag] = f"unavailable: {type(exc).__name__}"
                    nums = {k_: v_ for k_, v_ in found.items() if isinstance(v_, float)}
                    row["dense_all_us_per_layer"] = found
                    if not nums:
                        raise RuntimeError(f"no dense SDPA variant ran: {found}")
                    best = min(nums, key=nums.get)
                    dense_pl, row["dense_backend"] = nums[best], best
                    del kv
                row["dense_us_per_layer"] = dense_pl
                row["speedup"] = dense_pl / row["msa_us_per_layer"]
                row["msa_GBps"] = row["bytes_msa_per_layer"] / (row["msa_us_per_layer"] * 1e-6) / 1e9
                row["status"] = "ok"
                del plan, rep
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
            finally:
                del cache
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"model step L={L} {idx}: " + (f"MSA {row['msa_us_per_layer']:.1f} us/layer ({row['msa_GBps']:.0f} GB/s), "
                                                 f"dense {row['dense_us_per_layer']:.1f} us/layer, {row['speedup']:.2f}x"
                                                 if row["status"] == "ok" else row["status"]), flush=True)
    return rows


def graph_floor_us():
    """do_bench time (us) of a captured graph holding one 1-element kernel: the fixed cost every
    single-graph timing above includes."""
    x = torch.zeros(1, device="cuda")
    return bench(graph_of(lambda: x.add_(1.0))) * 1000


def breakdown(plan, q, qi, iters=20):
    """Per-kernel GPU time (us, mean of iters) of an EAGER run: CUDA events recorded right before each
    launch (DecodePlan.run's timer hook). Gaps include host launch latency when the GPU runs ahead
    of the CPU, so the sum exceeds the graph-replay total; the split between kernels is the point."""
    names, evs, tot = [], [], {}

    def timer(name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        evs.append(e)
        names.append(name)
    for it in range(iters + 3):
        names.clear()
        evs.clear()
        plan.run(q, qi, 0, timer=timer)
        torch.cuda.synchronize()
        if it < 3:
            continue
        for i in range(len(evs) - 1):
            tot[names[i]] = tot.get(names[i], 0.0) + evs[i].elapsed_time(evs[i + 1])
    return {k_: v_ / iters * 1000 for k_, v_ in tot.items()}


def graph_timeline(rep, reps=5):
    """GPU timeline of graph replays (torch.profiler / CUPTI): [(kernel, start us from the first kernel's
    start, duration us)] of the last replay, plus the span (first start to last end). Shows how much of a
    step is kernel time and how much is the gaps between the chain's launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    rep()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            rep()
            torch.cuda.synchronize()
    kern = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start),
                  key=lambda e: e.time_range.start)
    if not kern:
        return None
    per = len(kern) // reps
    last = kern[-per:]
    t0 = last[0].time_range.start
    rows = [(e.name.split("(")[0][:40], round(e.time_range.start - t0, 2), round(e.time_range.end - e.time_range.start, 2))
            for e in last]
    return dict(kernels=rows, span_us=round(max(e.time_range.end for e in last) - t0, 2),
                kernel_sum_us=round(sum(r[2] for r in rows), 2))


INDEX_SWEEP = [dict(), dict(index_programs_per_sm=1, index_num_stages=4), dict(index_programs_per_sm=2, index_num_stages=4),
               dict(index_programs_per_sm=4, index_num_stages=3), dict(index_programs_per_sm=8, index_num_stages=2),
               dict(index_tile_blocks=1), dict(index_tile_blocks=2), dict(index_tile_blocks=4, index_num_stages=2),
               # legacy chain: blocks per top-k program
               dict(fused=False), dict(fused=False, topk_chunk=1024), dict(fused=False, topk_chunk=2048)]


ATTN_SPLIT_SWEEP = [dict(attention_splits=n) for n in (1, 2, 4, 8, 16)] + [
    dict(attention_splits=1, index_programs_per_sm=4), dict(attention_splits=4, index_programs_per_sm=4)]


def index_sweep(cache, q, qi, t, sweep=INDEX_SWEEP):
    """Graph-replay time (ms) of the whole step for a few geometries (tuning data; fused chain unless
    the config says fused=False)."""
    out = {}
    for cfg in sweep:
        key = ",".join(f"{k_}={v_}" for k_, v_ in cfg.items()) or "default"
        try:
            plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=t, **cfg)
            fn = lambda: plan.run(q, qi, 0)  # noqa: E731
            out[key] = bench(graph_of(fn) or fn)
        except Exception as exc:
            out[key] = f"error: {type(exc).__name__}: {exc}"[:200]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--contexts", type=positive_ints, default=None, help="comma-separated context lengths")
    ap.add_argument("--batches", type=positive_ints, default=None, help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=positive_ints, default=None, help="comma-separated query tokens per step")
    ap.add_argument("--indexes", default=None, help="comma-separated index-key formats: bf16,fp8tok,fp8blk")
    ap.add_argument("--layouts", default=None, help="comma-separated: contig,paged")
    ap.add_argument("--model-step", action="store_true",
                    help=f"only the model-like timing: {LAYERS_PER_GRAPH} distinct layers per graph, batch 1, no "
                         "cache flush (contexts from --contexts, default 128K and 1M; index formats from --indexes)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    check_cuda = torch.cuda.is_available()
    if not check_cuda:
        print("CUDA is required for this benchmark")
        sys.exit(1)
    dev = torch.device("cuda")
    import triton
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), command=" ".join(sys.argv),
                shape=dict(H_q=HQ, H_kv=HKV, D=D, D_idx=DI, block_size=BS, topk=TOPK))
    ok, checks = gate(dev)
    print(f"GATE {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f}s)", flush=True)
    bw = copy_bandwidth(dev)
    print(f"device-to-device copy bandwidth: {bw:.0f} GB/s", flush=True)
    floor = graph_floor_us()
    print(f"graph floor (one tiny kernel, do_bench): {floor:.1f} us", flush=True)
    if args.model_step:
        ctx = args.contexts if args.contexts else [131072, 1048576]
        rows = model_step(ctx, args.indexes.split(",") if args.indexes else ["bf16", "fp8blk"], dev)
        out = dict(meta=meta, gate=dict(passed=ok, checks=checks), copy_GBps=bw, graph_floor_us=floor,
                   layers_per_graph=LAYERS_PER_GRAPH, model_step=rows, wall_s=time.time() - t0,
                   method=f"{LAYERS_PER_GRAPH} distinct layer caches chained in one CUDA graph, batch 1, one token, "
                          "replayed back to back (CUDA events, mean of 20) without any L2 flush")
        with open(os.path.join(args.out, "bench_decode_model_step.json"), "w") as f:
            json.dump(out, f, indent=1)
        print(f"\n{'L':>8} {'index':>6} {'MSA us/layer':>12} {'GB/s':>6} {'dense us/layer':>14} {'speedup':>8}")
        for r in rows:
            if r.get("status") == "ok":
                print(f"{r['L']:>8} {r['index']:>6} {r['msa_us_per_layer']:>12.1f} {r['msa_GBps']:>6.0f} "
                      f"{r['dense_us_per_layer']:>14.1f} {r['speedup']:>7.2f}x")
        return

    if args.quick:
        contexts, batches, toks, idxs, layouts = [131072, 1048576], [1], [1], ["bf16", "fp8blk"], [False, True]
    else:
        contexts, batches, toks = [32768, 131072, 524288, 1048576], [1, 16], [1, 4]
        idxs, layouts = ["bf16", "fp8tok", "fp8blk"], [False, True]
    # explicit subsets (comma-separated) override the defaults above
    if args.contexts:
        contexts = args.contexts
    if args.batches:
        batches = args.batches
    if args.tokens:
        toks = args.tokens
    if args.indexes:
        idxs = args.indexes.split(",")
    if args.layouts:
        layouts = [x == "paged" for x in args.layouts.split(",")]
    results = []
    for B in batches:
        for L in contexts:
            need = dense_bytes(B, L) * 1.1 + B * L * DI * 2
            free = torch.cuda.mem_get_info()[0]
            if need > free:
                results.append(dict(B=B, L=L, status=f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} free"))
                print(f"B={B} L={L}: skipped (memory)", flush=True)
                continue
            for t in toks:
                dense_ms = dense_be = own_dense = dense_pl = None
                for paged in layouts:
                    for idx in idxs:
                        row = dict(B=B, L=L, t=t, paged=paged, index=idx)
                        cache = None
                        try:
                            cache = build_cache(B, L, paged, idx, dev)
                            q, qi = make_queries(B, t, dev)
                            if dense_ms is None and not paged:
                                dense_ms, dense_be, dres, dense_fn = time_dense(cache, L, q)
                                dense_pl = per_layer_ms(dense_fn) if dense_fn is not None else None
                                row["dense_all"] = dres
                                own_dense = dres.get("triton_splitk_dense")
                            mb = msa_bytes(B, L, t, idx)
                            chains = {}
                            for chain, pkw in (("fused", dict(fused=True)), ("legacy", dict(fused=False))):
                                plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=t, **pkw)
                                fn = lambda plan=plan: plan.run(q, qi, 0)  # noqa: E731
                                rep = graph_of(fn)
                                ms_c = bench(rep or fn)
                                bd = breakdown(plan, q, qi)
                                geo = dict(fused=plan.fused, index_programs=B * plan.idx_row_tiles * plan.idx_splits,
                                           index_tiles_per_program=plan.idx_tps, index_tile_blocks=plan.idx_nbt,
                                           index_stages=plan.idx_stages, attention_splits=plan.att_splits,
                                           launches=len(bd))
                                if plan.fused:
                                    geo.update(candidates_per_row=plan.ncand)
                                else:
                                    geo.update(topk_chunks=plan.nc)
                                chains[chain] = dict(ms=ms_c, graph=rep is not None, breakdown_eager_us=bd, geometry=geo)
                                if B == 1 and t == 1 and not paged and rep is not None:
                                    try:
                                        tl_ = graph_timeline(rep)
                                    except Exception as exc:  # profiler problems must not lose the run
                                        tl_ = f"unavailable: {type(exc).__name__}: {exc}"[:200]
                                    chains[chain]["graph_timeline"] = tl_
                                    if isinstance(tl_, dict):
                                        print(f"  {chain:>6} graph timeline (us): span {tl_['span_us']}, kernels "
                                              + " | ".join(f"{n} @{a} +{d}" for n, a, d in tl_["kernels"]), flush=True)
                                print(f"  {chain:>6} per-kernel (eager, us): "
                                      + " ".join(f"{k_} {v_:.1f}" for k_, v_ in bd.items())
                                      + f" | sum {sum(bd.values()):.1f} vs graph total {ms_c * 1e3:.1f}", flush=True)
                                del plan, fn, rep
                            # DecodePlan's default chain for this capacity (fused up to 256K tokens)
                            default_chain = "fused" if L <= (1 << 18) else "legacy"
                            ms = chains[default_chain]["ms"]
                            row.update(default_chain=default_chain, fused_ms=chains["fused"]["ms"])
                            row["chains"] = chains
                            row["breakdown_eager_us"] = chains["fused"]["breakdown_eager_us"]
                            row["geometry"] = chains["fused"]["geometry"]
                            row.update(legacy_ms=chains["legacy"]["ms"], fused_gain=chains["legacy"]["ms"] / ms)
                            if L == contexts[-1] and B == 1 and t == 1 and not paged:
                                for name, sweep in (("index_sweep_ms", INDEX_SWEEP),
                                                    ("attention_split_sweep_ms", ATTN_SPLIT_SWEEP)):
                                    sw = index_sweep(cache, q, qi, t, sweep)
                                    row[name] = sw
                                    print(f"  {name} (graph ms, fused chain): " + " ".join(
                                        f"[{k_}] {v_:.4f}" if isinstance(v_, float) else f"[{k_}] {v_}"
                                        for k_, v_ in sw.items()), flush=True)
                            # a model step captures every layer in one graph: per-layer time of 8 chained steps
                            plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=t)
                            msa_pl = per_layer_ms(lambda: plan.run(q, qi, 0))
                            del plan
                            row.update(msa_ms_per_layer_8=msa_pl, dense_ms_per_layer_8=dense_pl)
                            if msa_pl and dense_pl:
                                row["speedup_per_layer_8"] = dense_pl / msa_pl
                            row.update(msa_ms=ms, graph=chains["fused"]["graph"], msa_bytes=mb,
                                       msa_GBps=mb / (ms * 1e-3) / 1e9,
                                       dense_ms=dense_ms, dense_backend=dense_be, dense_bytes=dense_bytes(B, L))
                            if dense_ms:
                                row.update(dense_GBps=dense_bytes(B, L) / (dense_ms * 1e-3) / 1e9,
                                           speedup=dense_ms / ms, legacy_speedup=dense_ms / row["legacy_ms"])
                            if isinstance(own_dense, float):
                                row.update(triton_dense_ms=own_dense, speedup_vs_triton_dense=own_dense / ms)
                            row["status"] = "ok"
                        except torch.cuda.OutOfMemoryError:
                            row["status"] = "OOM"
                        except Exception as exc:
                            row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                        finally:
                            del cache
                            torch.cuda.empty_cache()
                        results.append(row)
                        if row["status"] == "ok":
                            print(f"B={B} L={L} t={t} {'paged' if paged else 'contig'} {idx}: msa ({row['default_chain']}) {row['msa_ms']:.4f} ms "
                                  f"({row['msa_GBps']:.0f} GB/s) legacy {row['legacy_ms']:.4f} ms | dense "
                                  f"{dense_ms or float('nan'):.3f} ms [{dense_be}] speedup "
                                  f"{row.get('speedup', float('nan')):.2f}x (fused {row['fused_ms']:.4f} ms) legacy "
                                  f"{row.get('legacy_speedup', float('nan')):.2f}x | {LAYERS_PER_GRAPH} layers per graph: "
                                  f"{(row['msa_ms_per_layer_8'] or float('nan')) * 1e3:.1f} vs "
                                  f"{(row['dense_ms_per_layer_8'] or float('nan')) * 1e3:.1f} us per layer "
                                  f"({row.get('speedup_per_layer_8', float('nan')):.2f}x)", flush=True)
                        else:
                            print(f"B={B} L={L} t={t} paged={paged} {idx}: {row['status']}", flush=True)
    out = dict(meta=meta, gate=dict(passed=ok, checks=checks), copy_GBps=bw, graph_floor_us=floor,
               layers_per_graph=LAYERS_PER_GRAPH, results=results,
               targets="1M tokens, batch 1: >= 7.6x (bf16 index keys), >= 12x (fp8 index keys) vs dense",
               wall_s=time.time() - t0)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(out, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "bench_decode.png"), meta["gpu"])
    except Exception as exc:  # plotting is optional
        print(f"(plot failed: {exc})")
    print(f"\nGPU {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  copy {bw:.0f} GB/s  "
          f"gate {'PASS' if ok else 'FAIL'}")
    print(f"{'B':>3} {'L':>8} {'t':>2} {'layout':>6} {'index':>6} {'msa ms':>9} {'GB/s':>6} {'legacy ms':>9} "
          f"{'dense ms':>9} {'GB/s':>6} {'speedup':>8} {'legacy x':>8} {'vs triton dense':>15} {'x, 8 layers/graph':>17}")
    for r in results:
        if r.get("status") != "ok":
            continue
        print(f"{r['B']:>3} {r['L']:>8} {r['t']:>2} {'paged' if r['paged'] else 'contig':>6} {r['index']:>6} "
              f"{r['msa_ms']:>9.4f} {r['msa_GBps']:>6.0f} {r['legacy_ms']:>9.4f} {r['dense_ms'] or float('nan'):>9.3f} "
              f"{r.get('dense_GBps', float('nan')):>6.0f} {r.get('speedup', float('nan')):>7.2f}x "
              f"{r.get('legacy_speedup', float('nan')):>7.2f}x {r.get('speedup_vs_triton_dense', float('nan')):>14.2f}x "
              f"{r.get('speedup_per_layer_8', float('nan')):>16.2f}x")


def plot(results, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    keys = sorted({(r["B"], r["t"], r["paged"], r["index"]) for r in results if r.get("status") == "ok"})
    for key in keys:
        pts = sorted((r["L"], r["speedup"]) for r in results if r.get("status") == "ok" and "speedup" in r
                     and (r["B"], r["t"], r["paged"], r["index"]) == key)
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"B={key[0]} t={key[1]} {'paged' if key[2] else 'contig'} {key[3]}")
            leg = sorted((r["L"], r["legacy_speedup"]) for r in results if r.get("status") == "ok"
                         and "legacy_speedup" in r and (r["B"], r["t"], r["paged"], r["index"]) == key)
            if leg:  # the legacy (4-5 launch) chain, dashed in the same colour
                ax.plot([p[0] for p in leg], [p[1] for p in leg], ls="--", marker="x", c=line.get_color(), lw=0.8)
    ax.axhline(7.6, ls="--", c="gray", lw=0.8)
    ax.axhline(12, ls=":", c="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("speedup over dense SDPA decode")
    ax.set_title(f"MSA decode (64/4/128, d_idx 128, B_k 128, k 16) on {gpu}; dashed: legacy chain", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
