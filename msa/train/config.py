"""Typed configuration of ``msa train``: nested dataclasses, loaded from a preset, a JSON or TOML
file and ``key.sub=value`` overrides. Unknown keys and wrongly typed values raise a ValueError that
names the offending key, so a typo never silently trains something else."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..ops.common import check

PHASE_KINDS = ("msa", "dense", "local")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TOKENIZERS = ("bpe", "bytes")
STRATEGIES = ("none", "ddp", "fsdp2")
EVAL_MODES = ("train", "sparse", "dense")
KL_TARGETS = ("token", "block_max")


@dataclass
class ModelConfig:
    """The LM (msa.models.MSALMConfig) and its attention layers (msa.layers.MSAConfig).
    vocab_size is taken from the tokenizer. backend: "auto" (Triton on CUDA, reference on CPU).
    index_init_std: std of the index projections' normal init (0 keeps the model's default, 0.02).
    index_norm_rope: RMSNorm + RoPE on the index q and k; on by default here (unlike MSAConfig) because
    without positional information the index cannot prefer recent blocks (README, Quality).
    fp8_index_scores: select blocks from fp8 index scores (MSAConfig.fp8_index_scores)."""

    hidden_size: int = 512
    num_layers: int = 8
    num_dense_layers: int = 1
    intermediate_size: int = 1536
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    index_dim: int = 64
    block_size: int = 128
    topk_blocks: int = 16
    init_blocks: int = 0
    local_blocks: int = 1
    index_norm_rope: bool = True
    fp8_index_scores: bool = False
    index_init_std: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    backend: str = "auto"


@dataclass
class DataConfig:
    """Offline corpus of installed Python source (msa.data). seq_len: tokens per window;
    batch_size: windows per micro-batch (packed into one (1, batch_size * seq_len) row with
    cu_seqlens). max_corpus_mb: MB of training source read (packages in a seeded order until the
    budget); eval_corpus_mb: the same for each of validation and test;
    val_fraction / test_fraction: share of packages held out (split by package name and seed).
    cache_dir: where the tokenizer and token arrays are cached (default ~/.cache/msa/data).
    synthetic_facts: share of training windows in which facts_per_window constants are defined and
    asserted later (``msa.data.facts``: the retrieval evaluation's format, so a small model can learn
    the skill; validation and test windows are never planted). A window's facts take at most half of
    its longest document: fewer go in when all do not fit (the trainer logs the count).
    synthetic_copies: share of training windows in which copies_per_window spans of 48-127 tokens of
    the window's own code are repeated at a later position (``msa.data.copies``: the copy task's
    skill, induction); the repeats take at most half of the longest document."""

    seq_len: int = 8192
    batch_size: int = 4
    tokenizer: str = "bpe"
    vocab_size: int = 16384
    tokenizer_train_mb: float = 32.0
    max_corpus_mb: float = 400.0
    eval_corpus_mb: float = 40.0
    max_file_kb: float = 512.0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    include_stdlib: bool = True
    include_site_packages: bool = True
    cache_dir: str = ""
    seed: int = 0
    synthetic_facts: float = 0.0
    facts_per_window: int = 16
    synthetic_copies: float = 0.0
    copies_per_window: int = 4


@dataclass
class OptimConfig:
    """AdamW with three groups: backbone matrices (weight_decay), backbone vectors/norms (no decay),
    index projections (index_lr, index_weight_decay). Schedule: linear warmup for warmup_steps then
    cosine to min_lr_ratio * lr at the last step; index_schedule "same" or "constant" (after its
    warmup). grad_clip: clipped separately on the backbone and on the index parameters (0 = off)."""

    lr: float = 1e-3
    index_lr: float = 1e-3
    weight_decay: float = 0.1
    index_weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    index_schedule: str = "same"
    grad_clip: float = 1.0


@dataclass
class PhaseConfig:
    """kind: "msa" (dense warmup for warmup_steps with the full-support KL, then sparse top-k),
    "dense" (full attention throughout), "local" (sparse attention over only the last topk_blocks
    blocks: the same key budget as MSA without the indexer). kl_weight: lambda (0 skips the KL).
    kl_detach_teacher: False is the ablation whose KL also trains the backbone through the teacher
    (a differentiable PyTorch KL, O(T^2) memory traffic per layer; teacher_grad_rows R > 0 keeps the
    fast KL and adds an unbiased estimate of the teacher's gradient from R sampled query positions
    per micro-batch, which is what makes the ablation affordable at 16K). init_from: a checkpoint whose model weights start this run
    (MSA-CPT: a dense run's checkpoint); reinit_index: draw fresh index projections after loading.
    dense_every N > 0 (kind "msa"): the last of every N sparse-phase steps trains with dense attention and the
    warmup's full-support KL, so the backbone also learns from the blocks the index does not select (0: the
    spec's recipe, every sparse-phase step sparse); evaluations and checkpoints keep the phase's mode.
    full_kl_every N > 0: every N-th sparse step (the first, then every N) computes the KL over every
    causal token, as the warmup does, while attention stays sparse; the spec's sparse-phase KL sees
    only the selected blocks, so it never tells the index about a block it failed to select (0: the
    spec's recipe). kl_target: "token" (the spec: the index's token distribution against the main
    branch's) or "block_max", an experimental objective aligned with the selection rule: the
    softmax over causal blocks of the index's block scores (the max of its token scores, what top-k
    ranks) against the teacher's block masses, always over the full causal support
    (``msa.block_max_kl_loss``: Triton on CUDA, PyTorch elsewhere), with the detached teacher only.
    kl_rows R > 0 (block_max only): that loss on R query positions per sequence drawn uniformly, an unbiased
    estimate of it at about R / seq_len of the cost (0: every position)."""

    kind: str = "msa"
    warmup_steps: int = 300
    kl_weight: float = 1.0
    kl_detach_teacher: bool = True
    teacher_grad_rows: int = 0
    init_from: str = ""
    reinit_index: bool = False
    full_kl_every: int = 0
    dense_every: int = 0
    kl_target: str = "token"
    kl_rows: int = 0


@dataclass
class EvalConfig:
    """every: evaluation period in steps (and at the last step). batches: validation windows per
    evaluation. recall: also measure indexer block/score recall. Final evaluation: position-bucket
    loss on bucket_windows test windows and synthetic retrieval at retrieval_lengths (tokens; 0
    entries and lengths above seq_len * retrieval_max_factor are skipped) with retrieval_samples
    per (task, length, depth). mode: the attention every evaluation runs in: "train" (the mode of the
    step just trained), or always "sparse" / "dense" (an msa run only), e.g. so that an index trained
    in warmup mode (exp-msa-indexprobe) is judged by the loss of its own selections. seed: draws the
    validation and test windows and the retrieval prompts, apart from the run's ``seed``, so runs that
    differ only in ``seed`` are judged on the same windows. induction_samples: prompts per period of the
    induction test (``msa.evals.induction``: random tokens repeated once, periods min(256, seq_len / 2) and
    seq_len / 2) at every evaluation and the final one (0 = off)."""

    every: int = 250
    batches: int = 4
    recall: bool = True
    recall_max_tokens: int = 16384
    bucket_windows: int = 16
    retrieval_lengths: List[int] = field(default_factory=lambda: [4096, 8192, 16384])
    retrieval_depths: List[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    retrieval_samples: int = 4
    retrieval_max_factor: float = 1.0
    induction_samples: int = 4
    final: bool = True
    mode: str = "train"
    seed: int = 0


@dataclass
class ParallelConfig:
    """Data parallelism under ``torchrun`` (msa.parallel). strategy: "none" (one process), "ddp"
    (DistributedDataParallel; bf16 / fp16 through autocast, fp32 gradients and all-reduce) or
    "fsdp2" (``fully_shard`` per decoder layer, then the root; MixedPrecisionPolicy with 16-bit
    parameters in compute and fp32 gradient reduction). data.batch_size is per rank: the global
    micro-batch is data.batch_size * world size. reshard_after_forward: FSDP2 frees the gathered
    parameters after the forward (ZeRO-3) or keeps them for the backward (ZeRO-2)."""

    strategy: str = "none"
    reshard_after_forward: bool = True


@dataclass
class TrainConfig:
    """Everything one run needs. steps: optimizer steps; grad_accum: micro-batches per step.
    checkpoint_every: steps between checkpoints (0 = only at the end). max_minutes: wall-clock cap
    (0 = none): the run saves a checkpoint and stops, and the same command resumes it.
    precision: "auto" = bf16 autocast on CUDA, fp32 on CPU."""

    name: str = "run"
    seed: int = 0
    steps: int = 1500
    grad_accum: int = 1
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    max_minutes: float = 0.0
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "TrainConfig":
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.phase.kind in PHASE_KINDS, f"phase.kind must be one of {PHASE_KINDS}, got {self.phase.kind!r}")
        check(self.phase.warmup_steps >= 0, f"phase.warmup_steps must be >= 0, got {self.phase.warmup_steps}")
        check(self.phase.kl_weight >= 0, f"phase.kl_weight must be >= 0, got {self.phase.kl_weight}")
        check(self.phase.teacher_grad_rows >= 0, f"phase.teacher_grad_rows must be >= 0, got {self.phase.teacher_grad_rows}")
        check(self.phase.full_kl_every >= 0, f"phase.full_kl_every must be >= 0, got {self.phase.full_kl_every}")
        check(self.phase.dense_every >= 0, f"phase.dense_every must be >= 0, got {self.phase.dense_every}")
        check(self.phase.dense_every == 0 or self.phase.kind == "msa",
              f"phase.dense_every > 0 needs phase.kind='msa' (a {self.phase.kind} run has one attention mode)")
        check(self.phase.full_kl_every == 0 or self.phase.kl_detach_teacher,
              "phase.full_kl_every > 0 needs phase.kl_detach_teacher=true (the undetached ablation's KL "
              "is built over the selection)")
        check(self.phase.kl_target in KL_TARGETS,
              f"phase.kl_target must be one of {KL_TARGETS}, got {self.phase.kl_target!r}")
        check(self.phase.kl_target == "token" or (self.phase.kl_detach_teacher and self.phase.full_kl_every == 0),
              "phase.kl_target='block_max' needs phase.kl_detach_teacher=true and phase.full_kl_every=0 "
              "(its teacher is always the detached full-support attention)")
        check(self.phase.kl_rows >= 0, f"phase.kl_rows must be >= 0, got {self.phase.kl_rows}")
        check(self.phase.kl_rows == 0 or self.phase.kl_target == "block_max",
              "phase.kl_rows > 0 needs phase.kl_target='block_max' "
              "(the token KL's kernels cover every position)")
        check(self.data.tokenizer in TOKENIZERS, f"data.tokenizer must be one of {TOKENIZERS}, got {self.data.tokenizer!r}")
        check(self.data.seq_len >= 2, f"data.seq_len must be >= 2, got {self.data.seq_len}")
        check(self.data.batch_size >= 1, f"data.batch_size must be >= 1, got {self.data.batch_size}")
        check(0.0 <= self.data.synthetic_facts <= 1.0,
              f"data.synthetic_facts must be in [0, 1], got {self.data.synthetic_facts}")
        check(self.data.facts_per_window >= 1, f"data.facts_per_window must be >= 1, got {self.data.facts_per_window}")
        check(0.0 <= self.data.synthetic_copies <= 1.0,
              f"data.synthetic_copies must be in [0, 1], got {self.data.synthetic_copies}")
        check(self.data.copies_per_window >= 1,
              f"data.copies_per_window must be >= 1, got {self.data.copies_per_window}")
        check(0 <= self.data.val_fraction and 0 <= self.data.test_fraction
              and self.data.val_fraction + self.data.test_fraction < 1,
              "data.val_fraction and data.test_fraction must be >= 0 and sum to < 1")
        check(self.optim.index_schedule in ("same", "constant"),
              f"optim.index_schedule must be 'same' or 'constant', got {self.optim.index_schedule!r}")
        check(0 <= self.optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        check(self.eval.every >= 0 and self.checkpoint_every >= 0, "eval.every and checkpoint_every must be >= 0")
        check(self.eval.induction_samples >= 0, f"eval.induction_samples must be >= 0, got {self.eval.induction_samples}")
        check(self.seed >= 0 and self.eval.seed >= 0 and self.data.seed >= 0,
              f"seed, eval.seed and data.seed must be >= 0, got {self.seed}, {self.eval.seed}, {self.data.seed}")
        check(self.eval.mode in EVAL_MODES, f"eval.mode must be one of {EVAL_MODES}, got {self.eval.mode!r}")
        check(self.eval.mode == "train" or self.phase.kind == "msa",
              f"eval.mode={self.eval.mode!r} needs phase.kind='msa' (a {self.phase.kind} run has one attention mode)")
        check(self.model.backend in ("auto", "reference", "triton"),
              f"model.backend must be auto, reference or triton, got {self.model.backend!r}")
        check(self.parallel.strategy in STRATEGIES,
              f"parallel.strategy must be one of {STRATEGIES}, got {self.parallel.strategy!r}")
        check(not (self.parallel.strategy == "fsdp2" and not self.phase.kl_detach_teacher),
              "phase.kl_detach_teacher=false re-projects q and k outside the model's forward, which FSDP2's "
              "sharded parameters do not allow: use parallel.strategy=ddp for this ablation")
        check(not (self.parallel.strategy == "fsdp2" and self.phase.kl_target == "block_max"),
              "phase.kl_target='block_max' re-projects q, k and the index q, k outside the model's forward, "
              "which FSDP2's sharded parameters do not allow: use parallel.strategy=ddp")
        o = self.optim
        for name in ("lr", "index_lr", "weight_decay", "index_weight_decay", "grad_clip"):
            check(getattr(o, name) >= 0, f"optim.{name} must be >= 0, got {getattr(o, name)}")
        check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1 and optim.beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
        check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
        check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        m = self.model
        check(m.topk_blocks >= m.init_blocks + m.local_blocks,
              f"model.topk_blocks ({m.topk_blocks}) must be >= init_blocks + local_blocks")
        try:  # the model's own checks (shapes, head counts, block arguments), before any data is read
            model_config(self, vocab_size=max(2, self.data.vocab_size))
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None
        return self


def model_config(cfg: TrainConfig, vocab_size: int):
    """The ``msa.models.MSALMConfig`` of cfg (its attention an ``msa.layers.MSAConfig``); the local-window
    baseline forces the last topk_blocks - init_blocks blocks (local_blocks), so the index chooses none."""
    from ..layers.attention import MSAConfig
    from ..models.msa_lm import MSALMConfig
    m = cfg.model
    local = m.topk_blocks - m.init_blocks if cfg.phase.kind == "local" else m.local_blocks
    att = MSAConfig(hidden_size=m.hidden_size, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                    head_dim=m.head_dim, index_dim=m.index_dim, block_size=m.block_size, topk_blocks=m.topk_blocks,
                    init_blocks=m.init_blocks, local_blocks=local, rope_theta=m.rope_theta,
                    index_norm_rope=m.index_norm_rope, fp8_index_scores=m.fp8_index_scores, mode="dense",
                    backend=m.backend)
    return MSALMConfig(vocab_size=vocab_size, num_layers=m.num_layers, intermediate_size=m.intermediate_size,
                       attention=att, num_dense_layers=m.num_dense_layers, kl_weight=cfg.phase.kl_weight,
                       tie_embeddings=m.tie_embeddings)


# ------------------------------------------------------------------------------------------------
# dict <-> dataclass with strict keys and types

def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and, for ints given to float fields, widen) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List, Sequence):
        check(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), f"{key} must be a table/object, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an int, got {value!r}")
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise naming the full key."""
    check(isinstance(data, dict), f"{prefix or 'config'} must be a table/object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    check(not unknown, f"unknown config key(s): {', '.join(prefix + u for u in unknown)} "
                       f"(valid under {prefix or 'top level'}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def merge_dict(base: Dict[str, Any], upd: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive update of nested dicts (upd wins)."""
    out = dict(base)
    for k, v in upd.items():
        out[k] = merge_dict(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text  # a bare string


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``["optim.lr=3e-4", "model.topk_blocks=8", "eval.retrieval_lengths=[4096,8192]"]`` -> a new,
    validated TrainConfig. Values are parsed as JSON (bare words are strings)."""
    data = to_dict(cfg)
    for ov in overrides:
        check("=" in ov, f"override must look like key.sub=value, got {ov!r}")
        key, text = ov.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            check(isinstance(node.get(p), dict), f"unknown config key in override: {key!r}")
            node = node[p]
        check(parts[-1] in node and not isinstance(node[parts[-1]], dict), f"unknown config key in override: {key!r}")
        node[parts[-1]] = _parse_scalar(text.strip())
    return from_dict(TrainConfig, data).validate()


def load_config_file(path: str) -> Dict[str, Any]:
    """A JSON (.json) or TOML (.toml) file as a dict (validated when merged into a TrainConfig)."""
    p = Path(path)
    check(p.exists(), f"config file {path!r} does not exist")
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib  # type: ignore
        return tomllib.loads(p.read_text())
    check(p.suffix == ".json", f"config file must end in .json or .toml, got {path!r}")
    return json.loads(p.read_text())


def resolve_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> TrainConfig:
    """Preset (or defaults) <- config file <- overrides, validated."""
    from .presets import get_preset
    base = to_dict(get_preset(preset)) if preset else to_dict(TrainConfig())
    if config_file:
        base = merge_dict(base, load_config_file(config_file))
    cfg = from_dict(TrainConfig, base).validate()
    return apply_overrides(cfg, overrides) if overrides else cfg
