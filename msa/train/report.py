"""Summaries of a directory of ``msa train`` runs (the quality experiments): a results JSON, a
comparison plot and a markdown table with the issue's targets checked, for the README."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median
from typing import Dict, List, Optional

ORDER = ["exp-dense", "exp-msa-pt", "exp-local", "exp-msa-nowarmup", "exp-msa-nodetach", "exp-msa-noindexrope",
         "exp-msa-k8", "exp-msa-indexlr", "exp-msa-sink", "exp-msa-idx64", "exp-msa-fullkl", "exp-msa-lateswitch",
         "exp-msa-indexconst", "exp-msa-indexwd", "exp-msa-blockkl", "exp-msa-densemix", "exp-msa-k32",
         "exp-dense-cont", "exp-msa-cpt", "exp-msa-indexprobe"]


def load_runs(root: str) -> Dict[str, Dict]:
    """name -> {"summary", "history", "final", "config"} for every run directory under root."""
    runs = {}
    for d in sorted(Path(root).iterdir()):
        if not (d / "summary.json").exists():
            continue
        hist = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] if (d / "log.jsonl").exists() else []
        final = json.loads((d / "final_eval.json").read_text()) if (d / "final_eval.json").exists() else None
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        runs[d.name] = {"summary": json.loads((d / "summary.json").read_text()), "history": hist, "final": final,
                        "config": cfg}
    return runs


def loss_beyond(final: Optional[Dict], start: int) -> Optional[float]:
    """Token-weighted test loss over the position buckets that start at or after ``start``."""
    if not final or not final.get("buckets"):
        return None
    bs = [b for b in final["buckets"]["buckets"] if b["start"] >= start and b["loss"] is not None]
    n = sum(b["tokens"] for b in bs)
    return sum(b["loss"] * b["tokens"] for b in bs) / n if n else None


def retrieval_at(final: Optional[Dict], lengths: List[int], key: str = "by_length",
                 tasks: Optional[List[str]] = None) -> Optional[float]:
    """Mean retrieval accuracy (key "by_length") or fact gain ("gain_by_length", nats) over tasks (all
    measured ones, or those named) at the given lengths (those that were measured; runs evaluated
    before the gain, or the task, existed have none)."""
    if not final or not final.get("retrieval"):
        return None
    vals = []
    for name, t in final["retrieval"]["tasks"].items():
        if tasks is not None and name not in tasks:
            continue
        for L in lengths:
            v = t.get(key, {}).get(str(L))
            if v is not None:
                vals.append(v)
    return sum(vals) / len(vals) if vals else None


def gain_se_at(final: Optional[Dict], lengths: List[int]) -> Optional[float]:
    """Standard error of ``retrieval_at(final, lengths, "gain_by_length")`` (a mean of per-task,
    per-length means, each with its own standard error); None where one is missing."""
    if not final or not final.get("retrieval"):
        return None
    ses = [t.get("gain_se_by_length", {}).get(str(L)) for t in final["retrieval"]["tasks"].values() for L in lengths
           if t.get("gain_by_length", {}).get(str(L)) is not None]
    if not ses or any(x is None for x in ses):
        return None
    return sum(x * x for x in ses) ** 0.5 / len(ses)


def step_seconds(history: List[Dict], skip: int = 10) -> Dict[str, float]:
    """Median seconds of one training step per attention mode ("dense": a dense run, an MSA run's warmup and
    its dense_every steps; "sparse": MSA's sparse phase, the local window) over the logged steps after the first
    ``skip`` (Triton compiles).
    A step's time is synced (``step_s``), so these are what the recipe costs, the KL included."""
    by_mode: Dict[str, List[float]] = {}
    for h in history:
        if h.get("step_s") is not None and h.get("mode") and int(h.get("step", 0)) > skip:
            by_mode.setdefault(h["mode"], []).append(float(h["step_s"]))
    return {m: median(v) for m, v in by_mode.items()}


def _pm(x: Optional[float], se: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def rows(runs: Dict[str, Dict]) -> List[Dict]:
    names = [n for n in ORDER if n in runs] + [n for n in runs if n not in ORDER]
    out = []
    for n in names:
        s, fin = runs[n]["summary"], runs[n]["final"]
        out.append({
            "run": n, "status": s.get("status"), "kind": s.get("kind"), "steps": s.get("step"),
            "tokens_M": s.get("tokens_seen", 0) / 1e6, "params_M": s.get("parameters", {}).get("total", 0) / 1e6,
            "val_loss": s.get("val_lm_loss"), "test_loss_lt4k": _weighted(fin, 0, 4096),
            "test_loss_ge4k": loss_beyond(fin, 4096),
            "retrieval_8k_16k": retrieval_at(fin, [8192, 16384]), "retrieval_all": (fin or {}).get("retrieval", {}).get("mean"),
            "fact_gain_8k_16k": retrieval_at(fin, [8192, 16384], "gain_by_length"),
            "fact_gain_8k_16k_se": gain_se_at(fin, [8192, 16384]),
            "copy_8k_16k": retrieval_at(fin, [8192, 16384], tasks=["copy"]),
            "copy_gain_8k_16k": retrieval_at(fin, [8192, 16384], "gain_by_length", tasks=["copy"]),
            "block_recall": s.get("block_recall"), "score_recall": s.get("score_recall"),
            "selected_mass": s.get("selected_mass"), "teacher_entropy": s.get("teacher_entropy"),
            "oracle_mass": s.get("oracle_mass"), "top_half_recall": s.get("top_half_recall"),
            "max_rule_recall": s.get("max_rule_recall"),
            "val_by_step": {int(h["step"]): h["val_lm_loss"] for h in runs[n]["history"]
                            if h.get("val_lm_loss") is not None and "step" in h},
            "test_buckets": [(b["start"], b["end"], b["loss"]) for b in ((fin or {}).get("buckets") or {}).get("buckets", [])],
            "kl_sparse_first": s.get("sparse_kl_first_quarter"), "kl_sparse_last": s.get("sparse_kl_last_quarter"),
            "train_min": s.get("train_seconds", 0) / 60, "step_s": step_seconds(runs[n]["history"]),
            "induction": _induction(fin),
            **_seeds(runs[n].get("config"))})
    return out


def _induction(final: Optional[Dict]) -> Optional[Dict]:
    """{"near": stats, "far": stats} of the final induction test (``msa.evals.induction``: the shorter and the
    longer period; one period serves as both), or None for runs evaluated before it existed."""
    ind = (final or {}).get("induction")
    if not ind:
        return None
    periods = sorted(ind, key=int)
    return {"near": ind[periods[0]], "far": ind[periods[-1]], "periods": [int(periods[0]), int(periods[-1])]}


def _seeds(config: Optional[Dict]) -> Dict:
    """The run's seed and what drew its evaluation windows: (data.seed: the split, eval.seed: the windows
    and retrieval prompts). Runs from before eval.seed existed drew their windows from the run's seed."""
    cfg = (config or {}).get("config") or {}
    seed = cfg.get("seed")
    return {"seed": seed, "eval_windows": [(cfg.get("data") or {}).get("seed"), (cfg.get("eval") or {}).get("seed", seed)]}


def _weighted(final, lo, hi) -> Optional[float]:
    if not final or not final.get("buckets"):
        return None
    bs = [b for b in final["buckets"]["buckets"] if lo <= b["start"] and b["end"] <= hi and b["loss"] is not None]
    n = sum(b["tokens"] for b in bs)
    return sum(b["loss"] * b["tokens"] for b in bs) / n if n else None


def targets(rs: List[Dict]) -> List[str]:
    """The issue's targets, each with the measured numbers (only where the runs exist)."""
    r = {x["run"]: x for x in rs}
    lines = []

    def rel(a, b):
        return None if a is None or b is None else (a - b) / b

    def same_windows(a, b):
        """Losses and retrieval compare only between runs evaluated on the same windows."""
        x, y = r[a], r[b]
        if x.get("eval_windows") == y.get("eval_windows"):
            return True
        lines.append(f"{a} vs {b}: not compared, evaluated on different windows (data.seed, eval.seed: "
                     f"{x.get('eval_windows')} / {y.get('eval_windows')})")
        return False

    def val_vs(x, y):
        """(relative val-loss difference of run x over run y, note): at the runs' ends when they ended
        at the same step, else at the last evaluation step both reached (an interrupted run is not
        compared with a finished one at more tokens)."""
        if x["steps"] == y["steps"]:
            return rel(x["val_loss"], y["val_loss"]), ""
        common = sorted(set(x.get("val_by_step", {})) & set(y.get("val_by_step", {})))
        if not common:
            return None, ""
        st = common[-1]
        return (rel(x["val_by_step"][st], y["val_by_step"][st]),
                f" at step {st}, the last evaluation both reached (they ended at {x['steps']} and {y['steps']})")

    if "exp-msa-pt" in r and "exp-dense" in r and same_windows("exp-msa-pt", "exp-dense"):
        d, note = val_vs(r["exp-msa-pt"], r["exp-dense"])
        if d is not None:
            lines.append(f"MSA-PT validation loss vs dense: {d:+.2%}{note} (target within +1%): "
                         f"{'met' if d <= 0.01 else 'MISSED'}")
        a, b = r["exp-dense"]["retrieval_8k_16k"], r["exp-msa-pt"]["retrieval_8k_16k"]
        if a and b is not None:
            lines.append(f"retrieval 8K-16K: MSA-PT {b:.3f} vs dense {a:.3f} = {b / a:.1%} of dense (target >= 95%): "
                         f"{'met' if b >= 0.95 * a else 'MISSED'}")
        a, b = r["exp-dense"].get("fact_gain_8k_16k"), r["exp-msa-pt"].get("fact_gain_8k_16k")
        if a is not None and b is not None:
            # the continuous proxy of retrieval while exact match is 0 for every model
            share = f" = {b / a:.1%} of dense" if a > 0 else " (dense gains nothing)"
            lines.append(f"fact gain 8K-16K (nats per answer token, ± standard error): MSA-PT "
                         f"{_pm(b, r['exp-msa-pt'].get('fact_gain_8k_16k_se'))} vs dense "
                         f"{_pm(a, r['exp-dense'].get('fact_gain_8k_16k_se'))}{share}")
        a, b = r["exp-dense"].get("copy_8k_16k"), r["exp-msa-pt"].get("copy_8k_16k")
        if a and b is not None:
            # copy alone: the value tasks score 0 for models that do not bind names to values yet
            lines.append(f"copy 8K-16K (lines of a repeated span predicted exactly): MSA-PT {b:.3f} vs dense {a:.3f} "
                         f"= {b / a:.1%} of dense (target >= 95%): {'met' if b >= 0.95 * a else 'MISSED'}")
    if "exp-msa-pt" in r and "exp-local" in r and same_windows("exp-msa-pt", "exp-local"):
        a, b = r["exp-msa-pt"]["test_loss_ge4k"], r["exp-local"]["test_loss_ge4k"]
        if a is not None and b is not None:
            lines.append(f"test loss beyond 4K: MSA-PT {a:.4f} vs local window {b:.4f} (target below): "
                         f"{'met' if a < b else 'MISSED'}")
        a, b = r["exp-msa-pt"]["retrieval_8k_16k"], r["exp-local"]["retrieval_8k_16k"]
        if a is not None and b is not None:
            lines.append(f"retrieval 8K-16K: MSA-PT {a:.3f} vs local window {b:.3f}")
        a, b = r["exp-msa-pt"].get("fact_gain_8k_16k"), r["exp-local"].get("fact_gain_8k_16k")
        if a is not None and b is not None:
            lines.append(f"fact gain 8K-16K: MSA-PT {_pm(a, r['exp-msa-pt'].get('fact_gain_8k_16k_se'))} vs local "
                         f"window {_pm(b, r['exp-local'].get('fact_gain_8k_16k_se'))} nats")
        a, b = r["exp-msa-pt"].get("copy_8k_16k"), r["exp-local"].get("copy_8k_16k")
        if a is not None and b is not None:
            lines.append(f"copy 8K-16K: MSA-PT {a:.3f} vs local window {b:.3f}")
    if "exp-msa-pt" in r:
        x = r["exp-msa-pt"]
        if x["score_recall"] is not None:
            lines.append(f"MSA-PT recall at the end: score {x['score_recall']:.3f} (target >= 0.90: "
                         f"{'met' if x['score_recall'] >= 0.9 else 'MISSED'}), block {x['block_recall']:.3f} "
                         f"(target >= 0.70: {'met' if x['block_recall'] >= 0.7 else 'MISSED'})")
        if x["kl_sparse_first"] is not None:
            lines.append(f"MSA-PT KL in the sparse phase: first quarter {x['kl_sparse_first']:.4g} -> last quarter "
                         f"{x['kl_sparse_last']:.4g} (target falling): "
                         f"{'met' if x['kl_sparse_last'] < x['kl_sparse_first'] else 'MISSED'}")
        for ab in ("exp-msa-nowarmup", "exp-msa-nodetach"):
            if ab in r and r[ab]["val_loss"] is not None and x["val_loss"] is not None and same_windows(ab, "exp-msa-pt"):
                d, note = val_vs(r[ab], x)
                if d is not None:
                    lines.append(f"{ab} validation loss vs MSA-PT: {d:+.2%}{note} (target worse): "
                                 f"{'met' if d > 0 else 'MISSED'}")
    # every sparse-trained run against dense at equal steps, by position too: a gap that is as large where MSA
    # reads every block (the first topk_blocks blocks) as far out is in the weights, not in what MSA reads
    if "exp-dense" in r:
        for x in rs:
            if x["kind"] != "msa" or x["run"] in ("exp-msa-cpt", "exp-msa-indexprobe") \
                    or not same_windows(x["run"], "exp-dense"):
                continue
            d, note = val_vs(x, r["exp-dense"])
            if d is None:
                continue
            dense_b = {(a, b): v for a, b, v in r["exp-dense"].get("test_buckets", [])}
            by_pos = [f"{_k(a)}-{_k(b)} {rel(v, dense_b[(a, b)]):+.1%}" for a, b, v in x.get("test_buckets", [])
                      if v is not None and dense_b.get((a, b)) and x["steps"] == r["exp-dense"]["steps"]]
            ind, dind = x.get("induction"), r["exp-dense"].get("induction")
            # copying from half a context back: a candidate for what a sparse-trained backbone learns worse
            copy_far = (f"; induction at period {ind['periods'][1]}: repeat accuracy {ind['far']['second_acc']:.3f} vs "
                        f"dense {dind['far']['second_acc']:.3f}, gain {ind['far']['gain']:.2f} vs {dind['far']['gain']:.2f} "
                        f"nats" if ind and dind and ind["periods"] == dind["periods"] else "")
            lines.append(f"{x['run']} vs dense: validation loss {d:+.2%}{note}"
                         + (f"; test loss by position {', '.join(by_pos)}" if by_pos else "") + copy_far)
    if "exp-msa-cpt" in r and "exp-dense-cont" in r and same_windows("exp-msa-cpt", "exp-dense-cont"):
        d, note = val_vs(r["exp-msa-cpt"], r["exp-dense-cont"])
        if d is not None:
            lines.append(f"MSA-CPT validation loss vs equally continued dense: {d:+.2%}{note} (target within +1%): "
                         f"{'met' if d <= 0.01 else 'MISSED'}")
    return lines


def _k(n: int) -> str:
    """Token positions as the bucket edges are written: 0, 512, 1K, 16K."""
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def markdown(rs: List[Dict], command: str = "") -> str:
    head = ("| run | kind | steps | tokens (M) | params (M) | val loss | test loss < 4K | test loss >= 4K | "
            "retrieval 8K-16K | retrieval all | fact gain 8K-16K | block recall | score recall | selected mass | "
            "oracle mass | top-half recall | max-rule recall | teacher entropy | sparse KL first -> last | train min | "
            "seed (eval windows) | copy 8K-16K: accuracy / gain | step s: dense / sparse | induction accuracy: near / far |")
    sep = "|" + "---|" * 24
    lines = [head, sep]
    for x in rs:
        kl = "-" if x["kl_sparse_first"] is None else f"{x['kl_sparse_first']:.3g} -> {x['kl_sparse_last']:.3g}"
        lines.append(f"| {x['run']}{'' if x['status'] == 'complete' else ' (' + str(x['status']) + ')'} | {x['kind']} | "
                     f"{x['steps']} | {x['tokens_M']:.1f} | {x['params_M']:.1f} | {_f(x['val_loss'])} | "
                     f"{_f(x['test_loss_lt4k'])} | {_f(x['test_loss_ge4k'])} | {_f(x['retrieval_8k_16k'], '{:.3f}')} | "
                     f"{_f(x['retrieval_all'], '{:.3f}')} | {_f(x.get('fact_gain_8k_16k'), '{:.3f}')} | "
                     f"{_f(x['block_recall'], '{:.3f}')} | "
                     f"{_f(x['score_recall'], '{:.3f}')} | {_f(x.get('selected_mass'), '{:.3f}')} | "
                     f"{_f(x.get('oracle_mass'), '{:.3f}')} | {_f(x.get('top_half_recall'), '{:.3f}')} | "
                     f"{_f(x.get('max_rule_recall'), '{:.3f}')} | {_f(x.get('teacher_entropy'), '{:.2f}')} | {kl} | {x['train_min']:.1f} | "
                     f"{_seed_cell(x)} | {_copy_cell(x)} | {_step_cell(x)} | {_induction_cell(x)} |")
    t = targets(rs)
    if t:
        lines += ["", "Targets:", ""] + [f"- {x}" for x in t]
    if command:
        lines += ["", f"*`{command}`*"]
    return "\n".join(lines) + "\n"


def _copy_cell(x: Dict) -> str:
    """"0.750 / 1.200": lines of the repeated span predicted exactly, and nats per token the first
    occurrence saves; "-" for runs evaluated before the copy task existed."""
    if x.get("copy_8k_16k") is None:
        return "-"
    return f"{x['copy_8k_16k']:.3f} / {_f(x.get('copy_gain_8k_16k'), '{:.3f}')}"


def _induction_cell(x: Dict) -> str:
    """"0.912 / 0.004": top-1 accuracy on the repeat of random tokens at the near and the far period; "-" for runs
    evaluated before the induction test existed."""
    ind = x.get("induction")
    return "-" if not ind else f"{ind['near']['second_acc']:.3f} / {ind['far']['second_acc']:.3f}"


def _step_cell(x: Dict) -> str:
    """"0.292 / 0.304": median seconds per step in dense mode (a dense run; an MSA run's warmup) and in sparse
    mode; "-" for a mode the run never logged."""
    st = x.get("step_s") or {}
    return f"{_f(st.get('dense'), '{:.3f}')} / {_f(st.get('sparse'), '{:.3f}')}"


def _seed_cell(x: Dict) -> str:
    """"1 (0)": seed 1 judged on eval.seed 0's windows; "-" where the config is missing."""
    if x.get("seed") is None:
        return "-"
    return f"{x['seed']} ({x['eval_windows'][1]})"


def _token_offset(runs: Dict[str, Dict], name: str) -> float:
    """Tokens the run's starting checkpoint had seen (a continued run is drawn after its source)."""
    src = ((runs[name].get("config") or {}).get("config") or {}).get("phase", {}).get("init_from") or ""
    src_name = Path(src).name if src else ""
    if src_name in runs:
        return float(runs[src_name]["summary"].get("tokens_seen", 0))
    return 0.0


def summarize(root: str, command: str = "") -> str:
    """Write quality.json, quality.md and compare.png under root; return the markdown."""
    from .plots import plot_compare
    runs = load_runs(root)
    rs = rows(runs)
    md = markdown(rs, command)
    Path(root, "quality.md").write_text(md)
    Path(root, "quality.json").write_text(json.dumps({"rows": rs, "targets": targets(rs), "command": command,
                                                      "runs": {n: {"summary": v["summary"], "final": v["final"]}
                                                               for n, v in runs.items()}}, indent=1))
    if runs:
        plot_compare({n: {"history": v["history"], "final": v["final"], "token_offset": _token_offset(runs, n)}
                      for n, v in runs.items()}, Path(root, "compare.png"), names=[x["run"] for x in rs])
    return md
