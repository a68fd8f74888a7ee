"""The ``msa`` command: ``msa demo``, ``msa train``, ``msa flops``, ``msa bench {prefill,decode,train,topk,layer,hf,generate}``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .bench import positive_ints


def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{x:.0f} B"
        x /= 1024
    return f"{x:.1f} GB"


def cmd_flops(args) -> int:
    from . import flops

    if args.num_heads % args.num_kv_heads:
        print(f"msa flops: --num-heads ({args.num_heads}) must be a multiple of --num-kv-heads ({args.num_kv_heads})",
              file=sys.stderr)
        return 2
    shape = dict(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                 index_dim=args.index_dim, topk=args.topk, block_size=args.block_size)
    seqs = args.seqlens or [2 ** p for p in range(13, 22)]
    rows = flops.table(seqs, **shape)
    print(f"Per-layer causal attention cost per token (spec section 3): H_q={args.num_heads}, H_kv={args.num_kv_heads}, "
          f"d={args.head_dim}, d_idx={args.index_dim}, B_k={args.block_size}, k={args.topk}")
    print(f"{'tokens':>9} {'dense GFLOP/tok':>15} {'MSA GFLOP/tok':>14} {'FLOP ratio':>10} "
          f"{'dense dec B/tok':>15} {'MSA dec B/tok':>14} {'dec ratio':>9} {'fp8 idx ratio':>13}")
    for r in rows:
        t = r["tokens"]
        label = str(t) if t % 1024 else f"{t // 1024}K" if t < 2 ** 20 else f"{t / 2 ** 20:g}M"
        print(f"{label:>9} {r['dense_flops_per_token'] / 1e9:15.3f} {r['msa_flops_per_token'] / 1e9:14.3f} "
              f"{r['flops_ratio']:9.1f}x {_fmt_bytes(r['dense_decode_bytes']):>15} "
              f"{_fmt_bytes(r['msa_decode_bytes']):>14} {r['decode_ratio']:8.1f}x {r['decode_ratio_fp8_index']:12.1f}x")
    return 0


def _positive_int(text: str) -> int:
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if val < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {val}")
    return val


def _cuda_missing() -> Optional[str]:
    """Why CUDA cannot be used here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
        return f"CUDA is not available on this machine (torch {torch.__version__}: {build})"
    return None


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    return 0


def cmd_train(args) -> int:
    from .train import preset_names, resolve_config
    from .train.presets import DESCRIPTIONS
    from .train.trainer import Trainer, build_data, resolve_device

    if args.list_presets:
        width = max(map(len, preset_names()))
        for n in preset_names():
            print(f"{n:<{width}}  {DESCRIPTIONS[n]}".rstrip())
        return 0
    if not args.preset and not args.config:
        print("msa train: give --preset NAME or --config FILE (msa train --list-presets)", file=sys.stderr)
        return 2
    try:
        cfg = resolve_config(args.preset, args.config, args.set or [])
    except ValueError as exc:  # a bad key or value: say which, without a traceback
        print(f"msa train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import dataclasses
        import json
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    if args.prepare_data:
        build_data(cfg, resolve_device(cfg))
        return 0
    out = args.out or f"out/train/{cfg.name}"
    try:
        started = _init_process_group(cfg, resolve_device(cfg))
    except ValueError as exc:
        print(f"msa train: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist
    rank = dist.get_rank() if started or dist.is_initialized() else 0
    try:
        if args.fresh:
            import shutil
            if rank == 0:
                shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
            if dist.is_initialized():
                dist.barrier()
        try:  # a checkpoint in --out from another configuration: say so, without a traceback
            trainer = Trainer(cfg, out, progress=not args.no_progress, resume=not args.fresh)
        except ValueError as exc:
            print(f"msa train: {exc}", file=sys.stderr)
            return 2
        s = trainer.fit()
    finally:
        if started:
            dist.destroy_process_group()
    msg = f"msa train: {s['status']} at step {s['step']}/{s['steps']}"
    if "val_lm_loss" in s:
        msg += f"; validation loss {s['val_lm_loss']:.4f}"
    if "score_recall" in s:
        msg += f", block recall {s['block_recall']:.3f}, score recall {s['score_recall']:.3f}"
    if rank == 0:
        print(f"{msg}; results in {out}")
    return 0 if s["status"] in ("complete", "interrupted") else 1


def _init_process_group(cfg, device) -> bool:
    """The process group of a data-parallel ``msa train`` (parallel.strategy "ddp" / "fsdp2"):
    from torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...) when it is set, else a group of
    one process. NCCL on CUDA (NVLink multicast left off), gloo on the CPU. Returns whether a group
    was started here; a ValueError when torchrun started several ranks for strategy "none"."""
    import os

    import torch
    import torch.distributed as dist

    strategy = cfg.parallel.strategy
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none":
        if world > 1:
            raise ValueError(f"launched on {world} ranks (WORLD_SIZE) but parallel.strategy is 'none': "
                             f"add --set parallel.strategy=ddp (or fsdp2)")
        return False
    if dist.is_initialized():
        return False
    backend = "gloo"
    if device.type == "cuda":
        backend = "nccl"
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def _bench_help() -> str:
    from .bench import BENCHES

    lines = ["usage: msa bench {" + ",".join(BENCHES) + "} [--out DIR] [--quick] [args ...]", "",
             "GPU benchmarks (need CUDA and triton); each starts with a correctness gate and writes JSON",
             "and plots under --out. `msa bench NAME --help` lists NAME's own arguments.", ""]
    lines += [f"  {name:<8} {desc}" for name, desc in BENCHES.items()]
    return "\n".join(lines)


def cmd_bench(which: Optional[str], extra: List[str]) -> int:
    """Run msa.bench.<which>.main() with ``extra`` as its arguments. Without CUDA (or triton) it prints
    one line and returns 2 instead of starting; ``--help`` works everywhere."""
    from .bench import BENCHES

    wants_help = any(a in ("-h", "--help") for a in extra)
    if which is None:
        print(_bench_help(), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    if which not in BENCHES:
        print(f"msa bench: error: unknown benchmark {which!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    if not wants_help:
        why = _cuda_missing()
        if why is not None:
            print(f"msa bench {which}: needs a CUDA GPU: {why}", file=sys.stderr)
            return 2
    try:
        mod = importlib.import_module(f"msa.bench.{which}")
    except ImportError as exc:
        missing = exc.name or str(exc)
        print(f"msa bench {which}: cannot import {missing!s} (install it, e.g. pip install triton)", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [f"msa bench {which}"] + list(extra)
    try:
        rc = mod.main()
    except SystemExit as exc:  # argparse --help / errors and the gates' exit codes
        rc = exc.code
    finally:
        sys.argv = saved
    if rc is None:
        return 0
    if isinstance(rc, int):
        return rc
    print(rc, file=sys.stderr)  # sys.exit("message")
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="msa", description="MiniMax Sparse Attention: demo, training, cost model, benchmarks")
    p.add_argument("--version", action="version", version=f"msa {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train a small MSA LM on the stdlib's source (dense warmup, then sparse)")
    d.add_argument("--out", default="out/demo", help="folder for demo.png and demo.json")
    d.add_argument("--steps", type=_positive_int, default=None, help="training steps, >= 1 (default: by device)")
    d.add_argument("--device", default=None, choices=("cpu", "cuda"), help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = sub.add_parser("train", help="train an MSA language model from a preset or config file (msa/train)")
    t.add_argument("--preset", default=None, help="a named configuration (--list-presets)")
    t.add_argument("--config", default=None, help="a JSON or TOML config file (applied over the preset)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=3e-4 --set model.topk_blocks=8 (repeatable)")
    t.add_argument("--out", default=None, help="run directory (default out/train/<name>); an existing run resumes")
    t.add_argument("--fresh", action="store_true", help="ignore (delete) checkpoints in --out and start over")
    t.add_argument("--prepare-data", action="store_true", help="only build the tokenizer and token cache")
    t.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    t.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = sub.add_parser("flops", help="attention FLOPs and decode bytes per token, dense vs MSA")
    f.add_argument("--num-heads", type=_positive_int, default=64)
    f.add_argument("--num-kv-heads", type=_positive_int, default=4)
    f.add_argument("--head-dim", type=_positive_int, default=128)
    f.add_argument("--index-dim", type=_positive_int, default=128)
    f.add_argument("--block-size", type=_positive_int, default=128)
    f.add_argument("--topk", type=_positive_int, default=16)
    f.add_argument("--seqlens", type=positive_ints, default=None, help="comma-separated token counts (default 8K .. 2M)")
    sub.add_parser("bench", add_help=False,  # --help goes to the benchmark (or lists them)
                   help="GPU benchmarks: msa bench {prefill,decode,train,topk,layer,hf,generate} [args] (--help lists them)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # everything after the name belongs to the benchmark
        rest = argv[1:]
        which = rest[0] if rest and not rest[0].startswith("-") else None
        return cmd_bench(which, rest[1:] if which is not None else rest)
    args = p.parse_args(argv)
    if args.cmd == "demo" and args.device == "cuda":
        why = _cuda_missing()
        if why is not None:
            d.error(f"argument --device: cuda requested but {why}")
    return {"demo": cmd_demo, "flops": cmd_flops, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
