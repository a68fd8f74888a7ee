"""The MSA attention layer: GQA main branch + index branch, dense (warmup) and sparse modes,
the layer's KL loss, and incremental decoding with a KV + index-key cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..cache import MSACache
from ..ops.common import check, check_block_args, check_cu_seqlens, check_float, positions_in_sequence, resolve_backend
from ..ops.decode import decode_attention, decode_attention_step
from ..ops.dense import dense_causal_attention
from ..ops.indexer_kl import indexer_kl_loss
from ..ops.select_blocks import select_blocks
from ..ops.sparse_attention import sparse_attention
from ..ops.sparse_attention.triton_impl import selection_plan
from .norm import RMSNorm
from .rope import apply_rotary, rotary_cos_sin

MODES = ("dense", "sparse")
KL_SUPPORTS = ("selected", "full")


@dataclass
class MSAConfig:
    """Configuration of one MSA attention layer (names follow vLLM / TensorRT-LLM).

    hidden_size: model width. num_heads / num_kv_heads / head_dim: GQA shape (H_q, H_kv, d).
    index_dim: d_idx of the index branch. num_index_heads: index query heads; MSA uses one per KV
    group, so it must equal num_kv_heads (None = num_kv_heads). block_size, topk_blocks, init_blocks,
    local_blocks: selection (B_k, k, forced leading / trailing blocks). rope_theta, rotary_dim: RoPE
    (rotary_dim None = head_dim). index_norm_rope: MiniMax-M3 compatibility, RMSNorm with (1 + w)
    gain then the same partial RoPE on q_idx and k_idx (off by default). use_index: False makes a
    plain dense GQA layer without an index branch (MiniMax-M3 keeps its first layers dense).
    mode: "dense" (warmup: full causal attention, full-support KL) or "sparse".
    backend: "auto" | "reference" | "triton" for the MSA ops.
    fp8_index_scores: prefill / training selection from float8_e4m3fn copies of q_idx (a scale per token
    and group) and k_idx (a scale per key block), ``msa.select_blocks(fp8_scores=True)``: the fp8 scores
    keep 4 candidates beyond topk_blocks and their exact scores pick the topk (``fp8_rescore_blocks``);
    the KL and the decode path are unchanged. It pays only where the index GEMM dominates (around 1M
    tokens); at short contexts quantising and rescoring cost more than the fp8 GEMM saves (several
    times the bf16 call at 8K: docs/perf-notes.md), so leave it off there.
    debug: checked mode: every op also validates the values of its index tensors (block ids in range,
    no repeats, cu_seqlens), which synchronises with the host several times per layer.
    """

    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    index_dim: int = 32
    num_index_heads: Optional[int] = None
    block_size: int = 128
    topk_blocks: int = 16
    init_blocks: int = 0
    local_blocks: int = 1
    rope_theta: float = 10000.0
    rotary_dim: Optional[int] = None
    index_norm_rope: bool = False
    use_index: bool = True
    mode: str = "sparse"
    backend: str = "auto"
    fp8_index_scores: bool = False
    debug: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "index_dim"):
            val = getattr(self, name)
            check(isinstance(val, int) and val > 0, f"{name} must be a positive int, got {val!r}")
        check(self.num_heads % self.num_kv_heads == 0,
              f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.num_index_heads is None:
            self.num_index_heads = self.num_kv_heads
        check(self.num_index_heads == self.num_kv_heads,
              f"num_index_heads must equal num_kv_heads ({self.num_kv_heads}): one index query head per GQA group")
        check_block_args(self.block_size, self.topk_blocks, self.init_blocks, self.local_blocks)
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        check(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
              f"rotary_dim must be even and in [0, head_dim={self.head_dim}], got {self.rotary_dim}")
        check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        check(isinstance(self.fp8_index_scores, bool), f"fp8_index_scores must be a bool, got {self.fp8_index_scores!r}")


def msa_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: Optional[torch.Tensor],
                          k_idx: Optional[torch.Tensor], *, sparse: bool, compute_kl: bool, block_size: int,
                          topk_blocks: int, init_blocks: int = 0, local_blocks: int = 1, scale: float,
                          index_scale: float, cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto",
                          debug: bool = False, fp8_index_scores: bool = False, kl_support: str = "selected"):
    """The attention of an MSA layer over a whole (packed) batch, as training and prefill run it:
    (o, kl or None, block_indices or None). Shared by ``MSAAttention`` and ``msa.hf``.

    Args:
        q (B, T, H_q, D), k / v (B, T, H_kv, D) after RoPE; q_idx (B, T, H_kv, D_idx) and k_idx
        (B, T, D_idx) the index branch (None when neither sparse nor compute_kl); one float dtype.
        sparse: MSA selection (else dense causal attention, the warmup). compute_kl: also the layer's
        KL (teacher from detached q, k; gradients reach q_idx, k_idx only). scale / index_scale: main and
        index softmax scales. debug: the ops also validate index values (host syncs).
        fp8_index_scores: select from fp8 index scores (``msa.select_blocks(fp8_scores=True)``).
        kl_support: "selected" (the spec's sparse-phase KL: over the tokens of the selected blocks) or
        "full" (sparse attention, but the KL over every causal token as in the warmup: the index also
        learns about the blocks it did not select; a recipe option, ``phase.full_kl_every``).

    Sparse: ONE selection and, on the Triton backend outside torch.compile, one ``SelectionPlan`` whose
    reverse indices the attention forward, its backward and the KL share; the attention's lse is the
    KL's teacher normaliser. Dense: SDPA, or cuDNN / flash attention returning the lse when the
    Triton KL needs it. Value checks are skipped (``validate=debug``): the selection is made here,
    and cu_seqlens' values are checked where a launcher copies them to the host.
    """
    check(kl_support in KL_SUPPORTS, f"kl_support must be one of {KL_SUPPORTS}, got {kl_support!r}")
    full_kl = compute_kl and sparse and kl_support == "full"
    # the KL reuses the attention's lse when both cover the same support (the reference recomputes it)
    need_lse = compute_kl and not full_kl and resolve_backend(backend, [q]) == "triton"
    block_indices = plan = lse = None
    if not sparse:
        if need_lse:
            o, lse = dense_causal_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens, return_lse=True)
        else:
            o = dense_causal_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    else:
        block_indices = select_blocks(q_idx, k_idx, block_size=block_size, topk=topk_blocks, init_blocks=init_blocks,
                                      local_blocks=local_blocks, scale=index_scale, cu_seqlens=cu_seqlens,
                                      backend=backend, validate=debug, fp8_scores=fp8_index_scores)
        if (resolve_backend(backend, [q]) == "triton" and q.dtype != torch.float64
                and not torch.compiler.is_compiling()):
            plan = selection_plan(block_indices, block_size=block_size, cu_seqlens=cu_seqlens, num_heads=q.shape[2],
                                  head_dim=q.shape[3], dtype=q.dtype, index_dim=q_idx.shape[3])
        o, lse = sparse_attention(q, k, v, block_indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens,
                                  return_lse=True, backend=backend, validate=debug, plan=plan)
    kl = None
    if compute_kl:
        kl = indexer_kl_loss(q_idx, k_idx, q.detach(), k.detach(), None if full_kl else block_indices,
                             block_size=block_size, scale=scale,
                             index_scale=index_scale, cu_seqlens=cu_seqlens, backend=backend,
                             teacher_lse=lse if need_lse else None, validate=debug, plan=None if full_kl else plan)
    return o, kl, block_indices


class MSAOutput(NamedTuple):
    """hidden: (B, T, hidden_size); kl_loss: fp32 scalar or None; block_indices: int32
    (B, T, H_kv, topk) of the sparse mode or None."""

    hidden: torch.Tensor
    kl_loss: Optional[torch.Tensor]
    block_indices: Optional[torch.Tensor]


class MSAAttention(nn.Module):
    """MiniMax Sparse Attention layer.

    forward(x (B, T, hidden), cu_seqlens=None, cache=None, layer_idx=0, compute_kl=None,
    kl_support="selected") -> MSAOutput (kl_support: see ``msa_prefill_attention``).
    The index projections read x.detach(), so the KL trains only them; the KL's teacher uses
    detached q and k, so it never moves the backbone; top-k has no gradient, so the LM loss never
    reaches the index projections.
    """

    def __init__(self, config: MSAConfig):
        super().__init__()
        self.config = c = config
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.use_index:
            self.q_idx_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.index_dim, bias=False)
            self.k_idx_proj = nn.Linear(c.hidden_size, c.index_dim, bias=False)
            if c.index_norm_rope:
                self.q_idx_norm = RMSNorm(c.index_dim, unit_offset=True)
                self.k_idx_norm = RMSNorm(c.index_dim, unit_offset=True)

    @property
    def mode(self) -> str:
        return self.config.mode if self.config.use_index else "dense"

    def set_mode(self, mode: str) -> None:
        check(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
        self.config.mode = mode

    def _index_branch(self, x: torch.Tensor, cos, sin):
        c = self.config
        b, t, _ = x.shape
        xd = x.detach()  # stop-gradient 1: the KL trains only the index projections
        q_idx = self.q_idx_proj(xd).view(b, t, c.num_kv_heads, c.index_dim)
        k_idx = self.k_idx_proj(xd).view(b, t, c.index_dim)
        if c.index_norm_rope:
            q_idx, k_idx = self.q_idx_norm(q_idx), self.k_idx_norm(k_idx)
            rd = min(c.rotary_dim, c.index_dim)
            if rd:
                q_idx = apply_rotary(q_idx, cos[..., : rd // 2], sin[..., : rd // 2])
                k_idx = apply_rotary(k_idx, cos[..., : rd // 2], sin[..., : rd // 2])
        return q_idx, k_idx

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x (B, T, hidden), positions int (B, T) -> q (B, T, H_q, D), k, v (B, T, H_kv, D) after RoPE,
        q_idx (B, T, H_kv, D_idx) and k_idx (B, T, D_idx) (None without an index branch)."""
        c = self.config
        b, t, _ = x.shape
        cos, sin = rotary_cos_sin(positions, c.rotary_dim, c.rope_theta, x.dtype)
        q = apply_rotary(self.q_proj(x).view(b, t, c.num_heads, c.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim)
        q_idx = k_idx = None
        if c.use_index:
            q_idx, k_idx = self._index_branch(x, cos, sin)
        return q, k, v, q_idx, k_idx

    def decode_step(self, x: torch.Tensor, cache: MSACache, layer_idx: int) -> torch.Tensor:
        """Device-side decode of t new tokens per sequence: the generation hot path.

        x: (B, t, hidden) in the cache dtype (B = cache.batch_size). Positions come from the device
        lengths (``cache.lengths_dev``), K/V/index keys are appended with ``cache.append_device`` and
        the attention runs the cache's memoised decode plan: no host sync, no validation of values,
        capturable in a CUDA graph. The caller validates once (``MSAForCausalLM.generate``); host
        lengths (``cache.seq_lens``) are stale until ``cache.sync_lengths()``.
        Returns the attention output (B, t, hidden) after o_proj.
        """
        c = self.config
        b, t, _ = x.shape
        pos = cache.lengths_dev[layer_idx].view(b, 1).to(torch.int64) + torch.arange(t, device=x.device).view(1, t)
        q, k, v, q_idx, k_idx = self.project(x, pos)
        cache.append_device(layer_idx, k, v, k_idx)
        o, _ = decode_attention_step(q, q_idx, cache, layer_idx, block_size=c.block_size, topk=c.topk_blocks,
                                     init_blocks=c.init_blocks, local_blocks=c.local_blocks,
                                     scale=c.head_dim ** -0.5, index_scale=c.index_dim ** -0.5,
                                     dense=self.mode != "sparse", backend=c.backend)
        return self.o_proj(o.reshape(b, t, c.num_heads * c.head_dim))

    def forward(self, x: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                cache: Optional[MSACache] = None, layer_idx: int = 0,
                compute_kl: Optional[bool] = None, kl_support: str = "selected") -> MSAOutput:
        c = self.config
        check(kl_support in KL_SUPPORTS, f"kl_support must be one of {KL_SUPPORTS}, got {kl_support!r}")
        check(x.dim() == 3 and x.shape[-1] == c.hidden_size,
              f"x must have shape (B, T, hidden_size={c.hidden_size}), got {tuple(x.shape)}")
        check_float("x", x)
        check(x.shape[1] > 0, "x must hold at least one token (T >= 1)")
        b, t, _ = x.shape
        # cu_seqlens' values are checked where a launcher copies them to the host (no extra sync)
        check_cu_seqlens(cu_seqlens, b, t, values=c.debug)
        check(cache is None or (isinstance(layer_idx, int) and 0 <= layer_idx < cache.num_layers),
              f"layer_idx must be in [0, {cache.num_layers if cache is not None else 0}) (the cache's layers), "
              f"got {layer_idx!r}")
        incremental = cache is not None and bool((cache.seq_lens(layer_idx) > 0).any())
        check(not (incremental and cu_seqlens is not None),
              "cu_seqlens is only supported for prefill into an empty cache; decode steps take (B, t) input")
        if incremental:
            pos = cache.seq_lens(layer_idx).to(x.device).view(b, 1) + torch.arange(t, device=x.device).view(1, t)
        else:
            pos = positions_in_sequence(t, cu_seqlens, x.device).view(1, t).expand(b, t)
        q, k, v, q_idx, k_idx = self.project(x, pos)
        scale = c.head_dim ** -0.5
        sparse = self.mode == "sparse"
        block_indices = kl = None
        if incremental:
            cache.append(layer_idx, k, v, k_idx)
            o, block_indices = decode_attention(
                q, q_idx, cache, layer_idx, block_size=c.block_size, topk=c.topk_blocks, init_blocks=c.init_blocks,
                local_blocks=c.local_blocks, scale=scale, index_scale=c.index_dim ** -0.5, dense=not sparse,
                backend=c.backend)
        else:
            if cache is not None:
                cache.append(layer_idx, k, v, k_idx, cu_seqlens=cu_seqlens)
            if compute_kl is None:
                compute_kl = self.training and torch.is_grad_enabled()
            o, kl, block_indices = msa_prefill_attention(
                q, k, v, q_idx, k_idx, sparse=sparse, compute_kl=compute_kl and c.use_index, block_size=c.block_size,
                topk_blocks=c.topk_blocks, init_blocks=c.init_blocks, local_blocks=c.local_blocks, scale=scale,
                index_scale=c.index_dim ** -0.5, cu_seqlens=cu_seqlens, backend=c.backend, debug=c.debug,
                fp8_index_scores=c.fp8_index_scores, kl_support=kl_support)
        out = self.o_proj(o.reshape(b, t, c.num_heads * c.head_dim))
        return MSAOutput(out, kl, block_indices)
