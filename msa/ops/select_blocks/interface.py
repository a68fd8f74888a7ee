"""Public interface of the MSA Index Branch: ``msa.select_blocks``."""

from __future__ import annotations

from typing import Optional

import torch

from . import custom_ops  # noqa: F401  (registers the torch.ops.msa.* custom ops)
from ..common import (check, check_backend, check_block_args, check_cu_seqlens, check_float, check_tensor,
                      cu_seqlens_host, default_scale, load_triton_impl, resolve_backend)
from .reference import select_blocks_reference


def select_blocks(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int = 128, topk: int = 16,
                  init_blocks: int = 0, local_blocks: int = 1, scale: Optional[float] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto",
                  validate: bool = True, fp8_scores: bool = False, fp8_rescore_blocks: int = 4) -> torch.Tensor:
    """Pick, for every query token and KV group, the ``topk`` key blocks with the largest index score.

    Args:
        q_idx: (B, T, H_kv, D_idx) float: one index query head per KV group.
        k_idx: (B, T, D_idx) float: the ONE index key head shared by all groups.
        block_size: tokens per key block (B_k); blocks restart at every sequence start.
        topk: blocks kept per (token, group), the local block included.
        init_blocks: leading blocks of the sequence that are always kept (sinks).
        local_blocks: trailing blocks (the query's own block and the ones before it) always kept; >= 1.
        scale: index score scale, default D_idx ** -0.5.
        cu_seqlens: optional int32 (S+1,) offsets of packed sequences (then B must be 1).
        backend: "auto" (Triton on CUDA, else reference), "reference" or "triton".
        validate: check cu_seqlens' values (one host sync); the MSA layer, which checked them once per
            batch, passes False. Shapes, dtypes and devices are always checked.
        fp8_scores: score with float8_e4m3fn copies of q_idx (one scale per token and group,
            ``msa.cache.quantize_fp8``) and k_idx (one scale per key block of each sequence,
            ``msa.cache.quantize_fp8_key_blocks``): the index GEMM in fp8 with fp32 accumulation. The
            reference backend scores the dequantised copies in fp32, so both backends select from the
            same quantised scores.
        fp8_rescore_blocks: with fp8_scores, the fp8 scores keep ``topk + fp8_rescore_blocks``
            candidates (forced blocks among them) and the ``topk`` are picked from those by their exact
            block scores (q_idx / k_idx as given, fp32 accumulation): e4m3's rounding flips blocks near
            the cut, and the candidates hold nearly all of them (trained CPU indexers: 4 extra blocks
            raise the recall of the bf16 selection from 0.96-0.975 to 0.997-0.999). 0: the fp8 selection
            itself. Ignored without fp8_scores.

    Returns:
        int32 (B, T, H_kv, topk): block ids within each sequence, unordered, the local block in the
        last valid slot, -1 after the valid prefix (the MiniMax / vLLM convention). Equal block scores
        are broken toward the lower block id on every backend, so backends select the same sets.

    Equivalent PyTorch (one sequence, one group r; a query i at position i)::

        s = (q_idx[0, i, r] @ k_idx[0, : i + 1].T) * scale                 # token scores, j <= i
        m = [s[b * block_size:(b + 1) * block_size].max() for b in range(i // block_size + 1)]
        m[forced] = inf                                                    # local, init, local_blocks
        picked = torch.tensor(m).topk(min(topk, len(m))).indices

    and with fp8_scores: ``cand`` = the same on the fp8 copies with topk + fp8_rescore_blocks, then the
    exact ``m`` with every block outside ``cand`` set to -inf, then the top-k as above.
    """
    check_tensor("q_idx", q_idx, 4, "(B, T, H_kv, D_idx)")
    check_tensor("k_idx", k_idx, 3, "(B, T, D_idx)")
    check_float("q_idx", q_idx)
    check_float("k_idx", k_idx)
    bsz, t, _, d = q_idx.shape
    check(k_idx.shape == (bsz, t, d),
          f"k_idx must have shape (B, T, D_idx) = {(bsz, t, d)} to match q_idx {tuple(q_idx.shape)}, "
          f"got {tuple(k_idx.shape)}")
    check(q_idx.device == k_idx.device, f"q_idx and k_idx must be on one device, got {q_idx.device} and {k_idx.device}")
    check(t > 0, "q_idx must hold at least one token (T >= 1)")
    check_block_args(block_size, topk, init_blocks, local_blocks)
    check_cu_seqlens(cu_seqlens, bsz, t, values=validate)
    check_backend(backend)
    check(isinstance(fp8_scores, bool), f"fp8_scores must be a bool, got {fp8_scores!r}")
    check(isinstance(fp8_rescore_blocks, int) and not isinstance(fp8_rescore_blocks, bool) and fp8_rescore_blocks >= 0,
          f"fp8_rescore_blocks must be an int >= 0, got {fp8_rescore_blocks!r}")
    rescore = fp8_rescore_blocks if fp8_scores else 0
    scale = default_scale(scale, d)
    impl = resolve_backend(backend, [q_idx, k_idx])
    # the Triton function (eager), True (under torch.compile) or None (backend "auto" without Triton)
    fn = load_triton_impl(__package__, "triton_impl", "select_blocks_triton", backend) if impl == "triton" else None
    if fn and torch.compiler.is_compiling():  # one opaque node for the compiler
        return torch.ops.msa.select_blocks(q_idx.detach(), k_idx.detach(), block_size, topk, init_blocks,
                                           local_blocks, scale, cu_seqlens, fp8_scores, rescore)
    if fn:  # eager: the function itself, without the custom op's dispatch (host time bounds short inputs)
        return fn(q_idx.detach(), k_idx.detach(), block_size=block_size, topk=topk, init_blocks=init_blocks,
                  local_blocks=local_blocks, scale=scale, cu_seqlens=cu_seqlens, fp8_scores=fp8_scores,
                  fp8_rescore_blocks=rescore)
    kw = dict(block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale,
              cu_seqlens=cu_seqlens)
    if not fp8_scores:
        return select_blocks_reference(q_idx, k_idx, topk=topk, **kw)
    from ...cache.fp8 import dequantize_fp8, quantize_fp8, quantize_fp8_key_blocks
    cu = range(0, bsz * t + 1, t) if cu_seqlens is None else cu_seqlens_host(cu_seqlens, bsz * t)
    q8 = dequantize_fp8(*quantize_fp8(q_idx))
    k8 = dequantize_fp8(*quantize_fp8_key_blocks(k_idx.reshape(bsz * t, d), cu, block_size)).view(bsz, t, d)
    picked = select_blocks_reference(q8, k8, topk=topk + rescore, **kw)
    if not rescore:
        return picked
    return select_blocks_reference(q_idx, k_idx, topk=topk, candidates=picked, **kw)
