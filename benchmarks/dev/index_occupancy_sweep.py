"""The Index Branch (scores + top-k, `select_blocks_triton`) per launch configuration of the index-score kernel,
at the paper shape (H_kv 4, d_idx 128, block 128, top 16, batch 1), bf16 and fp8 index scores, 128K and 1M tokens.

Why (docs/perf-notes.md round 39): Nsight Compute shows the default (256 rows, 8 warps, 3 stages) at 245
registers and 165 KB of shared memory, so ONE program per SM; its block-max epilogue cannot overlap an MMA
(Triton waits for each wgmma at once) and 44% of the issue gaps are CTA-barrier stalls. Configurations of 128
rows x 4 warps with 2 stages fit two programs per SM (255 registers x 128 threads, 97 KB), whose epilogues
can run under the other's MMA. Each configuration's selection is compared with the default's.

    python benchmarks/dev/index_occupancy_sweep.py --out DIR [--sizes 131072,1048576] [--budget-s 300] [--configs 0,7,8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from msa.bench.layer import time_ms
from msa.ops.select_blocks.triton_impl import select_blocks_triton

# (rows, block_n, num_warps, num_stages, nbuf, persist, max_registers); the first is the bf16 default
# (SCORE_DEFAULTS), the last the fp8 default since session 45 (FP8_SCORE_DEFAULTS). Session 45 swept the first
# eight (persistent programs spill at 128 rows x 4 warps: not swept). The register caps keep 256 rows (one K
# tile read per 256 rows) with two programs per SM: 64 keys per MMA and 128 registers compile without spills.
CONFIGS = [(256, 128, 8, 3, 8, 0, None), (128, 128, 4, 2, 8, 0, None), (128, 64, 4, 3, 8, 0, None),
           (128, 64, 4, 2, 8, 0, None), (128, 128, 8, 2, 8, 0, None), (256, 128, 8, 2, 8, 0, None),
           (64, 128, 4, 2, 8, 0, None), (256, 64, 8, 2, 8, 0, 128), (256, 64, 8, 3, 8, 0, 128),
           (256, 64, 8, 2, 4, 0, 128), (128, 128, 4, 3, 8, 0, None)]


def _name(c):
    return "r{}_n{}_w{}_s{}_buf{}_p{}".format(*c[:6]) + (f"_reg{c[6]}" if c[6] else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="131072,1048576")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    ap.add_argument("--configs", default="", help="indices into CONFIGS, e.g. 0,7,8,9,10 (default: all; 0 first)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    configs = [CONFIGS[int(i)] for i in args.configs.split(",")] if args.configs else CONFIGS
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               command="python benchmarks/dev/index_occupancy_sweep.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), rows=[])
    for t in map(int, args.sizes.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        qi = torch.randn(1, t, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        ki = torch.randn(1, t, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        for fp8 in (False, True):
            ref = None
            for c in configs:
                if time.time() - t0 > args.budget_s:
                    break
                rows, bn, nw, st, nbuf, persist, regs = c
                kw = dict(block_size=128, topk=16, init_blocks=0, local_blocks=1, scale=128 ** -0.5, cu_seqlens=None,
                          fp8_scores=fp8, fp8_rescore_blocks=4 if fp8 else 0, rows=rows, block_n=bn, num_warps=nw,
                          num_stages=st, nbuf=nbuf, persist=persist, max_registers=regs)
                row = dict(T=t, index="fp8" if fp8 else "bf16", config=_name(c))
                try:
                    sel = select_blocks_triton(qi, ki, **kw)
                    if ref is None:
                        ref = torch.sort(sel, dim=-1).values
                    else:  # rows whose set of blocks equals the default's (near-ties may flip)
                        row["same_rows"] = (torch.sort(sel, dim=-1).values == ref).all(-1).float().mean().item()
                    del sel
                    row["ms"] = time_ms(lambda: select_blocks_triton(qi, ki, **kw))  # reps from the first call
                except Exception as exc:  # out of resources, compile errors
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                res["rows"].append(row)
                print(row, flush=True)
                json.dump(res, open(os.path.join(args.out, "index_occupancy_sweep.json"), "w"), indent=1)
        del qi, ki
        torch.cuda.empty_cache()
    print("| T | index | config | ms | speedup vs the first config | rows selecting as the first |\n|---|---|---|---|---|---|")
    base = {(r["T"], r["index"]): r.get("ms") for r in res["rows"] if r["config"] == _name(configs[0])}
    for r in res["rows"]:
        b = base.get((r["T"], r["index"]))
        ms = r.get("ms")
        print(f"| {r['T']} | {r['index']} | {r['config']} | {ms if ms is None else round(ms, 2)} | "
              f"{round(b / ms, 3) if b and ms else '-'} | {r.get('same_rows', '-')} | {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
