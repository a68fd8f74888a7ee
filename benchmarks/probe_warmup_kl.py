"""Development probe of the warmup (full causal support) KL kernel at the paper's shape, on a GPU.

    PYTHONPATH=. python benchmarks/probe_warmup_kl.py time 32768,131072
        flash-atomic (loss + dq_idx + dk_idx through atomics) vs pass 1 alone (no gradients, so no dk
        atomics); set MSA_KL_DENSE_FLASH_CONFIG=BLOCK_N=128,num_stages=3 so both use the same tile
    PYTHONPATH=. python benchmarks/probe_warmup_kl.py sweep 131072 "cfg1;cfg2;..."
        median time (bench_train.median_ms, PROBE_REPS repetitions) per MSA_KL_DENSE_FLASH_CONFIG value, with the loss and the
        gradients' relative difference to the first config (a correctness check of each variant)
    ncu ... python benchmarks/probe_warmup_kl.py ncu 16384
        one call, for Nsight Compute (round 13 in benchmarks/results/dev/round13_log.txt)
    PYTHONPATH=. python benchmarks/probe_warmup_kl.py heads 32768 4,8,16,32
        flash-atomic time at H_kv 4 and each group size G (H_q = 4 G; the head loop is not unrolled, so the
        kernel is the same code), and the least-squares fit t = a + b G: a / b is the per-key-tile work
        outside the head loop (index MMAs, student exponentials, dk atomics, pipeline refill) in units
        of one head's teacher step

The teacher lse comes from cuDNN's dense attention, as in the training benchmark."""
import os
import sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from msa.bench.train import median_ms  # noqa: E402
from msa.ops.indexer_kl.triton_impl import indexer_kl_triton  # noqa: E402

HQ, HKV, D, DI = 64, 4, 128, 128
REPS = int(os.environ.get("PROBE_REPS", "3"))  # CUDA-event repetitions of calls over ~150 ms


def inputs(T, hq=HQ):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v, qi, ki = r(1, T, hq, D), r(1, T, HKV, D), r(1, T, HKV, D), r(1, T, HKV, DI), r(1, T, DI)
    g = hq // HKV
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        None, True, 0.0, True, False, scale=D ** -0.5)
    lse = out[1].reshape(1, hq, -1)[..., :T].transpose(1, 2).contiguous()
    return q, k, qi.requires_grad_(True), ki.requires_grad_(True), lse


def sweep(T, cfgs):
    q, k, qi, ki, lse = inputs(T)
    kw = dict(block_size=128, scale=D ** -0.5, index_scale=DI ** -0.5, cu_seqlens=None, teacher_lse=lse)
    ref = None
    for cfg in cfgs:
        os.environ["MSA_KL_DENSE_FLASH_CONFIG"] = cfg
        fn = lambda: torch.autograd.grad(indexer_kl_triton(qi, ki, q, k, None, **kw), (qi, ki))  # noqa: E731
        try:
            with torch.enable_grad():
                loss = indexer_kl_triton(qi, ki, q, k, None, **kw)
                g = torch.autograd.grad(loss, (qi, ki))
            if ref is None:
                ref = (loss.item(), g)
            err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(g, ref[1]))
            print(f"T={T} [{cfg}] {median_ms(fn, REPS):.2f} ms  loss {loss.item():.6f} (vs first {ref[0]:.6f}) grad rel {err:.1e}",
                  flush=True)
        except Exception as exc:
            print(f"T={T} [{cfg}] error {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def heads(T, groups):
    kw = dict(block_size=128, scale=D ** -0.5, index_scale=DI ** -0.5, cu_seqlens=None)
    pts = []
    for g in groups:
        q, k, qi, ki, lse = inputs(T, HKV * g)
        fn = lambda: torch.autograd.grad(indexer_kl_triton(qi, ki, q, k, None, teacher_lse=lse, **kw), (qi, ki))  # noqa: E731,B023
        ms = median_ms(fn)
        pts.append((g, ms))
        print(f"T={T} G={g} (H_q {HKV * g}): {ms:.3f} ms", flush=True)
        del q, k, qi, ki, lse
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    a = my - b * mx
    print(f"T={T} fit: t = {a:.3f} + {b:.3f} G ms; outside the head loop = {a / b:.2f} head steps "
          f"({100 * a / (a + 16 * b):.1f}% of the G=16 kernel)", flush=True)


def main():
    what = sys.argv[1]
    if what == "heads":
        heads(int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")])
        return
    if what == "sweep":
        sweep(int(sys.argv[2]), sys.argv[3].split(";"))
        return
    for T in [int(x) for x in sys.argv[2].split(",")]:
        q, k, qi, ki, lse = inputs(T)
        kw = dict(block_size=128, scale=D ** -0.5, index_scale=DI ** -0.5, cu_seqlens=None, teacher_lse=lse)
        grad = lambda: torch.autograd.grad(indexer_kl_triton(qi, ki, q, k, None, **kw), (qi, ki))  # noqa: E731

        def nograd():
            with torch.no_grad():
                indexer_kl_triton(qi, ki, q, k, None, **kw)
        if what == "ncu":
            grad()
            torch.cuda.synchronize()
            continue
        for name, fn in (("flash-atomic (loss+dq+dk atomics)", grad), ("pass 1 only (loss+dq, no atomics)", nograd)):
            print(f"T={T} {name}: {median_ms(fn):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
