"""Parity and timing of ``msa.block_max_kl_loss``: Triton against the PyTorch reference, at the quality
study's shape (one layer of the 47M model: H_q 8, H_kv 2, D 64, D_idx 128, blocks of 128, T 16K) and
the paper's (H_q 64, H_kv 4, D 128).

    PYTHONPATH=. OUT=DIR python benchmarks/dev/block_max_kl_probe.py [--rows 2048,0]

Per case (bf16 inputs as the trainer feeds them under autocast; fp32 for the exact check): the loss of
both backends on the same sampled rows, the relative error of the index gradients, and the medians
of forward + backward. Writes OUT/block_max_kl_probe.json after every row.
"""
import argparse
import json
import os

import torch
import triton

from msa.bench.train import median_ms
from msa.ops.block_max_kl import block_max_kl_loss

ap = argparse.ArgumentParser()
ap.add_argument("--rows", default="2048,0", help="rows_per_sequence values (0: every row)")
ap.add_argument("--seqlen", type=int, default=16384)
args = ap.parse_args()
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "command": "python benchmarks/dev/block_max_kl_probe.py --rows %s --seqlen %d" % (args.rows, args.seqlen),
       "rows": []}
SHAPES = {"quality (8/2 heads, D 64)": (8, 2, 64, 128), "paper (64/4 heads, D 128)": (64, 4, 128, 128)}


def inputs(t, hq, hkv, d, di, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=gen).to(dtype)  # noqa: E731
    return (mk(1, t, hkv, di).requires_grad_(), mk(1, t, di).requires_grad_(), mk(1, t, hq, d), mk(1, t, hkv, d))


def run(backend, qi, ki, q, k, rows):
    torch.manual_seed(5)
    loss = block_max_kl_loss(qi, ki, q, k, block_size=128, rows_per_sequence=rows, backend=backend)
    return (loss, *torch.autograd.grad(loss, (qi, ki)))


for name, (hq, hkv, d, di) in SHAPES.items():
    for rows in [int(r) for r in args.rows.split(",")]:
        for dtype in (torch.float32, torch.bfloat16):
            torch.backends.cuda.matmul.allow_tf32 = False
            x = inputs(args.seqlen, hq, hkv, d, di, dtype)
            ref, ours = run("reference", *x, rows), run("triton", *x, rows)
            rel = [float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)) for a, b in zip(ours[1:], ref[1:])]
            row = {"shape": name, "rows": rows, "dtype": str(dtype), "T": args.seqlen,
                   "loss_ref": ref[0].item(), "loss_triton": ours[0].item(), "rel_err_dq_idx": rel[0], "rel_err_dk_idx": rel[1]}
            if dtype == torch.bfloat16:
                row["ms_reference"] = median_ms(lambda: run("reference", *x, rows))
                row["ms_triton"] = median_ms(lambda: run("triton", *x, rows))
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            del x, ref, ours
            torch.cuda.empty_cache()
            with open(os.path.join(os.environ.get("OUT", "."), "block_max_kl_probe.json"), "w") as f:
                json.dump(out, f, indent=1)
print("%-28s %6s %9s %11s %11s %9s %9s" % ("shape", "rows", "dtype", "loss ref", "loss tri", "ms ref", "ms tri"))
for r in out["rows"]:
    print("%-28s %6d %9s %11.5f %11.5f %9s %9s" % (r["shape"], r["rows"], r["dtype"][6:], r["loss_ref"], r["loss_triton"],
                                               "%.2f" % r["ms_reference"] if "ms_reference" in r else "-",
                                               "%.2f" % r["ms_triton"] if "ms_triton" in r else "-"))
