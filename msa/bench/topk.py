"""Benchmark of the Triton Index Branch: exp-free top-k alone and the full indexer (select_blocks).

Usage (GPU): msa bench topk --out DIR [--quick]

1. Parity gate on the GPU (printed PASS/FAIL): bf16 select_blocks triton vs reference at T=4096,
   H_kv=4, d_idx=128, block 128, k=16 (plain and packed cu_seqlens); block_topk vs torch.topk.
2. Timing with triton.testing.do_bench (median, ms):
   - top-k alone at the paper's Table 1 shapes (rows x blocks, k) vs torch.topk on the same fp32
     scores (plus a small config sweep at the first shape);
   - the full indexer select_blocks_triton at H_kv 4, d_idx 128, block 128, k 16, bf16 for
     T = 8K, 32K, 128K (+ 512K, 1M without --quick); TFLOP/s uses the spec's index FLOPs
     H_kv * d_idx * T^2 (causal, multiply-add = 2); peak memory from torch.cuda.max_memory_allocated.
   - score-kernel sweep (index_scores_fwd_kernel alone, no top-k) at T = 32K and 128K over ROWS, BLOCK_N,
     num_warps, num_stages, NBUF (register-buffered stores), persistent grid, nsplit; every config first
     passes a bf16 parity gate against block_scores_reference (T = 4000, odd length); the full indexer is
     then also timed with the fastest passing config ("best_cfg_ms").
3. JSON under --out with the GPU name, versions, command and all results; a short table printed last.

Parts can be chosen: --parts parity,topk,sweep,indexer,stages (default: all).
Sweep only, e.g.: msa bench topk --out DIR --parts parity,sweep,indexer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from msa.ops.select_blocks.reference import block_scores_reference, select_blocks_reference  # noqa: E402
from msa.ops.select_blocks.triton_impl import block_scores_triton, select_blocks_triton  # noqa: E402

# the module object (msa.ops re-exports a function named select_blocks, which shadows the package path)
sb_impl = sys.modules["msa.ops.select_blocks.triton_impl"]
from msa.ops.topk import block_topk  # noqa: E402
from msa.ops.topk.triton_kernels import launch_block_topk  # noqa: E402

H_KV, D_IDX, BS, K = 4, 128, 128, 16


def check_selection(got, ref, q, k, cu, block_size, topk, tol):
    """Structure exact; sets equal or (near-ties) the multiset of reference block scores within tol."""
    t, h = q.shape[1], q.shape[2]
    spans = [(0, t)] if cu is None else list(zip(cu[:-1], cu[1:]))
    mism = 0
    for s, e in spans:
        g, r = got[0, s:e].long(), ref[0, s:e].long()
        n = e - s
        local = torch.arange(n, device=g.device) // block_size
        nvalid = torch.clamp(local + 1, max=topk)
        valid = torch.arange(topk, device=g.device).view(1, 1, -1) < nvalid.view(-1, 1, 1)
        if not torch.equal(g >= 0, valid.expand_as(g)):
            return False, "valid prefix wrong"
        last = g.gather(-1, (nvalid - 1).view(-1, 1, 1).expand(n, h, 1)).squeeze(-1)
        if not torch.equal(last, local.view(-1, 1).expand(n, h)):
            return False, "local block not in last valid slot"
        gs, rs = g.sort(-1).values, r.sort(-1).values
        rows_bad = (gs != rs).any(-1)
        mism += int(rows_bad.sum())
        if rows_bad.any():
            m = block_scores_reference(q[0, s:e], k[0, s:e], 0, block_size, q.shape[-1] ** -0.5).float()
            nb = m.shape[-1]
            bb = torch.arange(nb, device=m.device).view(1, -1)
            forced = (bb > local.view(-1, 1) - 1) & (bb <= local.view(-1, 1))
            m = torch.where(forced.unsqueeze(1), torch.full_like(m, float("inf")), m)
            m = torch.cat([m, m.new_full((n, h, 1), float("-inf"))], -1)
            sg = m.gather(-1, torch.where(g < 0, nb, g)).sort(-1).values
            sr = m.gather(-1, torch.where(r < 0, nb, r)).sort(-1).values
            fin = torch.isfinite(sr)
            if not torch.equal(torch.isfinite(sg), fin):
                return False, "different number of finite selections"
            err = (sg[fin] - sr[fin]).abs().max().item() if fin.any() else 0.0
            if err > tol:
                return False, f"score multiset differs by {err:.3g} > {tol}"
    return True, f"{mism} rows differ as sets (near-ties), score multisets within {tol}"


def parity(dev):
    res = {}
    torch.manual_seed(0)
    t = 4096
    q = torch.randn(1, t, H_KV, D_IDX, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, t, D_IDX, device=dev, dtype=torch.bfloat16)
    for name, cu in (("select_blocks_bf16_T4096", None), ("select_blocks_bf16_T4096_packed", [0, 1000, 1001, 3000, 4096])):
        cs = torch.tensor(cu, dtype=torch.int32, device=dev) if cu else None
        kw = dict(block_size=BS, topk=K, init_blocks=0, local_blocks=1, scale=D_IDX ** -0.5, cu_seqlens=cs)
        got = select_blocks_triton(q, k, **kw)
        ref = select_blocks_reference(q, k, **kw)
        ok, msg = check_selection(got, ref, q, k, cu, BS, K, tol=2e-2)
        res[name] = {"pass": ok, "detail": msg}
    for dt, tol in ((torch.float32, 1e-3), (torch.float16, 2e-2)):  # other dtype paths compile and agree
        q2 = torch.randn(1, 1000, 3, 64, device=dev, dtype=dt)
        k2 = torch.randn(1, 1000, 64, device=dev, dtype=dt)
        kw = dict(block_size=64, topk=8, init_blocks=0, local_blocks=1, scale=64 ** -0.5, cu_seqlens=None)
        ok, msg = check_selection(select_blocks_triton(q2, k2, **kw), select_blocks_reference(q2, k2, **kw), q2, k2,
                                  None, 64, 8, tol=tol)
        res[f"select_blocks_{str(dt)[6:]}_T1000_H3_d64_bs64"] = {"pass": ok, "detail": msg}
    x = torch.randn(4096, 1024, device=dev)
    x[:, ::7] = float("-inf")
    ids = block_topk(x, K, backend="triton")
    vals = x.gather(-1, ids.long().clamp(min=0)).sort(-1, descending=True).values
    ref = torch.topk(x, K, dim=-1).values.sort(-1, descending=True).values
    res["block_topk_4096x1024_k16"] = {"pass": bool(torch.equal(vals, ref) and (ids >= 0).all()),
                                       "detail": "selected values equal torch.topk's"}
    x = torch.randn(512, 20000, device=dev)  # two-stage path (wider than one tile)
    ids = block_topk(x, 32, backend="triton")
    vals = x.gather(-1, ids.long()).sort(-1, descending=True).values
    ref = torch.topk(x, 32, dim=-1).values
    res["block_topk_512x20000_k32"] = {"pass": bool(torch.equal(vals, ref)), "detail": "two-stage path"}
    return res


def bench_topk_shapes(dev, quick):
    shapes = [(128 * 1024, 1024, 16), (128 * 1024, 2048, 32), (512 * 1024, 4096, 16), (512 * 1024, 8192, 32)]
    if quick:
        shapes = shapes[:2]
    out = []
    for i, (r, n, k) in enumerate(shapes):
        row = {"rows": r, "blocks": n, "k": k}
        try:
            torch.cuda.empty_cache()
            x = torch.randn(r, n, device=dev)
            o = torch.empty(r, k, dtype=torch.int32, device=dev)
            row["triton_ms"] = do_bench(lambda: launch_block_topk(x, o, k), return_mode="median")
            row["torch_topk_ms"] = do_bench(lambda: torch.topk(x, k, dim=-1), return_mode="median")
            row["speedup"] = row["torch_topk_ms"] / row["triton_ms"]
            row["triton_GBps"] = r * n * 4 / row["triton_ms"] / 1e6
            if i == 0:  # small config sweep so the lead can pin the best one
                sweep = []
                for rows, seg, nw in [(1, 8, 2), (2, 8, 4), (4, 8, 4), (4, 8, 8), (8, 8, 8), (8, 8, 4), (2, 16, 4),
                                      (4, 4, 4), (16, 8, 8)]:
                    try:
                        ms = do_bench(lambda: launch_block_topk(x, o, k, rows=rows, seg=seg, num_warps=nw),
                                      return_mode="median")
                        sweep.append({"rows": rows, "seg": seg, "num_warps": nw, "ms": ms})
                    except Exception as exc:  # a config may not compile (registers)
                        sweep.append({"rows": rows, "seg": seg, "num_warps": nw, "error": repr(exc)[:200]})
                row["config_sweep"] = sweep
            del x, o
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"OOM: {exc}"[:300]
        out.append(row)
        print(row, flush=True)
    return out


# (rows, block_n, num_warps, num_stages, nbuf, persist, nsplit); the first is the shipped default.
# Shared memory (bf16, d 128): Q rows*256 B + stages * block_n*256 B -> 128/128/3 = 128 KB (1 CTA/SM),
# 128/128/2 and 128/64/3 fit 2 CTAs/SM, 256/128/3 = 160 KB, 256/128/4 = 192 KB (< 227 KB).
SWEEP = [
    (128, 128, 8, 3, 1, 0, None),
    (128, 128, 8, 2, 1, 0, None),
    (128, 128, 8, 4, 1, 0, None),
    (128, 128, 4, 3, 1, 0, None),
    (128, 64, 4, 3, 1, 0, None),
    (128, 64, 8, 4, 1, 0, None),
    (128, 128, 8, 3, 8, 0, None),
    (128, 128, 8, 3, 16, 0, None),
    (128, 128, 8, 3, 1, 1, None),
    (128, 64, 4, 3, 8, 2, None),
    (256, 128, 8, 3, 1, 0, None),
    (256, 128, 8, 4, 1, 0, None),
    (256, 64, 8, 3, 1, 0, None),
    (256, 64, 8, 4, 1, 0, None),
    (256, 128, 8, 3, 8, 0, None),
    (256, 128, 16, 3, 1, 0, None),
    (256, 128, 8, 3, 1, 1, None),
    (256, 64, 8, 3, 8, 1, None),
    (128, 128, 8, 3, 1, 0, 2),
]
SWEEP_QUICK = [SWEEP[i] for i in (0, 1, 4, 6, 8, 10, 12)]  # --quick: ~7 compiles x 2-3 specialisations


def _cfg_dict(c):
    rows, bn, nw, st, nbuf, persist, ns = c
    return dict(rows=rows, block_n=bn, num_warps=nw, num_stages=st, nbuf=nbuf, persist=persist, nsplit=ns)


def _cfg_name(c):
    rows, bn, nw, st, nbuf, persist, ns = c
    return f"r{rows}_n{bn}_w{nw}_s{st}_buf{nbuf}_p{persist}" + (f"_ns{ns}" if ns else "")


def sweep_scores(dev, quick, ts=(32768, 131072), tp=4000):
    """index_scores_fwd_kernel alone over SWEEP configs: parity (bf16, T=4000 vs block_scores_reference,
    atol/rtol 1e-2), then do_bench median (CUDA events) at T = 32K and 128K, TFLOP/s = H*d*T^2 / time."""
    configs = SWEEP_QUICK if quick else SWEEP
    torch.manual_seed(1)
    qp = torch.randn(tp, H_KV, D_IDX, device=dev, dtype=torch.bfloat16)
    kp = torch.randn(tp, D_IDX, device=dev, dtype=torch.bfloat16)
    refp = block_scores_reference(qp, kp, 0, BS, D_IDX ** -0.5).float()
    rows_out = []
    ok_cfgs = []
    for c in configs:
        row = {"config": _cfg_name(c), **_cfg_dict(c)}
        try:
            got = block_scores_triton(qp, kp, block_size=BS, scale=D_IDX ** -0.5, **_cfg_dict(c))
            err = (got - refp).abs()
            fin = torch.isfinite(refp)
            good = bool(torch.equal(torch.isfinite(got), fin)) and bool(
                (err[fin] <= 1e-2 + 1e-2 * refp[fin].abs()).all())
            row["parity"] = "PASS" if good else "FAIL"
            row["parity_max_err"] = float(err[fin].max()) if fin.any() else 0.0
            if good:
                ok_cfgs.append(c)
        except Exception as exc:  # out of resources, compile errors
            row["parity"] = "ERROR"
            row["error"] = repr(exc)[:300]
        rows_out.append(row)
    del qp, kp, refp
    for t in ts:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            q = torch.randn(t, H_KV, D_IDX, device=dev, dtype=torch.bfloat16)
            k = torch.randn(t, D_IDX, device=dev, dtype=torch.bfloat16)
            nb = triton.cdiv(t, BS)
            scores = torch.empty(t * H_KV, nb, device=dev, dtype=torch.float32)
            flops = H_KV * D_IDX * t * t
            for row, c in zip(rows_out, configs):
                if row["parity"] != "PASS":
                    continue
                try:
                    cfg = sb_impl.score_config(q, H_KV, D_IDX, BS, **_cfg_dict(c))
                    tiles = sb_impl._tile_table(torch.zeros(1, dtype=torch.int64), torch.tensor([t]),
                                                cfg["rows"] // H_KV).to(torch.int32).to(dev)
                    fn = lambda: sb_impl._launch_scores(q, k, scores, tiles, 0, BS, D_IDX ** -0.5, cfg)  # noqa: E731
                    fn()
                    ms = do_bench(fn, warmup=10, rep=150 if quick else 400, return_mode="median")
                    row[f"T{t // 1024}K_ms"] = ms
                    row[f"T{t // 1024}K_TFLOPs"] = flops / ms / 1e9
                except torch.cuda.OutOfMemoryError as exc:
                    row[f"T{t // 1024}K_error"] = f"OOM: {exc}"[:200]
                except Exception as exc:
                    row[f"T{t // 1024}K_error"] = repr(exc)[:200]
            del q, k, scores
        except torch.cuda.OutOfMemoryError as exc:
            for row in rows_out:
                row[f"T{t // 1024}K_error"] = f"OOM: {exc}"[:200]
    for row in rows_out:
        print({x: (round(y, 3) if isinstance(y, float) else y) for x, y in row.items()}, flush=True)
    key = f"T{ts[-1] // 1024}K_ms"
    timed = [r for r in rows_out if key in r]
    best = min(timed, key=lambda r: r[key]) if timed else None
    best_cfg = None
    if best is not None:
        best_cfg = {x: best[x] for x in ("rows", "block_n", "num_warps", "num_stages", "nbuf", "persist",
                                         "nsplit")}
    return rows_out, best_cfg


def bench_indexer(dev, quick, best_cfg=None):
    ts = [8192, 32768, 131072] + ([] if quick else [524288, 1048576])
    out = []
    for t in ts:
        row = {"T": t}
        try:
            torch.cuda.empty_cache()
            q = torch.randn(1, t, H_KV, D_IDX, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, t, D_IDX, device=dev, dtype=torch.bfloat16)
            kw = dict(block_size=BS, topk=K, init_blocks=0, local_blocks=1, scale=D_IDX ** -0.5, cu_seqlens=None)
            select_blocks_triton(q, k, **kw)  # compile
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            select_blocks_triton(q, k, **kw)
            torch.cuda.synchronize()
            once = time.time() - t0
            row["peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            reps = 3 if once > 1.0 else 20
            row["triton_ms"] = do_bench(lambda: select_blocks_triton(q, k, **kw), warmup=1 if once > 1 else 25,
                                        rep=max(1, int(reps * once * 1000)), return_mode="median")
            flops = H_KV * D_IDX * t * t
            row["index_TFLOPs"] = flops / row["triton_ms"] / 1e9
            if best_cfg:  # the sweep's fastest score-kernel config in the full pipeline
                tune = {x: y for x, y in best_cfg.items() if y is not None}
                select_blocks_triton(q, k, **kw, **tune)
                row["best_cfg_ms"] = do_bench(lambda: select_blocks_triton(q, k, **kw, **tune),
                                              warmup=1 if once > 1 else 25, rep=max(1, int(reps * once * 1000)),
                                              return_mode="median")
                row["best_cfg_TFLOPs"] = flops / row["best_cfg_ms"] / 1e9
            if t <= (8192 if quick else 32768):
                row["reference_ms"] = do_bench(lambda: select_blocks_reference(q, k, **kw), warmup=1, rep=200,
                                               return_mode="median")
            del q, k
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"OOM: {exc}"[:300]
        out.append(row)
        print(row, flush=True)
    return out


def bench_stages(dev, quick):
    """Per-stage breakdown of select_blocks_triton (score kernel vs top-k kernel, per chunk, CUDA events
    around each launch) and the call as bench_prefill.py makes it: msa.select_blocks(..., backend="triton")
    after torch.cuda.empty_cache(), single calls timed with CUDA events (median of 5) plus host wall time.
    Meant to explain the gap between this benchmark's do_bench numbers and bench_prefill's indexer column."""
    import msa
    import msa.ops.select_blocks.triton_impl as impl
    out = []
    for t in [8192, 32768, 131072]:
        row = {"T": t}
        try:
            torch.cuda.empty_cache()
            gen = torch.Generator(device=dev).manual_seed(t)  # same construction as bench_prefill.run_size
            q = torch.randn(1, t, H_KV, D_IDX, generator=gen, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, t, D_IDX, generator=gen, device=dev, dtype=torch.bfloat16)
            msa.select_blocks(q, k, block_size=BS, topk=K, backend="triton")  # compile
            torch.cuda.synchronize()
            events = []
            orig_s, orig_k = impl._launch_scores, impl.launch_block_topk

            def wrap(name, fn):
                def inner(*a, **kw):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    fn(*a, **kw)
                    e1.record()
                    events.append((name, e0, e1))
                return inner
            impl._launch_scores, impl.launch_block_topk = wrap("scores", orig_s), wrap("topk", orig_k)
            try:
                t0 = time.perf_counter()
                msa.select_blocks(q, k, block_size=BS, topk=K, backend="triton")
                host = time.perf_counter() - t0
                torch.cuda.synchronize()
            finally:
                impl._launch_scores, impl.launch_block_topk = orig_s, orig_k
            row["chunks"] = [{"stage": n, "ms": a.elapsed_time(b)} for n, a, b in events]
            row["scores_ms"] = sum(c["ms"] for c in row["chunks"] if c["stage"] == "scores")
            row["topk_ms"] = sum(c["ms"] for c in row["chunks"] if c["stage"] == "topk")
            row["host_enqueue_ms"] = host * 1e3
            times, walls = [], []
            for _ in range(5):
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                w0 = time.perf_counter()
                e0.record()
                msa.select_blocks(q, k, block_size=BS, topk=K, backend="triton")
                e1.record()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - w0) * 1e3)
                times.append(e0.elapsed_time(e1))
            row["prefill_style_ms"] = sorted(times)[2]
            row["prefill_style_wall_ms"] = sorted(walls)[2]
            row["do_bench_ms"] = do_bench(lambda: msa.select_blocks(q, k, block_size=BS, topk=K, backend="triton"),
                                          warmup=3, rep=300, return_mode="median")
            del q, k
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"OOM: {exc}"[:300]
        out.append(row)
        print({x: y for x, y in row.items() if x != "chunks"}, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="parity,topk,sweep,indexer,stages",
                    help="comma list of parity, topk, sweep, indexer, stages")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = "cuda"
    os.makedirs(args.out, exist_ok=True)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join([sys.executable] + sys.argv), "quick": args.quick,
            "flops_formula": "index FLOPs = H_kv * d_idx * T^2 (causal, 2 per multiply-add)"}
    par = parity(dev) if "parity" in parts else {}
    for name, r in par.items():
        print(f"PARITY {name}: {'PASS' if r['pass'] else 'FAIL'} ({r['detail']})", flush=True)
    topk_rows = bench_topk_shapes(dev, args.quick) if "topk" in parts else []
    sweep_rows, best_cfg = sweep_scores(dev, args.quick) if "sweep" in parts else ([], None)
    idx_rows = bench_indexer(dev, args.quick, best_cfg) if "indexer" in parts else []
    stage_rows = bench_stages(dev, args.quick) if "stages" in parts else []
    result = {**info, "parity": par, "topk": topk_rows, "score_sweep": sweep_rows, "score_best_cfg": best_cfg,
              "score_defaults": sb_impl.SCORE_DEFAULTS, "fp8_score_defaults": sb_impl.FP8_SCORE_DEFAULTS,
              "indexer": idx_rows, "indexer_stages": stage_rows}
    path = os.path.join(args.out, "bench_topk.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n# {info['gpu']}  torch {info['torch']}  triton {info['triton']}  -> {path}")
    sweep_fail = [r["config"] for r in sweep_rows if r.get("parity") == "FAIL"]
    print("parity:", "PASS" if all(r["pass"] for r in par.values()) and not sweep_fail else "FAIL",
          f"(score-sweep configs failing parity: {sweep_fail})" if sweep_fail else "")
    print(f"{'top-k rows x blocks, k':<28}{'triton ms':>10}{'torch ms':>10}{'speedup':>9}")
    for r in topk_rows:
        lab = f"{r['rows'] // 1024}K x {r['blocks']}, {r['k']}"
        if "error" in r:
            print(f"{lab:<28}{r['error'][:40]}")
        else:
            print(f"{lab:<28}{r['triton_ms']:>10.3f}{r['torch_topk_ms']:>10.3f}{r['speedup']:>9.2f}")
        if "config_sweep" in r:
            best = min((c for c in r["config_sweep"] if "ms" in c), key=lambda c: c["ms"], default=None)
            if best:
                print(f"{'  best sweep config':<28}{best['ms']:>10.3f}   rows={best['rows']} seg={best['seg']} "
                      f"warps={best['num_warps']}")
    if sweep_rows:
        print(f"{'score kernel config':<34}{'parity':>7}{'32K ms':>9}{'TFLOP/s':>9}{'128K ms':>9}{'TFLOP/s':>9}")
        for r in sweep_rows:
            cells = "".join(f"{r[f'T{x}K_ms']:>9.2f}{r[f'T{x}K_TFLOPs']:>9.1f}" if f"T{x}K_ms" in r
                            else f"{'err' if f'T{x}K_error' in r else '-':>9}{'':>9}" for x in (32, 128))
            print(f"{r['config']:<34}{r['parity']:>7}{cells}")
        print(f"best score config at 128K: {best_cfg}  (default {sb_impl.SCORE_DEFAULTS})")
    print(f"{'indexer T (H4 d128 B128 k16)':<28}{'ms':>10}{'TFLOP/s':>10}{'peak GiB':>10}{'ref ms':>10}"
          f"{'best ms':>10}{'TFLOP/s':>10}")
    for r in idx_rows:
        if "error" in r:
            print(f"{r['T']:<28}{r['error'][:40]}")
        else:
            ref = f"{r['reference_ms']:>10.2f}" if "reference_ms" in r else f"{'-':>10}"
            bst = f"{r['best_cfg_ms']:>10.2f}{r['best_cfg_TFLOPs']:>10.1f}" if "best_cfg_ms" in r else ""
            print(f"{r['T']:<28}{r['triton_ms']:>10.2f}{r['index_TFLOPs']:>10.1f}{r['peak_extra_GiB']:>10.2f}{ref}{bst}")
    print(f"{'stages T':<10}{'scores':>9}{'topk':>9}{'chunks':>7}{'host':>8}{'prefill-style':>14}{'wall':>8}{'do_bench':>9}")
    for r in stage_rows:
        if "error" in r:
            print(f"{r['T']:<10}{r['error'][:60]}")
        else:
            print(f"{r['T']:<10}{r['scores_ms']:>9.2f}{r['topk_ms']:>9.2f}{len(r['chunks']) // 2:>7}"
                  f"{r['host_enqueue_ms']:>8.2f}{r['prefill_style_ms']:>14.2f}{r['prefill_style_wall_ms']:>8.2f}"
                  f"{r['do_bench_ms']:>9.2f}")


if __name__ == "__main__":
    main()
