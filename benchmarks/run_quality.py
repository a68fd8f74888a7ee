"""The quality experiments of the issue "Does the learned index work?": every ``exp-*`` preset of
msa/train/presets.py trained on the same data, tokens and seed, then summarized.

    python benchmarks/run_quality.py --out DIR --prepare          # build the tokenizer + token cache once
    python benchmarks/run_quality.py --out DIR --probe [--gpus 6] # time 12 steps per variant/phase, suggest --steps
    python benchmarks/run_quality.py --out DIR [--gpus 8] [--jobs N] [--runs a,b] [--steps N] [--budget-minutes 9.5]
    python benchmarks/run_quality.py --out DIR --summarize        # quality.md / quality.json / compare.png
    ... --export $OUT/quality                                     # copy results (no checkpoints) elsewhere

Each run is ``msa train --preset NAME --out DIR/NAME`` in a subprocess pinned to one GPU
(CUDA_VISIBLE_DEVICES); with --gpus N, N runs go in parallel. Runs that are complete are skipped,
interrupted ones resume from their last checkpoint, so a chain of capped commands finishes the
set. exp-msa-cpt and exp-dense-cont start after exp-dense has finished (from its checkpoint).
--budget-minutes caps this command: runs get max_minutes so they stop (with a checkpoint) in time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msa.train.presets import EXP_STEPS, INIT_FROM, get_preset  # noqa: E402
from msa.train.report import ORDER, summarize  # noqa: E402

# (label, preset, phase timed): an MSA run's mean step mixes its warmup and sparse steps
PROBE_JOBS = [("exp-dense", "exp-dense", "-"), ("exp-local", "exp-local", "-"),
              ("exp-msa-pt.warmup", "exp-msa-pt", "warmup"), ("exp-msa-pt.sparse", "exp-msa-pt", "sparse"),
              ("exp-msa-nodetach.warmup", "exp-msa-nodetach", "warmup"),
              ("exp-msa-nodetach.sparse", "exp-msa-nodetach", "sparse")]


def scaled_overrides(name: str, steps: int | None) -> list:
    """--steps N rescales the schedule of a run (steps, warmup, eval and checkpoint periods) by
    N / EXP_STEPS, so every run keeps its fractions (CPT stays 20% of the pretraining)."""
    if not steps:
        return []
    cfg = get_preset(name)
    f = steps / EXP_STEPS
    sc = lambda x: max(1, round(x * f)) if x else 0  # noqa: E731
    return [f"steps={sc(cfg.steps)}", f"phase.warmup_steps={sc(cfg.phase.warmup_steps)}",
            f"eval.every={sc(cfg.eval.every)}", f"checkpoint_every={sc(cfg.checkpoint_every)}",
            f"optim.warmup_steps={sc(cfg.optim.warmup_steps)}"]


def status(out: Path, name: str) -> str:
    p = out / name / "summary.json"
    if not p.exists():
        return "new" if not (out / name / "checkpoints").exists() else "partial"
    return json.loads(p.read_text()).get("status", "partial")


def command(out: Path, name: str, args, extra: list) -> list:
    cmd = [sys.executable, "-m", "msa.cli", "train", "--preset", name, "--out", str(out / name), "--no-progress"]
    sets = scaled_overrides(name, args.steps) + list(args.set or []) + extra
    if name in INIT_FROM:
        sets.append(f"phase.init_from={out / INIT_FROM[name]}")
    if args.cache_dir:
        sets.append(f"data.cache_dir={args.cache_dir}")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def launch(out: Path, name: str, gpu: int, args, extra: list):
    (out / name).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    cmd = command(out, name, args, extra)
    log = open(out / name / "stdout.log", "a")
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    print(f"[{time.strftime('%H:%M:%S')}] start {name} on gpu {gpu}", flush=True)
    return subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT), log


def run_all(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_end = time.time() + args.budget_minutes * 60 if args.budget_minutes else None
    names = args.runs.split(",") if args.runs else ORDER
    pending = [n for n in names if status(out, n) != "complete"]
    slots = list(range(max(1, args.jobs or args.gpus)))
    running = {}
    while pending or running:
        for slot, (name, proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                print(f"[{time.strftime('%H:%M:%S')}] {name} exited {proc.returncode}: {status(out, name)}", flush=True)
                del running[slot]
        free = [s for s in slots if s not in running]
        for name in list(pending):
            if not free:
                break
            dep = INIT_FROM.get(name)
            if dep and status(out, dep) != "complete":
                if dep not in pending and dep not in [r[0] for r in running.values()]:
                    print(f"skip {name}: needs {dep} complete", flush=True)
                    pending.remove(name)
                continue
            extra = []
            if t_end is not None:
                left = (t_end - time.time()) / 60 - args.final_eval_minutes
                if left < 1:
                    print(f"budget spent; not starting {name}", flush=True)
                    pending.remove(name)
                    continue
                extra.append(f"max_minutes={left:.2f}")
            pending.remove(name)
            slot = free.pop(0)
            running[slot] = (name, *launch(out, name, slot % max(1, args.gpus), args, extra))
        time.sleep(2)
    print(summarize(str(out), "python benchmarks/run_quality.py " + " ".join(sys.argv[1:])))
    return 0


def export(out: Path, dest: Path) -> None:
    """Copy everything under out except checkpoints (and the probe's runs) to dest."""
    import shutil
    for f in out.rglob("*"):
        rel = f.relative_to(out)
        if f.is_dir() or "checkpoints" in rel.parts:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / rel)
    print(f"exported {out} (without checkpoints) to {dest}")


def probe(args) -> int:
    """12 steps of each distinct variant (evaluation and checkpoints off; several at once with
    --gpus); prints seconds per step in each phase and the --steps that fits --target-minutes of
    training for the slowest run (runs share their step count, so the slowest one sets it)."""
    out = Path(args.out) / "probe"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    jobs = []
    for label, preset, phase in PROBE_JOBS:
        extra = ["steps=12", "eval.every=0", "eval.final=false", "checkpoint_every=0", "log_every=1",
                 f"phase.warmup_steps={100 if phase == 'warmup' else 0}", f"name={label}"]
        ns = argparse.Namespace(steps=None, set=args.set, cache_dir=args.cache_dir)
        cmd = [c for c in command(out, preset, ns, extra) if not c.startswith("phase.init_from")] + ["--fresh"]
        cmd[cmd.index("--out") + 1] = str(out / label)
        jobs.append((label, cmd))
    res, width = {}, max(1, args.gpus)
    for i in range(0, len(jobs), width):
        procs = []
        for slot, (name, cmd) in enumerate(jobs[i:i + width]):
            e = dict(env, CUDA_VISIBLE_DEVICES=str(slot)) if args.gpus else env
            procs.append((name, subprocess.Popen(cmd, cwd=str(ROOT), env=e, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True)))
        for name, proc in procs:
            text = proc.communicate()[0]
            if proc.returncode != 0:
                print(f"{name}: failed\n{text[-4000:]}")
                res[name] = {"error": text[-2000:]}
                continue
            hist = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
            hist = [r for r in hist if "step_s" in r]
            st = statistics.median(r["step_s"] for r in hist[4:]) if len(hist) > 5 else hist[-1]["step_s"]
            res[name] = {"step_s": st, "tok_per_s": hist[-1]["tokens"] / st, "mode": hist[-1]["mode"],
                         "first_step_s": hist[0]["step_s"]}
            print(f"{name:24s} {res[name]['mode']:6s} {st * 1000:8.1f} ms/step {res[name]['tok_per_s']:12,.0f} tok/s "
                  f"(first step, compiles included: {hist[0]['step_s']:.1f} s)", flush=True)
    pt = get_preset("exp-msa-pt")
    w = pt.phase.warmup_steps / pt.steps
    per_step = {}
    for name in ("exp-dense", "exp-local", "exp-msa-pt", "exp-msa-nodetach"):
        warm, sparse = res.get(f"{name}.warmup", {}), res.get(f"{name}.sparse", {})
        if "step_s" in warm and "step_s" in sparse:
            per_step[name] = w * warm["step_s"] + (1 - w) * sparse["step_s"]
        elif "step_s" in res.get(name, {}):
            per_step[name] = res[name]["step_s"]
    if per_step:
        slowest = max(per_step, key=per_step.get)
        steps = int(args.target_minutes * 60 / per_step[slowest])
        res["mean_step_s"], res["suggested_steps"] = per_step, steps
        for n, v in per_step.items():
            print(f"{n:18s} mean step {v * 1000:8.1f} ms -> {args.target_minutes * 60 / v:7.0f} steps in "
                  f"{args.target_minutes} min")
        print(f"suggested --steps {steps} (set by {slowest})")
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (one subfolder per run)")
    p.add_argument("--runs", default=None, help=f"comma-separated subset (default, in order: {','.join(ORDER)})")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to use: runs are pinned to them round-robin (0: no pinning, one run at a time unless --jobs)")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs at once (default --gpus); more than --gpus shares GPUs round-robin")
    p.add_argument("--steps", type=int, default=None, help=f"pretraining steps (default {EXP_STEPS}); every run scales")
    p.add_argument("--set", action="append", help="extra override for every run (KEY=VALUE, repeatable)")
    p.add_argument("--cache-dir", default=None, help="data cache folder (default ~/.cache/msa/data)")
    p.add_argument("--budget-minutes", type=float, default=0.0, help="wall-clock cap of this command (0: none)")
    p.add_argument("--final-eval-minutes", type=float, default=1.0, help="time kept for the final evaluation")
    p.add_argument("--prepare", action="store_true", help="only build the data cache")
    p.add_argument("--probe", action="store_true", help="time a few steps of each variant")
    p.add_argument("--target-minutes", type=float, default=7.0, help="training minutes per run for --probe's advice")
    p.add_argument("--summarize", action="store_true", help="only write quality.md / quality.json / compare.png")
    p.add_argument("--export", default=None, help="afterwards, copy the results (no checkpoints) to this folder")
    args = p.parse_args()
    if args.gpus < 0 or args.jobs < 0:
        p.error(f"--gpus and --jobs must be >= 0, got --gpus {args.gpus} --jobs {args.jobs}")
    if args.summarize:
        print(summarize(args.out, "python benchmarks/run_quality.py " + " ".join(sys.argv[1:])))
        rc = 0
    elif args.prepare:
        cmd = command(Path(args.out), "exp-msa-pt", args, []) + ["--prepare-data"]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        rc = subprocess.call(cmd, cwd=str(ROOT), env=env)
    elif args.probe:
        rc = probe(args)
    else:
        rc = run_all(args)
    if args.export:
        export(Path(args.out), Path(args.export))
    return rc


if __name__ == "__main__":
    sys.exit(main())
