"""Profile probe (session 34): where the bench's 4-layer model spends its 8K training step, MSA
(every layer sparse) against all-dense, per GPU kernel.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/model_step_profile.py [--T 8192]

The model is ``msa bench layer``'s (hidden 2048, 16 / 4 heads, d 128, 4 layers, vocab 32000, bf16
autocast, AdamW). Per mode: the step time (5 steps after 2 warm-up steps) and the CUDA time of one
step's kernels under torch.profiler, summed per kernel name; the 25 largest are printed and all are
written to OUT/model_step_profile.json.
"""
import argparse
import json
import os
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from msa.layers import MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig

ap = argparse.ArgumentParser()
ap.add_argument("--T", type=int, default=8192)
args = ap.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "command": f"python benchmarks/dev/model_step_profile.py --T {args.T}", "modes": {}}
attn = dict(hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128, index_dim=128, block_size=128,
            topk_blocks=16)
for name, mode, dense_layers in (("sparse", "sparse", 0), ("all_dense", "dense", 4)):
    torch.manual_seed(0)
    model = MSAForCausalLM(MSALMConfig(vocab_size=32000, num_layers=4, intermediate_size=5632,
                                       attention=MSAConfig(**attn), num_dense_layers=dense_layers)).cuda()
    model.set_mode(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (1, args.T), device="cuda")
    step = lambda: model.training_step(ids, opt, autocast_dtype=torch.bfloat16)  # noqa: E731
    step()
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 5 * 1e3
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
