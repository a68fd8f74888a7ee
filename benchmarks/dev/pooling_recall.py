"""How much of block recall's gap is the pooling rule? (quality issue, CPU analysis)

The index ranks a block by the MAX of its token scores (the spec); block recall ranks the teacher's
blocks by their attention MASS (the SUM over the block's tokens). For every MSA layer of a trained
``msa train`` run and some validation windows this prints the recall metrics of four selections,
all with the own block kept and causal blocks only:

- index max (select_blocks): the model's own selection; the script checks that its own max pooling
  reproduces it, so the log-sum-exp row differs from it only in the pooling;
- index lse: the same index scores pooled by log-sum-exp (the student's block mass);
- teacher mass: the teacher's block masses with the own block forced (what forcing the own block
  alone costs);
and the metric's ``max_rule_recall``: the block recall of a perfect student (p_idx = p) under the
max rule, the ceiling that the rule leaves whatever the index learns.

    python benchmarks/dev/pooling_recall.py --run /tmp/sm/msa --windows 8
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from msa.bench.selections import _load_run
from msa.evals.capture import capture_msa_layers
from msa.metrics import indexer_recall
from msa.ops.common import positions_in_sequence
from msa.ops.select_blocks import select_blocks


KEYS = ("block_recall", "score_recall", "selected_mass", "top_half_recall", "max_rule_recall")


def pooled_selection(tok: torch.Tensor, block_size: int, topk: int, how: str) -> torch.Tensor:
    """tok: (T, H_kv, T) causal token scores (-inf above the diagonal). Returns int32 (1, T, H_kv, topk)
    block ids (-1 where fewer blocks exist), the own block always included."""
    t, hkv, _ = tok.shape
    nb = math.ceil(t / block_size)
    pad = torch.nn.functional.pad(tok, (0, nb * block_size - t), value=float("-inf")).view(t, hkv, nb, block_size)
    blk = pad.amax(-1) if how == "max" else torch.logsumexp(pad, -1)
    own = torch.arange(t) // block_size
    blk[torch.arange(t), :, own] = float("inf")
    k = min(topk, nb)
    val, ids = blk.topk(k, -1)
    ids = torch.where(val > float("-inf"), ids, torch.full_like(ids, -1))
    if k < topk:
        ids = torch.cat([ids, ids.new_full((t, hkv, topk - k), -1)], -1)
    return ids.to(torch.int32).unsqueeze(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    sums: dict = {}
    meta = None
    for w in range(a.windows):
        cfg, model, ids, meta = _load_run(a.run, "cpu", w)
        t = ids.shape[1]
        pos = positions_in_sequence(t, None, ids.device).view(1, t)
        with torch.no_grad(), capture_msa_layers(model) as recs:
            model(ids, compute_kl=False)
        with torch.no_grad():
            for r in recs:
                c = r.attn.config
                q, k, _, q_idx, k_idx = r.attn.project(r.x, pos)
                hkv, g = c.num_kv_heads, c.num_heads // c.num_kv_heads
                causal = torch.ones(t, t, dtype=torch.bool).tril()
                s_idx = torch.einsum("trd,jd->trj", q_idx[0].float(), k_idx[0].float()) * c.index_dim ** -0.5
                s_idx = s_idx.masked_fill(~causal.view(t, 1, t), float("-inf"))
                sc = torch.einsum("trgd,jrd->trgj", q[0].float().view(t, hkv, g, -1), k[0].float()) * c.head_dim ** -0.5
                teacher = torch.softmax(sc.masked_fill(~causal.view(t, 1, 1, t), float("-inf")), -1).mean(2)
                model_sel = select_blocks(q_idx, k_idx, block_size=c.block_size, topk=c.topk_blocks,
                                          init_blocks=c.init_blocks, local_blocks=c.local_blocks, backend="reference")
                mine = pooled_selection(s_idx, c.block_size, c.topk_blocks, "max")
                sels = {"index lse": pooled_selection(s_idx, c.block_size, c.topk_blocks, "lse"),
                        "teacher mass": pooled_selection(teacher.clamp_min(1e-30).log(), c.block_size, c.topk_blocks,
                                                         "lse")}
                same = float((model_sel.sort(-1).values == mine.sort(-1).values).float().mean())
                for name, sel in [("index max (select_blocks)", model_sel)] + list(sels.items()):
                    res = indexer_recall(q.float(), k.float(), sel, block_size=c.block_size,
                                         init_blocks=c.init_blocks, local_blocks=c.local_blocks)
                    acc = sums.setdefault((r.layer, name), {"n": 0})
                    for key in KEYS:
                        acc[key] = acc.get(key, 0.0) + res[key] * res["queries"]
                    acc["n"] += res["queries"]
                sums.setdefault((r.layer, "agree"), []).append(same)
    rows = []
    for (layer, name), acc in sorted(sums.items(), key=lambda x: (x[0][0], x[0][1])):
        if name == "agree":
            continue
        rows.append({"layer": layer, "selection": name,
                     **{k: acc[k] / acc["n"] for k in KEYS}})
    print(f"{meta['run']} ({meta['checkpoint']}), {a.windows} validation windows of {meta['seq_len']} tokens")
    print("| layer | selection | block recall | score recall | selected mass | top-half recall | max-rule recall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['selection']} | {r['block_recall']:.3f} | {r['score_recall']:.3f} | "
              f"{r['selected_mass']:.3f} | {r['top_half_recall']:.3f} | {r['max_rule_recall']:.3f} |")
    agree = {str(lay): sum(v) / len(v) for (lay, n), v in sums.items() if n == "agree"}
    print("share of slots where select_blocks equals the max-pooled re-selection, per layer:", agree)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "windows": a.windows, "rows": rows, "agree": agree}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
