"""Profile probe (session 34): where the bench's 4-layer model spends its 8K training step, MSA
(every layer sparse) against all-dense, per GPU kernel.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/model_step_profile.py [--T 8192]

The model is ``msa bench layer``'s (hidden 2048, 16 / 4 heads, d 128, 4 layers, vocab 32000, bf16
autocast, AdamW). Per mode: the step time (median of 5 after 2 warm-up steps) and the CUDA time of one
step's kernels under torch.profiler, summed per kernel name; the 25 largest are printed and all are
written to OUT/model_step_profile.json.
"""
import argparse
import json
import os

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from msa.bench.layer import bench_model, time_ms

ap = argparse.ArgumentParser()
ap.add_argument("--T", type=int, default=8192)
args = ap.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "command": f"python benchmarks/dev/model_step_profile.py --T {args.T}", "modes": {}}
for name, mode, dense_layers in (("sparse", "sparse", 0), ("all_dense", "dense", 4)):
    model, opt, ids, step = bench_model(args.T, mode, dense_layers)
    step_ms = time_ms(step, reps=5)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            kernels[e.key] = kernels.get(e.key, 0.0) + t / 1e3
    total = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])
    out["modes"][name] = {"step_ms": step_ms, "kernel_ms_total": total, "kernels_ms": dict(top)}
    print(f"== {name}: step {step_ms:.1f} ms, kernels {total:.1f} ms", flush=True)
    for k, t in top[:25]:
        print(f"  {t:8.3f}  {k[:110]}")
    json.dump(out, open(os.path.join(os.environ["OUT"], "model_step_profile.json"), "w"), indent=1)
    del model, opt
    torch.cuda.empty_cache()
