"""The 8K prefill's public calls timed four ways in one process (session 33; run once on an H100:
benchmarks/results/e2e_probe_8k_h100.json). ~20 s on an H100.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/e2e_probe_8k.py

Why: ``msa bench prefill``'s total_e2e on replayed selections read 2.59 ms (session 32) and 3.55 ms
(session 33) while host_check_8k.py timed the same calls at 1.9-2.0 ms. Each call (select_blocks +
sparse_attention on replayed selections; msa_prefill_attention on random ones; each part alone) is
timed with the bench's ``measure`` (allocator cache emptied first), do_bench directly, back to back,
and for its host time; then a CUDA profile of 5 calls lists the kernels' GPU time.
"""
import json
import os

import torch
import triton

import msa
from msa.bench import prefill as P
from msa.bench.timing import back_to_back_ms, host_ms
t, dev = 8192, "cuda"
gen = torch.Generator(device=dev).manual_seed(t)
q = torch.randn(1, t, P.HQ, P.D, generator=gen, device=dev, dtype=P.DT)
k = torch.randn(1, t, P.HKV, P.D, generator=gen, device=dev, dtype=P.DT)
v = torch.randn(1, t, P.HKV, P.D, generator=gen, device=dev, dtype=P.DT)
qi = torch.randn(1, t, P.HKV, P.DIDX, generator=gen, device=dev, dtype=P.DT)
ki = torch.randn(1, t, P.DIDX, generator=gen, device=dev, dtype=P.DT)
real = P.realistic_indices(t, P.HKV, P.TOPK, P.BK, dev)
print("real", real.dtype, real.shape, real.is_contiguous(), real.stride())
sel = lambda: msa.select_blocks(qi, ki, block_size=P.BK, topk=P.TOPK, scale=P.DIDX ** -0.5, validate=False)
att = lambda: msa.sparse_attention(q, k, v, real, block_size=P.BK, scale=P.D ** -0.5, validate=False)
e2e = lambda: P.layer_prefill(q, k, v, qi, ki, real)
e2e_rand = lambda: P.layer_prefill(q, k, v, qi, ki)
b = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
res = {}
for name, f in (("e2e_real", e2e), ("att_real", att), ("sel", sel), ("e2e_random", e2e_rand)):
    res[f"measure_{name}"] = P.measure(name, f, 2).get("ms")
    res[f"dobench_{name}"] = b(f)
    res[f"b2b_{name}"] = back_to_back_ms(f, 30, 3)
    res[f"host_{name}"] = host_ms(f)
def att_then_sel():
    att(); sel()
res["dobench_att_then_sel"] = b(att_then_sel)
real_c = real.clone()
res["dobench_e2e_real_clone"] = b(lambda: P.layer_prefill(q, k, v, qi, ki, real_c))
from torch.profiler import ProfilerActivity, profile
for name, f in (("e2e_real", e2e), ("att_real", att)):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8)
    print(name); print(tab)
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "e2e_probe.json"), "w"), indent=1)
