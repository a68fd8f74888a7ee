"""Is msa's model slow to copy, or is copying slow to learn at this size? A sanity check on the CPU.

msa's ``MSAForCausalLM`` (the ``small`` preset's dimensions, dense mode) and a minimal RoPE GPT of the
same dimensions (3 layers, hidden 128, 4 heads of 32, SwiGLU 384, RMSNorm, tied embeddings) train on
the same batches of pure induction data: each row is a random prefix of 8-63 tokens (vocabulary 512)
repeated to fill 256 tokens, so every token after the first period is predictable by copying. Same
optimizer (AdamW, betas 0.9 / 0.95, weight decay 0.1, 20 warmup steps). Printed every 50 steps: the
NLL on the first period (chance: ln 512 = 6.24) and on the repeats (a model that copies drives it to 0).

    python benchmarks/dev/induction_reference.py --model msa --steps 800 --lr 1e-3
    python benchmarks/dev/induction_reference.py --model gpt --steps 800 --lr 1e-3

Session 51 (benchmarks/results/quality_cpu/copy_planting.json): the two learn the repeats at the same slow
rate, so the models' failure to copy is the budget's, not a defect of msa's model.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, BATCH = 512, 256, 16


def induction_batch(g: torch.Generator):
    """(ids (BATCH, SEQ) int64, repeat (BATCH, SEQ) bool: the token is a copy of one a period back)."""
    ids = torch.empty(BATCH, SEQ, dtype=torch.long)
    repeat = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for b in range(BATCH):
        period = int(torch.randint(8, 64, (1,), generator=g))
        ids[b] = torch.randint(0, VOCAB, (period,), generator=g).repeat(SEQ // period + 1)[:SEQ]
        repeat[b, period:] = True
    return ids, repeat


def rope(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d), interleaved pairs rotated by position (theta 10000)."""
    d = x.shape[-1]
    f = torch.outer(torch.arange(x.shape[2], dtype=torch.float32), 10000.0 ** (-torch.arange(0, d, 2) / d))
    c, s = f.cos(), f.sin()
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attn_norm, self.mlp_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        g, u = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class ReferenceGPT(nn.Module):
    def __init__(self, hidden=128, layers=3, heads=4, head_dim=32, ffn=384):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, head_dim, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.emb.weight.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("msa", "gpt"), required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model == "msa":
        from msa.train.presets import PRESETS
        from msa.train.trainer import build_model
        cfg = PRESETS["small"]()
        cfg.phase.kind = "dense"
        model = build_model(cfg, VOCAB, torch.device("cpu"))
        model.set_mode("dense")

        def logits(ids):
            return model(ids, compute_kl=False).logits
    else:
        model = logits = ReferenceGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for pg in opt.param_groups:
            pg["lr"] = args.lr * min(1.0, step / 20)
        ids, repeat = induction_batch(g)
        nll = F.cross_entropy(logits(ids)[:, :-1].float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                              reduction="none").view(BATCH, SEQ - 1)
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
        if step % 50 == 0:
            rep = repeat[:, 1:]
            print(f"{args.model} step {step} loss {nll.mean().item():.3f} first period {nll[~rep].mean().item():.3f} "
                  f"repeats {nll[rep].mean().item():.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
