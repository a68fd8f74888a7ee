"""The attention forward that ``msa.hf.to_msa`` installs on each attention module of a transformers model.

It keeps the model's own projections, QK-norms (Qwen3, MiniMax-M3) and rotary embedding (the ``cos, sin`` the
model computes), adds the index branch, and runs attention through msa's ops:

- prefill / training: ``msa.select_blocks`` + ``msa.sparse_attention`` (sparse mode) or dense causal attention
  (dense mode, and the layers kept dense), over each sequence separately: padded rows and packed documents
  (restarting ``position_ids``) become msa's packed ``cu_seqlens`` layout, so every sequence's key blocks start
  at its own first token;
- training: ``msa.indexer_kl_loss`` (teacher from detached q, k; student from the index branch, which reads the
  detached hidden state), kept on the module for ``msa.hf.kl_loss``;
- generation: K, V and index keys go to an ``MSAHFCache``; new tokens use ``msa.decode_attention`` (Triton
  kernels on CUDA, the PyTorch reference on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from ..layers.attention import msa_prefill_attention
from ..ops.common import check
from .cache import MSAHFCache

MODES = ("dense", "sparse")


@dataclass
class MSASettings:
    """The MSA settings of a converted model (one object shared by its layers).

    kind: "converted" (index branch added by ``to_msa``) or "minimax_m3" (the model's own indexer).
    block_size, topk_blocks, init_blocks, local_blocks: the selection (B_k, k, forced leading / trailing blocks).
    index_dim / num_index_heads: D_idx and index query heads (one per KV group). index_norm_rope: RMSNorm (1 + w)
    and the model's partial RoPE on q_idx and k_idx. index_scale: index score scale (None = D_idx ** -0.5;
    MiniMax-M3 scores are unscaled, 1.0). sparse_layers: indices of the layers with an index branch.
    mode: "dense" or "sparse". num_layers, num_kv_heads, head_dim: the model's attention shape.
    """

    kind: str
    block_size: int
    topk_blocks: int
    index_dim: int
    num_index_heads: int
    init_blocks: int
    local_blocks: int
    index_norm_rope: bool
    index_scale: Optional[float]
    sparse_layers: List[int]
    mode: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass
class _Layout:
    """How the (B, T) tokens of one forward map onto msa's sequences.

    index: int64 (N,) flat positions (in B * T) of the real tokens, None when every row is one whole sequence.
    cu_seqlens: int32 (S + 1,) of the packed real tokens (None with index None). one_per_row: each row holds
    exactly one sequence (required to prefill a cache)."""

    index: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    one_per_row: bool


@dataclass
class _Shared:
    """Per-model memo: the layout is computed once per forward (all layers get the same mask / position tensors)."""

    key: Tuple[Any, ...] = ()
    refs: Tuple[Any, ...] = ()
    layout: Optional[_Layout] = None
    checked: Any = None

    def get(self, mask, position_ids, bsz, t, device) -> _Layout:
        key = (bsz, t, str(device))
        if self.layout is not None and key == self.key and len(self.refs) == 2 and self.refs[0] is mask \
                and self.refs[1] is position_ids:
            return self.layout
        self.layout = _make_layout(mask, position_ids, bsz, t, device)
        self.key, self.refs = key, (mask, position_ids)
        return self.layout

    def clear(self) -> None:
        self.key, self.refs, self.layout, self.checked = (), (), None, None

    def check_appended(self, mask, t: int) -> None:
        """Tokens appended to a cache must be real tokens (checked once per forward: one host sync)."""
        if mask is None or self.checked is mask:
            return
        check(bool(mask[:, -t:].all()), "tokens appended to a cache must not be padding "
                                        "(attention_mask may hold zeros only in the prompt)")
        self.checked = mask


@dataclass
class _LayerState:
    settings: MSASettings
    layer_idx: int
    sparse: bool
    shared: _Shared
    kl: Optional[torch.Tensor] = field(default=None, repr=False)


def _make_layout(mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], bsz: int, t: int,
                 device) -> _Layout:
    valid = None
    if mask is not None:
        check(mask.dim() == 2 and mask.shape[0] == bsz and mask.shape[1] >= t,
              f"attention_mask must be a 2D (batch, tokens) padding mask, got shape {tuple(mask.shape)}")
        valid = mask[:, -t:].to(device=device, dtype=torch.bool)
        if bool(valid.all()):
            valid = None
    pos = None
    if position_ids is not None:
        check(position_ids.dim() == 2 and position_ids.shape[-1] == t,
              f"position_ids must have shape (batch, {t}), got {tuple(position_ids.shape)}")
        pos = position_ids.to(device).expand(bsz, t)
    if valid is None:
        if pos is None or t == 1:
            return _Layout(None, None, True)
        restarts = pos[:, 1:] != pos[:, :-1] + 1
        if not bool(restarts.any()):
            return _Layout(None, None, True)
        index = torch.arange(bsz * t, device=device)
    else:
        index = valid.reshape(-1).nonzero().squeeze(1)
    check(index.numel() > 0, "attention_mask masks every token of the batch")
    row = index // t
    new = torch.ones_like(index, dtype=torch.bool)
    if index.numel() > 1:
        new[1:] = row[1:] != row[:-1]
        if pos is not None:
            pv = pos.reshape(-1)[index]
            new[1:] |= pv[1:] != pv[:-1] + 1
    starts = new.nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([index.numel()])]).to(torch.int32)
    one_per_row = starts.numel() == bsz and bool((row[starts] == torch.arange(bsz, device=device)).all())
    return _Layout(index, cu, one_per_row)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half RoPE on the first cos.shape[-1] dims of x (B, T, [H,] D); cos, sin (B|1, T, rd)."""
    rd = cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if rd == x.shape[-1]:
        return (x * cos) + (_rotate_half(x) * sin)
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat([(xr * cos) + (_rotate_half(xr) * sin), xp], dim=-1)


def index_branch(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """hidden (B, T, hidden) -> q_idx (B, T, H_kv, D_idx), k_idx (B, T, D_idx) from the DETACHED hidden state
    (stop-gradient: the KL trains only the index projections)."""
    s: MSASettings = module._msa.settings
    b, t, _ = hidden.shape
    xd = hidden.detach()
    if s.kind == "minimax_m3":
        ix = module.indexer
        q_idx = ix.q_norm(ix.q_proj(xd).view(b, t, -1, s.index_dim))
        k_idx = ix.k_norm(ix.k_proj(xd).view(b, t, s.index_dim))
        # MiniMax-M3's definition: the model's cos / sin cut to the index head dim
        c, sn = cos[..., : s.index_dim], sin[..., : s.index_dim]
        return _rope(q_idx, c, sn), _rope(k_idx, c, sn)
    q_idx = module.q_idx_proj(xd).view(b, t, s.num_index_heads, s.index_dim)
    k_idx = module.k_idx_proj(xd).view(b, t, s.index_dim)
    if s.index_norm_rope:
        q_idx, k_idx = module.q_idx_norm(q_idx), module.k_idx_norm(k_idx)
        half = cos.shape[-1] // 2
        r = min(half, s.index_dim // 2)
        if r:
            c = torch.cat([cos[..., :r], cos[..., :r]], dim=-1)
            sn = torch.cat([sin[..., :r], sin[..., :r]], dim=-1)
            q_idx, k_idx = _rope(q_idx, c, sn), _rope(k_idx, c, sn)
    return q_idx, k_idx


def _index_scale(s: MSASettings) -> float:
    return s.index_dim ** -0.5 if s.index_scale is None else s.index_scale


def msa_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                          cache=None, **kwargs):
    """Replacement forward of a transformers attention module (bound by ``to_msa``).

    hidden_states: (B, T, hidden); position_embeddings: the model's (cos, sin), each (B|1, T, rotary_dim);
    attention_mask: None or the 2D (B, slots) padding mask (msa's mask function passes it through);
    cache: None or an ``MSAHFCache``; kwargs: position_ids (B|1, T) and transformers' extras.
    Returns (output (B, T, hidden), None)."""
    st: _LayerState = self._msa
    s = st.settings
    if cache is None:
        cache = kwargs.get("past_key_values")
    check(cache is None or isinstance(cache, MSAHFCache),
          f"msa attention needs an msa.hf.MSAHFCache (generate() and forward(use_cache=True) make one), "
          f"got {type(cache).__name__}")
    check(position_embeddings is not None, "msa attention needs the model's position_embeddings (cos, sin)")
    bsz, t, _ = hidden_states.shape
    d = self.head_dim
    q = self.q_proj(hidden_states).view(bsz, t, -1, d)
    k = self.k_proj(hidden_states).view(bsz, t, -1, d)
    v = self.v_proj(hidden_states).view(bsz, t, -1, d)
    if getattr(self, "q_norm", None) is not None:
        q = self.q_norm(q)
    if getattr(self, "k_norm", None) is not None:
        k = self.k_norm(k)
    cos, sin = position_embeddings
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    q_idx = k_idx = None
    if st.sparse:
        q_idx, k_idx = index_branch(self, hidden_states, cos, sin)
    sparse = st.sparse and s.mode == "sparse"
    scale, iscale = self.scaling, _index_scale(s)
    sel = dict(block_size=s.block_size, topk=s.topk_blocks, init_blocks=s.init_blocks, local_blocks=s.local_blocks)
    st.kl = None

    if cache is not None and not cache.is_empty(st.layer_idx):
        # decode / continuation: t new tokens per sequence after everything stored
        st.shared.check_appended(attention_mask, t)
        cache.append(st.layer_idx, k, v, k_idx, batch=bsz, slots=t)
        o = cache.decode(st.layer_idx, q, q_idx if sparse else None, scale=scale, index_scale=iscale,
                         dense=not sparse, **sel)
        return self.o_proj(o.reshape(bsz, t, -1)), None

    layout = st.shared.get(attention_mask, kwargs.get("position_ids"), bsz, t, hidden_states.device)
    cu = layout.cu_seqlens
    if layout.index is not None:
        def pack(x):
            return None if x is None else x.reshape(bsz * t, *x.shape[2:])[layout.index].unsqueeze(0)
        qp, kp, vp, qip, kip = (pack(x) for x in (q, k, v, q_idx, k_idx))
    else:
        qp, kp, vp, qip, kip = q, k, v, q_idx, k_idx
    # the same step as msa's own layer: one selection and plan shared by attention, backward and KL
    o, st.kl, _ = msa_prefill_attention(qp, kp, vp, qip, kip, sparse=sparse,
                                        compute_kl=st.sparse and self.training and torch.is_grad_enabled(),
                                        scale=scale, index_scale=iscale, cu_seqlens=cu, topk_blocks=s.topk_blocks,
                                        block_size=s.block_size, init_blocks=s.init_blocks,
                                        local_blocks=s.local_blocks)
    if cache is not None:
        if layout.index is None:
            cache.append(st.layer_idx, k, v, k_idx, batch=bsz, slots=t)
        else:
            check(layout.one_per_row, "a cache holds one sequence per batch row: packed documents (restarting "
                                      "position_ids) cannot be prefilled into a cache")
            cache.append(st.layer_idx, kp, vp, kip, batch=bsz, slots=t, cu_seqlens=cu)
    if layout.index is not None:
        full = o.new_zeros(bsz * t, *o.shape[2:])
        full = full.index_copy(0, layout.index, o[0])
        o = full.view(bsz, t, *o.shape[2:])
    return self.o_proj(o.reshape(bsz, t, -1)), None


def msa_mask(batch_size=None, q_length=None, kv_length=None, attention_mask=None, **kwargs):
    """transformers mask function of attn_implementation "msa": msa masks by itself (causality, blocks, packed
    sequences), so the model hands its layers the 2D padding mask (or None) unchanged."""
    return attention_mask


def msa_attention_interface(module, query, key, value, attention_mask, **kwargs):
    """Registered as attn_implementation "msa" so the name is valid; msa's layers never call it."""
    raise ValueError("attn_implementation 'msa' is driven by msa.hf.to_msa's attention layers; an attention module "
                     "not converted by to_msa cannot use it")


def register() -> None:
    """Register attn_implementation "msa" (attention and mask functions) with transformers, once."""
    from transformers import AttentionInterface, AttentionMaskInterface
    if "msa" not in AttentionInterface._global_mapping:
        AttentionInterface.register("msa", msa_attention_interface)
    if "msa" not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register("msa", msa_mask)

