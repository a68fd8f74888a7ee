"""Host overhead of ``msa.select_blocks`` at 8K and 32K tokens (paper index shape: H_kv 4, d_idx 128,
B_k 128, top-16, bf16, batch 1) on one GPU.

Per length: do_bench median, back-to-back mean, host ms per call (50 calls without a sync) through the
public function and through ``select_blocks_triton``, a CUDA-graph replay of the call (its GPU time),
and the kernels' times (torch.profiler). With --profile, a cProfile of 200 public calls at 8K.

    PYTHONPATH=. python benchmarks/dev/select_host_overhead.py --out /tmp/sel [--profile]

Results: benchmarks/results/select_host_h200.json; notes: docs/perf-notes.md (round 23).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton

import msa
from msa.bench.timing import back_to_back_ms
from msa.ops.select_blocks.triton_impl import select_blocks_triton


def host_ms(fn, calls: int = 50) -> float:
    """Host time per call of ``calls`` calls issued back to back (no sync in between)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return ms


def graph_ms(fn) -> float:
    """GPU time of one call: a CUDA graph of it, replayed under do_bench."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def kernels_us(fn, calls: int = 5) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: e.device_time_total / calls for e in prof.key_averages() if e.device_time_total > 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of 200 calls at 8K")
    args = ap.parse_args()
    res = {}
    for t in (8192, 32768):
        g = torch.Generator(device="cuda").manual_seed(0)
        qi = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        ki = torch.randn(1, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)

        def public():
            return msa.select_blocks(qi, ki, block_size=128, topk=16, backend="triton")

        def impl():
            return select_blocks_triton(qi, ki, block_size=128, topk=16, init_blocks=0, local_blocks=1,
                                        scale=128 ** -0.5, cu_seqlens=None)
        public()
        torch.cuda.synchronize()
        res[t] = dict(do_bench_ms=triton.testing.do_bench(public, warmup=25, rep=100, return_mode="median"),
                      back_to_back_ms=back_to_back_ms(public, 50), host_ms_public=host_ms(public),
                      host_ms_impl=host_ms(impl), graph_ms=graph_ms(public), kernels_us=kernels_us(public))
        print(t, json.dumps(res[t]), flush=True)
        if args.profile and t == 8192:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                public()
            pr.disable()
            torch.cuda.synchronize()
            sio = io.StringIO()
            pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(14)
            print(sio.getvalue())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_sel.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
