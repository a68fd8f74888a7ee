"""Dense causal GQA attention: the warmup phase's main branch and the baseline, optionally returning
the per-head log-sum-exp that the one-pass warmup KL takes as its teacher normaliser."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .common import positions_in_sequence, sequence_spans


def _lse_backend(q: torch.Tensor) -> str:
    """Which aten attention op returns the lse at SDPA speed on this device: cuDNN (fastest on H100/H200),
    flash, the CPU flash kernel, or the exact math fallback elsewhere."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        if torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(q.device)[0] >= 8:
            return "cudnn"
        if torch.backends.cuda.flash_sdp_enabled():
            return "flash"
    if q.device.type == "cpu":
        return "cpu"
    return "math"


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sequence batch (B, T, ...): o (B, T, H_q, D) differentiable, lse fp32 (B, T, H_q) detached."""
    bsz, t, hq, d = q.shape
    g = hq // k.shape[2]
    qt = q.transpose(1, 2)
    # the aten kernels that return the lse take H_q key/value heads: repeat each KV head G times
    kt = k.repeat_interleave(g, dim=2).transpose(1, 2) if g > 1 else k.transpose(1, 2)
    vt = v.repeat_interleave(g, dim=2).transpose(1, 2) if g > 1 else v.transpose(1, 2)
    which = _lse_backend(q)
    if which == "cudnn":
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, True, False,
                                                                    scale=scale)[:2]
    elif which == "flash":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, True, False, scale=scale)[:2]
    elif which == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, True, scale=scale)
    else:
        s = (qt.float() @ kt.float().transpose(-1, -2)) * scale
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        o = (torch.softmax(s, dim=-1) @ vt.float()).to(q.dtype)
    # cuDNN returns (B, H, T, 1), flash (B, H, T): normalise to (B, T, H_q)
    lse = lse.detach().reshape(bsz, hq, -1)[..., :t].transpose(1, 2).float()
    return o.transpose(1, 2), lse


def _packed_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (B == 1) without a host copy of cu_seqlens (so it traces under torch.compile):
    FlashAttention's varlen kernel on CUDA (max length bounded by T), else the CPU flash kernel or the
    math path with a block-diagonal causal mask (O(T^2) memory: small inputs only)."""
    _, t, hq, d = q.shape
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if _lse_backend(q) in ("cudnn", "flash"):
        o, lse = torch.ops.aten._flash_attention_forward(q[0], k[0], v[0], cu, cu, t, t, 0.0, True, False,
                                                         scale=scale)[:2]
        if lse.dim() == 2:  # unpadded (H_q, T)
            lse = lse.transpose(0, 1)
        else:  # padded (S, H_q, max_len): pick each token's row
            pos = positions_in_sequence(t, cu, q.device)
            seq = torch.searchsorted(cu[1:].long(), torch.arange(t, device=q.device), right=True)
            lse = lse[seq, :, pos]
        return o.unsqueeze(0), lse.detach().float().unsqueeze(0)
    g = hq // k.shape[2]
    idx = torch.arange(t, device=q.device)
    seq = torch.searchsorted(cu[1:].long(), idx, right=True)
    mask = (seq.view(-1, 1) == seq.view(1, -1)) & (idx.view(1, -1) <= idx.view(-1, 1))
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(g, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(g, dim=2).transpose(1, 2)
    if q.device.type == "cpu":
        bias = torch.zeros(t, t, dtype=q.dtype).masked_fill(~mask, float("-inf"))  # additive, q's dtype
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=bias,
                                                                            scale=scale)
    else:
        sc = (qt.float() @ kt.float().transpose(-1, -2)) * scale
        sc = sc.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)
        o = (torch.softmax(sc, dim=-1) @ vt.float()).to(q.dtype)
    return o.transpose(1, 2), lse.detach().float().transpose(1, 2)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                           cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False
                           ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Full causal softmax attention per sequence (packed sequences never see each other).

    Args:
        q: (B, T, H_q, D); k, v: (B, T, H_kv, D), H_q a multiple of H_kv, one float dtype.
        scale: softmax scale. cu_seqlens: optional int32 (S+1,) packed-sequence offsets (B == 1).
        return_lse: also return the natural-log lse of every (token, head), fp32 (B, T, H_q), detached
            (through cuDNN / flash attention on CUDA, the CPU flash kernel on the CPU).

    Returns:
        o (B, T, H_q, D) in q.dtype, differentiable; and lse when return_lse.

    Equivalent PyTorch (one sequence)::

        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    """
    bsz, t = q.shape[:2]
    if cu_seqlens is not None and return_lse:
        return _packed_attention_with_lse(q, k, v, scale, cu_seqlens)
    if cu_seqlens is not None:
        pieces = [dense_causal_attention(q[:, s:e], k[:, s:e], v[:, s:e], scale=scale)
                  for _, s, e in sequence_spans(bsz, t, cu_seqlens)]
        return torch.cat(pieces, dim=1)
    if return_lse:
        return _attention_with_lse(q, k, v, scale)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)
