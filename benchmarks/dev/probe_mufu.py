"""MUFU exp2 throughput: ex2.approx.f32 vs ex2.approx.f16x2 (two halves per register) on the GPU.
PYTHONPATH=. python benchmarks/dev/probe_mufu.py"""
import torch
import triton
import triton.language as tl


@triton.jit
def mufu_kernel(X, Y, N_ITER: tl.constexpr, MODE: tl.constexpr):
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    x = tl.load(X + offs)
    if MODE == 0:
        acc = tl.zeros([1024], tl.float32)
        for _ in range(N_ITER):
            y = tl.exp2(x)
            acc += y
            x = x - 0.001
        tl.store(Y + offs, acc)
    else:
        h = x.to(tl.float16)
        acc = tl.zeros([1024], tl.float16)
        for _ in range(N_ITER):
            y = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [h], dtype=tl.float16,
                                          is_pure=True, pack=2)
            acc += y
            h = h - 0.001
        tl.store(Y + offs, acc.to(tl.float32))


def main():
    n_prog = 132 * 64
    x = torch.rand(n_prog * 1024, device="cuda") * -4
    y = torch.empty_like(x)
    for mode in (0, 1):
        f = lambda: mufu_kernel[(n_prog,)](x, y, N_ITER=256, MODE=mode, num_warps=8)  # noqa: E731
        ms = triton.testing.do_bench(f, warmup=5, rep=50)
        n = n_prog * 1024 * 256
        print(f"MODE {mode} ({'f32' if mode == 0 else 'f16x2'}): {ms:.3f} ms, {n / ms / 1e9:.2f} Texp/s", flush=True)


if __name__ == "__main__":
    main()
