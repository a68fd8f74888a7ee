"""msa train on a GPU: the Triton kernels under bf16 autocast on packed batches, evaluation, and
resume (GPU kernels with atomics are not bitwise repeatable, so resumed losses are compared with a
tolerance here; the CPU test checks bitwise equality)."""

import json
import math

import pytest
import torch

from msa.train.trainer import Trainer

from .common import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# also the configuration of the 2-GPU torchrun test (test_train_multigpu.py), with data.batch_size=2
GPU_OVERRIDES = ("device=cuda", "precision=bf16", "model.hidden_size=128", "model.num_heads=4",
                 "model.num_kv_heads=2", "model.head_dim=32", "model.index_dim=32", "model.block_size=64",
                 "model.topk_blocks=4", "model.num_layers=3", "data.seq_len=2048",
                 "data.max_corpus_mb=4", "data.eval_corpus_mb=1", "data.vocab_size=1024",
                 "steps=24", "phase.warmup_steps=8", "eval.every=12", "checkpoint_every=12",
                 "eval.retrieval_lengths=[2048]", "eval.retrieval_samples=1", "eval.bucket_windows=2",
                 "eval.retrieval_max_factor=1.0")


def _cfg(*extra):
    return tiny_config(*GPU_OVERRIDES, "data.batch_size=2", *extra)


def test_gpu_run_learns_and_evaluates(tmp_path):
    cfg = _cfg()
    tr = Trainer(cfg, str(tmp_path / "a"), progress=False)
    s = tr.fit()
    hist = tr.history
    assert s["status"] == "complete"
    assert all(math.isfinite(r["lm_loss"]) and math.isfinite(r["kl"]) for r in hist)
    assert hist[-1]["lm_loss"] < hist[0]["lm_loss"] - 0.5
    assert 0 <= s["block_recall"] <= 1 and 0 <= s["score_recall"] <= 1
    fin = json.loads((tmp_path / "a" / "final_eval.json").read_text())
    assert fin["mode"] == "sparse" and fin["retrieval"]["mean"] is not None
    # resume from the step-12 checkpoint: the losses follow the uninterrupted run closely
    b = Trainer(cfg, str(tmp_path / "b"), progress=False)
    b.fit(stop_at_step=12)
    c = Trainer(cfg, str(tmp_path / "b"), progress=False)
    c.fit()
    for x, y in zip(hist, c.history):
        assert x["step"] == y["step"]
        assert y["lm_loss"] == pytest.approx(x["lm_loss"], rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("variant", [["phase.kind=local", "phase.kl_weight=0"], ["phase.kl_detach_teacher=false"],
                                     ["model.index_norm_rope=false"], ["phase.kind=dense", "phase.kl_weight=0"]])
def test_gpu_variants_run(tmp_path, variant):
    tr = Trainer(_cfg("steps=10", "eval.every=0", "eval.final=false", "phase.warmup_steps=4", *variant),
                 str(tmp_path / "v"), progress=False)
    tr.fit()
    assert all(math.isfinite(r["lm_loss"]) for r in tr.history)
    assert tr.history[-1]["lm_loss"] < tr.history[0]["lm_loss"]
