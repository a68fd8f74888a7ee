"""msa.data: package corpus and split, tokenizers, windows and packing, the resumable sharded loader."""

import numpy as np
import pytest
import torch

from msa.data import (ByteTokenizer, TokenizedSplit, WindowLoader, find_packages, make_windows, pack_windows,
                      package_text, split_of, train_bpe)
from msa.data.corpus import HEADER, iter_documents
from msa.data.tokenizer import encode_documents


def _fake_site(tmp_path):
    root = tmp_path / "site"
    (root / "pkg_a" / "sub").mkdir(parents=True)
    (root / "pkg_a" / "__init__.py").write_text("from .core import f\n")
    (root / "pkg_a" / "core.py").write_text("def f():\n    return 1\n")
    (root / "pkg_a" / "sub" / "z.py").write_text("X = 2\n")
    (root / "pkg_a" / "data.txt").write_text("not python")
    (root / "single.py").write_text("Y = 3\n")
    (root / "thing-1.0.dist-info").mkdir()
    return root


def test_packages_documents_and_split(tmp_path):
    root = _fake_site(tmp_path)
    pkgs = find_packages(False, False, extra_roots=[str(root)])
    assert [p.name for p in pkgs] == ["extra0/pkg_a", "extra0/single"]
    text = package_text(pkgs[0], max_file_bytes=1 << 20)
    # sorted paths, each after its header; non-.py files left out
    expect = "".join(HEADER.format(path=p) + c for p, c in [("pkg_a/__init__.py", "from .core import f\n"),
                                                           ("pkg_a/core.py", "def f():\n    return 1\n"),
                                                           ("pkg_a/sub/z.py", "X = 2\n")])
    assert text == expect
    # the split of a package depends only on (seed, name), and both seeds and names move it
    names = [f"site/p{i}" for i in range(400)]
    s0 = [split_of(n, 0, 0.1, 0.1) for n in names]
    assert s0 == [split_of(n, 0, 0.1, 0.1) for n in names]
    assert s0 != [split_of(n, 1, 0.1, 0.1) for n in names]
    frac = {s: s0.count(s) / len(s0) for s in ("train", "val", "test")}
    assert 0.05 < frac["val"] < 0.15 and 0.05 < frac["test"] < 0.15
    docs = list(iter_documents(pkgs, "train", seed=0, val_fraction=0.0, test_fraction=0.0, max_bytes=10 ** 6,
                               max_file_bytes=1 << 20))
    assert sorted(d["name"] for d in docs) == ["extra0/pkg_a", "extra0/single"]
    cut = list(iter_documents(pkgs, "train", seed=0, val_fraction=0.0, test_fraction=0.0, max_bytes=60,
                              max_file_bytes=1 << 20))
    assert sum(len(d["text"]) for d in cut) <= 60 and all(d["text"].endswith("\n") for d in cut)


def test_bpe_roundtrip_and_bytes_fallback(tmp_path):
    texts = ["def foo(x):\n    return x + 1\n" * 50, "class Bar:\n    pass\n" * 50, "ünïcode = 'é'\n"]
    tok = train_bpe(iter(texts), 300, str(tmp_path / "tok.json"))
    assert tok.vocab_size <= 300
    for t in texts + ["never seen: \x00 λ 😀\n"]:
        assert tok.decode(tok.encode(t)) == t
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2   # merges learned
    b = ByteTokenizer()
    assert b.decode(b.encode("λx\n")) == "λx\n" and b.vocab_size == 256
    # long documents are encoded in line-aligned pieces that decode back to the document
    long = "".join(f"v{i} = {i}\n" for i in range(3000))
    (arr,) = encode_documents(tok, [long], chunk_chars=1000)
    assert arr.dtype == np.int32 and tok.decode(arr.tolist()) == long


def _split(lengths):
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    offs[1:] = np.cumsum(lengths)
    toks = np.arange(offs[-1], dtype=np.int32)   # token value = its global position
    return TokenizedSplit(toks, offs, [f"d{i}" for i in range(len(lengths))])


def test_windows_and_packing():
    sp = _split([25, 7, 3, 40, 9])
    w = make_windows(sp, 10)
    # full windows: 2 of doc0, 4 of doc3; leftovers 5 + 7 + 3 + 0 + 9 = 24 -> 2 packed windows (4 dropped)
    assert len(w) == 8 and int(w.single.sum()) == 6
    seen = []
    for i in range(len(w)):
        b = pack_windows(sp.tokens, w, [i])
        ids, cu = b.input_ids[0], b.cu_seqlens
        assert ids.numel() == 10 and int(cu[-1]) == 10
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            piece = ids[s:e]
            # a piece is contiguous and inside one document
            assert torch.equal(piece, torch.arange(int(piece[0]), int(piece[0]) + e - s))
            doc = np.searchsorted(sp.doc_offsets, int(piece[0]), side="right") - 1
            assert int(piece[-1]) < sp.doc_offsets[doc + 1]
        seen += ids.tolist()
    assert len(seen) == len(set(seen)) == 80   # no token twice
    two = pack_windows(sp.tokens, w, [6, 7])
    assert two.input_ids.shape == (1, 20) and two.cu_seqlens.dtype == torch.int32


def test_loader_resume_and_sharding():
    sp = _split([50] * 13)
    w = make_windows(sp, 10)
    a = WindowLoader(sp.tokens, w, 3, seed=5)
    seq = [a.next().windows for _ in range(9)]   # crosses epochs (65 windows, 21 batches per epoch)
    assert sorted(sum(seq[:7], [])) == sorted(set(sum(seq[:7], [])))
    b = WindowLoader(sp.tokens, w, 3, seed=5)
    for _ in range(4):
        b.next()
    st = b.state_dict()
    c = WindowLoader(sp.tokens, w, 3, seed=5)
    c.load_state_dict(st)
    assert [c.next().windows for _ in range(5)] == seq[4:]
    # two ranks of batch 3 see exactly the windows of one rank of batch 6, disjointly
    one = WindowLoader(sp.tokens, w, 6, seed=5)
    r0 = WindowLoader(sp.tokens, w, 3, seed=5, rank=0, world_size=2)
    r1 = WindowLoader(sp.tokens, w, 3, seed=5, rank=1, world_size=2)
    for _ in range(12):
        x, y, z = one.next().windows, r0.next().windows, r1.next().windows
        assert x == y + z
    with pytest.raises(ValueError, match="different|num_windows|corpus"):
        WindowLoader(sp.tokens, make_windows(sp, 9), 3, seed=5).load_state_dict(st)
    with pytest.raises(ValueError, match="rank"):
        WindowLoader(sp.tokens, w, 3, seed=5, rank=2, world_size=2)
