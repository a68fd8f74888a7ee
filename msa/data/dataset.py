"""Tokenized splits of the code corpus (cached on disk), windows of the context length, packing
with cu_seqlens, and a resumable, shardable loader.

Windows: a document of L tokens gives L // T full windows of T tokens; the remainders (and short
documents) are concatenated in document order into a stream that is cut into windows of T tokens,
each carrying the boundaries of the pieces it holds (cu_seqlens), so no token attends across
documents. Each epoch visits every window once in an order drawn from (seed, epoch); the loader's
position is (epoch, cursor), which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .corpus import SPLITS, budget_bytes, corpus_fingerprint, find_packages, iter_documents
from .tokenizer import BPETokenizer, ByteTokenizer, encode_documents, tokenizers_available, train_bpe


@dataclass
class CorpusSpec:
    """What determines the cached data (mirrors the data fields of msa.train.config.DataConfig)."""

    tokenizer: str = "bpe"
    vocab_size: int = 16384
    tokenizer_train_mb: float = 32.0
    max_corpus_mb: float = 400.0
    eval_corpus_mb: float = 40.0
    max_file_kb: float = 512.0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    include_stdlib: bool = True
    include_site_packages: bool = True
    seed: int = 0
    extra_roots: Sequence[str] = ()


@dataclass
class TokenizedSplit:
    """tokens: int32 (N,) every document of the split concatenated; doc_offsets: int64 (D+1,);
    names: the D package names."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    names: List[str]

    @property
    def num_docs(self) -> int:
        return len(self.names)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]


class CorpusData(NamedTuple):
    tokenizer: object
    splits: Dict[str, TokenizedSplit]
    cache_dir: Path


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "msa" / "data"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock so concurrent runs on one machine build the cache once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _save_split(path: Path, split: TokenizedSplit) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, tokens=split.tokens, doc_offsets=split.doc_offsets, names=np.asarray(split.names, dtype=object))
    os.replace(tmp, path)


def _load_split(path: Path) -> TokenizedSplit:
    z = np.load(path, allow_pickle=True)
    return TokenizedSplit(z["tokens"], z["doc_offsets"], [str(n) for n in z["names"]])


def prepare_corpus(spec: CorpusSpec, cache_dir: Optional[str] = None, *, log=print) -> CorpusData:
    """Tokenizer + the three tokenized splits, from the cache when present (built once otherwise,
    under a file lock). Deterministic for a given install and spec."""
    pkgs = find_packages(spec.include_stdlib, spec.include_site_packages, spec.extra_roots)
    if not pkgs:
        raise RuntimeError("no Python packages found to build the corpus from")
    kind = spec.tokenizer
    if kind == "bpe" and not tokenizers_available():
        log("msa.data: the `tokenizers` package is not installed; falling back to byte tokens")
        kind = "bytes"
    key_src = json.dumps({**asdict(spec), "extra_roots": list(spec.extra_roots), "tokenizer": kind,
                          "packages": corpus_fingerprint(pkgs), "format": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    d = root / key
    with _file_lock(root / f"{key}.lock"):
        if not (d / "done.json").exists():
            _build(spec, kind, pkgs, d, log)
    tok = BPETokenizer(str(d / "tokenizer.json")) if kind == "bpe" else ByteTokenizer()
    splits = {s: _load_split(d / f"{s}.npz") for s in SPLITS}
    return CorpusData(tok, splits, d)


def _build(spec: CorpusSpec, kind: str, pkgs, d: Path, log) -> None:
    t0 = time.time()
    d.mkdir(parents=True, exist_ok=True)
    common = dict(seed=spec.seed, val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
                  max_file_bytes=int(spec.max_file_kb * 1024))
    docs = {}
    for split in SPLITS:
        mb = spec.max_corpus_mb if split == "train" else spec.eval_corpus_mb
        docs[split] = list(iter_documents(pkgs, split, max_bytes=budget_bytes(mb), **common))
        if not docs[split]:
            raise RuntimeError(f"the {split} split is empty: too few packages for val_fraction="
                               f"{spec.val_fraction}, test_fraction={spec.test_fraction}")
    nbytes = {s: sum(len(x["text"]) for x in v) for s, v in docs.items()}
    log(f"msa.data: corpus {', '.join(f'{s} {len(docs[s])} packages {nbytes[s] / 1e6:.1f} MB' for s in SPLITS)}")
    if kind == "bpe":
        tok = train_bpe(_tokenizer_sample(docs["train"], budget_bytes(spec.tokenizer_train_mb)), spec.vocab_size,
                        str(d / "tokenizer.json"))
    else:
        tok = ByteTokenizer()
    for split in SPLITS:
        arrs = encode_documents(tok, [x["text"] for x in docs[split]])
        lens = np.asarray([len(a) for a in arrs], dtype=np.int64)
        offsets = np.zeros(len(arrs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lens)
        tokens = np.concatenate(arrs).astype(np.int32) if arrs else np.zeros(0, np.int32)
        _save_split(d / f"{split}.npz", TokenizedSplit(tokens, offsets, [x["name"] for x in docs[split]]))
    info = {"packages": {s: [x["name"] for x in docs[s]] for s in SPLITS}, "bytes": nbytes,
            "tokenizer": kind, "vocab_size": tok.vocab_size, "seconds": time.time() - t0}
    (d / "done.json").write_text(json.dumps(info, indent=1))
    log(f"msa.data: built {d} in {info['seconds']:.0f} s")


def _tokenizer_sample(docs, max_bytes: int):
    """A proportional share of every training document (so a huge package does not dominate)."""
    total = sum(len(x["text"]) for x in docs) or 1
    frac = min(1.0, max_bytes / total)
    for x in docs:
        n = int(len(x["text"]) * frac)
        if n:
            yield x["text"][:n]


# ------------------------------------------------------------------------------------------------
# windows and packing

@dataclass
class Windows:
    """CSR list of windows: window w holds the token ranges starts[ptr[w]:ptr[w+1]] with lengths
    lens[...] (each range one piece of one document). single[w]: the window is one full range of a
    single document (used where positions must be positions in a document)."""

    starts: np.ndarray
    lens: np.ndarray
    ptr: np.ndarray
    single: np.ndarray
    seq_len: int

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def pieces(self, w: int):
        a, b = self.ptr[w], self.ptr[w + 1]
        return self.starts[a:b], self.lens[a:b]


def make_windows(split: TokenizedSplit, seq_len: int) -> Windows:
    """Full windows of seq_len tokens cut from every document, then the leftovers packed."""
    starts, lens, ptr, single = [], [], [0], []
    left_s, left_l = [], []
    for i in range(split.num_docs):
        s, e = int(split.doc_offsets[i]), int(split.doc_offsets[i + 1])
        n_full = (e - s) // seq_len
        for j in range(n_full):
            starts.append(s + j * seq_len)
            lens.append(seq_len)
            ptr.append(len(starts))
            single.append(True)
        if e - (s + n_full * seq_len) > 0:
            left_s.append(s + n_full * seq_len)
            left_l.append(e - (s + n_full * seq_len))
    room = seq_len
    cur_s, cur_l = [], []
    for s, ln in zip(left_s, left_l):
        while ln > 0:
            take = min(ln, room)
            cur_s.append(s)
            cur_l.append(take)
            s, ln, room = s + take, ln - take, room - take
            if room == 0:
                starts += cur_s
                lens += cur_l
                ptr.append(len(starts))
                single.append(False)
                cur_s, cur_l, room = [], [], seq_len
    # the last, partial packed window is dropped
    return Windows(np.asarray(starts, np.int64), np.asarray(lens, np.int64), np.asarray(ptr, np.int64),
                   np.asarray(single, bool), seq_len)


class Batch(NamedTuple):
    """input_ids: int64 (1, n * seq_len) packed windows; cu_seqlens: int32 (S+1,) boundaries of
    every document piece; windows: the window ids (for logging and tests)."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    windows: List[int]


def pack_windows(tokens: np.ndarray, windows: Windows, ids: Sequence[int], device=None,
                 transform: Optional[Callable[[int, List[np.ndarray]], List[np.ndarray]]] = None) -> Batch:
    """Concatenate windows ``ids`` into one packed row with the cu_seqlens of their pieces.
    transform(window, pieces) -> pieces of the same lengths (e.g. ``FactPlanter``), if given."""
    parts, lens = [], []
    for w in ids:
        ss, ll = windows.pieces(int(w))
        pieces = [tokens[s:s + ln] for s, ln in zip(ss, ll)]
        if transform is not None:
            pieces = transform(int(w), pieces)
        for x, ln in zip(pieces, ll):
            parts.append(x)
            lens.append(int(ln))
    ids_t = torch.from_numpy(np.concatenate(parts).astype(np.int64)).view(1, -1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    if device is not None:
        ids_t, cu = ids_t.to(device), cu.to(device)
    return Batch(ids_t, cu, [int(w) for w in ids])


class WindowLoader:
    """Batches of batch_size windows for one rank of world_size. Each epoch draws a permutation of
    all windows from (seed, epoch); a step consumes batch_size * world_size consecutive windows of
    it, rank r taking its slice, so ranks never share a window and the global batch is the same
    for any world size with the same product. The position (epoch, cursor) is the whole state.
    planters: planters applied in order to each window's pieces (``msa.data.facts.FactPlanter``,
    ``msa.data.copies.CopyPlanter``: functions of epoch and window, so the state stays the position)."""

    def __init__(self, tokens: np.ndarray, windows: Windows, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, device=None, planters: Sequence = ()):
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        need = batch_size * world_size
        if len(windows) < need:
            raise ValueError(f"the split has {len(windows)} windows of {windows.seq_len} tokens, fewer than one "
                             f"global batch (batch_size * world_size = {need}); lower data.seq_len or batch_size "
                             f"or raise data.max_corpus_mb")
        self.tokens, self.windows, self.batch_size = tokens, windows, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.planters = list(planters)
        self.epoch, self.cursor = 0, 0
        self._perm = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._perm = (self.epoch, rng.permutation(len(self.windows)))
        return self._perm[1]

    def next(self) -> Batch:
        need = self.batch_size * self.world_size
        if self.cursor + need > len(self.windows):
            self.epoch, self.cursor = self.epoch + 1, 0
        perm = self._permutation()
        take = perm[self.cursor + self.rank * self.batch_size: self.cursor + (self.rank + 1) * self.batch_size]
        self.cursor += need
        epoch, planters = self.epoch, self.planters

        def transform(w, pieces):
            for pl in planters:
                pieces = pl.apply(pieces, epoch, w)
            return pieces
        return pack_windows(self.tokens, self.windows, take, self.device, transform if planters else None)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_windows": len(self.windows)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["num_windows"] != len(self.windows) or state["seed"] != self.seed:
            raise ValueError(f"loader state is for {state['num_windows']} windows / seed {state['seed']}, this data has "
                             f"{len(self.windows)} / seed {self.seed}: the corpus or data config changed since the checkpoint")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_window_ids(windows: Windows, n: int, seed: int, *, single_only: bool = True) -> List[int]:
    """n fixed evaluation windows (single-document windows first when single_only), seeded."""
    rng = np.random.Generator(np.random.PCG64([seed, 7919]))
    order = rng.permutation(len(windows))
    if single_only:
        order = np.concatenate([order[windows.single[order]], order[~windows.single[order]]])
    return [int(w) for w in order[:n]]
