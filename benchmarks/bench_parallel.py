"""Multi-GPU benchmark of msa.parallel (UNTESTED ON GPU: written on a CPU-only machine; its building
blocks are tested on the CPU with gloo in tests/parallel/). Launch with torchrun, one process per GPU:

    # DDP / FSDP2 weak scaling of a ~1B-shaped MSA LM, T = 32K tokens per GPU (run for N = 1, 2, 4, 8)
    torchrun --standalone --nproc_per_node=N benchmarks/bench_parallel.py --part dp --out DIR [--seq-len 32768]

    # one MSA layer's training step at 1M tokens, context parallel over 8 GPUs, vs torch ring attention
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_parallel.py --part cp --out DIR [--cp-len 1048576]

Part dp: ``wrap_model(strategy, mixed_precision="bf16")`` + ``training_step`` (AdamW, index params in
their own group, per-group clipping) on random token ids, sparse mode, B = 1 x --seq-len per rank.
Times --steps steps after --warmup (CUDA-synchronised wall clock, max over ranks), tokens/s and peak
memory per GPU. Writes DIR/dp_w{N}.json; when DIR/dp_w1.json exists, prints the scaling efficiency
(t_1 / t_N per step at equal tokens per GPU). Target: >= 85% at N = 8.

Part cp: paper shape (H_q 64, H_kv 4, D 128, d_idx 128, block 128, top-16, bf16). First a parity gate
at --gate-len tokens: the CP output, KL and gradients vs the single-GPU ops on rank 0 (relative L2
error; PASS < 2e-2). Then at --cp-len: MSA CP step (``context_parallel_msa_attention`` forward +
backward incl. the KL; K/V fetched by sequence prefix and, for comparison, all-gathered) and dense causal attention with torch's ring attention
(``torch.distributed.tensor.experimental.context_parallel``, SDPA, K/V repeated to H_q heads), forward
+ backward, time and peak memory per GPU. Writes DIR/cp_w{N}.json. Target: MSA >= 10x faster.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 unless set).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HQ, HKV, D, DI, BLOCK, TOPK = 64, 4, 128, 128, 128, 16
DEV = "cuda"  # --cpu-smoke: "cpu" (gloo, tiny shapes, reference ops): checks the script's plumbing only
GPU = True


def sync():
    if GPU:
        torch.cuda.synchronize()


def reset_peak():
    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def timed(fn, steps, warmup):
    """Per-step seconds (max over ranks) of fn(), after warmup calls."""
    for _ in range(warmup):
        fn()
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    t = torch.tensor([(time.perf_counter() - t0) / steps], device=DEV)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def peak_gb():
    t = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30 if GPU else 0.0], device=DEV)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def model_tiny():
    from msa.layers import MSAConfig
    from msa.models import MSALMConfig
    att = MSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, index_dim=16, block_size=BLOCK,
                    topk_blocks=TOPK, mode="sparse", backend="auto")
    return MSALMConfig(vocab_size=64, num_layers=2, intermediate_size=96, attention=att, num_dense_layers=1)


def model_1b():
    from msa.layers import MSAConfig
    from msa.models import MSALMConfig
    att = MSAConfig(hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128, index_dim=128,
                    block_size=BLOCK, topk_blocks=TOPK, mode="sparse", backend="auto")
    return MSALMConfig(vocab_size=32000, num_layers=20, intermediate_size=5632, attention=att, num_dense_layers=2)


def part_dp(args, out):
    from msa.models import MSAForCausalLM
    from msa.parallel import build_optimizer, training_step, unwrap, wrap_model
    world, rank = dist.get_world_size(), dist.get_rank()
    res = {"seq_len": args.seq_len, "world_size": world, "strategies": {}}
    for strategy in args.strategies.split(","):
        row = res["strategies"].setdefault(strategy, {})
        try:
            torch.manual_seed(0)
            reset_peak()
            model = MSAForCausalLM(model_1b() if GPU else model_tiny()).to(DEV)
            row["params"] = sum(p.numel() for p in model.parameters())
            model = wrap_model(model, strategy, mixed_precision="bf16")
            opt = build_optimizer(model, lr=1e-4)
            g = torch.Generator(device=DEV).manual_seed(rank)
            vocab = unwrap(model).config.vocab_size
            ids = torch.randint(0, vocab, (1, args.seq_len), device=DEV, generator=g)
            stats = {}

            def step():
                stats.update(training_step(model, opt, ids, grad_clip=1.0))

            sec = timed(step, args.steps, args.warmup)
            row.update(step_s=sec, tokens_per_s=world * args.seq_len / sec, peak_gb=peak_gb(),
                       loss=stats.get("loss"))
            log(f"dp {strategy} w{world}: {sec * 1e3:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s, "
                f"peak {row['peak_gb']:.1f} GB")
            model = opt = None  # free before the next strategy
        except Exception as exc:  # one failing strategy must not hide the other
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
        reset_peak()
    base = os.path.join(out, "dp_w1.json")
    if os.path.exists(base) and world > 1:
        ref = json.load(open(base))["strategies"]
        for s, row in res["strategies"].items():
            if "step_s" in row and "step_s" in ref.get(s, {}):
                row["scaling_efficiency"] = ref[s]["step_s"] / row["step_s"]
                log(f"dp {s}: scaling efficiency 1 -> {world} GPUs: {row['scaling_efficiency']:.3f}")
    return f"dp_w{world}.json", res


def cp_inputs(t, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device=DEV, dtype=torch.bfloat16, generator=g)  # noqa: E731
    return mk(1, t, HQ, D), mk(1, t, HKV, D), mk(1, t, HKV, D), mk(1, t, HKV, DI), mk(1, t, DI), mk(1, t, HQ, D)


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cp_gate(t):
    """CP vs the single-GPU ops on the same global tensors (every rank runs the single-GPU ops)."""
    import msa
    from msa.parallel import ZigzagLayout, context_parallel_msa_attention, zigzag_shard
    rank, world = dist.get_rank(), dist.get_world_size()
    glob = cp_inputs(t, seed=1)
    leaves = [x.clone().requires_grad_(True) for x in glob[:5]]
    bi = msa.select_blocks(leaves[3], leaves[4], block_size=BLOCK, topk=TOPK)
    o, lse = msa.sparse_attention(*leaves[:3], bi, block_size=BLOCK, return_lse=True)
    kl = msa.indexer_kl_loss(leaves[3], leaves[4], leaves[0].detach(), leaves[1].detach(), bi, block_size=BLOCK,
                             teacher_lse=lse)
    ((o.float() * glob[5].float()).sum() + kl).backward()
    loc = [zigzag_shard(x, rank, world).requires_grad_(True) for x in glob[:5]]
    out = context_parallel_msa_attention(*loc, block_size=BLOCK, topk=TOPK)
    ((out.o.float() * zigzag_shard(glob[5], rank, world).float()).sum() + out.kl).backward()
    rows = ZigzagLayout(t, world).indices(rank, DEV)
    errs = {"o": rel(out.o, o[:, rows]), "kl": abs(float(out.kl) - float(kl)) / abs(float(kl)),
            "selection_mismatch": float((out.block_indices != bi[:, rows]).float().mean())}
    for name, x, ref in zip(("q", "k", "v", "q_idx", "k_idx"), loc, leaves):
        errs["d" + name] = rel(x.grad, ref.grad[:, rows])
    worst = torch.tensor([max(v for k, v in errs.items() if k != "selection_mismatch")], device=DEV)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    errs["pass"] = bool(float(worst) < 2e-2)
    return errs


def part_cp(args, out):
    from msa.parallel import context_parallel_msa_attention, zigzag_shard
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {"world_size": world, "cp_len": args.cp_len, "gate_len": args.gate_len}
    try:
        res["gate"] = cp_gate(args.gate_len)
        log("cp gate:", json.dumps(res["gate"]))
    except Exception as exc:
        res["gate"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(traceback.format_exc())
    t = args.cp_len
    # rows of K/V each rank receives (one long sequence): fetch = its sequence prefix, allgather = all
    from msa.parallel.context import ZigzagLayout, _plan
    lay, plan = ZigzagLayout(t, world), _plan(t, world, None)
    res["rows_received"] = {"fetch": [int(plan[r][0].numel()) - lay.local_len(r) for r in range(world)],
                            "allgather": [t - lay.local_len(r) for r in range(world)],
                            "sub_problem_len": [int(plan[r][0].numel()) for r in range(world)]}
    # MSA context parallel step, both K/V exchanges
    for exchange in args.kv_exchange.split(","):
        key = f"msa_cp_{exchange}"
        try:
            reset_peak()
            glob = cp_inputs(t)
            loc = [zigzag_shard(x, rank, world) for x in glob]
            glob = None
            leaves = [x.requires_grad_(True) for x in loc[:5]]
            do = loc[5]

            def msa_step():
                for x in leaves:
                    x.grad = None
                r = context_parallel_msa_attention(*leaves, block_size=BLOCK, topk=TOPK, kv_exchange=exchange)
                ((r.o * do).float().sum() + r.kl).backward()

            sec = timed(msa_step, args.cp_steps, 1)
            res[key] = {"step_s": sec, "peak_gb": peak_gb()}
            log(f"msa cp ({exchange}) {t} tokens on {world} GPUs: {sec * 1e3:.1f} ms/step, "
                f"peak {res[key]['peak_gb']:.1f} GB")
            leaves = loc = do = None
        except Exception as exc:
            res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            log(traceback.format_exc())
    # dense ring attention (torch's context parallel SDPA)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        reset_peak()
        mesh = init_device_mesh(DEV, (world,))
        g = torch.Generator(device=DEV).manual_seed(0)
        q = torch.randn(1, HQ, t, D, device=DEV, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, HKV, t, D, device=DEV, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, HKV, t, D, device=DEV, dtype=torch.bfloat16, generator=g)
        k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)  # ring attention: no GQA
        do = torch.randn_like(q)
        # no_restore_buffers: do not keep full copies to restore on exit (4 x 16 GB at 1M tokens)
        with context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2],
                              no_restore_buffers={q, k, v, do}):
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))

            def ring_step():
                for x in (qq, kk, vv):
                    x.grad = None
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                o.backward(do)

            sec = timed(ring_step, args.ring_steps, 1)
        res["ring_dense"] = {"step_s": sec, "peak_gb": peak_gb()}
        log(f"ring dense {t} tokens on {world} GPUs: {sec * 1e3:.1f} ms/step, peak {res['ring_dense']['peak_gb']:.1f} GB")
    except Exception as exc:
        res["ring_dense"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(traceback.format_exc())
    best = [res[k]["step_s"] for k in res if k.startswith("msa_cp_") and "step_s" in res[k]]
    if best and "step_s" in res.get("ring_dense", {}):
        res["speedup"] = res["ring_dense"]["step_s"] / min(best)
        log(f"MSA CP (best exchange) vs ring dense: {res['speedup']:.2f}x (target >= 10x)")
    return f"cp_w{world}.json", res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("dp", "cp"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--strategies", default="ddp,fsdp2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cp-len", type=int, default=1 << 20)
    ap.add_argument("--gate-len", type=int, default=16384)
    ap.add_argument("--cp-steps", type=int, default=3)
    ap.add_argument("--ring-steps", type=int, default=1)
    ap.add_argument("--kv-exchange", default="fetch,allgather", help="MSA CP K/V exchanges to time")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run on the CPU with gloo and tiny shapes (checks the plumbing, no timings worth reading)")
    args = ap.parse_args()
    global DEV, GPU, HQ, HKV, D, DI, BLOCK, TOPK
    if args.cpu_smoke:
        DEV, GPU = "cpu", False
        HQ, HKV, D, DI, BLOCK, TOPK = 4, 2, 16, 16, 16, 2
        args.seq_len, args.cp_len, args.gate_len, args.steps, args.warmup = 128, 256, 128, 1, 1
        dist.init_process_group("gloo")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_parallel.py needs CUDA GPUs (launch with torchrun, one process per GPU; --cpu-smoke on a CPU)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    os.makedirs(args.out, exist_ok=True)
    try:
        name, res = part_dp(args, args.out) if args.part == "dp" else part_cp(args, args.out)
        res.update(gpu=torch.cuda.get_device_name() if GPU else "cpu-smoke", torch=torch.__version__, python=platform.python_version(),
                   command=" ".join(sys.argv), env={k: os.environ.get(k) for k in
                                                     ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")})
        if dist.get_rank() == 0:
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {os.path.join(args.out, name)}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
