"""Timing probe (session 30): the greedy tile order's two kernel paths (selection bit sets vs id
compares, ``msa.ops.utils.tile_union.ORDER_MAX_WORDS``) and its warps, against the consecutive
build, on replayed and random selections at 8K-64K; both paths' orders must be identical.

    PYTHONPATH=. OUT=DIR python benchmarks/dev/tile_order_bitset_probe.py
"""
import json
import os

import torch
import triton

from msa.bench.selections import realistic_indices
from msa.ops.select_blocks import select_blocks
from msa.ops.utils import tile_union
from msa.ops.utils.reverse_index import block_layout
from msa.ops.utils.tile_union import build_tile_union

dev = "cuda"
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def random_indices(t):
    g = torch.Generator(device=dev).manual_seed(0)
    qi = torch.randn(1, t, 4, 128, generator=g, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(1, t, 128, generator=g, device=dev, dtype=torch.bfloat16)
    return select_blocks(qi, ki, block_size=128, topk=16)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


for t in (8192, 16384, 32768, 65536):
    lay = block_layout(1, t, 128, None, dev)
    for kind, bi in (("replayed", realistic_indices(t, 4, 16, 128, dev)), ("random", random_indices(t))):
        row = {"consecutive": bench(lambda: build_tile_union(bi, lay, 128, 8, "consecutive"))}
        ref = None
        for words, warps in ((16, 1), (16, 2), (16, 4), (16, 8), (0, 4)):
            tile_union.ORDER_MAX_WORDS, tile_union.ORDER_WARPS = words, warps
            perm = build_tile_union(bi, lay, 128, 8, "greedy").perm
            ref = perm if ref is None else ref
            same = bool(torch.equal(perm, ref))
            row[f"{'bits' if words else 'compares'}_w{warps}"] = bench(
                lambda: build_tile_union(bi, lay, 128, 8, "greedy"))
            row[f"{'bits' if words else 'compares'}_w{warps}_same"] = same
        tile_union.ORDER_MAX_WORDS, tile_union.ORDER_WARPS = 16, 4
        out[f"{t}_{kind}"] = row
        print(t, kind, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
json.dump(out, open(os.path.join(os.environ["OUT"], "tile_order_bitset_probe.json"), "w"), indent=1)
