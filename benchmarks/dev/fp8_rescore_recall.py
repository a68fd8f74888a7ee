"""Block recall of fp8 index scores against the exact selection, with and without exact rescoring of
extra fp8 candidates (``msa.select_blocks(fp8_scores=True, fp8_rescore_blocks=E)``), on the index
projections of trained runs (every MSA layer, two validation windows). CPU, reference backend; the
inputs are rounded to bf16 first, as the GPU sees them.

    PYTHONPATH=. python benchmarks/dev/fp8_rescore_recall.py RUN_DIR [RUN_DIR ...] --out FILE.json

RUN_DIR: ``msa train`` runs, e.g. the ``small`` preset at 2048 tokens with top-16 of 128 blocks of 16:
``msa train --preset small --set data.seq_len=2048 --set data.batch_size=1 --set model.block_size=16
--set model.topk_blocks=16 --set eval.retrieval_lengths=[2048]`` (add ``--set precision=bf16`` for a
bf16-trained one). Results: docs/perf-notes.md, round 25.
"""

from __future__ import annotations

import argparse
import json

import torch

import msa
from msa.bench.selections import _load_run, selection_recall
from msa.evals.capture import capture_msa_layers

EXTRAS = (0, 1, 2, 4, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"meta": {"machine": "CPU", "torch": torch.__version__, "extras": list(EXTRAS),
                    "what": "block recall against the exact (bf16-input, fp32-math) selection; extra E = "
                            "fp8_rescore_blocks (0: the fp8 selection alone)"}, "recall": {}}
    for run in args.runs:
        for window in range(args.windows):
            cfg, model, ids, _ = _load_run(run, "cpu", window)
            m = cfg.model
            pos = torch.arange(ids.shape[1]).view(1, -1)
            with capture_msa_layers(model, keep_input=True) as recs, torch.no_grad():
                model(ids, compute_kl=False)
            kw = dict(block_size=m.block_size, topk=m.topk_blocks, init_blocks=m.init_blocks,
                      local_blocks=m.local_blocks, scale=m.index_dim ** -0.5, backend="reference")
            for r in recs:
                with torch.no_grad():
                    _, _, _, qi, ki = r.attn.project(r.x, pos)
                qi, ki = (x.to(torch.bfloat16).float() for x in (qi, ki))
                exact = msa.select_blocks(qi, ki, **kw)
                row = {e: selection_recall(exact, msa.select_blocks(qi, ki, fp8_scores=True, fp8_rescore_blocks=e, **kw))
                       for e in EXTRAS}
                res["recall"][f"{run}:window{window}:layer{r.layer}"] = row
                print(run, window, r.layer, {e: round(v, 4) for e, v in row.items()}, flush=True)
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
