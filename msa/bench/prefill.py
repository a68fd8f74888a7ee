"""Prefill benchmark of MSA at the paper's shape vs dense causal GQA (spec sections 3-4).

    msa bench prefill --out DIR [--quick] [--sizes 8192,32768] [--no-flex]
    msa bench prefill --out DIR --sizes 524288,1048576   # large T, < 4 min

Shape: batch 1, H_q 64, H_kv 4, D 128, d_idx 128, B_k 128, k 16, bf16. Sizes T = 8K, 32K, 128K,
512K, 1M (--quick: 8K, 32K, 128K; about 1-2 minutes on an H100, most of it FlexAttention compiles).

1. Parity gate (bf16, GPU): both sparse-attention kernels vs ``sparse_attention_reference`` (fp32
   math on the same bf16 inputs) at T ~ 2K-4K for G = 16, 3, 64, 1 and a packed batch, indices
   from ``select_blocks_reference``. Tolerances: o max abs err <= 2e-2 and rmse(o - ref) / rmse(ref)
   <= 1e-2, lse max abs err <= 5e-3. Prints PASS/FAIL; on FAIL nothing is timed (exit code 1).
2. Timing: ``triton.testing.do_bench`` medians (calls over 100 ms: 1 warm-up + ``--heavy-reps``
   timed calls with CUDA events, median). Variants: the indexer ``msa.select_blocks(backend="triton")``
   (if it fails, recorded, and the attention uses synthetic indices: local block + 15 random
   earlier blocks per (token, group)); the sparse attention forward with the KV-outer and the
   query-outer kernel, the query-tiled kernel, and the one ``auto`` picks; the total (indexer + auto
   attention, timed apart and summed) and ``total_e2e`` (the layer's prefill attention,
   ``msa_prefill_attention``, timed as one call: what a model runs, the host work of one op hidden
   behind the other's GPU work; on replayed selections the indexer call then the attention); the same kernels on selections replayed from a trained model (``msa.bench.selections``,
   "realistic": neighbouring tokens select alike, which the query-tiled kernel exploits) with the
   mean union of blocks per query tile for both kinds of selection; dense
   causal GQA through torch SDPA with the cuDNN and the flash backends (enable_gqa) up to
   ``--dense-max`` (default 128K); above it dense is estimated by T^2 from the largest dense time
   of this run (or from one cuDNN call at 128K); if the estimate is under 30 s, one cuDNN call at T
   is timed (label "timed once"), else the estimate is reported (label "extrapolated", * in the
   table); FlexAttention (up to ``--flex-max``, default 128K: every new T recompiles) with a
   BlockMask giving each query the same 16-block budget (sink block 0 + 14 previous blocks + its
   own block, causal inside it).
   Breakdown: one extra KV-outer call with CUDA events per stage (reverse index build, KV-outer
   kernel, combine kernel; summed over query chunks) next to the indexer's time.
   FLOPs (spec section 3): dense 2*H_q*d*T^2, sparse attention 4*H_q*d*T*k*B_k, index H_kv*d_idx*T^2;
   FlexAttention is rated with the sparse-attention formula. Peak memory is
   torch.cuda.max_memory_allocated during the variant. Inputs are not rotated: every tensor is
   >= 128 MB at T >= 8K, larger than L2.
   --sweep T also times a few launch configurations / partial budgets of both kernels at T
   (``msa.tuning`` overrides) to tune the defaults.
3. Output: DIR/bench_prefill.json (GPU, versions, command, gate, results), DIR/bench_prefill.png,
   and a table printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

import msa.tuning
import triton

import msa  # noqa: E402
from msa.ops.select_blocks.reference import select_blocks_reference  # noqa: E402
from msa.ops.sparse_attention.reference import sparse_attention_reference  # noqa: E402
from msa.ops.sparse_attention.triton_impl import (_partial_budget, choose_kernel,  # noqa: E402
                                                  partial_bytes_per_token, sparse_attention_fwd_triton,
                                                  tiled_tile_tokens)
from msa.bench.timing import back_to_back_ms, host_ms  # noqa: E402
from msa.bench.selections import greedy_union_blocks, realistic_indices, selection_recall, union_blocks  # noqa: E402
from msa.bench import positive_ints  # noqa: E402

DENSE_ONCE_MAX_S = 30.0  # above --dense-max, time dense once only if the T^2 estimate is below this

HQ, HKV, D, DIDX, BK, TOPK = 64, 4, 128, 128, 128, 16
KERNELS = ("kv", "qo", "tiled", "tiled_greedy")  # tiled_greedy: tiles grouped by selection (tuning.tile_order)


def _forward(kern, *args, **kw):
    """sparse_attention_fwd_triton with the kernel named in KERNELS."""
    with msa.tuning.override(tile_order="greedy" if kern == "tiled_greedy" else "consecutive"):
        return sparse_attention_fwd_triton(*args, kernel=kern.split("_")[0], **kw)
DT = torch.bfloat16


# ----------------------------------------------------------------------------------------------- helpers
def flops(t):
    return dict(dense=2 * HQ * D * t * t, sparse=4 * HQ * D * t * TOPK * BK, index=HKV * DIDX * t * t)


def timed(fn, heavy_reps=2):
    """Median ms of fn(): do_bench for short calls, CUDA events for calls over 100 ms."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    if first < 100:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(heavy_reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def measure(name, fn, heavy_reps):
    """{'ms', 'peak_gb'} or {'error'}; OOM and other failures are recorded, not raised."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(fn, heavy_reps)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        return dict(ms=ms, peak_gb=peak)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(error="OOM")
    except Exception as exc:  # a baseline missing on this torch build must not stop the run
        torch.cuda.empty_cache()
        return dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")


def e2e_extras(res, fn):
    """Adds to an e2e timing: ``host_ms`` (the call's host time on an idle GPU: host-bound when it nears
    ``ms``) and ``b2b_ms`` (calls back to back with a warm allocator, as a model's layers run them,
    where ``measure`` empties the allocator's cache first)."""
    res["host_ms"] = host_ms(fn)
    res["b2b_ms"] = back_to_back_ms(fn, reps=max(2, min(20, int(200 / max(res["ms"], 1e-3)))), warmup=1)


def layer_prefill(q, k, v, qi, ki, block_indices=None):
    """The prefill attention as a model's layer runs it, one call to time: ``msa_prefill_attention``
    (select_blocks, one SelectionPlan, sparse_attention, default tuning). With ``block_indices``
    (replayed selections): the same indexer call, its result unused, then the attention on those with
    their SelectionPlan, as the layer builds it."""
    from msa.layers.attention import msa_prefill_attention
    from msa.ops.sparse_attention.triton_impl import selection_plan

    scale, index_scale = D ** -0.5, DIDX ** -0.5
    if block_indices is None:
        return msa_prefill_attention(q, k, v, qi, ki, sparse=True, compute_kl=False, block_size=BK,
                                     topk_blocks=TOPK, scale=scale, index_scale=index_scale)
    msa.select_blocks(qi, ki, block_size=BK, topk=TOPK, scale=index_scale, validate=False)
    plan = selection_plan(block_indices, block_size=BK, cu_seqlens=None, num_heads=q.shape[2], head_dim=D,
                          dtype=q.dtype, index_dim=DIDX)
    return msa.sparse_attention(q, k, v, block_indices, block_size=BK, scale=scale, validate=False, plan=plan)


def synthetic_indices(t, device, seed=0):
    """int32 (1, T, H_kv, TOPK) in the spec convention: up to 15 random earlier blocks (ascending),
    the local block in the last valid slot, -1 after. Chunked so no (T, NB) buffer over ~1 GB."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = math.ceil(t / BK)
    out = torch.empty(t, HKV, TOPK, dtype=torch.int32, device=device)
    chunk = max(BK, (1 << 28) // (HKV * nb) // BK * BK)
    big = 1 << 30
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        nbc = math.ceil(c1 / BK)
        local = torch.arange(c0, c1, device=device) // BK
        sc = torch.rand(c1 - c0, HKV, nbc, generator=gen, device=device)
        b = torch.arange(nbc, device=device)
        sc = torch.where((b.view(1, 1, -1) < local.view(-1, 1, 1)), sc, torch.full_like(sc, -1.0))
        kk = min(TOPK - 1, nbc)
        vals, ids = sc.topk(kk, dim=-1)
        ids = torch.where(vals >= 0, ids, torch.full_like(ids, big)).sort(-1).values
        nvalid = (ids < big).sum(-1, keepdim=True)
        ids = torch.cat([ids, torch.full_like(ids[..., :1], big)], -1)
        if ids.shape[-1] < TOPK:
            ids = torch.cat([ids, torch.full_like(ids[..., :1], big).expand(-1, -1, TOPK - ids.shape[-1])], -1)
        ids = ids.scatter(-1, nvalid, local.view(-1, 1, 1).expand(-1, HKV, 1))
        out[c0:c1] = torch.where(ids >= big, torch.full_like(ids, -1), ids).to(torch.int32)
    return out.unsqueeze(0)


def flex_block_mask(t, device):
    """BlockMask with the MSA budget: per query block qb, full blocks {0} U [qb-14, qb-1] and the
    partial (causal) diagonal block qb -> 16 blocks per query once qb >= 15."""
    from torch.nn.attention.flex_attention import BlockMask

    nqb = math.ceil(t / BK)
    qb = torch.arange(nqb, device=device)
    cand = torch.cat([torch.zeros(nqb, 1, dtype=torch.long, device=device),
                      qb.view(-1, 1) - 14 + torch.arange(14, device=device).view(1, -1)], 1)
    ok = (cand >= 0) & (cand < qb.view(-1, 1))
    ok[:, 1:] &= cand[:, 1:] != 0  # block 0 is already the sink column
    big = nqb + 1
    full = torch.where(ok, cand, torch.full_like(cand, big)).sort(-1).values
    full_num = ok.sum(-1)
    pad = torch.zeros(nqb, nqb, dtype=torch.int32, device=device)
    full_idx = pad.clone()
    w = min(full.shape[1], nqb)  # sorted valid ids come first and there are at most qb < nqb of them
    full_idx[:, :w] = torch.where(full < big, full, torch.zeros_like(full))[:, :w].to(torch.int32)
    part_idx = pad
    part_idx[:, 0] = qb.to(torch.int32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(torch.ones(1, 1, nqb, dtype=torch.int32, device=device), part_idx.view(1, 1, nqb, nqb),
                                    full_num.to(torch.int32).view(1, 1, nqb), full_idx.view(1, 1, nqb, nqb),
                                    BLOCK_SIZE=BK, mask_mod=causal, seq_lengths=(t, t))


# ------------------------------------------------------------------------------------------ parity gate
def parity_gate(device):
    cases = [  # (name, hq, hkv, d, lengths (packed when several), dtype)
        ("G16 d128 T4096", 64, 4, 128, [4096], DT),
        ("G3 d128 T3001", 12, 4, 128, [3001], DT),
        ("G64 d64 T2500", 64, 1, 64, [2500], DT),
        ("G1 d64 T2177", 8, 8, 64, [2177], DT),
        ("G16 d128 packed 1000+1+1537+700", 32, 2, 128, [1000, 1, 1537, 700], DT),
        ("G16 d128 T3000 fp16", 64, 4, 128, [3000], torch.float16),
        ("G12 d64 T2049 fp16", 24, 2, 64, [2049], torch.float16),
    ]
    rows, ok_all = [], True
    gen = torch.Generator(device=device).manual_seed(0)
    for name, hq, hkv, d, lens, dt in cases:
        t = sum(lens)
        cu = None if len(lens) == 1 else torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                                                       device=device)
        q = torch.randn(1, t, hq, d, generator=gen, device=device).to(dt)
        k = torch.randn(1, t, hkv, d, generator=gen, device=device).to(dt)
        v = torch.randn(1, t, hkv, d, generator=gen, device=device).to(dt)
        qi = torch.randn(1, t, hkv, DIDX, generator=gen, device=device).to(dt)
        ki = torch.randn(1, t, DIDX, generator=gen, device=device).to(dt)
        bi = select_blocks_reference(qi, ki, block_size=BK, topk=TOPK, init_blocks=0, local_blocks=1,
                                     scale=DIDX ** -0.5, cu_seqlens=cu)
        # the reference in fp32 on the same (bf16-rounded) inputs: the kernel's only extra error is
        # bf16 P before the PV product and the bf16 output
        o32, l_ref = sparse_attention_reference(q.float(), k.float(), v.float(), bi, block_size=BK,
                                                scale=d ** -0.5, cu_seqlens=cu)
        # "kv-chunks": the KV-outer path with a budget of ~1/5 of the tokens' partials (reused buffer)
        for kern in KERNELS + ("kv-chunks",):
            try:
                budget = None if kern != "kv-chunks" else max(1, t // 5) * partial_bytes_per_token(TOPK, hq, d, dt)
                o, lse = _forward(kern.split("-")[0], q, k, v, bi, block_size=BK, scale=d ** -0.5, cu_seqlens=cu,
                                  partial_budget_bytes=budget)
                torch.cuda.synchronize()
                err = (o.float() - o32).abs().max().item()
                rel = ((o.float() - o32).pow(2).mean().sqrt() / o32.pow(2).mean().sqrt()).item()
                lerr = (lse - l_ref).abs().max().item()
                ok = (err <= 2e-2) and (rel <= 1e-2) and (lerr <= 5e-3) and bool(torch.isfinite(o).all())
                rows.append(dict(case=name, kernel=kern, max_abs=err, rel_rmse=rel, lse_max_abs=lerr, ok=ok))
            except Exception as exc:
                ok = False
                rows.append(dict(case=name, kernel=kern, ok=False, error=f"{type(exc).__name__}: {exc}"[:500]))
                traceback.print_exc()
            ok_all &= ok
            r = rows[-1]
            print(f"  parity {name:34s} {kern}: " + ("PASS" if ok else "FAIL") +
                  (f"  max_abs {r['max_abs']:.2e} rel_rmse {r['rel_rmse']:.2e} lse {r['lse_max_abs']:.2e}"
                   if "max_abs" in r else f"  {r.get('error')}"), flush=True)
    return ok_all, rows


# ------------------------------------------------------------------------------------------------ main
def run_size(t, args, device, indexer_fn, flex_fn, dense_hist):
    res = dict(T=t, flops=flops(t))
    gen = torch.Generator(device=device).manual_seed(t)
    q = torch.randn(1, t, HQ, D, generator=gen, device=device, dtype=DT)
    k = torch.randn(1, t, HKV, D, generator=gen, device=device, dtype=DT)
    v = torch.randn(1, t, HKV, D, generator=gen, device=device, dtype=DT)
    qi = torch.randn(1, t, HKV, DIDX, generator=gen, device=device, dtype=DT)
    ki = torch.randn(1, t, DIDX, generator=gen, device=device, dtype=DT)
    hr = args.heavy_reps

    bi = None
    if indexer_fn is not None:
        last = {}

        def run_indexer():
            last["bi"] = None  # drop the previous result first: at 1M it is 256 MB
            last["bi"] = indexer_fn(qi, ki)
        res["indexer"] = measure("indexer", run_indexer, hr)
        if "ms" in res["indexer"] and last.get("bi") is not None:
            bi = last["bi"]  # the timed calls' result: no extra (at 1M: seconds-long) call
            res["indices"] = "indexer"
            try:  # the kernels below trust their indices: validate the indexer's output first
                from msa.ops.sparse_attention.interface import check_block_indices
                check_block_indices(bi, 1, t, HKV, BK, None)
            except ValueError as exc:
                res["indexer"]["error"] = f"invalid indexer output: {exc}"
                print(f"  T={t}: INVALID indexer output ({exc}); using synthetic indices", flush=True)
                bi = None
        last.clear()
    else:
        res["indexer"] = dict(error="triton indexer unavailable")
    if bi is None:
        bi = synthetic_indices(t, device)
        res["indices"] = "synthetic (local + 15 random earlier blocks)"
    elif indexer_fn is not None:  # fp8 index scores: time, and block recall against the bf16 selection
        # the default fp8 path (candidates rescored exactly) and the fp8 selection alone
        for key, extra in (("", {}), ("_no_rescore", dict(fp8_rescore_blocks=0))):
            res[f"indexer_fp8{key}"] = measure(f"indexer_fp8{key}", lambda: msa.select_blocks(
                qi, ki, block_size=BK, topk=TOPK, backend="triton", fp8_scores=True, **extra), hr)
            try:
                res[f"fp8_block_recall{key}"] = selection_recall(bi, msa.select_blocks(
                    qi, ki, block_size=BK, topk=TOPK, backend="triton", fp8_scores=True, **extra))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                res[f"fp8_block_recall{key}"] = "OOM"

    scale = D ** -0.5
    for kern in KERNELS:
        res[f"sparse_{kern}"] = measure(kern, lambda: _forward(
            kern, q, k, v, bi, block_size=BK, scale=scale, cu_seqlens=None), hr)
    tt = tiled_tile_tokens(D, HQ // HKV, BK)
    res["union_blocks"] = union_blocks(bi, tt)
    res["union_blocks_greedy"] = greedy_union_blocks(bi, tt)
    # the same kernels on selections replayed from a trained model (msa.bench.selections)
    try:
        real = realistic_indices(t, HKV, TOPK, BK, device)
        res["realistic"] = dict(union_blocks=union_blocks(real, tt), union_blocks_greedy=greedy_union_blocks(real, tt))
        for kern in KERNELS:
            res["realistic"][f"sparse_{kern}"] = measure(kern, lambda: _forward(
                kern, q, k, v, real, block_size=BK, scale=scale, cu_seqlens=None), hr)
        if indexer_fn is not None:  # indexer + attention timed as one call (host work overlapped)
            res["realistic"]["total_e2e"] = measure("total_e2e", lambda: layer_prefill(q, k, v, qi, ki, real), hr)
            if "ms" in res["realistic"]["total_e2e"]:
                e2e_extras(res["realistic"]["total_e2e"], lambda: layer_prefill(q, k, v, qi, ki, real))
        del real
    except (OSError, ValueError) as exc:
        res["realistic"] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    if indexer_fn is not None:
        res["total_e2e"] = measure("total_e2e", lambda: layer_prefill(q, k, v, qi, ki), hr)
        if "ms" in res["total_e2e"]:
            e2e_extras(res["total_e2e"], lambda: layer_prefill(q, k, v, qi, ki))
    del qi, ki
    # the chunk the forward would use now (same budget rule as triton_impl)
    chunk = max(1, _partial_budget(None, device) // partial_bytes_per_token(TOPK, HQ, D, DT))
    auto = choose_kernel(t, HQ // HKV, TOPK, math.ceil(t / BK), math.ceil(t / BK), chunk)
    res["auto_kernel"] = auto
    # per-stage breakdown of one KV-outer call (CUDA events; synchronises, so outside the timing)
    try:
        st = {}
        sparse_attention_fwd_triton(q, k, v, bi, block_size=BK, scale=scale, cu_seqlens=None, kernel="kv",
                                    stage_times=st)
        res["breakdown_kv"] = st
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        res["breakdown_kv"] = dict(error="OOM")
    except Exception as exc:
        res["breakdown_kv"] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    sp = res[f"sparse_{auto}"]
    if "ms" in sp and "ms" in res["indexer"]:
        res["total"] = dict(ms=res["indexer"]["ms"] + sp["ms"])
    if "ms" in sp and "ms" in res.get("indexer_fp8", {}):
        res["total_fp8"] = dict(ms=res["indexer_fp8"]["ms"] + sp["ms"])
    del bi

    # dense causal GQA baselines
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense(be, tt=t):
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(qt[:, :, :tt], kt[:, :, :tt], vt[:, :, :tt],
                                                                    is_causal=True, enable_gqa=True)
    if t <= args.dense_max:
        for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            res[name] = measure(name, lambda be=be: dense(be), hr)
        dense_ok = [res[n]["ms"] for n in ("sdpa_cudnn", "sdpa_flash") if "ms" in res.get(n, {})]
        if dense_ok:
            res["dense_best"] = dict(ms=min(dense_ok), extrapolated=False)
            dense_hist.append((t, min(dense_ok)))
    else:
        res["sdpa_flash"] = dict(error=f"skipped (T > {args.dense_max})")
        if not dense_hist:  # nothing measured in this run yet: one cuDNN call at 128K as the base
            tb = min(t, 131072)
            r0 = measure("sdpa_cudnn_base", lambda: dense(SDPBackend.CUDNN_ATTENTION, tb), 1)
            if "ms" in r0:
                dense_hist.append((tb, r0["ms"]))
        est = None
        if dense_hist:
            tb, msb = dense_hist[-1]
            est = dict(ms=msb * (t / tb) ** 2, extrapolated=True, from_T=tb)
        if est is not None and est["ms"] < args.dense_once_max * 1e3:
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                s_ev, e_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s_ev.record()
                dense(SDPBackend.CUDNN_ATTENTION)
                e_ev.record()
                torch.cuda.synchronize()
                ms = s_ev.elapsed_time(e_ev)
                res["sdpa_cudnn"] = dict(ms=ms, peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30,
                                         note="timed once (no warm-up)")
                res["dense_best"] = dict(ms=ms, extrapolated=False, note="cuDNN, timed once")
                dense_hist.append((t, ms))
            except Exception as exc:  # OOM or a missing backend: fall back to the estimate
                torch.cuda.empty_cache()
                res["sdpa_cudnn"] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
        else:
            res["sdpa_cudnn"] = dict(error=f"skipped (T > {args.dense_max}, estimate over {args.dense_once_max:.0f} s)")
        if "dense_best" not in res and est is not None:
            res["dense_best"] = est

    if flex_fn is not None and t <= args.flex_max:
        try:
            bm = flex_block_mask(t, device)
            res["flex"] = measure("flex", lambda: flex_fn(qt, kt, vt, block_mask=bm, enable_gqa=True), hr)
            del bm
        except Exception as exc:
            res["flex"] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    else:
        res["flex"] = dict(error="skipped")
    del q, k, v, qt, kt, vt
    torch.cuda.empty_cache()
    return res


SWEEP = [  # (env var, value, kernel)
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,PRELOAD=1", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,PRELOAD=1,PREFETCH=1", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,PRELOAD=0,num_stages=1,PREFETCH=1", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=64,num_warps=4,PRELOAD=1,PREFETCH=1", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,num_stages=2", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,num_stages=1", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,PRELOAD=0,num_stages=1", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=8,PRELOAD=0,num_stages=2", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=64,num_warps=4,num_stages=3", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=128,num_warps=4,num_stages=2", "kv"),
    ("sparse_fwd_partial_dtype", "fp32", "kv"),
    ("sparse_fwd_partial_bytes", str(4 << 30), "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=64,num_warps=4,PRELOAD=1", "kv"),
    ("sparse_fwd_partial_bytes", str(1 << 30), "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=64,num_warps=4,num_stages=2", "kv"),
    ("sparse_fwd_kv_config", "BLOCK_M=64,num_warps=4,num_stages=4", "kv"),
    # combine kernel (default BLOCK_H=8 at D 128 / K 16, 4 warps, 1 token per program)
    ("sparse_fwd_combine_config", "BLOCK_H=16,num_warps=8", "kv"),
    ("sparse_fwd_combine_config", "BLOCK_H=4,num_warps=2", "kv"),
    ("sparse_fwd_combine_config", "BLOCK_H=8,num_warps=8", "kv"),
    ("sparse_fwd_combine_config", "TOK_PER_PROG=2", "kv"),
    ("sparse_fwd_qo_config", "BLOCK_N=64,num_warps=4", "qo"),
    ("sparse_fwd_qo_config", "BLOCK_N=128,num_warps=4", "qo"),
    ("sparse_fwd_qo_config", "BLOCK_N=64,num_warps=4,num_stages=3", "qo"),
]


def sweep(t, device, heavy_reps):
    """Launch-configuration sweep of both kernels at one T (synthetic indices), to tune the defaults."""
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, t, HQ, D, generator=gen, device=device, dtype=DT)
    k = torch.randn(1, t, HKV, D, generator=gen, device=device, dtype=DT)
    v = torch.randn(1, t, HKV, D, generator=gen, device=device, dtype=DT)
    bi = synthetic_indices(t, device)
    rows = []
    for var, val, kern in SWEEP:
        with msa.tuning.override(**msa.tuning.parse(f"{var}={val}")):
            r = measure(val, lambda: sparse_attention_fwd_triton(q, k, v, bi, block_size=BK, scale=D ** -0.5,
                                                                 cu_seqlens=None, kernel=kern), heavy_reps)
        if "ms" in r:
            r["tflops"] = tflops(r["ms"], flops(t)["sparse"])
        rows.append(dict(T=t, kernel=kern, var=var, value=val, **r))
        print(f"  sweep T={t} {kern} {var}={val}: " +
              (f"{r['ms']:.2f} ms {r['tflops']:.1f} TF/s" if "ms" in r else r["error"]), flush=True)
    del q, k, v, bi
    torch.cuda.empty_cache()
    return rows


def tflops(ms, f):
    return f / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=positive_ints, default=None, help="comma-separated T values (overrides the defaults)")
    ap.add_argument("--heavy-reps", type=int, default=2, help="timed reps of calls over 100 ms")
    ap.add_argument("--dense-max", type=int, default=1 << 17,
                    help="larger T: dense is timed once if its T^2 estimate is < --dense-once-max s, else extrapolated")
    ap.add_argument("--dense-once-max", type=float, default=DENSE_ONCE_MAX_S,
                    help="seconds: above --dense-max, time one dense call if its estimate is below this")
    ap.add_argument("--flex-max", type=int, default=1 << 17, help="larger T: FlexAttention skipped")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--skip-gate", action="store_true")
    ap.add_argument("--sweep", type=int, default=0, metavar="T",
                    help="also time launch configurations / partial budgets of both kernels at this T")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    sizes = (args.sizes if args.sizes else
             [8192, 32768, 131072] if args.quick else [8192, 32768, 131072, 524288, 1048576])
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command=(" ".join(sys.argv) if sys.argv[0].startswith("msa bench") else
                         "PYTHONPATH=. python " + " ".join(sys.argv)),
                shape=dict(H_q=HQ, H_kv=HKV, D=D, d_idx=DIDX, block=BK, topk=TOPK, dtype="bf16", batch=1),
                tuning={k: str(v) for k, v in vars(msa.tuning.current()).items()})
    print(f"GPU {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}", flush=True)

    if args.skip_gate:
        gate_ok, gate_rows = True, []
    else:
        print("parity gate (bf16 vs reference):", flush=True)
        gate_ok, gate_rows = parity_gate(device)
        print("GATE " + ("PASS" if gate_ok else "FAIL"), flush=True)
    out = dict(meta=meta, gate=dict(passed=gate_ok, rows=gate_rows), results=[])
    path = os.path.join(args.out, "bench_prefill.json")
    if not gate_ok:
        json.dump(out, open(path, "w"), indent=1)
        print("parity gate FAILED: no timing")
        sys.exit(1)

    indexer_fn, out["indexer_status"] = None, "ok"
    try:
        from msa.ops.select_blocks.triton_impl import select_blocks_triton  # noqa: F401

        def indexer_fn(qi, ki):
            return msa.select_blocks(qi, ki, block_size=BK, topk=TOPK, backend="triton")
    except Exception as exc:
        out["indexer_status"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
        print("indexer:", out["indexer_status"], flush=True)
    flex_fn = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:
            out["flex_status"] = f"unavailable: {exc}"[:300]

    if args.sweep:
        out["sweep"] = sweep(args.sweep, device, args.heavy_reps)
        json.dump(out, open(path, "w"), indent=1)
    dense_hist = []  # (T, best dense ms) measured so far, the base of the T^2 estimates
    for t in sizes:
        print(f"T = {t} ...", flush=True)
        try:
            res = run_size(t, args, device, indexer_fn, flex_fn, dense_hist)
        except torch.cuda.OutOfMemoryError:
            res = dict(T=t, error="OOM")
            torch.cuda.empty_cache()
        out["results"].append(res)
        json.dump(out, open(path, "w"), indent=1)
    # dense beyond --dense-max: extrapolate from the largest measured T by T^2
    measured = [r for r in out["results"] if "dense_best" in r]
    if measured:
        base = measured[-1]
        for r in out["results"]:
            if "dense_best" not in r and "error" not in r:
                r["dense_best"] = dict(ms=base["dense_best"]["ms"] * (r["T"] / base["T"]) ** 2, extrapolated=True,
                                       from_T=base["T"])
    for r in out["results"]:
        if "error" in r:
            continue
        f = r["flops"]
        bd = r.get("breakdown_kv", {})
        if "kv_kernel" in bd:
            bd["kv_kernel_tflops"] = tflops(bd["kv_kernel"], f["sparse"])
        for key, fk in (("indexer", "index"), ("indexer_fp8", "index"), ("indexer_fp8_no_rescore", "index"),
                        ("sdpa_cudnn", "dense"), ("sdpa_flash", "dense"), ("dense_best", "dense"),
                        ("flex", "sparse")):
            if "ms" in r.get(key, {}):
                r[key]["tflops"] = tflops(r[key]["ms"], f[fk])
        for key in ("total", "total_fp8", "total_e2e"):
            if "ms" in r.get(key, {}):
                r[key]["tflops"] = tflops(r[key]["ms"], f["index"] + f["sparse"])
        real = r.get("realistic", {})
        for kern in KERNELS:
            if "ms" in r.get(f"sparse_{kern}", {}):
                r[f"sparse_{kern}"]["tflops"] = tflops(r[f"sparse_{kern}"]["ms"], f["sparse"])
            if "ms" in real.get(f"sparse_{kern}", {}):
                real[f"sparse_{kern}"]["tflops"] = tflops(real[f"sparse_{kern}"]["ms"], f["sparse"])
        # best kernel per selection kind, plus the indexer: what a per-shape choice would reach
        for where in (r, real):
            got = {kern: where[f"sparse_{kern}"]["ms"] for kern in KERNELS if "ms" in where.get(f"sparse_{kern}", {})}
            if got and "ms" in r.get("indexer", {}):
                best = min(got, key=got.get)
                where["total_best"] = dict(kernel=best, ms=r["indexer"]["ms"] + got[best])
        if "dense_best" in r:
            for where, key in [(r, k) for k in ("sparse_kv", "sparse_qo", "sparse_tiled", "sparse_tiled_greedy",
                                                "total", "total_fp8", "total_best", "total_e2e", "flex")] + [
                    (real, k) for k in ("sparse_kv", "sparse_qo", "sparse_tiled", "sparse_tiled_greedy", "total_best",
                                        "total_e2e")]:
                if "ms" in where.get(key, {}):
                    where[key]["speedup_vs_dense"] = r["dense_best"]["ms"] / where[key]["ms"]
    json.dump(out, open(path, "w"), indent=1)
    plot(out, os.path.join(args.out, "bench_prefill.png"))
    table(out)


def plot(out, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print("no plot:", exc)
        return
    rs = [r for r in out["results"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("indexer", "indexer (triton)"), ("sparse_kv", "sparse attn KV-outer"),
                       ("sparse_qo", "sparse attn query-outer"), ("total", "MSA total"),
                       ("dense_best", "dense SDPA (best)"), ("flex", "FlexAttention 16-block budget")):
        pts = [(r["T"], r[key]["ms"]) for r in rs if "ms" in r.get(key, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("ms (forward, 1 layer)")
    ax.set_title(f"MSA prefill, {out['meta']['gpu']}\nH_q 64, H_kv 4, D 128, B_k 128, k 16, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(out):
    def cell(r, key):
        x = r.get(key, {})
        if "ms" not in x:
            return f"{'-':>10s}"
        s = f"{x['ms']:10.2f}"
        return s + ("*" if x.get("extrapolated") else "")

    print("\nms per forward (* = extrapolated by T^2); TFLOP/s by spec section 3; speedup vs fastest dense")
    print(f"{'T':>8s} {'indexer':>10s} {'sparse_kv':>10s} {'sparse_qo':>10s} {'total':>10s} {'dense':>10s} "
          f"{'flex':>10s} {'auto':>5s} {'kvTF/s':>7s} {'speedup':>8s} {'peakGB':>7s}")
    rows = []
    for r in out["results"]:
        if "error" in r:
            print(f"{r['T']:8d} {r['error']}")
            continue
        kv = r.get("sparse_kv", {})
        print(f"{r['T']:8d} {cell(r, 'indexer')} {cell(r, 'sparse_kv')} {cell(r, 'sparse_qo')} {cell(r, 'total')} "
              f"{cell(r, 'dense_best')} {cell(r, 'flex')} {r.get('auto_kernel', '-'):>5s} "
              f"{kv.get('tflops', float('nan')):7.1f} {r.get('total', {}).get('speedup_vs_dense', float('nan')):8.2f} "
              f"{kv.get('peak_gb', float('nan')):7.1f}")
        rows.append(r)
    print("\nper kernel and selection kind, ms (union = mean distinct blocks per query tile, consecutive / "
          "greedy-grouped tokens; best = indexer + fastest kernel timed apart; e2e = indexer + attention "
          "timed as one call with the default kernel choice, as a layer runs them; speedups vs dense; "
          "e2e b2b = the same call back to back, warm allocator; e2e host = its host ms on an idle GPU)")
    print(f"{'T':>8s} {'sel':>9s} {'union':>11s} {'kv':>10s} {'qo':>10s} {'tiled':>10s} {'greedy':>10s} {'best':>10s} "
          f"{'speedup':>8s} {'e2e':>10s} {'speedup':>8s} {'e2e b2b':>9s} {'e2e host':>9s}")
    for r in rows:
        for name, where in (("random", r), ("realistic", r.get("realistic", {}))):
            if "union_blocks" not in where:
                continue
            print(f"{r['T']:8d} {name:>9s} {where['union_blocks']:5.1f}/{where.get('union_blocks_greedy', float('nan')):5.1f} "
                  f"{cell(where, 'sparse_kv')} {cell(where, 'sparse_qo')} {cell(where, 'sparse_tiled')} "
                  f"{cell(where, 'sparse_tiled_greedy')} {cell(where, 'total_best')} "
                  f"{where.get('total_best', {}).get('speedup_vs_dense', float('nan')):8.2f} {cell(where, 'total_e2e')} "
                  f"{where.get('total_e2e', {}).get('speedup_vs_dense', float('nan')):8.2f} "
                  f"{where.get('total_e2e', {}).get('b2b_ms', float('nan')):9.2f} "
                  f"{where.get('total_e2e', {}).get('host_ms', float('nan')):9.2f}")
    for r in rows:
        if "ms" in r.get("indexer_fp8", {}):
            rec = r.get("fp8_block_recall")
            alone = r.get("indexer_fp8_no_rescore", {})
            if "ms" in alone:
                print(f"T={r['T']}: fp8 selection alone (fp8_rescore_blocks=0) {alone['ms']:.2f} ms, block recall "
                      f"{r.get('fp8_block_recall_no_rescore')}")
            print(f"T={r['T']}: indexer with fp8 index scores {r['indexer_fp8']['ms']:.2f} ms (bf16 {r['indexer']['ms']:.2f}); "
                  f"block recall of its selection against the bf16 one: "
                  + (f"{rec:.4f}" if isinstance(rec, float) else str(rec))
                  + (f"; total {r['total_fp8']['ms']:.2f} ms, {r['total_fp8']['speedup_vs_dense']:.2f}x dense"
                     if "speedup_vs_dense" in r.get("total_fp8", {}) else ""))
    print("\nbreakdown, ms (indexer: do_bench median; KV-outer stages: one call with CUDA events, summed over chunks)")
    print(f"{'T':>8s} {'indexer':>10s} {'rev_index':>10s} {'kv_kernel':>10s} {'combine':>10s} {'kv_sum':>10s} "
          f"{'chunks':>6s} {'kernTF/s':>8s}")
    for r in rows:
        bd = r.get("breakdown_kv", {})
        if "kv_kernel" not in bd:
            print(f"{r['T']:8d} {cell(r, 'indexer')} {bd.get('error', '-')}")
            continue
        tot = bd["reverse_index"] + bd["kv_kernel"] + bd["combine"]
        print(f"{r['T']:8d} {cell(r, 'indexer')} {bd['reverse_index']:10.2f} {bd['kv_kernel']:10.2f} "
              f"{bd['combine']:10.2f} {tot:10.2f} {bd['chunks']:6d} {bd.get('kv_kernel_tflops', float('nan')):8.1f}")


if __name__ == "__main__":
    main()
