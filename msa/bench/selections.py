"""Selections of a trained MSA model, recorded once and replayed by the benchmarks.

Random index inputs make consecutive tokens pick unrelated blocks; a trained index does not: the
tokens of one block mostly agree, which is what query-tiled kernels exploit. ``record`` runs a model
trained with ``msa train`` over one validation window and stores the blocks every MSA layer selected
(uint8/uint16 distances, compressed: ``msa/bench/data/selections_*.npz``); ``realistic_indices`` replays them at any
length and GQA group count; ``union_blocks`` measures how much consecutive tokens share.

    msa bench selections --run out/quality/exp-msa-pt --out msa/bench/data/selections_exp-msa-pt.npz
    msa bench selections --run out/quality/exp-msa-pt --fp8-recall   # fp8 vs bf16 index scores, per layer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

DEFAULT_FILE = Path(__file__).resolve().parent / "data" / "selections_exp-msa-pt.npz"


def _load_run(run_dir: str, device: str, window: int):
    """(config, model in sparse eval mode, token ids (1, T) of whole-document validation window
    ``window``) of the last checkpoint of an ``msa train`` run directory."""
    from ..train.trainer import build_data, build_model, config_from_run, latest_checkpoint, load_full_model_state

    if not (Path(run_dir) / "config.json").is_file():
        raise ValueError(f"--run {run_dir!r} is not an msa train run directory (no config.json in it)")
    cfg = config_from_run(run_dir)
    dev = torch.device(device)
    data = build_data(cfg, dev, log=lambda *a, **k: None)
    model = build_model(cfg, data.corpus.tokenizer.vocab_size, dev)
    ck = latest_checkpoint(Path(run_dir))
    if ck is None:
        raise ValueError(f"--run {run_dir!r}: no checkpoint under it")
    model.load_state_dict(load_full_model_state(ck))
    model.set_mode("sparse")
    model.eval()
    wins = data.val_windows
    whole = [w for w in range(len(wins)) if len(wins.pieces(w)[0]) == 1]
    if not whole:
        raise ValueError(f"{run_dir}: no validation window is one document piece")
    w = whole[window % len(whole)]
    s, ln = (int(x[0]) for x in wins.pieces(w))
    ids = torch.from_numpy(data.corpus.splits["val"].tokens[s:s + ln].astype(np.int64)).view(1, -1).to(dev)
    return cfg, model, ids, {"run": str(run_dir), "checkpoint": ck.name, "window": int(w), "seq_len": int(ln)}


@torch.no_grad()
def record(run_dir: str, out_file: str, *, device: str = "cuda", window: int = 0,
           n_layers: int = 3) -> Dict[str, object]:
    """Selections of ``n_layers`` MSA layers (first, last and evenly between) of the last checkpoint of
    ``run_dir`` (sparse mode) on validation window ``window`` (a whole-document window). Writes
    ``out_file`` (npz: ``dist`` uint8/uint16 (L, T, H_kv, topk), each row's distances to its own block
    in descending order with the dtype's max for unused slots, i.e. ids ascending; ``meta`` JSON) and
    returns the meta dict."""
    from ..evals.capture import capture_msa_layers

    cfg, model, ids, info = _load_run(run_dir, device, window)
    dev = ids.device
    with capture_msa_layers(model, keep_input=False) as recs, torch.autocast(dev.type, torch.bfloat16,
                                                                              enabled=dev.type == "cuda"):
        model(ids, compute_kl=False)
    sels = [(r.layer, r.block_indices[0].long().cpu().numpy()) for r in recs if r.block_indices is not None]
    keep = sorted({round(i * (len(sels) - 1) / max(1, n_layers - 1)) for i in range(min(n_layers, len(sels)))})
    sels = [sels[i] for i in keep]
    meta = dict(info, block_size=cfg.model.block_size, topk_blocks=cfg.model.topk_blocks,
                num_kv_heads=cfg.model.num_kv_heads, index_norm_rope=cfg.model.index_norm_rope,
                layers=[i for i, _ in sels])
    sel = np.stack([x for _, x in sels])
    own = (np.arange(sel.shape[1]) // cfg.model.block_size)[None, :, None, None]
    dt = np.uint8 if sel.shape[1] // cfg.model.block_size < 255 else np.uint16
    unused = np.iinfo(dt).max
    # distances to the own block, unused slots last (ids ascending, the own block in the last valid slot)
    dist = -np.sort(-np.where(sel >= 0, own - sel, -1), -1)
    dist = np.where(dist >= 0, dist, unused).astype(dt)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_file, dist=dist, meta=np.array(json.dumps(meta)))
    return meta


@torch.no_grad()
def fp8_recall(run_dir: str, *, device: str = "cuda", window: int = 0) -> Dict[str, object]:
    """Block recall of the fp8 index scores (``select_blocks(fp8_scores=True)``) against the bf16 selection,
    on the index projections of every MSA layer of a trained run (last checkpoint, validation window
    ``window``): the share of the blocks bf16 scores select that fp8 scores select too. Returns the meta
    dict with ``fp8_block_recall`` {layer: recall} and its mean and minimum (the default path: fp8
    candidates rescored exactly, ``fp8_rescore_blocks``), and the same for the fp8 selection alone
    (``fp8_only_block_recall``, ``fp8_rescore_blocks=0``)."""
    from ..evals.capture import capture_msa_layers
    from ..ops.select_blocks import select_blocks

    cfg, model, ids, info = _load_run(run_dir, device, window)
    dev, m = ids.device, cfg.model
    amp = torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")
    with capture_msa_layers(model, keep_input=True) as recs, amp:
        model(ids, compute_kl=False)
    pos = torch.arange(ids.shape[1], device=dev).view(1, -1)
    kw = dict(block_size=m.block_size, topk=m.topk_blocks, init_blocks=m.init_blocks, local_blocks=m.local_blocks,
              scale=m.index_dim ** -0.5)
    out = dict(info)
    for name, extra in (("fp8_block_recall", {}), ("fp8_only_block_recall", dict(fp8_rescore_blocks=0))):
        recall = {}
        for r in recs:
            with amp:
                _, _, _, q_idx, k_idx = r.attn.project(r.x, pos)
            ref = select_blocks(q_idx, k_idx, **kw)
            recall[str(r.layer)] = selection_recall(ref, select_blocks(q_idx, k_idx, fp8_scores=True, **kw, **extra))
        vals = list(recall.values())
        out.update({name: recall, f"{name}_mean": sum(vals) / len(vals), f"{name}_min": min(vals)})
    out["index_dtype"] = str(q_idx.dtype).replace("torch.", "")
    return out


def load(path: Optional[str] = None):
    """(sel int64 (L, T, H_kv, topk) block ids with -1 for unused slots, meta dict) of a recorded file
    (default: the committed one)."""
    z = np.load(path or DEFAULT_FILE)
    meta = json.loads(str(z["meta"]))
    dist = z["dist"]
    own = (np.arange(dist.shape[1]) // meta["block_size"])[None, :, None, None]
    sel = np.where(dist == np.iinfo(dist.dtype).max, -1, own - dist.astype(np.int64))
    return sel, meta


def realistic_indices(t: int, num_kv_heads: int, topk: int, block_size: int, device, *,
                      path: Optional[str] = None) -> torch.Tensor:
    """int32 (1, t, num_kv_heads, topk) block ids replayed from a recorded file (same block_size and
    topk). Group r of the result is (layer, group) pair r of the recording, cycled. Token i < T_rec
    takes the recorded row of token i; a later token takes the row of a recorded token j in the last
    half of the window with the same offset in its block (consecutive tokens map to consecutive
    recorded tokens), as block distances from its own block: so every length keeps the recording's
    agreement between neighbours and its reach into the past (at most T_rec tokens back)."""
    sel, meta = load(path)
    if meta["block_size"] != block_size or meta["topk_blocks"] != topk:
        raise ValueError(f"the recording has block_size={meta['block_size']}, topk={meta['topk_blocks']}; "
                         f"asked for block_size={block_size}, topk={topk}")
    n_layers, t_rec, hkv_rec, _ = sel.shape
    pairs = [(i, r) for i in range(n_layers) for r in range(hkv_rec)]
    src = torch.from_numpy(np.stack([sel[pairs[g % len(pairs)][0], :, pairs[g % len(pairs)][1]]
                                     for g in range(num_kv_heads)], 1).astype(np.int64))  # (t_rec, H, k)
    pos = torch.arange(t)
    half = (t_rec // 2) // block_size * block_size
    span = max(block_size, (t_rec - half) // block_size * block_size)
    j = torch.where(pos < t_rec, pos, half + (pos - t_rec) % span)
    rows = src[j]  # (t, H, k)
    shift = (pos // block_size - j // block_size).view(t, 1, 1)
    out = torch.where(rows >= 0, rows + shift, rows)
    return out.to(torch.int32).unsqueeze(0).to(device)


def union_blocks(block_indices: torch.Tensor, tile_tokens: int) -> float:
    """Mean number of distinct blocks selected by tiles of ``tile_tokens`` consecutive tokens of one group
    (block_indices int32 (B, T, H_kv, topk)); topk when neighbours agree, up to tile_tokens * topk."""
    if not (isinstance(tile_tokens, int) and tile_tokens >= 1):
        raise ValueError(f"tile_tokens must be a positive int, got {tile_tokens!r}")
    b, t, h, k = block_indices.shape
    n = t // tile_tokens * tile_tokens
    x = block_indices[:, :n].reshape(b, n // tile_tokens, tile_tokens, h, k).permute(0, 1, 3, 2, 4)
    x = x.reshape(-1, tile_tokens * k).sort(-1).values
    distinct = ((x[:, 1:] != x[:, :-1]) & (x[:, 1:] >= 0)).sum(-1) + (x[:, 0] >= 0).long()
    return float(distinct.float().mean())


def greedy_union_blocks(block_indices: torch.Tensor, tile_tokens: int, block_size: int = 128) -> float:
    """Mean number of distinct blocks per query tile when a query block's tokens are grouped by selection
    before tiling (``tuning.tile_order="greedy"``, the order ``msa.ops.utils.tile_union`` builds); one
    sequence per batch row, T a multiple of block_size. Compare with ``union_blocks``."""
    from msa.ops.utils.reverse_index import block_layout
    from msa.ops.utils.tile_union import build_tile_union
    from msa.ops.common import resolve_backend
    b, t = block_indices.shape[:2]
    resolve_backend("triton", [block_indices])  # a Triton kernel builds the order: CUDA or the interpreter
    if t % block_size:
        raise ValueError(f"block_indices must hold a multiple of block_size = {block_size} tokens, got T = {t}")
    layout = block_layout(b, t, block_size, None, block_indices.device)
    return float(build_tile_union(block_indices, layout, block_size, tile_tokens, "greedy").count.float().mean())


def selection_recall(ref: torch.Tensor, got: torch.Tensor, chunk: int = 1 << 16) -> float:
    """Share of the valid block ids of ``ref`` that ``got`` selects too (both int32 (B, T, H_kv, topk),
    -1 unused), over all rows: the block recall of one selection against another."""
    hit = tot = 0
    r_all, g_all = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    for i in range(0, r_all.shape[0], chunk):
        r, g = r_all[i:i + chunk], g_all[i:i + chunk]
        valid = r >= 0
        same = (r.unsqueeze(-1) == g.unsqueeze(-2)).any(-1) & valid
        hit += int(same.sum())
        tot += int(valid.sum())
    return hit / max(1, tot)


def main() -> int:
    ap = argparse.ArgumentParser(prog="msa bench selections", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="an msa train run directory (its last checkpoint is used)")
    ap.add_argument("--out", default=str(DEFAULT_FILE), help="npz file to write")
    ap.add_argument("--window", type=int, default=0, help="which whole-document validation window")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fp8-recall", action="store_true",
                    help="instead of recording, print the block recall of fp8 index scores against bf16 per layer")
    args = ap.parse_args()
    if args.fp8_recall:
        print(json.dumps(fp8_recall(args.run, device=args.device, window=args.window), indent=1))
        return 0
    meta = record(args.run, args.out, device=args.device, window=args.window)
    sel, _ = load(args.out)
    bi = torch.from_numpy(sel.astype(np.int32)).permute(1, 0, 2, 3).reshape(1, sel.shape[1], -1, sel.shape[3])
    meta["union_blocks"] = {str(tt): union_blocks(bi, tt) for tt in (1, 2, 4, 8, 16)}
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
