"""The benchmarks' size lists are parsed before any GPU work: a bad list is a usage error naming the
argument (a zero or a typo used to pass the parser and go on to the GPU work)."""

import argparse
import importlib
import sys

import pytest

from msa.bench import positive_ints


def test_positive_ints():
    assert positive_ints("8192,32768") == [8192, 32768]
    for bad in ("0", "8192,-1", "8k", "", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated positive integers"):
            positive_ints(bad)


@pytest.mark.parametrize("name,arg", [("prefill", "--sizes"), ("train", "--sizes"), ("layer", "--sizes"),
                                      ("decode", "--contexts"), ("decode", "--batches"), ("decode", "--tokens"),
                                      ("generate", "--contexts"), ("hf", "--contexts")])
def test_bench_rejects_a_bad_size_list(name, arg, monkeypatch, capsys):
    mod = importlib.import_module(f"msa.bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"msa bench {name}", "--out", "/tmp/unused-bench-args", arg, "8192,0"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {arg}: must be comma-separated positive integers, got '8192,0'" in err
