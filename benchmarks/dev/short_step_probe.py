"""Timing probe (session 31): what short training steps (8K-16K tokens) may gain from the reverse
index's hot-row split (``msa.tuning`` field ``max_queries_per_item``) and the launch order of its
work items (``work_order``: "items" or "longest-first"), on random and replayed selections. The
query-tiled sparse KL it also timed on an H100 in session 32 (2.3-4.2x slower than the KV-outer KL at
every case) was removed from the package after that measurement, and its rows from this probe.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/short_step_probe.py [--sizes 8192,16384] [--splits 4096,1024]

Paper shape (H_q 64, H_kv 4, D 128, d_idx 128, blocks of 128, top-16, bf16, batch 1). Per case: the
attention backward's dK/dV kernel (CUDA events of ``stage_times``), the sparse KL forward + backward
(teacher lse given, as in a training step) and the whole sparse step (select + attention
forward/backward + KL), each a median. Writes OUT/short_step_probe.json.
"""
import argparse
import json
import os

import torch
import triton

import msa
import msa.tuning
from msa.bench.selections import realistic_indices
from msa.bench.train import make_inputs, median_ms
from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
from msa.ops.sparse_attention.triton_bwd import sparse_attention_bwd_triton

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="8192,16384")
ap.add_argument("--splits", default="4096,2048,1024,512")
args = ap.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "command": "python benchmarks/dev/short_step_probe.py --sizes %s --splits %s" % (args.sizes, args.splits),
       "rows": []}
BS, TOPK, D = 128, 16, 128


def save(row):
    """Print a row and rewrite the JSON, so a run cut short by a time limit keeps what it measured."""
    out["rows"].append(row)
    print({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
    json.dump(out, open(os.path.join(os.environ["OUT"], "short_step_probe.json"), "w"), indent=1)

kw = dict(block_size=BS, scale=D ** -0.5, index_scale=128 ** -0.5, cu_seqlens=None)

for t in [int(x) for x in args.sizes.split(",")]:
    q, k, v, qi, ki, do = make_inputs(t)
    for x in (q, k, v, qi, ki):
        x.requires_grad_(True)
    with torch.no_grad():
        rand = msa.select_blocks(qi, ki, block_size=BS, topk=TOPK, backend="triton")
    for kind, bi in (("random", rand), ("replayed", realistic_indices(t, 4, TOPK, BS, q.device))):
        with torch.no_grad():
            o, lse = msa.sparse_attention(q, k, v, bi, block_size=BS, return_lse=True, backend="triton")

        def dkdv():
            st = {}
            sparse_attention_bwd_triton(do, q.detach(), k.detach(), v.detach(), o, lse, bi, block_size=BS,
                                        scale=D ** -0.5, cu_seqlens=None, stage_times=st)
            return st

        def kl():
            loss = indexer_kl_triton(qi, ki, q.detach(), k.detach(), bi, **kw, teacher_lse=lse)
            torch.autograd.grad(loss, (qi, ki))

        def step():
            with torch.no_grad():
                msa.select_blocks(qi, ki, block_size=BS, topk=TOPK, backend="triton")
            o2, lse2 = msa.sparse_attention(q, k, v, bi, block_size=BS, return_lse=True, backend="triton")
            torch.autograd.grad(o2, (q, k, v), do)
            loss = indexer_kl_triton(qi, ki, q.detach(), k.detach(), bi, **kw, teacher_lse=lse2)
            torch.autograd.grad(loss, (qi, ki))

        for cfg in ("DKDV_WARPS=4", "DKDV_WARPS=8", "DKDV_BLOCK_N=32"):
            # dK/dV launch configurations: 64 x 64 with 4 warps (the default) spills 148 B in the sm_90 AOT
            # report; with 8 warps 228 registers, no spills; 64 rows x 32 keys no spills
            with msa.tuning.override(**msa.tuning.parse(f"sparse_bwd_config={cfg}")):
                stages = [dkdv() for _ in range(7)][2:]
            save({"T": t, "selections": kind, "sparse_bwd_config": cfg,
                  "dkdv_kernel_ms": sorted(x["dkdv_kernel"] for x in stages)[2]})
        ref_dq = None
        for cfg in ("", "DQT_BLOCK_M=64,DQT_WARPS=4", "DQT_BLOCK_M=64,DQT_WARPS=4,DQT_STAGES=2",
                    "DQT_BLOCK_M=64,DQT_WARPS=8,DQT_BLOCK_N=32,DQT_STAGES=2"):
            # the query-tiled dQ: its default 32 rows (2 tokens x 16 heads) compile to mma.sync in the sm_90
            # AOT report; 64 rows (4 tokens) to wgmma, no spills in these three configurations
            with msa.tuning.override(**(msa.tuning.parse(f"sparse_bwd_config={cfg}") if cfg else {})):
                dq = sparse_attention_bwd_triton(do, q.detach(), k.detach(), v.detach(), o, lse, bi, block_size=BS,
                                                 scale=D ** -0.5, cu_seqlens=None)[0].double()
                ref_dq = dq if ref_dq is None else ref_dq
                stages = [dkdv() for _ in range(7)][2:]
            save({"T": t, "selections": kind, "sparse_bwd_config": cfg or "default", "dq_tiled": True,
                  "dq_kernel_ms": sorted(x["dq_kernel"] for x in stages)[2],
                  "dq_rel_err_vs_default": float((dq - ref_dq).norm() / ref_dq.norm())})
        del ref_dq, dq
        for order in ("items", "longest-first"):
            for split in [int(x) for x in args.splits.split(",")]:
                with msa.tuning.override(max_queries_per_item=split, work_order=order):
                    stages = [dkdv() for _ in range(7)][2:]
                    row = {"T": t, "selections": kind, "kl": "kv", "work_order": order, "split": split,
                           "dkdv_kernel_ms": sorted(s["dkdv_kernel"] for s in stages)[2],
                           "dkdv_reduce_ms": sorted(s["dkdv_reduce"] for s in stages)[2],
                           "kl_fwd_bwd_ms": median_ms(kl), "sparse_step_ms": median_ms(step)}
                save(row)
    del q, k, v, qi, ki, do
    torch.cuda.empty_cache()
