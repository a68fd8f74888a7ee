"""msa's prefill against vLLM's MiniMax-M3 MSA Triton kernels, same inputs, same GPU, one process.

    python benchmarks/vllm_compare.py --vllm PATH --out DIR [--sizes 8192,32768,131072]

PATH: an installed vllm is used when importable; else a vllm wheel (``pip download --no-deps vllm``) or a
folder holding the wheel's ``vllm/`` tree (only the three kernel files below and ``*.dist-info/METADATA``
are read). The kernels are vLLM's, unchanged, loaded from their files: ``common/ops/index_topk.py``
(``minimax_m3_index_score``, ``minimax_m3_index_topk``), ``nvidia/ops/sparse_prefill.py`` (the Hopper
query-tiled prefill, 16 tokens x the group's heads per MMA tile, the one vLLM picks on sm_90) and
``common/ops/sparse_attn.py`` (the query-outer prefill, one token per program). Where vllm is not
installed, the three vLLM helpers those files import (``current_platform``'s capability queries,
``triton_utils``, ``round_up``) are given by small stand-ins here; nothing else of vLLM runs.

Shape: the paper's (batch 1, H_q 64, H_kv 4, D 128, d_idx 128, B_k 128, k 16, bf16), init_blocks 0,
local_blocks 1 (msa's defaults). vLLM's caches are built once in its paged layout (KV
``(pages, H_kv, 128, 2 D)``, index keys ``(pages, 128, d_idx)``, identity block table) and not timed:
a server keeps them that way.

1. Parity (each size): the selections of both indexers (rows whose sets agree, block recall of vLLM's
   against msa's) and both attentions on msa's selections (max abs error, rmse ratio; gate: max abs <=
   2e-2, rmse(diff) / rmse(msa) <= 1e-2). On a failed gate the size is reported, not timed.
2. Timing, ``do_bench`` medians: vLLM's index scores, top-k, the tiled and the query-outer attention;
   its total = scores + top-k + the tiled attention (what vLLM runs on sm_90), and the same with the
   query-outer attention; msa is compared with the faster of the two. msa's total is the layer's prefill call
   (``msa_prefill_attention``, timed as one call, as ``msa bench prefill``'s ``total_e2e``). Both on
   their own selections ("random": random inputs) and on selections replayed from a trained model
   (``msa.bench.selections``; each side's indexer still runs, its result unused). Dense causal GQA
   (cuDNN SDPA) in the same run for scale.
3. DIR/vllm_compare.json (GPU, versions, command, results) and a table printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import torch

KERNEL_FILES = {  # module name -> path inside the vllm package
    "vllm.models.minimax_m3.common.ops.sparse_attn": "models/minimax_m3/common/ops/sparse_attn.py",
    "vllm.models.minimax_m3.common.ops.index_topk": "models/minimax_m3/common/ops/index_topk.py",
    "vllm.models.minimax_m3.nvidia.ops.sparse_prefill": "models/minimax_m3/nvidia/ops/sparse_prefill.py",
}
HQ, HKV, D, DIDX, BK, TOPK = 64, 4, 128, 128, 128, 16
ATOL, RMSE_RATIO = 2e-2, 1e-2


# ------------------------------------------------------------------------------------- loading vLLM's kernels
def _kernel_root(path: Path):
    """(folder holding vllm/models/..., vllm version or '?'): a wheel's kernel files are unpacked into
    a temporary folder, a folder is used as it is."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"--vllm {path}: expected a vllm wheel (zip) or a folder holding vllm/")
        dest = Path(tempfile.mkdtemp(prefix="vllm_kernels_"))
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            for rel in KERNEL_FILES.values():
                if "vllm/" + rel not in names:
                    raise ValueError(f"--vllm {path}: the wheel has no vllm/{rel} (vLLM >= 0.34 has it)")
                z.extract("vllm/" + rel, dest)
            meta = [n for n in names if n.endswith(".dist-info/METADATA")]
            return dest, _version(z.read(meta[0]).decode()) if meta else "?"
    base = path if (path / "vllm").is_dir() else path.parent
    for rel in KERNEL_FILES.values():
        if not (base / "vllm" / rel).is_file():
            raise ValueError(f"--vllm {path}: no {base / 'vllm' / rel} (expected a folder holding vllm/{rel})")
    meta = sorted(base.glob("vllm-*.dist-info/METADATA"))
    return base, _version(meta[0].read_text()) if meta else "?"


def _version(metadata: str) -> str:
    return next((ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Version:")), "?")


class _Platform:
    """The capability queries of vLLM's ``current_platform`` that the kernel files call."""

    @staticmethod
    def is_cuda():
        return torch.version.cuda is not None and torch.cuda.is_available()

    @staticmethod
    def is_device_capability(cap):
        return torch.cuda.get_device_capability() == tuple(cap)

    @staticmethod
    def is_device_capability_family(cap):
        return torch.cuda.get_device_capability()[0] == cap // 10

    @staticmethod
    def is_arch_support_pdl():  # only the decode kernels read it; prefill is what is compared
        return False


STAND_IN_MODULES = ("vllm", "vllm.platforms", "vllm.triton_utils", "vllm.utils", "vllm.utils.math_utils",
                    "vllm.models", "vllm.models.minimax_m3", "vllm.models.minimax_m3.common",
                    "vllm.models.minimax_m3.common.ops", "vllm.models.minimax_m3.nvidia",
                    "vllm.models.minimax_m3.nvidia.ops")


def _install_stand_ins():
    """The vLLM modules the kernel files import, as small stand-ins in sys.modules (marked, so a later
    call does not mistake them for an installed vllm)."""
    import triton
    import triton.language as tl

    for name in STAND_IN_MODULES:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod._msa_stand_in = True
            sys.modules[name] = mod
    sys.modules["vllm.platforms"].current_platform = _Platform()
    sys.modules["vllm.triton_utils"].tl, sys.modules["vllm.triton_utils"].triton = tl, triton
    sys.modules["vllm.utils.math_utils"].round_up = lambda x, m: (x + m - 1) // m * m


def _vllm_installed() -> bool:
    loaded = sys.modules.get("vllm")
    if loaded is not None:
        return not getattr(loaded, "_msa_stand_in", False)
    return importlib.util.find_spec("vllm") is not None


def load_vllm_kernels(path: str | None):
    """(dict of the three kernel modules, vllm version, source). An installed vllm wins; else ``path``."""
    if _vllm_installed():
        import vllm
        mods = {name: importlib.import_module(name) for name in KERNEL_FILES}
        return mods, getattr(vllm, "__version__", "?"), "installed vllm"
    if path is None:
        raise SystemExit("vllm is not installed: pass --vllm with a vllm wheel or a folder holding vllm/")
    src = Path(path)
    if not src.exists():
        raise SystemExit(f"--vllm {path}: no such file or folder")
    base, version = _kernel_root(src)
    _install_stand_ins()
    mods = {}
    for name in sorted(KERNEL_FILES, key=lambda n: "nvidia" in n):  # sparse_prefill imports sparse_attn
        spec = importlib.util.spec_from_file_location(name, base / "vllm" / KERNEL_FILES[name])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods, version, str(src)


# ------------------------------------------------------------------------------------------ the two sides
class VllmSide:
    """vLLM's prefill on one sequence of T tokens: paged caches built once, the three steps callable."""

    def __init__(self, mods, q, k, v, qi, ki):
        self.idx = mods["vllm.models.minimax_m3.common.ops.index_topk"]
        self.qo = mods["vllm.models.minimax_m3.common.ops.sparse_attn"]
        self.tiled = mods["vllm.models.minimax_m3.nvidia.ops.sparse_prefill"]
        t = q.shape[1]
        pages = math.ceil(t / BK)
        pad = pages * BK - t
        dev = q.device
        kv = torch.cat([k[0], v[0]], -1)  # (T, H_kv, 2D)
        kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, pad))
        self.kv_cache = kv.view(pages, BK, HKV, 2 * D).transpose(1, 2).contiguous()
        self.index_cache = torch.nn.functional.pad(ki[0], (0, 0, 0, pad)).view(pages, BK, DIDX).contiguous()
        self.block_table = torch.arange(pages, dtype=torch.int32, device=dev).view(1, pages)
        self.cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor([t], dtype=torch.int32, device=dev)
        self.prefix = torch.zeros(1, dtype=torch.int32, device=dev)
        self.q, self.qi, self.t = q[0].contiguous(), qi[0].contiguous(), t
        self.out = torch.empty_like(self.q)

    def scores(self):
        return self.idx.minimax_m3_index_score(self.qi, self.index_cache, self.block_table, self.cu, self.seq_lens,
                                               self.prefix, self.t, self.t, HKV)

    def topk(self, scores):
        return self.idx.minimax_m3_index_topk(scores, self.cu, self.prefix, self.t, TOPK, 0, 1)

    def select(self):
        return self.topk(self.scores())

    def attention(self, ids, kernel="tiled"):
        mod = self.tiled if kernel == "tiled" else self.qo
        mod.minimax_m3_sparse_attn(self.q, self.kv_cache, ids, self.block_table, self.cu, self.seq_lens,
                                   self.prefix, self.t, HKV, D ** -0.5, self.out)
        return self.out

    def total(self, ids=None, kernel="tiled"):
        sel = self.select()
        return self.attention(sel if ids is None else ids, kernel)


def to_vllm_ids(block_indices):
    """msa (1, T, H_kv, k) -> vLLM (H_kv, T, k), both int32 with -1 padding."""
    return block_indices[0].permute(1, 0, 2).contiguous()


def selection_agreement(a, b):
    """(share of (token, group) rows whose block sets agree, block recall of a against b); -1 = empty."""
    sa, sb = a.sort(-1).values, b.sort(-1).values
    rows = (sa == sb).all(-1).float().mean().item()
    hit = ((a.unsqueeze(-1) == b.unsqueeze(-2)) & (a.unsqueeze(-1) >= 0)).any(-1).sum().item()
    return rows, hit / max(1, (b >= 0).sum().item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm", default=None, help="a vllm wheel or a folder holding vllm/ (if vllm is not installed)")
    ap.add_argument("--out", required=True, help="folder for vllm_compare.json")
    ap.add_argument("--sizes", default="8192,32768,131072", help="comma-separated T (multiples of 128 not needed)")
    ap.add_argument("--no-dense", action="store_true", help="skip the cuDNN reference timing")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes!r}: expected comma-separated integers")
    if not sizes or min(sizes) < BK:
        raise SystemExit(f"--sizes {args.sizes!r}: every T must be >= {BK}")
    if not torch.cuda.is_available():
        raise SystemExit("vllm_compare needs a CUDA GPU (vLLM's kernels and msa's are timed on it)")

    import triton

    import msa
    from msa.bench.prefill import layer_prefill, timed
    from msa.bench.selections import realistic_indices

    mods, version, source = load_vllm_kernels(args.vllm)
    dev = torch.device("cuda")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                vllm=version, vllm_source=source, command=" ".join(sys.argv),
                shape=dict(H_q=HQ, H_kv=HKV, D=D, d_idx=DIDX, B_k=BK, topk=TOPK, init_blocks=0, local_blocks=1),
                date=time.strftime("%Y-%m-%d"))
    print(json.dumps(meta), flush=True)
    results, out = [], Path(args.out)
    for t in sizes:
        g = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(1, t, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, t, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
        v = torch.randn(1, t, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
        qi = torch.randn(1, t, HKV, DIDX, device=dev, generator=g, dtype=torch.bfloat16)
        ki = torch.randn(1, t, DIDX, device=dev, generator=g, dtype=torch.bfloat16)
        side = VllmSide(mods, q, k, v, qi, ki)
        r = dict(T=t)
        # parity
        ours = msa.select_blocks(qi, ki, block_size=BK, topk=TOPK)
        theirs = side.select()
        r["selection_rows_agree"], r["selection_recall"] = selection_agreement(theirs, to_vllm_ids(ours))
        o_msa = msa.sparse_attention(q, k, v, ours, block_size=BK, scale=D ** -0.5)[0].float()
        gate = True
        for kern in ("tiled", "qo"):
            o_v = side.attention(to_vllm_ids(ours), kern).float()
            err = (o_v - o_msa).abs().max().item()
            ratio = ((o_v - o_msa).pow(2).mean().sqrt() / o_msa.pow(2).mean().sqrt()).item()
            r[f"vllm_{kern}_max_abs_err"], r[f"vllm_{kern}_rmse_ratio"] = err, ratio
            gate &= err <= ATOL and ratio <= RMSE_RATIO
        r["gate"] = "PASS" if gate else "FAIL"
        print(json.dumps(r), flush=True)
        if gate:
            replayed = realistic_indices(t, HKV, TOPK, BK, dev)
            rv = to_vllm_ids(replayed)
            sc = side.scores()
            r["vllm_scores_ms"] = timed(side.scores)
            r["vllm_topk_ms"] = timed(lambda: side.topk(sc))
            r["vllm_tiled_ms"] = timed(lambda: side.attention(theirs, "tiled"))
            r["vllm_qo_ms"] = timed(lambda: side.attention(theirs, "qo"))
            r["vllm_total_ms"] = timed(side.total)
            r["vllm_total_replayed_ms"] = timed(lambda: side.total(rv))
            # on an H100 vLLM's query-outer kernel beat its sm_90 pick (session 43), so both totals are kept
            r["vllm_qo_total_ms"] = timed(lambda: side.total(kernel="qo"))
            r["vllm_qo_total_replayed_ms"] = timed(lambda: side.total(rv, "qo"))
            r["msa_total_ms"] = timed(lambda: layer_prefill(q, k, v, qi, ki))
            r["msa_total_replayed_ms"] = timed(lambda: layer_prefill(q, k, v, qi, ki, replayed))
            r["msa_select_ms"] = timed(lambda: msa.select_blocks(qi, ki, block_size=BK, topk=TOPK, validate=False))
            if not args.no_dense:
                qd, kd, vd = (x.transpose(1, 2) for x in (q, k, v))
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def dense():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                                                enable_gqa=True)
                try:
                    r["dense_cudnn_ms"] = timed(dense)
                except Exception as exc:  # a backend missing on this build is recorded, not fatal
                    r["dense_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            r["msa_vs_vllm"] = r["vllm_total_ms"] / r["msa_total_ms"]
            r["msa_vs_vllm_replayed"] = r["vllm_total_replayed_ms"] / r["msa_total_replayed_ms"]
            r["msa_vs_vllm_best"] = min(r["vllm_total_ms"], r["vllm_qo_total_ms"]) / r["msa_total_ms"]
            r["msa_vs_vllm_best_replayed"] = (min(r["vllm_total_replayed_ms"], r["vllm_qo_total_replayed_ms"])
                                              / r["msa_total_replayed_ms"])
            print(json.dumps(r), flush=True)
        results.append(r)
        out.mkdir(parents=True, exist_ok=True)  # written after each size: a run cut short keeps what it has
        (out / "vllm_compare.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        del side, q, k, v, qi, ki
        torch.cuda.empty_cache()
    print(f"\n{meta['gpu']}, vllm {version}; ms, medians; vLLM total = scores + top-k + its tiled (qo: query-outer) "
          "attention; x = vLLM's faster total / msa total (> 1: msa faster)")
    print("| T | sel rows agree | vLLM scores | top-k | total tiled | total qo | msa total | x | "
          "replayed: vLLM tiled | qo | msa | x | cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["gate"] != "PASS":
            print(f"| {r['T']} | gate FAIL: {r} |")
            continue
        print(f"| {r['T']} | {r['selection_rows_agree']:.4f} | {r['vllm_scores_ms']:.2f} | {r['vllm_topk_ms']:.2f} | "
              f"{r['vllm_total_ms']:.2f} | {r['vllm_qo_total_ms']:.2f} | {r['msa_total_ms']:.2f} | "
              f"{r['msa_vs_vllm_best']:.2f}x | {r['vllm_total_replayed_ms']:.2f} | {r['vllm_qo_total_replayed_ms']:.2f} | "
              f"{r['msa_total_replayed_ms']:.2f} | {r['msa_vs_vllm_best_replayed']:.2f}x | "
              f"{r.get('dense_cudnn_ms', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
