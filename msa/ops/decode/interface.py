"""Public interface of MSA decoding over a cache: ``msa.ops.decode.decode_attention``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common import check, check_backend, check_block_args, load_triton_impl, resolve_backend
from .reference import decode_attention_reference


def decode_attention(q: torch.Tensor, q_idx: Optional[torch.Tensor], cache, layer_idx: int, *, block_size: int,
                     topk: int, init_blocks: int = 0, local_blocks: int = 1, scale: Optional[float] = None,
                     index_scale: Optional[float] = None, dense: bool = False,
                     backend: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of the last t tokens stored in ``cache`` (layer ``layer_idx``) over everything before them.

    Args:
        q: (B, t, H_q, D) queries of the newest t tokens of each sequence (already appended to the cache).
        q_idx: (B, t, H_kv, D_idx) index queries, or None when dense.
        cache: an ``msa.MSACache``.
        block_size, topk, init_blocks, local_blocks: the selection (spec section 1), absolute positions.
        scale / index_scale: default D ** -0.5 / D_idx ** -0.5.
        dense: full causal attention over the cache (warmup-mode or dense layers).
        backend: "auto" (Triton on CUDA, reference on CPU), "reference" or "triton".

    The Triton path runs the cache's memoised ``DecodePlan`` (built on the first call with these
    arguments, see ``get_decode_plan``) and returns copies of its outputs. The validation here reads
    host metadata and the host lengths only (no device sync). Per-token loops that append with
    ``cache.append_device`` (CUDA graphs) call ``decode_attention_step`` instead.

    Returns:
        o (B, t, H_q, D) in q.dtype and the selection int32 (B, t, H_kv, topk) (None when dense).

    Equivalent PyTorch (sequence b with n cached tokens, new query i at position n - t + i)::

        ids = select_blocks over k_idx[b, :n] for the query at that position
        o[b, i] = sparse attention of q[b, i] over the tokens of ids at positions <= n - t + i
    """
    check(isinstance(q, torch.Tensor) and q.dim() == 4, f"q must have shape (B, t, H_q, D), got "
          f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    check(q.is_floating_point() and q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2),
          f"q must be a bf16/fp16/fp32/fp64 tensor, got {q.dtype}")
    check(dense or (isinstance(q_idx, torch.Tensor) and q_idx.dim() == 4 and q_idx.shape[:2] == q.shape[:2]),
          "q_idx must have shape (B, t, H_kv, D_idx) matching q unless dense=True")
    check(isinstance(layer_idx, int) and 0 <= layer_idx < cache.num_layers,
          f"layer_idx must be in [0, {cache.num_layers}), got {layer_idx!r}")
    bsz, t, hq, d = q.shape
    check(bsz == cache.batch_size, f"q must have the cache's batch size {cache.batch_size}, got {bsz}")
    check(d == cache.head_dim, f"q must have head_dim {cache.head_dim} (the cache's), got {d}")
    check(hq % cache.num_kv_heads == 0,
          f"q's {hq} heads must be a multiple of the cache's num_kv_heads ({cache.num_kv_heads})")
    check(q.device == cache.device, f"q must be on the cache device {cache.device}, got {q.device}")
    if not dense:
        check(cache.index_dim is not None, "the cache stores no index keys (index_dim=None); use dense=True")
        check(q_idx.is_floating_point() and q_idx.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2),
              f"q_idx must be a bf16/fp16/fp32/fp64 tensor, got {q_idx.dtype}")
        check(q_idx.shape[2:] == (cache.num_kv_heads, cache.index_dim),
              f"q_idx must have shape (B, t, H_kv={cache.num_kv_heads}, D_idx={cache.index_dim}), "
              f"got {tuple(q_idx.shape)}")
    check_block_args(block_size, topk, init_blocks, local_blocks)
    check(not cache.paged or cache.page_size == block_size,
          f"block_size ({block_size}) must equal the paged cache's page_size ({cache.page_size})")
    lens = cache.seq_lens(layer_idx)
    check(bool((lens >= t).all()), f"every sequence must hold the t={t} new tokens (append them first); "
          f"seq_lens={lens.tolist()}")
    check_backend(backend)
    scale = d ** -0.5 if scale is None else float(scale)
    if index_scale is None:
        index_scale = 1.0 if q_idx is None else q_idx.shape[-1] ** -0.5
    kw = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale,
              index_scale=index_scale, dense=dense)
    impl = resolve_backend(backend, [q] + ([] if dense else [q_idx]))
    fn = load_triton_impl(__package__, "triton_impl", "decode_attention_triton", backend) if impl == "triton" else None
    if fn is not None:
        check(q.dtype == cache.dtype, f"q must have the cache dtype {cache.dtype} for the Triton backend, got {q.dtype}")
        qi = None if dense else q_idx.to(cache.dtype)
        o, sel = fn(q, qi, cache, layer_idx, **kw)
        # the plan's buffers are overwritten by its next run (the next layer of the same shape)
        return o.clone(), (None if sel is None else sel.clone())
    return decode_attention_reference(q, q_idx, cache, layer_idx, **kw)


def decode_attention_step(q: torch.Tensor, q_idx: Optional[torch.Tensor], cache, layer_idx: int, *, block_size: int,
                          topk: int, init_blocks: int, local_blocks: int, scale: float, index_scale: float,
                          dense: bool, backend: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The per-token hot path of ``decode_attention``: no validation (the caller validated once, e.g.
    ``MSAForCausalLM.generate`` at entry), no host sync on the Triton path, capturable in a CUDA graph.

    Same arguments as ``decode_attention`` (scale and index_scale resolved; q (B, t, H_q, D) in the
    cache dtype on the Triton path; the t new tokens already appended, e.g. by ``cache.append_device``).
    The lengths come from ``cache.lengths_dev``. Triton: returns the memoised plan's buffers o
    (B, t, H_q, D) and selection int32 (B, t, H_kv, topk) (None when dense), overwritten by the plan's
    next run: consume them before the next layer. The reference path (CPU) reads the device lengths
    on the host (a sync on a GPU: the reference is not for speed)."""
    kw = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale,
              index_scale=index_scale, dense=dense)
    if resolve_backend(backend, [q]) == "triton":
        from .triton_impl import decode_attention_triton
        return decode_attention_triton(q, None if dense else q_idx.to(cache.dtype), cache, layer_idx, **kw)
    return decode_attention_reference(q, q_idx, cache, layer_idx, **kw)
