"""The installable package: the wheel's contents and name, `msa bench` from an installed wheel, and the
CLI's argument errors (one clear line, no traceback)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import msa
from msa.bench import BENCHES
from msa.cli import main

ROOT = Path(__file__).resolve().parent.parent


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --- CLI, in process -------------------------------------------------------------------------------
def test_bench_without_cuda_prints_one_line_and_fails(monkeypatch, capsys):
    no_cuda(monkeypatch)
    for name in BENCHES:
        assert main(["bench", name, "--out", "/nonexistent", "--quick"]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"msa bench {name}: needs a CUDA GPU"), err
        assert "Traceback" not in err


def test_bench_help_lists_the_benchmarks_and_names_are_checked(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("prefill", "decode", "train", "topk"))
    assert main(["bench"]) == 2
    assert "usage: msa bench" in capsys.readouterr().err
    assert main(["bench", "nope", "--out", "x"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_bench_dispatches_to_the_packaged_module(monkeypatch):
    """With CUDA (faked here) `msa bench NAME args` calls msa.bench.NAME.main() with exactly those args."""
    import msa.bench.topk as topk
    seen = {}

    def fake_main():
        seen["argv"] = list(sys.argv)
        raise SystemExit(3)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(topk, "main", fake_main)
    argv_before = list(sys.argv)
    assert main(["bench", "topk", "--out", "DIR", "--quick"]) == 3
    assert seen["argv"] == ["msa bench topk", "--out", "DIR", "--quick"]
    assert sys.argv == argv_before


def test_bench_module_help_works_without_cuda(monkeypatch, capsys):
    no_cuda(monkeypatch)
    assert main(["bench", "decode", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["demo", "--steps", "x"], "argument --steps: must be a positive integer"),
    (["demo", "--device", "cuda"], "argument --device: cuda requested but CUDA is not available"),
    (["demo", "--device", "tpu"], "argument --device"),
    (["flops", "--topk", "0"], "argument --topk"),
    (["flops", "--seqlens", "8192,abc"], "argument --seqlens"),
])
def test_cli_argument_errors_name_the_argument(monkeypatch, capsys, argv, match):
    no_cuda(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_run_demo_checks_steps_and_device(monkeypatch, tmp_path):
    from msa.demo import run_demo
    no_cuda(monkeypatch)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        run_demo(str(tmp_path), steps=0, device="cpu")
    with pytest.raises(ValueError, match="device='cuda' requested but CUDA is not available"):
        run_demo(str(tmp_path), device="cuda")


# --- the wheel --------------------------------------------------------------------------------------
def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (no network: the installed setuptools builds it)."""
    if not _setuptools_ok():
        pytest.skip("building the wheel offline needs setuptools >= 77 installed")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "msa", src / "msa", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("whl")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_name_version_license_and_contents(wheel):
    assert wheel.name == f"msa_attention-{msa.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist = f"msa_attention-{msa.__version__}.dist-info"
        meta = zf.read(f"{dist}/METADATA").decode()
        entry = zf.read(f"{dist}/entry_points.txt").decode()
        license_text = zf.read(f"{dist}/licenses/LICENSE").decode()
    assert "Name: msa-attention\n" in meta and f"Version: {msa.__version__}\n" in meta
    assert "License-Expression: Apache-2.0" in meta
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "msa = msa.cli:main" in entry
    want = {"msa/py.typed", "msa/cli.py", "msa/bench/__init__.py", "msa/models/msa_lm.py"}
    want |= {f"msa/bench/{name}.py" for name in BENCHES}
    assert want <= names, want - names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_msa_bench_runs_from_the_installed_wheel(wheel, tmp_path):
    """Installed into an empty target directory and run from elsewhere, the package (not this checkout)
    serves `msa bench --help`, a benchmark's own --help and the no-CUDA line."""
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = (
        "import sys, torch, msa, msa.cli\n"
        "print('FILE', msa.__file__)\n"
        "torch.cuda.is_available = lambda: False\n"
        "codes = [msa.cli.main(['bench', '--help']), msa.cli.main(['bench', 'train', '--help']),\n"
        "         msa.cli.main(['bench', 'prefill', '--out', 'x'])]\n"
        "print('CODES', codes)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"FILE {target / 'msa' / '__init__.py'}" in res.stdout
    assert "CODES [0, 0, 2]" in res.stdout
    assert "decode" in res.stdout and "--out" in res.stdout
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert err_lines == [err_lines[-1]] and err_lines[-1].startswith("msa bench prefill: needs a CUDA GPU")
    # the console script the wheel declares
    console = target / "bin" / "msa"
    if console.exists():
        res = subprocess.run([str(console), "bench", "--help"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
        assert res.returncode == 0 and "topk" in res.stdout, res.stderr[-2000:]
