"""PNG plots of one run (losses, per-layer KL, recall, learning rate, loss by position) and of a
set of runs side by side (the experiment summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(history: List[Dict], final: Optional[Dict], path: Path, *, title: str = "",
             warmup: Optional[int] = None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    steps = [r["step"] for r in history]
    ev = [r for r in history if "val_lm_loss" in r]
    a = ax[0, 0]
    a.plot(steps, [r["lm_loss"] for r in history], alpha=0.4, lw=0.8, label="train")
    a.plot([r["step"] for r in ev], [r["val_lm_loss"] for r in ev], "o-", ms=3, label="validation")
    a.set(title="LM loss", xlabel="step", ylabel="nats / token")
    a.legend()
    a = ax[0, 1]
    layers = sorted({k for r in history for k in r.get("layer_kl", {})}, key=int)
    for k in layers:
        a.plot([r["step"] for r in history if k in r.get("layer_kl", {})],
               [r["layer_kl"][k] for r in history if k in r.get("layer_kl", {})], lw=0.9, label=f"layer {k}")
    a.set(title="indexer KL per layer (train; support of the current mode)", xlabel="step", ylabel="KL (nats)")
    if layers and all(v > 0 for r in history for v in r.get("layer_kl", {}).values()):
        a.set_yscale("log")  # the warmup (full support) and sparse KLs differ by orders of magnitude
    if layers:
        a.legend(fontsize=7)
    ax2 = a.twinx()
    rec = [r for r in ev if "block_recall" in r]
    if rec:
        ax2.plot([r["step"] for r in rec], [r["block_recall"] for r in rec], "g--o", ms=3, label="block recall")
        ax2.plot([r["step"] for r in rec], [r["score_recall"] for r in rec], "m--o", ms=3, label="score recall")
        sm = [r for r in rec if "selected_mass" in r]
        if sm:
            ax2.plot([r["step"] for r in sm], [r["selected_mass"] for r in sm], "c--o", ms=3,
                     label="attention mass selected")
        ax2.set_ylim(0, 1.02)
        ax2.legend(loc="lower right", fontsize=7)
    a = ax[1, 0]
    a.plot(steps, [r.get("lr", 0) for r in history], label="backbone lr")
    if any(r.get("index_lr") is not None for r in history):
        a.plot(steps, [r.get("index_lr") or 0 for r in history], "--", label="index lr")
    a.set(title="learning rate; induction (msa.evals.induction)", xlabel="step")
    a.legend(loc="upper left")
    ind = [r for r in ev if r.get("induction")]
    if ind:  # when the model starts to copy: top-1 accuracy on the repeat of random tokens, per period
        ax3 = a.twinx()
        for period in sorted(ind[-1]["induction"], key=int):
            pts = [(r["step"], r["induction"][period]["second_acc"]) for r in ind if period in r["induction"]]
            ax3.plot(*zip(*pts), "o--", ms=3, label=f"repeat accuracy, period {period}")
        ax3.set_ylim(0, 1.02)
        ax3.legend(loc="upper right", fontsize=7)
    a = ax[1, 1]
    if final and final.get("buckets"):
        bs = [b for b in final["buckets"]["buckets"] if b["loss"] is not None]
        a.bar(range(len(bs)), [b["loss"] for b in bs], tick_label=[f"{b['start']}-{b['end']}" for b in bs])
        a.set(title="test loss by position (final)", xlabel="tokens into the document", ylabel="nats / token")
        a.tick_params(axis="x", labelrotation=30)
    else:
        a.axis("off")
    if warmup:
        for a in (ax[0, 0], ax[0, 1], ax[1, 0]):
            a.axvline(warmup, color="gray", ls=":", lw=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(runs: Dict[str, Dict], path: Path, *, names: Optional[Sequence[str]] = None) -> None:
    """runs: name -> {"history": [...], "final": {...} or None, "token_offset": tokens before the
    run's first step (continued runs)}. Validation loss, KL, recall and loss-by-position of several runs."""
    plt = _plt()
    names = list(names or runs)
    fig, ax = plt.subplots(2, 2, figsize=(14, 10))
    # one colour per run in every panel (recall draws two lines per run: score solid, block dashed)
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, n in enumerate(names):
        c = cmap(i % cmap.N)
        h = runs[n].get("history") or []
        ev = [r for r in h if "val_lm_loss" in r]
        if ev:
            off = runs[n].get("token_offset", 0.0)
            ax[0, 0].plot([(off + r["tokens_seen"]) / 1e6 for r in ev], [r["val_lm_loss"] for r in ev], "o-", ms=2,
                          color=c, label=n)
        kl = [r for r in h if r.get("kl")]
        if kl:
            ax[0, 1].plot([r["step"] for r in kl], [r["kl"] for r in kl], lw=0.8, color=c, label=n)
        rc = [r for r in ev if "score_recall" in r]
        if rc:
            ax[1, 0].plot([r["step"] for r in rc], [r["score_recall"] for r in rc], "o-", ms=2, color=c,
                          label=f"{n} score")
            ax[1, 0].plot([r["step"] for r in rc], [r["block_recall"] for r in rc], "x--", ms=3, color=c,
                          label=f"{n} block")
        fin = runs[n].get("final") or {}
        bs = [b for b in (fin.get("buckets") or {}).get("buckets", []) if b["loss"] is not None]
        if bs:
            ax[1, 1].plot([b["end"] for b in bs], [b["loss"] for b in bs], "o-", color=c, label=n)
    ax[0, 0].set(title="validation LM loss", xlabel="million tokens", ylabel="nats / token")
    ax[0, 1].set(title="KL (sum over MSA layers, train)", xlabel="step", yscale="log")
    ax[1, 0].set(title="indexer recall (validation)", xlabel="step", ylim=(0, 1.02))
    ax[1, 1].set(title="test loss by position (bucket end)", xlabel="tokens into the document", xscale="log",
                 ylabel="nats / token")
    for a in ax.flat:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
