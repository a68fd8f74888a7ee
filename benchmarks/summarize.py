"""Markdown tables of the committed benchmark results (benchmarks/results/*.json), for the README.

    python benchmarks/summarize.py [--results benchmarks/results]

Every number printed comes from the JSON files; the GPU, versions and command of each file are
printed with its table.
"""

from __future__ import annotations

import argparse
import json
import os


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _meta(d):
    m = d.get("meta", d)
    return f"{m.get('gpu')}, torch {m.get('torch')}, triton {m.get('triton')}; `{m.get('command')}`"


def _ms(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


# Prefill results, oldest first: a later file's row of the same T replaces an earlier one (the short
# lengths are re-measured more often than 128K and the 1M runs).
PREFILL_FILES = ("prefill_h200.json", "prefill_long_h200.json", "prefill_short_h200.json")


def _prefill_rows(folder, need=None):
    """(rows sorted by T, metas of the files that still contribute a row); need: keep only rows with
    this key."""
    by_t, src, metas = {}, {}, {}
    for name in PREFILL_FILES:
        d = _load(folder, name)
        if d is None:
            continue
        metas[name] = _meta(d)
        for r in d["results"]:
            if need is None or need in r:
                by_t[r["T"]], src[r["T"]] = r, name
    used = [metas[n] for n in PREFILL_FILES if n in src.values()]
    return [by_t[t] for t in sorted(by_t)], used


def prefill(folder):
    rows, metas = _prefill_rows(folder)
    out = ["| T | indexer ms | sparse attention ms | total ms | dense SDPA ms (best backend) | speedup | "
           "FlexAttention, ideal 16-block mask, no indexer ms |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["T"]):
        kern = r.get("auto_kernel", "kv")
        att = r.get(f"sparse_{kern}", {}).get("ms")
        dense = r.get("dense_best", {})
        note = " (extrapolated)" if dense.get("extrapolated") else (" (timed once)" if "once" in str(dense.get("note", "")) else "")
        flex = r.get("flex", {}).get("ms")
        out.append(f"| {r['T'] // 1024}K | {_ms(r['indexer'].get('ms'))} | {_ms(att)} ({kern}) | "
                   f"{_ms(r['total'].get('ms'))} | {_ms(dense.get('ms'), 1)}{note} | "
                   f"**{r['total'].get('speedup_vs_dense', float('nan')):.2f}x** | {_ms(flex)} |")
    return out, metas


def selections(folder):
    """Prefill and training step per kernel on random and on replayed trained selections."""
    rows, prefill_metas = _prefill_rows(folder, need="union_blocks")
    tr = _load(folder, "train_short_h200.json")
    if not rows:
        return [], []
    out = ["Forward (ms) of each kernel; union = distinct blocks per 8-token tile (per token: at most 16); "
           "total = indexer + the kernel `auto` picks.", "",
           "| T | selections | union | KV-outer | query-outer | query-tiled | auto | total | dense | speedup |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, where in (("random", r), ("trained (replayed)", r.get("realistic", {}))):
            if "union_blocks" not in where:
                continue
            auto = r.get("auto_kernel", "kv")
            att = where.get(f"sparse_{auto}", {}).get("ms")
            tot = None if att is None else att + r["indexer"]["ms"]
            dense = r.get("dense_best", {}).get("ms")
            out.append(f"| {r['T'] // 1024}K | {name} | {where['union_blocks']:.1f} | "
                       + " | ".join(_ms(where.get(f"sparse_{k}", {}).get("ms")) for k in ("kv", "qo", "tiled"))
                       + f" | {auto} | {_ms(tot)} | {_ms(dense)} | "
                       + (f"**{dense / tot:.2f}x** |" if tot and dense else "- |"))
    metas = list(prefill_metas)
    if tr is not None:
        out += ["", "Training step (select + attention fwd/bwd + KL fwd/bwd, ms) with the forward and dQ forced to "
                "KV-outer or query-tiled, and as `auto` picks; dense = SDPA fwd+bwd (best backend).", "",
                "| T | selections | KV-outer | query-tiled | auto | dense | speedup (auto) |", "|---|---|---|---|---|---|---|"]
        for r in tr["results"]:
            for name, sfx in (("random", ""), ("trained (replayed)", "_realistic")):
                cells = [r.get(f"sparse_step{sfx}_{k}_ms") for k in ("kv", "tiled")] + [r.get(f"sparse_step{sfx}_ms")]
                if not all(isinstance(c, float) for c in cells):
                    continue
                dense = r.get("dense_best_ms")
                out.append(f"| {r['T'] // 1024}K | {name} | " + " | ".join(_ms(c) for c in cells) + f" | {_ms(dense)} | "
                           + (f"**{dense / cells[2]:.2f}x** |" if dense else "- |"))
        metas.append(_meta(tr))
    return out, metas


def topk(folder):
    d = _load(folder, "topk_h200.json")
    if d is None:
        return [], []
    out = ["| rows x blocks, k | Triton ms | torch.topk ms | speedup |", "|---|---|---|---|"]
    for r in d["topk"]:
        out.append(f"| {r['rows'] // 1024}K x {r['blocks']}, {r['k']} | {r['triton_ms']:.3f} | {r['torch_topk_ms']:.3f} | "
                   f"{r['speedup']:.1f}x |")
    out += ["", "| indexer T | ms | index TFLOP/s (H_kv d_idx T^2) |", "|---|---|---|"]
    for r in d["indexer"]:
        out.append(f"| {r['T'] // 1024}K | {r['triton_ms']:.2f} | {r['index_TFLOPs']:.0f} |")
    return out, [_meta(d)]


def decode(folder, gpu="h200"):
    d = _load(folder, f"decode_{gpu}.json")
    if d is None:
        return [], []
    n = d.get("layers_per_graph", 8)
    out = [f"Device copy bandwidth measured in the same run: {d.get('copy_GBps', 0):.0f} GB/s; a captured graph "
           f"of one tiny kernel takes {d.get('graph_floor_us', float('nan')):.1f} us. Columns 5-8: one layer per "
           f"graph; last two: {n} layers chained in one graph (as a model's decode step), time per layer.", "",
           f"| batch | context | tokens/step | index keys | MSA ms | MSA GB/s | dense ms (backend) | speedup | "
           f"MSA / dense us per layer, {n} per graph | speedup, {n} per graph |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        if r.get("status") != "ok":
            continue
        pl = r.get("msa_ms_per_layer_8"), r.get("dense_ms_per_layer_8")
        pl_txt = f"{pl[0] * 1e3:.1f} / {pl[1] * 1e3:.1f}" if all(pl) else "-"
        sp = r.get("speedup_per_layer_8")
        out.append(f"| {r['B']} | {r['L'] // 1024}K | {r['t']} | {r['index']} | {r['msa_ms']:.4f} | "
                   f"{r['msa_GBps']:.0f} | {r['dense_ms']:.3f} ({r['dense_backend']}) | **{r['speedup']:.2f}x** | "
                   f"{pl_txt} | {'-' if sp is None else f'{sp:.2f}x'} |")
    return out, [_meta(d)]


def train(folder, gpu="h200"):
    d = _load(folder, f"train_{gpu}.json")
    if d is None:
        return [], []
    out = ["| T | sparse step ms (select + attn fwd/bwd + KL) | dense fwd+bwd ms (best SDPA) | speedup | "
           "warmup step ms | warmup / dense | sparse step peak GB |", "|---|---|---|---|---|---|---|"]
    def x(v, bold=False, digits=2):
        return "-" if not isinstance(v, (int, float)) else (f"**{v:.{digits}f}x**" if bold else f"{v:.{digits}f}x")
    earlier = set()
    for r in d["results"]:
        mark = " (a)" if r.get("from_earlier_run") else ""
        if mark:
            earlier.add(r["from_earlier_run"])
        out.append(f"| {r['T'] // 1024}K{mark} | {_ms(r.get('sparse_step_ms'), 1)} | {_ms(r.get('dense_best_ms'), 1)} | "
                   f"{x(r.get('sparse_speedup_vs_dense'), True)} | {_ms(r.get('warmup_step_best_ms'), 1)} | "
                   f"{x(r.get('warmup_over_dense'), digits=3)} | {_ms(r.get('sparse_step_peak_gb'), 1)} |")
    out.append("")
    for e in sorted(earlier):  # rows kept from an earlier run of the benchmark (the JSON's notes say why)
        out += [f"(a) from an earlier run: `{e}`", ""]
    for r in d["results"]:
        if r["T"] < 131072:
            continue
        for key, name in (("sparse_stages_ms", "sparse step"), ("warmup_cudnn_stages_ms", "warmup step (cuDNN)")):
            st = r.get(key)
            if st:
                out.append(f"Stages of the {name} at {r['T'] // 1024}K (ms): "
                           + ", ".join(f"{k} {v:.1f}" for k, v in st.items()) + "  ")
    return out, [_meta(d)]


def product(folder):
    """What a user calls: the layer, the model's training step, generate(), a converted HF model."""
    lines, metas = [], []
    d = _load(folder, "layer_h200.json")
    if d:
        lines += ["| T | layer sparse step ms | projections | sparse attention part | ops alone | part / ops | "
                  "warmup attention part | dense SDPA fwd+bwd | warmup / dense | sparse vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["layer"]:
            lines.append(f"| {r['T'] // 1024}K | {_ms(r['layer_sparse_ms'], 1)} | {_ms(r['projections_ms'], 1)} | "
                         f"{_ms(r['layer_sparse_attn_ms'], 1)} | {_ms(r['ops_sparse_ms'], 1)} | "
                         f"{r['sparse_attn_vs_ops']:.3f} | {_ms(r['layer_warmup_attn_ms'], 1)} | "
                         f"{_ms(r['dense_sdpa_ms'], 1)} | {r['warmup_attn_vs_dense']:.3f}x | "
                         f"**{r['sparse_speedup_vs_dense']:.2f}x** |")
        m = d["model"]
        lines += ["", f"4-layer model (hidden 2048), T = {m['T'] // 1024}K, training step: sparse "
                  f"{_ms(m['sparse_step_ms'], 1)} ms ({m['sparse_tokens_per_s']:,.0f} tok/s), "
                  f"`torch.compile(fullgraph=True)` {_ms(m['sparse_compiled_step_ms'], 1)} ms "
                  f"(loss differs by {m['compile_loss_abs_diff']:.1e}), warmup {_ms(m['warmup_step_ms'], 1)} ms, "
                  f"all layers dense {_ms(m['all_dense_step_ms'], 1)} ms.", ""]
        metas.append(_meta(d))
    d = _load(folder, "generate_h200.json")
    if d:
        c = d["config"]
        lines += [f"`generate()`, {c['layers']}-layer model (hidden {c['hidden']}, {c['heads']}/{c['kv_heads']} heads, "
                  f"d {c['head_dim']}), batch {c['batch']}, {c['new_tokens']} new tokens; greedy tokens of the "
                  f"captured step equal the uncaptured ones: {d['gate']}", "",
                  "| context | layers | ms / token | GPU ms / step | host share | eager ms / token | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            sp = d["speedup"].get(str(r["context"])) if r["kind"] == "msa" else None
            lines.append(f"| {r['context'] // 1024}K | {r['kind']} | {_ms(r['generate_ms_per_token'], 3)} | "
                         f"{_ms(r['gpu_ms_per_step'], 3)} | {100 * r['host_overhead']:.1f}% | "
                         f"{_ms(r['eager_ms_per_token'], 3)} | {'**%.2fx**' % sp if sp else ''} |")
        lines.append("")
        metas.append(_meta(d))
    d = _load(folder, "hf_h200.json")
    if d:
        m = d["model"]
        lines += [f"transformers {d.get('transformers')}: a {m['params'] / 1e9:.2f}B Llama ({m['layers']} layers, hidden "
                  f"{m['hidden']}, {m['heads']}/{m['kv_heads']} heads) converted by `msa.hf.to_msa`, bf16, batch 1, "
                  f"{d['new_tokens']} new tokens; beside the same model with transformers' own sdpa attention and "
                  "`generate()` (DynamicCache, eager steps: transformers' defaults).", "",
                  "| context | prefill sdpa ms (attention) | prefill MSA ms (attention) | speedup | decode sdpa ms/token "
                  "| decode MSA ms/token | speedup | MSA without CUDA graphs |", "|---|---|---|---|---|---|---|---|"]
        for r in d["results"]:
            a, b = r["sdpa"], r["msa"]
            lines.append(f"| {r['context'] // 1024}K | {_ms(a['prefill_forward_ms'], 1)} ({_ms(a['prefill_attention_ms'], 1)}) | "
                         f"{_ms(b['prefill_forward_ms'], 1)} ({_ms(b['prefill_attention_ms'], 1)}) | "
                         f"**{r['prefill_speedup']:.2f}x** | {_ms(a['decode_ms_per_token'])} | "
                         f"{_ms(b['decode_ms_per_token'])} | **{r['decode_speedup']:.1f}x** | "
                         f"{_ms(r.get('msa_eager_decode_ms_per_token'))} |")
        metas.append(_meta(d))
    return lines, metas


def plot_prefill(folder, path):
    """One picture of every prefill size in the committed JSON: time per stage and the speedup."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = _prefill_rows(folder)
    gpu = _load(folder, PREFILL_FILES[0])["meta"]["gpu"]
    ts = [r["T"] for r in rows]

    def series(key, sub="ms"):
        return [r.get(key, {}).get(sub) for r in rows]

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    att = [r.get(f"sparse_{r.get('auto_kernel', 'kv')}", {}).get("ms") for r in rows]
    for ys, label, style in ((series("dense_best"), "dense SDPA (best backend)", "k-o"),
                             (series("total"), "MSA total (indexer + attention)", "r-o"),
                             (series("indexer"), "MSA indexer + top-k", "b--o"), (att, "MSA sparse attention", "g--o"),
                             (series("flex"), "FlexAttention, ideal 16-block mask (no indexer)", "m:o")):
        pts = [(t, y) for t, y in zip(ts, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label, ms=4)
    ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms per layer (forward)",
           title=f"MSA prefill on {gpu}: 64/4/128, d_idx 128, B_k 128, k 16, bf16")
    ax.set_xticks(ts, [f"{t // 1024}K" for t in ts])
    ax.legend(fontsize=8)
    sp = [r["total"].get("speedup_vs_dense") for r in rows]
    ax2.plot(ts, sp, "r-o", label="measured speedup vs dense")
    ratio = [32 * t / (t + 131072) for t in ts]
    ax2.plot(ts, ratio, "k:", label="FLOP ratio (spec section 3)")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xscale="log", xlabel="tokens T", ylabel="speedup (x)", title="speedup over dense attention")
    ax2.set_xticks(ts, [f"{t // 1024}K" for t in ts])
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--plot", default=None, help="also write the combined prefill plot to this PNG")
    args = ap.parse_args()
    if args.plot:
        plot_prefill(args.results, args.plot)
    for title, fn in (("Prefill", prefill), ("Kernels on random and trained selections", selections),
                      ("Top-k and indexer", topk), ("Decode", decode), ("Training", train), ("The product path", product),
                      ("Decode, H100", lambda f: decode(f, "h100")), ("Training, H100", lambda f: train(f, "h100"))):
        lines, metas = fn(args.results)
        if not lines:
            continue
        print(f"### {title}\n")
        print("\n".join(lines))
        print("\n" + "\n".join(f"*{m}*" for m in metas) + "\n")


if __name__ == "__main__":
    main()
