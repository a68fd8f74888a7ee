"""Indexer recall through training, read from the committed GPU quality logs (no training here).

    python benchmarks/dev/recall_trajectories.py   # -> benchmarks/results/quality_h200/recall_trajectories.{png,json}

Plots, per evaluation, block recall, top-half recall and score recall of the MSA-PT runs of rounds 6,
7 and 8, round 8's late switch (sparse from step 350) and the MSA-CPT run of round 6, with the
teacher's entropy (how sharp the model's own attention is): the PT runs dip while the teacher sharpens
fast, then climb steadily to the end of the budget; the late-switch run dips as much while still dense
(the dip comes from the teacher, not from the switch); CPT (a converged teacher) climbs from its first
evaluation. Round 10's index probe continues its MSA-PT run from step 700 with the backbone frozen:
its recall climbs, but slowly. Round 11's probes (a 10x rate; a fresh, twice as wide index) level off
near 0.62, and its weight-decay run stays below its MSA-PT run. Round 12's probes, on one backbone:
the block-level objective (``phase.kl_target="block_max"``) levels off 0.04 above the token KL. Round
13 trains with that objective from the start (``exp-msa-blockkl``): above every MSA-PT run at every
evaluation, and 0.04 above the best at the end. Round 15 runs it for twice the steps (1400, the
schedule stretched: dense warmup to step 280): recall keeps rising to the end, 0.684 block recall.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "quality_h200"
RUNS = {"round 6 MSA-PT": "round6/exp-msa-pt", "round 6 MSA-PT, full-support KL every 4th step": "round6/exp-msa-fullkl",
        "round 7 MSA-PT (facts in every window)": "round7/exp-msa-pt",
        "round 8 MSA-PT (round 6 rerun)": "round8/exp-msa-pt",
        "round 8 late switch (dense to step 350)": "round8/exp-msa-lateswitch",
        "round 6 MSA-CPT (steps after the dense run)": "round6/exp-msa-cpt",
        "round 10 MSA-PT": "round10/exp-msa-pt",
        "round 10 index probe (backbone frozen after step 700)": "round10/exp-msa-indexprobe",
        "round 11 MSA-PT": "round11/exp-msa-pt",
        "round 11 index weight decay": "round11/exp-msa-indexwd",
        "round 11 probe, LR 1e-2 (sparse-mode evaluation)": "round11/probe-lr1e-2",
        "round 11 probe, fresh index of width 256": "round11/probe-d256",
        "round 12 probe, token KL": "round12/probe-tok",
        "round 12 probe, block_max KL": "round12/probe-bm",
        "round 13 the recipe with the block_max KL (exp-msa-blockkl)": "round13/exp-msa-blockkl",
        "round 14 MSA-PT, seed 1": "round14/exp-msa-pt",
        "round 14 exp-msa-blockkl, seed 1": "round14/exp-msa-blockkl",
        "round 15 exp-msa-blockkl, 1400 steps (warmup to step 280)": "round15/exp-msa-blockkl",
        "round 17 exp-msa-blockkl, 2100 steps (warmup to step 420)": "round17/exp-msa-blockkl"}
# runs that continue another run: their steps are drawn after its end
STEP_OFFSET = {"round10/exp-msa-indexprobe": 700, "round11/probe-lr1e-2": 700, "round11/probe-d256": 700,
               "round12/probe-tok": 700, "round12/probe-bm": 700}
KEYS = ("block_recall", "top_half_recall", "score_recall", "teacher_entropy", "max_rule_recall", "selected_mass",
        "oracle_mass", "val_lm_loss")


def load(run: str):
    rows = []
    for line in open(ROOT / run / "log.jsonl"):
        r = json.loads(line)
        if "block_recall" in r:
            rows.append({"step": r["step"] + STEP_OFFSET.get(run, 0), "mode": r["mode"], **{k: r.get(k) for k in KEYS}})
    return rows


def main():
    data = {name: load(run) for name, run in RUNS.items()}
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.5))
    for ax in axes:  # more runs than the default cycle's 10 colours
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
    latest = list(data)[-1]  # drawn in black, thick: the newest run is the one a reader looks for
    for name, rows in data.items():
        steps = [r["step"] for r in rows]
        style = {"color": "black", "lw": 2.5} if name == latest else {}
        for ax, key in zip(axes[:2], ("block_recall", "top_half_recall")):
            ax.plot(steps, [r[key] for r in rows], marker="o", label=name, **style)
        axes[2].plot(steps, [r["teacher_entropy"] for r in rows], marker="o", label=name, **style)
    for ax, title in zip(axes, ("block recall (top-16 of up to 128 blocks)", "top-half recall (the oracle's top 8 blocks)",
                                "teacher entropy (nats)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.axhline(0.70, color="gray", ls="--", lw=1)
        ax.axvline(140, color="gray", ls=":", lw=1)
        ax.axvline(350, color="gray", ls="-.", lw=1)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7.5)
    fig.suptitle("47M model, 16K context, one H200 (rounds 8-17: one H100): indexer recall against the model's dense attention\n"
                 "(PT: dense warmup to step 140, then sparse; late switch: to step 350; probes: after step 700; round 15: 1400 steps, warmup to 280; round 17: 2100, warmup to 420)")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(ROOT / "recall_trajectories.png", dpi=110)
    json.dump({"source": {k: f"benchmarks/results/quality_h200/{v}/log.jsonl" for k, v in RUNS.items()}, "runs": data},
              open(ROOT / "recall_trajectories.json", "w"), indent=1)
    for name, rows in data.items():
        print(name)
        for r in rows:
            print(f"  {r['step']:4d} {r['mode']:6s} block {r['block_recall']:.3f} top-half {r['top_half_recall']:.3f} "
                  f"score {r['score_recall']:.3f} entropy {r['teacher_entropy']:.2f}")


if __name__ == "__main__":
    main()
