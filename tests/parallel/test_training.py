"""DDP / FSDP2 helpers on 2 gloo ranks: a wrapped step equals the single-process step on the whole
global batch (loss, per-group clipped gradient norms, parameters after two AdamW steps); the index
parameters form their own optimizer group; FSDP2 bf16 computes in bf16 and stays close to fp32."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from msa.layers import MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig
from msa.parallel import (ShardedSampler, autocast_context, build_optimizer, clip_grad_norms, lm_loss, split_parameters,
                          training_step, wrap_model)
from tests.parallel.dist_utils import run_ranks

T, GB = 24, 4


def tiny_model(seed=0):
    torch.manual_seed(seed)
    att = MSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, index_dim=8, block_size=4,
                    topk_blocks=2, mode="sparse", backend="reference")
    return MSAForCausalLM(MSALMConfig(vocab_size=32, num_layers=2, intermediate_size=48, attention=att,
                                      num_dense_layers=1))


def global_data():
    return torch.randint(0, 32, (2 * GB, T), generator=torch.Generator().manual_seed(7))


def full_params(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def reference_steps(data, sampler_world, clip):
    """Single process on the global batch; each rank's loss averaged like DDP averages gradients."""
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-2, index_lr=2e-2)
    norms, losses = [], []
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r in range(sampler_world):
            ids = data[ShardedSampler(2 * GB, GB, r, sampler_world, seed=3).indices(step)]
            loss = lm_loss(model, ids)["loss"] / sampler_world
            loss.backward()
            total += float(loss)
        losses.append(total)
        norms.append(clip_grad_norms(model, clip))
        opt.step()
    return full_params(model), norms, losses


def _worker(rank, world):
    data = global_data()
    clip = 1e-3  # small enough that both groups are clipped
    ref_params, ref_norms, ref_losses = reference_steps(data, world, clip)
    for strategy in ("ddp", "fsdp2"):
        model = wrap_model(tiny_model(), strategy, mixed_precision=None)
        opt = build_optimizer(model, lr=1e-2, index_lr=2e-2)
        names = [g["name"] for g in opt.param_groups]
        assert names == ["backbone", "index"], names
        backbone, index = split_parameters(model)
        assert len(index) == 2 and opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["lr"] == 2e-2
        assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in index}
        sampler = ShardedSampler(2 * GB, GB, rank, world, seed=3)
        for step in range(2):
            stats = training_step(model, opt, data[sampler.indices(step)], grad_clip=clip)
            t = torch.tensor([stats["loss"]], dtype=torch.float64)
            dist.all_reduce(t)
            assert abs(float(t) / world - ref_losses[step]) < 1e-5, (strategy, step, float(t) / world, ref_losses[step])
            for key in ("grad_norm", "index_grad_norm"):
                assert ref_norms[step][key] > clip
                assert abs(stats[key] - ref_norms[step][key]) < 1e-5 * ref_norms[step][key], (strategy, key)
        got = full_params(model)
        prefix = "module." if strategy == "ddp" else ""
        for n, p in ref_params.items():
            torch.testing.assert_close(got[prefix + n], p, rtol=1e-4, atol=1e-6, msg=lambda m: f"{strategy} {n}: {m}")
    # FSDP2 bf16: compute in bf16, loss close to fp32
    seen = []
    model = wrap_model(tiny_model(), "fsdp2", mixed_precision="bf16")
    h = model.layers[1].attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    ids = data[ShardedSampler(2 * GB, GB, rank, world, seed=3).indices(0)]
    bf = float(lm_loss(model, ids)["loss"])
    h.remove()
    fp = float(lm_loss(tiny_model(), ids)["loss"])
    assert seen == [torch.bfloat16], seen
    assert abs(bf - fp) < 3e-2 and bf != fp, (bf, fp)
    # DDP bf16: fp32 parameters, the forward under autocast
    seen.clear()
    model = wrap_model(tiny_model(), "ddp", mixed_precision="bf16")
    h = model.module.layers[1].attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with autocast_context(model, "cpu"):
        bf = float(lm_loss(model, ids)["loss"])
    h.remove()
    assert seen == [torch.bfloat16] and model.module.layers[1].attn.q_proj.weight.dtype == torch.float32, seen
    assert abs(bf - fp) < 3e-2 and bf != fp, (bf, fp)


def test_ddp_fsdp2_match_single_process():
    run_ranks(2, _worker)


def test_wrap_model_errors():
    with pytest.raises(ValueError, match="strategy must be one of"):
        wrap_model(tiny_model(), "zero3")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        wrap_model(tiny_model(), "none", mixed_precision="int8")
    with pytest.raises(ValueError, match="needs an initialized process group"):
        wrap_model(tiny_model(), "ddp")
