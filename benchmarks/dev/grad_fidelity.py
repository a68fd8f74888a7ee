"""Does the sparse training path give the backbone the gradients dense attention gives, when it reads every block?

Why (benchmarks/results/quality_h200 round 17): at 2100 steps the MSA model's held-out loss is 2.2-2.8% above the
dense model's in EVERY position bucket, 0-1K included, where MSA reads every block and so computes the same
function as dense attention. A gap there is in the weights, so either the sparse phase trains the backbone
differently (what it may read later in the window) or the sparse path's numerics differ. This separates the two:
the exp model (msa/train/presets.py) at the quality runs' batch (2 x 16K packed, bf16 autocast), with
``topk_blocks`` = every block, so sparse and dense attention are the same function; its loss and backbone
gradients against an fp32 dense reference, beside dense bf16 (cuDNN / flash) against the same reference (the bf16
noise floor). Twice: at initialisation and with the queries' projections scaled up (peaked attention, as after
training).

    python benchmarks/dev/grad_fidelity.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from msa.models.msa_lm import MSAForCausalLM
from msa.train.config import model_config
from msa.train.presets import get_preset


def _batch(t: int, vocab: int, device) -> torch.Tensor:
    """Two sequences of t tokens: random ids with spans repeated from earlier in the sequence, so that reading far
    back changes the loss once a model can copy (the planted facts of the quality runs do the same)."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(2):
        s = torch.randint(0, vocab, (t,), generator=g)
        span = min(256, t // 8)
        for _ in range(max(1, t // 512)):
            src = int(torch.randint(0, t // 2, (1,), generator=g))
            dst = int(torch.randint(t // 2, t - span, (1,), generator=g))
            s[dst:dst + span] = s[src:src + span]
        seqs.append(s)
    return torch.cat(seqs).view(1, -1).to(device)


def _group(name: str) -> str:
    if not name.startswith("layers."):
        return name.split(".")[0]
    part = name.split(".")
    kind = "attn." + part[3] if part[2] == "attn" else part[2]
    return f"{kind} (layers 1+)" if int(part[1]) >= 1 else f"{kind} (layer 0, dense)"


_SDPA = F.scaled_dot_product_attention


def _sdpa_fp32_gqa(q, k, v, *args, enable_gqa: bool = False, **kw):
    """fp32 on CUDA: the KV heads repeated and the memory-efficient kernel forced, so that the 16K fp32 reference
    never falls back to the math backend's T x T scores (12 layers of them do not fit)."""
    if q.is_cuda and q.dtype == torch.float32:
        if enable_gqa:
            g = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return _SDPA(q, k, v, *args, **kw)
    return _SDPA(q, k, v, *args, enable_gqa=enable_gqa, **kw)


def _run(model, ids, cu, mode: str, amp: bool):
    F.scaled_dot_product_attention = _SDPA if amp else _sdpa_fp32_gqa
    model.set_mode(mode)
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(ids, cu_seqlens=cu, compute_kl=False).logits
    tgt = ids
    # next-token loss inside each sequence (the last token of a sequence predicts nothing)
    lp = torch.log_softmax(logits[0, :-1].float(), dim=-1).gather(1, tgt[0, 1:].view(-1, 1)).view(-1)
    keep = torch.ones_like(lp, dtype=torch.bool)
    keep[(cu[1:-1] - 1).long()] = False
    loss = -(lp[keep]).mean()
    loss.backward()
    grads = {n_: p.grad.detach().float().clone() for n_, p in model.named_parameters()
             if p.grad is not None and ".q_idx_" not in n_ and ".k_idx_" not in n_}
    return float(loss), grads


def _compare(grads, ref):
    by = defaultdict(lambda: [0.0, 0.0, 0.0])
    for n, g in ref.items():
        d = grads[n] - g
        k = _group(n)
        by[k][0] += float(d.pow(2).sum())
        by[k][1] += float(g.pow(2).sum())
        by[k][2] += float((grads[n] * g).sum())
    tot = [sum(v[i] for v in by.values()) for i in range(3)]
    rel = {k: (v[0] / max(v[1], 1e-30)) ** 0.5 for k, v in sorted(by.items())}
    rel["all"] = (tot[0] / tot[1]) ** 0.5
    return rel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--preset", default="exp-msa-pt")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_preset(a.preset)
    mc = model_config(cfg, cfg.data.vocab_size)
    nblocks = a.seq_len // mc.attention.block_size
    mc.attention.topk_blocks = nblocks  # every block: sparse == dense as a function
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = _batch(a.seq_len, mc.vocab_size, "cpu").to(dev)
    cu = torch.tensor([0, a.seq_len, 2 * a.seq_len], dtype=torch.int32, device=dev)
    meta = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "seq_len": a.seq_len,
            "preset": a.preset, "topk_blocks": nblocks, "command": "python benchmarks/dev/grad_fidelity.py --out DIR"}
    rows = []

    def save():  # after every case, so that a run cut short keeps what it measured
        with open(os.path.join(a.out, "grad_fidelity.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for state, q_gain in (("init", 1.0), ("peaked", 6.0)):
        torch.manual_seed(0)
        model = MSAForCausalLM(mc).to(dev)
        with torch.no_grad():
            for layer in model.layers:
                layer.attn.q_proj.weight.mul_(q_gain)
        ref_loss, ref = _run(model, ids, cu, "dense", amp=False)
        for name, mode, amp in (("dense bf16", "dense", True), ("sparse every block, bf16", "sparse", True),
                                ("sparse every block, fp32", "sparse", False)):
            try:
                loss, g = _run(model, ids, cu, mode, amp)
            except Exception as e:  # fp32 may not be a dtype the sparse kernels take
                rows.append({"state": state, "run": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                save()
                continue
            rel = _compare(g, ref)
            rows.append({"state": state, "run": name, "loss": loss, "ref_loss": ref_loss, "grad_rel_err": rel})
            save()
            print(f"{state:7s} {name:26s} loss {loss:.5f} (ref {ref_loss:.5f})  grad rel err all {rel['all']:.2e}  "
                  + "  ".join(f"{k} {v:.1e}" for k, v in rel.items() if k != "all"), flush=True)
        del model
        torch.cuda.empty_cache()
    print("| state | run | loss - ref | grad rel err (all) | attn.q_proj (MSA layers) | attn.k_proj | attn.v_proj | mlp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['state']} | {r['run']} | {r['error']} |")
            continue
        g = r["grad_rel_err"]
        print(f"| {r['state']} | {r['run']} | {r['loss'] - r['ref_loss']:+.2e} | {g['all']:.2e} | "
              f"{g.get('attn.q_proj (layers 1+)', 0):.2e} | {g.get('attn.k_proj (layers 1+)', 0):.2e} | "
              f"{g.get('attn.v_proj (layers 1+)', 0):.2e} | {g.get('mlp (layers 1+)', 0):.2e} |")


if __name__ == "__main__":
    main()
