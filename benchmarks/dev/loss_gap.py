"""How far sparse-trained runs fall behind a dense run of the same data, step by step: the relative gap of the
training loss (mean over windows of steps) and of the validation loss at every evaluation, one line per run.

Why (quality round 17): the gap between dense and MSA opens only after ~1000 steps; a table of final losses hides
when, and a lever (``phase.dense_every``, a later switch) is judged by whether it moves that point.

    python benchmarks/dev/loss_gap.py --dense DIR/exp-dense --runs DIR/exp-msa-blockkl[,DIR/...] --out FILE.png
        [--window 150]

Writes FILE.png and FILE.json (the numbers plotted).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Tuple


def _log(run_dir: str) -> Tuple[Dict[int, float], Dict[int, float], Dict[int, str]]:
    """(train lm loss by step, validation loss by step, attention mode by step) of a run's log.jsonl."""
    train, val, mode = {}, {}, {}
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if "step" not in r:
                continue
            if "lm_loss" in r:  # a training step's record (an evaluation's step adds val_lm_loss to it)
                train[r["step"]], mode[r["step"]] = r["lm_loss"], r.get("mode", "")
            if r.get("val_lm_loss") is not None:
                val[r["step"]] = r["val_lm_loss"]
    return train, val, mode


def windowed_gap(run: Dict[int, float], dense: Dict[int, float], window: int) -> List[Tuple[int, float]]:
    """(window end step, mean(run) / mean(dense) - 1) over the steps both logged, in windows of `window` steps."""
    common = sorted(set(run) & set(dense))
    out = []
    for end in range(window, (common[-1] if common else 0) + window, window):
        steps = [s for s in common if end - window < s <= end]
        if steps:
            out.append((min(end, steps[-1]), sum(run[s] for s in steps) / sum(dense[s] for s in steps) - 1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", required=True, help="the dense run's directory")
    ap.add_argument("--runs", required=True, help="comma-separated run directories to compare with it")
    ap.add_argument("--out", required=True, help="output PNG (a JSON of the same name beside it)")
    ap.add_argument("--window", type=int, default=150, help="steps per training-loss window (default 150)")
    a = ap.parse_args()
    if a.window < 1:
        ap.error(f"--window must be >= 1, got {a.window}")
    for d in [a.dense] + a.runs.split(","):
        if not os.path.exists(os.path.join(d, "log.jsonl")):
            ap.error(f"no log.jsonl in {d!r}")
    d_train, d_val, _ = _log(a.dense)
    res = {"dense": a.dense, "window": a.window, "runs": {}}
    for rd in a.runs.split(","):
        train, val, mode = _log(rd)
        switch = min((s for s, m in mode.items() if m == "sparse"), default=None)
        res["runs"][os.path.basename(rd.rstrip("/"))] = {
            "train_gap": windowed_gap(train, d_train, a.window),
            "val_gap": [(s, val[s] / d_val[s] - 1) for s in sorted(set(val) & set(d_val))],
            "first_sparse_step": switch}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, r in res["runs"].items():
        for ax, key in zip(axes, ("train_gap", "val_gap")):
            xs, ys = zip(*r[key]) if r[key] else ((), ())
            line, = ax.plot(xs, [100 * y for y in ys], marker="." if key == "val_gap" else None, label=name)
            if r["first_sparse_step"] is not None:
                ax.axvline(r["first_sparse_step"], color=line.get_color(), ls=":", lw=1)
    for ax, title in zip(axes, (f"training loss vs dense (mean of {a.window}-step windows)",
                                "validation loss vs dense")):
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-1, 1, color="0.9", zorder=0)  # the target band: within 1% of dense
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (dotted: the first logged sparse step)")
        ax.set_ylabel("% above dense")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    for name, r in res["runs"].items():
        print(name, "val gap:", ", ".join(f"{s}: {100 * g:+.2f}%" for s, g in r["val_gap"]))


if __name__ == "__main__":
    main()
