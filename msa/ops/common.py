"""Shared helpers of the MSA ops: argument checks, packed-sequence bookkeeping, backend choice.

Every public op validates its arguments here *before* any kernel launch, so bad input raises a
``ValueError`` that names the argument instead of crashing deep inside a kernel.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "reference", "triton")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.is_floating_point(), f"{name} must be a floating-point tensor (bf16, fp16, fp32 or fp64), got {t.dtype}")


def check_positive_int(name: str, value) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"{name} must be a positive int, got {value!r}")


def check_block_args(block_size: int, topk: int, init_blocks: int, local_blocks: int) -> None:
    check_positive_int("block_size", block_size)
    check_positive_int("topk", topk)
    check(isinstance(init_blocks, int) and init_blocks >= 0, f"init_blocks must be an int >= 0, got {init_blocks!r}")
    check(isinstance(local_blocks, int) and local_blocks >= 1,
          f"local_blocks must be an int >= 1 (the query's own block is always selected), got {local_blocks!r}")
    check(topk >= init_blocks + local_blocks,
          f"topk ({topk}) must be >= init_blocks + local_blocks ({init_blocks} + {local_blocks})")


def check_backend(backend: str) -> None:
    check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, seqlen: int, values: bool = True) -> None:
    """cu_seqlens: int32 (S+1,), B == 1; with ``values`` (one host copy) also: starts at 0, strictly
    increasing, ends at T."""
    if cu_seqlens is None:
        return
    check_tensor("cu_seqlens", cu_seqlens, 1, "(num_seqs + 1,)")
    check(cu_seqlens.dtype in (torch.int32, torch.int64), f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    check(cu_seqlens.numel() >= 2, f"cu_seqlens must hold at least 2 entries (0 and T), got {cu_seqlens.numel()}")
    check(batch == 1, f"with cu_seqlens the batch dimension must be 1 (sequences are packed along T), got B={batch}")
    if values:
        cu_seqlens_host(cu_seqlens, seqlen)


def cu_seqlens_host(cu_seqlens: torch.Tensor, seqlen: int) -> List[int]:
    """cu_seqlens as a host list, its values checked (starts at 0, strictly increasing, ends at T).
    Every launcher that needs the packed layout on the host copies it through here, so the values are
    checked exactly where the copy (the one host sync of a packed batch) happens anyway."""
    cu = [int(x) for x in cu_seqlens.detach().cpu().tolist()]
    check(cu[0] == 0, f"cu_seqlens must start at 0, got {cu[0]}")
    check(all(b > a for a, b in zip(cu[:-1], cu[1:])), "cu_seqlens must be strictly increasing (every sequence non-empty)")
    check(cu[-1] == seqlen, f"cu_seqlens must end at T={seqlen}, got {cu[-1]}")
    return cu


def default_scale(scale: Optional[float], dim: int, name: str = "scale") -> float:
    """dim ** -0.5 when scale is None, else scale as a float, which must be finite (a NaN or infinite scale
    makes every score NaN, and the selection or the softmax silently arbitrary)."""
    if scale is None:
        return dim ** -0.5
    try:
        val = math.nan if isinstance(scale, bool) else float(scale)
    except (TypeError, ValueError):
        val = math.nan
    check(math.isfinite(val), f"{name} must be a finite float (None: D ** -0.5), got {scale!r}")
    return val


def sequence_spans(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """(batch index, start, end) of every sequence: the rows of B or the packed pieces of cu_seqlens."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    cu = cu_seqlens_host(cu_seqlens, seqlen)
    return [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]


def positions_in_sequence(seqlen: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """int64 (T,): each token's position inside its own sequence (restarts at every cu_seqlens entry)."""
    pos = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return pos
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seq_id = torch.searchsorted(cu[1:], pos, right=True)
    return pos - cu[seq_id]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


from .utils.triton_helpers import interpreting  # noqa: E402  (re-exported: resolve_backend uses it)


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor]) -> str:
    """'auto' picks Triton on CUDA tensors (when importable) and the reference elsewhere."""
    check_backend(backend)
    if backend != "auto":
        if backend == "triton":
            check(triton_available(), "backend='triton' needs the triton package (pip install triton)")
            on_gpu = all(t.is_cuda for t in tensors)
            check(on_gpu or interpreting(),
                  "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
        return backend
    if all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    return "reference"


def reference_math(fn):
    """Decorator of the PyTorch references: run with autocast off, so their matmuls compute in
    compute_dtype on the given (possibly bf16) inputs, as the Triton kernels accumulate in fp32. Under
    torch.autocast an einsum would otherwise run in bf16 and round the scores (a CPU model trained with
    precision="bf16" then saw index and attention scores that the GPU never sees)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for dev in ("cpu", "cuda"):
                if torch.is_autocast_enabled(dev):
                    stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference computes in fp32 (fp64 when given fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_chunk(num_rows_per_query: int, num_keys: int, budget_bytes: int = 1 << 28) -> int:
    """How many queries fit a (chunk, rows, keys) fp32 buffer of at most budget_bytes."""
    per_query = max(1, num_rows_per_query * num_keys * 4)
    return max(1, min(4096, budget_bytes // per_query))


def load_triton_impl(package: str, module: str, name: str, backend: str):
    """The Triton implementation ``package.module.name``; None when backend='auto' and it is missing.
    Under torch.compile the check is skipped (the modules were imported by the eager warm-up or the
    custom ops import them when they run)."""
    if torch.compiler.is_compiling():
        return True
    import importlib
    try:
        return getattr(importlib.import_module(f"{package}.{module}"), name)
    except (ImportError, AttributeError) as exc:
        if backend == "auto":
            return None
        raise ValueError(f"backend='triton' is not available for this op: {exc}") from exc
