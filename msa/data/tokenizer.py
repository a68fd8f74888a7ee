"""Tokenizers for the code corpus: a byte-level BPE trained offline with the ``tokenizers`` package
(cached on disk as JSON), or raw bytes (vocabulary 256) when ``tokenizers`` is not installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab_size 256)."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (``tokenizers.Tokenizer``) loaded from its JSON file."""

    kind = "bpe"

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self.path = str(path)
        self.tok = Tokenizer.from_file(self.path)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def tokenizers_available() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (offline) and save it to ``path`` (written atomically).
    Every byte is in the initial alphabet, so any text encodes without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must be > 256 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return BPETokenizer(path)


def encode_documents(tokenizer, texts: Sequence[str], chunk_chars: int = 1 << 20,
                     batch_chars: int = 64 << 20) -> List[np.ndarray]:
    """Each text as an int32 token array. Texts are cut into pieces of about chunk_chars characters
    after a newline and the pieces of many texts go to the batch encoder together (it runs them in
    parallel), about batch_chars characters at a time; tokens at a cut may differ slightly from
    encoding the whole text, but the cut points are fixed, so the result is deterministic."""
    pieces: List[str] = []
    owner: List[int] = []
    for d, text in enumerate(texts):
        start = 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            pieces.append(text[start:end])
            owner.append(d)
            start = end
    per_doc: List[List[np.ndarray]] = [[] for _ in texts]
    i = 0
    while i < len(pieces):
        j, size = i, 0
        while j < len(pieces) and (j == i or size + len(pieces[j]) <= batch_chars):
            size += len(pieces[j])
            j += 1
        for k, ids in zip(range(i, j), tokenizer.encode_batch(pieces[i:j])):
            per_doc[owner[k]].append(np.asarray(ids, dtype=np.int32))
        i = j
    return [np.concatenate(a) if a else np.zeros(0, dtype=np.int32) for a in per_doc]
