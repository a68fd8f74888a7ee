"""Timing probe (H200, session 27): the tile union build in both orders at 8K/16K (replayed selections)
and the fp8 index call with and without rescoring at 8K/128K, with per-kernel times from torch.profiler.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/tile_order_fp8_probe.py
"""
import torch, triton, json, os, sys
import msa
from msa.bench.selections import realistic_indices
from msa.ops.utils.reverse_index import block_layout
from msa.ops.utils.tile_union import build_tile_union
from torch.profiler import profile, ProfilerActivity
out = {}
dev = "cuda"
for t in (8192, 16384):
    bi = realistic_indices(t, 4, 16, 128, dev)
    lay = block_layout(1, t, 128, None, dev)
    for order in ("consecutive", "greedy"):
        for tt in (8, 2):
            ms = triton.testing.do_bench(lambda: build_tile_union(bi, lay, 128, tt, order), return_mode="median")
            out[f"union_{t}_{order}_tt{tt}"] = ms
            print(t, order, tt, round(ms, 4), flush=True)
def prof(fn):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    rows = {}
    for e in p.key_averages():
        if e.device_time_total > 0:
            rows[e.key[:60]] = round(e.device_time_total / 1e3, 4)
    return dict(sorted(rows.items(), key=lambda x: -x[1])[:12])
for t in (8192, 131072):
    g = torch.Generator(device=dev).manual_seed(0)
    qi = torch.randn(1, t, 4, 128, generator=g, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(1, t, 128, generator=g, device=dev, dtype=torch.bfloat16)
    for e in (0, 4):
        f = lambda: msa.select_blocks(qi, ki, block_size=128, topk=16, backend="triton", fp8_scores=True, fp8_rescore_blocks=e)
        ms = triton.testing.do_bench(f, return_mode="median")
        out[f"fp8_{t}_rescore{e}"] = ms
        out[f"fp8_{t}_rescore{e}_kernels"] = prof(f)
        print(t, e, round(ms, 3), json.dumps(out[f"fp8_{t}_rescore{e}_kernels"]), flush=True)
json.dump(out, open(os.environ["OUT"] + "/probe27.json", "w"), indent=1)
