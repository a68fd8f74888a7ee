"""Data-parallel training helpers: DDP / FSDP2 wrapping with bf16 mixed precision, the optimizer with
the index parameters in their own group, DTensor-aware gradient clipping, and one training step.

Intended use (under ``torchrun``; the process group is initialised by the caller)::

    model = MSAForCausalLM(cfg).to(device)
    model = wrap_model(model, strategy="fsdp2", mixed_precision="bf16")
    opt = build_optimizer(model, lr=3e-4)
    for step in ...:
        ids = batch_for_rank(...)                       # msa.parallel.data
        stats = training_step(model, opt, ids, grad_clip=1.0)

Every helper takes the wrapped module (DDP, FSDP2 or a plain module for one process); the model must
be called through the wrapper (``model(ids)``), never ``model.module.loss`` / ``model.forward``,
because DDP and FSDP2 hook their communication into ``__call__``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..ops.common import check

STRATEGIES = ("ddp", "fsdp2", "none")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, None: None}
_AUTOCAST_ATTR = "_msa_autocast_dtype"


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_index_parameter(name: str) -> bool:
    """The index-branch projections (and their norms) of MSA layers: trained only by the KL loss."""
    return ".q_idx_" in name or ".k_idx_" in name or name.startswith(("q_idx_", "k_idx_"))


def split_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(backbone, index) trainable parameters of a plain, DDP or FSDP2 model, by name."""
    backbone, index = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (index if is_index_parameter(name) else backbone).append(p)
    return backbone, index


def wrap_model(model: nn.Module, strategy: str = "ddp", mixed_precision: Optional[str] = "bf16", *,
               mesh=None, process_group=None, reshard_after_forward: bool = True,
               shard_modules: Optional[Iterable[nn.Module]] = None,
               find_unused_parameters: bool = False) -> nn.Module:
    """Wrap a model for data-parallel training with torch's own engines.

    Args:
        model: the module, already on this rank's device (its parameters fp32).
        strategy: "ddp" (``DistributedDataParallel``), "fsdp2" (``torch.distributed.fsdp.fully_shard``:
            every module of ``shard_modules`` is one FSDP unit, then the root), or "none" (one process).
        mixed_precision: "bf16", "fp16", "fp32" or None. FSDP2: ``MixedPrecisionPolicy(param_dtype=...,
            reduce_dtype=fp32)`` (compute in 16 bits, gradients reduced and kept in fp32). DDP and
            "none": the forward runs under ``torch.autocast`` (see ``autocast_context``); parameters,
            gradients and their all-reduce stay fp32.
        mesh: FSDP2 device mesh (default: a 1-D mesh over all ranks on the model's device type).
        process_group: DDP process group (default: the world).
        reshard_after_forward: FSDP2: free the unsharded parameters after the forward (ZeRO-3) or keep
            them until the backward (ZeRO-2, more memory, fewer all-gathers).
        shard_modules: FSDP2 units; default every element of ``model.layers`` when the model has one.
        find_unused_parameters: DDP: let some parameters receive no gradient in a step (e.g. the index
            projections of a run without the KL loss); costs a graph traversal per step.

    Returns:
        The wrapped module. Call it like the model; pass it to ``build_optimizer``, ``training_step``,
        ``clip_grad_norms`` and ``msa.parallel.checkpoint``.
    """
    check(strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check(mixed_precision in PRECISIONS, f"mixed_precision must be one of {tuple(PRECISIONS)}, got {mixed_precision!r}")
    dtype = PRECISIONS[mixed_precision]
    params = list(model.parameters())
    check(len(params) > 0, "model has no parameters")
    device = params[0].device
    if strategy != "none":
        check(dist.is_available() and dist.is_initialized(),
              f"strategy={strategy!r} needs an initialized process group (torchrun + init_process_group)")
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=process_group,
                                                      find_unused_parameters=find_unused_parameters)
        setattr(wrapped, _AUTOCAST_ATTR, dtype)
        return wrapped
    if strategy == "none":
        setattr(model, _AUTOCAST_ATTR, dtype)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None \
        else MixedPrecisionPolicy()
    if shard_modules is None:
        layers = getattr(model, "layers", None)
        shard_modules = list(layers) if isinstance(layers, nn.ModuleList) else []
    for m in shard_modules:
        fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    setattr(model, _AUTOCAST_ATTR, None)  # FSDP2 casts the parameters itself
    return model


def autocast_context(model: nn.Module, device_type: str):
    """torch.autocast for DDP / single-process bf16 or fp16 (set by ``wrap_model``); a no-op otherwise."""
    dtype = getattr(model, _AUTOCAST_ATTR, None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def build_optimizer(model: nn.Module, *, lr: float = 3e-4, index_lr: Optional[float] = None,
                    weight_decay: float = 0.1, betas: Tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with two named parameter groups: "backbone" (lr, weight_decay) and "index" (the index
    projections: index_lr, default lr, no weight decay). Build it AFTER ``wrap_model`` (FSDP2 replaces
    the parameters by DTensors)."""
    backbone, index = split_parameters(model)
    groups = [{"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay}]
    if index:
        groups.append({"name": "index", "params": index, "lr": lr if index_lr is None else index_lr,
                       "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of ``parameters`` (plain tensors or FSDP2 DTensors) to a total norm of max_norm.

    Returns the fp32 total norm before clipping as a plain 0-dim tensor, identical on every rank (for
    DTensor gradients the per-shard norms are reduced over the mesh first)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    try:
        from torch.distributed.tensor import DTensor
        if isinstance(total, DTensor):
            total = total.full_tensor()
    except ImportError:  # pragma: no cover - torch without DTensor
        pass
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.float()


def clip_grad_norms(model: nn.Module, max_norm: float) -> Dict[str, float]:
    """Clip the backbone and the index parameters separately (the KL and the LM loss train disjoint
    parameter sets, so one group's large gradient must not shrink the other's). Returns both norms."""
    backbone, index = split_parameters(model)
    out = {"grad_norm": float(clip_grad_norm_(backbone, max_norm))}
    if index:
        out["index_grad_norm"] = float(clip_grad_norm_(index, max_norm))
    return out


def lm_loss(model: nn.Module, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
            kl_weight: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """L = L_LM + kl_weight * sum of layer KLs, calling the model THROUGH its wrapper.

    Args:
        model: a wrapped ``MSAForCausalLM`` (or any module returning ``.logits`` (B, T, V) and ``.kl_loss``).
        input_ids: int64 (B, T), or (1, T) packed with cu_seqlens (int32 (S+1,)); targets never cross
            a sequence boundary.
        kl_weight: default the model config's kl_weight.

    Returns:
        {"loss", "lm_loss", "kl_loss"}: fp32 scalars (the token mean over this rank's batch).
    """
    if kl_weight is None:
        kl_weight = unwrap(model).config.kl_weight
    out = model(input_ids, cu_seqlens=cu_seqlens, compute_kl=True)
    logits, targets = out.logits[:, :-1].float(), input_ids[:, 1:].clone()
    if cu_seqlens is not None:
        targets[0, cu_seqlens[1:-1].to(torch.int64) - 1] = -100  # a sequence's last token predicts nothing
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    kl = out.kl_loss.float() if out.kl_loss is not None else lm.new_zeros(())
    return {"loss": lm + kl_weight * kl, "lm_loss": lm, "kl_loss": kl}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, *,
                  cu_seqlens: Optional[torch.Tensor] = None, grad_clip: Optional[float] = 1.0) -> Dict[str, float]:
    """One optimizer step of a wrapped model on this rank's batch; gradients are averaged over the
    data-parallel ranks by DDP / FSDP2 in the backward.

    Args:
        model: from ``wrap_model``. optimizer: from ``build_optimizer``.
        input_ids: int64 (B, T) this rank's batch (or (1, T) packed with cu_seqlens).
        grad_clip: max norm of each parameter group (backbone, index) separately; None/0: no clipping.

    Returns:
        Float stats of this rank: loss, lm_loss, kl_loss, and grad_norm / index_grad_norm (global
        norms of the averaged gradients, before clipping) when clipping.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(model, input_ids.device.type):
        losses = lm_loss(model, input_ids, cu_seqlens=cu_seqlens)
    losses["loss"].backward()
    stats = {k: float(v.detach()) for k, v in losses.items()}
    if grad_clip:
        stats.update(clip_grad_norms(model, grad_clip))
    optimizer.step()
    return stats


def mean_over_ranks(stats: Dict[str, float], group=None) -> Dict[str, float]:
    """The mean of every stat over the ranks (for logging; one small all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(stats)
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    t = t.cpu() / dist.get_world_size(group)
    return dict(zip(keys, t.tolist()))
