"""Multi-process MSA: context parallelism (one sequence over several ranks) and DDP / FSDP2 helpers
for training (wrapping, optimizer groups, DTensor-aware clipping, resharding checkpoints, data
sharding). Everything runs on any torch.distributed backend (gloo on the CPU, NCCL on GPUs).

Data-parallel training loop under ``torchrun`` (what ``msa train`` needs)::

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap_model(MSAForCausalLM(cfg).to(device), strategy="fsdp2", mixed_precision="bf16")
    opt = build_optimizer(model, lr=lr, index_lr=index_lr)          # groups "backbone" and "index"
    sampler = ShardedSampler(num_windows(len(tokens), T), global_batch, rank, world, seed=seed)
    start = load_checkpoint(ckpt, model, opt).get("step", 0) if resume else 0   # any world size
    for step in range(start, steps):
        ids = token_windows(tokens, sampler.indices(step), T).to(device)        # (local_batch, T + 1)
        stats = training_step(model, opt, ids, grad_clip=1.0)
        stats = mean_over_ranks(stats)                                          # for logging on rank 0
        if step % every == 0: save_checkpoint(ckpt, model, opt, train_state={"step": step + 1})

(``training_step`` computes next-token targets inside the window it is given, like
``MSAForCausalLM.loss``.) The model must be called through the wrapper: use ``lm_loss`` /
``training_step`` from here, not ``model.module.loss``. Mode switches (``set_mode("sparse")``) go
to ``unwrap(model)``; under FSDP2 the module is sharded in place and ``set_mode`` works on it directly.

Context parallelism: ``context_parallel_msa_attention`` (the op level), ``context_parallel_layer_forward``
(an ``MSAAttention`` layer) and ``enable_context_parallel`` + ``cp_split_batch`` + ``cp_training_step``
(a whole ``MSAForCausalLM`` on one long sequence split over the group); see ``context.py`` for the
algorithm and its costs.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .context import (CPAttentionOutput, ZigzagLayout, context_parallel_layer_forward,
                      context_parallel_msa_attention, gather_sequence,
                      zigzag_positions, zigzag_shard)
from .cp_training import (allreduce_gradients, cp_lm_loss, cp_split_batch, cp_training_step,
                          disable_context_parallel, enable_context_parallel)
from .data import ShardedSampler, num_windows, token_windows
from .training import (autocast_context, build_optimizer, clip_grad_norm_, clip_grad_norms, lm_loss,
                       mean_over_ranks, split_parameters, training_step, unwrap, wrap_model)

__all__ = ["CPAttentionOutput", "ZigzagLayout", "context_parallel_msa_attention", "context_parallel_layer_forward",
           "gather_sequence",
           "zigzag_positions", "zigzag_shard", "save_checkpoint", "load_checkpoint", "ShardedSampler",
           "token_windows", "num_windows", "wrap_model", "unwrap", "autocast_context", "build_optimizer",
           "split_parameters", "clip_grad_norm_", "clip_grad_norms", "lm_loss", "training_step",
           "mean_over_ranks", "enable_context_parallel", "disable_context_parallel", "cp_split_batch",
           "cp_lm_loss", "cp_training_step", "allreduce_gradients"]
