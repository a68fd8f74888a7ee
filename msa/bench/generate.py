"""Product benchmark of generation: ``MSAForCausalLM.generate()`` ms per new token, MSA vs its dense twin.

    msa bench generate --out DIR [--quick]

Model (issue 13): 4 layers, hidden 2048, 16 query heads / 4 KV heads, head dim 128, index dim 128, bf16,
the paper's MSA selection (block 128, top-16, local 1, init 0); vocab and MLP width are the
MSALMConfig defaults unless given (--vocab, --intermediate). "msa": every layer MSA
(num_dense_layers=0, sparse mode); "dense": the same model with every layer dense (num_dense_layers=4).
Batch 1 (--batch), random prompt tokens, contexts 32K and 128K (--contexts).

1. Gate: greedy tokens of the captured step (cuda_graph=True) equal the uncaptured step's, for both
   models at a short context, batch of 2 ragged prompts. PASS/FAIL printed and recorded.
2. Per model and context:
   - ``generate_ms_per_token``: generate()'s loop timed per step (a GenerationSession, which is what
     generate() runs: prefill, then one step per token; the first step, which captures the graph, is
     excluded), wall clock over --new-tokens steps with one sync at the end;
   - ``generate_diff_ms_per_token``: (wall of generate(n=17 + N) - wall of generate(n=17)) / N, whole
     calls (prefill and capture cancel out), a cross-check of the above;
   - ``gpu_ms_per_step``: GPU time of one captured step, graph replays timed with CUDA events while the
     stream is held by a sleep kernel (so the host's launch time does not show);
   - ``host_overhead``: 1 - gpu_ms_per_step / generate_ms_per_token (the share of a step the GPU idles);
   - ``eager_ms_per_token``: the same loop with cuda_graph=False;
   - ``graph_unfused_ms_per_token``: captured, but the module step (``fused_step=False``: every
     small op of the layers its own kernel) instead of the fused step generate() uses;
   - ``prefill_s``: the packed prefill of the prompt (wall), the first at this length, so it includes
     compiling the kernels' new specialisations; ``prefill_warm_s``: the next session's prefill;
   - ``attention_per_layer``: one layer's decode attention alone (us) over the same cache: the plan the
     step runs (8 chained runs in one graph), and for the dense twin torch SDPA flash / cuDNN (eager;
     a growing K/V length cannot be captured, which is why the dense twin's step uses the Triton dense
     decode kernel: these figures say what that choice costs or gains).
   Speedups are dense / msa of generate_ms_per_token at each context.
JSON (GPU, versions, command, configuration, figures) under --out; a short table is printed last.
--quick: a tiny model and short contexts (runs on a CPU through the reference ops: checks the script,
its timings mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

from msa.bench.timing import back_to_back_ms
from msa.layers import MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig
from msa.models.generation import GenerationSession
from msa.bench import positive_ints


def build_model(kind, args, dev, dtype):
    att = MSAConfig(hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                    index_dim=args.index_dim, block_size=args.block_size, topk_blocks=args.topk, init_blocks=0,
                    local_blocks=1, mode="sparse")
    kw = {}
    if args.vocab:
        kw["vocab_size"] = args.vocab
    if args.intermediate:
        kw["intermediate_size"] = args.intermediate
    cfg = MSALMConfig(num_layers=args.layers, attention=att, num_dense_layers=args.layers if kind == "dense" else 0, **kw)
    torch.manual_seed(0)
    return MSAForCausalLM(cfg).to(device=dev, dtype=dtype).eval(), cfg


def prompts_of(batch, length, vocab, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).to(dev) for _ in range(batch)]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gate(models, args, dev):
    """Captured vs uncaptured greedy tokens at a short context, ragged batch of 2."""
    out = {}
    if dev.type != "cuda":
        return {"skipped": "no CUDA: graphs not exercised"}
    n = 4096 if not args.quick else 256
    for kind, (model, cfg) in models.items():
        ps = [prompts_of(1, n, cfg.vocab_size, dev, seed=1)[0], prompts_of(1, n // 3 + 5, cfg.vocab_size, dev, seed=2)[0]]
        a = model.generate(ps, 16, cuda_graph=False)
        b = model.generate(ps, 16, cuda_graph=True)
        ok = all(torch.equal(x, y) for x, y in zip(a, b))
        out[kind] = "PASS" if ok else "FAIL"
        print(f"gate {kind}: captured == uncaptured greedy tokens (prompts {n}, {n // 3 + 5}): {out[kind]}", flush=True)
    return out


def time_loop(model, ps, n_tokens, cuda_graph, dev, fused_step=None):
    """(ms per token of the step loop, prefill seconds, session) with the first step (capture) excluded."""
    sess = GenerationSession(model, ps, n_tokens + 2 + 64, cuda_graph=cuda_graph, fused_step=fused_step)
    sync(dev)
    t0 = time.perf_counter()
    sess.prefill()
    sync(dev)
    prefill_s = time.perf_counter() - t0
    sess.step()  # capture (graph) / first eager step
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        sess.step()
    sync(dev)
    return (time.perf_counter() - t0) * 1e3 / n_tokens, prefill_s, sess


def gpu_ms_per_step(sess, reps, dev):
    """GPU time of one graph replay: replays enqueued behind a sleep kernel, timed with CUDA events."""
    if sess.graph is None or dev.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e8))  # ~0.1 s at ~2 GHz: the host enqueues every replay before the GPU gets to them
    start.record()
    for _ in range(reps):
        sess.graph.replay()
    end.record()
    sync(dev)
    return start.elapsed_time(end) / reps


def attention_us(sess, model, dev, reps=20):
    """Per-layer decode attention alone over the session's cache (layer 0, its current lengths): the
    plan the step uses, 8 chained runs captured in one graph (as inside the model's step), and for
    dense layers torch SDPA (flash / cuDNN, queries packed per KV head) over the same K/V, eager."""
    from msa.ops.decode.triton_impl import get_decode_plan
    c, a = sess.cache, model.layers[0].attn.config
    dense = not a.use_index or a.mode != "sparse"
    B, H, G, D = c.batch_size, a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
    q = torch.randn(B, 1, a.num_heads, D, device=dev, dtype=c.dtype)
    qi = torch.randn(B, 1, H, a.index_dim, device=dev, dtype=c.dtype)
    plan = get_decode_plan(c, num_heads=a.num_heads, num_tokens=1, block_size=a.block_size, topk=a.topk_blocks,
                           init_blocks=a.init_blocks, local_blocks=a.local_blocks, scale=D ** -0.5,
                           index_scale=a.index_dim ** -0.5, dense=dense)
    plan.run(q, qi, 0)
    sync(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(8):
            plan.run(q, qi, 0)
    out = {"plan_us": back_to_back_ms(g.replay, reps) * 1e3 / 8}
    if dense:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        n = int(c.lengths_dev[0].min())
        qp = q.view(B, 1, H, G, D).permute(0, 2, 1, 3, 4).reshape(B, H, G, D).contiguous()
        k, v = c.k[0][:, :n].transpose(1, 2), c.v[0][:, :n].transpose(1, 2)
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    out[f"sdpa_{name.split('_')[0].lower()}_us"] = back_to_back_ms(
                        lambda: F.scaled_dot_product_attention(qp, k, v, scale=D ** -0.5), reps) * 1e3
            except Exception as exc:  # a backend may not take these shapes on this build
                out[f"sdpa_{name.split('_')[0].lower()}_us"] = f"unavailable: {type(exc).__name__}"
    return out


def generate_wall(model, ps, n, dev):
    sync(dev)
    t0 = time.perf_counter()
    model.generate(ps, n)
    sync(dev)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny model, short contexts (CPU-runnable)")
    ap.add_argument("--contexts", type=positive_ints, default=None, help="comma-separated prompt lengths (default 32768,131072)")
    ap.add_argument("--new-tokens", type=int, default=None, help="timed steps per measurement (default 128)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--index-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=None, help="default: MSALMConfig's")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: MSALMConfig's)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.hidden, args.heads, args.kv_heads, args.head_dim, args.index_dim = 256, 4, 2, 64, 64
        args.block_size, args.topk = 16, 4
    if dev.type != "cuda" and not args.quick:
        sys.exit("bench_generate needs a GPU (or --quick for a CPU check of the script)")
    contexts = args.contexts or ([512, 2048] if args.quick else [32768, 131072])
    n_tok = args.new_tokens or (8 if args.quick else 128)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    models = {kind: build_model(kind, args, dev, dtype) for kind in ("msa", "dense")}
    cfg = models["msa"][1]
    res = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "config": dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                       head_dim=args.head_dim, index_dim=args.index_dim, block_size=args.block_size, topk=args.topk,
                       vocab=cfg.vocab_size, intermediate=cfg.intermediate_size, dtype=str(dtype), batch=args.batch,
                       new_tokens=n_tok),
        "rows": [],
    }
    with torch.no_grad():
        res["gate"] = gate(models, args, dev)
        for L in contexts:
            for kind, (model, mcfg) in models.items():
                ps = prompts_of(args.batch, L, mcfg.vocab_size, dev, seed=L)
                row = dict(kind=kind, context=L)
                try:
                    ms, pre, sess = time_loop(model, ps, n_tok, dev.type == "cuda", dev)
                    row.update(generate_ms_per_token=ms, prefill_s=pre)
                    gpu = gpu_ms_per_step(sess, 32, dev)
                    row["gpu_ms_per_step"] = gpu
                    row["host_overhead"] = None if gpu is None else max(0.0, 1.0 - gpu / ms)
                    row["fused_step"] = sess.fused is not None
                    if dev.type == "cuda":
                        try:
                            row["attention_per_layer"] = attention_us(sess, model, dev)
                        except Exception as exc:  # informative only: never lose the row
                            row["attention_per_layer"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                    sess.close()
                    del sess
                    eager_n = max(4, n_tok // 4)
                    # its prefill is the second at this length: kernels compiled (the first one's included)
                    row["eager_ms_per_token"], row["prefill_warm_s"], sess = time_loop(model, ps, eager_n, False, dev)
                    sess.close()
                    del sess
                    if dev.type == "cuda":
                        row["graph_unfused_ms_per_token"], _, sess = time_loop(model, ps, eager_n, True, dev,
                                                                               fused_step=False)
                        sess.close()
                        del sess
                    t1 = generate_wall(model, ps, 17, dev)
                    t2 = generate_wall(model, ps, 17 + n_tok, dev)
                    row["generate_diff_ms_per_token"] = (t2 - t1) * 1e3 / n_tok
                except torch.cuda.OutOfMemoryError as exc:
                    row["error"] = f"OOM: {str(exc)[:200]}"
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
    by = {(r["kind"], r["context"]): r for r in res["rows"]}
    res["speedup"] = {}
    for L in contexts:
        m, d = by.get(("msa", L), {}), by.get(("dense", L), {})
        if "generate_ms_per_token" in m and "generate_ms_per_token" in d:
            res["speedup"][str(L)] = d["generate_ms_per_token"] / m["generate_ms_per_token"]
    res["wall_s"] = time.time() - t_start
    path = os.path.join(args.out, "generate.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['gpu']}, torch {res['torch']}, triton {res['triton']}; gate {res['gate']}; "
          f"batch {args.batch}, {n_tok} timed tokens; total {res['wall_s']:.0f} s")
    print(f"{'context':>8} {'model':>6} {'ms/token':>9} {'diff ms/tok':>11} {'GPU ms/step':>11} {'host %':>7} "
          f"{'eager ms/tok':>12} {'unfused ms':>10} {'prefill s':>9} {'warm':>7} {'dense/msa':>9}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['context']:>8} {r['kind']:>6} {r['error']}")
            continue
        sp = res["speedup"].get(str(r["context"])) if r["kind"] == "msa" else None
        gpu = "-" if r["gpu_ms_per_step"] is None else f"{r['gpu_ms_per_step']:.3f}"
        host = "-" if r["host_overhead"] is None else f"{100 * r['host_overhead']:.1f}"
        print(f"{r['context']:>8} {r['kind']:>6} {r['generate_ms_per_token']:9.3f} {r['generate_diff_ms_per_token']:11.3f} "
              f"{gpu:>11} {host:>7} {r['eager_ms_per_token']:12.3f} {r.get('graph_unfused_ms_per_token', float('nan')):10.3f} "
              f"{r['prefill_s']:9.3f} {r.get('prefill_warm_s', float('nan')):7.3f} "
              f"{'' if sp is None else f'{sp:.2f}x':>9}")
    for r in res["rows"]:
        if "attention_per_layer" in r:
            print(f"attention alone, one layer, {r['kind']} @ {r['context']}: {r['attention_per_layer']}")
    print(f"wrote {path}")


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:  # pragma: no cover - depends on the install
        return None


if __name__ == "__main__":
    main()
