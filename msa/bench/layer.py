"""Product benchmark: what a user calls, timed beside the ops it is built from and beside dense twins.

    msa bench layer --out DIR [--sizes 32768,131072] [--quick]

1. One ``MSAAttention`` layer at the paper's attention shape (hidden 4096, 64 query heads, 4 KV heads,
   d 128, d_idx 128, B_k 128, k 16, bf16 parameters and inputs, B = 1), forward + backward in train
   mode (the KL included), per size:
   - ``layer_sparse``: mode "sparse"; ``layer_warmup``: mode "dense" (dense attention + warmup KL);
   - ``projections``: the layer's projections + RoPE + output projection alone (forward + backward),
     so that "attention part" = layer - projections;
   - ``ops_sparse``: ``select_blocks`` -> ``sparse_attention(return_lse=True)`` ->
     ``indexer_kl_loss(teacher_lse=lse)`` called directly on tensors (forward + backward);
   - ``dense_sdpa``: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` forward + backward.
   Targets (issue 13): layer attention part within 10% of ops_sparse; warmup attention part <= 1.35x
   dense_sdpa.
2. A 4-layer ``MSAForCausalLM`` (hidden 2048, 16 / 4 heads, d 128, vocab 32000, bf16 autocast, AdamW)
   ``training_step`` tokens/s at T = 32K in sparse mode, warmup mode and with every layer dense (no
   index branch), and ``torch.compile(model.loss, fullgraph=True)`` (its loss checked against eager);
   each the median step time (CUDA events) after two warm-up steps.
JSON (GPU, versions, command, every figure) under --out; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import msa
from msa.layers import MSAAttention, MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig
from msa.bench import positive_ints

PAPER = dict(hidden_size=4096, num_heads=64, num_kv_heads=4, head_dim=128, index_dim=128, block_size=128,
             topk_blocks=16)


def time_ms(fn, reps=None):
    """Median CUDA time of fn() in ms (1-3 warm-ups; reps chosen from the first call's duration)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    fn()
    if reps is None:
        reps = 3 if first > 300 else 5 if first > 50 else 20
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def layer_bench(t: int):
    dev = "cuda"
    torch.manual_seed(0)
    layer = MSAAttention(MSAConfig(**PAPER)).to(dev, torch.bfloat16).train()
    x = torch.randn(1, t, PAPER["hidden_size"], device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    row = {"T": t}

    def layer_step(mode):
        def fn():
            layer.set_mode(mode)
            out = layer(x)
            torch.autograd.backward([out.hidden, out.kl_loss], [g, torch.ones((), device=dev)])
        return fn

    pos = torch.arange(t, device=dev).view(1, t)

    def proj_step():
        q, k, v, qi, ki = layer.project(x, pos)
        out = layer.o_proj(q.reshape(1, t, -1))
        torch.autograd.backward([out, k, v, qi, ki], [g, torch.ones_like(k), torch.ones_like(v), torch.ones_like(qi),
                                                      torch.ones_like(ki)])

    c = layer.config
    q = torch.randn(1, t, c.num_heads, c.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, t, c.num_kv_heads, c.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    qi = torch.randn(1, t, c.num_kv_heads, c.index_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(1, t, c.index_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)

    def ops_step():
        bi = msa.select_blocks(qi, ki, block_size=c.block_size, topk=c.topk_blocks)
        o, lse = msa.sparse_attention(q, k, v, bi, block_size=c.block_size, return_lse=True)
        kl = msa.indexer_kl_loss(qi, ki, q.detach(), k.detach(), bi, block_size=c.block_size, teacher_lse=lse)
        torch.autograd.backward([o, kl], [do, torch.ones((), device=dev)])

    def dense_step():
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        o.backward(do.transpose(1, 2))

    # parity gate: the layer's sparse output equals the ops called on the layer's own projections
    with torch.no_grad():
        layer.set_mode("sparse")
        qq, kk, vv, qqi, kki = layer.project(x, pos)
        bi = msa.select_blocks(qqi, kki, block_size=c.block_size, topk=c.topk_blocks)
        o = msa.sparse_attention(qq, kk, vv, bi, block_size=c.block_size)
        ref = layer.o_proj(o.reshape(1, t, -1))
        got = layer(x, compute_kl=False).hidden
        row["parity_rel_err"] = float((got.float() - ref.float()).norm() / ref.float().norm())
    for name, fn in (("layer_sparse", layer_step("sparse")), ("layer_warmup", layer_step("dense")),
                     ("projections", proj_step), ("ops_sparse", ops_step), ("dense_sdpa", dense_step)):
        row[name + "_ms"] = time_ms(fn)
        print(f"  T={t} {name}: {row[name + '_ms']:.2f} ms", flush=True)
    row["layer_sparse_attn_ms"] = row["layer_sparse_ms"] - row["projections_ms"]
    row["layer_warmup_attn_ms"] = row["layer_warmup_ms"] - row["projections_ms"]
    row["sparse_attn_vs_ops"] = row["layer_sparse_attn_ms"] / row["ops_sparse_ms"]
    row["warmup_attn_vs_dense"] = row["layer_warmup_attn_ms"] / row["dense_sdpa_ms"]
    row["sparse_speedup_vs_dense"] = row["dense_sdpa_ms"] / row["layer_sparse_attn_ms"]
    del layer, x, g, q, k, v, qi, ki, do
    torch.cuda.empty_cache()
    return row


def bench_model(t: int, mode: str, dense_layers: int):
    """The 4-layer model of the model bench (hidden 2048, 16 / 4 heads, d 128, vocab 32000) in mode
    "sparse" or "dense", its AdamW and one bf16-autocast training step on t random tokens:
    returns (model, opt, ids, step)."""
    attn = dict(hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128, index_dim=128, block_size=128,
                topk_blocks=16)
    torch.manual_seed(0)
    cfg = MSALMConfig(vocab_size=32000, num_layers=4, intermediate_size=5632, attention=MSAConfig(**attn),
                      num_dense_layers=dense_layers)
    model = MSAForCausalLM(cfg).to("cuda")
    model.set_mode(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (1, t), device="cuda")
    return model, opt, ids, lambda: model.training_step(ids, opt, autocast_dtype=torch.bfloat16)


def model_bench(t: int, steps: int):
    res = {"T": t}
    for name, mode, dense_layers in (("sparse", "sparse", 0), ("warmup", "dense", 0), ("all_dense", "dense", 4)):
        model, opt, ids, step = bench_model(t, mode, dense_layers)
        res[f"{name}_step_ms"] = time_ms(step, reps=steps)
        res[f"{name}_tokens_per_s"] = t / (res[f"{name}_step_ms"] / 1e3)
        print(f"  model {name}: {res[f'{name}_step_ms']:.1f} ms/step", flush=True)
        if name == "sparse":
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                eager = model.loss(ids)["loss"]
                t0 = time.perf_counter()
                compiled = torch.compile(model.loss, fullgraph=True)
                comp = compiled(ids)["loss"]
                torch.cuda.synchronize()
            res["compile_fullgraph_ok"] = True
            res["compile_first_call_s"] = time.perf_counter() - t0
            res["compile_loss_abs_diff"] = float((comp - eager).detach().abs())

            def cstep():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = compiled(ids)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            res["sparse_compiled_step_ms"] = time_ms(cstep, reps=steps)
            print(f"  model sparse compiled: {res['sparse_compiled_step_ms']:.1f} ms/step", flush=True)
        del model, opt
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=positive_ints, default="32768,131072")
    ap.add_argument("--model-T", type=int, default=32768)
    ap.add_argument("--model-steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="sizes 8192 and a 4-step 8K model run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer: needs a CUDA GPU (this machine has none)")
    sizes = [8192] if args.quick else args.sizes
    import triton
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "command": " ".join(sys.argv), "layer": [], "model": None}
    for t in sizes:
        out["layer"].append(layer_bench(t))
    out["model"] = model_bench(8192 if args.quick else args.model_T, 4 if args.quick else args.model_steps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layer_bench.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{out['gpu']}  torch {out['torch']}  triton {out['triton']}")
    print(f"{'T':>7} {'layer sp':>9} {'proj':>7} {'attn sp':>8} {'ops sp':>8} {'attn/ops':>8} {'warmup':>8} "
          f"{'w-attn':>8} {'dense':>8} {'w/dense':>8} {'x dense':>8}")
    for r in out["layer"]:
        print(f"{r['T']:>7} {r['layer_sparse_ms']:>9.1f} {r['projections_ms']:>7.1f} {r['layer_sparse_attn_ms']:>8.1f} "
              f"{r['ops_sparse_ms']:>8.1f} {r['sparse_attn_vs_ops']:>8.3f} {r['layer_warmup_ms']:>8.1f} "
              f"{r['layer_warmup_attn_ms']:>8.1f} {r['dense_sdpa_ms']:>8.1f} {r['warmup_attn_vs_dense']:>8.3f} "
              f"{r['sparse_speedup_vs_dense']:>8.2f}")
    m = out["model"]
    print(f"model T={m['T']}: sparse {m['sparse_tokens_per_s']:.0f} tok/s, warmup {m['warmup_tokens_per_s']:.0f}, "
          f"all-dense {m['all_dense_tokens_per_s']:.0f}; compiled sparse step {m['sparse_compiled_step_ms']:.1f} ms "
          f"(eager {m['sparse_step_ms']:.1f}); compile loss diff {m['compile_loss_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
