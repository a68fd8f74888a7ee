"""The quality summarizer: table rows, loss beyond 4K, retrieval means and the issue's targets."""

import json

from msa.train.report import summarize


def _run(root, name, kind, val, buckets, retr, recall=None, kl=None, init_from="", gain=None, gain_se=None, copy=None,
         induction=None):
    d = root / name
    d.mkdir(parents=True)
    s = {"name": name, "status": "complete", "step": 10, "steps": 10, "tokens_seen": 1e6, "train_seconds": 60,
         "parameters": {"total": 4.6e7}, "kind": kind, "val_lm_loss": val}
    if recall:
        s["block_recall"], s["score_recall"] = recall[:2]
        if len(recall) > 2:
            s["oracle_mass"], s["top_half_recall"] = recall[2:4]
        if len(recall) > 4:
            s["max_rule_recall"] = recall[4]
    if kl:
        s["sparse_kl_first_quarter"], s["sparse_kl_last_quarter"] = kl
    (d / "summary.json").write_text(json.dumps(s))
    fin = {"buckets": {"buckets": [{"start": a, "end": b, "loss": v, "tokens": n} for a, b, v, n in buckets]},
           "retrieval": {"mean": sum(retr.values()) / len(retr),
                         "tasks": {"needle": {"by_length": {str(k): v for k, v in retr.items()}}}}}
    if gain:
        fin["retrieval"]["tasks"]["needle"]["gain_by_length"] = {str(k): v for k, v in gain.items()}
    if gain_se:
        fin["retrieval"]["tasks"]["needle"]["gain_se_by_length"] = {str(k): v for k, v in gain_se.items()}
    if copy:  # {length: (accuracy, gain)}
        fin["retrieval"]["tasks"]["copy"] = {"by_length": {str(k): a for k, (a, _) in copy.items()},
                                             "gain_by_length": {str(k): g for k, (_, g) in copy.items()}}
    if induction:  # {period: (repeat accuracy, gain)}
        fin["induction"] = {str(k): {"second_acc": a, "gain": g, "first_nll": 6.0, "second_nll": 6.0 - g}
                            for k, (a, g) in induction.items()}
    (d / "final_eval.json").write_text(json.dumps(fin))
    (d / "log.jsonl").write_text(json.dumps({"step": 10, "val_lm_loss": val, "tokens_seen": 1e6, "lm_loss": val,
                                             "kl": 0.1}) + "\n")
    (d / "config.json").write_text(json.dumps({"config": {"phase": {"init_from": init_from}}}))


def test_summary_table_and_targets(tmp_path):
    b = [(0, 4096, 2.0, 100), (4096, 8192, 1.5, 100), (8192, 16384, 1.0, 300)]
    _run(tmp_path, "exp-dense", "dense", 2.000, b, {8192: 0.8, 16384: 0.6, 4096: 0.9},
         gain={8192: 2.0, 16384: 1.0, 4096: 9.0}, gain_se={8192: 0.3, 16384: 0.4, 4096: 1.0})
    _run(tmp_path, "exp-msa-pt", "msa", 2.010, [(x, y, v + 0.01, n) for x, y, v, n in b],
         {8192: 0.78, 16384: 0.58, 4096: 0.2}, recall=(0.72, 0.91, 0.93, 0.85, 0.8), kl=(3.0, 2.0), gain={8192: 1.5, 16384: 0.9},
         gain_se={8192: 0.6, 16384: 0.8})
    _run(tmp_path, "exp-local", "local", 2.05, [(x, y, v + 0.2, n) for x, y, v, n in b], {8192: 0.1, 16384: 0.0, 4096: 0.5},
         gain={8192: 0.25, 16384: -0.05})
    _run(tmp_path, "exp-msa-nowarmup", "msa", 2.0, b, {8192: 0.5})
    md = summarize(str(tmp_path))
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| exp")}
    assert set(lines) == {"exp-dense", "exp-msa-pt", "exp-local", "exp-msa-nowarmup"}
    cells = [c.strip() for c in lines["exp-msa-pt"].split("|")]
    assert cells[6] == "2.0100"
    assert cells[8] == f"{(1.51 * 100 + 1.01 * 300) / 400:.4f}"      # token-weighted loss beyond 4K
    assert cells[9] == "0.680"                                        # retrieval at 8K and 16K only
    assert cells[11] == "1.200"                                       # fact gain at 8K and 16K only
    assert cells[15:18] == ["0.930", "0.850", "0.800"]                # oracle mass, top-half / max-rule recall
    assert [c.strip() for c in lines["exp-msa-nowarmup"].split("|")][11] == "-"   # evaluated before the gain
    # standard errors: sqrt(0.6^2 + 0.8^2) / 2 = 0.5 and sqrt(0.3^2 + 0.4^2) / 2 = 0.25; local has none
    assert ("fact gain 8K-16K (nats per answer token, ± standard error): MSA-PT 1.200 ± 0.500 vs dense "
            "1.500 ± 0.250 = 80.0% of dense") in md
    assert "fact gain 8K-16K: MSA-PT 1.200 ± 0.500 vs local window 0.100 nats" in md
    assert "MSA-PT validation loss vs dense: +0.50% (target within +1%): met" in md
    # every MSA run against dense, by position bucket (the round-17 diagnostic: a gap where MSA reads every block)
    assert "exp-msa-pt vs dense: validation loss +0.50%; test loss by position 0-4K +0.5%, 4K-8K +0.7%, 8K-16K +1.0%" in md
    assert "exp-msa-nowarmup vs dense: validation loss +0.00%; test loss by position 0-4K +0.0%" in md
    assert "exp-local vs dense" not in md                             # the local window is no MSA run
    assert "97.1% of dense (target >= 95%): met" in md
    assert "vs local window" in md and "(target below): met" in md
    assert "score 0.910 (target >= 0.90: met), block 0.720 (target >= 0.70: met)" in md
    assert "first quarter 3 -> last quarter 2 (target falling): met" in md
    assert "exp-msa-nowarmup validation loss vs MSA-PT: -0.50% (target worse): MISSED" in md
    assert (tmp_path / "compare.png").exists() and json.loads((tmp_path / "quality.json").read_text())["rows"]


def test_copy_task_has_its_own_column_and_targets(tmp_path):
    """The copy task (lines of a repeated span) gets its own column (accuracy / gain at 8K and 16K) and
    its own comparisons with dense and the local window; the retrieval and fact-gain means take it in
    with the other tasks; runs evaluated before it existed show "-"."""
    b = [(0, 4096, 2.0, 100), (4096, 8192, 1.5, 100)]
    _run(tmp_path, "exp-dense", "dense", 2.0, b, {8192: 0.8, 16384: 0.6}, gain={8192: 2.0, 16384: 1.0},
         copy={8192: (0.5, 2.0), 16384: (0.3, 1.0), 4096: (0.9, 3.0)})
    _run(tmp_path, "exp-msa-pt", "msa", 2.0, b, {8192: 0.78, 16384: 0.58}, gain={8192: 1.5, 16384: 0.9},
         copy={8192: (0.45, 1.5), 16384: (0.25, 0.5), 4096: (0.0, 0.0)})
    _run(tmp_path, "exp-local", "local", 2.0, b, {8192: 0.1, 16384: 0.0}, copy={8192: (0.0, 0.1), 16384: (0.1, 0.0)})
    _run(tmp_path, "exp-msa-nowarmup", "msa", 2.0, b, {8192: 0.5})
    md = summarize(str(tmp_path))
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")] for ln in md.splitlines() if ln.startswith("| exp")}
    assert cells["exp-msa-pt"][22] == "0.350 / 1.000"           # copy alone, 8K and 16K: accuracy / gain
    assert cells["exp-local"][22] == "0.050 / 0.050"
    assert cells["exp-msa-nowarmup"][22] == "-"
    assert cells["exp-msa-pt"][9] == "0.515"                    # (0.78 + 0.58 + 0.45 + 0.25) / 4: both tasks
    assert cells["exp-msa-pt"][11] == "1.100"                   # (1.5 + 0.9 + 1.5 + 0.5) / 4
    assert ("copy 8K-16K (lines of a repeated span predicted exactly): MSA-PT 0.350 vs dense 0.400 = 87.5% of "
            "dense (target >= 95%): MISSED") in md
    assert "copy 8K-16K: MSA-PT 0.350 vs local window 0.050" in md


def test_interrupted_run_is_compared_at_the_last_common_evaluation(tmp_path):
    """A run stopped early is compared with dense at the last evaluation both reached, not with
    dense's final loss at more tokens."""
    b = [(0, 4096, 2.0, 100)]
    _run(tmp_path, "exp-dense", "dense", 1.90, b, {8192: 0.0})
    _run(tmp_path, "exp-msa-pt", "msa", 2.10, b, {8192: 0.0})
    for name, hist in (("exp-dense", [(5, 2.50), (10, 2.30), (20, 1.90)]), ("exp-msa-pt", [(5, 2.55), (10, 2.32)])):
        d = tmp_path / name
        (d / "log.jsonl").write_text("".join(json.dumps({"step": st, "val_lm_loss": v, "lm_loss": v, "kl": 0.1,
                                                         "tokens_seen": st * 1e5}) + "\n" for st, v in hist))
        s = json.loads((d / "summary.json").read_text())
        s["step"] = hist[-1][0]
        (d / "summary.json").write_text(json.dumps(s))
    md = summarize(str(tmp_path))
    assert ("MSA-PT validation loss vs dense: +0.87% at step 10, the last evaluation both reached "
            "(they ended at 10 and 20) (target within +1%): met") in md


def test_runs_on_different_evaluation_windows_are_not_compared(tmp_path):
    """Runs whose evaluation windows differ (before eval.seed, the run's seed drew them) get no loss
    comparison; runs of different seeds judged on the same eval.seed do."""
    b = [(0, 4096, 2.0, 100), (4096, 8192, 1.5, 100)]

    def config(name, cfg):
        (tmp_path / name / "config.json").write_text(json.dumps({"config": {"phase": {"init_from": ""}, **cfg}}))

    _run(tmp_path, "exp-dense", "dense", 2.0, b, {8192: 0.0})
    _run(tmp_path, "exp-msa-pt", "msa", 2.1, b, {8192: 0.0})
    config("exp-dense", {"seed": 0, "data": {"seed": 0}})                  # legacy: windows from the run's seed
    config("exp-msa-pt", {"seed": 1, "data": {"seed": 0}})
    md = summarize(str(tmp_path))
    assert "exp-msa-pt vs exp-dense: not compared, evaluated on different windows (data.seed, eval.seed: [0, 1] / [0, 0])" in md
    assert "MSA-PT validation loss vs dense" not in md
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")] for ln in md.splitlines() if ln.startswith("| exp")}
    assert cells["exp-msa-pt"][21] == "1 (1)" and cells["exp-dense"][21] == "0 (0)"
    config("exp-msa-pt", {"seed": 1, "data": {"seed": 0}, "eval": {"seed": 0}})
    config("exp-dense", {"seed": 0, "data": {"seed": 0}, "eval": {"seed": 0}})
    md = summarize(str(tmp_path))
    assert "MSA-PT validation loss vs dense: +5.00% (target within +1%): MISSED" in md and "not compared" not in md
    assert [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| exp-msa-pt")).split("|")][21] == "1 (0)"


def test_step_seconds_are_medians_per_mode_after_the_compile_steps(tmp_path):
    """The last column: median synced seconds per step in dense mode (an MSA run's warmup) and sparse mode,
    leaving out the first 10 steps (Triton compiles) and evaluation-free records without a time."""
    b = [(0, 4096, 2.0, 100)]
    _run(tmp_path, "exp-dense", "dense", 2.0, b, {8192: 0.0})
    _run(tmp_path, "exp-msa-pt", "msa", 2.0, b, {8192: 0.0})
    hist = {"exp-dense": [(1, "dense", 9.0), (20, "dense", 0.16), (30, "dense", 0.18), (40, "dense", 0.17)],
            "exp-msa-pt": [(5, "dense", 7.0), (20, "dense", 0.30), (30, "dense", 0.28), (40, "sparse", 0.31),
                           (50, "sparse", 0.35), (60, "sparse", 0.33), (70, "sparse", 5.0), (80, "sparse", None)]}
    for name, h in hist.items():
        (tmp_path / name / "log.jsonl").write_text("".join(
            json.dumps({"step": st, "mode": m, "lm_loss": 2.0, "kl": 0.1, "tokens_seen": st * 1e5,
                        **({} if t is None else {"step_s": t})}) + "\n" for st, m, t in h))
    md = summarize(str(tmp_path))
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")] for ln in md.splitlines() if ln.startswith("| exp")}
    assert cells["exp-dense"][23] == "0.170 / -"
    assert cells["exp-msa-pt"][23] == "0.290 / 0.340"     # medians: (0.28, 0.30) and (0.31, 0.33, 0.35, 5.0)
    st = json.loads((tmp_path / "quality.json").read_text())["rows"][1]["step_s"]
    assert st.keys() == {"dense", "sparse"} and abs(st["dense"] - 0.29) < 1e-9 and abs(st["sparse"] - 0.34) < 1e-9


def test_induction_has_its_own_column_and_compares_with_dense(tmp_path):
    """The last column: repeat accuracy at the near and the far period of the final induction test; each sparse
    run's line against dense adds the far period's accuracy and gain (only where both ran the same periods)."""
    b = [(0, 4096, 2.0, 100)]
    _run(tmp_path, "exp-dense", "dense", 2.0, b, {8192: 0.0}, induction={8192: (0.40, 2.5), 256: (0.90, 5.0)})
    _run(tmp_path, "exp-msa-blockkl", "msa", 2.1, b, {8192: 0.0}, induction={256: (0.88, 4.9), 8192: (0.05, 0.3)})
    _run(tmp_path, "exp-msa-k32", "msa", 2.05, b, {8192: 0.0}, induction={4096: (0.2, 1.0)})
    _run(tmp_path, "exp-local", "local", 2.2, b, {8192: 0.0})
    md = summarize(str(tmp_path))
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")] for ln in md.splitlines() if ln.startswith("| exp")}
    assert cells["exp-dense"][24] == "0.900 / 0.400" and cells["exp-msa-blockkl"][24] == "0.880 / 0.050"
    assert cells["exp-msa-k32"][24] == "0.200 / 0.200" and cells["exp-local"][24] == "-"
    assert ("exp-msa-blockkl vs dense: validation loss +5.00%; test loss by position 0-4K +0.0%; induction at period "
            "8192: repeat accuracy 0.050 vs dense 0.400, gain 0.30 vs 2.50 nats") in md
    k32 = next(ln for ln in md.splitlines() if ln.startswith("- exp-msa-k32 vs dense"))
    assert "induction" not in k32                         # other periods: not compared
