"""Small helpers every Triton launcher uses (one definition each)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, set before kernel import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int, lo: int = 1) -> int:
    """The smallest power of two >= max(x, lo) (tl.arange sizes and padded tile widths)."""
    x = max(int(x), int(lo), 1)
    return 1 << (x - 1).bit_length()


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (grid sizing); 4 stands in for the CPU interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


LARGE_SHARED_MEMORY_BYTES = 200 << 10


def large_shared_memory(device) -> bool:
    """Whether a kernel on this CUDA device may use >= 200 KiB of shared memory (sm_90 / sm_100
    datacenter parts: 227 KiB; sm_80 163 KiB, consumer parts ~100 KiB). Launch configurations tuned on
    the former keep smaller tiles elsewhere; False for the CPU interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)  # torch >= 2.7
    if optin is None:
        return props.major in (9, 10)
    return optin >= LARGE_SHARED_MEMORY_BYTES


def tl_compute_dtype(dtype: torch.dtype):
    """Element type fed to tl.dot. The CPU interpreter's bf16/fp16 math is wrong, so it computes in fp32."""
    import triton.language as tl
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to tf32 (the fp32 path is the accuracy reference)."""
    return "ieee" if dtype == torch.float32 else "tf32"
