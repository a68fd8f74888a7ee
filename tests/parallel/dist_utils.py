"""Spawn a small gloo process group on the CPU for the parallel tests."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def start_method() -> str:
    """fork on a CPU-only machine: the children inherit the imported modules (spawn re-imports torch
    and msa per rank, seconds each on a small CI machine). spawn wherever CUDA is available: once
    the parent has touched the driver (the GPU suite, or only Triton's device query when the parallel
    tests run alone), a forked child fails at its first CUDA call (the optimizer's graph-capture check
    makes one even on the CPU: "CUDA error: initialization error")."""
    return "spawn" if torch.cuda.is_available() else "fork"


def run_ranks(world: int, fn, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; an exception on any rank fails the caller.
    fn must be a module-level function (it is pickled into the spawned processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_entry, args=(world, os.path.join(tmp, "init"), fn, args), nprocs=world, join=True,
                           start_method=start_method())
