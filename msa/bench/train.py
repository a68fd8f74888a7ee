"""Training-step benchmark of one MSA layer's attention: sparse phase and warmup phase vs dense SDPA.

    msa bench train --out DIR [--quick] [--sweep] [--sizes 8192,32768]

1. Parity gate (bf16, T = 4096, paper heads): Triton backward dq/dk/dv vs autograd of the reference
   (given the reference's o/lse), the sparse and the warmup KL value and dq_idx/dk_idx vs the
   reference. Relative error = ||x - ref|| / ||ref||; PASS when every gradient < 2e-2 and every KL value
   within 1e-2 relative. Printed and stored as PASS/FAIL. Each step (attention backward, forward,
   sparse KL, warmup KL) runs on its own: a failing step is reported by name, and then
   ``msa/bench/aot_check.py`` (compile-only) names the kernels over the shared-memory limit.
   Every timed variant is measured in its own try/except: an error (OOM, OutOfResources, ...) fills
   only its own cell.
2. Timings (``triton.testing.do_bench`` medians; calls over ~150 ms use 1 warm-up + 3 CUDA-event runs),
   at the paper's shape H_q 64, H_kv 4, D 128, d_idx 128, block 128, k 16, bf16, B = 1:
   - sparse step: ``msa.select_blocks(backend="triton")`` + ``msa.sparse_attention(backend="triton")``
     forward + backward + sparse KL forward + backward (teacher lse = the forward's lse); variants:
     the query-tiled / KV-outer main branch, the greedy tile order, and all of it on replayed selections;
   - dense: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` forward + backward, the
     fastest of the cuDNN and flash backends (the baseline);
   - warmup step: dense attention forward + backward WITH its per-head lse + dense KL forward + backward.
     The lse comes at SDPA speed from ``torch.ops.aten._scaled_dot_product_flash_attention`` (returns
     ``logsumexp`` (B, H_q, T) fp32; GQA k/v are repeat_interleave'd to H_q heads, and dK/dV summed back
     over the group) or, if flash is unavailable, ``_scaled_dot_product_cudnn_attention(...,
     compute_log_sumexp=True)``; the backward is the matching ``*_backward`` aten op. "dense+lse" is
     timed against plain SDPA so the overhead of exposing the lse is visible.
   Peak memory (torch.cuda.max_memory_allocated over one step, inputs included) is recorded per variant.
   Per-stage breakdown (CUDA events around each stage of one step, median of 5): sparse = select,
   attn_fwd, attn_bwd, kl_fwd, kl_bwd; warmup (cuDNN) = attn_fwd (with lse), attn_bwd, kl_fwd, kl_bwd.
   Note: both KL phases compute loss, dq_idx and dk_idx in their forward, so kl_bwd is only the
   grad_out scaling. The warmup KL runs in its default 'flash-atomic' mode (one query-outer pass, dk_idx
   by fp32 atomics) unless ``msa.tuning`` kl_dense_mode="flash" (deterministic second pass) is set.
   Also per size: the attention backward's own kernels (CUDA events, dQ modes kv and query).
   --profile: per-kernel GPU times of one sparse step (torch.profiler). --no-dense: skip the dense
   and warmup variants (development rounds). --sweep: at T = --sweep-size (default 32768) also times
   the KL / backward kernels under a few launch configurations (``msa.tuning`` fields kl_kv_config,
   kl_dense_flash_config, kl_dense_mode, sparse_bwd_config, sparse_bwd_dq; groups
   chosen with --sweep-groups kl_kv,bwd,dense) to tune the defaults.
   FLOPs (causal, paper Eq. 12 style): dense fwd 2*H_q*D*T^2, fwd+bwd x3.5.
3. JSON (GPU, versions, command, results) and a PNG plot under --out; a table is printed last.
   Sizes: T = 8K, 32K, 128K, 512K (memory permitting; OOM is caught per size); --quick: 8K, 32K.
   Targets (spec): sparse step (select + attn fwd/bwd + KL fwd/bwd) >= 8x faster than dense cuDNN
   fwd+bwd at 128K; warmup step <= 1.3x the dense step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

import msa.tuning
import torch.nn.functional as F
from msa.bench import positive_ints

HQ, HKV, D, DI, BLOCK, TOPK = 64, 4, 128, 128, 128, 16
DENSE_MAX_T = 131072  # dense baselines above this would take minutes per size
SWEEP = False  # --sweep: launch-configuration sweep of the KL / backward kernels at T = SWEEP_T
SWEEP_T = 32768
SWEEP_GROUPS = ("kl_kv", "bwd", "dense")
PROFILE = False  # --profile: per-kernel GPU times of one sparse step (torch.profiler)
NO_DENSE = False  # --no-dense: skip the dense / warmup variants (development rounds only)


def median_ms(fn, heavy_reps=3):
    """Median ms of fn(): do_bench for short calls, CUDA events for calls over ~150 ms."""
    import triton
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - t0) * 1e3
    if once < 150:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(heavy_reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(sorted(times)[len(times) // 2])


def stage_breakdown(stages, reps=5, warmup=2):
    """Median ms per stage of a step given as [(name, fn), ...] run in order, each stage bracketed by
    CUDA events on the current stream (the stages' outputs feed the next ones through closures).
    The sum of the stage medians can differ slightly from the whole-step median (launch gaps)."""
    times = {name: [] for name, _ in stages}
    for it in range(warmup + reps):
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)]
        evs[0].record()
        for i, (_, fn) in enumerate(stages):
            fn()
            evs[i + 1].record()
        torch.cuda.synchronize()
        if it >= warmup:
            for i, (name, _) in enumerate(stages):
                times[name].append(evs[i].elapsed_time(evs[i + 1]))
    return {name: float(sorted(v)[len(v) // 2]) for name, v in times.items()}


def sparse_stages(q, k, v, qi, ki, do, kl_kw):
    """The sparse training step split into select / attn fwd / attn bwd / kl fwd / kl bwd."""
    import msa
    from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
    st = {}

    def sel():
        with torch.no_grad():
            st["bi"] = msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="triton")

    def afwd():
        st["o"], st["lse"] = msa.sparse_attention(q, k, v, st["bi"], block_size=BLOCK, return_lse=True,
                                                  backend="triton")

    def abwd():
        torch.autograd.grad(st["o"], (q, k, v), do)
        st.pop("o")

    def kfwd():
        st["loss"] = indexer_kl_triton(qi, ki, q.detach(), k.detach(), st["bi"], **kl_kw, teacher_lse=st["lse"])

    def kbwd():
        torch.autograd.grad(st.pop("loss"), (qi, ki))

    return [("select", sel), ("attn_fwd", afwd), ("attn_bwd", abwd), ("kl_fwd", kfwd), ("kl_bwd", kbwd)]


def warmup_stages(q, k, v, qi, ki, do, kl_kw, impl, scale):
    """The warmup step split into dense attn fwd (with lse) / attn bwd / kl fwd / kl bwd."""
    from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
    st = {}

    def afwd():
        st["o"], st["lse"] = DenseAttentionWithLse.apply(q, k, v, scale, impl)

    def abwd():
        torch.autograd.grad(st.pop("o"), (q, k, v), do)

    def kfwd():
        st["loss"] = indexer_kl_triton(qi, ki, q.detach(), k.detach(), None, **kl_kw, teacher_lse=st["lse"])

    def kbwd():
        torch.autograd.grad(st.pop("loss"), (qi, ki))

    return [("attn_fwd", afwd), ("attn_bwd", abwd), ("kl_fwd", kfwd), ("kl_bwd", kbwd)]


def _with(overrides, fn):
    """fn() under ``msa.tuning.override(**overrides)``."""
    with msa.tuning.override(**overrides):
        return fn()


def _tuned(field, val, fn):
    """fn() under ``msa.tuning.override(field=val)`` (val in MSA_TUNING syntax, e.g. "BLOCK_E=64,num_warps=8")."""
    with msa.tuning.override(**msa.tuning.parse(f"{field}={val}")):
        return fn()


def config_sweep(q, k, v, qi, ki, do, kl_kw, notes):
    """Times the kernels under a few launch configurations (env knobs read at call time) so the
    defaults can be tuned from one run. Returns {label: ms or error string}."""
    import msa
    from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
    out = {}
    with torch.no_grad():
        bi = msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="triton")
        o, lse = msa.sparse_attention(q, k, v, bi, block_size=BLOCK, return_lse=True, backend="triton")
    from msa.ops.sparse_attention.triton_bwd import sparse_attention_bwd_triton
    sweeps = [
        ("kl_kv_config", ["BLOCK_E=128,num_warps=8,num_stages=1", "BLOCK_E=128,num_warps=8,num_stages=2",
                              "BLOCK_E=64,num_warps=8,num_stages=2", "BLOCK_E=32,num_warps=4,num_stages=2"],
         lambda: torch.autograd.grad(indexer_kl_triton(qi, ki, q.detach(), k.detach(), bi, **kl_kw,
                                                       teacher_lse=lse), (qi, ki))),
        ("sparse_bwd_config", ["DKDV_BLOCK_M=64,DKDV_BLOCK_N=64,DKDV_WARPS=4,DKDV_STAGES=2",
                                   "DKDV_BLOCK_M=128,DKDV_BLOCK_N=64,DKDV_WARPS=8,DKDV_STAGES=2",
                                   "DQKV_BLOCK_M=64,DQKV_WARPS=4,DQKV_STAGES=2",
                                   "DQKV_BLOCK_M=128,DQKV_WARPS=8,DQKV_STAGES=2"],
         lambda: sparse_attention_bwd_triton(do, q.detach(), k.detach(), v.detach(), o, lse, bi, block_size=BLOCK,
                                             scale=D ** -0.5, cu_seqlens=None)),
    ]
    sweeps.append(("sparse_bwd_dq", ["kv", "query"], sweeps[-1][2]))
    if q.shape[1] <= DENSE_MAX_T:
        with torch.no_grad():
            _, dlse = DenseAttentionWithLse.apply(q.detach(), k.detach(), v.detach(), D ** -0.5, "cudnn")
        def dense_kl():
            return torch.autograd.grad(indexer_kl_triton(qi, ki, q.detach(), k.detach(), None, **kl_kw,
                                                         teacher_lse=dlse), (qi, ki))

        sweeps.append(("kl_dense_mode", ["flash-atomic", "flash"], dense_kl))
        # flash-atomic (the default): one query-outer pass, BLOCK_M queries x BLOCK_N keys per tile
        sweeps.append(("kl_dense_flash_config", ["BLOCK_M=128,BLOCK_N=128,num_stages=2",
                                                     "BLOCK_M=128,BLOCK_N=128,num_stages=3",
                                                     "BLOCK_M=128,BLOCK_N=128,num_stages=4",
                                                     "BLOCK_M=128,BLOCK_N=64,num_stages=3",
                                                     "BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=3"],
                       lambda: _tuned("kl_dense_mode", "flash-atomic", dense_kl)))
    groups = {"kl_kv": ("kl_kv",), "bwd": ("sparse_bwd",), "dense": ("kl_dense",)}
    keep = tuple(p for gname in SWEEP_GROUPS for p in groups[gname])
    for env, cfgs, fn in sweeps:
        if not env.startswith(keep):
            continue
        for cfg in cfgs:
            try:
                out[f"{env}={cfg}"] = _tuned(env, cfg, lambda: median_ms(fn))
            except Exception as exc:
                out[f"{env}={cfg}"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                torch.cuda.empty_cache()
            print(f"  sweep {env}={cfg}: {out[f'{env}={cfg}']}", flush=True)
    return out


def profile_kernels(fn, top=16):
    """{kernel name: GPU ms} of one call of fn (after one warm call), the `top` largest, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    tot = {}
    for ev in prof.key_averages():
        dt = getattr(ev, "device_time_total", None)
        if dt is None:
            dt = getattr(ev, "cuda_time_total", 0.0)
        if dt > 0:
            tot[ev.key[:90]] = tot.get(ev.key[:90], 0.0) + dt / 1e3
    return dict(sorted(tot.items(), key=lambda kv: -kv[1])[:top])


def _err(exc):
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(exc).__name__}: {str(exc)[:200]}"


def measure(row, name, fn, with_peak=True):
    """Times fn into row[name + '_ms'] (and its peak memory); any exception (OOM, OutOfResources, ...) is
    recorded in that cell only, so one failing kernel never poisons the other variants."""
    try:
        row[name + "_ms"] = median_ms(fn)
        if with_peak:
            row[name + "_peak_gb"] = peak_gb(fn)
    except Exception as exc:
        row[name + "_ms"] = _err(exc)
        print(f"  {name}: {row[name + '_ms']}", flush=True)
        torch.cuda.empty_cache()


def peak_gb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class DenseAttentionWithLse(torch.autograd.Function):
    """Dense causal GQA attention returning (o (B,T,H_q,D), lse fp32 (B,T,H_q)) through the aten flash
    (or cuDNN) SDPA ops, which compute the logsumexp anyway; k/v are repeated to H_q heads."""

    @staticmethod
    def forward(ctx, q, k, v, scale, impl):
        g = q.shape[2] // k.shape[2]
        qt = q.transpose(1, 2)
        kt = k.repeat_interleave(g, dim=2).transpose(1, 2)
        vt = v.repeat_interleave(g, dim=2).transpose(1, 2)
        if impl == "flash":
            out = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, True, False, scale=scale)
            o, lse, cq, ck, mq, mk, seed, off, _ = out
        else:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, True, False,
                                                                      scale=scale)
            o, lse, cq, ck, mq, mk, seed, off, _ = out
        ctx.save_for_backward(qt, kt, vt, o, lse, cq, ck, seed, off)
        ctx.meta = (mq, mk, scale, g, impl, k.shape[2])
        # flash: (B, H, T); cuDNN: (B, H, T, 1) -- normalise to (B, T, H_q)
        lse_bth = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., : q.shape[1]].transpose(1, 2)
        ctx.mark_non_differentiable(lse_bth)
        return o.transpose(1, 2), lse_bth

    @staticmethod
    def backward(ctx, do, dlse):
        qt, kt, vt, o, lse, cq, ck, seed, off = ctx.saved_tensors
        mq, mk, scale, g, impl, hkv = ctx.meta
        dot = do.transpose(1, 2)
        if impl == "flash":
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dot, qt, kt, vt, o, lse, cq, ck, mq, mk, 0.0, True, seed, off, scale=scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dot.contiguous(), qt, kt, vt, o, lse, seed, off, None, cq, ck, mq, mk, 0.0, True, scale=scale)
        b, _, t, d = dk.shape
        dk = dk.view(b, hkv, g, t, d).sum(2).transpose(1, 2)
        dv = dv.view(b, hkv, g, t, d).sum(2).transpose(1, 2)
        return dq.transpose(1, 2), dk, dv, None, None


def make_inputs(t, seed=0, dtype=torch.bfloat16, num_heads=HQ):
    """Random q, k, v, q_idx, k_idx, dO of the paper shape (num_heads query heads over 4 KV heads)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.randn(1, t, num_heads, D, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(1, t, HKV, D, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(1, t, HKV, D, device=dev, dtype=dtype, generator=gen)
    qi = torch.randn(1, t, HKV, DI, device=dev, dtype=dtype, generator=gen)
    ki = torch.randn(1, t, DI, device=dev, dtype=dtype, generator=gen)
    do = torch.randn(1, t, num_heads, D, device=dev, dtype=dtype, generator=gen)
    return q, k, v, qi, ki, do


def select(qi, ki, results_notes):
    import msa
    try:
        return msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="triton")
    except Exception as exc:  # the Triton selection is owned by another engineer: record and fall back
        results_notes.append(f"select_blocks(backend='triton') failed: {exc!r}; using the reference")
        return msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="reference")


def _gate_step(res, label, fn):
    """Runs one parity check; an exception is recorded as res['errors'][label] (which kernel family
    failed, e.g. 'sparse_attention_bwd_triton') instead of aborting the whole gate."""
    try:
        fn()
        return True
    except Exception as exc:
        res.setdefault("errors", {})[label] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"  parity step {label} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
        return False


def aot_overflows():
    """Names of the Triton training kernels whose static shared memory exceeds the limit or that fail to
    compile for this GPU's architecture (msa/bench/aot_check.py; compiles only, launches nothing)."""
    from msa.bench import aot_check
    major, minor = torch.cuda.get_device_capability()
    rows = aot_check.check(arch=major * 10 + minor, verbose=False)
    return [dict(kernel=r["kernel"], shared=r.get("shared"), error=r.get("error")) for r in rows if not r["ok"]]


def parity_gate(t, notes):
    from msa.ops.indexer_kl.reference import indexer_kl_reference
    from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
    from msa.ops.sparse_attention.reference import sparse_attention_reference
    from msa.ops.sparse_attention.triton_bwd import sparse_attention_bwd_triton
    import msa
    q, k, v, qi, ki, do = make_inputs(t, seed=1)
    scale, iscale = D ** -0.5, DI ** -0.5
    res = {"T": t}
    with torch.no_grad():
        bi = select(qi, ki, notes)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    o, lse = sparse_attention_reference(qr, kr, vr, bi, block_size=BLOCK, scale=scale, cu_seqlens=None)
    gq, gk, gv = torch.autograd.grad(o, (qr, kr, vr), do)
    o, lse = o.detach(), lse.detach()

    def attn_bwd():
        dq, dk, dv = sparse_attention_bwd_triton(do, q, k, v, o, lse, bi, block_size=BLOCK, scale=scale,
                                                 cu_seqlens=None)
        res.update(dq=rel(dq, gq), dk=rel(dk, gk), dv=rel(dv, gv))

    def attn_fwd():
        o_t, lse_t = msa.sparse_attention(q, k, v, bi, block_size=BLOCK, return_lse=True, backend="triton")
        res.update(fwd_o=rel(o_t, o), fwd_lse_maxabs=float((lse_t - lse).abs().max()))

    def kl(phase, sel, tl_):
        kw = dict(block_size=BLOCK, scale=scale, index_scale=iscale, cu_seqlens=None)
        a, b = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        lr = indexer_kl_reference(a, b, q, k, sel, **kw)
        ga, gb = torch.autograd.grad(lr, (a, b))
        a2, b2 = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        lg = indexer_kl_triton(a2, b2, q, k, sel, **kw, teacher_lse=tl_)
        ga2, gb2 = torch.autograd.grad(lg, (a2, b2))
        res[f"{phase}_kl_ref"], res[f"{phase}_kl"] = float(lr), float(lg)
        res[f"{phase}_kl_rel"] = abs(float(lg) - float(lr)) / max(abs(float(lr)), 1e-6)
        res[f"{phase}_dq_idx"], res[f"{phase}_dk_idx"] = rel(ga2, ga), rel(gb2, gb)

    steps = [("sparse_attention_bwd_triton (dq/dkdv kernels)", attn_bwd),
             ("sparse_attention_fwd_triton", attn_fwd),
             ("indexer_kl sparse (slse_kv + fwd_kv kernels)", lambda: kl("sparse", bi, lse)),
             ("indexer_kl warmup (" + msa.tuning.current().kl_dense_mode + " mode)",
              lambda: kl("warmup", None, None))]
    for label, fn in steps:
        _gate_step(res, label, fn)
    names = ("dq", "dk", "dv", "sparse_dq_idx", "sparse_dk_idx", "warmup_dq_idx", "warmup_dk_idx")
    grads = [res.get(x, float("inf")) for x in names]
    ok = (all(x < 2e-2 for x in grads) and res.get("sparse_kl_rel", 1.0) < 1e-2
          and res.get("warmup_kl_rel", 1.0) < 1e-2 and "errors" not in res)
    res["pass"] = bool(ok)
    if "errors" in res:
        try:
            res["aot_over_limit"] = aot_overflows()
        except Exception as exc:
            res["aot_over_limit"] = f"aot check failed: {type(exc).__name__}: {str(exc)[:200]}"
    return res


def sdpa_step(q, k, v, do, backend, repeat_kv=False):
    """Plain SDPA forward + backward (GQA through enable_gqa, or k/v repeated to H_q heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    g = q.shape[2] // k.shape[2]

    def fn():
        qt = q.transpose(1, 2)
        if repeat_kv:
            kt, vt = (x.repeat_interleave(g, dim=2).transpose(1, 2) for x in (k, v))
        else:
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel([be]):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=not repeat_kv)
        torch.autograd.grad(o, (q, k, v), do.transpose(1, 2))
    return fn


def bench_size(t, notes):
    import msa
    from msa.ops.indexer_kl.triton_impl import indexer_kl_triton
    from msa.ops.sparse_attention.triton_impl import selection_plan
    q, k, v, qi, ki, do = make_inputs(t)
    for x in (q, k, v, qi, ki):
        x.requires_grad_(True)
    scale, iscale = D ** -0.5, DI ** -0.5
    row = {"T": t}
    kl_kw = dict(block_size=BLOCK, scale=scale, index_scale=iscale, cu_seqlens=None)
    with torch.no_grad():
        bi = select(qi, ki, notes)

    def sel_fn():
        with torch.no_grad():
            msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="triton")

    def attn_fn():
        o, lse = msa.sparse_attention(q, k, v, bi, block_size=BLOCK, return_lse=True, backend="triton")
        torch.autograd.grad(o, (q, k, v), do)

    try:
        _, lse_sparse = msa.sparse_attention(q.detach(), k.detach(), v.detach(), bi, block_size=BLOCK,
                                             return_lse=True, backend="triton")
    except Exception as exc:  # the forward is another engineer's: the KL then recomputes the teacher lse
        notes.append(f"T={t}: sparse_attention(backend='triton') failed: {exc!r}")
        lse_sparse = None

    def kl_sparse_fn():
        loss = indexer_kl_triton(qi, ki, q.detach(), k.detach(), bi, **kl_kw, teacher_lse=lse_sparse)
        torch.autograd.grad(loss, (qi, ki))

    def step_on(b):
        """The layer's sparse step on selection b (``msa_prefill_attention``): one SelectionPlan shared
        by the attention forward, its backward and the KL, whose teacher lse is the attention's."""
        plan = selection_plan(b, block_size=BLOCK, cu_seqlens=None, num_heads=HQ, head_dim=D, dtype=q.dtype,
                              index_dim=DI)
        o, lse = msa.sparse_attention(q, k, v, b, block_size=BLOCK, return_lse=True, backend="triton", plan=plan)
        torch.autograd.grad(o, (q, k, v), do)
        loss = indexer_kl_triton(qi, ki, q.detach(), k.detach(), b, **kl_kw, teacher_lse=lse, plan=plan)
        torch.autograd.grad(loss, (qi, ki))

    def sparse_step():
        with torch.no_grad():
            b = msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="triton")
        step_on(b)

    variants = {"select": sel_fn, "sparse_attn_fwd_bwd": attn_fn, "sparse_kl_fwd_bwd": kl_sparse_fn,
                "sparse_step": sparse_step}
    # the query-tiled forward + dQ (msa.tuning), on the indexer's selections of random inputs and on
    # selections replayed from a trained model (msa.bench.selections: neighbours select alike)
    # (sparse_step itself runs the defaults: "auto" picks tiled below 32K tokens, KV-outer above)
    tiled = dict(sparse_fwd_kernel="tiled", sparse_bwd_dq="tiled", tile_order="consecutive")
    kv = dict(sparse_fwd_kernel="kv", sparse_bwd_dq="kv")
    variants["sparse_attn_fwd_bwd_tiled"] = lambda: _with(tiled, attn_fn)
    variants["sparse_attn_fwd_bwd_kv"] = lambda: _with(kv, attn_fn)
    variants["sparse_step_tiled"] = lambda: _with(tiled, sparse_step)
    variants["sparse_step_kv"] = lambda: _with(kv, sparse_step)
    greedy = dict(tiled, tile_order="greedy")  # tiles grouped by selection (msa.ops.utils.tile_union)
    variants["sparse_attn_fwd_bwd_tiled_greedy"] = lambda: _with(greedy, attn_fn)
    variants["sparse_step_tiled_greedy"] = lambda: _with(greedy, sparse_step)
    try:
        from .selections import realistic_indices, union_blocks
        real = realistic_indices(t, HKV, TOPK, BLOCK, q.device)
        from msa.ops.sparse_attention.triton_impl import tiled_tile_tokens
        tt = tiled_tile_tokens(D, HQ // HKV, BLOCK)
        row["union_blocks_random"], row["union_blocks_realistic"] = union_blocks(bi, tt), union_blocks(real, tt)

        def real_step():  # the selection is timed (its result replaced), then the step on the replayed one
            with torch.no_grad():
                msa.select_blocks(qi, ki, block_size=BLOCK, topk=TOPK, backend="triton")
            step_on(real)
        variants["sparse_step_realistic"] = real_step
        variants["sparse_step_realistic_tiled"] = lambda: _with(tiled, real_step)
        variants["sparse_step_realistic_kv"] = lambda: _with(kv, real_step)
        variants["sparse_step_realistic_tiled_greedy"] = lambda: _with(greedy, real_step)
    except (OSError, ValueError) as exc:
        notes.append(f"T={t}: no realistic selections: {exc}")
    dense_ok = t <= DENSE_MAX_T and not NO_DENSE
    if not dense_ok:
        notes.append(f"T={t}: dense variants skipped (one dense step takes tens of seconds); "
                     f"scale the largest measured dense time by (T / T_max)^2")
    for be in ("cudnn", "flash") if dense_ok else ():
        variants[f"sdpa_{be}"] = sdpa_step(q, k, v, do, be)
        variants[f"sdpa_{be}_repeat_kv"] = sdpa_step(q, k, v, do, be, repeat_kv=True)
    for impl in ("flash", "cudnn") if dense_ok else ():
        def dense_lse_fn(impl=impl):
            o, lse = DenseAttentionWithLse.apply(q, k, v, scale, impl)
            torch.autograd.grad(o, (q, k, v), do)

        def warm_step(impl=impl):
            o, lse = DenseAttentionWithLse.apply(q, k, v, scale, impl)
            torch.autograd.grad(o, (q, k, v), do)
            loss = indexer_kl_triton(qi, ki, q.detach(), k.detach(), None, **kl_kw, teacher_lse=lse)
            torch.autograd.grad(loss, (qi, ki))
        variants[f"dense_lse_{impl}"] = dense_lse_fn
        variants[f"warmup_step_{impl}"] = warm_step

    def dense_kl_fn():
        with torch.no_grad():
            _, lse = DenseAttentionWithLse.apply(q, k, v, scale, row.get("lse_impl", "flash"))
        fn = lambda: torch.autograd.grad(indexer_kl_triton(qi, ki, q.detach(), k.detach(), None, **kl_kw,
                                                           teacher_lse=lse), (qi, ki))
        return fn
    for name, fn in list(variants.items()):
        measure(row, name, fn)
    ok = [i for i in ("flash", "cudnn") if isinstance(row.get(f"dense_lse_{i}_ms"), float)]
    if ok:
        row["lse_impl"] = min(ok, key=lambda i: row[f"dense_lse_{i}_ms"])
        try:
            measure(row, "dense_kl_fwd_bwd", dense_kl_fn(), with_peak=False)
        except Exception as exc:  # the lse computation itself
            row["dense_kl_fwd_bwd_ms"] = _err(exc)
    dense = [row[f"sdpa_{b}{r}_ms"] for b in ("cudnn", "flash") for r in ("", "_repeat_kv")
             if isinstance(row.get(f"sdpa_{b}{r}_ms"), float)]
    row["dense_best_ms"] = min(dense) if dense else None
    warm = [row[f"warmup_step_{i}_ms"] for i in ("flash", "cudnn") if isinstance(row.get(f"warmup_step_{i}_ms"), float)]
    row["warmup_step_best_ms"] = min(warm) if warm else None
    if row["dense_best_ms"] and isinstance(row.get("sparse_step_ms"), float):
        row["sparse_speedup_vs_dense"] = row["dense_best_ms"] / row["sparse_step_ms"]
    for var in ("tiled", "kv", "realistic", "realistic_tiled", "realistic_kv"):
        if row["dense_best_ms"] and isinstance(row.get(f"sparse_step_{var}_ms"), float):
            row[f"sparse_{var}_speedup_vs_dense"] = row["dense_best_ms"] / row[f"sparse_step_{var}_ms"]
    if row["dense_best_ms"] and row["warmup_step_best_ms"]:
        row["warmup_over_dense"] = row["warmup_step_best_ms"] / row["dense_best_ms"]
    row["dense_tflops"] = (3.5 * 2 * HQ * D * t * t / (row["dense_best_ms"] * 1e-3) / 1e12
                           if row["dense_best_ms"] else None)
    for label, stages in (("sparse", lambda: sparse_stages(q, k, v, qi, ki, do, kl_kw)),
                          ("warmup_cudnn", lambda: warmup_stages(q, k, v, qi, ki, do, kl_kw, "cudnn", scale))):
        if label.startswith("warmup") and not dense_ok:
            continue
        try:
            row[f"{label}_stages_ms"] = stage_breakdown(stages(), reps=3 if t > 32768 else 5)
        except Exception as exc:
            row[f"{label}_stages_ms"] = _err(exc)
            torch.cuda.empty_cache()
        print(f"  T={t} {label} stages (ms): {row[f'{label}_stages_ms']}", flush=True)
    from msa.ops.sparse_attention.triton_bwd import sparse_attention_bwd_triton
    with torch.no_grad():
        o_s, lse_s = msa.sparse_attention(q, k, v, bi, block_size=BLOCK, return_lse=True, backend="triton")
    for mode in ("kv", "query", "tiled"):  # the backward's own kernels, CUDA events (one warm call first)
        try:
            call = lambda st=None: _tuned("sparse_bwd_dq", mode, lambda: sparse_attention_bwd_triton(
                do, q.detach(), k.detach(), v.detach(), o_s, lse_s, bi, block_size=BLOCK, scale=scale,
                cu_seqlens=None, stage_times=st))
            call()
            st = {}
            call(st)
            st.pop("chunks", None)
            row[f"attn_bwd_{mode}_kernels_ms"] = st
        except Exception as exc:
            row[f"attn_bwd_{mode}_kernels_ms"] = _err(exc)
            torch.cuda.empty_cache()
        print(f"  T={t} attention backward kernels, dQ mode {mode} (ms): {row[f'attn_bwd_{mode}_kernels_ms']}",
              flush=True)
    del o_s, lse_s
    if PROFILE:
        row["sparse_step_kernels_ms"] = profile_kernels(sparse_step)
        print(f"  T={t} sparse step, GPU kernel time per kernel (ms, torch.profiler, one step):", flush=True)
        for name, ms in row["sparse_step_kernels_ms"].items():
            print(f"    {ms:9.3f}  {name}", flush=True)
    if SWEEP and t == SWEEP_T:
        try:
            row["sweep"] = config_sweep(q, k, v, qi, ki, do, kl_kw, notes)
        except Exception as exc:  # e.g. the sweep's own setup (selection, forward)
            row["sweep"] = _err(exc)
    del q, k, v, qi, ki, do, bi, lse_sparse
    torch.cuda.empty_cache()
    return row


def plot(result, path):
    """Step time per T of a results dict (this script's JSON) as a log-log PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("sparse_step_ms", "sparse step (select+attn+KL, fwd+bwd)"),
                       ("dense_best_ms", "dense SDPA fwd+bwd (best)"),
                       ("warmup_step_best_ms", "warmup step (dense+lse + dense KL)")):
        pts = [(r["T"], r[key]) for r in rows if isinstance(r.get(key), float)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("ms per layer step")
    ax.set_title(f"MSA training step, {result['gpu']}, H_q 64 / H_kv 4 / D 128, bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot-only", metavar="JSON", default=None,
                    help="no GPU work: redraw OUT/bench_train.png from a results JSON (e.g. one merged from runs)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=positive_ints, default=None, help="comma-separated T values (overrides defaults)")
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel launch configs at --sweep-size")
    ap.add_argument("--sweep-size", type=int, default=32768, help="T of the --sweep (default 32768)")
    ap.add_argument("--sweep-groups", default="kl_kv,bwd,dense",
                    help="comma-separated subset of kl_kv, bwd, dense (the dense KL sweeps need T <= 131072)")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times of one sparse step")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense and warmup variants (development rounds; no speedups then)")
    args = ap.parse_args()
    global SWEEP, SWEEP_T, NO_DENSE, PROFILE, SWEEP_GROUPS
    SWEEP, SWEEP_T, NO_DENSE, PROFILE = args.sweep, args.sweep_size, args.no_dense, args.profile
    SWEEP_GROUPS = tuple(x for x in args.sweep_groups.split(",") if x)
    bad = [x for x in SWEEP_GROUPS if x not in ("kl_kv", "bwd", "dense")]
    if bad:
        ap.error(f"--sweep-groups: unknown {bad}; choose from kl_kv, bwd, dense")
    os.makedirs(args.out, exist_ok=True)
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(args.out, "bench_train.png"))
        return
    assert torch.cuda.is_available(), "bench_train.py needs a CUDA GPU"
    import triton
    notes = []
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "command": " ".join([sys.executable] + sys.argv),
              "tuning": {k: str(v) for k, v in vars(msa.tuning.current()).items()},
              "shape": dict(H_q=HQ, H_kv=HKV, D=D, D_idx=DI, block_size=BLOCK, topk=TOPK, dtype="bf16", B=1),
              "notes": notes}
    t0 = time.time()
    try:
        gate = parity_gate(4096, notes)
    except Exception as exc:
        gate = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    result["parity"] = gate
    print("parity gate (bf16, T=4096):", "PASS" if gate.get("pass") else "FAIL",
          {k: (round(v, 6) if isinstance(v, float) else v) for k, v in gate.items()
           if k not in ("trace", "errors", "aot_over_limit")}, flush=True)
    for label, err in gate.get("errors", {}).items():
        print(f"  parity FAILED in {label}: {err}", flush=True)
    if gate.get("aot_over_limit"):
        print(f"  AOT check, kernels over the shared-memory limit / not compiling: {gate['aot_over_limit']}",
              flush=True)
    sizes = (args.sizes if args.sizes else
             ([8192, 32768] if args.quick else [8192, 32768, 131072, 524288]))
    rows = []
    for t in sizes:
        try:
            row = bench_size(t, notes)
        except torch.cuda.OutOfMemoryError:
            row = {"T": t, "error": "OOM"}
            torch.cuda.empty_cache()
        except Exception as exc:
            row = {"T": t, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        rows.append(row)
        print(f"T={t} done at {time.time() - t0:.0f}s", flush=True)
    result["results"] = rows
    result["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, os.path.join(args.out, "bench_train.png"))
    except Exception as exc:
        notes.append(f"plot failed: {exc!r}")
    cols = ["T", "select_ms", "sparse_attn_fwd_bwd_ms", "sparse_kl_fwd_bwd_ms", "sparse_step_ms", "sdpa_cudnn_ms",
            "sdpa_flash_ms", "dense_lse_cudnn_ms", "dense_kl_fwd_bwd_ms", "warmup_step_best_ms",
            "sparse_speedup_vs_dense", "warmup_over_dense", "sparse_step_peak_gb", "sdpa_flash_peak_gb"]
    cols2 = ["T", "union_blocks_random", "union_blocks_realistic", "sparse_attn_fwd_bwd_kv_ms",
             "sparse_attn_fwd_bwd_tiled_ms", "sparse_attn_fwd_bwd_tiled_greedy_ms", "sparse_step_kv_ms",
             "sparse_step_tiled_ms", "sparse_step_tiled_greedy_ms", "sparse_step_ms", "sparse_step_realistic_kv_ms",
             "sparse_step_realistic_tiled_ms", "sparse_step_realistic_tiled_greedy_ms", "sparse_step_realistic_ms",
             "sparse_speedup_vs_dense", "sparse_realistic_speedup_vs_dense"]
    for n in notes:
        print("note:", n)
    print("parity:", "PASS" if gate.get("pass") else "FAIL", "" if gate.get("pass") else
          f"(failed steps: {list(gate.get('errors', {}))}; AOT over limit: {gate.get('aot_over_limit')})")
    for r in rows:
        for label in ("sparse", "warmup_cudnn"):
            st = r.get(f"{label}_stages_ms")
            if isinstance(st, dict):
                print(f"T={r['T']} {label} stages: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items())
                      + f" | sum {sum(st.values()):.2f} ms")
    for cs in (cols, cols2):
        print(" | ".join(c.replace("_ms", "") for c in cs))
        for r in rows:
            cells = []
            for c in cs:
                x = r.get(c, r.get("error", "-") if c != "T" else r["T"])
                cells.append(f"{x:.2f}" if isinstance(x, float) else str(x)[:18])
            print(" | ".join(cells))


if __name__ == "__main__":
    main()
