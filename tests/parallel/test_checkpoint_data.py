"""DCP checkpoints resume on a different number of ranks (save with 2 FSDP2 ranks, load with 4 FSDP2
ranks, with 2 DDP ranks and in one plain process): parameters, AdamW moments and the next step equal
the uninterrupted run. And the data sampler shards without overlap, resumably across world sizes."""

from __future__ import annotations

import os

import pytest
import torch

from msa.parallel import (ShardedSampler, build_optimizer, load_checkpoint, save_checkpoint, token_windows,
                          training_step, wrap_model)
from tests.parallel.dist_utils import run_ranks
from tests.parallel.test_training import GB, full_params, global_data, tiny_model


def full_state(model, opt):
    """{name: (param, exp_avg, exp_avg_sq)} as full plain tensors."""
    from torch.distributed.tensor import DTensor
    full = lambda x: (x.full_tensor() if isinstance(x, DTensor) else x).detach().clone()  # noqa: E731
    out = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        out[n.removeprefix("module.")] = (full(p), full(st["exp_avg"]), full(st["exp_avg_sq"]))
    return out


def _run(model, opt, world, rank, step):
    ids = global_data()[ShardedSampler(2 * GB, GB, rank, world, seed=3).indices(step)]
    training_step(model, opt, ids, grad_clip=1.0)


def _save_worker(rank, world, ckpt, ref_file):
    model = wrap_model(tiny_model(), "fsdp2", mixed_precision=None)
    opt = build_optimizer(model, lr=1e-2)
    _run(model, opt, world, rank, 0)
    save_checkpoint(ckpt, model, opt, train_state={"step": 1})
    saved = full_state(model, opt)
    _run(model, opt, world, rank, 1)
    nxt = full_params(model)  # collective: every rank
    if rank == 0:
        torch.save({"saved": saved, "next": nxt}, ref_file)


def _check_resume(model, opt, ckpt, ref, world, rank):
    meta = load_checkpoint(ckpt, model, opt)
    assert meta == {"step": 1}, meta
    got = full_state(model, opt)
    assert set(got) == set(ref["saved"])
    for n, (p, m1, m2) in ref["saved"].items():
        for a, b, what in zip(got[n], (p, m1, m2), ("param", "exp_avg", "exp_avg_sq")):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{n} {what}: {m}")
    _run(model, opt, world, rank, meta["step"])
    nxt = {n.removeprefix("module."): p for n, p in full_params(model).items()}
    for n, p in ref["next"].items():
        torch.testing.assert_close(nxt[n], p, rtol=1e-4, atol=1e-6, msg=lambda m: f"next step {n}: {m}")


def _load_worker(rank, world, ckpt, ref_file, strategy):
    ref = torch.load(ref_file)
    model = wrap_model(tiny_model(seed=1), strategy, mixed_precision=None)  # different init: must be overwritten
    opt = build_optimizer(model, lr=1e-2)
    _check_resume(model, opt, ckpt, ref, world, rank)


def test_checkpoint_resumes_on_other_world_sizes(tmp_path):
    ckpt, ref_file = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    run_ranks(2, _save_worker, ckpt, ref_file)
    assert os.path.exists(os.path.join(ckpt, "train_state.json"))
    run_ranks(4, _load_worker, ckpt, ref_file, "fsdp2")
    run_ranks(2, _load_worker, ckpt, ref_file, "ddp")
    # one plain process, no process group
    model = wrap_model(tiny_model(seed=1), "none", mixed_precision=None)
    opt = build_optimizer(model, lr=1e-2)
    _check_resume(model, opt, ckpt, torch.load(ref_file), 1, 0)


def test_load_checkpoint_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="checkpoint directory"):
        load_checkpoint(str(tmp_path / "nope"), tiny_model())


def test_sharded_sampler_disjoint_and_world_size_independent():
    n, gb = 50, 12
    for world in (1, 2, 3, 4):
        samplers = [ShardedSampler(n, gb, r, world, seed=5) for r in range(world)]
        seen_epoch = []
        for step in range(2 * samplers[0].steps_per_epoch):
            parts = [s.indices(step) for s in samplers]
            glob = torch.cat(parts)
            assert glob.unique().numel() == gb, "ranks overlap within a step"
            assert torch.equal(glob, ShardedSampler(n, gb, 0, 1, seed=5).global_batch(step)), "depends on world size"
            seen_epoch.append(glob)
            if len(seen_epoch) == samplers[0].steps_per_epoch:
                ep = torch.cat(seen_epoch)
                assert ep.unique().numel() == ep.numel() == (n // gb) * gb, "an epoch repeats a sample"
                seen_epoch = []
    a, b = ShardedSampler(n, gb, 0, 1, seed=5), ShardedSampler(n, gb, 0, 1, seed=6)
    assert not torch.equal(a.global_batch(0), b.global_batch(0))
    assert not torch.equal(a.global_batch(0), a.global_batch(a.steps_per_epoch)), "epochs reuse one order"
    with pytest.raises(ValueError, match="global_batch_size must be a positive multiple"):
        ShardedSampler(n, 10, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedSampler(n, 12, 4, 4)


def test_token_windows():
    tok = torch.arange(100, 121)
    assert token_windows(tok, torch.tensor([0, 2]), 5).tolist() == [list(range(100, 106)), list(range(110, 116))]
    assert token_windows(tok, torch.tensor([3]), 5).tolist() == [list(range(115, 121))]
    assert token_windows(tok, torch.tensor([0]), 5).tolist() == [list(range(100, 106))]
    with pytest.raises(ValueError, match="ids must be window ids"):
        token_windows(tok, torch.tensor([4]), 5)
