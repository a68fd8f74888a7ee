"""Decode as a model runs it (8 layer caches in one CUDA graph, batch 1, one token), per launch geometry of
the DecodePlan, plus the GPU timeline of the default plan's graph: where the step's time goes beyond the
index-key scan (tuning data for the speed issue's decode targets; the public number is `msa bench decode
--model-step`).

    python benchmarks/dev/decode_step_sweep.py --out DIR [--context 1048576] [--indexes bf16,fp8blk]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from msa.bench.decode import (BS, HQ, LAYERS_PER_GRAPH, TOPK, build_cache, graph_of, graph_timeline, make_queries,
                              msa_bytes)
from msa.bench.timing import back_to_back_ms
from msa.ops.decode.triton_impl import DecodePlan

SWEEP = [dict(), dict(fused=True), dict(fused=False, topk_chunk=256),   # 256: the default before session 44
         dict(fused=False, select_in_attention=True)]                  # no top-k merge launch: 4 instead of 5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--indexes", default="bf16,fp8blk")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev, L, n = torch.device("cuda"), args.context, LAYERS_PER_GRAPH
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, context=L, layers_per_graph=n,
               command="python benchmarks/dev/decode_step_sweep.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
               rows=[], timeline={})
    t0 = time.time()
    for idx in args.indexes.split(","):
        cache = build_cache(1, L, False, idx, dev, layers=n)
        q, qi = make_queries(1, 1, dev)
        for cfg in SWEEP:
            key = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
            try:
                plan = DecodePlan(cache, num_heads=HQ, block_size=BS, topk=TOPK, num_tokens=1, **cfg)
                rep = graph_of(lambda: [plan.run(q, qi, i) for i in range(n)])
                us = back_to_back_ms(rep, 20, warmup=3) / n * 1e3
                row = dict(index=idx, config=key, fused=plan.fused, us_per_layer=us,
                           GBps=msa_bytes(1, L, 1, idx) / (us * 1e-6) / 1e9)
                if not cfg:
                    res["timeline"][idx] = graph_timeline(rep)
                del plan, rep
            except Exception as exc:  # a geometry this cache cannot take
                row = dict(index=idx, config=key, error=f"{type(exc).__name__}: {exc}"[:200])
            res["rows"].append(row)
            print(row, flush=True)
        del cache
        torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "decode_step_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    for idx, tl in res["timeline"].items():
        if tl:
            agg = {}
            for name, _, dur in tl["kernels"]:
                agg[name] = agg.get(name, 0.0) + dur
            print(idx, "graph span", tl["span_us"], "us for", n, "layers; kernel sum", tl["kernel_sum_us"],
                  {k: round(v / n, 2) for k, v in agg.items()})
    print("| index | config | fused | us / layer | GB/s |\n|---|---|---|---|---|")
    for r in res["rows"]:
        if "us_per_layer" in r:
            print(f"| {r['index']} | {r['config']} | {r['fused']} | {r['us_per_layer']:.1f} | {r['GBps']:.0f} |")


if __name__ == "__main__":
    main()
