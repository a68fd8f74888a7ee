"""benchmarks/dev/loss_gap.py: the windowed training-loss gap and the validation gap against a dense run, from
``msa train`` logs (an evaluation's step shares its record with the training step), and clear errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "dev" / "loss_gap.py"
spec = importlib.util.spec_from_file_location("loss_gap", SCRIPT)
loss_gap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loss_gap)


def _write(d: Path, losses, vals, sparse_from):
    d.mkdir()
    with open(d / "log.jsonl", "w") as fh:
        for s, v in losses.items():
            rec = {"step": s, "lm_loss": v, "mode": "sparse" if s >= sparse_from else "dense"}
            if s in vals:
                rec["val_lm_loss"] = vals[s]
            fh.write(json.dumps(rec) + "\n")


def test_windows_and_validation_gap(tmp_path):
    steps = range(10, 101, 10)
    _write(tmp_path / "dense", {s: 2.0 for s in steps}, {50: 4.0, 100: 3.0}, 10**9)
    # the MSA run: equal until step 50, then 10% above; step 100 is also an evaluation (one joint record)
    _write(tmp_path / "msa", {s: 2.0 if s <= 50 else 2.2 for s in steps}, {50: 4.0, 100: 3.3}, 30)
    out = tmp_path / "gap.png"
    res = subprocess.run([sys.executable, str(SCRIPT), "--dense", str(tmp_path / "dense"), "--runs",
                          str(tmp_path / "msa"), "--out", str(out), "--window", "50"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = json.loads(out.with_suffix(".json").read_text())["runs"]["msa"]
    assert [(s, round(g, 6)) for s, g in r["train_gap"]] == [(50, 0.0), (100, 0.1)]
    assert [(s, round(g, 6)) for s, g in r["val_gap"]] == [(50, 0.0), (100, 0.1)]
    assert r["first_sparse_step"] == 30 and out.exists()


def test_windowed_gap_uses_only_steps_both_logged():
    assert loss_gap.windowed_gap({1: 3.0, 2: 3.0, 3: 9.0}, {1: 2.0, 2: 2.0}, 10) == [(2, 0.5)]


def test_bad_arguments(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--dense", str(tmp_path), "--runs", str(tmp_path),
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert res.returncode == 2 and "no log.jsonl in" in res.stderr
    _write(tmp_path / "d", {10: 1.0}, {}, 0)
    res = subprocess.run([sys.executable, str(SCRIPT), "--dense", str(tmp_path / "d"), "--runs", str(tmp_path / "d"),
                          "--out", str(tmp_path / "x.png"), "--window", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "--window must be >= 1" in res.stderr
