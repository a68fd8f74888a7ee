"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time

import torch


def back_to_back_ms(fn, reps: int, warmup: int = 1) -> float:
    """Mean ms of ``fn`` called ``reps`` times back to back between two CUDA events (after ``warmup``
    untimed calls), with no cache flush in between: for inputs that are larger than the L2 themselves
    or for steps whose L2 reuse is part of what is measured."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def host_ms(fn, reps: int = 10) -> float:
    """Median host (Python + launch) ms of one ``fn`` call started on an idle GPU, without waiting for
    its kernels: when it approaches the call's GPU-timed ms, the call is bound by the host, not the GPU."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]
