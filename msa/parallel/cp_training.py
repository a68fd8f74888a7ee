"""Training an ``MSAForCausalLM`` with context parallelism: every rank of a group holds a zigzag shard
of the same (packed) token sequences; the attention layers exchange keys through
``context_parallel_layer_forward``; everything else in the model is token-local.

    enable_context_parallel(model, group)              # once; parameter names are unchanged
    inputs, labels = cp_split_batch(ids, rank, world, cu_seqlens)
    stats = cp_training_step(model, opt, inputs, labels, cu_seqlens=cu_seqlens, group=group)

Parameters are replicated over the group (a plain module: no DDP / FSDP2 inside the CP group); each
rank's backward yields the gradient share of its own tokens and ``cp_training_step`` sums the shares
over the group, so every rank takes the same optimizer step as one process on the whole sequence.
"""

from __future__ import annotations

import types
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..ops.common import check, check_cu_seqlens
from .context import _SumOverGroup, context_parallel_layer_forward, zigzag_shard
from .training import clip_grad_norms

_CP_ATTR = "_msa_cp_group"


def _cp_attention_forward(self, x, *, cu_seqlens=None, cache=None, layer_idx=0, compute_kl=None, kl_support="selected"):
    check(cache is None, "context-parallel attention layers do not support a KV cache (training / prefill only)")
    check(kl_support == "selected", f"context-parallel attention layers support kl_support='selected' only (the "
                                    f"full-support KL needs every key on every rank), got {kl_support!r}")
    return context_parallel_layer_forward(self, x, getattr(self, _CP_ATTR), cu_seqlens=cu_seqlens,
                                          compute_kl=compute_kl)


def enable_context_parallel(model: nn.Module, group=None) -> nn.Module:
    """Make every ``MSAAttention`` of ``model`` run context-parallel over ``group`` (None: the world).

    The layers' forward is replaced on the instances (modules and parameter names are unchanged, so
    checkpoints stay compatible); afterwards ``model(input_ids_shard, cu_seqlens=global_cu)`` takes
    this rank's zigzag shard of the tokens and the GLOBAL cu_seqlens. Returns the model.
    """
    from ..layers.attention import MSAAttention
    check(dist.is_available() and dist.is_initialized(), "enable_context_parallel needs an initialized process group")
    found = 0
    for m in model.modules():
        if isinstance(m, MSAAttention):
            setattr(m, _CP_ATTR, group)
            m.forward = types.MethodType(_cp_attention_forward, m)
            found += 1
    check(found > 0, "model holds no MSAAttention layer")
    return model


def disable_context_parallel(model: nn.Module) -> nn.Module:
    """Undo ``enable_context_parallel`` (the layers run single-process again)."""
    for m in model.modules():
        if hasattr(m, _CP_ATTR):
            delattr(m, _CP_ATTR)
            del m.forward
    return model


def cp_split_batch(input_ids: torch.Tensor, rank: int, world_size: int,
                   cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's zigzag shard of a batch and of its next-token labels.

    Args:
        input_ids: int64 (B, T) global tokens ((1, T) packed with cu_seqlens).
        rank, world_size: position in the context-parallel group.
        cu_seqlens: optional int32 (S+1,) offsets of the packed sequences.

    Returns:
        inputs, labels: int64 (B, n) zigzag shards. labels[i] is the token after i in its sequence, -100
        for the last token of every sequence (and of the window): the targets of ``msa.parallel.lm_loss``.
    """
    check(input_ids.dim() == 2, f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    check_cu_seqlens(cu_seqlens, input_ids.shape[0], input_ids.shape[1])
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if cu_seqlens is not None:
        labels[0, cu_seqlens[1:].to(torch.int64) - 1] = -100
    return zigzag_shard(input_ids, rank, world_size), zigzag_shard(labels, rank, world_size)


def cp_lm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
               cu_seqlens: Optional[torch.Tensor] = None, group=None,
               kl_weight: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """L = L_LM + kl_weight * sum of layer KLs of the WHOLE sequence, on every rank of the group.

    Args:
        model: an ``MSAForCausalLM`` after ``enable_context_parallel``.
        inputs, labels: int64 (B, n) from ``cp_split_batch``. cu_seqlens: the global int32 (S+1,) or None.
        kl_weight: default the model config's kl_weight.

    Returns:
        {"loss", "lm_loss", "kl_loss"}: fp32 scalars equal on all ranks (the global token mean). Their
        backward gives each rank the gradient share of its own tokens (sum the shares over the group).
    """
    if kl_weight is None:
        kl_weight = model.config.kl_weight
    out = model(inputs, cu_seqlens=cu_seqlens, compute_kl=True)
    logits = out.logits.float()
    lm_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                             reduction="sum")
    count = (labels != -100).sum().to(torch.float64)
    dist.all_reduce(count, group=group)
    lm = _SumOverGroup.apply(lm_sum / count.to(lm_sum.dtype).clamp_min(1), group)
    kl = out.kl_loss.float() if out.kl_loss is not None else lm.new_zeros(())
    return {"loss": lm + kl_weight * kl, "lm_loss": lm, "kl_loss": kl}


def allreduce_gradients(model: nn.Module, group=None) -> None:
    """Sum every parameter gradient over the group (one flat all-reduce)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def cp_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                     labels: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None, group=None,
                     grad_clip: Optional[float] = 1.0,
                     autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """One optimizer step of a context-parallel model (see the module docstring).

    Args:
        model: ``MSAForCausalLM`` after ``enable_context_parallel``, replicated on the group.
        optimizer: e.g. ``msa.parallel.build_optimizer(model)``.
        inputs, labels: int64 (B, n) from ``cp_split_batch``. cu_seqlens: global int32 (S+1,) or None.
        grad_clip: max norm of the backbone and of the index parameters, separately; None/0: none.
        autocast_dtype: torch.bfloat16 / torch.float16 runs the forward under autocast.

    Returns:
        Float stats (global values, equal on all ranks): loss, lm_loss, kl_loss, grad norms when clipping.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(inputs.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        losses = cp_lm_loss(model, inputs, labels, cu_seqlens=cu_seqlens, group=group)
    losses["loss"].backward()
    allreduce_gradients(model, group)
    stats = {k: float(v.detach()) for k, v in losses.items()}
    if grad_clip:
        stats.update(clip_grad_norms(model, grad_clip))
    optimizer.step()
    return stats
