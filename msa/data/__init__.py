"""Offline training data: the installed Python packages' source code, a BPE tokenizer trained on it,
windows of the context length with packing (cu_seqlens), a resumable, shardable loader, and
synthetic facts and repeated spans planted in a share of the training windows (retrieval practice)."""

from .corpus import Package, find_packages, iter_documents, package_text, split_of
from .dataset import (Batch, CorpusData, CorpusSpec, TokenizedSplit, WindowLoader, Windows, eval_window_ids,
                      make_windows, pack_windows, prepare_corpus)
from .copies import CopyPlanter
from .facts import FactPlanter
from .tokenizer import BPETokenizer, ByteTokenizer, train_bpe

__all__ = ["Package", "find_packages", "iter_documents", "package_text", "split_of", "Batch", "CorpusData",
           "CorpusSpec", "TokenizedSplit", "WindowLoader", "Windows", "eval_window_ids", "make_windows",
           "pack_windows", "prepare_corpus", "CopyPlanter", "FactPlanter", "BPETokenizer", "ByteTokenizer", "train_bpe"]
