"""Cost model (spec section 3), the msa command, and a short demo run."""

import json
import math

import pytest

from msa import flops
from msa.cli import main


def test_paper_ratios():
    t = 2 ** 20
    assert flops.dense_flops(t) / flops.msa_flops(t) == pytest.approx(28.4, abs=0.05)
    assert flops.dense_flops(2 ** 17) / flops.msa_flops(2 ** 17) == pytest.approx(16.0, abs=0.01)
    # per-token ratio 32 T / (T + 131072) for the paper's shape
    for t in (8192, 65536, 2 ** 21):
        assert flops.dense_flops(t) / flops.msa_flops(t) == pytest.approx(32 * t / (t + 131072), rel=1e-12)
    # decode ceiling ~7.9x with bf16 index keys at 1M, fp8 index keys halve the dominant term
    r = flops.dense_decode_bytes(t) / flops.msa_decode_bytes(t)
    assert r == pytest.approx(2 * 4 * 128 * 2 ** 21 * 2 / (128 * 2 ** 21 * 2 + 2 * 4 * 128 * 2048 * 2))
    assert flops.dense_decode_bytes(2 ** 20) / flops.msa_decode_bytes(2 ** 20) == pytest.approx(7.88, abs=0.01)


def test_flops_command_prints_table(capsys):
    assert main(["flops"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip().endswith("x")]
    assert len(lines) == 9  # 8K .. 2M
    one_m = [ln for ln in lines if ln.split()[0] == "1M"][0]
    assert "28.4x" in one_m
    assert main(["flops", "--seqlens", "1000,8192"]) == 0  # a length that is not a multiple of 1K keeps its digits
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:]] == ["1000", "8K"]
    assert main(["flops", "--num-heads", "6", "--num-kv-heads", "4"]) == 2  # no GQA group size
    assert "--num-heads (6) must be a multiple of --num-kv-heads (4)" in capsys.readouterr().err


def test_demo_short_run(tmp_path):
    from msa.demo import run_demo
    s = run_demo(str(tmp_path), steps=12, device="cpu", progress=False, seq_len=128, batch_size=2, hidden_size=32,
                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, index_dim=16, block_size=16, topk_blocks=3,
                 eval_every=6, corpus_bytes=200_000, lr=1e-2, index_lr=1e-2)
    data = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = data["history_msa"]
    assert [r["phase"] for r in hist].count("dense") == s["config"]["warmup_steps"]
    assert hist[-1]["phase"] == "sparse"
    assert hist[-1]["lm_loss"] < hist[0]["lm_loss"]  # it learns
    assert math.log(256) - 0.5 > hist[-1]["lm_loss"]
    assert 0.0 <= data["block_recall"] <= 1.0 and 0.0 <= data["score_recall"] <= 1.0
    assert data["score_recall"] >= data["block_recall"] - 0.2
