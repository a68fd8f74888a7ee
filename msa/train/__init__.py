"""``msa train``: config-driven training of the MSA language model (dense warmup then sparse, KL to
the indexer), exact checkpoint/resume, evaluation, logs and plots. See msa/train/presets.py."""

from .config import (DataConfig, EvalConfig, ModelConfig, OptimConfig, ParallelConfig, PhaseConfig, TrainConfig,
                     apply_overrides, resolve_config)
from .presets import get_preset, preset_names
from .trainer import Trainer, build_data, build_model, build_optimizer, build_scheduler, train, wrap_model

__all__ = ["DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PhaseConfig", "TrainConfig", "apply_overrides",
           "resolve_config", "get_preset", "preset_names", "Trainer", "build_data", "build_model", "build_optimizer",
           "build_scheduler", "train", "wrap_model"]
