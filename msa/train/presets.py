"""Named configurations of ``msa train``.

``tiny``: seconds on a CPU (CI). ``small``: a few minutes on a CPU. ``exp-*``: the quality
experiments on one H200 (benchmarks/run_quality.py), all on the same data, tokens and seed:
a 12-layer, ~46M-parameter model (1 dense + 11 MSA layers), context 16K, blocks of 128, top-16.

- exp-dense: full attention throughout (no KL: also the dense checkpoint MSA-CPT starts from)
- exp-msa-pt: dense warmup with the full-support KL for 20% of the steps, then sparse
- exp-local: sparse attention over only the last 16 blocks (the same key budget, no indexer)
- exp-msa-nowarmup / exp-msa-nodetach / exp-msa-noindexrope / exp-msa-k8: ablations of exp-msa-pt
  (sparse from step 0; KL teacher not detached, its gradient estimated from 1024 sampled query rows
  per micro-batch; no RMSNorm + RoPE on the index q and k; top-8)
- exp-msa-indexlr / exp-msa-sink / exp-msa-idx64: recipe levers for the index (index learning rate
  5e-3 instead of 1e-3; the first block always selected, init_blocks=1; index_dim 64 instead of the
  recipe's 128, which was the recipe until the lever runs showed 128 better)
- exp-msa-fullkl: exp-msa-pt whose every 4th sparse step computes the KL over every causal token
  (phase.full_kl_every=4), so the index also hears about blocks it did not select
- exp-msa-lateswitch: exp-msa-pt with the switch to sparse attention at 50% of the steps instead of
  20%, so the teacher has settled before the index must follow it inside its own selection (round 8:
  recall within run-to-run spread of the recipe's, equal loss; the recall dip comes anyway)
- exp-msa-indexconst: exp-msa-pt whose index learning rate stays at its peak after its warmup
  (optim.index_schedule="constant") while the backbone's decays, so the index keeps following a teacher
  that still moves at the end
- exp-msa-indexwd: exp-msa-pt with weight decay on the index projections (optim.index_weight_decay
  1.25). RMSNorm follows them, so their size changes nothing but Adam's relative step, which shrinks
  as they grow; decay holds them near their initial rms (0.02 at the peak rate 1e-3: lr / (2 * 0.02^2))
  so the index keeps learning at the end (the CPU evidence: benchmarks/results/quality_h200/README.md)
- exp-msa-blockkl: exp-msa-pt whose index is trained by the block-max objective (phase.kl_target=
  "block_max": the softmax of its block-max scores, what top-k ranks, against the teacher's block
  masses, on the full causal support) on 2048 sampled query positions per sequence (phase.kl_rows, an
  unbiased estimate at 1/8 of the cost at 16K); round 13 ran it with the PyTorch loss
- exp-msa-densemix: exp-msa-blockkl whose every 4th sparse-phase step trains with dense attention
  (phase.dense_every=4), so the backbone also learns from blocks the index does not select
- exp-msa-k32: exp-msa-blockkl with top-32 blocks instead of 16: twice the key budget, for a model whose own
  attention spreads over more blocks than 16 hold
- exp-msa-cpt: from exp-dense's final checkpoint (phase.init_from), fresh index projections, KL
  warmup for 20% of its steps, then sparse; its steps are 20% of the pretraining's
- exp-dense-cont: exp-dense continued densely for the same steps (the comparison for exp-msa-cpt)
- exp-msa-indexprobe: a diagnostic, not a recipe: from exp-msa-pt's final checkpoint, the backbone
  frozen (optim.lr=0) and only the index trained against the full-support KL at its peak learning
  rate for 25% of the pretraining's steps, so its teacher no longer moves: how close the index can
  come to the selection rule's ceiling when it has only to catch up; evaluated in sparse mode, so its
  loss is that of its own selections, as MSA-PT's is
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List

from ..ops.common import check
from .config import DataConfig, EvalConfig, ModelConfig, OptimConfig, PhaseConfig, TrainConfig


def tiny() -> TrainConfig:
    return TrainConfig(
        name="tiny", steps=12, checkpoint_every=4, log_every=1, device="cpu",
        model=ModelConfig(hidden_size=32, num_layers=2, num_dense_layers=1, intermediate_size=64, num_heads=2,
                          num_kv_heads=1, head_dim=16, index_dim=16, block_size=16, topk_blocks=3),
        data=DataConfig(seq_len=128, batch_size=2, vocab_size=384, tokenizer_train_mb=0.3, max_corpus_mb=0.6,
                        eval_corpus_mb=0.25, include_site_packages=False),
        optim=OptimConfig(lr=1e-2, index_lr=1e-2, warmup_steps=2),
        phase=PhaseConfig(kind="msa", warmup_steps=4),
        eval=EvalConfig(every=6, batches=2, bucket_windows=2, retrieval_lengths=[512], retrieval_depths=[0.2, 0.8],
                        retrieval_samples=1, retrieval_max_factor=4.0))


def small() -> TrainConfig:
    return TrainConfig(
        name="small", steps=300, checkpoint_every=100, log_every=5,
        model=ModelConfig(hidden_size=128, num_layers=3, num_dense_layers=1, intermediate_size=384, num_heads=4,
                          num_kv_heads=2, head_dim=32, index_dim=32, block_size=32, topk_blocks=4),
        data=DataConfig(seq_len=512, batch_size=4, vocab_size=2048, tokenizer_train_mb=4, max_corpus_mb=20,
                        eval_corpus_mb=4, include_site_packages=False),
        optim=OptimConfig(lr=3e-3, index_lr=3e-3, warmup_steps=20),
        phase=PhaseConfig(kind="msa", warmup_steps=90),
        eval=EvalConfig(every=50, batches=4, bucket_windows=8, retrieval_lengths=[512], retrieval_samples=2))


EXP_STEPS = 1600


def exp_base() -> TrainConfig:
    """The shared recipe of the GPU experiments (edit here, not per variant)."""
    return TrainConfig(
        name="exp", steps=EXP_STEPS, checkpoint_every=200, log_every=10, max_minutes=0.0,
        model=ModelConfig(hidden_size=512, num_layers=12, num_dense_layers=1, intermediate_size=1536, num_heads=8,
                          num_kv_heads=2, head_dim=64, index_dim=128, block_size=128, topk_blocks=16),
        data=DataConfig(seq_len=16384, batch_size=2, vocab_size=16384, tokenizer_train_mb=32, max_corpus_mb=400,
                        eval_corpus_mb=40),
        optim=OptimConfig(lr=1e-3, index_lr=1e-3, warmup_steps=100, min_lr_ratio=0.1),
        phase=PhaseConfig(kind="msa", warmup_steps=EXP_STEPS // 5, kl_weight=1.0),
        # retrieval at 32K is twice the training context: how each attention extrapolates
        eval=EvalConfig(every=200, batches=4, bucket_windows=16, retrieval_lengths=[4096, 8192, 16384, 32768],
                        retrieval_depths=[0.1, 0.5, 0.9], retrieval_samples=4, retrieval_max_factor=2.0))


def _variant(name: str, **changes) -> Callable[[], TrainConfig]:
    """exp_base with changes keyed section__field, e.g. _variant("exp-local", phase__kind="local")."""
    def make() -> TrainConfig:
        cfg = exp_base()
        cfg.name = name
        for key, val in changes.items():
            obj = cfg
            parts = key.split("__")
            for p in parts[:-1]:
                obj = getattr(obj, p)
            check(hasattr(obj, parts[-1]), f"preset {name}: unknown key {key}")
            setattr(obj, parts[-1], copy.deepcopy(val))
        return cfg.validate()
    return make


CPT_STEPS = EXP_STEPS // 5
PROBE_STEPS = EXP_STEPS // 4

PRESETS: Dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "small": small,
    "exp-dense": _variant("exp-dense", phase__kind="dense", phase__kl_weight=0.0, phase__warmup_steps=0),
    "exp-msa-pt": _variant("exp-msa-pt"),
    "exp-local": _variant("exp-local", phase__kind="local", phase__kl_weight=0.0, phase__warmup_steps=0),
    "exp-msa-nowarmup": _variant("exp-msa-nowarmup", phase__warmup_steps=0),
    "exp-msa-nodetach": _variant("exp-msa-nodetach", phase__kl_detach_teacher=False, phase__teacher_grad_rows=1024),
    "exp-msa-noindexrope": _variant("exp-msa-noindexrope", model__index_norm_rope=False),
    "exp-msa-k8": _variant("exp-msa-k8", model__topk_blocks=8),
    "exp-msa-indexlr": _variant("exp-msa-indexlr", optim__index_lr=5e-3),
    "exp-msa-sink": _variant("exp-msa-sink", model__init_blocks=1),
    "exp-msa-idx64": _variant("exp-msa-idx64", model__index_dim=64),
    "exp-msa-fullkl": _variant("exp-msa-fullkl", phase__full_kl_every=4),
    "exp-msa-lateswitch": _variant("exp-msa-lateswitch", phase__warmup_steps=EXP_STEPS // 2),
    "exp-msa-indexconst": _variant("exp-msa-indexconst", optim__index_schedule="constant"),
    "exp-msa-indexwd": _variant("exp-msa-indexwd", optim__index_weight_decay=1.25),
    "exp-msa-blockkl": _variant("exp-msa-blockkl", phase__kl_target="block_max", phase__kl_rows=2048),
    "exp-msa-densemix": _variant("exp-msa-densemix", phase__kl_target="block_max", phase__kl_rows=2048,
                                 phase__dense_every=4),
    "exp-msa-k32": _variant("exp-msa-k32", phase__kl_target="block_max", phase__kl_rows=2048, model__topk_blocks=32),
    "exp-msa-cpt": _variant("exp-msa-cpt", steps=CPT_STEPS, phase__warmup_steps=CPT_STEPS // 5,
                            phase__reinit_index=True, optim__lr=3e-4, optim__warmup_steps=20,
                            optim__index_lr=1e-3, checkpoint_every=100, eval__every=80),
    "exp-dense-cont": _variant("exp-dense-cont", steps=CPT_STEPS, phase__kind="dense", phase__kl_weight=0.0,
                               phase__warmup_steps=0, optim__lr=3e-4, optim__warmup_steps=20,
                               checkpoint_every=100, eval__every=80),
    "exp-msa-indexprobe": _variant("exp-msa-indexprobe", steps=PROBE_STEPS, phase__warmup_steps=PROBE_STEPS,
                                   optim__lr=0.0, optim__index_schedule="constant", optim__warmup_steps=20,
                                   checkpoint_every=100, eval__every=80, eval__mode="sparse"),
}

# runs that start from another run's final checkpoint
INIT_FROM = {"exp-msa-cpt": "exp-dense", "exp-dense-cont": "exp-dense", "exp-msa-indexprobe": "exp-msa-pt"}


def preset_names() -> List[str]:
    return list(PRESETS)


# one line per preset for ``msa train --list-presets`` (the module docstring has the longer story)
DESCRIPTIONS = {
    "tiny": "seconds on a CPU (CI)",
    "small": "a few minutes on a CPU",
    "exp-dense": "quality study: dense attention throughout (the baseline; MSA-CPT starts from it)",
    "exp-msa-pt": "quality study: the recipe (dense warmup with the KL for 20% of the steps, then sparse top-16)",
    "exp-local": "quality study: the last 16 blocks only (same key budget, no indexer)",
    "exp-msa-nowarmup": "ablation: sparse from step 0",
    "exp-msa-nodetach": "ablation: the KL's teacher not detached",
    "exp-msa-noindexrope": "ablation: no RMSNorm + RoPE on the index q and k",
    "exp-msa-k8": "ablation: top-8 blocks",
    "exp-msa-indexlr": "index learning rate 5e-3 instead of 1e-3",
    "exp-msa-sink": "the first block always selected (init_blocks=1)",
    "exp-msa-idx64": "index_dim 64 instead of 128",
    "exp-msa-fullkl": "every 4th sparse step's KL over every causal token",
    "exp-msa-lateswitch": "the switch to sparse attention at 50% of the steps",
    "exp-msa-indexconst": "the index learning rate held at its peak",
    "exp-msa-indexwd": "weight decay on the index projections",
    "exp-msa-blockkl": "the index trained by the block-max objective (2048 sampled rows per sequence)",
    "exp-msa-densemix": "exp-msa-blockkl with every 4th sparse-phase step dense (phase.dense_every=4)",
    "exp-msa-k32": "exp-msa-blockkl with top-32 blocks",
    "exp-msa-cpt": "MSA-CPT: exp-dense's checkpoint, a fresh index, KL warmup, then sparse",
    "exp-dense-cont": "exp-dense continued densely (the comparison for exp-msa-cpt)",
    "exp-msa-indexprobe": "diagnostic: exp-msa-pt's backbone frozen, only the index trained",
}


def get_preset(name: str) -> TrainConfig:
    check(name in PRESETS, f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
