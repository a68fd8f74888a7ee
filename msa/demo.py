"""``msa demo``: train a small MSA language model on real text, dense warmup then sparse.

The text is the Python standard library's own source code (found through sysconfig, so every
machine has it and nothing is downloaded), as byte-level tokens. The same model is also trained
fully dense from the same initialisation for comparison. Reports LM loss, KL, and the paper's block
recall / score recall of the indexer through both phases; writes a PNG with the curves and a picture
of one layer's selected blocks, and a JSON with every number.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .layers import MSAConfig
from .metrics import indexer_recall
from .models import MSAForCausalLM, MSALMConfig
from .ops.common import check


@dataclass
class DemoConfig:
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 400
    warmup_steps: int = 120
    eval_every: int = 25
    lr: float = 3e-3
    index_lr: float = 3e-3
    hidden_size: int = 128
    num_layers: int = 3
    num_dense_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    index_dim: int = 32
    block_size: int = 32
    topk_blocks: int = 4
    kl_weight: float = 1.0
    corpus_bytes: int = 4_000_000
    seed: int = 0
    autocast: str = ""   # "bfloat16": forward under torch.autocast (GPU); "" keeps fp32

    @staticmethod
    def for_device(device: torch.device) -> "DemoConfig":
        if device.type == "cuda":  # bigger: longer context, more blocks to choose from
            # H200 (benchmarks/results/demo_h200.json): 62 s in all with the forward under bf16 autocast
            # (MSA 36 s including the Triton compiles, dense 7 s); in fp32 the kernels take their exact
            # fp32 path and the same run took 364 s. T = 4K is far below where sparse attention pays off.
            return DemoConfig(seq_len=4096, batch_size=4, steps=200, warmup_steps=60, eval_every=20,
                              hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                              index_dim=64, block_size=128, topk_blocks=8, lr=1e-3, index_lr=1e-3,
                              corpus_bytes=40_000_000, autocast="bfloat16")
        return DemoConfig()


def stdlib_corpus(max_bytes: int, seed: int = 0) -> bytes:
    """Concatenated .py files of the running Python's standard library (deterministic order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=g).tolist()
    chunks, total = [], 0
    for i in order:
        try:
            data = files[i].read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class Batches:
    """Random windows of the corpus as (B, T) int64 token batches; the last 5% is held out."""

    def __init__(self, corpus: bytes, seq_len: int, batch_size: int, device, seed: int):
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        cut = int(len(data) * 0.95)
        self.train, self.val = data[:cut], data[cut:]
        self.seq_len, self.batch_size, self.device = seq_len, batch_size, device
        self.g = torch.Generator().manual_seed(seed)

    def _take(self, data, gen):
        starts = torch.randint(0, len(data) - self.seq_len - 1, (self.batch_size,), generator=gen)
        return torch.stack([data[s:s + self.seq_len] for s in starts]).to(self.device)

    def next(self):
        return self._take(self.train, self.g)

    def val_batch(self):
        return self._take(self.val, torch.Generator().manual_seed(1234))


def build_model(cfg: DemoConfig, device) -> MSAForCausalLM:
    att = MSAConfig(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, index_dim=cfg.index_dim, block_size=cfg.block_size,
                    topk_blocks=cfg.topk_blocks, mode="dense")
    lm = MSALMConfig(vocab_size=256, num_layers=cfg.num_layers, intermediate_size=3 * cfg.hidden_size,
                     attention=att, num_dense_layers=cfg.num_dense_layers, kl_weight=cfg.kl_weight)
    torch.manual_seed(cfg.seed)
    return MSAForCausalLM(lm).to(device)


def make_optimizer(model: MSAForCausalLM, cfg: DemoConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": model.backbone_parameters(), "lr": cfg.lr, "weight_decay": 0.1},
                              {"params": model.index_parameters(), "lr": cfg.index_lr, "weight_decay": 0.0}],
                             betas=(0.9, 0.95))


def lr_factor(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate(model: MSAForCausalLM, ids: torch.Tensor, sparse_eval: bool,
             autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Validation LM loss (in the model's current mode) and, for MSA layers, the recall of the
    indexer's top-k against the main branch's own attention (what the sparse phase would select).
    autocast_dtype: the model's forward runs under torch.autocast (the recall is computed in fp32)."""
    model.eval()
    amp = dict(device_type=ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    captured = []
    hooks = [lyr.attn.register_forward_pre_hook(lambda m, args, kw: captured.append((m, args[0])), with_kwargs=True)
             for lyr in model.layers if lyr.attn.config.use_index]
    try:
        with torch.autocast(**amp):
            losses = model.loss(ids)
    finally:
        for h in hooks:
            h.remove()
    out = {"val_lm_loss": float(losses["lm_loss"]), "val_kl": float(losses["kl_loss"])}
    if captured and sparse_eval:
        brs, srs = [], []
        pos = torch.arange(ids.shape[1], device=ids.device).view(1, -1).expand(ids.shape[0], -1)
        for attn, x in captured:
            c = attn.config
            from .ops.select_blocks import select_blocks
            with torch.autocast(**amp):
                q, k, _, q_idx, k_idx = attn.project(x, pos)
                sel = select_blocks(q_idx, k_idx, block_size=c.block_size, topk=c.topk_blocks,
                                    init_blocks=c.init_blocks, local_blocks=c.local_blocks)
            r = indexer_recall(q, k, sel, block_size=c.block_size)
            brs.append(r["block_recall"])
            srs.append(r["score_recall"])
        out["block_recall"] = sum(brs) / len(brs)
        out["score_recall"] = sum(srs) / len(srs)
    model.train()
    return out


def train(model: MSAForCausalLM, cfg: DemoConfig, batches: Batches, *, msa: bool, label: str,
          progress: bool = True) -> List[Dict[str, float]]:
    """Train for cfg.steps. msa=True: dense warmup for cfg.warmup_steps, then sparse; msa=False: dense
    throughout (the index branch still trains on the full-support KL, so the comparison is fair)."""
    from tqdm.auto import tqdm

    opt = make_optimizer(model, cfg)
    amp = getattr(torch, cfg.autocast) if cfg.autocast else None
    base = [g["lr"] for g in opt.param_groups]
    val = batches.val_batch()
    history = []
    model.set_mode("dense")
    bar = tqdm(range(cfg.steps), desc=label, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if msa and step == cfg.warmup_steps:
            model.set_mode("sparse")
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, cfg.steps)
        t0 = time.perf_counter()
        losses = model.training_step(batches.next(), opt, autocast_dtype=amp)
        rec = {"step": step + 1, "phase": "sparse" if (msa and step >= cfg.warmup_steps) else "dense",
               "lm_loss": losses["lm_loss"], "kl": losses["kl_loss"], "step_s": time.perf_counter() - t0}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            rec.update(evaluate(model, val, sparse_eval=True, autocast_dtype=amp))
            bar.set_postfix(lm=f"{rec['lm_loss']:.3f}", kl=f"{rec['kl']:.3f}",
                            recall=f"{rec.get('block_recall', float('nan')):.2f}/"
                                   f"{rec.get('score_recall', float('nan')):.2f}")
        history.append(rec)
    return history


@torch.no_grad()
def selection_picture(model: MSAForCausalLM, ids: torch.Tensor, layer: Optional[int] = None):
    """(selected-block map (T, NB) of one sequence, group 0; attention-mass map (T, NB))."""
    model.eval()
    msa_layers = [i for i, lyr in enumerate(model.layers) if lyr.attn.config.use_index]
    li = msa_layers[-1] if layer is None else layer
    captured = []
    h = model.layers[li].attn.register_forward_pre_hook(lambda m, a, kw: captured.append(a[0]), with_kwargs=True)
    model(ids[:1], compute_kl=False)
    h.remove()
    attn = model.layers[li].attn
    c = attn.config
    t = ids.shape[1]
    q, k, _, q_idx, k_idx = attn.project(captured[0], torch.arange(t, device=ids.device).view(1, -1))
    from .ops.select_blocks import select_blocks
    sel = select_blocks(q_idx, k_idx, block_size=c.block_size, topk=c.topk_blocks)[0, :, 0].long().cpu()
    nb = math.ceil(t / c.block_size)
    picture = torch.zeros(t, nb)
    for i in range(t):
        ids_i = sel[i][sel[i] >= 0]
        picture[i, ids_i] = 1.0
        picture[i, i // c.block_size] = 2.0
    g = c.num_heads // c.num_kv_heads
    s = torch.einsum("tgd,jd->gtj", q[0, :, :g].float(), k[0, :, 0].float()) * c.head_dim ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.softmax(s, -1).mean(0).cpu()
    mass = torch.nn.functional.pad(p, (0, nb * c.block_size - t)).view(t, nb, c.block_size).sum(-1)
    return picture, mass, li


def plot(path: Path, hist_msa, hist_dense, picture, mass, layer_idx: int, cfg: DemoConfig) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    for hist, name, color in ((hist_msa, "MSA (dense warmup -> sparse)", "tab:blue"), (hist_dense, "dense", "tab:red")):
        ev = [r for r in hist if "val_lm_loss" in r]
        ax[0, 0].plot([r["step"] for r in hist], [r["lm_loss"] for r in hist], color=color, alpha=0.25, lw=0.8)
        ax[0, 0].plot([r["step"] for r in ev], [r["val_lm_loss"] for r in ev], color=color, marker="o", ms=3,
                      label=f"{name} (val)")
    ax[0, 0].axvline(cfg.warmup_steps, color="gray", ls="--", lw=1)
    ax[0, 0].set(title="LM loss (bytes; faint: train)", xlabel="step", ylabel="nats / byte")
    ax[0, 0].legend()
    ax[0, 1].plot([r["step"] for r in hist_msa], [r["kl"] for r in hist_msa], label="KL (sum over MSA layers)")
    ax[0, 1].axvline(cfg.warmup_steps, color="gray", ls="--", lw=1, label="warmup ends")
    ax2 = ax[0, 1].twinx()
    ev = [r for r in hist_msa if "block_recall" in r]
    ax2.plot([r["step"] for r in ev], [r["block_recall"] for r in ev], "g-o", ms=3, label="block recall")
    ax2.plot([r["step"] for r in ev], [r["score_recall"] for r in ev], "m-o", ms=3, label="score recall")
    ax2.set_ylim(0, 1.02)
    ax[0, 1].set(title="Indexer: KL and recall (val)", xlabel="step", ylabel="KL")
    ax[0, 1].legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax[1, 0].imshow(picture.T.numpy(), aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    ax[1, 0].set(title=f"layer {layer_idx}, group 0: selected blocks (yellow: local)", xlabel="query position",
                 ylabel="key block")
    ax[1, 1].imshow(mass.T.clamp_min(1e-4).log10().numpy(), aspect="auto", origin="lower", interpolation="nearest",
                    cmap="magma")
    ax[1, 1].set(title="main-branch attention mass per block (log10)", xlabel="query position", ylabel="key block")
    fig.suptitle(f"MSA demo: stdlib source bytes, T={cfg.seq_len}, block {cfg.block_size}, top-{cfg.topk_blocks}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str = "out/demo", *, steps: Optional[int] = None, device: Optional[str] = None,
             progress: bool = True, **overrides) -> Dict:
    check(steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1),
          f"steps must be a positive int (or None for the device's default), got {steps!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check(dev.type != "cuda" or torch.cuda.is_available(),
          f"device={device!r} requested but CUDA is not available on this machine")
    cfg = DemoConfig.for_device(dev)
    if steps is not None:
        cfg.warmup_steps = max(1, round(cfg.warmup_steps * steps / cfg.steps))
        cfg.steps = steps
    for k, v in overrides.items():
        setattr(cfg, k, v)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"msa demo on {dev}: {cfg.num_layers} layers ({cfg.num_dense_layers} dense), T={cfg.seq_len}, "
          f"block {cfg.block_size}, top-{cfg.topk_blocks} of {math.ceil(cfg.seq_len / cfg.block_size)} blocks, "
          f"{cfg.steps} steps ({cfg.warmup_steps} dense warmup)")
    corpus = stdlib_corpus(cfg.corpus_bytes, cfg.seed)
    print(f"corpus: {len(corpus) / 1e6:.1f} MB of Python standard library source")
    model = build_model(cfg, dev)
    dense_model = copy.deepcopy(model)
    t0 = time.time()
    hist_msa = train(model, cfg, Batches(corpus, cfg.seq_len, cfg.batch_size, dev, cfg.seed), msa=True,
                     label="MSA  ", progress=progress)
    hist_dense = train(dense_model, cfg, Batches(corpus, cfg.seq_len, cfg.batch_size, dev, cfg.seed), msa=False,
                       label="dense", progress=progress)
    picture, mass, li = selection_picture(model, Batches(corpus, cfg.seq_len, 1, dev, 7).val_batch())
    png = out / "demo.png"
    plot(png, hist_msa, hist_dense, picture, mass, li, cfg)
    final_m, final_d = hist_msa[-1], hist_dense[-1]
    summary = {"config": asdict(cfg), "device": str(dev), "seconds": time.time() - t0,
               "msa_val_lm_loss": final_m["val_lm_loss"], "dense_val_lm_loss": final_d["val_lm_loss"],
               "block_recall": final_m.get("block_recall"), "score_recall": final_m.get("score_recall"),
               "history_msa": hist_msa, "history_dense": hist_dense, "plot": str(png)}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\nfinal validation LM loss: MSA {final_m['val_lm_loss']:.4f} vs dense {final_d['val_lm_loss']:.4f} "
          f"nats/byte; indexer block recall {final_m['block_recall']:.3f}, score recall "
          f"{final_m['score_recall']:.3f} (top-{cfg.topk_blocks})")
    print(f"wrote {png} and {out / 'demo.json'} in {summary['seconds']:.0f} s")
    return summary
