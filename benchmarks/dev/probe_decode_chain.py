"""Decode at batch 1, one token, 128K and 1M, bf16 / fp8 index keys, in do_bench terms (graph replay,
L2 flushed): the legacy and the fused chain with the candidates' top-k as TOPK max reductions
(MSA_DECODE_BITONIC=0) and as tl.topk's bitonic network, the index kernel alone (the floor of any chain), dense SDPA,
graph floors of 1 / 2 / 5 tiny kernels; every chain's selection / output checked against the first.
PYTHONPATH=. python benchmarks/dev/probe_decode_chain.py OUT.json"""
import json
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_decode as bd  # noqa: E402
from msa.ops.decode import triton_kernels as tk  # noqa: E402
from msa.ops.decode.triton_impl import DecodePlan  # noqa: E402


class _Nop:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def prefix(plan, q, qi, keep):
    """Graph-replay ms of plan.run with only the kernels named in keep launched."""
    names = ["decode_index_fwd_kernel", "decode_topk_fwd_kernel", "decode_topk_merge_fwd_kernel",
             "decode_attention_fwd_kernel", "decode_merge_fwd_kernel"]
    saved = {n: getattr(tk, n) for n in names}
    try:
        for n in names:
            if n not in keep:
                setattr(tk, n, _Nop())
        fn = lambda: plan.run(q, qi, 0)  # noqa: E731
        return bd.bench(bd.graph_of(fn))
    finally:
        for n, f in saved.items():
            setattr(tk, n, f)


def plan_for(cache, bitonic, **kw):
    os.environ["MSA_DECODE_BITONIC"] = "1" if bitonic else "0"
    try:
        return DecodePlan(cache, num_heads=bd.HQ, block_size=bd.BS, topk=bd.TOPK, num_tokens=1, **kw)
    finally:
        os.environ.pop("MSA_DECODE_BITONIC")


def main():
    dev = torch.device("cuda")
    out = dict(gpu=torch.cuda.get_device_name(), rows=[])
    x = torch.zeros(8, device=dev)
    for n in (1, 2, 5):
        us = bd.bench(bd.graph_of(lambda: [x[i:i + 1].add_(1.0) for i in range(n)])) * 1000
        out[f"floor_{n}_us"] = us
        print(f"graph floor {n} kernels: {us:.2f} us", flush=True)
    for L in (1 << 17, 1 << 20):
        for idx in ("bf16", "fp8blk"):
            cache = bd.build_cache(1, L, False, idx, dev)
            q, qi = bd.make_queries(1, 1, dev)
            row = dict(L=L, index=idx)
            ref = None
            for name, bit, kw in (("legacy_reduce", False, dict(fused=False)), ("legacy_bitonic", True, dict(fused=False)),
                                  ("fused_reduce", False, dict(fused=True)), ("fused_bitonic", True, dict(fused=True))):
                plan = plan_for(cache, bit, **kw)
                o, s = plan.run(q, qi, 0)
                torch.cuda.synchronize()
                if ref is None:
                    ref = (o.float().clone(), s.clone())
                else:  # every chain: the same selection (ties: lowest id) and output
                    row[name + "_same_sel"] = bool(torch.equal(s, ref[1]))
                    row[name + "_max_abs"] = float((o.float() - ref[0]).abs().max())
                row[name + "_ms"] = bd.bench(bd.graph_of(lambda: plan.run(q, qi, 0)))
                row[name + "_flags"] = dict(bitonic=plan.bitonic, fused=plan.fused, att_splits=plan.att_splits,
                                            idx_splits=plan.idx_splits)
                if name.startswith("legacy") and L == 1 << 20:
                    row[name + "_timeline"] = bd.graph_timeline(bd.graph_of(lambda: plan.run(q, qi, 0)))
                    row[name + "_layer8_ms"] = bd.per_layer_ms(lambda: plan.run(q, qi, 0))
            plan = plan_for(cache, True, fused=False)
            row["index_only_ms"] = prefix(plan, q, qi, {"decode_index_fwd_kernel"})
            row["dense_ms"], row["dense_backend"], _, dfn = bd.time_dense(cache, L, q)
            if L == 1 << 20:
                row["dense_layer8_ms"] = bd.per_layer_ms(dfn)
            out["rows"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del cache
            torch.cuda.empty_cache()
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print("\nL       idx     legacy_reduce legacy_bitonic fused_reduce fused_bitonic index_only dense (ms)")
    for r in out["rows"]:
        print(f"{r['L']:<8}{r['index']:<8}" + "  ".join(f"{r[k]:.4f}" for k in (
            "legacy_reduce_ms", "legacy_bitonic_ms", "fused_reduce_ms", "fused_bitonic_ms", "index_only_ms", "dense_ms")))


if __name__ == "__main__":
    main()
