"""``msa train``: the training loop of the MSA language model.

The pieces a data-parallel launcher replaces are separate functions: ``build_model`` (the
MSAForCausalLM on its device), ``wrap_model`` (identity here; DDP / FSDP2 wrap here), and
``build_data`` (a loader for one rank of world_size). Exact resume: a checkpoint holds the model,
optimizer, scheduler, the loader position and every RNG state, and the step's mode and learning
rate are functions of the step, so an interrupted and resumed run repeats the uninterrupted one's
losses bit for bit on a deterministic device.

Data parallelism (``parallel.strategy`` "ddp" or "fsdp2", under ``torchrun``; the process group is
initialised by the caller, e.g. ``msa train``): the model is wrapped by ``msa.parallel.wrap_model``,
each rank reads its own slice of every global micro-batch, every rank's LM token mean is weighted by
its share of the global micro-batch's targets (so the averaged gradient is the gradient of the global
token mean: the same step as one process on the whole global batch), gradients are clipped per group
with DTensor-aware norms, the logged values are global, and checkpoints are
torch.distributed.checkpoint directories that resume on any number of ranks (or in one process).
Only rank 0 writes files or prints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data.dataset import CorpusData, CorpusSpec, WindowLoader, Windows, eval_window_ids, make_windows, prepare_corpus
from ..data.copies import CopyPlanter
from ..data.facts import FactPlanter
from ..evals.capture import unwrap
from ..models import MSAForCausalLM
from ..ops.common import check
from .config import TrainConfig, from_dict, model_config, to_dict
from .loss import forward_loss

CKPT_DIR = "checkpoints"
# rank 0's loop state inside a distributed (DCP) checkpoint directory (msa.parallel.save_checkpoint's train_state)
TRAINER_STATE = "train_state.json"


# ------------------------------------------------------------------------------------------------
# building blocks (the plug points for data / model parallelism)

def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA for "auto"; None (fp32) on the CPU."""
    p = cfg.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> MSAForCausalLM:
    """The model, initialised from cfg.seed (then from phase.init_from when set). The local-window
    baseline is an MSA model whose selection is forced to the last topk_blocks blocks
    (local_blocks = topk_blocks - init_blocks), so no block is chosen by the index."""
    torch.manual_seed(cfg.seed)
    model = MSAForCausalLM(model_config(cfg, vocab_size))
    std = cfg.model.index_init_std or 0.02
    if cfg.phase.init_from:
        load_init_weights(model, cfg.phase.init_from, reinit_index=cfg.phase.reinit_index, seed=cfg.seed,
                          index_std=std)
    elif cfg.model.index_init_std:
        reinit_index_projections(model, seed=cfg.seed, std=std)
    return model.to(device)


def wrap_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Identity for parallel.strategy "none". "ddp": DistributedDataParallel(model); "fsdp2":
    ``fully_shard`` per decoder layer and on the root, in place (``msa.parallel.wrap_model``), with
    the run's precision (bf16 / fp16: FSDP2 computes with 16-bit parameters and reduces gradients in
    fp32; DDP keeps fp32 parameters and the trainer's autocast). The trainer calls the wrapper for
    the training forward and the unwrapped model (the same object under FSDP2) for everything else.
    Needs an initialised process group."""
    strategy = cfg.parallel.strategy
    if strategy == "none":
        return model
    from ..parallel import wrap_model as parallel_wrap
    dtype = autocast_dtype(cfg, next(model.parameters()).device)
    mp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    # without the KL nothing trains the index projections, and DDP must be told that they get no gradient
    return parallel_wrap(model, strategy, mp, reshard_after_forward=cfg.parallel.reshard_after_forward,
                         find_unused_parameters=cfg.phase.kl_weight == 0)


def param_groups(model: MSAForCausalLM, cfg: TrainConfig) -> List[Dict]:
    """AdamW groups: backbone matrices (decayed), backbone vectors and norms (not decayed), and the
    index projections with their own learning rate and decay."""
    o = cfg.optim
    index_ids = {id(p) for p in model.index_parameters()}
    mats, vecs = [], []
    for p in model.parameters():
        if id(p) in index_ids:
            continue
        (mats if p.dim() >= 2 else vecs).append(p)
    groups = [{"name": "backbone", "params": mats, "lr": o.lr, "weight_decay": o.weight_decay},
              {"name": "backbone_no_decay", "params": vecs, "lr": o.lr, "weight_decay": 0.0},
              {"name": "index", "params": model.index_parameters(), "lr": o.index_lr,
               "weight_decay": o.index_weight_decay}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: MSAForCausalLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, cfg), betas=(o.beta1, o.beta2), eps=o.eps)


def lr_multiplier(step: int, cfg: TrainConfig, group: str = "backbone") -> float:
    """Linear warmup over optim.warmup_steps, then cosine from 1 to min_lr_ratio at the last step
    (the index group stays at 1 after its warmup with index_schedule="constant")."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if group == "index" and o.index_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    fns = [(lambda s, _g=g.get("name", "backbone"): lr_multiplier(s, cfg, _g)) for g in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, fns)


def phase_mode_at(step: int, cfg: TrainConfig) -> str:
    """The attention mode of the phase that step ``step`` (0-based) belongs to: "dense" in the warmup, "sparse"
    after it (what evaluations and checkpoints of an MSA run see, whatever ``phase.dense_every`` does to single
    steps)."""
    kind = cfg.phase.kind
    if kind == "dense":
        return "dense"
    if kind == "local":
        return "sparse"
    return "dense" if step < cfg.phase.warmup_steps else "sparse"


def mode_at(step: int, cfg: TrainConfig) -> str:
    """The attention mode step ``step`` (0-based) trains in: the phase's, except that an MSA run with
    ``phase.dense_every`` N > 0 trains every N-th sparse-phase step densely (the last of each N, with the
    warmup's full-support KL)."""
    mode = phase_mode_at(step, cfg)
    n = cfg.phase.dense_every
    if mode == "sparse" and cfg.phase.kind == "msa" and n > 0 and (step - cfg.phase.warmup_steps) % n == n - 1:
        return "dense"
    return mode


def kl_support_at(step: int, cfg: TrainConfig) -> str:
    """The KL support of step ``step`` (0-based): "full" on every ``phase.full_kl_every``-th sparse
    step of an MSA run (counting from the first), else "selected"."""
    n = cfg.phase.full_kl_every
    if n <= 0 or cfg.phase.kind != "msa" or mode_at(step, cfg) != "sparse":
        return "selected"
    return "full" if (step - cfg.phase.warmup_steps) % n == 0 else "selected"


def corpus_spec(cfg: TrainConfig) -> CorpusSpec:
    d = cfg.data
    return CorpusSpec(tokenizer=d.tokenizer, vocab_size=d.vocab_size, tokenizer_train_mb=d.tokenizer_train_mb,
                      max_corpus_mb=d.max_corpus_mb, eval_corpus_mb=d.eval_corpus_mb, max_file_kb=d.max_file_kb,
                      val_fraction=d.val_fraction, test_fraction=d.test_fraction, include_stdlib=d.include_stdlib,
                      include_site_packages=d.include_site_packages, seed=d.seed)


@dataclass
class DataBundle:
    corpus: CorpusData
    train: WindowLoader
    val_windows: Windows
    test_windows: Windows
    val_ids: List[int]
    test_ids: List[int]


def build_data(cfg: TrainConfig, device: torch.device, *, rank: int = 0, world_size: int = 1,
               log=print) -> DataBundle:
    """The tokenized corpus (cached), the training loader for ``rank`` of ``world_size`` and the fixed
    validation / test windows."""
    corpus = prepare_corpus(corpus_spec(cfg), cfg.data.cache_dir or None, log=log)
    t = cfg.data.seq_len
    tw = make_windows(corpus.splits["train"], t)
    # copies first: a fact line spliced into a repeat only interrupts it, while a repeat spliced into an
    # `assert NAME == 12345` line would corrupt the question the facts teach
    planters = []
    if cfg.data.synthetic_copies > 0:
        planters.append(CopyPlanter(fraction=cfg.data.synthetic_copies, copies_per_window=cfg.data.copies_per_window,
                                    seed=cfg.seed))
    if cfg.data.synthetic_facts > 0:
        planters.append(FactPlanter(corpus.tokenizer, fraction=cfg.data.synthetic_facts,
                                    facts_per_window=cfg.data.facts_per_window, seed=cfg.seed))
    if planters:
        probe = [int(w) for w in np.linspace(0, len(tw) - 1, num=min(64, len(tw)))]
        tok = corpus.splits["train"].tokens
        for pl in planters:
            st = pl.survey(lambda w: [tok[s:s + n] for s, n in zip(*tw.pieces(w))], probe)
            got = st[f"{pl.UNIT}_per_planted_window"]
            log(f"msa.data: {pl.UNIT} planted in {st['planted_share']:.0%} of {st['windows']} surveyed training windows, "
                f"{got:.1f} per planted window (asked for {pl.n}"
                + ("" if got >= pl.n else "; the rest did not fit in half of a window's longest document") + ")")
    loader = WindowLoader(corpus.splits["train"].tokens, tw, cfg.data.batch_size, seed=cfg.seed, rank=rank,
                          world_size=world_size, device=device, planters=planters)
    vw = make_windows(corpus.splits["val"], t)
    sw = make_windows(corpus.splits["test"], t)
    check(len(vw) > 0 and len(sw) > 0, f"the validation/test splits hold fewer than {t} tokens; raise "
                                       f"data.eval_corpus_mb or lower data.seq_len")
    return DataBundle(corpus, loader, vw, sw, eval_window_ids(vw, cfg.eval.batches, cfg.eval.seed),
                      eval_window_ids(sw, cfg.eval.bucket_windows, cfg.eval.seed))


# ------------------------------------------------------------------------------------------------
# checkpoints

def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def list_checkpoints(out_dir: Path) -> List[Path]:
    """The run's checkpoints, oldest first: ``step_N.pt`` files (one process) and ``step_N``
    directories (torch.distributed.checkpoint, written by a data-parallel run)."""
    d = Path(out_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = []
    for p in d.glob("step_*"):
        tail = p.name[len("step_"):]
        if p.is_file() and p.suffix == ".pt" and p.stem[len("step_"):].isdigit():
            found.append((int(p.stem[len("step_"):]), 0, p))
        elif p.is_dir() and tail.isdigit() and (p / TRAINER_STATE).exists():
            found.append((int(tail), 1, p))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    cks = list_checkpoints(out_dir)
    return cks[-1] if cks else None


def load_full_model_state(path: Path) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint, a ``step_N.pt`` file or a distributed ``step_N`` directory
    (every rank reads all of it, unsharded, on the CPU)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)["model"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {k[len("model."):]: v for k, v in state.items()}


def reinit_index_projections(model: MSAForCausalLM, *, seed: int, std: float = 0.02) -> None:
    """Fresh index projections (normal with ``std``, from ``seed``) and identity index norms."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q_idx_proj", "k_idx_proj"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            elif leaf in ("q_idx_norm", "k_idx_norm"):
                mod.weight.zero_()


def load_init_weights(model: MSAForCausalLM, path: str, *, reinit_index: bool, seed: int,
                      index_std: float = 0.02) -> None:
    """Model weights from a checkpoint file or a run directory (its last checkpoint). Only index
    parameters may be missing or extra (e.g. a dense model gaining index norms); reinit_index draws
    the index projections afresh (normal, std 0.02; index norms to identity), and then the index
    branch may also change shape (another model.index_dim: a capacity probe on a frozen backbone)."""
    p = Path(path)
    if p.is_dir() and not (p / TRAINER_STATE).exists():  # a run directory, not one distributed checkpoint
        found = latest_checkpoint(p)
        check(found is not None, f"phase.init_from={path!r}: no checkpoint under {p / CKPT_DIR}")
        p = found
    check(p.exists(), f"phase.init_from={path!r} does not exist")
    state = load_full_model_state(p)
    if reinit_index:  # drawn afresh below, so the checkpoint's index weights are not needed
        state = {k: v for k, v in state.items() if "_idx_" not in k}
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} here {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    check(not wrong, f"phase.init_from={path!r}: the checkpoint's shapes differ from this model's ({wrong[:3]}); "
          "only the index branch may change shape (model.index_dim), and only with phase.reinit_index=true")
    res = model.load_state_dict(state, strict=False)
    bad = [k for k in list(res.missing_keys) + list(res.unexpected_keys) if "_idx_" not in k]
    check(not bad, f"phase.init_from={path!r}: the checkpoint does not match the model (keys: {bad[:6]})")
    if reinit_index:
        reinit_index_projections(model, seed=seed, std=index_std)


# ------------------------------------------------------------------------------------------------
# the trainer

RESUME_FREE_KEYS = ("max_minutes", "eval", "log_every", "device", "keep_checkpoints", "parallel")


class Trainer:
    """Runs one TrainConfig into out_dir: config.json, log.jsonl (one record per logged step and per
    evaluation), checkpoints/step_*.pt, summary.json, final_eval.json and plots (PNG).
    A run directory that already holds checkpoints is resumed (the configuration must match except
    for max_minutes, eval settings, log_every, device, keep_checkpoints, parallel; data.batch_size
    may change with the number of ranks as long as the global micro-batch, data.batch_size times
    the world size, stays the same).

    With parallel.strategy "ddp" or "fsdp2" the process group must be initialised (rank and
    world_size are taken from it) and every rank constructs a Trainer and calls fit()."""

    def __init__(self, cfg: TrainConfig, out_dir: str, *, rank: int = 0, world_size: int = 1,
                 progress: bool = True, resume: bool = True, log=print):
        self.cfg = cfg.validate()
        self.out = Path(out_dir)
        self.strategy = cfg.parallel.strategy
        self.distributed = self.strategy != "none"
        if self.distributed:
            check(dist.is_available() and dist.is_initialized(),
                  f"parallel.strategy={self.strategy!r} needs an initialised process group: launch with torchrun "
                  f"(msa train initialises it) or call torch.distributed.init_process_group first")
            r, w = dist.get_rank(), dist.get_world_size()
            check((rank, world_size) in ((0, 1), (r, w)),
                  f"rank={rank}, world_size={world_size} differ from the process group's ({r}, {w})")
            rank, world_size = r, w
        self.rank, self.world_size, self.progress = rank, world_size, progress
        self.log = log if rank == 0 else (lambda *a, **k: None)
        self.device = resolve_device(cfg)
        if self.distributed and self.device.type == "cuda" and self.device.index is None:
            local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
            self.device = torch.device("cuda", local)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.amp = autocast_dtype(cfg, self.device)
        # FSDP2 computes with 16-bit parameters itself (its MixedPrecisionPolicy); DDP and one process autocast
        self.train_amp = None if self.strategy == "fsdp2" else self.amp
        self._replica: Optional[MSAForCausalLM] = None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.distributed and rank != 0:
            dist.barrier()  # rank 0 builds the tokenizer and token cache first; the others read it
        self.data = build_data(cfg, self.device, rank=rank, world_size=world_size, log=self.log)
        if self.distributed and rank == 0:
            dist.barrier()
        self.tokenizer = self.data.corpus.tokenizer
        self.model = build_model(cfg, self.tokenizer.vocab_size, self.device)
        self.wrapped = wrap_model(self.model, cfg)
        self.opt = build_optimizer(self.model, cfg)
        self.sched = build_scheduler(self.opt, cfg)
        self.step = 0
        self.history: List[Dict] = []
        self.elapsed = 0.0
        self.tokens_seen = 0
        self._last_val: Optional[float] = None
        ck = latest_checkpoint(self.out) if resume else None
        if ck is not None:
            self._resume(ck)
        else:
            torch.manual_seed(cfg.seed + 1)
            self._write_config()
            if rank == 0:  # a fresh start leaves nothing of an earlier run in out_dir
                for stale in ("final_eval.json", "summary.json", "curves.png"):
                    (self.out / stale).unlink(missing_ok=True)
            self._rewrite_log()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _write_config(self) -> None:
        if self.rank == 0:
            info = {"config": to_dict(self.cfg), "parameters": self.param_counts(),
                    "vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.kind,
                    "data_cache": str(self.data.corpus.cache_dir), "device": str(self.device),
                    "torch": torch.__version__, "world_size": self.world_size}
            if self.device.type == "cuda":
                info["gpu"] = torch.cuda.get_device_name(self.device)
            (self.out / "config.json").write_text(json.dumps(info, indent=1))

    def param_counts(self) -> Dict[str, int]:
        total = sum(p.numel() for p in self.model.parameters())
        index = sum(p.numel() for p in self.model.index_parameters())
        emb = self.model.embed.weight.numel()
        return {"total": total, "index": index, "embedding": emb, "non_embedding": total - emb}

    def _ckpt_path(self, step: int) -> Path:
        if self.distributed:
            return self.out / CKPT_DIR / f"step_{step:08d}"
        return self.out / CKPT_DIR / f"step_{step:08d}.pt"

    def _prune_checkpoints(self) -> None:
        for p in list_checkpoints(self.out)[:-max(1, self.cfg.keep_checkpoints)]:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def save_checkpoint(self) -> Path:
        if self.distributed:
            return self._save_distributed()
        path = self._ckpt_path(self.step)
        if self.rank != 0:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "loader": self.data.train.state_dict(), "rng": rng_state(),
                 "history": self.history, "elapsed": self.elapsed, "tokens_seen": self.tokens_seen,
                 "config": to_dict(self.cfg)}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        self._prune_checkpoints()
        return path

    def _save_distributed(self) -> Path:
        """A torch.distributed.checkpoint directory step_N/: the (sharded) model and optimizer, each
        rank's RNG state, and rank 0's loop state (train_state.json). Written under step_N.tmp and
        renamed when every rank is done, so a directory step_N is always complete."""
        from ..parallel import save_checkpoint as dcp_save
        path = self._ckpt_path(self.step)
        tmp = path.with_name(path.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(self._local_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        state = {"step": self.step, "world_size": self.world_size, "strategy": self.strategy,
                 "config": to_dict(self.cfg), "scheduler": self.sched.state_dict(),
                 "loader": self.data.train.state_dict(), "history": self.history, "elapsed": self.elapsed,
                 "tokens_seen": self.tokens_seen}
        dcp_save(str(tmp), self.wrapped, self.opt, train_state=state)  # ends with a barrier
        if self.rank == 0:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            self._prune_checkpoints()
        dist.barrier()
        return path

    def _local_rng_state(self) -> Dict:
        st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def _set_local_rng_state(self, st: Dict) -> None:
        torch.set_rng_state(st["torch"])
        np.random.set_state(st["numpy"])
        random.setstate(st["python"])
        cuda = st.get("cuda")
        if cuda is not None and self.device.type == "cuda":
            if isinstance(cuda, (list, tuple)):  # a one-process checkpoint holds every device's state
                cuda = cuda[self.device.index] if self.device.index < len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)

    def _check_resume_config(self, saved_cfg: Dict, saved_world: int) -> None:
        saved, now = copy.deepcopy(saved_cfg), to_dict(self.cfg)
        for k in RESUME_FREE_KEYS:
            saved.pop(k, None)
            now.pop(k, None)
        # data.batch_size is per rank: the global micro-batch is what must not change
        sb, nb = saved["data"].pop("batch_size"), now["data"].pop("batch_size")
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(f"{self.out} holds a checkpoint of a different configuration (differs in: {diff}); "
                             f"use another --out or --fresh")
        if sb * saved_world != nb * self.world_size:
            need = sb * saved_world / self.world_size
            hint = f"set data.batch_size={int(need)}" if need == int(need) else "use a world size that divides it"
            raise ValueError(f"{self.out} holds a checkpoint with a global micro-batch of data.batch_size x world size "
                             f"= {sb} x {saved_world}; here {nb} x {self.world_size}: {hint}")

    def _resume(self, path: Path) -> None:
        if path.is_dir():
            return self._resume_distributed(path)
        st = torch.load(path, map_location="cpu", weights_only=False)
        self._check_resume_config(st["config"], 1)
        if self.distributed:  # a one-process checkpoint continued on several ranks
            self._load_full_states(st["model"], st["optimizer"])
        else:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.data.train.load_state_dict(st["loader"])
        if self.distributed:
            self._set_local_rng_state(st["rng"])
        else:
            set_rng_state(st["rng"])
        self.step, self.history = st["step"], st["history"]
        self.elapsed, self.tokens_seen = st["elapsed"], st["tokens_seen"]
        self._rewrite_log()
        self.log(f"msa train: resumed {self.out} at step {self.step} from {path.name}")

    def _resume_distributed(self, path: Path) -> None:
        """Continue from a torch.distributed.checkpoint directory written by any number of ranks, on
        this run's ranks (DCP reshards the model and optimizer) or in one process."""
        from ..parallel import load_checkpoint
        st = json.loads((path / TRAINER_STATE).read_text())
        self._check_resume_config(st["config"], st["world_size"])
        load_checkpoint(str(path), self.wrapped, self.opt)
        self.sched.load_state_dict(st["scheduler"])
        self.data.train.load_state_dict(st["loader"])
        # every rank's RNG evolves identically (the same seed, the same draws), so any rank's state
        # continues a run on a different number of ranks
        rng = path / f"rng_rank{self.rank}.pt"
        rng = rng if rng.exists() else path / "rng_rank0.pt"
        self._set_local_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        self.step, self.history = st["step"], st["history"]
        self.elapsed, self.tokens_seen = st["elapsed"], st["tokens_seen"]
        self._rewrite_log()
        self.log(f"msa train: resumed {self.out} at step {self.step} from {path.name} "
                 f"(written by {st['world_size']} rank(s), now {self.world_size})")

    def _load_full_states(self, model_state: Dict, optim_state: Dict) -> None:
        """Load one process's model / optimizer state dicts into the wrapped (DDP or FSDP2) model and
        its optimizer: through a plain copy whose optimizer state gets parameter names, then
        torch.distributed.checkpoint.state_dict's full-state loader (which shards for FSDP2)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        with torch.random.fork_rng(devices=[]):
            plain = MSAForCausalLM(copy.deepcopy(self.model.config))
        plain.load_state_dict(model_state)
        popt = build_optimizer(plain, self.cfg)
        popt.load_state_dict(optim_state)
        msd, osd = get_state_dict(plain, popt)
        set_state_dict(self.wrapped, self.opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (a decision that depends on the clock or on files)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        return bool(t.item())

    def _eval_model(self) -> nn.Module:
        """The model the evaluations call. FSDP2: an unsharded replica with the current weights (the
        recall and retrieval evaluations call layers and projections outside the model's forward,
        where FSDP2's parameters are sharded); every rank calls this at the same points."""
        if self.strategy == "none":
            return self.wrapped
        if self.strategy == "ddp":
            return self.model  # DDP's forward would synchronise buffers: each rank evaluates alone
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        if self._replica is None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self._replica = MSAForCausalLM(copy.deepcopy(self.model.config)).to(self.device)
        self._replica.load_state_dict(sd)
        self._replica.set_mode(self.model.mode)
        return self._replica

    def _rewrite_log(self) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "w") as fh:
                for r in self.history:
                    fh.write(json.dumps(r) + "\n")

    def _record(self, rec: Dict) -> None:
        self.history.append(rec)
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's mean losses."""
        if self.distributed:
            return self._train_step_parallel()
        cfg = self.cfg
        mode, support = mode_at(self.step, cfg), kl_support_at(self.step, cfg)
        self.model.set_mode(mode)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        lm = kl = 0.0
        layer_kl: Dict[int, float] = {}
        ntok = 0
        for _ in range(cfg.grad_accum):
            b = self.data.train.next()
            ntok += b.input_ids.numel()
            with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                out = forward_loss(self.wrapped, b.input_ids, b.cu_seqlens, kl_weight=cfg.phase.kl_weight,
                                   detach_teacher=cfg.phase.kl_detach_teacher,
                                   teacher_grad_rows=cfg.phase.teacher_grad_rows, kl_support=support,
                                   kl_target=cfg.phase.kl_target, kl_rows=cfg.phase.kl_rows)
            (out["loss"] / cfg.grad_accum).backward()
            keys = sorted(out["layer_kl"])
            vals = torch.stack([out["lm_loss"].float(), out["kl_loss"].float()]
                               + [out["layer_kl"][i].float() for i in keys]).tolist()  # one device sync
            lm += vals[0] / cfg.grad_accum
            kl += vals[1] / cfg.grad_accum
            for i, v in zip(keys, vals[2:]):
                layer_kl[i] = layer_kl.get(i, 0.0) + v / cfg.grad_accum
        norms = {}
        if cfg.optim.grad_clip:
            bb = [p for p in self.model.backbone_parameters() if p.grad is not None]
            ix = [p for p in self.model.index_parameters() if p.grad is not None]
            if bb:
                norms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(bb, cfg.optim.grad_clip))
            if ix:
                norms["index_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(ix, cfg.optim.grad_clip))
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.opt.param_groups)}
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.tokens_seen += ntok * self.world_size
        self._restore_phase_mode(mode)
        if cfg.phase.full_kl_every:  # a "full" step's KL is over more tokens: not comparable with the others
            norms["kl_support"] = support
        return {"lm_loss": lm, "kl": kl, "layer_kl": {str(i): v for i, v in sorted(layer_kl.items())},
                "mode": mode, "lr": lrs.get("backbone", next(iter(lrs.values()))), "index_lr": lrs.get("index"),
                "tokens": ntok * self.world_size, **norms}

    def _restore_phase_mode(self, mode: str) -> None:
        """After a dense step of phase.dense_every the model goes back to the phase's mode, which
        evaluations (eval.mode "train") and checkpoints record."""
        phase = phase_mode_at(self.step - 1, self.cfg)
        if mode != phase:
            self.model.set_mode(phase)

    def _grad_sync(self, sync: bool):
        """Gradient reduction only on the last micro-batch of a step (DDP no_sync / FSDP2's switch)."""
        if self.strategy == "ddp":
            return contextlib.nullcontext() if sync else self.wrapped.no_sync()
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _train_step_parallel(self) -> Dict[str, float]:
        """train_step on a data-parallel group: rank r's micro-batch i is its slice of global
        micro-batch i. Its LM token mean is scaled by world_size * n_ri / N_i (n_ri: its targets,
        N_i: the global micro-batch's), so the gradient DDP / FSDP2 average over the ranks is the
        gradient of the global micro-batch's token mean, as in one process on the whole batch (the
        KL is a mean over equally many tokens on every rank and needs no weight). Logged values
        are the global ones."""
        from ..parallel import clip_grad_norm_
        cfg, world = self.cfg, self.world_size
        mode, support = mode_at(self.step, cfg), kl_support_at(self.step, cfg)
        self.model.set_mode(mode)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        batches = [self.data.train.next() for _ in range(cfg.grad_accum)]
        # targets per micro-batch: every token except the last of each packed sequence
        local = torch.tensor([b.input_ids.numel() - (b.cu_seqlens.numel() - 1) for b in batches],
                             dtype=torch.float64, device=self.device)
        total = local.clone()
        dist.all_reduce(total)
        shares = (local / total).tolist()
        acc = None
        keys: List[int] = []
        ntok = 0
        for i, b in enumerate(batches):
            ntok += b.input_ids.numel()
            with self._grad_sync(i == len(batches) - 1):
                with torch.autocast(self.device.type, dtype=self.train_amp or torch.bfloat16,
                                    enabled=self.train_amp is not None):
                    out = forward_loss(self.wrapped, b.input_ids, b.cu_seqlens, kl_weight=cfg.phase.kl_weight,
                                       detach_teacher=cfg.phase.kl_detach_teacher,
                                       teacher_grad_rows=cfg.phase.teacher_grad_rows, lm_scale=shares[i] * world,
                                       kl_support=support, kl_target=cfg.phase.kl_target, kl_rows=cfg.phase.kl_rows)
                (out["loss"] / cfg.grad_accum).backward()
            keys = sorted(out["layer_kl"])
            v = torch.stack([out["lm_loss"].float(), out["kl_loss"].float()]
                            + [out["layer_kl"][k].float() for k in keys]).double()
            scale = torch.full_like(v, 1.0 / world)
            scale[0] = shares[i]
            v = v * scale / cfg.grad_accum
            acc = v if acc is None else acc + v
        dist.all_reduce(acc)  # global token-mean LM loss, mean KL
        vals = acc.tolist()
        norms = {}
        if cfg.optim.grad_clip:
            bb = [p for p in self.model.backbone_parameters() if p.grad is not None]
            ix = [p for p in self.model.index_parameters() if p.grad is not None]
            if bb:
                norms["grad_norm"] = float(clip_grad_norm_(bb, cfg.optim.grad_clip))
            if ix:
                norms["index_grad_norm"] = float(clip_grad_norm_(ix, cfg.optim.grad_clip))
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.opt.param_groups)}
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.tokens_seen += ntok * world
        self._restore_phase_mode(mode)
        if cfg.phase.full_kl_every:
            norms["kl_support"] = support
        return {"lm_loss": vals[0], "kl": vals[1], "layer_kl": {str(i): v for i, v in zip(keys, vals[2:])},
                "mode": mode, "lr": lrs.get("backbone", next(iter(lrs.values()))), "index_lr": lrs.get("index"),
                "tokens": ntok * world, **norms}

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, object]:
        from ..evals.indexer import recall_eval
        from ..evals.lm import eval_loss
        d = self.data
        kw = dict(device=self.device, autocast_dtype=self.amp)
        with self._eval_mode() as model:
            # the KL is measured (unscaled) whenever the run trains the index
            res = eval_loss(model, d.corpus.splits["val"].tokens, d.val_windows, d.val_ids,
                            kl_weight=1.0 if self.cfg.phase.kl_weight > 0 else 0.0, **kw)
            # recall of an index that is never trained (dense or local runs without KL) means nothing,
            # except for the local window, whose forced selection it measures
            trains_index = self.cfg.phase.kl_weight > 0 or self.cfg.phase.kind == "local"
            if self.cfg.eval.recall and trains_index and self.cfg.data.seq_len <= self.cfg.eval.recall_max_tokens:
                res.update(recall_eval(model, d.corpus.splits["val"].tokens, d.val_windows, d.val_ids, **kw))
            res.update(self._induction(model, kw))
        return res

    def _induction(self, model, kw) -> Dict[str, object]:
        """{"induction": {period: stats}} (``msa.evals.induction``), or {} with eval.induction_samples 0 or a context
        under 4 tokens (no period of 2 to repeat)."""
        from ..evals.induction import induction_eval
        n = self.cfg.eval.induction_samples
        if n <= 0 or self.cfg.data.seq_len < 4:
            return {}
        return {"induction": induction_eval(model, self.tokenizer.vocab_size, seq_len=self.cfg.data.seq_len,
                                            samples=n, seed=self.cfg.eval.seed, **kw)}

    def final_evaluation(self) -> Dict[str, object]:
        """Position-bucket loss and retrieval on test windows, plus recall, in the final mode."""
        from ..evals.lm import position_bucket_loss
        from ..evals.retrieval import retrieval_eval
        e, d = self.cfg.eval, self.data
        kw = dict(device=self.device, autocast_dtype=self.amp)
        test_tokens = d.corpus.splits["test"].tokens
        with self._eval_mode() as model:
            res: Dict[str, object] = {"step": self.step, "mode": model.layers[-1].attn.mode}
            res["buckets"] = position_bucket_loss(model, test_tokens, d.test_windows, d.test_ids, **kw)
            lengths = [L for L in e.retrieval_lengths if 0 < L <= self.cfg.data.seq_len * e.retrieval_max_factor]
            if lengths and e.retrieval_samples > 0:
                res["retrieval"] = retrieval_eval(model, self.tokenizer, test_tokens, lengths=lengths,
                                                  depths=e.retrieval_depths, samples=e.retrieval_samples,
                                                  seed=e.seed, **kw)
            res.update(self._induction(model, kw))
        return res

    @contextlib.contextmanager
    def _eval_mode(self):
        """The evaluation model, switched to eval.mode's attention while the evaluation runs and back
        to the training mode afterwards (the next step sets its own anyway, but a checkpoint taken
        between them must record the training mode)."""
        model = self._eval_model()
        want = self.cfg.eval.mode
        if want == "train":
            yield model
            return
        prev = unwrap(model).mode
        unwrap(model).set_mode(want)
        try:
            yield model
        finally:
            unwrap(model).set_mode(prev)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, stop_at_step: Optional[int] = None) -> Dict[str, object]:
        """Train to cfg.steps (or stop_at_step, e.g. to simulate an interruption), evaluating and
        checkpointing on schedule. Returns the summary (also written to summary.json)."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
        start_wall = time.time()
        cap = cfg.max_minutes * 60 if cfg.max_minutes else None
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.name, disable=not self.progress or self.rank != 0,
                   dynamic_ncols=True)
        tok_rate = None
        status = "complete"
        while self.step < end:
            t0 = time.perf_counter()
            rec = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.elapsed += dt
            rate = rec["tokens"] / max(dt, 1e-9)
            tok_rate = rate if tok_rate is None else 0.9 * tok_rate + 0.1 * rate
            rec.update(step=self.step, step_s=dt, tokens_seen=self.tokens_seen, tok_per_s=rate)
            last = self.step == cfg.steps
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or last):
                te = time.perf_counter()
                rec.update(self.evaluate())
                rec["eval_s"] = time.perf_counter() - te
            if self.step % cfg.log_every == 0 or "val_lm_loss" in rec or last or self.step == 1:
                self._record(rec)
            bar.update(1)
            post = {"lm": f"{rec['lm_loss']:.3f}", "kl": f"{rec['kl']:.3f}", "mode": rec["mode"],
                    "tok/s": f"{tok_rate:,.0f}"}
            if "val_lm_loss" in rec:
                self._last_val = rec["val_lm_loss"]
            if self._last_val is not None:
                post["val"] = f"{self._last_val:.3f}"
            bar.set_postfix(post)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                self.save_checkpoint()
            if cap is not None and self._agree(time.time() - start_wall > cap) and self.step < end:
                status = "interrupted"
                self.log(f"\nmsa train: wall-clock cap of {cfg.max_minutes} min reached at step {self.step}; "
                         f"checkpoint saved, run the same command to resume")
                break
        bar.close()
        if self.step < cfg.steps:
            if status == "complete":
                status = "stopped"
            self.save_checkpoint()
            return self._summary(status, None)
        final = None
        last_ck = latest_checkpoint(self.out)
        if last_ck is None or last_ck != self._ckpt_path(self.step):
            self.save_checkpoint()
        if cfg.eval.final:
            fpath = self.out / "final_eval.json"
            if self._agree(fpath.exists() and json.loads(fpath.read_text()).get("step") == self.step):
                final = json.loads(fpath.read_text())
            else:
                final = self.final_evaluation()
                if self.rank == 0:
                    fpath.write_text(json.dumps(final, indent=1))
        summary = self._summary(status, final)
        if self.rank == 0:
            from .plots import plot_run
            plot_run(self.history, final, self.out / "curves.png", title=cfg.name,
                     warmup=cfg.phase.warmup_steps if cfg.phase.kind == "msa" else None)
        return summary

    def _summary(self, status: str, final: Optional[Dict]) -> Dict[str, object]:
        evals = [r for r in self.history if "val_lm_loss" in r]
        last = evals[-1] if evals else {}
        s = {"name": self.cfg.name, "status": status, "step": self.step, "steps": self.cfg.steps,
             "tokens_seen": self.tokens_seen, "train_seconds": self.elapsed, "parameters": self.param_counts(),
             "kind": self.cfg.phase.kind, "warmup_steps": self.cfg.phase.warmup_steps,
             "seq_len": self.cfg.data.seq_len, "block_size": self.cfg.model.block_size,
             "topk_blocks": self.cfg.model.topk_blocks, "device": str(self.device)}
        for k in ("val_lm_loss", "val_kl", "block_recall", "score_recall", "selected_mass", "teacher_entropy",
                  "top_half_recall", "oracle_mass", "max_rule_recall", "val_layer_kl", "layer_block_recall",
                  "layer_score_recall"):
            if k in last:
                s[k] = last[k]
        # the spec's sparse-phase KL only (steps with phase.full_kl_every's full support are not comparable)
        sparse_kl = [r["kl"] for r in self.history
                     if r.get("mode") == "sparse" and "kl" in r and r.get("kl_support", "selected") == "selected"]
        if len(sparse_kl) >= 4:
            q = max(1, len(sparse_kl) // 4)
            s["sparse_kl_first_quarter"] = sum(sparse_kl[:q]) / q
            s["sparse_kl_last_quarter"] = sum(sparse_kl[-q:]) / q
        if final is not None:
            s["final"] = final
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(s, indent=1))
        return s


def train(cfg: TrainConfig, out_dir: str, *, progress: bool = True, resume: bool = True,
          stop_at_step: Optional[int] = None) -> Dict[str, object]:
    """Build a Trainer for cfg in out_dir (resuming when it holds checkpoints) and run it."""
    return Trainer(cfg, out_dir, progress=progress, resume=resume).fit(stop_at_step=stop_at_step)


def config_from_run(out_dir: str) -> TrainConfig:
    """The TrainConfig stored in a run directory's config.json."""
    info = json.loads((Path(out_dir) / "config.json").read_text())
    return from_dict(TrainConfig, info["config"]).validate()
