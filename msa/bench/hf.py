"""transformers model converted to MSA (msa.hf.to_msa) vs the same model with attn_implementation="sdpa".

    msa bench hf --out DIR [--contexts 32768,131072] [--new-tokens 32]

Model: a random Llama-shaped ~1.1B model (16 layers, hidden 2048, 16 query heads, 4 KV heads, head dim 128,
intermediate 8192, vocabulary 32000), bf16 on one GPU. The MSA copy has the same weights plus the index branch
(index_dim 128, block 128, top-16 blocks, sparse mode). Steps:

1. Gate (2K tokens): the converted model in dense mode against the sdpa model (last-token logits), and in
   sparse mode with top-16 of 16 blocks (every block selected) against its dense mode. PASS / FAIL printed.
2. For each context: prefill time of ``model(prompt, use_cache=True, logits_to_keep=1)`` (the second call at
   that length; the first, which compiles new kernel specialisations, is ``prefill_first_call_ms``) with CUDA events
   around every attention module (its projections, index branch and cache write included: "attention") and
   the rest of the model; then ``model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)``,
   timed by a stopping criterion that synchronises and stamps the clock after every step: prefill (prompt to
   first token) and the median time per decoded token. sdpa uses transformers' DynamicCache and eager steps
   (transformers' default); MSA its MSAHFCache (K, V, index keys) with the Triton decode kernels and each
   decode step replayed from a CUDA graph (MSAHFCache's default); MSA's decode is timed without CUDA graphs
   as well (``msa_eager_decode_ms_per_token``).

JSON (GPU, versions, command, per-context timings) under --out; a table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from msa.bench import positive_ints


def build_model(layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=1 << 20,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    return model


def prefill_split(model, prompt):
    """(total ms, attention-module ms) of one prefill forward (events around each attention module)."""
    events = []
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]

    def pre(mod, args, kwargs):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append([e, None])

    def post(mod, args, kwargs, out):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events[-1][1] = e

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in mods]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        with torch.no_grad():
            torch.cuda.synchronize()
            start.record()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    del out
    return start.elapsed_time(end), sum(a.elapsed_time(b) for a, b in events)


def timed_generate(model, prompt, new_tokens: int, **kw):
    """generate(): ms from the call to the first token (prefill) and median ms per later token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([Clock()]), **kw)
    steps = [1e3 * (b - a) for a, b in zip(stamps[:-1], stamps[1:])]
    return {"prefill_ms": 1e3 * (stamps[0] - t0), "decode_ms_per_token": statistics.median(steps),
            "decode_ms_min": min(steps), "tokens": out[0, prompt.shape[1]:].tolist()}


def gate(sdpa_model, msa_model, vocab: int) -> dict:
    import msa.hf
    ids = torch.randint(1, vocab, (1, 2048), device="cuda")
    res = {}
    with torch.no_grad():
        ref = sdpa_model(ids, use_cache=False).logits[0, -64:].float()
        msa.hf.set_mode(msa_model, "dense")
        dense = msa_model(ids, use_cache=False).logits[0, -64:].float()
        msa.hf.set_mode(msa_model, "sparse")
        sparse = msa_model(ids, use_cache=False).logits[0, -64:].float()
    scale = ref.abs().max().item()
    res["dense_vs_sdpa_max_abs"] = (dense - ref).abs().max().item()
    res["sparse_all_blocks_vs_dense_max_abs"] = (sparse - dense).abs().max().item()
    res["logit_scale"] = scale
    tol = 0.05 * scale + 1e-3  # bf16 through 16 layers; a wrong layer moves logits by O(scale)
    res["pass"] = bool(res["dense_vs_sdpa_max_abs"] <= tol and res["sparse_all_blocks_vs_dense_max_abs"] <= tol)
    print(f"gate: dense vs sdpa max|diff| {res['dense_vs_sdpa_max_abs']:.4f}, sparse (all 16 of 16 blocks) vs dense "
          f"{res['sparse_all_blocks_vs_dense_max_abs']:.4f} (logits up to {scale:.2f}): "
          f"{'PASS' if res['pass'] else 'FAIL'}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", type=positive_ints, default="32768,131072", help="comma-separated prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_hf needs a CUDA GPU (none found)")
        return 1
    import transformers
    import triton

    import msa.hf
    contexts = args.contexts
    t_start = time.perf_counter()
    sdpa_model = build_model(args.layers, args.vocab)
    msa_model = copy.deepcopy(sdpa_model)
    msa.hf.to_msa(msa_model, block_size=128, topk_blocks=16, index_dim=128, mode="sparse")
    n_params = sum(p.numel() for p in sdpa_model.parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, bf16; MSA adds "
          f"{sum(p.numel() for p in msa.hf.index_parameters(msa_model)) / 1e6:.1f}M index parameters", flush=True)
    gate_res = gate(sdpa_model, msa_model, args.vocab)
    # warm-up: compile the Triton kernels and pick the SDPA backends outside the timed runs
    warm = torch.randint(1, args.vocab, (1, 4096), device="cuda")
    for m in (sdpa_model, msa_model):
        timed_generate(m, warm, 4)
        prefill_split(m, warm)
    rows = []
    for ctx in contexts:
        prompt = torch.randint(1, args.vocab, (1, ctx), device="cuda")
        row = {"context": ctx}
        for name, m in (("sdpa", sdpa_model), ("msa", msa_model)):
            torch.cuda.empty_cache()
            # the first forward at a new length compiles the Triton kernels' new specialisations
            # (the warm-up's 4K prompt takes the query-tiled path, longer ones KV-outer): reported
            # apart, the second one timed
            first, _ = prefill_split(m, prompt)
            total, attn = prefill_split(m, prompt)
            gen = timed_generate(m, prompt, args.new_tokens)
            row[name] = {"prefill_forward_ms": total, "prefill_attention_ms": attn,
                         "prefill_rest_ms": total - attn, "prefill_first_call_ms": first, **gen,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
            torch.cuda.reset_peak_memory_stats()
            print(f"{ctx:>7} {name:>4}: prefill {total:8.1f} ms (attention {attn:7.1f}), generate prefill "
                  f"{gen['prefill_ms']:8.1f} ms, decode {gen['decode_ms_per_token']:6.2f} ms/token", flush=True)
        # MSA without CUDA graphs: every decode step eager, like the sdpa model's
        eager_cache = msa.hf.MSAHFCache.for_model(msa_model, max_cache_len=ctx + args.new_tokens + 1, cuda_graphs=False)
        gen = timed_generate(msa_model, prompt, args.new_tokens, cache=eager_cache)
        del eager_cache
        row["msa_eager_decode_ms_per_token"] = gen["decode_ms_per_token"]
        print(f"{ctx:>7}  msa without CUDA graphs: decode {gen['decode_ms_per_token']:6.2f} ms/token", flush=True)
        s, ms = row["sdpa"], row["msa"]
        row["prefill_speedup"] = s["prefill_forward_ms"] / ms["prefill_forward_ms"]
        row["decode_speedup"] = s["decode_ms_per_token"] / ms["decode_ms_per_token"]
        row["same_first_tokens"] = sum(a == b for a, b in zip(s["tokens"], ms["tokens"]))
        rows.append(row)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "model": {"layers": args.layers, "hidden": 2048, "heads": 16, "kv_heads": 4, "head_dim": 128,
                     "intermediate": 8192, "vocab": args.vocab, "params": n_params, "dtype": "bf16"},
           "msa": {"block_size": 128, "topk_blocks": 16, "index_dim": 128, "mode": "sparse"},
           "new_tokens": args.new_tokens, "gate": gate_res, "results": rows,
           "wall_s": time.perf_counter() - t_start}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "hf.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{out['gpu']}, transformers {transformers.__version__}; wrote {path} ({out['wall_s']:.0f} s)")
    print("| context | prefill sdpa ms (attention) | prefill MSA ms (attention) | speedup | decode sdpa ms/token "
          "| decode MSA ms/token | speedup | decode MSA, no CUDA graphs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, m = r["sdpa"], r["msa"]
        print(f"| {r['context'] // 1024}K | {s['prefill_forward_ms']:.1f} ({s['prefill_attention_ms']:.1f}) | "
              f"{m['prefill_forward_ms']:.1f} ({m['prefill_attention_ms']:.1f}) | {r['prefill_speedup']:.2f}x | "
              f"{s['decode_ms_per_token']:.2f} | {m['decode_ms_per_token']:.2f} | {r['decode_speedup']:.2f}x | "
              f"{r['msa_eager_decode_ms_per_token']:.2f} |")
    return 0 if gate_res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
