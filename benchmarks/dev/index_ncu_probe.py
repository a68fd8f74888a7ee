"""One select_blocks call per index format at the paper shape (H_kv 4, d_idx 128, block 128, top 16, batch 1),
after a warm-up, for Nsight Compute to profile the index-score kernel: where its time goes (tensor pipe against
ALU, memory, stalls). The perf-notes asked for this before any change to the indexer (round 22: the bf16 kernel
runs at ~460 TFLOP/s, under 60% of the MMA peak, and e4m3 operands barely help).

    ncu --clock-control none --kernel-name regex:index_scores_fwd --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \\
        python benchmarks/dev/index_ncu_probe.py --T 65536
(launch-skip 2 = the two warm-up calls; the two profiled launches are bf16, then fp8: at 64K tokens the
score buffer, 0.5 GiB, is one chunk, so each call launches the kernel once).
"""

from __future__ import annotations

import argparse

import torch

from msa.ops.select_blocks import select_blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    qi = torch.randn(1, args.T, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    ki = torch.randn(1, args.T, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    kw = dict(block_size=128, topk=16)
    for fp8 in (False, True):   # warm-up: compiles both variants (the first two index-kernel launches)
        select_blocks(qi, ki, fp8_scores=fp8, **kw)
    torch.cuda.synchronize()
    for fp8 in (False, True):   # profiled
        select_blocks(qi, ki, fp8_scores=fp8, **kw)
    torch.cuda.synchronize()
    print("done", args.T)


if __name__ == "__main__":
    main()
