"""Timing probe (session 34): which main-branch kernels win at small GQA groups (G = 4, 8) at 8K-16K.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/small_g_probe.py [--sizes 8192,16384] [--groups 4,8,16]

``auto`` takes the query-tiled forward and dQ below 32K tokens at every G. Its tiles hold 128 / G
tokens (32 at G = 4), and the union of blocks a tile walks grows with its tokens, so at small G
the KV-outer path may win. Shape: H_kv 4, H_q = 4 G, D 128, d_idx 128, blocks of 128, top-16,
bf16, batch 1; selections random (the indexer on random inputs) and replayed
(``msa.bench.selections.realistic_indices``). Per case, public-call medians (do_bench):
forward for each ``sparse_fwd_kernel`` (and the tiled forward with 64 rows per tile), forward +
backward for each (forward, dQ) pair, and dense SDPA (the faster of cuDNN and flash) forward and
forward + backward. Then the bench's 4-layer model (16 / 4 heads) training step at 8K under each
pair. Writes OUT/small_g_probe.json after every row.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import msa
import msa.tuning
from msa.bench.layer import bench_model, time_ms
from msa.bench.selections import realistic_indices
from msa.bench.train import make_inputs, median_ms

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="8192,16384")
ap.add_argument("--groups", default="4,8,16")
ap.add_argument("--model-T", type=int, default=8192)
args = ap.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "command": "python benchmarks/dev/small_g_probe.py --sizes %s --groups %s" % (args.sizes, args.groups),
       "rows": []}
HKV, D, BS, TOPK = 4, 128, 128, 16
PAIRS = (("tiled", "tiled"), ("kv", "kv"), ("tiled", "kv"), ("kv", "tiled"))


def save(row):
    """Print a row and rewrite the JSON, so a run cut short by a time limit keeps what it measured."""
    out["rows"].append(row)
    print({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
    json.dump(out, open(os.path.join(os.environ["OUT"], "small_g_probe.json"), "w"), indent=1)


def dense_ms(q, k, v, do, backward):
    best = None
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def f():
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True, enable_gqa=True)
                if backward:
                    torch.autograd.grad(o, (q, k, v), do.transpose(1, 2))
        try:
            t = median_ms(f)
        except Exception:  # a backend without this shape
            continue
        best = t if best is None else min(best, t)
    return best


for t in [int(x) for x in args.sizes.split(",")]:
    for g in [int(x) for x in args.groups.split(",")]:
        q, k, v, qi, ki, do = make_inputs(t, num_heads=HKV * g)
        for x in (q, k, v):
            x.requires_grad_(True)
        with torch.no_grad():
            rand = msa.select_blocks(qi, ki, block_size=BS, topk=TOPK, backend="triton")
        save({"T": t, "G": g, "dense_fwd_ms": dense_ms(q, k, v, do, False),
              "dense_fwd_bwd_ms": dense_ms(q, k, v, do, True)})
        for kind, bi in (("random", rand), ("replayed", realistic_indices(t, HKV, TOPK, BS, q.device))):
            row = {"T": t, "G": g, "selections": kind}
            ref = None
            for name, over in (("tiled", dict(sparse_fwd_kernel="tiled")),
                               ("tiled64", dict(sparse_fwd_kernel="tiled",
                                                **msa.tuning.parse("sparse_fwd_tiled_config=BLOCK_M=64"))),
                               ("kv", dict(sparse_fwd_kernel="kv")), ("qo", dict(sparse_fwd_kernel="qo"))):
                with msa.tuning.override(**over), torch.no_grad():
                    f = lambda: msa.sparse_attention(q, k, v, bi, block_size=BS, backend="triton")  # noqa: E731
                    o = f().double()
                    ref = o if ref is None else ref
                    row[f"fwd_{name}_ms"] = median_ms(f)
                    row[f"fwd_{name}_rel_err"] = float((o - ref).norm() / ref.norm())
            for fk, dq in PAIRS:
                with msa.tuning.override(sparse_fwd_kernel=fk, sparse_bwd_dq=dq):
                    def step():
                        o = msa.sparse_attention(q, k, v, bi, block_size=BS, backend="triton")
                        torch.autograd.grad(o, (q, k, v), do)
                    row[f"fwdbwd_{fk}_{dq}_ms"] = median_ms(step)
            save(row)
        del q, k, v, qi, ki, do, rand
        torch.cuda.empty_cache()

# the bench's 4-layer model (msa.bench.layer.model_bench's, G = 4) under each (forward, dQ) pair
model, opt, ids, step = bench_model(args.model_T, "sparse", 0)
row = {"model_T": args.model_T, "G": 4}
for fk, dq in (("auto", "auto"),) + PAIRS:
    with msa.tuning.override(sparse_fwd_kernel=fk, sparse_bwd_dq=dq):
        row[f"model_step_{fk}_{dq}_ms"] = time_ms(step, reps=5)
save(row)
