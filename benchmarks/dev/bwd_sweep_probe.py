"""Timing probe (session 34): launch configurations of the short-sequence backward kernels (the
query-tiled dQ, dK/dV) and of the sparse KL at G = 4 and G = 16, 8K-16K tokens, random and replayed
selections. The 4-layer model's 8K step spends 4.9 ms in the tiled dQ, 3.1 ms in dK/dV and 3.5 ms in
the KL against 2.9 ms in the forward (``model_step_profile.py``).

    PYTHONPATH=. OUT=DIR python benchmarks/dev/bwd_sweep_probe.py [--sizes 8192,16384] [--groups 4,16]

Shape: H_kv 4, H_q 4 G, D 128, d_idx 128, blocks of 128, top-16, bf16, batch 1. Per case and
configuration (``msa.tuning`` fields ``sparse_bwd_config`` / ``kl_kv_config``): the kernel's CUDA-event
time (``stage_times``, median of 5) or the KL forward + backward (do_bench median), and the relative
error of its output against the default configuration's. Writes OUT/bwd_sweep_probe.json per row.
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
ap.add_argument("--groups", default="4,16")
args = ap.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "command": "python benchmarks/dev/bwd_sweep_probe.py --sizes %s --groups %s" % (args.sizes, args.groups),
       "rows": []}
HKV, D, DI, BS, TOPK = 4, 128, 128, 128, 16
DQT = ("", "DQT_BLOCK_M=32", "DQT_BLOCK_M=128", "DQT_BLOCK_M=128,DQT_WARPS=8", "DQT_WARPS=8",
       "DQT_BLOCK_N=128", "DQT_BLOCK_N=128,DQT_WARPS=8", "DQT_BLOCK_N=32", "DQT_STAGES=2",
       "DQT_BLOCK_M=128,DQT_BLOCK_N=32,DQT_WARPS=8")
DKDV = ("", "DKDV_BLOCK_M=128", "DKDV_BLOCK_M=128,DKDV_WARPS=8", "DKDV_BLOCK_M=32", "DKDV_BLOCK_N=128,DKDV_WARPS=8",
        "DKDV_BLOCK_N=32", "DKDV_STAGES=3", "DKDV_BLOCK_M=128,DKDV_BLOCK_N=32")
KL = ("", "BLOCK_E=64", "BLOCK_E=64,num_warps=4", "num_warps=4", "num_stages=2", "BLOCK_E=64,num_stages=2")


def save(row):
    """Print a row and rewrite the JSON, so a run cut short by a time limit keeps what it measured."""
    out["rows"].append(row)
    print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
    json.dump(out, open(os.path.join(os.environ["OUT"], "bwd_sweep_probe.json"), "w"), indent=1)


for t in [int(x) for x in args.sizes.split(",")]:
    for g in [int(x) for x in args.groups.split(",")]:
        q, k, v, qi, ki, do = make_inputs(t, num_heads=HKV * g)
        qi.requires_grad_(True)
        ki.requires_grad_(True)
        with torch.no_grad():
            rand = msa.select_blocks(qi, ki, block_size=BS, topk=TOPK, backend="triton")
        for kind, bi in (("random", rand), ("replayed", realistic_indices(t, HKV, TOPK, BS, q.device))):
            with torch.no_grad():
                o, lse = msa.sparse_attention(q, k, v, bi, block_size=BS, return_lse=True, backend="triton")

            def bwd():
                st = {}
                grads = sparse_attention_bwd_triton(do, q, k, v, o, lse, bi, block_size=BS, scale=D ** -0.5,
                                                    cu_seqlens=None, stage_times=st)
                return st, grads

            ref = None
            for cfg in DQT + DKDV[1:]:
                try:
                    with msa.tuning.override(**(msa.tuning.parse(f"sparse_bwd_config={cfg}") if cfg else {})):
                        runs = [bwd() for _ in range(7)][2:]
                except Exception as exc:  # out of shared memory / registers: record and go on
                    save({"T": t, "G": g, "selections": kind, "sparse_bwd_config": cfg, "error": repr(exc)[:200]})
                    continue
                grads = [x.double() for x in runs[-1][1][:3]]
                ref = grads if ref is None else ref
                save({"T": t, "G": g, "selections": kind, "sparse_bwd_config": cfg or "default",
                      "dq_kernel_ms": sorted(r[0]["dq_kernel"] for r in runs)[2],
                      "dkdv_kernel_ms": sorted(r[0]["dkdv_kernel"] for r in runs)[2],
                      "max_rel_err_vs_default": max(float((a - b).norm() / b.norm()) for a, b in zip(grads, ref))})
                del runs, grads
            kw = dict(block_size=BS, scale=D ** -0.5, index_scale=DI ** -0.5, cu_seqlens=None, teacher_lse=lse)
            ref = None
            for cfg in KL:
                try:
                    with msa.tuning.override(**(msa.tuning.parse(f"kl_kv_config={cfg}") if cfg else {})):
                        def kl():
                            loss = indexer_kl_triton(qi, ki, q, k, bi, **kw)
                            return loss, torch.autograd.grad(loss, (qi, ki))
                        loss, grads = kl()
                        ms = median_ms(kl)
                except Exception as exc:
                    save({"T": t, "G": g, "selections": kind, "kl_kv_config": cfg, "error": repr(exc)[:200]})
                    continue
                vals = [loss.double()] + [x.double() for x in grads]
                ref = vals if ref is None else ref
                save({"T": t, "G": g, "selections": kind, "kl_kv_config": cfg or "default", "kl_fwd_bwd_ms": ms,
                      "max_rel_err_vs_default": max(float((a - b).norm() / b.norm()) for a, b in zip(vals, ref))})
        del q, k, v, qi, ki, do, rand
        torch.cuda.empty_cache()
