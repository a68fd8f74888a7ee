"""Public interface of the exp-free block top-k: ``msa.ops.topk.block_topk``."""

from __future__ import annotations

import torch

from ..common import check, check_backend, check_positive_int, check_tensor, resolve_backend
from .reference import block_topk_reference

MAX_TOPK = 1024


def block_topk(scores: torch.Tensor, topk: int, *, backend: str = "auto") -> torch.Tensor:
    """Column indices of the ``topk`` largest entries of every row (exp-free: ranks raw scores).

    Args:
        scores: fp32 (R, N) scores, e.g. block scores of R (token, group) rows over N key blocks.
            -inf marks entries that must never be picked; NaN is treated like -inf.
        topk: how many entries to keep per row (1 .. 1024; the Triton kernel is tuned for k <= 64).
        backend: "auto" (Triton on CUDA, else reference), "reference" or "triton".

    Returns:
        int32 (R, topk): indices by descending score (ties by ascending column); -1 fills the slots
        of rows that hold fewer than ``topk`` finite (> -inf) entries, after the valid prefix.
    """
    check_tensor("scores", scores, 2, "(R, N)")
    check(scores.dtype == torch.float32, f"scores must be float32, got {scores.dtype}")
    check(scores.shape[1] >= 1, f"scores must have at least one column (N >= 1), got shape {tuple(scores.shape)}")
    check(scores.shape[1] < 2 ** 31, f"scores must have fewer than 2**31 columns, got {scores.shape[1]}")
    check_positive_int("topk", topk)
    check(topk <= MAX_TOPK, f"topk must be <= {MAX_TOPK}, got {topk}")
    check_backend(backend)
    impl = resolve_backend(backend, [scores])
    if impl == "triton":
        from .triton_kernels import launch_block_topk
        x = scores if scores.stride(1) == 1 else scores.contiguous()
        out = torch.empty(scores.shape[0], topk, dtype=torch.int32, device=scores.device)
        launch_block_topk(x, out, topk)
        return out
    return block_topk_reference(scores, topk)
