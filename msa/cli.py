"""The ``msa`` command: ``msa demo``, ``msa flops``, ``msa bench {prefill,decode,train,topk,generate}``."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import List, Optional

BENCHES = ("prefill", "decode", "train", "topk", "generate")


def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{x:.0f} B"
        x /= 1024
    return f"{x:.1f} GB"


def cmd_flops(args) -> int:
    from . import flops

    shape = dict(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                 index_dim=args.index_dim, topk=args.topk, block_size=args.block_size)
    seqs = [int(s) for s in args.seqlens.split(",")] if args.seqlens else [2 ** p for p in range(13, 22)]
    rows = flops.table(seqs, **shape)
    print(f"Per-layer causal attention cost per token (spec section 3): H_q={args.num_heads}, H_kv={args.num_kv_heads}, "
          f"d={args.head_dim}, d_idx={args.index_dim}, B_k={args.block_size}, k={args.topk}")
    print(f"{'tokens':>9} {'dense GFLOP/tok':>15} {'MSA GFLOP/tok':>14} {'FLOP ratio':>10} "
          f"{'dense dec B/tok':>15} {'MSA dec B/tok':>14} {'dec ratio':>9} {'fp8 idx ratio':>13}")
    for r in rows:
        t = r["tokens"]
        label = f"{t // 1024}K" if t < 2 ** 20 else f"{t / 2 ** 20:g}M"
        print(f"{label:>9} {r['dense_flops_per_token'] / 1e9:15.3f} {r['msa_flops_per_token'] / 1e9:14.3f} "
              f"{r['flops_ratio']:9.1f}x {_fmt_bytes(r['dense_decode_bytes']):>15} "
              f"{_fmt_bytes(r['msa_decode_bytes']):>14} {r['decode_ratio']:8.1f}x {r['decode_ratio_fp8_index']:12.1f}x")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    return 0


def cmd_bench(args, extra: List[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        print(f"benchmark script {script} not found: run `msa bench` from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script)] + extra
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="msa", description="MiniMax Sparse Attention: demo, cost model, benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train a small MSA LM on the stdlib's source (dense warmup, then sparse)")
    d.add_argument("--out", default="out/demo", help="folder for demo.png and demo.json")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: by device)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = sub.add_parser("flops", help="attention FLOPs and decode bytes per token, dense vs MSA")
    f.add_argument("--num-heads", type=int, default=64)
    f.add_argument("--num-kv-heads", type=int, default=4)
    f.add_argument("--head-dim", type=int, default=128)
    f.add_argument("--index-dim", type=int, default=128)
    f.add_argument("--block-size", type=int, default=128)
    f.add_argument("--topk", type=int, default=16)
    f.add_argument("--seqlens", default=None, help="comma-separated token counts (default 8K .. 2M)")
    b = sub.add_parser("bench", add_help=False,  # --help goes to the benchmark script
                       help="GPU benchmarks (arguments after the name go to the script)")
    b.add_argument("which", choices=BENCHES)
    args, extra = p.parse_known_args(argv)
    if args.cmd == "bench":
        return cmd_bench(args, extra)
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return {"demo": cmd_demo, "flops": cmd_flops}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
