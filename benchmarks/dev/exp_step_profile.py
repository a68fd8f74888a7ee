"""Where the quality runs' training step spends its time: the exp model (msa/train/presets.py: 12 layers, hidden 512,
8 / 2 heads of 64, d_idx 128, blocks of 128, top-16) at their batch (2 x 16K packed, bf16 autocast, AdamW, clipping
per group), the step as ``msa train`` takes it (``forward_loss``), per phase and KL objective.

Why: in quality round 17 (H100) `exp-dense` trained at 0.160 s per step and `exp-msa-blockkl` at 0.292 s in its dense
warmup and 0.304 s sparse: MSA training was 1.9x slower than dense at 16K tokens, where attention alone reads
about 4x fewer keys. The step times per mode and one step's GPU kernels (torch.profiler, summed per kernel name)
say which part costs it. Random initialisation, so the selections are those of an untrained index.

    python benchmarks/dev/exp_step_profile.py --out DIR [--seq-len 16384] [--modes dense,pt-warmup,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from msa.train.config import apply_overrides
from msa.train.loss import forward_loss
from msa.train.presets import get_preset
from msa.train.trainer import build_model, build_optimizer

# name -> (preset, attention mode, KL on)
MODES = {"dense": ("exp-dense", "dense", False),
         "pt-warmup": ("exp-msa-pt", "dense", True), "pt-sparse": ("exp-msa-pt", "sparse", True),
         "blockkl-warmup": ("exp-msa-blockkl", "dense", True), "blockkl-sparse": ("exp-msa-blockkl", "sparse", True),
         "sparse-no-kl": ("exp-msa-pt", "sparse", False)}


def _step_fn(preset: str, mode: str, kl: bool, seq_len: int, dev: torch.device):
    cfg = apply_overrides(get_preset(preset), [f"data.seq_len={seq_len}"])
    model = build_model(cfg, cfg.data.vocab_size, dev)
    model.set_mode(mode)
    model.train()
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.data.vocab_size, (1, 2 * seq_len), generator=g).to(dev)
    cu = torch.tensor([0, seq_len, 2 * seq_len], dtype=torch.int32, device=dev)
    amp = dev.type == "cuda"
    ph = cfg.phase

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = forward_loss(model, ids, cu, kl_weight=ph.kl_weight if kl else 0.0, kl_target=ph.kl_target,
                               kl_rows=ph.kl_rows)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.backbone_parameters(), cfg.optim.grad_clip)
        ix = [p for p in model.index_parameters() if p.grad is not None]
        if ix:
            torch.nn.utils.clip_grad_norm_(ix, cfg.optim.grad_clip)
        opt.step()
        return float(out["lm_loss"])  # one sync per step, as the trainer's logging does

    return model, opt, step


def _time(step, reps: int, sync) -> float:
    for _ in range(2):
        step()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    modes = a.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; known: {', '.join(MODES)}")
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    res = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "seq_len": a.seq_len, "command": "python benchmarks/dev/exp_step_profile.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out"), "modes": {}}
    for name in modes:
        model, opt, step = _step_fn(*MODES[name], a.seq_len, dev)
        ms = _time(step, a.reps, sync)
        with profile(activities=acts) as prof:
            step()
            sync()
        kernels = {}
        for e in prof.key_averages():
            t = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) if dev.type == "cuda" \
                else e.self_cpu_time_total
            if t > 0:
                kernels[e.key] = kernels.get(e.key, 0.0) + t / 1e3
        top = sorted(kernels.items(), key=lambda kv: -kv[1])
        res["modes"][name] = {"step_ms": ms, "kernel_ms_total": sum(kernels.values()), "kernels_ms": dict(top[:60])}
        print(f"== {name}: step {ms:.1f} ms, kernels {sum(kernels.values()):.1f} ms", flush=True)
        for k, t in top[:14]:
            print(f"  {t:8.2f}  {k[:100]}")
        with open(os.path.join(a.out, "exp_step_profile.json"), "w") as f:
            json.dump(res, f, indent=1)
        del model, opt, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("| mode | step ms | vs dense |")
    print("|---|---|---|")
    d = res["modes"].get("dense", {}).get("step_ms")
    for name, r in res["modes"].items():
        print(f"| {name} | {r['step_ms']:.1f} | {r['step_ms'] / d:.2f}x |" if d else f"| {name} | {r['step_ms']:.1f} | - |")


if __name__ == "__main__":
    main()
