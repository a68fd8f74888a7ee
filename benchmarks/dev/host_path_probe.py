"""Where the user's call spends its time at short lengths, and the fp8 index kernel's epilogue.

1. Host overhead of the user path (paper attention shape, bf16, batch 1) at 8K and 32K tokens: for
   ``msa.select_blocks``, ``msa.sparse_attention`` (forward; forward + backward) and one
   ``MSAAttention`` layer (inference forward; training step with the KL): do_bench median, back-to-back
   mean, host ms per call (calls issued without a sync) and the kernels' GPU time (torch.profiler).
   A cProfile of the layer's training step at 8K (``--profile``).
2. ``msa.select_blocks``' Triton function at 128K and 1M with bf16 and with fp8 index scores (round 24
   compared fp8 keys with one scale per token against one per block, applied after the block max).

    PYTHONPATH=. python benchmarks/dev/host_path_probe.py --out $OUT [--profile] [--fp8-sizes 131072,1048576]
        [--sweep-sizes 131072] [--tiled-sizes 8192]

3. Sweeps for the next device session (not run yet): the index score kernel's launch configuration
   (``--sweep-sizes``) and the query-tiled forward's (``--tiled-sizes``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats

import torch
import triton

import msa
from msa.bench.timing import back_to_back_ms
from msa.layers import MSAAttention, MSAConfig
from msa.ops.select_blocks.triton_impl import select_blocks_triton
from select_host_overhead import host_ms  # benchmarks/dev, the script's own folder

PAPER = dict(hidden_size=4096, num_heads=64, num_kv_heads=4, head_dim=128, index_dim=128, block_size=128,
             topk_blocks=16)


def kernels_ms(fn, calls: int = 3) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3


def measure(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    return dict(do_bench_ms=triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"),
                back_to_back_ms=back_to_back_ms(fn, 20), host_ms=host_ms(fn), kernels_ms=kernels_ms(fn))


def sync_sites(fn) -> list:
    """Where fn synchronises with the host after a warm-up call: the msa frames of each warning that
    torch.cuda.set_sync_debug_mode("warn") raises (deduplicated)."""
    import traceback
    import warnings
    fn()
    torch.cuda.synchronize()
    sites = []

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f"{fr.filename.split('/msa/')[-1]}:{fr.lineno} {fr.name}" for fr in traceback.extract_stack()
                  if "/msa/" in fr.filename and "host_path_probe" not in fr.filename]
        sites.append(" <- ".join(reversed(frames[-4:])) or str(message)[:80])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sorted(set(sites))


def user_path(t: int, profile: bool) -> dict:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    hq, hkv, d = PAPER["num_heads"], PAPER["num_kv_heads"], PAPER["head_dim"]
    qi = torch.randn(1, t, hkv, 128, device=dev, dtype=bf, generator=g)
    ki = torch.randn(1, t, 128, device=dev, dtype=bf, generator=g)
    q = torch.randn(1, t, hq, d, device=dev, dtype=bf, generator=g).requires_grad_()
    k = torch.randn(1, t, hkv, d, device=dev, dtype=bf, generator=g).requires_grad_()
    v = torch.randn(1, t, hkv, d, device=dev, dtype=bf, generator=g).requires_grad_()
    bi = msa.select_blocks(qi, ki, block_size=128, topk=16)
    do = torch.randn_like(q)
    res = {}
    res["select_blocks"] = measure(lambda: msa.select_blocks(qi, ki, block_size=128, topk=16, validate=False))

    def fwd():
        with torch.no_grad():
            msa.sparse_attention(q, k, v, bi, validate=False)
    res["sparse_attention_fwd"] = measure(fwd)
    res["sparse_attention_fwd_validated"] = measure(lambda: msa.sparse_attention(q.detach(), k.detach(), v.detach(), bi))

    def fwd_bwd():
        o = msa.sparse_attention(q, k, v, bi, validate=False)
        o.backward(do)
    res["sparse_attention_fwd_bwd"] = measure(fwd_bwd)
    layer = MSAAttention(MSAConfig(**PAPER)).to(dev, bf).train()
    x = torch.randn(1, t, PAPER["hidden_size"], device=dev, dtype=bf, generator=g, requires_grad=True)
    gx = torch.randn_like(x)

    def layer_fwd():
        with torch.no_grad():
            layer(x, compute_kl=False)
    res["layer_fwd"] = measure(layer_fwd)

    def layer_step():
        out = layer(x, compute_kl=True)
        torch.autograd.backward([out.hidden, out.kl_loss], [gx, torch.ones((), device=dev)])
    res["layer_train_step"] = measure(layer_step)
    syncs = {"sparse_attention_fwd_bwd": sync_sites(fwd_bwd), "layer_train_step": sync_sites(layer_step),
             "layer_fwd": sync_sites(layer_fwd)}
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            layer_step()
        pr.disable()
        torch.cuda.synchronize()
        sio = io.StringIO()
        pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(25)
        res["cprofile_layer_step"] = sio.getvalue()
    res["syncs"] = syncs
    return res


SCORE_CONFIGS = [dict(rows=256, block_n=128, num_warps=8, num_stages=3),   # the default
                 dict(rows=256, block_n=64, num_warps=8, num_stages=3),
                 dict(rows=512, block_n=64, num_warps=8, num_stages=2),
                 dict(rows=512, block_n=64, num_warps=8, num_stages=3),
                 dict(rows=512, block_n=64, num_warps=16, num_stages=2),
                 dict(rows=512, block_n=64, num_warps=16, num_stages=3),
                 dict(rows=512, block_n=128, num_warps=16, num_stages=2),
                 dict(rows=512, block_n=32, num_warps=8, num_stages=4)]


TILED_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),   # the default
                 dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                 dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                 dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
                 dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=2)]


def tiled_sweep(t: int) -> dict:
    """The query-tiled forward under each launch configuration (BLOCK_M rows = tokens per tile x G:
    smaller tiles walk smaller unions with smaller MMAs), random and replayed selections."""
    import msa.tuning
    from msa.bench.selections import realistic_indices, union_blocks
    from msa.ops.sparse_attention.triton_impl import sparse_attention_fwd_triton
    g = torch.Generator(device="cuda").manual_seed(3)
    bf = torch.bfloat16
    q = torch.randn(1, t, 64, 128, device="cuda", dtype=bf, generator=g)
    k = torch.randn(1, t, 4, 128, device="cuda", dtype=bf, generator=g)
    v = torch.randn(1, t, 4, 128, device="cuda", dtype=bf, generator=g)
    qi = torch.randn(1, t, 4, 128, device="cuda", dtype=bf, generator=g)
    ki = torch.randn(1, t, 128, device="cuda", dtype=bf, generator=g)
    sels = {"random": msa.select_blocks(qi, ki, block_size=128, topk=16),
            "replayed": realistic_indices(t, 4, 16, 128, "cuda")}
    res = {}
    for name, bi in sels.items():
        def run():
            return sparse_attention_fwd_triton(q, k, v, bi, block_size=128, scale=128 ** -0.5, cu_seqlens=None,
                                               kernel="tiled")
        o_ref, _ = run()
        for cfg in TILED_CONFIGS:
            key = "{}_m{BLOCK_M}_n{BLOCK_N}_w{num_warps}_s{num_stages}".format(name, **cfg)
            try:
                with msa.tuning.override(sparse_fwd_tiled_config=cfg):
                    o, _ = run()
                    ms = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
                res[key] = dict(ms=ms, union=union_blocks(bi, max(1, cfg["BLOCK_M"] // 16)),
                                max_diff=float((o - o_ref).abs().max()))
            except Exception as exc:
                res[key] = dict(error=f"{type(exc).__name__}: {str(exc)[:120]}")
            print("tiled", t, key, json.dumps(res[key]), flush=True)
    return res


def score_sweep(t: int, fp8: bool) -> dict:
    """The index score + top-k call at T tokens under each score-kernel configuration: ms (CUDA events)
    and the share of the default configuration's selection it reproduces (accumulation order only)."""
    from msa.bench.selections import selection_recall
    g = torch.Generator(device="cuda").manual_seed(1)
    qi = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    ki = torch.randn(1, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kw = dict(block_size=128, topk=16, init_blocks=0, local_blocks=1, scale=128 ** -0.5, cu_seqlens=None,
              fp8_scores=fp8)
    reps = 3 if t > 300_000 else 10
    res, ref = {}, None
    for cfg in SCORE_CONFIGS:
        name = "r{rows}_n{block_n}_w{num_warps}_s{num_stages}".format(**cfg)
        try:
            sel = select_blocks_triton(qi, ki, **kw, **cfg)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                select_blocks_triton(qi, ki, **kw, **cfg)
            b.record()
            torch.cuda.synchronize()
            ref = sel if ref is None else ref
            res[name] = dict(ms=a.elapsed_time(b) / reps, agree=selection_recall(ref, sel))
        except Exception as exc:  # an impossible configuration (shared memory, registers)
            res[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:120]}")
        print("sweep", t, "fp8" if fp8 else "bf16", name, json.dumps(res[name]), flush=True)
    return res


def fp8_epilogue(t: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    qi = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    ki = torch.randn(1, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kw = dict(block_size=128, topk=16, init_blocks=0, local_blocks=1, scale=128 ** -0.5, cu_seqlens=None)
    variants = {"bf16": dict(), "fp8": dict(fp8_scores=True)}
    res, sel = {}, {}
    reps = 3 if t > 300_000 else 10
    for name, extra in variants.items():
        sel[name] = select_blocks_triton(qi, ki, **kw, **extra)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            select_blocks_triton(qi, ki, **kw, **extra)
        b.record()
        torch.cuda.synchronize()
        res[name + "_ms"] = a.elapsed_time(b) / reps
    from msa.bench.selections import selection_recall
    res["recall_fp8_vs_bf16"] = selection_recall(sel["bf16"], sel["fp8"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sizes", default="8192,32768")
    ap.add_argument("--fp8-sizes", default="131072,1048576")
    ap.add_argument("--sweep-sizes", default="", help="index score-kernel configuration sweep at these T")
    ap.add_argument("--tiled-sizes", default="", help="query-tiled forward configuration sweep at these T")
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "user_path": {}, "fp8_epilogue": {}}
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "host_path_probe.json"), "w") as f:
            json.dump(out, f, indent=1)
    for t in [int(s) for s in args.tiled_sizes.split(",") if s]:
        out.setdefault("tiled_sweep", {})[t] = tiled_sweep(t)
        save()
    for t in [int(s) for s in args.sweep_sizes.split(",") if s]:
        out.setdefault("score_sweep", {})[t] = {"bf16": score_sweep(t, False), "fp8": score_sweep(t, True)}
        save()
    for t in [int(s) for s in args.fp8_sizes.split(",") if s]:
        out["fp8_epilogue"][t] = fp8_epilogue(t)
        print("fp8", t, json.dumps(out["fp8_epilogue"][t]), flush=True)
        save()
    for t in [int(s) for s in args.sizes.split(",") if s]:
        r = user_path(t, args.profile and t == 8192)
        prof = r.pop("cprofile_layer_step", None)
        out.setdefault("syncs", {})[t] = r.pop("syncs")
        print(t, "syncs", json.dumps(out["syncs"][t], indent=1), flush=True)
        out["user_path"][t] = r
        for name, m in r.items():
            print(t, f"{name:32s}", " ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
        if prof:
            print(prof)
            out["cprofile_layer_step_8k"] = prof
        save()


if __name__ == "__main__":
    main()
