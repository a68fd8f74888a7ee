"""How much the query-tiled kernels' union shrinks if a query block's tokens are grouped by selection
before they are cut into tiles (CPU; the greedy order is also built by the library's kernel,
``tuning.tile_order="greedy"``, which must give the same union as the Python greedy here).

The query-tiled forward walks, per tile of 8 tokens x G heads, the union of its tokens' selected blocks;
its executed MMA work is union / topk times the useful work. Tokens of one query block share their own
block, so any order of them within the block keeps the tile's causal structure (the union's last entry is
still the own block). Orders compared, per (query block, group):
- consecutive (today);
- lexicographic by each token's ascending id tuple (a few stable sorts: cheap on a GPU);
- greedy (seed = the first token left, then add the token that grows the union least; sequential).

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/dev/union_order.py [--sizes 8192,32768]

Selections: random index inputs (msa.select_blocks of Gaussian q_idx / k_idx) and the replayed ones of
a trained model (msa.bench.selections.realistic_indices). Results: docs/perf-notes.md, round 24.
"""

from __future__ import annotations

import argparse
import json

import torch

import msa
from msa.bench.selections import greedy_union_blocks, realistic_indices

H, K, BS, TT = 4, 16, 128, 8


def mean_union(x: torch.Tensor, order: torch.Tensor) -> float:
    """x (NB, H, BS, K) block ids (-1 unused), order (NB, H, BS) token order inside each block."""
    nb = x.shape[0]
    xs = torch.gather(x, 2, order.unsqueeze(-1).expand(*order.shape, K))
    tiles = xs.reshape(nb, H, BS // TT, TT * K).sort(-1).values
    distinct = ((tiles[..., 1:] != tiles[..., :-1]) & (tiles[..., 1:] >= 0)).sum(-1) + (tiles[..., 0] >= 0).long()
    return float(distinct.float().mean())


def lex_order(x: torch.Tensor) -> torch.Tensor:
    """Tokens sorted by their ascending id tuples (stable sorts from the last column to the first)."""
    keys = x.sort(-1).values
    order = torch.arange(BS).expand(*x.shape[:2], BS).clone()
    for c in reversed(range(K)):
        order = torch.gather(order, 2, torch.gather(keys[..., c], 2, order).argsort(dim=-1, stable=True))
    return order


def greedy_order(x: torch.Tensor) -> torch.Tensor:
    order = torch.empty(x.shape[:3], dtype=torch.int64)
    for b in range(x.shape[0]):
        for r in range(H):
            sets = [frozenset(int(i) for i in row if i >= 0) for row in x[b, r]]
            left, out = list(range(BS)), []
            while left:
                cur = [left.pop(0)]
                un = set(sets[cur[0]])
                while len(cur) < TT and left:
                    j = min(left, key=lambda i: len(sets[i] - un))
                    left.remove(j)
                    cur.append(j)
                    un |= sets[j]
                out += cur
            order[b, r] = torch.tensor(out)
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8192,32768")
    args = ap.parse_args()
    res = {}
    for t in (int(s) for s in args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        qi, ki = torch.randn(1, t, H, 32, generator=g), torch.randn(1, t, 32, generator=g)
        sels = {"random": msa.select_blocks(qi, ki, block_size=BS, topk=K, backend="reference")[0],
                "replayed": realistic_indices(t, H, K, BS, "cpu")[0]}
        for name, bi in sels.items():
            nb = t // BS
            x = bi[: nb * BS].reshape(nb, BS, H, K).permute(0, 2, 1, 3).contiguous()
            ident = torch.arange(BS).expand(nb, H, BS).contiguous()
            res[f"{t}_{name}"] = {"consecutive": mean_union(x, ident), "lexicographic": mean_union(x, lex_order(x)),
                                  "greedy": mean_union(x, greedy_order(x)),
                                  "greedy_kernel": greedy_union_blocks(bi[: nb * BS].unsqueeze(0), TT, BS)}
            print(t, name, json.dumps({k: round(v, 2) for k, v in res[f"{t}_{name}"].items()}), flush=True)


if __name__ == "__main__":
    main()
