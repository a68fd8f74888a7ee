"""Host-path check of the 8K prefill (session 32; run once on an H100: benchmarks/results/host_check_8k_h100.json). ~1 minute on an H100.

    python benchmarks/dev/host_check_8k.py        (from the repo root; writes gpu_hostcheck.json next to cwd or $OUT)

1. torch.cuda.mem_get_info latency, GPU idle vs. with ~2 ms of queued work (does it wait for the stream?).
2. Host time (perf_counter, no sync) of msa.select_blocks / msa.sparse_attention at the 8K shape while the
   GPU is kept busy (so launches never block on a full queue), with and without mem_get_info.
3. do_bench of the public path (as layer_prefill with replayed indices) vs. the same with _partial_budget
   patched to a constant, vs. the launcher called directly.
4. a torch.profiler trace (chrome json) of 3 calls, to read the GPU gaps between the 5 kernels.
"""
import json
import os
import time

import torch
import triton

import msa
from msa.ops.sparse_attention import triton_impl as sat_mod  # noqa: F401
import importlib

sat = importlib.import_module("msa.ops.sparse_attention.triton_impl")
OUT = os.environ.get("OUT", ".")
dev = "cuda"
B, T, HQ, HKV, D, DIDX, BK, TOPK, DT = 1, 8192, 64, 4, 128, 128, 128, 16, torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)
q = torch.randn(B, T, HQ, D, generator=g, device=dev, dtype=DT)
k = torch.randn(B, T, HKV, D, generator=g, device=dev, dtype=DT)
v = torch.randn(B, T, HKV, D, generator=g, device=dev, dtype=DT)
qi = torch.randn(B, T, HKV, DIDX, generator=g, device=dev, dtype=DT)
ki = torch.randn(B, T, DIDX, generator=g, device=dev, dtype=DT)
SC, ISC = D ** -0.5, DIDX ** -0.5
try:
    from msa.bench.selections import realistic_indices
    bi = realistic_indices(T, HKV, TOPK, BK, dev)
except Exception:
    bi = msa.select_blocks(qi, ki, block_size=BK, topk=TOPK, scale=ISC)
res = {}
big = torch.randn(8192, 8192, device=dev, dtype=DT)


def busy(ms=2.0):  # queue roughly `ms` of GPU work
    for _ in range(max(1, int(ms / 0.5))):
        big @ big


def sel():
    return msa.select_blocks(qi, ki, block_size=BK, topk=TOPK, scale=ISC, validate=False)


def att():
    return msa.sparse_attention(q, k, v, bi, block_size=BK, scale=SC, validate=False)


def public():
    sel()
    return att()


for _ in range(5):
    public()
torch.cuda.synchronize()

# 1. mem_get_info latency
def lat(fn, n=50, queued=False):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        if queued:
            busy()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    ts.sort()
    return ts[len(ts) // 2]


res["mem_get_info_us_idle"] = lat(torch.cuda.mem_get_info)
res["mem_get_info_us_queued_2ms"] = lat(torch.cuda.mem_get_info, queued=True)
res["get_device_properties_us"] = lat(lambda: torch.cuda.get_device_properties(0))

# 2. host time per call, GPU kept busy so nothing blocks on the launch queue
for name, fn in (("public", public), ("select_blocks", sel), ("sparse_attention", att)):
    res[f"host_us_{name}"] = lat(fn, n=30, queued=True)
orig = sat._partial_budget
sat._partial_budget = lambda b, device=None: sat.MAX_DEFAULT_PARTIAL_BYTES
res["host_us_public_no_mem_get_info"] = lat(public, n=30, queued=True)
sat._partial_budget = orig

# 3. end to end (do_bench, as msa bench prefill times total_e2e)
bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
res["e2e_ms_public"] = bench(public)
res["e2e_ms_select_blocks"] = bench(sel)
res["e2e_ms_sparse_attention"] = bench(att)
res["e2e_ms_launcher_direct"] = bench(lambda: sat.sparse_attention_fwd_triton(q, k, v, bi, block_size=BK, scale=SC,
                                                                              cu_seqlens=None))
sat._partial_budget = lambda b, device=None: sat.MAX_DEFAULT_PARTIAL_BYTES
res["e2e_ms_public_no_mem_get_info"] = bench(public)
sat._partial_budget = orig

# 4. trace
from torch.profiler import ProfilerActivity, profile  # noqa: E402
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        public()
    torch.cuda.synchronize()
prof.export_chrome_trace(os.path.join(OUT, "gpu_hostcheck_trace.json"))
res["profile_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
print(json.dumps({k: v for k, v in res.items() if k != "profile_table"}, indent=1))
print(res["profile_table"])
json.dump(res, open(os.path.join(OUT, "gpu_hostcheck.json"), "w"), indent=1)
